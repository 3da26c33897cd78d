//! The vCPU loop, written once for both backends and run by every CPU over its own run
//! queue (`runqueue`: static placement, the world lock): each vCPU runs for a time slice or
//! until it yields; a misbehaving vCPU stops its whole guest (the guest's other vCPUs are
//! kicked by IPI and end at their next exit; reported once) while the other guests go on; a
//! guest ends when its last vCPU ends; at the end every guest's exit code and exit counts
//! are printed, per vCPU for guests with several.
//!
//! # Locks, in the order they are taken
//! 1. The world lock (`runqueue::WorldGuard`): guests, the hypercall context (quotas,
//!    devices, notify, ExMap counters and idle per-vCPU ExMap states). Never held while a
//!    guest runs; null exits take none (`lockless`), nor does a slice's start where nothing
//!    that start decides changed since the vCPU's last start under it (`start_alone`: the
//!    guest's epoch, `guest::Shared::epoch`, bumped under this lock before the kick IPIs by
//!    every such change; the rule and its model are `vmcore::gate`).
//! 1a. The directory's lock (`Context::morsels`, also `Run::directory`): names, entries,
//!    device mounts. Under the world lock, or alone by `mount_fast` (one step at a time).
//! 1b. A guest's address space lock (`Guest::space`, `GuestSpace`): its second-level table
//!    and mounts, and reads of guest memory through them. Under the world lock (and the
//!    directory's where both are held), or alone by `mount_fast`.
//! 2. An ExMap region's lock (`vmcore::region::RegionCell::lock`): taken under the world
//!    lock, held without it through an ALLOC / FREE batch (`vmcore::region::Batch`), given
//!    back with it (`Exmaps::finish_batch`) or without it (`Batch::finish_alone`, after
//!    which the guest resumes with no world lock taken). Shared by ALLOC / FREE batches
//!    (branch `sharedcas`: a count of batches; each leaf changed by compare-and-swap);
//!    excludes them for destroy, device mounts, NVMe batches, READ / WRITE and new guest
//!    mounts. Never waited for: a READ / WRITE or a mount that finds it held is issued
//!    again by the guest (`Action::Retry`); the first one refused gets it next (a hand-over
//!    that lapses after two slices: `RegionLock::admit_in_turn`; no new batch starts
//!    meanwhile), so back-to-back batches cannot starve it. Also taken with no lock held,
//!    by CAS, for the region of a vCPU's last ALLOC / FREE (`exmap_fast`): one atomic word
//!    holds the batch count and the region's generation, which every change the fast path
//!    must not miss bumps under the world lock (`vmcore::region_lock`).
//! 3. An NVMe queue pair's lock (`devices::nvme`), the calling CPU's own.
//! 4. A vCPU's console line buffer (`guest::Shared::consoles`): `console_write` with or
//!    without the world lock, a guest's end or report under it; its holder prints one line.
//! 5. This CPU's `Owed` (`shootdown`): its unacknowledged shootdowns and the frames they
//!    hold back, awaited when the world lock is let go.
//! 6. The serial lock (`println!`), a leaf.

use super::guest::{Guest, GuestSpec, State, Summary, VcpuSummary};
use super::hypercall::{self, Action, Caller, Context, Hv};
use crate::morsels::Directory;
use super::runqueue::{self, Placement, Run, World};
use super::report::{report, stopped};
use super::{Backend, Exit, ExitKind, Regs};
use vmcore::vcpu::{self, Signals, Step};
use crate::arch::{ipi, percpu};
use morsel::GuestPhysAddr;
use crate::mm::frames::Frames;
use crate::morsels::exmap::{Batch, FastCall};
use vmcore::hypercall::Deferred;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use formats::archive::Archive;

/// Length of a time slice.
pub const SLICE_US: u64 = 10_000;

