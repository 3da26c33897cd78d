//! Doorbells, wait states, one-shot timers and virtual interrupts of the vCPUs on this CPU
//! (issue 16): `notify` ORs bits into every subscriber of a morsel, `wait` and `sleep` park a
//! vCPU until bits, an interrupt or a deadline arrive, `timer` raises a virtual interrupt
//! later. The scheduler asks `ready` before it runs a vCPU, `before_run` before every entry
//! (injection or an interrupt window) and `idle` when nothing could run: halt until the next
//! deadline, or report a deadlock and stop the guests that wait forever.
//!
//! One vCPU per guest, all on one CPU: the state is owned by the vCPU loop's context and
//! reached only from it (no lock). Deadlines are TSC values.

use super::guest::{Guest, State};
use super::{Backend, Regs};
use crate::platform::time;
use abi::{Error, Timeout};
use alloc::string::String;
use alloc::vec::Vec;

/// What one guest's vCPU waits for and has pending.
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

    /// The highest pending vector (the highest priority class first, as an APIC would).
    fn highest(&self) -> Option<u8> {
        (0..4).rev().find(|&w| self.irqs[w] != 0).map(|w| (w * 64 + 63 - self.irqs[w].leading_zeros() as usize) as u8)
    }

    fn clear(&mut self, vector: u8) {
        self.irqs[vector as usize / 64] &= !(1 << (vector % 64));
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
    vcpus: Vec<Events>,
    subs: Vec<Subscription>,
    /// Doorbells rung, guests reached, wake-ups, idle halts.
    rung: u64,
    delivered: u64,
    wakeups: u64,
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
    fn events(&mut self, guest: u32) -> Result<&mut Events, Error> {
        let i = guest as usize;
        if i >= self.vcpus.len() {
            self.vcpus.try_reserve(i + 1 - self.vcpus.len()).map_err(|_| Error::NoMemory)?;
            self.vcpus.resize_with(i + 1, Events::default);
        }
        Ok(&mut self.vcpus[i])
    }

    /// `notify_subscribe`: `g` wants the doorbells of the morsel mounted at `gpa`.
    pub fn subscribe<B: Backend>(&mut self, g: &mut Guest<B>, gpa: u64, vector: Option<u8>) -> Result<u64, Error> {
        let morsel = mounted(g, gpa)?;
        self.events(g.id)?;
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

    /// `notify`: rings `bits` for every other subscriber of the morsel `g` has at `gpa`.
    pub fn notify<B: Backend>(&mut self, g: &mut Guest<B>, gpa: u64, bits: u64) -> Result<u64, Error> {
        let morsel = mounted(g, gpa)?;
        let mut reached = 0;
        for i in 0..self.subs.len() {
            let (guest, vector) = (self.subs[i].guest, self.subs[i].vector);
            if guest == g.id || self.subs[i].morsel != morsel {
                continue;
            }
            let e = self.events(guest)?;
            e.bits |= bits;
            if let Some(v) = vector {
                e.raise(v);
            }
            reached += 1;
        }
        if reached == 0 {
            return Err(g.refuse(Error::NoReceiver, format_args!("nobody else subscribed to '{morsel}'")));
        }
        self.rung += 1;
        self.delivered += reached;
        Ok(reached)
    }

    /// `wait` / `sleep` (`mask` 0): takes pending bits at once (`Some`) or parks the vCPU
    /// (`None`: the scheduler moves on; `ready` writes the result when it wakes).
    pub fn wait(&mut self, guest: u32, mask: u64, timeout: Timeout) -> Result<Option<u64>, Error> {
        let e = self.events(guest)?;
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

    /// `timer`: arms (or with `us` 0 cancels) the one-shot timer of `guest`.
    pub fn timer(&mut self, guest: u32, us: u64, vector: u8) -> Result<u64, Error> {
        let e = self.events(guest)?;
        e.timer = (us != 0).then(|| (deadline_in(us), vector));
        Ok(0)
    }

    /// Interrupts injected into `guest` so far.
    pub fn injected(&self, guest: u32) -> u64 {
        self.vcpus.get(guest as usize).map_or(0, |e| e.injected)
    }

    /// `g` unmounted `morsel`: its subscription ends.
    pub fn unmounted(&mut self, guest: u32, morsel: &str) {
        self.subs.retain(|s| !(s.guest == guest && s.morsel == morsel));
    }

    /// `guest` ended: its subscriptions and events go.
    pub fn guest_ended(&mut self, guest: u32) {
        self.subs.retain(|s| s.guest != guest);
        if let Some(e) = self.vcpus.get_mut(guest as usize) {
            *e = Events::default();
        }
    }

    /// Whether the scheduler may run `g` now: fires its expired timer, and wakes it from a
    /// wait that bits, an interrupt or its deadline ended (writing the call's result).
    pub fn ready<B: Backend>(&mut self, g: &mut Guest<B>, vcpu: &mut B::Vcpu) -> bool {
        if g.state != State::Runnable {
            return false;
        }
        let Some(e) = self.vcpus.get_mut(g.id as usize) else { return true };
        let now = time::tsc();
        if let Some((deadline, vector)) = e.timer {
            if now >= deadline {
                e.timer = None;
                e.raise(vector);
            }
        }
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

    /// Before an entry of `g`: the highest pending virtual interrupt goes in if the guest
    /// can take it, else an interrupt window is asked for; an expired timer fires first.
    pub fn before_run<B: Backend>(&mut self, g: &mut Guest<B>, vcpu: &mut B::Vcpu) {
        let Some(e) = self.vcpus.get_mut(g.id as usize) else { return };
        if let Some((deadline, vector)) = e.timer {
            if time::tsc() >= deadline {
                e.timer = None;
                e.raise(vector);
            }
        }
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

    /// Nothing could run on this CPU in a whole round: its vCPUs all wait. Returns until when
    /// the CPU may halt (HLT with interrupts on; the caller first lets go of the world lock):
    /// the earliest deadline of any guest, and at most one slice, so that a doorbell rung on
    /// another CPU is seen within a slice. If every live guest on every CPU waits and none has
    /// a deadline, nothing can ever wake them (no runnable guest could notify, no timer is
    /// armed; device completions do not ring doorbells): reports the deadlock and stops them
    /// (None).
    pub fn idle_until<B: Backend>(&mut self, guests: &mut [Option<Guest<B>>], slice_end: u64) -> Option<u64> {
        let live = || guests.iter().flatten().filter(|g| g.state == State::Runnable);
        let now = time::tsc();
        // A guest whose wait is already over (bits, an interrupt or its deadline arrived, and
        // the CPU it runs on has not looked yet) is not waiting: do not halt.
        let stuck = |e: &Events| e.wait.is_some_and(|w| e.bits & w.mask == 0 && e.highest().is_none() && w.deadline.is_none_or(|d| now < d));
        if live().any(|g| self.vcpus.get(g.id as usize).is_some_and(|e| e.wait.is_some() && !stuck(e))) {
            return Some(now);
        }
        let all_wait = live().all(|g| self.vcpus.get(g.id as usize).is_some_and(stuck));
        let earliest = live()
            .filter_map(|g| self.vcpus.get(g.id as usize))
            .flat_map(|e| [e.wait.and_then(|w| w.deadline), e.timer.map(|t| t.0)])
            .flatten()
            .min();
        match (earliest, all_wait) {
            (Some(deadline), _) => {
                self.halts += 1;
                Some(deadline.min(slice_end))
            }
            (None, false) => {
                self.halts += 1;
                Some(slice_end)
            }
            (None, true) => {
                let mut names = String::new();
                for g in live() {
                    use core::fmt::Write;
                    let _ = write!(names, "{}guest {} ({})", if names.is_empty() { "" } else { ", " }, g.id, g.spec.name);
                }
                log::error!(target: "notify", "deadlock: {names} wait forever with no timer and no possible notifier: stopped");
                for g in guests.iter_mut().flatten().filter(|g| g.state == State::Runnable) {
                    g.flush_console();
                    g.state = State::Stopped;
                }
                None
            }
        }
    }

    /// Prints the counters (end of run).
    pub fn log_stats(&self) {
        if self.rung + self.wakeups + self.halts > 0 {
            log::info!(target: "notify", "doorbells: {} rung, {} deliveries, {} wake-ups, {} idle halts",
                self.rung, self.delivered, self.wakeups, self.halts);
        }
    }
}
