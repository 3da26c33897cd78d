//! Doorbells, wait states, one-shot timers and virtual interrupts of every vCPU (issue 16),
//! as plain state: [`Notify::notify`] ORs bits into every vCPU of every subscriber of a
//! morsel, [`Notify::wait`] parks the calling vCPU until bits, an interrupt or a deadline
//! arrive, [`Notify::timer`] raises a virtual interrupt later. The scheduler asks
//! [`Notify::ready`], [`Notify::before_run`] and [`Notify::idle_until`].
//!
//! No hardware: the caller passes the clock ([`Clock`], TSC values), the facts of a guest
//! ([`Guest`]), and gets back what must be done: the CPUs to send a wake-up IPI ([`Kick`]),
//! the wake-up result to write ([`Ready::Woke`]), the vector to inject ([`Entry`]), a deadlock
//! to stop ([`Idle::Deadlock`]). The hypervisor's adapter (`hypervisor/src/vm/notify.rs`)
//! supplies `arch::ipi`, the TSC and its `Guest`, and logs; `tests.rs` drives a fake one on the
//! host (debug and `--release`).
//!
//! The state is per vCPU (a `wait` parks only the vCPU that called it; the others of its
//! guest run on); subscriptions are per guest. It lives behind the hypervisor's world lock.
//! Wake-ups across CPUs: a `notify` that makes a waiting vCPU's wait succeed (bits it waits
//! for newly pending) or newly raises a vector asks for one IPI to that vCPU's CPU. Only on
//! that edge: ringing bits that are already pending asks for none, so a guest ringing in a
//! loop causes no IPI storm. Nothing here allocates but the tables growing for a new guest or
//! vCPU or subscription (`try_reserve`, refused with `NoMemory`); names are fixed-size.
//!
//! Mutations tried by hand, each caught (`tests.rs`):
//!
//! | mutation | tests that fail |
//! | --- | --- |
//! | `notify` kicks on every ring, not on the edge | `a_wake_up_is_sent_only_on_the_edge`, `a_vector_kicks_once_until_injected` |
//! | the edge ignores a newly raised vector | `a_vector_kicks_once_until_injected`, `an_ended_vcpu_gets_nothing_and_counts_as_blocked` |
//! | `notify` skips the caller's guest's other vCPUs | `notify_reaches_every_vcpu_of_every_subscriber_and_only_them` |
//! | `notify` reaches subscribers of another morsel | `notify_reaches_every_vcpu_of_every_subscriber_and_only_them` and two more |
//! | `notify` does not skip ended vCPUs | `an_ended_vcpu_gets_nothing_and_counts_as_blocked` |
//! | `wait` parks although bits are pending | `wait_returns_pending_bits_at_once_and_parks_otherwise` |
//! | `ready` ignores the wait's deadline | `wait_ends_at_its_deadline`, `sleep_parks_until_its_deadline` |
//! | `ready` ignores the mask (bits end a sleep) | `sleep_parks_until_its_deadline` and three more |
//! | `before_run` does not clear the vector it injects | `timer_fires_at_its_deadline_highest_vector_first` and two more |
//! | `highest` picks the lowest pending vector | `timer_fires_at_its_deadline_highest_vector_first` |
//! | `blocked` ignores the timer (a vCPU with a timer is deadlocked) | `a_vcpu_with_a_timer_or_deadline_is_not_deadlocked` |
//! | `idle_until` counts a vCPU never looked at as blocked | `a_vcpu_with_a_timer_or_deadline_is_not_deadlocked`, `a_guest_ending_removes_its_subscriptions` |
//! | `idle_until` ignores its vCPUs' timers for the halt's end | `a_vcpu_with_a_timer_or_deadline_is_not_deadlocked` |
//! | `vcpu_ended` keeps the timer | `an_ended_vcpu_gets_nothing_and_counts_as_blocked` |
//! | `unmounted` keeps the subscription | `unmounting_ends_the_subscription` |
//! | `guest_ended` keeps the subscriptions, or the events | `a_guest_ending_removes_its_subscriptions` |
//! | `watch` ignores `there` | `name_watch_fires_when_the_name_enters` |
//! | `entered` does not end the watch | `name_watch_fires_when_the_name_enters` |
//! | `notify` names no guest in `Rung::raised` | `a_ring_names_the_guests_whose_vcpus_got_a_vector_raised` |
//! | `notify` names every subscriber, vector or not | `a_ring_names_the_guests_whose_vcpus_got_a_vector_raised` |
//! | `events` accepts any vCPU index | `bad_arguments_get_the_errors_of_the_abi` and five more |