/// Runs the guests `specs` from `archive` to completion on the `cpus` online CPUs (this is
/// the boot CPU, index 0); true if every guest ended as expected.
pub fn run_guests<B: Backend>(backend: &mut B, archive: Archive, specs: &[GuestSpec], drivers: super::Drivers, cpus: usize) -> bool {
    let frames = &Frames::here();
    let cpus = cpus.clamp(1, ipi::MAX_CPUS);
    let free_before = frames.free_frames();
    // Room for every guest's whole morsel quota, before any guest exists. The name hash is
    // keyed by the time stamp counter at boot, which no guest sees.
    let now = crate::platform::time::tsc();
    let seed = [now, now.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15];
    let morsels: &'static spin::Mutex<Directory<B::Format>> = match Directory::new(drivers.pmem, specs.len() as u32, seed) {
        Ok(d) => Box::leak(Box::new(spin::Mutex::new(d))),
        Err(_) => {
            log::error!(target: "vm", "the morsel directory for {} guests does not fit the heap: no guest runs", specs.len());
            return false;
        }
    };
    // Every guest's slice-start epoch (`vmcore::gate`), by id: read by its vCPUs' slots with
    // no lock, bumped under the world lock (by its `Guest` and by `notify` for the guests a
    // ring reaches).
    let epochs: &'static [vmcore::gate::Epoch] = Box::leak(specs.iter().map(|_| vmcore::gate::Epoch::new()).collect());
    let mut guests: Vec<Option<Guest<B>>> = Vec::new();
    let mut placements = Vec::new();
    let mut all_created = true;
    let mut next_cpu = 0;
    for (id, spec) in specs.iter().enumerate() {
        guests.push(None);
        let Some(image) = archive.get(spec.name) else {
            log::error!(target: "vm", "guest {id} ({}): no such guest in the boot archive", spec.name);
            all_created = false;
            continue;
        };
        if let Some(k) = spec.cpu.filter(|&k| k >= cpus) {
            log::error!(target: "vm", "guest {id} ({}): cpu={k}, but only CPUs 0-{} are online", spec.name, cpus - 1);
            all_created = false;
            continue;
        }
        match Guest::create(id as u32, *spec, image, &epochs[id]) {
            Ok((g, setups)) => {
                let mut on = Vec::new();
                for setup in setups {
                    let cpu = spec.cpu.unwrap_or_else(|| {
                        next_cpu += 1;
                        (next_cpu - 1) % cpus
                    });
                    on.push(cpu);
                    placements.push(Placement { cpu, guest: id as u32, setup, shared: g.shared.clone() });
                }
                super::shootdown::set_placed(id as u32, on.iter().fold(0, |m, &c| m | 1 << (c % ipi::MAX_CPUS)));
                match spec.vcpus {
                    1 => log::info!(target: "vm", "guest {id} ({}): {} MiB, image {} KiB, started on cpu {}",
                        spec.name, spec.memory >> 20, image.len() / 1024, on[0]),
                    n => log::info!(target: "vm", "guest {id} ({}): {} MiB, image {} KiB, {n} vCPUs on cpus {on:?}, started",
                        spec.name, spec.memory >> 20, image.len() / 1024),
                }
                guests[id] = Some(g);
            }
            Err(e) => {
                log::error!(target: "vm", "guest {id} ({}): cannot create: {e}", spec.name);
                all_created = false;
            }
        }
    }
    let created = guests.iter().filter(|g| g.is_some()).count();
    let cx = Context {
        guest_count: created as u64,
        morsels,
        exmaps: Default::default(),
        notify: super::notify::Notify::new(epochs),
        devices: drivers.devices,
        bench: drivers.bench,
    };
    cx.morsels.lock().load_persistent();
    let run: &'static Run<B> = Box::leak(Box::new(Run {
        world: spin::Mutex::new(World { guests, cx, done: Vec::new() }),
        placements,
        cpus,
        guest_count: created as u64,
        finished: core::sync::atomic::AtomicUsize::new(0),
        directory: morsels,
        name_keys: vmcore::names::Keys::of(seed),
    }));
    runqueue::publish(run);
    cpu_loop(run, backend, 0);
    runqueue::wait_all_finished(run);
    let mut w = runqueue::lock(run);
    let World { cx, done, .. } = &mut *w;
    cx.notify.log_stats();
    log::info!(target: "vm", "stats slices begun without the world lock: {} of {}",
        SLICES_ALONE.load(Ordering::Relaxed), SLICES_BEGUN.load(Ordering::Relaxed));
    cx.morsels.lock().log_stats();
    crate::morsels::exmap::Exmaps::log_stats(&cx.morsels.lock());
    super::shootdown::log_stats();
    cx.morsels.lock().destroy_all(cx.devices.as_mut());
    super::shootdown::report_dropped();
    frames.drain();
    let reclaims = crate::mm::frames::RECLAIMS.load(Ordering::Relaxed);
    if reclaims > 0 {
        log::info!(target: "alloc", "out-of-memory allocations that drained the other CPUs first: {reclaims}");
    }
    done.sort_by_key(|s| s.id);
    // Every CPU drained its allocator core when its queue emptied: the count is exact.
    report::<B>(done, frames.free_frames() as i64 - free_before as i64) && all_created
}

/// Slices begun (the guest entered) and those among them begun without the world lock
/// (`start_alone`), of every vCPU that ended: added once per vCPU, at its end.
static SLICES_BEGUN: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static SLICES_ALONE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// One vCPU in a CPU's run queue.
struct Slot<B: Backend> {
    guest: u32,
    index: u32,
    vcpu: B::Vcpu,
    /// The CPU's flush generation this vCPU last flushed at (`arch::ipi`).
    seen_flush: u64,
    /// Its exit counts (those not yet folded into the guest's too) and its decoded-length
    /// cache.
    core: vcpu::Core,
    /// This vCPU's one-shot timer deadline as of the last `prepare` (TSC; MAX: none): the
    /// lock-free path goes to the world when it passed.
    timer_at: u64,
    /// The guest's exception bitmap (`guest_exceptions`) as this vCPU's intercepts have it.
    exceptions: u32,
    /// What its last slice start under the world lock saw (`vmcore::gate`): whether the
    /// next may start without it (`start_alone`).
    gate: vmcore::gate::Gate,
    /// Slices begun, and begun without the world lock (`SLICES_BEGUN`, `SLICES_ALONE`).
    begun: u64,
    alone: u64,
    /// Set when the vCPU is done.
    end: Option<State>,
    /// What the lock-free path reads of the guest (`guest::Shared`).
    shared: alloc::sync::Arc<super::guest::Shared>,
    /// This vCPU's ExMap state after a batch ended without the world lock
    /// (`Batch::finish_alone`): back into `Exmaps` at the vCPU's next world-path exit or its
    /// end (`unpark`), not at a slice's start under the world lock.
    exmap: Option<crate::morsels::exmap::Parked>,
    /// The region of this vCPU's last ExMap ALLOC / FREE ended alone: its next call on it
    /// takes no world lock while nothing changed (`exmap_fast`).
    fast: Option<crate::morsels::exmap::Fast<B::Format>>,
    /// The guest's address space (`Guest::space`), for `mount_fast`; None only where the
    /// guest was gone when the vCPU was made.
    space: Option<alloc::sync::Arc<spin::Mutex<super::guest::GuestSpace<B::Format>>>>,
}

