//! Doorbells, wait states, one-shot timers and virtual interrupts of every vCPU (issue 16):
//! `notify` ORs bits into every vCPU of every subscriber of a morsel, `wait` and `sleep`
//! park the calling vCPU until bits, an interrupt or a deadline arrive, `timer` raises a
//! virtual interrupt in the calling vCPU later. The scheduler asks `ready` before it runs a
//! vCPU, `before_run` before every entry (injection or an interrupt window) and `idle` when
//! nothing could run on its CPU: halt until the next deadline, or report a deadlock and stop
//! the guests that wait forever.
//!
//! The state is per vCPU (a `wait` parks only the vCPU that called it; the others of its
//! guest run on); subscriptions are per guest. It lives in the run's `World`, behind the
//! world lock. Deadlines are TSC values. Wake-ups across CPUs: a `notify` that makes a
//! waiting vCPU's wait succeed (bits it waits for newly pending) or newly raises a vector
//! sends that vCPU's CPU one IPI (`arch::ipi`): an idle CPU leaves HLT, one that runs a guest
//! takes an interrupt exit and re-enters (injecting). Only on that edge: ringing bits that are
//! already pending sends nothing, so a guest ringing in a loop causes no IPI storm.

use super::guest::{Guest, State};
use super::{Backend, Regs};
use crate::arch::ipi;
use crate::platform::time;
use abi::{Error, Timeout};
use alloc::string::String;
use alloc::vec::Vec;

/// What one vCPU waits for and has pending.
#[derive(Default)]
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
    name: [u8; abi::MORSEL_NAME_MAX],
    len: u8,
    bits: u64,
}

impl NameWatch {
    fn is(&self, name: &str) -> bool {
        self.name.get(..self.len as usize) == Some(name.as_bytes())
    }
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
    morsel: String,
    vector: Option<u8>,
}

/// The doorbell and timer state of every vCPU of the run.
#[derive(Default)]
pub struct Notify {
    /// By guest id, then vCPU index.
    vcpus: Vec<Vec<Events>>,
    subs: Vec<Subscription>,
    /// Doorbells rung, vCPUs reached, wake-ups, wake-up IPIs sent, idle halts.
    rung: u64,
    delivered: u64,
    wakeups: u64,
    ipis: u64,
    halts: u64,
}

/// The name of the morsel `g` has mounted at `gpa` (exactly the mount's address).
fn mounted<B: Backend>(g: &mut Guest<B>, gpa: u64) -> Result<String, Error> {
    match g.mounts.iter().find(|m| m.gpa == gpa) {
        Some(m) => crate::morsels::try_string(&m.name),
        None => Err(g.refuse(Error::NotFound, format_args!("no morsel is mounted at {gpa:#x}"))),
    }
}

fn deadline_in(us: u64) -> u64 {
    time::tsc().saturating_add(us.saturating_mul(time::tsc_per_us().max(1)))
}

impl Notify {
    /// The events of every vCPU of `g` (made on first use).
    fn guest<B: Backend>(&mut self, g: &Guest<B>) -> Result<&mut Vec<Events>, Error> {
        let (i, n) = (g.id as usize, g.spec.vcpus.max(1) as usize);
        if i >= self.vcpus.len() {
            self.vcpus.try_reserve(i + 1 - self.vcpus.len()).map_err(|_| Error::NoMemory)?;
            self.vcpus.resize_with(i + 1, Vec::new);
        }
        let v = &mut self.vcpus[i];
        if v.len() < n {
            v.try_reserve(n - v.len()).map_err(|_| Error::NoMemory)?;
            v.resize_with(n, Events::default);
        }
        Ok(v)
    }

    /// The events of vCPU `vcpu` of `g`.
    fn events<B: Backend>(&mut self, g: &Guest<B>, vcpu: u32) -> Result<&mut Events, Error> {
        self.guest(g)?.get_mut(vcpu as usize).ok_or(Error::Invalid)
    }