use crate::gate::Guests;
use crate::names::Name;
use abi::{Error, Timeout};
use alloc::vec::Vec;
use core::fmt;

#[cfg(all(test, not(loom)))]
mod tests;

/// CPUs a [`Kick`] can name (bit N of a `u64`: CPU N); vCPUs on CPUs beyond are not kicked.
pub const MAX_CPUS: usize = 64;

/// What the notify state reads of a guest (the hypervisor's `Guest`; a fake in the tests).
pub trait Guest {
    /// Its id: the index of the run's guest table.
    fn id(&self) -> u32;
    /// How many vCPUs it has (at least 1).
    fn vcpus(&self) -> u32;
    /// The name of the morsel it has mounted exactly at `gpa`.
    fn mounted(&self, gpa: u64) -> Option<Name>;
}

/// A TSC reading and the TSC's rate (deadlines are TSC values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub now: u64,
    /// TSC ticks per microsecond (0 is taken as 1).
    pub per_us: u64,
}

impl Clock {
    /// The deadline `us` microseconds from now (saturating).
    pub fn deadline_in(self, us: u64) -> u64 {
        self.now.saturating_add(us.saturating_mul(self.per_us.max(1)))
    }
}

/// CPUs that must each get one wake-up IPI (bit N: CPU N): an idle CPU leaves HLT, one that
/// runs a guest takes an interrupt exit and re-enters (injecting).
#[must_use = "a waiting vCPU on another CPU sleeps on until its CPU gets the wake-up IPI"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kick(pub u64);

impl Kick {
    /// The CPUs, lowest first.
    pub fn cpus(self) -> impl Iterator<Item = usize> {
        (0..MAX_CPUS).filter(move |&c| self.0 & (1 << c) != 0)
    }
}

/// What a `notify` reached.
#[must_use = "the wake-up IPIs in `kick` must be sent"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rung {
    /// Subscribers (guests) reached: the call's result.
    pub reached: u64,
    pub kick: Kick,
    /// The guests one of whose vCPUs got a virtual interrupt raised: their epochs are
    /// bumped (`gate::Epoch`), so their vCPUs' next slice starts look (`before_run`).
    /// Bits alone change no start: only a waiting vCPU looks at them, and it starts under
    /// the lock anyway.
    pub raised: Guests,
}

/// Why a call was refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No morsel is mounted exactly at this address (`NotFound`).
    NotMounted(u64),
    /// Nobody but the caller subscribed to this morsel (`NoReceiver`).
    NoReceiver(Name),
    /// The guest has no vCPU of this index (`Invalid`).
    NoVcpu(u32),
    /// A table could not grow (`NoMemory`).
    NoMemory,
}

impl Refused {
    /// The ABI's error for it.
    pub fn error(self) -> Error {
        match self {
            Refused::NotMounted(_) => Error::NotFound,
            Refused::NoReceiver(_) => Error::NoReceiver,
            Refused::NoVcpu(_) => Error::Invalid,
            Refused::NoMemory => Error::NoMemory,
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Refused::NotMounted(gpa) => write!(f, "no morsel is mounted at {gpa:#x}"),
            Refused::NoReceiver(name) => write!(f, "nobody else subscribed to '{name}'"),
            Refused::NoVcpu(v) => write!(f, "the guest has no vcpu {v}"),
            Refused::NoMemory => f.write_str("no memory for the notify tables"),
        }
    }
}

/// Whether the scheduler may run a vCPU ([`Notify::ready`]).
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// It waits: do not run it.
    Waits,
    /// Run it.
    Run,
    /// Its wait ended (bits, an interrupt or its deadline): write the call's result (status
    /// 0, these bits), then run it.
    Woke(u64),
}