/// Creates this CPU's vCPUs, runs them round-robin until every one ended, and drains this
/// CPU's allocator core.
pub fn cpu_loop<B: Backend>(run: &Run<B>, backend: &mut B, me: usize) {
    let frames = &percpu::of(me).frames();
    let mut queue: Vec<Slot<B>> = Vec::new();
    super::shootdown::prepare(me);
    for p in run.placements.iter().filter(|p| p.cpu == me) {
        match backend.create_vcpu(&p.setup) {
            Ok(vcpu) => queue.push(Slot {
                // Taken from the guest once (the world lock); let go before the vCPU's end
                // is recorded (`Guest::destroy` takes the space back).
                space: runqueue::lock(run).guests.get(p.guest as usize).and_then(|g| g.as_ref()).map(|g| g.space.clone()),
                guest: p.guest,
                index: p.setup.rsi as u32,
                vcpu,
                seen_flush: u64::MAX,
                core: vcpu::Core::new(),
                timer_at: u64::MAX,
                exceptions: 0,
                gate: vmcore::gate::Gate::new(),
                begun: 0,
                alone: 0,
                end: None,
                shared: p.shared.clone(),
                exmap: None,
                fast: None,
            }),
            Err(e) => {
                let mut w = runqueue::lock(run);
                let World { guests, cx, done } = &mut *w;
                if let Some(g) = guests.get_mut(p.guest as usize).and_then(|g| g.as_mut()) {
                    log::error!(target: "vm", "guest {} ({}) stopped: vcpu {} cannot be created on cpu {me}: {e}", g.id, g.spec.name, p.setup.rsi);
                    g.stop();
                }
                let v = VcpuSummary { index: p.setup.rsi as u32, cpu: me, state: State::Stopped, exits: [0; ExitKind::COUNT] };
                vcpu_done(guests, cx, done, p.guest, v);
            }
        }
    }
    while !queue.is_empty() {
        let mut i = 0;
        let mut ran = false;
        while i < queue.len() {
            ran |= run_slice(backend, &mut queue[i], run, me);
            if queue[i].end.is_some() {
                let mut s = queue.swap_remove(i);
                // The guest's last vCPU frees its space at `vcpu_done`: no clone may outlive it.
                s.space = None;
                let state = s.end.unwrap_or(State::Stopped);
                backend.destroy_vcpu(s.vcpu);
                SLICES_BEGUN.fetch_add(s.begun, Ordering::Relaxed);
                SLICES_ALONE.fetch_add(s.alone, Ordering::Relaxed);
                let v = VcpuSummary { index: s.index, cpu: me, state, exits: s.core.exits };
                let mut w = runqueue::lock(run);
                put_back(&mut w, s.guest, s.exmap, me);
                let World { guests, cx, done } = &mut *w;
                if let Some(g) = guests.get_mut(s.guest as usize).and_then(|g| g.as_mut()) {
                    s.core.fold(&mut g.exits);
                }
                vcpu_done(guests, cx, done, s.guest, v);
            } else {
                i += 1;
            }
        }
        // notify hook: every vCPU of this CPU waits: halt (the world lock let go) until the
        // earliest deadline, a wake-up IPI or a slice, or report a deadlock (vm/notify.rs).
        if !ran && !queue.is_empty() {
            let slice_end = crate::platform::time::tsc() + SLICE_US * crate::platform::time::tsc_per_us().max(1);
            let until = {
                let mut w = runqueue::lock(run);
                let World { guests, cx, .. } = &mut *w;
                cx.notify.idle_until(guests, me, slice_end)
            };
            if let Some(t) = until {
                // Until the deadline or the next interrupt (the slice timer, a shootdown IPI,
                // the wake-up IPI of a doorbell rung on another CPU for a vCPU here).
                crate::arch::apic::halt_once(t);
            }
        }
    }
    frames.drain();
    run.finished.fetch_add(1, Ordering::AcqRel);
}

/// A vCPU ended (its control structures are gone); the last one of its guest takes the
/// guest down: mounts, ExMap caches, memory.
fn vcpu_done<B: Backend>(guests: &mut [Option<Guest<B>>], cx: &mut Context<B>, done: &mut Vec<Summary>, id: u32, v: VcpuSummary) {
    let Some(slot) = guests.get_mut(id as usize) else { return };
    let Some(g) = slot.as_mut() else { return };
    cx.notify.vcpu_ended(id, v.index);
    if !g.vcpu_ended(v) {
        return;
    }
    cx.morsels.lock().drop_mounts(g, cx.devices.as_mut());
    cx.exmaps.guest_ended(g.id);
    cx.notify.guest_ended(g.id);
    if let Some(g) = slot.take() {
        done.push(g.destroy());
    }
}

/// Runs vCPU `s` until its slice ends, it yields, exits or its guest is stopped. The slice
/// is a budget of time across exits: every exit the hypervisor handles in place (hypercall,
/// CPUID) is charged to it, so a guest that loops on them is preempted like one that spins.
/// False if the vCPU waits (`notify`) and did not run. `me` is this CPU's index: a call's
/// `Unlocked` part runs through its allocator handle (`percpu::of(me).frames()`), the world
/// lock let go.
///
/// `prepare` (world lock held: the guest's state, wake-ups, injections), or nothing where
/// nothing it would decide changed since the last one (`start_alone`: no lock), then until
/// an exit needs `prepare` again: `enter` (no lock: flush if asked, run the guest),
/// `classify` (no lock: the exits that touch nothing shared, `vcpu::lockless`, and an ExMap
/// call on the region of the last one) and, for the rest, `world` (world lock held:
/// `vcpu::handle`).
fn run_slice<B: Backend>(backend: &mut B, s: &mut Slot<B>, run: &Run<B>, me: usize) -> bool {
    let per_us = crate::platform::time::tsc_per_us().max(1);
    let deadline = crate::platform::time::tsc() + SLICE_US * per_us;
    let mut w = match start_alone(s, me) {
        true => {
            s.alone += 1;
            None
        }
        false => Some(runqueue::lock(run)),
    };
    let mut first = true;
    loop {
        // An ExMap state parked in the slot stays there: `prepare` does not look for it, so
        // the vCPU's next ALLOC / FREE on the same region still takes no world lock
        // (`exmap_fast`); the world path puts it back first (`world`), and so does the
        // vCPU's end.
        if let Some(mut held) = w {
            if let Some(ran) = prepare(&mut held, s, me, first, deadline) {
                return ran;
            }
            drop(held);
        }
        s.begun += first as u64;
        first = false;
        // Exits and calls until one needs `prepare` again: an ExMap batch that ended alone
        // (`finish_alone`) resumes the guest here like a lock-free exit.
        w = Some(loop {
            let exit = enter(backend, s, me, deadline, per_us);
            s.core.count(&exit);
            let next = match classify(run, s, &exit, me, deadline) {
                // Straight back to `enter`: the null exits' path (Bochs counts each move).
                Some(Next::Enter) => continue,
                Some(next) => next,
                None => world(run, s, exit, me, deadline),
            };
            match next {
                Next::Enter => continue,
                Next::Prepare(w) => break w,
                Next::End => return true,
            }
        });
    }
}

