//! TLB shootdown for second-level translations: after an unmount, or an ExMap FREE, cleared
//! entries may still be cached by every CPU that ran a vCPU of an affected guest
//! (`Guest::ran_on`). The operation that cleared them returns a `Flush` naming those CPUs
//! (`of_guest`, or every CPU that ran a guest) and the device domains whose IOTLB must go;
//! its caller commits it once (`Hw`): this CPU flushes (its vCPUs flush before their next
//! entry) and one IPI goes to each other such CPU (`arch::ipi`'s mailbox protocol); each
//! target flushes by the backend's own means before its next guest entry: INVEPT
//! single-context on VMX, TLB_CONTROL = flush this ASID on SVM
//! (`Backend::flush_second_level`). One shootdown per hypercall, however many entries it
//! cleared.
//!
//! # No CPU waits for another while holding the world lock
//!
//! A commit runs under the world lock but does not wait: it adds the acknowledgments
//! to wait for to this CPU's `Owed` record. Every release of the world lock
//! (`runqueue::WorldGuard`'s drop; and `sched::run_slice` after an ExMap batch that ended
//! without it, `Batch::finish_alone`) then runs `complete`: with no lock held it waits for
//! them (answering its own requests meanwhile), and only then gives the frames the call
//! freed to the allocator. So, for one call:
//!
//! 1. under the lock: entries cleared; frames they led to (the unmount's emptied tables,
//!    an ExMap FREE's trimmed cache) go through `After`, which keeps them in `Owed::frames`
//!    instead of the allocator; the call's `Flush` is committed: the IPIs are sent
//!    (`Owed::request`; none where only this CPU is named: it flushes locally);
//! 2. the lock is let go: other CPUs handle exits meanwhile; the frames are in no one's
//!    hands but this CPU's, so none can be handed out while a CPU may still cache a
//!    translation to it;
//! 3. no lock: every acknowledgment arrives (`Acks::wait`), then the kept frames are freed;
//! 4. only then does the calling vCPU enter its guest again: the call's result (written into
//!    its registers under the lock) is seen after the shootdown ended, as the ABI promises.
//!
//! Frames whose translation another call removed (a morsel destroyed right after another
//! CPU unmounted it, whose caller may still be in step 3) are freed only behind `barrier`
//! (every shootdown started so far acknowledged): `morsels::Removed::free` (no lock) and
//! `Directory::remove` (a persistent morsel's frames, under the lock: the one wait left
//! there, bounded by the 2 MiB pieces of long work every CPU answers between). An ExMap
//! FREE's frames stay in the guest's own frame cache meanwhile: another vCPU of the same
//! guest may take one back before the acknowledgments are in (its own data only).
//!
//! Lock order: world lock, then this CPU's `Owed` (only its own CPU takes it, never from
//! an interrupt handler). `Owed` overflowing (more frames kept than it has room for) waits
//! for its acknowledgments at once, under the world lock: bounded, and logged.
//!
//! The protocol core (mailboxes, `Owed`, the barrier) is `vmcore::shootdown`, host-tested
//! and model-checked with loom (docs/src/notes/shootdown-model.md); this file defines the
//! `Owed` each CPU keeps (in its `arch::percpu::PerCpu`), the allocator the kept frames go
//! back to, and the counters.

use super::guest::Guest;
use super::Backend;
use crate::arch::ipi;
use crate::devices::pci::Bdf;
use crate::devices::Devices;
use crate::mm::frames::Frames;
use core::sync::atomic::{AtomicU64, Ordering};
use vmcore::shootdown;

static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
static IPIS: AtomicU64 = AtomicU64::new(0);
/// Requests that sent no IPI: the target was busy in the hypervisor and answers before its
/// next entry or halt anyway (`vmcore::shootdown`'s busy mark).
static NOT_SENT: AtomicU64 = AtomicU64::new(0);
static TSC_SPENT: AtomicU64 = AtomicU64::new(0);
/// Time spent waiting for acknowledgments (with no lock held, but for the overflow case).
static WAIT_SPENT: AtomicU64 = AtomicU64::new(0);
static OVERFLOWS: AtomicU64 = AtomicU64::new(0);
/// Every CPU that ran any guest's vCPU.
static ANY_RAN_ON: AtomicU64 = AtomicU64::new(0);