/// What to do before an entry of a vCPU ([`Notify::before_run`]).
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// The vCPU has no events yet: leave its interrupt state alone.
    Leave,
    /// Nothing pending: no interrupt window.
    Nothing,
    /// Inject this vector (taken off the pending set); no interrupt window.
    Inject(u8),
    /// A vector is pending and the guest cannot take it now: ask for an interrupt window.
    Window,
}

/// What an idle CPU does ([`Notify::idle_until`]).
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// Halt until this TSC value (or the next interrupt).
    Until(u64),
    /// Every vCPU of every live guest ended or waits forever with no timer: nothing can wake
    /// them. Report it and stop every live guest.
    Deadlock,
}

/// The counters of the run ([`Notify::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Doorbells rung, vCPUs reached, wake-ups, wake-up IPIs asked for, idle halts.
    pub rung: u64,
    pub delivered: u64,
    pub wakeups: u64,
    pub ipis: u64,
    pub halts: u64,
}

/// What one vCPU waits for and has pending.
#[derive(Clone, Copy, Default)]
struct Events {
    /// Doorbell bits rung and not yet taken by `wait`.
    bits: u64,
    /// Virtual interrupt vectors raised and not yet injected (bit N of word N / 64).
    irqs: [u64; 4],
    /// Parked in `wait` (`mask` 0: `sleep`) until `deadline` (None: forever).
    wait: Option<Wait>,
    /// The one-shot timer: deadline and vector.
    timer: Option<(u64, u8)>,
    /// Virtual interrupts injected so far.
    injected: u64,
    /// The CPU the vCPU runs on (placement is static), once the scheduler looked at it.
    cpu: Option<usize>,
    /// The vCPU ended (its guest's others may still run).
    ended: bool,
    /// `name_watch`: bits to set when a morsel of that name enters the directory.
    watch: Option<NameWatch>,
}

/// A name watch of one vCPU (fixed size: nothing is allocated for it).
#[derive(Clone, Copy)]
struct NameWatch {
    name: Name,
    bits: u64,
}

#[derive(Clone, Copy)]
struct Wait {
    mask: u64,
    deadline: Option<u64>,
}

impl Events {
    fn raise(&mut self, vector: u8) {
        self.irqs[vector as usize / 64] |= 1 << (vector % 64);
    }

    fn raised(&self, vector: u8) -> bool {
        self.irqs[vector as usize / 64] & (1 << (vector % 64)) != 0
    }

    /// The highest pending vector (the highest priority class first, as an APIC would).
    fn highest(&self) -> Option<u8> {
        (0..4).rev().find(|&w| self.irqs[w] != 0).map(|w| (w * 64 + 63 - self.irqs[w].leading_zeros() as usize) as u8)
    }

    fn clear(&mut self, vector: u8) {
        self.irqs[vector as usize / 64] &= !(1 << (vector % 64));
    }

    /// Fires the timer if it expired.
    fn fire_timer(&mut self, now: u64) {
        if let Some((deadline, vector)) = self.timer {
            if now >= deadline {
                self.timer = None;
                self.raise(vector);
            }
        }
    }

    /// Adds `bits` (and raises `vector`): whether that ends its wait or newly raises the
    /// vector (the edge a wake-up IPI is sent on).
    fn ring(&mut self, bits: u64, vector: Option<u8>) -> bool {
        let new = bits & !self.bits;
        self.bits |= bits;
        let mut wake = self.wait.is_some_and(|w| new & w.mask != 0);
        if let Some(v) = vector {
            wake |= !self.raised(v);
            self.raise(v);
        }
        wake
    }

    /// The CPU to kick for a ring that woke it, if another than `me`.
    fn kick(&self, wake: bool, me: usize) -> u64 {
        self.cpu.filter(|&c| wake && c != me && c < MAX_CPUS).map_or(0, |c| 1 << c)
    }