/// Whether this slice starts with no world lock (`vmcore::gate::Gate::may_start`): its last
/// start under the lock left nothing to do and nothing it decides from changed since (the
/// guest's epoch), no IPI asked this CPU to look, the vCPU's timer is not due, the guest has
/// no slice budget and its exit counts were folded into the guest's not long ago. What
/// `prepare` would do then is already done: the vCPU is not waiting, `ran_on` has this CPU,
/// its exception bitmap and interrupt state are current; its exit counts stay in the slot
/// (the next `fold`), an ExMap state stays parked in it (`unpark` at its next world-path exit).
#[inline]
fn start_alone<B: Backend>(s: &Slot<B>, me: usize) -> bool {
    let facts = vmcore::gate::Facts {
        attention: ipi::attention_pending(me),
        timer_due: crate::platform::time::tsc() >= s.timer_at,
        budgeted: s.shared.budgeted,
        unfolded_slices: s.core.unfolded[ExitKind::Preempted as usize],
    };
    s.gate.may_start(s.shared.epoch, facts)
}

/// Where `run_slice` goes after an exit.
enum Next<'r, B: Backend> {
    /// Enter the guest again, no lock taken.
    Enter,
    /// `prepare` under the world lock (held) before the next entry.
    Prepare(runqueue::WorldGuard<'r, B>),
    /// The slice ends (the vCPU may have ended: `Slot::end`).
    End,
}

/// An exit with no lock taken: the exits that touch nothing shared (`lockless`), then an
/// ExMap ALLOC / FREE on the region of this vCPU's last one (`exmap_fast`); None: the world
/// handles it (`world`).
// Always inlined: as a call of its own the ExMap fast path cost 37 more Bochs ticks per
// ALLOC / FREE (`cargo xtask bench exmap-smp --cpus 1`, batch 1: 1,959 ticks per page, 1,899
// inlined; 1,885 before the exit arms moved to `vmcore::vcpu`).
#[inline(always)]
fn classify<'r, B: Backend>(run: &'r Run<B>, s: &mut Slot<B>, exit: &Exit, me: usize, deadline: u64) -> Option<Next<'r, B>> {
    match lockless(s, exit, me, deadline, run.guest_count) {
        Step::Resume => return Some(Next::Enter),
        Step::EndSlice => return Some(Next::End),
        Step::World { quiet: false } => return None,
        Step::World { quiet: true } => {}
    }
    match exmap_fast(s, exit, me, deadline) {
        FastStep::NotTaken => mount_fast_next(run, s, exit, me, deadline),
        FastStep::Resume => Some(Next::Enter),
        FastStep::Prepare => Some(Next::Prepare(runqueue::lock(run))),
        FastStep::Finish(batch) => {
            // The batch ran but cannot end alone (it failed, or a stop reached this CPU):
            // it ends under the world lock as on the world path.
            Some(Next::Prepare(finish_locked(run, s, Caller { vcpu: s.index, cpu: me }, batch)))
        }
    }
}

/// An exit the world handles (`handle`, the world lock taken), then the lock-free part of
/// a call if it has one (`unlocked`).
fn world<'r, B: Backend>(run: &'r Run<B>, s: &mut Slot<B>, exit: Exit, me: usize, deadline: u64) -> Next<'r, B> {
    let ahead = name_ahead(s, &exit, run.name_keys);
    let mut w = runqueue::lock(run);
    unpark(&mut w, s, me);
    let caller = Caller { vcpu: s.index, cpu: me };
    // Filled in place: the `Unlocked` part of a call is large, and every move of it is a
    // copy (which Bochs counts byte by byte).
    let mut unlocked = None;
    let (go_on, stopped) = {
        let World { guests, cx, .. } = &mut *w;
        let Some(guest) = guests.get_mut(s.guest as usize).and_then(|g| g.as_mut()) else {
            s.end = Some(State::Stopped);
            return Next::End;
        };
        fold(guest, s, me);
        if guest.state != State::Runnable {
            s.end = Some(State::Stopped);
            return Next::End;
        }
        guest.name_ahead = ahead;
        let go_on = handle(guest, cx, s, exit, caller, me, &mut unlocked);
        guest.name_ahead = None;
        let stopped = guest.state != State::Runnable;
        if stopped {
            kick_if_stopped(guest, me);
        }
        (go_on, stopped)
    };
    if let Some(work) = unlocked {
        drop(w);
        w = match self::unlocked(run, s, work, caller, stopped, me, deadline) {
            Ok(w) => w,
            Err(next) => return next,
        };
    }
    if stopped {
        if s.end.is_none() {
            s.end = Some(State::Stopped);
        }
        return Next::End;
    }
    if !go_on || s.end.is_some() {
        return Next::End;
    }
    Next::Prepare(w)
}

/// The name a hypercall from guest kernel mode will look up or reserve under the world lock
/// (`vmcore::hypercall::name_to_read`: open, the creates, destroy, `device_mount`,
/// `name_watch`), read from the guest's fixed RAM
/// frames (`guest::Shared::ram_pieces`, as `console_local` does) and hashed with `keys`,
/// before the lock: the handler takes it (`morsels::read_hashed`). None (the handler reads the
/// name under the lock, with its checks and errors) for other exits and calls, and for a name
/// that is not wholly in guest RAM or not valid.
fn name_ahead<B: Backend>(s: &mut Slot<B>, exit: &Exit, keys: vmcore::names::Keys) -> Option<vmcore::hypercall::NameAhead> {
    let Exit::Hypercall { cpl: 0, .. } = exit else { return None };
    let at = vmcore::hypercall::name_to_read(B::regs(&mut s.vcpu))?;
    let name = crate::morsels::read_ram_name(&s.shared, at)?;
    Some(vmcore::hypercall::NameAhead { at, name: keys.hash(name) })
}