/// The CPUs each guest's vCPUs are placed on, by guest id (placement is static: a vCPU never
/// leaves its CPU), set once by `set_placed` before any vCPU runs.
static PLACED_ON: [AtomicU64; super::guest::MAX_GUESTS] = [const { AtomicU64::new(0) }; super::guest::MAX_GUESTS];

/// Guest `guest`'s vCPUs are placed on the CPUs of `cpus` (`sched::run_guests`, before any
/// CPU runs a vCPU).
pub fn set_placed(guest: u32, cpus: u64) {
    if let Some(p) = PLACED_ON.get(guest as usize) {
        p.store(cpus, Ordering::SeqCst);
    }
}

/// The CPUs guest `guest`'s vCPUs run on: every CPU that may ever cache its translations
/// (every CPU for an id past the table, which the command line never hands out).
pub fn placed_on(guest: u32) -> u64 {
    PLACED_ON.get(guest as usize).map_or(u64::MAX, |p| p.load(Ordering::SeqCst))
}

/// CPU `cpu` is about to run a vCPU (the vCPU loop, before each entry).
pub fn note_ran(cpu: usize) {
    ANY_RAN_ON.fetch_or(1 << (cpu % ipi::MAX_CPUS), Ordering::AcqRel);
}

/// The CPUs that ran any vCPU so far.
pub fn any_ran_on() -> u64 {
    ANY_RAN_ON.load(Ordering::Acquire)
}

/// What an unmount, an ExMap FREE or a device mount still has to invalidate
/// (`vmcore::flush`): the CPUs to shoot down and the device domains, each named by its PCI
/// function, whose IOTLB to invalidate. Committed once per call (`Flush::commit` with
/// `Hw`), before the world lock is let go (`complete` then gives the kept frames back).
pub type Flush = vmcore::flush::Flush<Bdf>;

/// The flush of guest `g`'s translations: every CPU that ran one of its vCPUs. A guest with
/// no vCPU left needs none (it never enters again; its ASID/VPID and EPTP are flushed before
/// any reuse): the flush is empty, and dropping it is fine.
pub fn of_guest<B: Backend>(g: &Guest<B>) -> Flush {
    if g.ends.live > 0 {
        Flush::cpus(g.ran_on)
    } else {
        Flush::none()
    }
}

/// What commits a `Flush`: the TLB shootdown through `cpus` (IPIs now, acknowledgments at
/// `complete`), the IOTLB through the devices' IOMMU (None: no IOMMU, so each domain named
/// counts as failed).
pub struct Hw<'a>(pub Option<&'a mut Devices>);

impl vmcore::flush::Invalidate<Bdf> for Hw<'_> {
    fn every_guest_cpu(&self) -> u64 {
        any_ran_on()
    }

    fn shoot(&mut self, mask: u64) {
        cpus(mask);
    }

    fn iotlb(&mut self, bdf: Bdf) -> bool {
        self.0.as_deref_mut().is_some_and(|d| d.iommu.invalidate(bdf).is_ok())
    }

    fn iotlb_all(&mut self) -> (u32, u32) {
        let Some(d) = self.0.as_deref_mut() else { return (0, 0) };
        let (mut done, mut failed) = (0, 0);
        for f in d.functions.iter() {
            if d.iommu.has_domain(f.bdf) {
                match d.iommu.invalidate(f.bdf) {
                    Ok(()) => done += 1,
                    Err(_) => failed += 1,
                }
            }
        }
        (done, failed)
    }
}