    /// Waits, and nothing has ended the wait yet (bits, an interrupt, its deadline).
    fn stuck(&self, now: u64) -> bool {
        self.wait.is_some_and(|w| self.bits & w.mask == 0 && self.highest().is_none() && w.deadline.is_none_or(|d| now < d))
    }

    /// Can never run again by itself: ended, or waits forever with no timer armed.
    fn blocked(&self, now: u64) -> bool {
        self.ended || (self.stuck(now) && self.wait.is_some_and(|w| w.deadline.is_none()) && self.timer.is_none())
    }
}

/// A guest that asked for the doorbells of a morsel it has mounted.
struct Subscription {
    guest: u32,
    morsel: Name,
    vector: Option<u8>,
}

/// The doorbell and timer state of every vCPU of the run.
#[derive(Default)]
pub struct Notify {
    /// By guest id, then vCPU index.
    vcpus: Vec<Vec<Events>>,
    subs: Vec<Subscription>,
    stats: Stats,
}

impl Notify {
    /// The events of every vCPU of `g` (made on first use).
    fn guest(&mut self, g: &impl Guest) -> Result<&mut Vec<Events>, Refused> {
        let (i, n) = (g.id() as usize, g.vcpus().max(1) as usize);
        if i >= self.vcpus.len() {
            self.vcpus.try_reserve(i + 1 - self.vcpus.len()).map_err(|_| Refused::NoMemory)?;
            self.vcpus.resize_with(i + 1, Vec::new);
        }
        let v = &mut self.vcpus[i];
        if v.len() < n {
            v.try_reserve(n - v.len()).map_err(|_| Refused::NoMemory)?;
            v.resize_with(n, Events::default);
        }
        Ok(v)
    }

    /// The events of vCPU `vcpu` of `g`.
    fn events(&mut self, g: &impl Guest, vcpu: u32) -> Result<&mut Events, Refused> {
        self.guest(g)?.get_mut(vcpu as usize).ok_or(Refused::NoVcpu(vcpu))
    }

    /// The events of vCPU `vcpu` of `guest`, if it has any yet.
    fn existing(&mut self, guest: u32, vcpu: u32) -> Option<&mut Events> {
        self.vcpus.get_mut(guest as usize).and_then(|v| v.get_mut(vcpu as usize))
    }

    /// `notify_subscribe`: `g` wants the doorbells of the morsel mounted at `gpa` (and
    /// `vector` raised with them). Subscribing again changes the vector.
    pub fn subscribe(&mut self, g: &impl Guest, gpa: u64, vector: Option<u8>) -> Result<u64, Refused> {
        let morsel = g.mounted(gpa).ok_or(Refused::NotMounted(gpa))?;
        self.guest(g)?;
        let guest = g.id();
        if let Some(s) = self.subs.iter_mut().find(|s| s.guest == guest && s.morsel == morsel) {
            s.vector = vector;
            return Ok(0);
        }
        // At most one per mount, and mounts are bounded by `abi::MOUNT_QUOTA`.
        self.subs.try_reserve(1).map_err(|_| Refused::NoMemory)?;
        self.subs.push(Subscription { guest, morsel, vector });
        Ok(0)
    }

    /// `notify` from vCPU `vcpu` of `g` on CPU `me`: rings `bits` in every vCPU of every
    /// subscriber of the morsel `g` has at `gpa`, but the caller itself (the caller's other
    /// vCPUs are reached where its guest subscribed). Returns the subscribers reached and the
    /// CPUs to wake (on the edge, module comment).
    pub fn notify(&mut self, g: &impl Guest, vcpu: u32, me: usize, gpa: u64, bits: u64) -> Result<Rung, Refused> {
        let morsel = g.mounted(gpa).ok_or(Refused::NotMounted(gpa))?;
        let caller = g.id();
        let (mut reached, mut kick, mut raised) = (0, 0u64, Guests::default());
        for s in self.subs.iter().filter(|s| s.morsel == morsel) {
            // Subscribing made the guest's events.
            let Some(all) = self.vcpus.get_mut(s.guest as usize) else { continue };
            let mut hit = 0;
            for (index, e) in all.iter_mut().enumerate() {
                if e.ended || (s.guest == caller && index as u32 == vcpu) {
                    continue;
                }
                let wake = e.ring(bits, s.vector);
                kick |= e.kick(wake, me);
                hit += 1;
            }
            if hit > 0 {
                reached += 1;
                self.stats.delivered += hit;
                if s.vector.is_some() {
                    raised.add(s.guest);
                }
            }
        }
        if reached == 0 {
            return Err(Refused::NoReceiver(morsel));
        }
        self.stats.rung += 1;
        self.stats.ipis += u64::from(kick.count_ones());
        Ok(Rung { reached, kick: Kick(kick), raised })
    }