    /// `notify_subscribe`: `g` wants the doorbells of the morsel mounted at `gpa`.
    pub fn subscribe<B: Backend>(&mut self, g: &mut Guest<B>, gpa: u64, vector: Option<u8>) -> Result<u64, Error> {
        let morsel = mounted(g, gpa)?;
        self.guest(g)?;
        if let Some(s) = self.subs.iter_mut().find(|s| s.guest == g.id && s.morsel == morsel) {
            s.vector = vector;
            return Ok(0);
        }
        // At most one per mount, and mounts are bounded by `abi::MOUNT_QUOTA`.
        self.subs.try_reserve(1).map_err(|_| Error::NoMemory)?;
        log::debug!(target: "notify", "guest {} subscribed to '{morsel}' (vector {vector:?})", g.id);
        self.subs.push(Subscription { guest: g.id, morsel, vector });
        Ok(0)
    }

    /// `notify` from vCPU `vcpu` of `g` on CPU `me`: rings `bits` in every vCPU of every
    /// subscriber of the morsel `g` has at `gpa`, but the caller itself (the caller's other
    /// vCPUs are reached where its guest subscribed). Returns the subscribers (guests)
    /// reached; wakes vCPUs on other CPUs by IPI on the edge (module comment).
    pub fn notify<B: Backend>(&mut self, g: &mut Guest<B>, vcpu: u32, me: usize, gpa: u64, bits: u64) -> Result<u64, Error> {
        let morsel = mounted(g, gpa)?;
        let mut reached = 0;
        let mut kick = 0u64;
        for i in 0..self.subs.len() {
            let (guest, vector) = (self.subs[i].guest, self.subs[i].vector);
            if self.subs[i].morsel != morsel {
                continue;
            }
            // Subscribing made the guest's events.
            let Some(all) = self.vcpus.get_mut(guest as usize) else { continue };
            let mut hit = 0;
            for (index, e) in all.iter_mut().enumerate() {
                if e.ended || (guest == g.id && index as u32 == vcpu) {
                    continue;
                }
                let new = bits & !e.bits;
                e.bits |= bits;
                let mut wake = e.wait.is_some_and(|w| new & w.mask != 0);
                if let Some(v) = vector {
                    wake |= !e.raised(v);
                    e.raise(v);
                }
                if let Some(cpu) = e.cpu.filter(|&c| wake && c != me && c < ipi::MAX_CPUS) {
                    kick |= 1 << cpu;
                }
                hit += 1;
            }
            if hit > 0 {
                reached += 1;
                self.delivered += hit;
            }
        }
        if reached == 0 {
            return Err(g.refuse(Error::NoReceiver, format_args!("nobody else subscribed to '{morsel}'")));
        }
        self.rung += 1;
        for cpu in (0..ipi::MAX_CPUS).filter(|c| kick & (1 << c) != 0) {
            ipi::send(cpu);
            self.ipis += 1;
        }
        Ok(reached)
    }

    /// `name_watch` of vCPU `vcpu` of `g`: `bits` for `name` (`there`: in the directory now),
    /// 0 cancels. Returns 1 if the bits were set at once.
    pub fn watch<B: Backend>(&mut self, g: &Guest<B>, vcpu: u32, name: &str, bits: u64, there: bool) -> Result<u64, Error> {
        let e = self.events(g, vcpu)?;
        e.watch = None;
        if bits == 0 {
            return Ok(0);
        }
        if there {
            e.bits |= bits;
            return Ok(1);
        }
        let mut w = NameWatch { name: [0; abi::MORSEL_NAME_MAX], len: 0, bits };
        let n = name.len().min(abi::MORSEL_NAME_MAX);
        w.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        w.len = n as u8;
        e.watch = Some(w);
        Ok(0)
    }

    /// The hook every create calls once its morsel or region is in the directory and mounted
    /// in `g` at `gpa`: the vCPUs that watch its name get their bits (and are woken, by IPI
    /// on another CPU than `me`), and their watches end.
    pub fn entered<B: Backend>(&mut self, g: &Guest<B>, gpa: u64, me: usize) {
        let Some(m) = g.mounts.iter().find(|m| m.gpa == gpa) else { return };
        let mut kick = 0u64;
        for e in self.vcpus.iter_mut().flatten() {
            let Some(w) = e.watch.filter(|w| w.is(&m.name)) else { continue };
            e.watch = None;
            let new = w.bits & !e.bits;
            e.bits |= w.bits;
            self.delivered += 1;
            let wake = e.wait.is_some_and(|wt| new & wt.mask != 0);
            if let Some(cpu) = e.cpu.filter(|&c| wake && c != me && c < ipi::MAX_CPUS) {
                kick |= 1 << cpu;
            }
        }
        for cpu in (0..ipi::MAX_CPUS).filter(|c| kick & (1 << c) != 0) {
            ipi::send(cpu);
            self.ipis += 1;
        }
    }