/// The lock-free part of a call (bench_frames, a new morsel's build and zeroing, a destroyed one's
/// frees, an NVMe batch on its pinned morsel, an ExMap batch) without the world lock: other
/// CPUs' exits go on meanwhile; the time counts against this slice (the deadline check in
/// `prepare`), and a guest stopped meanwhile ends there. It always runs and finishes
/// (nothing it holds is lost): under the world lock again (Ok), or, an ExMap ALLOC / FREE
/// that succeeded with no stop having reached this CPU (`stopped`, `attention`), ended here
/// with no world lock (Err: where `run_slice` goes on).
#[allow(clippy::too_many_arguments)]
fn unlocked<'r, B: Backend>(run: &'r Run<B>, s: &mut Slot<B>, work: hypercall::Unlocked<B::Format>, caller: Caller, stopped: bool,
    me: usize, deadline: u64) -> Result<runqueue::WorldGuard<'r, B>, Next<'r, B>> {
    let frames = &percpu::of(me).frames();
    match work {
        // The one work that may end with no world lock, run here on its own. Run through
        // `Unlocked`'s dispatch (`&mut` the whole enum) it cost 8 more Bochs ticks per page
        // at batch 512 (`cargo xtask bench exmap-smp --cpus 1 --configs a`: 193; here 187;
        // 185 before the trait), whose calls come this way (`exmap_fast`'s copy of the
        // batch did not change; a 512-entry call seems to outlast Bochs' slice, so the next
        // one comes through the world lock).
        hypercall::Unlocked::Batch(mut x) => {
            Deferred::<Hv<B>>::run(&mut x, frames);
            if stopped || s.end.is_some() || ipi::attention_pending(me) {
                return Ok(finish_locked(run, s, caller, x));
            }
            match end_alone(s, x, me, deadline) {
                Ok(true) => Err(Next::Enter),
                Ok(false) => Err(Next::Prepare(runqueue::lock(run))),
                Err(x) => Ok(finish_locked(run, s, caller, x)),
            }
        }
        mut done => {
            Deferred::<Hv<B>>::run(&mut done, frames);
            Ok(finish_locked(run, s, caller, done))
        }
    }
}

/// What `exmap_fast` did.
enum FastStep<F: morsel::Format> {
    /// Not an ExMap ALLOC / FREE it can take: the world path handles the exit.
    NotTaken,
    /// Done and answered, the shootdown settled: the guest resumes, no lock taken.
    Resume,
    /// Done and answered; the world lock is taken for `prepare` (an IPI asked this CPU to
    /// look, the timer is due or the slice is over).
    Prepare,
    /// The batch ran but ends under the world lock (`hypercall::finish`): it failed, or a
    /// stop reached this CPU meanwhile.
    Finish(Batch<F>),
}

/// An ExMap ALLOC / FREE with no world lock (issue 22 item 2, issue 21): where the call
/// names the region and iovec page of this vCPU's last ALLOC / FREE (`s.fast`, a handle
/// made by a batch that ended alone), the vCPU's ExMap state is still in its slot
/// (`s.exmap`: no world-path exit since), `lockless` found the exit quiet (no IPI asked
/// this CPU to look: that flag is taken there, so a stop is never missed here; timer not
/// due, slice not over) and the handle still takes the region's lock (`Fast::call`: nothing
/// changed since; other vCPUs' batches may share it). Then the batch runs and ends alone as
/// on the world path (the bodies of `Batch::run` and `Batch::finish_alone`, then
/// `shootdown::complete`), in place: on the slot's state, nothing built or moved per call
/// (Bochs counts every byte a move copies). Anything unusual is `NotTaken` with nothing
/// changed, so the world path gives the answers it gave before.
fn exmap_fast<B: Backend>(s: &mut Slot<B>, exit: &Exit, me: usize, deadline: u64) -> FastStep<B::Format> {
    crate::probe::mark(0);
    let Exit::Hypercall { resume, cpl: 0 } = *exit else { return FastStep::NotTaken };
    if s.fast.is_none() || s.exmap.is_none() {
        return FastStep::NotTaken;
    }
    let regs = B::regs(&mut s.vcpu);
    if regs.rax != abi::HC_EXMAP_ACTION {
        return FastStep::NotTaken;
    }
    let Some(next_rip) = s.core.known_next(regs.rip, &resume, vcpu::Opcode::Hypercall) else { return FastStep::NotTaken };
    let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
    let (gpa, iov, count, op) = match abi::Call::decode(regs.rax, args) {
        Ok(abi::Call::ExmapAction { region, iov, count, op: abi::ExmapOp::Alloc }) => (region, iov, count, abi::EXMAP_ALLOC),
        Ok(abi::Call::ExmapAction { region, iov, count, op: abi::ExmapOp::Free }) => (region, iov, count, abi::EXMAP_FREE),
        _ => return FastStep::NotTaken,
    };
    let Some(fast) = s.fast.as_ref() else { return FastStep::NotTaken };
    crate::probe::mark(1);
    crate::probe::fast_call(op, count);
    let shared = &s.shared;
    let failed = match fast.call(&mut s.exmap, gpa, iov, op, count, &mut crate::morsels::exmap::Here(percpu::of(me).frames()), || ipi::attention_pending(me), me, || shared.ran_on()) {
        FastCall::NotTaken => return FastStep::NotTaken,
        FastCall::Ended(failed) => failed,
        FastCall::Locked(batch) => {
            B::regs(&mut s.vcpu).rip = next_rip;
            return FastStep::Finish(batch);
        }
    };
    crate::probe::mark(4);
    let regs = B::regs(&mut s.vcpu);
    regs.rip = next_rip;
    let go_on = resume_alone(s, failed, me, deadline);
    crate::probe::mark(5);
    if go_on { FastStep::Resume } else { FastStep::Prepare }
}