/// Shoots down on every CPU of `mask` (this one flushes locally): the IPIs go now, the
/// acknowledgments are awaited by `complete` when this CPU lets go of the world lock.
/// `Flush::commit` is the way in (`Hw`).
fn cpus(mask: u64) {
    let me = ipi::me();
    if mask & !(1 << me) == 0 {
        local(me);
        return;
    }
    let t0 = crate::platform::time::tsc();
    // The acknowledgments go straight into this CPU's record (`Owed::request`: one step per
    // CPU named). Where only this CPU is named it flushes locally and owes nothing: no
    // mailbox, no wait at `complete`.
    let mut o = crate::arch::percpu::of(me).owed.lock();
    let sent = o.owed.request(ipi::mailboxes(), &ipi::Here(me), mask);
    if !o.owed.acks().is_empty() {
        OWING.fetch_or(1 << me, Ordering::AcqRel);
    }
    drop(o);
    TSC_SPENT.fetch_add(crate::platform::time::tsc() - t0, Ordering::Relaxed);
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
    IPIS.fetch_add(sent as u64, Ordering::Relaxed);
    let targets = (mask & !(1u64 << me)).count_ones();
    NOT_SENT.fetch_add(targets.saturating_sub(sent) as u64, Ordering::Relaxed);
}

/// A shootdown that names only this CPU `me`: the local flush (the flush generation's bump,
/// done before its next entry), which adds nothing to this CPU's `Owed`
/// (`Mailboxes::request_into`), so its lock is not taken; nothing is sent or awaited.
pub fn local(me: usize) {
    ipi::mailboxes().flush_local(me, &ipi::Here(me));
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
}

/// Frames kept back per CPU until its shootdowns are acknowledged (`After`); more wait at
/// once (`Owed` overflow).
const KEEP: usize = 4096;

/// What this CPU owes before it may give frames back (`vmcore::shootdown::Owed`: the
/// acknowledgments it asked for and the frames kept until they arrive). The frames go back
/// through this CPU's own allocator handle (`PerCpu::frames`, beside it in the same entry).
/// One per CPU, in its `arch::percpu::PerCpu`; only that CPU takes it.
pub struct Owed {
    owed: shootdown::Owed<{ ipi::MAX_CPUS }>,
}

impl Owed {
    pub const fn new() -> Self {
        Owed { owed: shootdown::Owed::new() }
    }
}

/// Bit N: CPU N may owe something (`Owed` not empty): lets `complete` return at once.
static OWING: AtomicU64 = AtomicU64::new(0);

/// Makes room for `KEEP` kept frames on CPU `me` (at the start of its run; without the room
/// every kept frame waits at once).
pub fn prepare(me: usize) {
    crate::arch::percpu::of(me).owed.lock().owed.reserve(KEEP);
}

/// Waits (no lock may be held) for the acknowledgments this CPU asked for, then gives the
/// frames it kept to the allocator. Run at every release of the world lock.
pub fn complete() {
    if OWING.load(Ordering::Acquire) == 0 {
        return; // the common case, without reading the APIC ID
    }
    let me = ipi::me();
    if OWING.load(Ordering::Acquire) & (1 << me) == 0 {
        return;
    }
    let cpu = crate::arch::percpu::of(me);
    let mut o = cpu.owed.lock();
    OWING.fetch_and(!(1 << me), Ordering::AcqRel);
    if o.owed.is_empty() {
        return;
    }
    let t0 = crate::platform::time::tsc();
    let to = cpu.frames();
    o.owed.settle(ipi::mailboxes(), &ipi::Apic, |f| give_back(&to, f));
    WAIT_SPENT.fetch_add(crate::platform::time::tsc() - t0, Ordering::Relaxed);
}

/// Frees a kept frame (`address | order`) through `to` (this CPU's handle).
fn give_back(to: &Frames, f: u64) {
    morsel::FrameAlloc::free(to, morsel::HostPhysAddr::new(f & !0xfff), (f & 0xfff) as u32);
}

/// Waits until every shootdown any CPU started so far is acknowledged. With the world lock
/// held only where the module doc says.
pub fn barrier() {
    let t0 = crate::platform::time::tsc();
    if ipi::barrier() {
        WAIT_SPENT.fetch_add(crate::platform::time::tsc() - t0, Ordering::Relaxed);
    }
}

/// A frame allocator that keeps the frames freed through it on this CPU until its pending
/// shootdowns are acknowledged (`complete`); allocations go straight through.
pub struct After<'a>(pub &'a Frames);