    /// `wait` / `sleep` (`mask` 0) of vCPU `vcpu`: takes pending bits at once (`Some`) or
    /// parks that vCPU only (`None`: the scheduler moves on; `ready` writes the result when
    /// it wakes).
    pub fn wait<B: Backend>(&mut self, g: &Guest<B>, vcpu: u32, mask: u64, timeout: Timeout) -> Result<Option<u64>, Error> {
        let e = self.events(g, vcpu)?;
        let got = e.bits & mask;
        if got != 0 || timeout == Timeout::Poll {
            e.bits &= !got;
            return Ok(Some(got));
        }
        let deadline = match timeout {
            Timeout::Micros(us) => Some(deadline_in(us)),
            _ => None,
        };
        e.wait = Some(Wait { mask, deadline });
        Ok(None)
    }

    /// `timer`: arms (or with `us` 0 cancels) the one-shot timer of vCPU `vcpu` of `g`.
    pub fn timer<B: Backend>(&mut self, g: &Guest<B>, vcpu: u32, us: u64, vector: u8) -> Result<u64, Error> {
        let e = self.events(g, vcpu)?;
        e.timer = (us != 0).then(|| (deadline_in(us), vector));
        Ok(0)
    }

    /// Interrupts injected into `guest` so far (all its vCPUs).
    pub fn injected(&self, guest: u32) -> u64 {
        self.vcpus.get(guest as usize).map_or(0, |v| v.iter().map(|e| e.injected).sum())
    }

    /// `g` unmounted `morsel`: its subscription ends.
    pub fn unmounted(&mut self, guest: u32, morsel: &str) {
        self.subs.retain(|s| !(s.guest == guest && s.morsel == morsel));
    }

