//! The run every CPU takes part in, and each CPU's own run queue.
//!
//! Placement is static (documented, no work stealing): the boot CPU builds every guest and
//! decides, per vCPU, the CPU it runs on: `:cpu=K` puts all of a guest's vCPUs on CPU K,
//! otherwise the vCPUs of all guests are dealt round-robin over the online CPUs in command
//! line order. Each CPU then creates its own vCPUs with its own backend instance (a VMCS is
//! bound to the CPU that loaded it; the VMCS host state and SVM's ASID bookkeeping are that
//! CPU's) and keeps them in its run queue, a plain vector only it touches; it runs them
//! round-robin, a time slice each, preempted by its own timer (SVM: its LAPIC timer, VMX:
//! the preemption timer).
//!
//! What the vCPUs share (the guests' states, the hypercall `Context`) is the `World`, behind
//! ONE spin lock (the directory and each guest's table and mounts have locks of their own
//! beneath it, taken without it by `sched::mount_fast`): taken at the start of a slice
//! where something that start decides changed since the vCPU's last one (`sched::start_alone`,
//! `vmcore::gate`; and at least every 16th slice, which folds the exit counts), and for every
//! exit that may touch shared state (`vmcore::exits` says which), never while a guest runs,
//! never for CPUID, HLT, interrupt, interrupt-window or preemption exits inside a slice
//! (`vm::sched`). No CPU waits for another while holding it: a shootdown
//! started under it is awaited when it is let go (`WorldGuard`, `vm::shootdown` has the
//! protocol and the lock order); a CPU spinning for it keeps acknowledging shootdown
//! requests (`lock`).
//!
//! Five calls do their expensive part with the lock let go (each a
//! `vmcore::hypercall::Deferred` work, implemented where the call makes it and reached through
//! `hypercall::Unlocked`: run by the vCPU loop on the calling CPU's allocator core, then
//! finished under the lock again, or abandoned there where the guest is gone):
//! `bench_frames` (allocator only), `morsel_create` of a RAM morsel (its frames are
//! allocated, its tables built and its data zeroed outside, answering shootdowns every 2 MiB;
//! the name is reserved under the lock), `morsel_destroy` of one (it leaves the
//! directory under the lock, its frames are freed outside, behind `shootdown::barrier`), and the NVMe proxy's and ExMap READ / WRITE's batches (mounted into the
//! NVMe domain and pinned under the lock, `morsels::DiskBatch`; the commands and the wait for
//! their completions run outside, on the CPU's own queue pair). What runs outside touches
//! only the lock-free allocator, frames no one else can reach or that are pinned, and the
//! NVMe driver, whose shared state is locked per queue pair or atomic (`devices::nvme`).
//! A frame an unmount or FREE freed reaches the allocator only after that shootdown was
//! acknowledged (`vm::shootdown::After`), a destroyed morsel's only behind
//! `vm::shootdown::barrier`: so the allocator holds no frame a CPU may still cache, and a
//! frame may be taken from it with or without the lock (`morsels::PendingCreate`).

use super::guest::{Guest, Summary};
use super::hypercall::Context;
use super::{Backend, VcpuSetup};
use crate::arch::ipi;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

/// What all CPUs share during the run (behind `Run::world`).
pub struct World<B: Backend> {
    /// By guest id; None once it ended (or if it could not be created).
    pub guests: Vec<Option<Guest<B>>>,
    pub cx: Context<B>,
    /// Guests that ended, for the final report.
    pub done: Vec<Summary>,
}

/// One vCPU to create: on CPU `cpu`, for guest `guest`, with `setup` (its index in rsi).
pub struct Placement {
    pub cpu: usize,
    pub guest: u32,
    pub setup: VcpuSetup,
    /// The guest's lock-free part (`guest::Shared`), handed to the vCPU's slot.
    pub shared: alloc::sync::Arc<super::guest::Shared>,
}

/// One run of the command line's guests.
pub struct Run<B: Backend> {
    pub world: spin::Mutex<World<B>>,
    pub placements: Vec<Placement>,
    /// CPUs taking part (indices 0..cpus).
    pub cpus: usize,
    /// Guests created (`info(INFO_GUEST_COUNT)`), fixed before any CPU runs one.
    pub guest_count: u64,
    /// CPUs whose run queue is empty for good (and whose allocator core is drained).
    pub finished: AtomicUsize,
    /// The morsel directory (also `Context::morsels`), for the calls that take it without
    /// the world lock (`sched::mount_fast`).
    pub directory: &'static spin::Mutex<crate::morsels::Directory<B::Format>>,
    /// The keys of the directory's name hash (fixed at its creation): names are hashed with
    /// them before the world lock (`sched::world`).
    pub name_keys: vmcore::names::Keys,
}