    /// `name_watch` of vCPU `vcpu` of `g`: `bits` for `name` (`there`: in the directory now),
    /// 0 cancels. Returns 1 if the bits were set at once.
    pub fn watch(&mut self, g: &impl Guest, vcpu: u32, name: &Name, bits: u64, there: bool) -> Result<u64, Refused> {
        let e = self.events(g, vcpu)?;
        e.watch = None;
        if bits == 0 {
            return Ok(0);
        }
        if there {
            e.bits |= bits;
            return Ok(1);
        }
        e.watch = Some(NameWatch { name: *name, bits });
        Ok(0)
    }

    /// The hook every create calls once its morsel or region is in the directory and mounted
    /// in `g` at `gpa`: the vCPUs that watch its name get their bits (woken by IPI on another
    /// CPU than `me`), and their watches end.
    pub fn entered(&mut self, g: &impl Guest, gpa: u64, me: usize) -> Kick {
        let Some(name) = g.mounted(gpa) else { return Kick::default() };
        let mut kick = 0u64;
        for e in self.vcpus.iter_mut().flatten() {
            let Some(w) = e.watch.filter(|w| w.name == name) else { continue };
            e.watch = None;
            let wake = e.ring(w.bits, None);
            kick |= e.kick(wake, me);
            self.stats.delivered += 1;
        }
        self.stats.ipis += u64::from(kick.count_ones());
        Kick(kick)
    }

    /// `wait` / `sleep` (`mask` 0) of vCPU `vcpu`: takes pending bits at once (`Some`) or
    /// parks that vCPU only (`None`: the scheduler moves on; `ready` says when it wakes).
    pub fn wait(&mut self, g: &impl Guest, vcpu: u32, mask: u64, timeout: Timeout, clock: Clock) -> Result<Option<u64>, Refused> {
        let e = self.events(g, vcpu)?;
        let got = e.bits & mask;
        if got != 0 || timeout == Timeout::Poll {
            e.bits &= !got;
            return Ok(Some(got));
        }
        let deadline = match timeout {
            Timeout::Micros(us) => Some(clock.deadline_in(us)),
            _ => None,
        };
        e.wait = Some(Wait { mask, deadline });
        Ok(None)
    }

    /// `timer`: arms (or with `us` 0 cancels) the one-shot timer of vCPU `vcpu` of `g`.
    pub fn timer(&mut self, g: &impl Guest, vcpu: u32, us: u64, vector: u8, clock: Clock) -> Result<u64, Refused> {
        let e = self.events(g, vcpu)?;
        e.timer = (us != 0).then(|| (clock.deadline_in(us), vector));
        Ok(0)
    }

    /// Interrupts injected into `guest` so far (all its vCPUs).
    pub fn injected(&self, guest: u32) -> u64 {
        self.vcpus.get(guest as usize).map_or(0, |v| v.iter().map(|e| e.injected).sum())
    }

    /// `guest` unmounted `morsel`: its subscription ends.
    pub fn unmounted(&mut self, guest: u32, morsel: &Name) {
        self.subs.retain(|s| !(s.guest == guest && s.morsel == *morsel));
    }

    /// vCPU `vcpu` of `guest` ended: nothing reaches it any more, and it waits for nothing.
    pub fn vcpu_ended(&mut self, guest: u32, vcpu: u32) {
        if let Some(e) = self.existing(guest, vcpu) {
            *e = Events { ended: true, ..Events::default() };
        }
    }