    /// vCPU `vcpu` of `guest` ended: nothing reaches it any more, and it waits for nothing.
    pub fn vcpu_ended(&mut self, guest: u32, vcpu: u32) {
        if let Some(e) = self.vcpus.get_mut(guest as usize).and_then(|v| v.get_mut(vcpu as usize)) {
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

    /// Whether the scheduler of CPU `me` may run vCPU `index` of `g` now: fires its expired
    /// timer, and wakes it from a wait that bits, an interrupt or its deadline ended (writing
    /// the call's result).
    pub fn ready<B: Backend>(&mut self, g: &mut Guest<B>, index: u32, me: usize, vcpu: &mut B::Vcpu) -> bool {
        if g.state != State::Runnable {
            return false;
        }
        // Out of memory for the table: run it (it cannot have waited).
        let Ok(e) = self.events(g, index) else { return true };
        e.cpu = Some(me);
        let now = time::tsc();
        e.fire_timer(now);
        let Some(w) = e.wait else { return true };
        let got = e.bits & w.mask;
        let timed_out = w.deadline.is_some_and(|d| now >= d);
        if got == 0 && !timed_out && e.highest().is_none() {
            return false;
        }
        e.bits &= !got;
        e.wait = None;
        self.wakeups += 1;
        let regs: &mut Regs = B::regs(vcpu);
        regs.rax = 0;
        regs.rdx = got;
        true
    }

    /// Before an entry of vCPU `index` of `g`: the highest pending virtual interrupt goes in
    /// if the guest can take it, else an interrupt window is asked for; an expired timer
    /// fires first.
    pub fn before_run<B: Backend>(&mut self, g: &Guest<B>, index: u32, vcpu: &mut B::Vcpu) {
        let Some(e) = self.vcpus.get_mut(g.id as usize).and_then(|v| v.get_mut(index as usize)) else { return };
        e.fire_timer(time::tsc());
        let Some(vector) = e.highest() else {
            B::interrupt_window(vcpu, false);
            return;
        };
        if B::interruptible(vcpu) {
            B::inject_interrupt(vcpu, vector);
            B::interrupt_window(vcpu, false);
            e.clear(vector);
            e.injected += 1;
        } else {
            B::interrupt_window(vcpu, true);
        }
    }

    /// The TSC deadline of vCPU `index`'s one-shot timer, if one is set (the scheduler's
    /// lock-free path goes back to `before_run` once it passed).
    pub fn timer_deadline(&self, guest: u32, index: u32) -> Option<u64> {
        self.vcpus.get(guest as usize).and_then(|v| v.get(index as usize)).and_then(|e| e.timer.map(|t| t.0))
    }

    /// Nothing could run on CPU `me` in a whole round: its vCPUs all wait. Returns until when
    /// the CPU may halt (HLT with interrupts on; the caller first lets go of the world lock):
    /// the earliest deadline of its own vCPUs, and at most one slice (a safety net: a
    /// doorbell for one of them sends an IPI). If every vCPU of every live guest on every CPU
    /// ended or waits forever with no deadline and no timer, nothing can ever wake them (no
    /// running vCPU could notify; device completions do not ring doorbells): reports the
    /// deadlock and stops them (None), kicking their other CPUs.
    pub fn idle_until<B: Backend>(&mut self, guests: &mut [Option<Guest<B>>], me: usize, slice_end: u64) -> Option<u64> {
        let now = time::tsc();
        let live = || guests.iter().flatten().filter(|g| g.state == State::Runnable);
        let own = || {
            live().filter_map(|g| self.vcpus.get(g.id as usize)).flatten().filter(|e| e.cpu == Some(me) && !e.ended)
        };
        // A vCPU here whose wait is already over (bits, an interrupt or its deadline arrived
        // after the scheduler looked) is not waiting: do not halt.
        if own().any(|e| e.wait.is_some() && !e.stuck(now)) {
            return Some(now);
        }
        let earliest = own().flat_map(|e| [e.wait.and_then(|w| w.deadline), e.timer.map(|t| t.0)]).flatten().min();
        // Every vCPU of every live guest (one the scheduler never looked at is runnable).
        let all_blocked = live().all(|g| {
            let v = self.vcpus.get(g.id as usize);
            (0..g.spec.vcpus.max(1) as usize).all(|i| v.and_then(|v| v.get(i)).is_some_and(|e| e.blocked(now)))
        });
        if earliest.is_some() || !all_blocked {
            self.halts += 1;
            return Some(earliest.map_or(slice_end, |d| d.min(slice_end)));
        }
        // Formatted straight into the log line: a guest-triggered report allocates nothing.
        let names = LiveNames(&*guests);
        log::error!(target: "notify", "deadlock: {names} wait forever with no timer and no possible notifier: stopped");
        for g in guests.iter_mut().flatten().filter(|g| g.state == State::Runnable) {
            g.flush_console();
            g.state = State::Stopped;
            for cpu in (0..ipi::MAX_CPUS).filter(|&c| c != me && g.ran_on & (1 << c) != 0) {
                ipi::send(cpu);
            }
        }
        None
    }

    /// Prints the counters (end of run).
    pub fn log_stats(&self) {
        if self.rung + self.wakeups + self.halts > 0 {
            log::info!(target: "notify", "doorbells: {} rung, {} deliveries, {} wake-ups, {} wake-up IPIs, {} idle halts",
                self.rung, self.delivered, self.wakeups, self.ipis, self.halts);
        }
    }
}

/// The runnable guests as `guest 0 (a), guest 2 (b)`, written where it is displayed.
struct LiveNames<'a, B: Backend>(&'a [Option<Guest<B>>]);

impl<B: Backend> core::fmt::Display for LiveNames<'_, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let live = self.0.iter().flatten().filter(|g| g.state == State::Runnable);
        for (i, g) in live.enumerate() {
            write!(f, "{}guest {} ({})", if i == 0 { "" } else { ", " }, g.id, g.spec.name)?;
        }
        Ok(())
    }
}
