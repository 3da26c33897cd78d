//! Doorbells, wait states, one-shot timers and virtual interrupts of every vCPU (issue 16):
//! the adapter between the scheduler and hypercalls and the host-tested state machine
//! `vmcore::notify` (where the rules are). It supplies the TSC, the guests' facts (id, vCPUs,
//! mounts), the wake-up IPIs the core asks for (`arch::ipi`) and the backend's injection,
//! records refusals' reasons, and logs (a deadlock report, the counters).
//!
//! Lives in the run's `World`, behind the world lock, like the state it wraps. Every change
//! here that alters what a vCPU's slice start decides (`ready`, `before_run`, its timer)
//! bumps that guest's epoch (`vmcore::gate`) before any wake-up IPI: a vector raised by a
//! ring (`Rung::raised`), a wait that parks, a timer set or cancelled. Bits alone (rings
//! without a vector, name watches) need none: only a waiting vCPU looks at them, and its
//! starts take the world lock anyway.

use super::guest::{Guest, State};
use super::{Backend, Regs};
use crate::arch::ipi;
use crate::morsels::Name;
use crate::platform::time;
use abi::{Error, Timeout};
use vmcore::notify::{Clock, Entry, Idle, Kick, Ready, Refused};

// A `Kick` names CPUs as bits of a u64: every CPU `ipi` can reach.
const _: () = assert!(ipi::MAX_CPUS <= vmcore::notify::MAX_CPUS);

impl<B: Backend> vmcore::notify::Guest for Guest<B> {
    fn id(&self) -> u32 {
        self.id
    }
    fn vcpus(&self) -> u32 {
        self.spec.vcpus.max(1)
    }
    fn mounted(&self, gpa: u64) -> Option<Name> {
        self.space.lock().mounts.iter().find(|m| m.gpa == gpa).map(|m| m.name)
    }
}

/// The doorbell and timer state of every vCPU of the run (`vmcore::notify::Notify`), and
/// every guest's slice-start epoch by guest id (`guest::Shared::epoch`), for the guests a
/// ring reaches.
#[derive(Default)]
pub struct Notify {
    core: vmcore::notify::Notify,
    epochs: &'static [vmcore::gate::Epoch],
}

/// The TSC now and its rate.
fn clock() -> Clock {
    Clock { now: time::tsc(), per_us: time::tsc_per_us() }
}

/// Sends the wake-up IPIs the core asked for.
fn kick(cpus: Kick) {
    cpus.cpus().for_each(ipi::send);
}

/// The ABI's error for `r`, its reason recorded for the refusal's log line.
fn refuse<B: Backend>(g: &mut Guest<B>, r: Refused) -> Error {
    g.refuse(r.error(), format_args!("{r}"))
}

impl Notify {
    /// The notify state of a run whose guests' epochs are `epochs` (by guest id).
    pub fn new(epochs: &'static [vmcore::gate::Epoch]) -> Self {
        Notify { core: Default::default(), epochs }
    }

    /// `notify_subscribe`: `g` wants the doorbells of the morsel mounted at `gpa`.
    pub fn subscribe<B: Backend>(&mut self, g: &mut Guest<B>, gpa: u64, vector: Option<u8>) -> Result<u64, Error> {
        let done = self.core.subscribe(g, gpa, vector).map_err(|r| refuse(g, r))?;
        let mut space = g.space.lock();
        // Its unmount ends the subscription (`unmounted`): the world lock's unmount only.
        space.mounts.unmount_whole(gpa);
        if let Some(m) = space.mounts.iter().find(|m| m.gpa == gpa) {
            log::debug!(target: "notify", "guest {} subscribed to '{}' (vector {vector:?})", g.id, m.name);
        }
        Ok(done)
    }

    /// `notify` from vCPU `vcpu` of `g` on CPU `me`: rings `bits` in every subscriber of the
    /// morsel at `gpa` and wakes the vCPUs on other CPUs it must. Returns the subscribers reached.
    pub fn notify<B: Backend>(&mut self, g: &mut Guest<B>, vcpu: u32, me: usize, gpa: u64, bits: u64) -> Result<u64, Error> {
        let rung = self.core.notify(g, vcpu, me, gpa, bits).map_err(|r| refuse(g, r))?;
        // Before the wake-up IPIs (`vmcore::gate`): a start that misses the bump is ended by one.
        for (id, e) in self.epochs.iter().enumerate() {
            if rung.raised.has(id as u32) {
                e.bump();
            }
        }
        kick(rung.kick);
        Ok(rung.reached)
    }

    /// `name_watch` of vCPU `vcpu` of `g`: `bits` for `name` (`there`: in the directory now),
    /// 0 cancels. Returns 1 if the bits were set at once.
    pub fn watch<B: Backend>(&mut self, g: &mut Guest<B>, vcpu: u32, name: &Name, bits: u64, there: bool) -> Result<u64, Error> {
        self.core.watch(g, vcpu, name, bits, there).map_err(|r| refuse(g, r))
    }

    /// A create put its morsel or region in the directory and mounted it in `g` at `gpa`:
    /// the vCPUs watching its name get their bits (woken by IPI on another CPU than `me`).
    pub fn entered<B: Backend>(&mut self, g: &Guest<B>, gpa: u64, me: usize) {
        kick(self.core.entered(g, gpa, me));
    }