// SAFETY: the vCPU setups are plain data; everything mutable is behind the world lock
// or atomic. `B::Format` tables are only edited under the lock.
unsafe impl<B: Backend> Sync for Run<B> {}
// SAFETY: as above.
unsafe impl<B: Backend> Send for Run<B> {}

/// Takes the world lock, acknowledging shootdowns while it waits.
pub fn lock<B: Backend>(run: &Run<B>) -> WorldGuard<'_, B> {
    let mut spins = 0u32;
    loop {
        if let Some(w) = run.world.try_lock() {
            return WorldGuard(Some(w));
        }
        // Every few spins only: `service` reads the APIC ID, which costs more than a spin.
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(16) {
            ipi::service();
        }
        core::hint::spin_loop();
    }
}

/// The world lock, held. Letting it go (drop) waits, with no lock held, for the shootdowns
/// this CPU started under it and then frees the frames they kept (`shootdown::complete`).
pub struct WorldGuard<'a, B: Backend>(Option<spin::MutexGuard<'a, World<B>>>);

impl<B: Backend> core::ops::Deref for WorldGuard<'_, B> {
    type Target = World<B>;
    fn deref(&self) -> &World<B> {
        // The guard is Some until drop.
        self.0.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl<B: Backend> core::ops::DerefMut for WorldGuard<'_, B> {
    fn deref_mut(&mut self) -> &mut World<B> {
        self.0.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl<B: Backend> Drop for WorldGuard<'_, B> {
    fn drop(&mut self) {
        drop(self.0.take());
        super::shootdown::complete();
    }
}

/// The published run (address) and the backend name it was made for.
static PUBLISHED: AtomicUsize = AtomicUsize::new(0);
static PUBLISHED_FOR: spin::Once<&'static str> = spin::Once::new();

/// Wakes the other CPUs (the start IPI), then makes `run` visible to them. In that order:
/// `ipi::send` returns once the target's APIC holds the IPI, so a CPU that finds the run
/// takes its start IPI with interrupts on before its first guest entry (`serve`). The other
/// way round, a CPU awake already (its timer tick) could find the run and enter its first
/// guest before the IPI came: that guest would take it as an `interrupt` exit, one no
/// guest's work caused (seen under load: `exmap_shared_free_spares_other_cpus`).
pub fn publish<B: Backend>(run: &'static Run<B>) {
    PUBLISHED_FOR.call_once(|| B::NAME);
    for cpu in 1..run.cpus {
        ipi::send(cpu);
    }
    PUBLISHED.store(run as *const Run<B> as usize, Ordering::Release);
}

/// The run the boot CPU published, if it was made for this CPU's backend `B`.
pub fn published<B: Backend>() -> Option<&'static Run<B>> {
    let at = PUBLISHED.load(Ordering::Acquire);
    if at == 0 || PUBLISHED_FOR.get().copied() != Some(B::NAME) {
        return None;
    }
    // SAFETY: `publish` stored the address of a leaked `Run<B>` for a backend of the same
    // name, which is the same type (one type per name), and it is never freed.
    Some(unsafe { &*(at as *const Run<B>) })
}

/// Waits, acknowledging shootdowns, until every CPU finished its run queue.
pub fn wait_all_finished<B: Backend>(run: &Run<B>) {
    while run.finished.load(Ordering::Acquire) < run.cpus {
        ipi::service();
        core::hint::spin_loop();
    }
}

/// An AP with nothing to do: halt until an interrupt (interrupts off again after it).
pub fn idle_once() {
    // Clears the busy mark before it answers: a request from now on sends the IPI that
    // ends the HLT.
    ipi::ready();
    // SAFETY: STI takes effect after HLT starts (one-instruction shadow), so no interrupt is
    // lost between them; every vector has a handler; CLI restores the host's IF = 0.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// What an AP does once its backend is enabled: wait for the run, take part, then idle.
/// Its start IPI (`publish`) is in, or already taken, when it finds the run: taken here with
/// interrupts on (`take_pending`), not as an exit of its first guest. Between that IPI and
/// the run becoming visible it spins (`ipi::send` set its `attention` first): a HLT there
/// could wait long, its IPI taken already (VMX with a preemption timer has no periodic tick).
pub fn serve<B: Backend>(cpu: usize, mut backend: B) -> ! {
    let mut served = false;
    loop {
        if !served {
            if let Some(run) = published::<B>() {
                take_pending();
                if cpu < run.cpus {
                    super::sched::cpu_loop(run, &mut backend, cpu);
                }
                served = true;
            } else if ipi::attention_pending(cpu) {
                ipi::service();
                core::hint::spin_loop();
                continue;
            }
        }
        idle_once();
    }
}

/// Takes the interrupts pending at this CPU's APIC now (interrupts on for one instruction).
fn take_pending() {
    // SAFETY: every vector has a handler; an interrupt pending with IF = 1 is taken at the
    // end of the instruction after STI (its one-instruction shadow), before CLI restores the
    // host's IF = 0.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}