    /// `guest` ended: its subscriptions and events go.
    pub fn guest_ended(&mut self, guest: u32) {
        self.subs.retain(|s| s.guest != guest);
        if let Some(v) = self.vcpus.get_mut(guest as usize) {
            *v = Vec::new();
        }
    }

    /// Whether the scheduler of CPU `me` may run vCPU `index` of `g` (a runnable guest) at
    /// `now`: fires its expired timer, and ends a wait that bits, an interrupt or its deadline
    /// ended (taking the bits it waited for).
    pub fn ready(&mut self, g: &impl Guest, index: u32, me: usize, now: u64) -> Ready {
        // Out of memory for the table: run it (it cannot have waited).
        let Ok(e) = self.events(g, index) else { return Ready::Run };
        e.cpu = Some(me);
        e.fire_timer(now);
        let Some(w) = e.wait else { return Ready::Run };
        let got = e.bits & w.mask;
        let timed_out = w.deadline.is_some_and(|d| now >= d);
        if got == 0 && !timed_out && e.highest().is_none() {
            return Ready::Waits;
        }
        e.bits &= !got;
        e.wait = None;
        self.stats.wakeups += 1;
        Ready::Woke(got)
    }

    /// Before an entry of vCPU `index` of `guest` at `now`: an expired timer fires, then the
    /// highest pending virtual interrupt goes in if the guest can take it (`interruptible`,
    /// asked only then), else an interrupt window is asked for.
    pub fn before_run(&mut self, guest: u32, index: u32, now: u64, interruptible: impl FnOnce() -> bool) -> Entry {
        let Some(e) = self.existing(guest, index) else { return Entry::Leave };
        e.fire_timer(now);
        let Some(vector) = e.highest() else { return Entry::Nothing };
        if !interruptible() {
            return Entry::Window;
        }
        e.clear(vector);
        e.injected += 1;
        Entry::Inject(vector)
    }

    /// The TSC deadline of vCPU `index`'s one-shot timer, if one is set (the scheduler's
    /// lock-free path goes back to `before_run` once it passed).
    pub fn timer_deadline(&self, guest: u32, index: u32) -> Option<u64> {
        self.vcpus.get(guest as usize).and_then(|v| v.get(index as usize)).and_then(|e| e.timer.map(|t| t.0))
    }

    /// Nothing could run on CPU `me` in a whole round: its vCPUs all wait. `live` lists every
    /// live (runnable) guest as (id, vCPUs). Returns until when the CPU may halt: the earliest
    /// deadline of its own vCPUs, at most `slice_end` (a safety net: a doorbell for one of
    /// them sends an IPI). If every vCPU of every live guest on every CPU ended or waits
    /// forever with no deadline and no timer, nothing can ever wake them (no running vCPU
    /// could notify; device completions do not ring doorbells): [`Idle::Deadlock`].
    pub fn idle_until(&mut self, live: impl Iterator<Item = (u32, u32)> + Clone, me: usize, now: u64, slice_end: u64) -> Idle {
        let vcpus = &self.vcpus;
        let own = || live.clone().filter_map(|(id, _)| vcpus.get(id as usize)).flatten().filter(|e| e.cpu == Some(me) && !e.ended);
        // A vCPU here whose wait is already over (bits, an interrupt or its deadline arrived
        // after the scheduler looked) is not waiting: do not halt.
        if own().any(|e| e.wait.is_some() && !e.stuck(now)) {
            return Idle::Until(now);
        }
        let earliest = own().flat_map(|e| [e.wait.and_then(|w| w.deadline), e.timer.map(|t| t.0)]).flatten().min();
        // Every vCPU of every live guest (one the scheduler never looked at is runnable).
        let all_blocked = live.clone().all(|(id, n)| {
            let v = vcpus.get(id as usize);
            (0..n.max(1) as usize).all(|i| v.and_then(|v| v.get(i)).is_some_and(|e| e.blocked(now)))
        });
        if earliest.is_some() || !all_blocked {
            self.stats.halts += 1;
            return Idle::Until(earliest.map_or(slice_end, |d| d.min(slice_end)));
        }
        Idle::Deadlock
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }
}