    /// `wait` / `sleep` (`mask` 0) of vCPU `vcpu`: pending bits at once (`Some`) or parks
    /// that vCPU (`None`; `ready` writes the result when it wakes).
    pub fn wait<B: Backend>(&mut self, g: &mut Guest<B>, vcpu: u32, mask: u64, timeout: Timeout) -> Result<Option<u64>, Error> {
        let waits = self.core.wait(g, vcpu, mask, timeout, clock()).map_err(|r| refuse(g, r))?;
        if waits.is_none() {
            // Parked: its next start asks `ready`.
            g.shared.epoch.bump();
        }
        Ok(waits)
    }

    /// `timer`: arms (or with `us` 0 cancels) the one-shot timer of vCPU `vcpu` of `g`.
    pub fn timer<B: Backend>(&mut self, g: &mut Guest<B>, vcpu: u32, us: u64, vector: u8) -> Result<u64, Error> {
        let done = self.core.timer(g, vcpu, us, vector, clock()).map_err(|r| refuse(g, r))?;
        // Its starts go by the deadline they last read under the lock (`Slot::timer_at`).
        g.shared.epoch.bump();
        Ok(done)
    }

    /// Interrupts injected into `guest` so far (all its vCPUs).
    pub fn injected(&self, guest: u32) -> u64 {
        self.core.injected(guest)
    }

    /// `guest` unmounted `morsel`: its subscription ends.
    pub fn unmounted(&mut self, guest: u32, morsel: &Name) {
        self.core.unmounted(guest, morsel);
    }

    /// vCPU `vcpu` of `guest` ended: nothing reaches it any more, and it waits for nothing.
    pub fn vcpu_ended(&mut self, guest: u32, vcpu: u32) {
        self.core.vcpu_ended(guest, vcpu);
    }

    /// `guest` ended: its subscriptions and events go.
    pub fn guest_ended(&mut self, guest: u32) {
        self.core.guest_ended(guest);
    }

    /// Whether the scheduler of CPU `me` may run vCPU `index` of `g` now; a vCPU whose wait
    /// ended gets the call's result (status 0, the bits taken).
    pub fn ready<B: Backend>(&mut self, g: &mut Guest<B>, index: u32, me: usize, vcpu: &mut B::Vcpu) -> bool {
        if g.state != State::Runnable {
            return false;
        }
        match self.core.ready(g, index, me, time::tsc()) {
            Ready::Waits => false,
            Ready::Run => true,
            Ready::Woke(got) => {
                let regs: &mut Regs = B::regs(vcpu);
                regs.rax = 0;
                regs.rdx = got;
                true
            }
        }
    }

    /// Before an entry of vCPU `index` of `g`: injects the highest pending virtual interrupt
    /// if the guest can take it, else asks for an interrupt window. Before the vCPU loaded an
    /// IDT (`has_idt`) nothing goes in and no window is asked for (with IF = 1 it would exit
    /// at once, again and again): the vector waits for an entry after its LIDT. True where
    /// nothing was pending (the next start needs no look: `vmcore::gate::Gate::record`).
    pub fn before_run<B: Backend>(&mut self, g: &Guest<B>, index: u32, vcpu: &mut B::Vcpu) -> bool {
        let has_idt = B::has_idt(vcpu);
        match self.core.before_run(g.id, index, time::tsc(), || has_idt && B::interruptible(vcpu)) {
            Entry::Leave => true,
            Entry::Nothing => {
                B::interrupt_window(vcpu, false);
                true
            }
            Entry::Inject(vector) => {
                B::inject_interrupt(vcpu, vector);
                B::interrupt_window(vcpu, false);
                false
            }
            Entry::Window => {
                B::interrupt_window(vcpu, has_idt);
                false
            }
        }
    }

    /// The TSC deadline of vCPU `index`'s one-shot timer, if one is set.
    pub fn timer_deadline(&self, guest: u32, index: u32) -> Option<u64> {
        self.core.timer_deadline(guest, index)
    }

    /// Nothing could run on CPU `me` in a whole round: returns until when it may halt (HLT
    /// with interrupts on; the caller first lets go of the world lock), or, if every vCPU of
    /// every live guest waits forever (`vmcore::notify::Notify::idle_until`), reports the
    /// deadlock and stops those guests (None), kicking their other CPUs.
    pub fn idle_until<B: Backend>(&mut self, guests: &mut [Option<Guest<B>>], me: usize, slice_end: u64) -> Option<u64> {
        let live = guests.iter().flatten().filter(|g| g.state == State::Runnable).map(|g| (g.id, g.spec.vcpus.max(1)));
        if let Idle::Until(t) = self.core.idle_until(live, me, time::tsc(), slice_end) {
            return Some(t);
        }
        // Formatted straight into the log line: a guest-triggered report allocates nothing.
        let names = LiveNames(&*guests);
        log::error!(target: "notify", "deadlock: {names} wait forever with no timer and no possible notifier: stopped");
        for g in guests.iter_mut().flatten().filter(|g| g.state == State::Runnable) {
            g.flush_console();
            g.stop();
            for cpu in (0..ipi::MAX_CPUS).filter(|&c| c != me && g.ran_on & (1 << c) != 0) {
                ipi::send(cpu);
            }
        }
        None
    }

    /// Prints the counters (end of run).
    pub fn log_stats(&self) {
        let s = self.core.stats();
        if s.rung + s.wakeups + s.halts > 0 {
            log::info!(target: "notify", "doorbells: {} rung, {} deliveries, {} wake-ups, {} wake-up IPIs, {} idle halts",
                s.rung, s.delivered, s.wakeups, s.ipis, s.halts);
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