/// `mount_fast`, then where `classify` goes: out of line and cold, so that the null exits'
/// path through `classify` does not pay for it (inline there, it cost 14 Bochs ticks per
/// CPUID exit, `cargo xtask bench exits`: 325 vs 311).
#[cold]
#[inline(never)]
fn mount_fast_next<'r, B: Backend>(run: &'r Run<B>, s: &mut Slot<B>, exit: &Exit, me: usize, deadline: u64) -> Option<Next<'r, B>> {
    match mount_fast(run, s, exit, me, deadline)? {
        true => Some(Next::Enter),
        false => Some(Next::Prepare(runqueue::lock(run))),
    }
}

/// `morsel_open` and `morsel_unmount` of a plain morsel, and `morsel_size`, with no world
/// lock (issue 21): the directory's lock around the look-up and the count, the guest's own
/// around its table and mounts
/// (`morsels::open_alone`, `unmount_alone`; the protocol is `vmcore::directory::open_begin`
/// and `unmount_begin`, model-checked). Taken where `lockless` found the exit quiet (no IPI
/// asked this CPU to look: a stop is never missed here) and the call is from guest kernel
/// mode with its name in guest RAM; anything else, an ExMap region, a mount with a notify
/// subscription, or any refusal is None with nothing changed: the world path takes the
/// call as before and says why. Some(true): answered, the shootdown settled, the guest
/// resumes with no lock; Some(false): answered, `prepare` first (an IPI asked this CPU to
/// look, the timer is due or the slice is over).
#[inline]
fn mount_fast<B: Backend>(run: &Run<B>, s: &mut Slot<B>, exit: &Exit, me: usize, deadline: u64) -> Option<bool> {
    let Exit::Hypercall { resume, cpl: 0 } = *exit else { return None };
    let space = s.space.as_deref()?;
    let regs = B::regs(&mut s.vcpu);
    if !matches!(regs.rax, abi::HC_MORSEL_OPEN | abi::HC_MORSEL_UNMOUNT | abi::HC_MORSEL_SIZE) {
        return None;
    }
    let next_rip = s.core.known_next(regs.rip, &resume, vcpu::Opcode::Hypercall)?;
    let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
    let (status, value) = match abi::Call::decode(regs.rax, args) {
        Ok(abi::Call::MorselOpen { name, writable }) => {
            let name = run.name_keys.hash(crate::morsels::read_ram_name(&s.shared, name)?);
            let (gpa, size) = crate::morsels::open_alone(run.directory, space, s.guest, &name, writable, me)?;
            // As the world path answers a mount (`vmcore::hypercall::conclude`): the size.
            (size & (u64::MAX >> 1), gpa)
        }
        Ok(abi::Call::MorselUnmount { gpa }) => {
            let shared = &s.shared;
            crate::morsels::unmount_alone(run.directory, space, s.guest, gpa, || shared.ran_on(), me)?;
            (0, 0)
        }
        // The guest's own mount list only (a mount's size never changes).
        Ok(abi::Call::MorselSize { gpa }) => (0, crate::morsels::size_alone(space, gpa)?),
        _ => return None,
    };
    let regs = B::regs(&mut s.vcpu);
    (regs.rip, regs.rax, regs.rdx) = (next_rip, status, value);
    super::shootdown::complete();
    let now = crate::platform::time::tsc();
    Some(!ipi::attention(me) && now < s.timer_at && now < deadline)
}

/// Ends the unlocked part of a call (`done`: its `Unlocked`, or the `Batch` it held) under
/// the world lock, taken here and returned: into its guest's registers and state
/// (`hypercall::finish`), or given up where the guest is gone (`hypercall::abandon`).
fn finish_locked<'r, B: Backend, D: Deferred<Hv<B>>>(run: &'r Run<B>, s: &mut Slot<B>, caller: Caller, done: D) -> runqueue::WorldGuard<'r, B> {
    let mut w = runqueue::lock(run);
    let World { guests, cx, .. } = &mut *w;
    match guests.get_mut(s.guest as usize).and_then(|g| g.as_mut()) {
        Some(guest) => hypercall::finish(guest, caller, B::regs(&mut s.vcpu), cx, done),
        None => hypercall::abandon(caller, cx, done),
    }
    w
}

/// Ends an ExMap batch with no world lock where it can (`Batch::finish_alone`): the vCPU's
/// slot keeps its ExMap state and handle, the guest gets its answer, and this CPU's shootdown
/// acknowledgments are in before the next entry. Ok(true): the guest resumes with no lock
/// (no IPI asked this CPU to look, the timer is not due, the slice is not over); Ok(false):
/// `prepare` first, under the world lock; Err: the batch ends under the world lock.
#[allow(clippy::result_large_err)] // the batch moves back once, on the rare fallback
fn end_alone<B: Backend>(s: &mut Slot<B>, batch: Batch<B::Format>, me: usize, deadline: u64)
    -> Result<bool, Batch<B::Format>> {
    let (failed, parked, fast) = batch.finish_alone(me, || s.shared.ran_on(), &mut crate::morsels::exmap::Here(percpu::of(me).frames()))?;
    s.exmap = Some(parked);
    s.fast = Some(fast);
    Ok(resume_alone(s, failed, me, deadline))
}

/// After a batch ended alone (`failed`: its failed-entry count): the guest's answer, this
/// CPU's shootdown acknowledgments in before the next entry; true where the guest resumes
/// with no lock (no IPI asked this CPU to look, the timer is not due, the slice not over).
fn resume_alone<B: Backend>(s: &mut Slot<B>, failed: u64, me: usize, deadline: u64) -> bool {
    hypercall::answer(B::regs(&mut s.vcpu), Ok(failed));
    super::shootdown::complete();
    let now = crate::platform::time::tsc();
    !ipi::attention(me) && now < s.timer_at && now < deadline
}