impl morsel::FrameAlloc for After<'_> {
    fn alloc(&self, order: u32) -> Option<morsel::HostPhysAddr> {
        morsel::FrameAlloc::alloc(self.0, order)
    }

    fn free(&self, frame: morsel::HostPhysAddr, order: u32) {
        let me = ipi::me();
        let cpu = crate::arch::percpu::of(me);
        let mut o = cpu.owed.lock();
        // No room: everything kept so far waits now (the world lock held), then goes back
        // through this CPU's handle.
        let to = cpu.frames();
        let kept = o.owed.keep(frame.as_u64() | order as u64, ipi::mailboxes(), &ipi::Apic, any_ran_on(), |f| give_back(&to, f));
        match kept {
            shootdown::Kept::Deferred => {
                OWING.fetch_or(1 << me, Ordering::AcqRel);
            }
            shootdown::Kept::Overflow => {
                OVERFLOWS.fetch_add(1, Ordering::Relaxed);
                log::debug!(target: "morsel", "cpu {me}: more than {KEEP} frames kept for a shootdown: waited under the lock");
            }
        }
    }
}

/// Answers this CPU's shootdown (and drain) requests every 2 MiB of long work done with
/// interrupts off (`did`), and allocates and frees through `wrap` likewise.
pub struct Answering {
    pages: core::cell::Cell<u64>,
}

/// 4 KiB pages of work between two answers (2 MiB).
const ANSWER_EVERY: u64 = 512;

impl Answering {
    pub fn new() -> Self {
        Answering { pages: core::cell::Cell::new(0) }
    }

    /// `pages` 4 KiB pages of work were done since the last call.
    pub fn did(&self, pages: u64) {
        let n = self.pages.get() + pages;
        if n >= ANSWER_EVERY {
            ipi::service();
            self.pages.set(0);
        } else {
            self.pages.set(n);
        }
    }

    /// `frames`, answering every 2 MiB allocated or freed through it.
    pub fn wrap(frames: &Frames) -> AnsweringFrames<'_> {
        AnsweringFrames { frames, answer: Answering::new() }
    }
}

impl Default for Answering {
    fn default() -> Self {
        Self::new()
    }
}

/// `Answering::wrap`.
pub struct AnsweringFrames<'a> {
    frames: &'a Frames,
    answer: Answering,
}

impl morsel::FrameAlloc for AnsweringFrames<'_> {
    fn alloc(&self, order: u32) -> Option<morsel::HostPhysAddr> {
        let frame = morsel::FrameAlloc::alloc(self.frames, order);
        self.answer.did(1 << order.min(18));
        frame
    }

    fn free(&self, frame: morsel::HostPhysAddr, order: u32) {
        morsel::FrameAlloc::free(self.frames, frame, order);
        self.answer.did(1 << order.min(18));
    }
}

/// (shootdowns, IPIs, microseconds spent in them, waiting for acknowledgments included) so far.
pub fn stats() -> (u64, u64, u64) {
    let us = (TSC_SPENT.load(Ordering::Relaxed) + WAIT_SPENT.load(Ordering::Relaxed)) / crate::platform::time::tsc_per_us().max(1);
    (SHOOTDOWNS.load(Ordering::Relaxed), IPIS.load(Ordering::Relaxed), us)
}

/// Prints the counters (with the morsel stats).
pub fn log_stats() {
    let (n, ipis, us) = stats();
    let per = (ipis * 100).checked_div(n).unwrap_or(0);
    log::info!(target: "morsel", "stats shootdowns: {n} ({ipis} IPIs, {}.{:02} IPIs per shootdown, {} us per shootdown, waited with no lock held; {} waited under the lock)",
        per / 100, per % 100, us.checked_div(n).unwrap_or(0), OVERFLOWS.load(Ordering::Relaxed));
    log::info!(target: "morsel", "stats shootdown requests that sent no IPI (the target was in the hypervisor): {}", NOT_SENT.load(Ordering::Relaxed));
}

/// Reports flushes dropped uncommitted (`vmcore::flush::dropped`): a release build goes on
/// past `Flush`'s drop check, so the end of the run says so, in words the scenarios reject.
pub fn report_dropped() {
    let dropped = vmcore::flush::dropped();
    if dropped > 0 {
        log::error!(target: "morsel", "{dropped} flush(es) dropped uncommitted (UNEXPECTED): translations left cached, frames freed without a shootdown");
    }
}