/// Puts back the vCPU's ExMap state its slot kept since a batch ended alone (the world lock
/// held `w`): before anything under the lock can look for it (`Exmaps::unpark`): at a
/// world-path exit of this vCPU (its own ExMap calls are the only ones that look for its
/// state) and at its end (before `vcpu_done`, whose last vCPU drains the guest's states).
fn unpark<B: Backend>(w: &mut World<B>, s: &mut Slot<B>, me: usize) {
    if s.exmap.is_some() {
        put_back(w, s.guest, s.exmap.take(), me);
    }
}

/// `unpark` of what guest `guest`'s vCPU kept, on CPU `me` (through its allocator handle).
fn put_back<B: Backend>(w: &mut World<B>, guest: u32, parked: Option<crate::morsels::exmap::Parked>, me: usize) {
    if let Some(p) = parked {
        let World { guests, cx, .. } = w;
        let alive = guests.get(guest as usize).is_some_and(|g| g.is_some());
        cx.exmaps.unpark(p, alive, &mut crate::morsels::exmap::Here(percpu::of(me).frames()));
    }
}

/// Before an entry, the world lock held: folds the exits counted without it into the guest,
/// checks that the guest may run (stopped by another vCPU, waiting, slice over), injects a
/// pending virtual interrupt. Some(ran) ends the slice (`run_slice`'s result), None enters.
fn prepare<B: Backend>(w: &mut World<B>, s: &mut Slot<B>, me: usize, first: bool, deadline: u64) -> Option<bool> {
    let World { guests, cx, .. } = w;
    // Recorded again below only where this start enters with nothing left to do.
    s.gate.forget();
    let Some(guest) = guests.get_mut(s.guest as usize).and_then(|g| g.as_mut()) else {
        s.end = Some(State::Stopped);
        return Some(true);
    };
    fold(guest, s, me);
    if guest.state != State::Runnable {
        // Stopped by another vCPU (reported there) while this one ran or waited.
        s.end = Some(State::Stopped);
        return Some(true);
    }
    // notify hook: a waiting vCPU is not run (vm/notify.rs).
    if first && !cx.notify.ready(guest, s.index, me, &mut s.vcpu) {
        return Some(false);
    }
    if crate::platform::time::tsc() >= deadline {
        let rip = B::regs(&mut s.vcpu).rip;
        s.core.exits[ExitKind::Preempted as usize] += 1;
        let rsp = B::regs(&mut s.vcpu).rsp;
        vcpu::end_slice(&mut Locked { guest: &mut *guest, me, vcpu: s.index, rsp }, rip);
        kick_if_stopped(guest, me);
        return Some(true);
    }
    guest.ran_on |= 1 << me;
    s.shared.note_ran(me);
    super::shootdown::note_ran(me);
    if s.exceptions != guest.handled_exceptions {
        B::guest_exceptions(&mut s.vcpu, guest.handled_exceptions);
        s.exceptions = guest.handled_exceptions;
    }
    // notify hook: inject a pending virtual interrupt or ask for a window (vm/notify.rs).
    let settled = cx.notify.before_run(guest, s.index, &mut s.vcpu);
    s.timer_at = cx.notify.timer_deadline(guest.id, s.index).unwrap_or(u64::MAX);
    // Read under the world lock, after every check: any change since bumps it.
    s.gate.record(s.shared.epoch.now(), settled);
    None
}

/// Adds the exits this vCPU counted without the lock to its guest's counters (the world lock
/// held); slices used that way are checked against the guest's budget.
fn fold<B: Backend>(guest: &mut Guest<B>, s: &mut Slot<B>, me: usize) {
    let slices = s.core.fold(&mut guest.exits);
    if slices > 0 && guest.state == State::Runnable {
        let Regs { rip, rsp, .. } = *B::regs(&mut s.vcpu);
        vcpu::check_budget(&mut Locked { guest: &mut *guest, me, vcpu: s.index, rsp }, rip);
        kick_if_stopped(guest, me);
    }
}

/// One guest entry, no lock held: answers shootdown requests, flushes this vCPU's
/// second-level translations if one reached this CPU since its last entry, runs it until
/// the next exit (at most until `deadline`).
fn enter<B: Backend>(backend: &mut B, s: &mut Slot<B>, me: usize, deadline: u64, per_us: u64) -> Exit {
    // Requests already made are answered here; the host runs with interrupts off: a
    // shootdown IPI that arrives after this check is taken in guest mode (an exit), so
    // no entry misses a flush it was asked for. Requests made since the last exit sent no
    // IPI (`ipi::busy` below): `ready_on` clears that mark before it answers, so a request
    // either sees it clear (and sends the IPI) or is answered here.
    ipi::ready_on(me);
    let gen = ipi::flush_gen(me);
    if s.seen_flush != gen {
        backend.flush_second_level(&mut s.vcpu);
        s.seen_flush = gen;
    }
    let now = crate::platform::time::tsc();
    let ticks = crate::arch::apic::ticks(me);
    crate::probe::mark(6);
    let exit = backend.run(&mut s.vcpu, deadline.saturating_sub(now).div_ceil(per_us).max(1));
    // Back in the hypervisor: answers before the next entry or halt, no IPI needed.
    ipi::busy(me);
    crate::probe::cycle();
    // An interrupt exit ends the slice only if the slice timer caused it (this CPU's tick
    // count moved) or the slice is over; an IPI before that (a shootdown, a wake-up, a
    // kick) resumes this vCPU and counts as `interrupt`, not as a used slice.
    match exit {
        Exit::Interrupt if crate::arch::apic::ticks(me) != ticks || crate::platform::time::tsc() >= deadline => Exit::Preempted,
        other => other,
    }
}

/// The exits handled with no lock (`vcpu::lockless`): those that touch nothing another vCPU
/// or guest can see (`vmcore::exits::classify` decides). The counts stay in the slot (`fold`
/// adds them to the guest at the next lock).
fn lockless<B: Backend>(s: &mut Slot<B>, exit: &Exit, me: usize, deadline: u64, guest_count: u64) -> Step {
    let mut alone = Alone::<B> { vcpu: &mut s.vcpu, shared: &s.shared, index: &s.index, me, guest_count, timer_at: &s.timer_at, deadline };
    vcpu::lockless(&mut alone, &mut s.core, exit)
}

/// A vCPU between runs with no lock held, as `vcpu::lockless` sees it. The slot's fields by
/// reference, read where an arm uses them: a CPUID exit loads none of `shared` and `index`
/// (Bochs counts each load).
struct Alone<'a, B: Backend> {
    vcpu: &'a mut B::Vcpu,
    shared: &'a alloc::sync::Arc<super::guest::Shared>,
    index: &'a u32,
    /// This CPU.
    me: usize,
    guest_count: u64,
    /// The vCPU's timer deadline and its slice's end (TSC).
    timer_at: &'a u64,
    deadline: u64,
}

impl<B: Backend> Alone<'_, B> {
    fn caller(&self) -> Caller {
        Caller { vcpu: *self.index, cpu: self.me }
    }
}

impl<B: Backend> vcpu::Local for Alone<'_, B> {
    fn regs(&mut self) -> &mut Regs {
        B::regs(self.vcpu)
    }

    fn signals(&mut self) -> Signals {
        let now = crate::platform::time::tsc();
        // Taken here (`attention` clears the flag): the world path looks at what it was for.
        Signals { attention: ipi::attention(self.me), timer_due: now >= *self.timer_at, slice_over: now >= self.deadline }
    }

    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        host_cpuid(leaf, subleaf)
    }

    fn info(&mut self, what: u64) -> Option<u64> {
        hypercall::info_local(self.shared, self.caller(), self.guest_count, what)
    }

    fn console(&mut self, text: abi::GuestSlice) -> Option<u64> {
        hypercall::console_local(self.shared, self.caller(), text)
    }
}

/// CPUID has no side effects; the guest sees the host's leaves.
fn host_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Handles an exit that needs the world (`lockless` said so), the lock held
/// (`vcpu::handle`): hypercalls, faults, and the exits that may have to wake, stop or
/// inject. Returns whether the vCPU goes on in this slice; the `Unlocked` part of a call, if
/// any, goes to `unlocked`.
#[allow(clippy::too_many_arguments)]
fn handle<B: Backend>(guest: &mut Guest<B>, cx: &mut Context<B>, s: &mut Slot<B>, exit: Exit, caller: Caller, me: usize,
    unlocked: &mut Option<hypercall::Unlocked<B::Format>>) -> bool {
    let cr3 = B::guest_cr3(&mut s.vcpu);
    let mut regs = *B::regs(&mut s.vcpu);
    let handled = vcpu::handle(&mut Locked { guest, me, vcpu: s.index, rsp: regs.rsp }, &mut s.core, &mut regs, cr3, exit,
        |g, regs| call(g.guest, cx, caller, regs, me, unlocked));
    *B::regs(&mut s.vcpu) = regs;
    match handled {
        vcpu::Handled::GoOn => true,
        vcpu::Handled::EndSlice => false,
        vcpu::Handled::Exit(code) => {
            s.end = Some(State::Exited(code));
            false
        }
    }
}

/// A hypercall from guest kernel mode (`hypercall::handle`), RIP after it in `regs`.
fn call<B: Backend>(guest: &mut Guest<B>, cx: &mut Context<B>, caller: Caller, regs: &mut Regs, me: usize,
    unlocked: &mut Option<hypercall::Unlocked<B::Format>>) -> vcpu::Call {
    let exceptions = guest.handled_exceptions;
    let action = hypercall::handle(guest, caller, regs, cx);
    if guest.handled_exceptions != exceptions {
        // The guest's other vCPUs take the new bitmap before their next entry.
        kick_siblings(guest, me);
    }
    match action {
        Action::Continue => vcpu::Call::Continue,
        Action::Yield => vcpu::Call::Yield,
        Action::Retry => vcpu::Call::Retry,
        Action::Unlocked(work) => {
            *unlocked = Some(work);
            vcpu::Call::Unlocked
        }
        Action::Exit(code) => vcpu::Call::Exit(code),
    }
}

/// A guest under the world lock, as `vcpu::handle` sees it (`me`: this CPU), with the vCPU
/// that exited and its stack pointer at the exit (for a stop's report).
struct Locked<'a, B: Backend> {
    guest: &'a mut Guest<B>,
    me: usize,
    vcpu: u32,
    rsp: u64,
}

impl<B: Backend> vcpu::Guest for Locked<'_, B> {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.guest.space.lock().mem.read_u64(GuestPhysAddr::new(gpa)).ok()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.guest.space.lock().mem.read(GuestPhysAddr::new(gpa), buf).is_ok()
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        host_cpuid(leaf, subleaf)
    }

    fn exits(&mut self) -> &mut [u64; ExitKind::COUNT] {
        &mut self.guest.exits
    }

    fn max_slices(&self) -> Option<u64> {
        self.guest.spec.max_slices
    }

    fn stop(&mut self) {
        self.guest.stop();
    }

    fn kick_siblings(&mut self) {
        kick_siblings(self.guest, self.me);
    }

    fn report(&mut self, why: &vcpu::Stop) {
        stopped(self.guest, why);
        super::report::stopped_at(self.guest, self.vcpu, self.me, self.rsp);
    }
}

/// Sends every other CPU that ran a vCPU of `guest` an IPI that makes it look (`prepare`)
/// before that vCPU's next entry.
fn kick_siblings<B: Backend>(guest: &Guest<B>, me: usize) {
    for cpu in 0..ipi::MAX_CPUS {
        if cpu != me && guest.ran_on & (1 << cpu) != 0 {
            ipi::send(cpu);
        }
    }
}

/// A guest stopped by this CPU: its vCPUs on other CPUs leave guest mode now (the IPI
/// forces an exit) and end there at once.
fn kick_if_stopped<B: Backend>(guest: &Guest<B>, me: usize) {
    if guest.state == State::Stopped {
        kick_siblings(guest, me);
    }
}
