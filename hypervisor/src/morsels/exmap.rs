//! ExMap in the hypervisor: `exmap_create` makes a region (a sparse morsel in the morsel
//! directory, so it is opened, shared read-only or read-write, device-mounted and destroyed
//! like any morsel), `exmap_action` runs one batch of up to 512 iovec entries over it
//! (ALLOC, FREE, READ and WRITE through the NVMe disk), `exmap_info` reads its counters.
//! The host-tested core (validation, frame cache, table edits) is the `exmap` crate.
//!
//! Per vCPU: a frame cache, a validator and result buffers (`VcpuState`), keyed by (guest,
//! vCPU). ALLOC and FREE on a region no device sees run with the world lock let go, under the
//! region's lock, which they share (several vCPUs' batches on one region at once; each leaf
//! changed by compare-and-swap in `exmap`) (`Unlocked::Batch`, its `Deferred::run`, then
//! `Batch::finish_alone` with no world lock
//! or `Exmaps::finish_batch` under it; the lock order is in `vm/sched.rs`); the region's lock
//! and batch counters are its `RegionCell`, the rest of ExMap's state is behind the world
//! lock (a vCPU's own state in its slot between a batch ended alone and its next world lock,
//! `Parked`).
//! The next ALLOC / FREE of that vCPU on the same region and iovec page takes no world lock
//! at all (`Fast`, kept in the vCPU's slot: the region's directory slot and generation; the
//! region's lock is taken by CAS at that generation, `RegionLock::take_fast`, so an unmount,
//! mount, destroy, slot reuse, device mount or NVMe batch since sends it to the world path;
//! docs/src/notes/region-lock.md).
//! READ and WRITE run their NVMe batch with the world lock let go (`Unlocked::Exmap`, then
//! `Exmaps::finish`): the region is pinned meanwhile (every action on it, its destroy and
//! other batches on it answer `Busy`), so no frame the device may still write is freed.
//! Invalidation: FREE clears all its PTEs, then shoots down ONCE (`vm/shootdown.rs`): the
//! CPUs that ran the caller's vCPUs, or, where other guests have the region mounted, the CPUs
//! of every guest that mounted it (`RegionCell::sharers`: placement is static, so a guest's
//! CPUs are known from its start), and the IOTLB of every device domain that has it mounted;
//! the call returns after every CPU acknowledged. No CPU of a guest that never mounted the
//! region is interrupted (`exmap_shared_free_spares_other_cpus`; the sharers' shootdown:
//! `exmap_free_shoots_down_sharing_guest`).

use crate::vm::guest::Guest;
use super::{read_hashed, Directory, Name};
use crate::vm::hypercall::{Hv, Under, Unlocked};
use crate::vm::shootdown::{Flush, Hw};
use crate::vm::Backend;
use crate::mm::frames::{Frames, IDENTITY};
use alloc::string::String;
use alloc::vec::Vec;
use crate::devices::nvme::{IoError, Request};
use exmap::{EntryError, FrameCache, Origin, Region, Validator};
use super::DiskBatch;
use formats::units::Bytes;
use abi::{self, Error};
use hashbrown::HashMap;
use morsel::{GuestPhysAddr, HostPhysAddr, Morsel, Perm};
use vmcore::heap::TryBox;
use vmcore::hypercall::{self, Deferred};
use vmcore::region_lock::{Cache, Caller, Contender, Handle, Held, Refusal, RegionLock, Targets};
use core::sync::atomic::{AtomicU64, Ordering};

const _: () = assert!(exmap::MAX_ENTRIES as u64 == abi::EXMAP_MAX_ENTRIES);
const _: () = assert!(exmap::MAX_COUNT == abi::EXMAP_MAX_COUNT);
const _: () = assert!(exmap::encode(5, 9) == abi::exmap_entry(5, 9));

/// What one vCPU keeps between calls (no allocation per call).
struct VcpuState {
    cache: FrameCache,
    validator: Validator,
    /// The iovec page's entries, overwritten with their results by the batch (`exmap`),
    /// written back to the guest's page at the end.
    iov: Vec<u64>,
    /// READ / WRITE: the entries as the guest wrote them (the results replace them in `iov`),
    /// for the NVMe requests and a failed READ's rollback; the entries to roll back; the
    /// entry each request of an NVMe batch serves.
    entries: Vec<u64>,
    undo: Vec<u64>,
    owners: Vec<usize>,
}

impl VcpuState {
    /// A vCPU's state, on the heap, made at its first call (`ready` then gives the buffers
    /// their room): `NoMemory`, never the allocation panic.
    fn try_new() -> Result<TryBox<Self>, Error> {
        let state = VcpuState {
            cache: FrameCache::try_new().ok_or(Error::NoMemory)?,
            validator: Validator::try_new().ok_or(Error::NoMemory)?,
            iov: Vec::new(),
            entries: Vec::new(),
            undo: Vec::new(),
            owners: Vec::new(),
        };
        TryBox::try_new(state).map_err(|_| Error::NoMemory)
    }
}

impl VcpuState {
    /// Room for a whole batch in the buffers a READ / WRITE in flight takes along (another
    /// vCPU's call meanwhile finds them empty): `NoMemory`, never the allocation panic.
    fn ready(&mut self) -> Result<(), Error> {
        let n = exmap::MAX_ENTRIES;
        for b in [&mut self.iov, &mut self.entries, &mut self.undo] {
            b.try_reserve(n.saturating_sub(b.len())).map_err(|_| Error::NoMemory)?;
        }
        self.owners.try_reserve(n.saturating_sub(self.owners.len())).map_err(|_| Error::NoMemory)?;
        Ok(())
    }
}

/// The result the guest reads for a failed entry: the ABI's (negative) error number.
fn code(e: EntryError) -> u64 {
    entry_error(e) as i64 as u64
}

/// Whether an entry's result in the iovec page is a success (a page count).
fn succeeded(result: u64) -> bool {
    (result as i64) >= 0
}

/// An ALLOC or FREE batch run with the world lock let go (`Batch::run`, then
/// `Exmaps::finish_batch` under it again). It holds the region's lock, shared with other
/// batches (taken under the world lock by `action`), and the calling vCPU's own
/// `VcpuState`, taken out of `Exmaps` meanwhile: nothing in it is reached by another CPU
/// (the region's leaves are, by compare-and-swap).
pub struct Batch<F: morsel::Format> {
    /// The region's lock, given back by `finish_alone` or `finish_batch` only.
    held: Held,
    /// The region's cell (its lock and batch counters).
    cell: &'static RegionCell,
    /// A descriptor of the region's subtree (`Morsel::alias`); the region cannot be
    /// destroyed, device-mounted or batched by another call while `held`.
    morsel: Morsel<F>,
    origin: Origin,
    v: TryBox<VcpuState>,
    op: u64,
    count: usize,
    /// The iovec page, translated once at the start (guest RAM: it stays while the calling
    /// vCPU lives, and that vCPU is in this call).
    iov_hpa: u64,
    name: Name,
    guest: u32,
    vcpu: u32,
    /// The call's region and iovec page addresses (what a `Fast` handle answers for).
    gpa: u64,
    iov_gpa: u64,
    /// What the batch did (pages, failed entries, frames zeroed), or why it did nothing.
    outcome: Outcome,
}

/// An ALLOC / FREE batch, deferred (`Unlocked::Batch`): run with the world lock let go, then
/// ended with no world lock (`finish_alone`, `sched`) or under it (`Exmaps::finish_batch`,
/// its guest there or gone).
impl<B: Backend> Deferred<Hv<B>> for Batch<B::Format> {
    /// The batch, no lock held: reads the iovec page, validates and edits the leaves in one
    /// walk (`exmap`), writes the results back. Frames come from and go to this vCPU's cache
    /// (`frames` is this CPU's allocator handle); a FREE's frames stay in that cache until
    /// `finish_batch` has shot the translations down, so none is reused before.
    fn run(&mut self, frames: &Frames) {
        self.outcome = run_batch(&mut self.v, &self.morsel, self.origin, self.iov_hpa, self.op, self.count, frames);
    }

    fn finish(self, w: Under<'_, B>, g: &mut Guest<B>) -> Result<u64, Error> {
        w.cx.exmaps.finish_batch(Some(g), &w.frames, self)
    }

    fn abandon(self, w: Under<'_, B>) {
        let _ = w.cx.exmaps.finish_batch::<B>(None, &w.frames, self);
    }
}

/// What a batch did (pages, failed entries, frames zeroed), or why it did nothing.
type Outcome = Result<(exmap::BatchStats, u64), Error>;

/// `Batch::run` on its parts, borrowed (the lock-free path runs it in place, `Fast::call`):
/// the calling vCPU's state `v`, the region's subtree `morsel` at `origin`, the iovec page
/// at `iov_hpa` (translated where the region's lock was taken, under the world lock), `op`
/// of `count` entries.
#[inline(always)]
fn run_batch<F: morsel::Format>(v: &mut VcpuState, morsel: &Morsel<F>, origin: Origin, iov_hpa: u64, op: u64, count: usize, frames: &Frames) -> Outcome {
    v.iov.clear();
    let page = iov_hpa as *const u64;
    for k in 0..count {
        // SAFETY: `iov_hpa` is a 4 KiB-aligned page of the caller's guest RAM (checked and
        // translated read-write in `action`), identity-mapped, and stays while the calling
        // vCPU lives (it is in this call); k < 512, so the u64 lies inside it, aligned.
        // Sibling vCPUs may write it meanwhile: one volatile read, no reference.
        let e = unsafe { core::ptr::read_volatile(page.add(k)) };
        // Within the capacity `ready` made sure of: no allocation.
        v.iov.push(u64::from_le(e));
    }
    if op == abi::EXMAP_FREE {
        let pages: u64 = v.iov.iter().map(|&e| exmap::decode(e).1).sum();
        if v.cache.reserve(pages as usize).is_err() {
            return Err(Error::NoMemory);
        }
    }
    let zeroed0 = v.cache.stats().zeroed;
    let region = Region { morsel, origin, mem: &IDENTITY };
    let (iov, val, cache) = (&mut v.iov, &mut v.validator, &mut v.cache);
    let b = match op {
        abi::EXMAP_ALLOC => exmap::alloc(&region, iov, val, cache, frames, &mut |_, _| {}, code),
        _ => exmap::free(&region, iov, val, cache, &mut |_, _| {}, code),
    };
    let out = iov_hpa as *mut u64;
    for (k, r) in v.iov.iter().enumerate().take(count) {
        // SAFETY: as for the read above, written back the same way.
        unsafe { core::ptr::write_volatile(out.add(k), r.to_le()) };
    }
    Ok((b, v.cache.stats().zeroed - zeroed0))
}

impl<F: morsel::Format> Batch<F> {
    /// Ends the batch with the world lock let go, where nothing shared needs it: the batch
    /// succeeded and its vCPU goes on (the caller checked that no stop reached this CPU).
    /// A FREE that cleared pages shoots down ONCE (`Held::targets` from the mounts counted
    /// at the take: `guest_cpus`, the CPUs that ran the caller's vCPUs, read now (only this
    /// CPU `me`: its local flush), or the CPUs of every guest that mounted the region,
    /// `RegionCell::sharers_flush`), then the region's lock is
    /// given back (Release: the next one admitted under the world lock sees the edits). The
    /// counters are the region cell's.
    /// Returns the failed-entry count and the vCPU's ExMap state, which its slot keeps
    /// until its next world lock (`Exmaps::unpark`); the caller settles this CPU's
    /// shootdown (`shootdown::complete`) before the vCPU enters its guest again. The batch
    /// comes back untouched where it failed (`finish_batch` reports it). Also returns the
    /// region's handle for the vCPU's next call (`Fast`, kept in its slot).
    #[allow(clippy::result_large_err)] // the batch moves back once, on the rare fallback; boxing would allocate
    pub fn finish_alone(self, me: usize, guest_cpus: impl FnOnce() -> u64, frames: &Frames) -> Result<(u64, Parked, Fast<F>), Self> {
        let Ok(done) = self.outcome else { return Err(self) };
        let Batch { held, cell, morsel, origin, mut v, op, iov_hpa, name, guest, vcpu, gpa, iov_gpa, .. } = self;
        let handle = held.handle();
        let failed = end_alone(held, cell, &mut v, op, done, me, guest_cpus, frames, &name, guest);
        let fast = Fast { cell, handle, morsel, origin, gpa, iov_gpa, iov_hpa, name, guest, vcpu };
        Ok((failed, Parked { v, guest, vcpu }, fast))
    }
}

/// `Batch::finish_alone` on its parts (the lock-free path ends its batch in place,
/// `Fast::call`): the shootdown of a FREE that cleared pages, the counters, the region's lock
/// given back. Returns the failed-entry count.
#[allow(clippy::too_many_arguments)]
fn end_alone(held: Held, cell: &RegionCell, v: &mut VcpuState, op: u64, done: (exmap::BatchStats, u64), me: usize, guest_cpus: impl FnOnce() -> u64,
    frames: &Frames, name: &Name, guest: u32) -> u64 {
    let (b, zeroed) = done;
    let (pages, failed) = (b.pages, b.failed as u64);
    let cleared = op == abi::EXMAP_FREE && pages > 0 || b.rolled_back > 0;
    if let Some(targets) = held.targets(cleared, Caller::Stays) {
        let flush = match targets {
            Targets::Caller => match guest_cpus() {
                // The caller's guest ran on this CPU (`me`) alone: its local flush, as
                // `Flush::commit` would do it, without building one.
                cpus if cpus & !(1 << me) == 0 => None,
                cpus => Some(Flush::cpus(cpus)),
            },
            Targets::Everyone => Some(cell.sharers_flush()),
        };
        match flush {
            // No device sees a batching region: the shootdown alone.
            Some(flush) => {
                let _ = flush.commit(&mut Hw(None));
            }
            None => crate::vm::shootdown::local(me),
        }
        RegionCell::add(&cell.invalidations, 1);
        v.cache.trim(&crate::vm::shootdown::After(frames));
    }
    cell.count(op, pages, failed, zeroed);
    cell.lock.end(held);
    log::debug!(target: "exmap", "guest {guest} '{name}' {}: {pages} pages, {failed} failed", ["alloc", "free"][(op & 1) as usize]);
    failed
}

/// A vCPU's handle to the region of its last ALLOC / FREE (kept in its slot,
/// `sched::Slot::fast`), made where a batch taken under the world lock ended alone: the
/// region's directory slot (its `RegionCell`) and generation (`vmcore::region_lock::Handle`,
/// with the guest mounts counted then), and what that call checked under the world lock:
/// the guest's read-write mount at `gpa`, the iovec page at `iov_gpa` (aligned, guest RAM,
/// translated to `iov_hpa`). The next call on the same region with the same iovec page
/// takes the region's lock with it, no world lock (`Fast::call`): only while the
/// generation is unchanged, so that mount is still there (an unmount bumps it), the region
/// was not destroyed and its slot not reused (destroy and `exmap_create` bump it), and no
/// device saw it since (a device mount or NVMe batch bumps it). Anything else goes to the
/// world path, which answers as before.
pub struct Fast<F: morsel::Format> {
    cell: &'static RegionCell,
    handle: Handle,
    /// The region's subtree (`Morsel::alias`): dereferenced only while `handle` takes the
    /// lock (the region then exists and cannot be destroyed).
    morsel: Morsel<F>,
    origin: Origin,
    gpa: u64,
    iov_gpa: u64,
    iov_hpa: u64,
    name: Name,
    guest: u32,
    vcpu: u32,
}

/// Calls that took the region's lock with a `Fast` handle (no world lock), and those whose
/// handle was refused (a change since, or another batch held the lock): counters for the
/// stats (`Exmaps::log_stats`).
static FAST_CALLS: AtomicU64 = AtomicU64::new(0);
static FAST_REFUSED: AtomicU64 = AtomicU64::new(0);

/// What `Fast::call` did.
#[allow(clippy::large_enum_variant)] // `Locked` is the rare fallback; boxing would allocate
pub enum FastCall<F: morsel::Format> {
    /// Not taken, nothing changed: the world path handles the call.
    NotTaken,
    /// Run and ended in place, no world lock: the failed-entry count, the guest's answer. The
    /// caller settles this CPU's shootdown (`shootdown::complete`) before the next entry.
    Ended(u64),
    /// Run, but it ends under the world lock (`Exmaps::finish_batch`): it failed, or a stop
    /// reached this CPU meanwhile. The vCPU's state went into the batch.
    Locked(Batch<F>),
}

impl<F: morsel::Format> Fast<F> {
    /// `exmap_action(gpa, iov_gpa, count, op)` (ALLOC or FREE) with no world lock, run and
    /// ended in place with the vCPU's state `parked` (none: `NotTaken`): no `Batch` is built
    /// and nothing large moved per call (Bochs counts every byte a move copies). The batch is
    /// `Batch::run`'s, and it ends as `Batch::finish_alone` ends it (`me`, `guest_cpus`: the
    /// shootdown's) where it succeeded and `stopped` (asked after the batch ran) says no stop
    /// reached this CPU; otherwise it ends under the world lock (`Locked`). The handle
    /// stays: a fast take leaves the generation as it was. `NotTaken` where the call does not name
    /// this handle's region and iovec page or the lock is not taken by CAS at the handle's
    /// generation (`RegionLock::take_fast`): the first call on a region, another iovec
    /// page, a change since (batches of other vCPUs holding the lock do not refuse it).
    #[allow(clippy::too_many_arguments)]
    pub fn call(&self, parked: &mut Option<Parked>, gpa: u64, iov_gpa: u64, op: u64, count: u64, frames: &Frames,
        stopped: impl FnOnce() -> bool, me: usize, guest_cpus: impl FnOnce() -> u64) -> FastCall<F> {
        // `Parked` is a box and two numbers: taking it out and back copies 16 bytes.
        let Some(mut p) = parked.take() else { return FastCall::NotTaken };
        let Some(held) = self.take(&p, gpa, iov_gpa) else {
            *parked = Some(p);
            return FastCall::NotTaken;
        };
        crate::probe::mark(2);
        let count = (count as usize).min(exmap::MAX_ENTRIES);
        let outcome = run_batch(&mut p.v, &self.morsel, self.origin, self.iov_hpa, op, count, frames);
        crate::probe::mark(3);
        match outcome {
            Ok(done) if !stopped() => {
                let failed = end_alone(held, self.cell, &mut p.v, op, done, me, guest_cpus, frames, &self.name, self.guest);
                *parked = Some(p);
                FastCall::Ended(failed)
            }
            outcome => FastCall::Locked(Batch { outcome, ..self.batch_of(held, p, gpa, iov_gpa, op, count) }),
        }
    }

    /// The region's lock for a call on `gpa` with the iovec page `iov_gpa` by the vCPU whose
    /// state is `p`: where they are this handle's and the lock is taken by CAS at its
    /// generation (`RegionLock::take_fast`).
    fn take(&self, p: &Parked, gpa: u64, iov_gpa: u64) -> Option<Held> {
        if gpa != self.gpa || iov_gpa != self.iov_gpa || p.guest != self.guest || p.vcpu != self.vcpu {
            return None;
        }
        let Some(held) = self.cell.lock.take_fast(&self.handle) else {
            FAST_REFUSED.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        FAST_CALLS.fetch_add(1, Ordering::Relaxed);
        Some(held)
    }

    /// The `Batch` of a call this handle took (`held`), not run yet.
    fn batch_of(&self, held: Held, p: Parked, gpa: u64, iov_gpa: u64, op: u64, count: usize) -> Batch<F> {
        Batch {
            held,
            cell: self.cell,
            morsel: self.morsel.alias(),
            origin: self.origin,
            v: p.v,
            op,
            count,
            iov_hpa: self.iov_hpa,
            name: self.name,
            guest: self.guest,
            vcpu: self.vcpu,
            gpa,
            iov_gpa,
            outcome: Err(Error::Invalid),
        }
    }
}

/// A vCPU's ExMap state after a batch ended alone (`Batch::finish_alone`): kept in the vCPU's
/// slot until its next world lock puts it back (`Exmaps::unpark`). Nothing in it is reached
/// by another CPU.
pub struct Parked {
    v: TryBox<VcpuState>,
    guest: u32,
    vcpu: u32,
}

/// A READ or WRITE whose NVMe batch runs with the world lock let go (`DiskBatch::run`),
/// then `Exmaps::finish`: the batch, the entries and their results so far (taken from
/// the guest's `VcpuState`, whose other vCPUs may call meanwhile: on another region, since
/// this one is pinned), which entry each request serves, and what `conclude` needs.
pub struct ExmapIo {
    batch: DiskBatch,
    iov: Vec<u64>,
    entries: Vec<u64>,
    owners: Vec<usize>,
    rest: Rest,
}

/// A READ / WRITE's disk batch, deferred (`Unlocked::Exmap`): the device I/O with the world lock
/// let go, then the results, a failed READ's rollback and the unpin under it
/// (`Exmaps::finish`, its guest there or gone).
impl<B: Backend> Deferred<Hv<B>> for ExmapIo {
    fn run(&mut self, _: &Frames) {
        self.batch.run();
    }

    fn finish(self, w: Under<'_, B>, g: &mut Guest<B>) -> Result<u64, Error> {
        let cx = w.cx;
        cx.exmaps.finish(&mut cx.morsels.lock(), cx.devices.as_mut(), Some(g), &w.frames, self)
    }

    fn abandon(self, w: Under<'_, B>) {
        let cx = w.cx;
        let _ = cx.exmaps.finish::<B>(&mut cx.morsels.lock(), cx.devices.as_mut(), None, &w.frames, self);
    }
}

/// The state of an action between its halves.
struct Rest {
    op: u64,
    b: exmap::BatchStats,
    zeroed0: u64,
    count: usize,
    iov_gpa: u64,
    name: Name,
    guest: u32,
    vcpu: u32,
    disk: DiskStats,
}

/// Counters of one region that only calls under the world lock change, kept in its
/// directory entry (`Named::region`): they go with it. Those an ALLOC / FREE batch changes
/// are in its `RegionCell`.
#[derive(Default, Clone, Copy)]
pub(crate) struct RegionStats {
    id: Origin,
    /// Pages the disk read into (READ) / wrote from (WRITE); NVMe commands; most in flight.
    read: u64,
    written: u64,
    commands: u64,
    max_depth: u64,
    /// NVMe completion interrupts taken during its batches.
    interrupts: u64,
}

/// What an ExMap region's ALLOC / FREE batches reach with the world lock let go: the
/// region's lock (`vmcore::region_lock`) and the counters they change (atomics, `Relaxed`:
/// counters, read under the world lock by `exmap_info` and the stats). One per directory
/// slot (`Directory::cells`), a region's is its slot's; reset when a region enters the
/// slot.
pub(crate) struct RegionCell {
    pub(crate) lock: RegionLock,
    calls: AtomicU64,
    free_calls: AtomicU64,
    allocated: AtomicU64,
    freed: AtomicU64,
    zeroed: AtomicU64,
    failed: AtomicU64,
    invalidations: AtomicU64,
    remote_flushes: AtomicU64,
    /// The CPUs of every guest that mounted the region since it entered the slot
    /// (`shootdown::placed_on`, OR-ed in by `Named::mounted` under the directory's lock, SeqCst;
    /// never cleared until the slot's next region): a superset of the CPUs that may cache its
    /// translations, what a FREE where others have it mounted shoots down (`sharers`) instead
    /// of every CPU that ran any guest.
    sharers: AtomicU64,
}

impl RegionCell {
    pub(crate) const fn new() -> Self {
        RegionCell {
            lock: RegionLock::new(),
            calls: AtomicU64::new(0),
            free_calls: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            remote_flushes: AtomicU64::new(0),
            sharers: AtomicU64::new(0),
        }
    }

    /// Guest `guest` mounted the region: its CPUs join the region's `sharers`.
    pub(crate) fn mounted_by(&self, guest: u32) {
        self.sharers.fetch_or(crate::vm::shootdown::placed_on(guest), Ordering::SeqCst);
    }

    /// The shootdown of a batch where others have the region mounted (or its caller is
    /// gone): the CPUs of every guest that mounted it (each of them did, the caller too,
    /// before any batch that this shootdown ends; a mount is admitted only while no batch
    /// holds the region, and refuses every fast handle made before it), or, where none is
    /// known, every CPU that ran any guest.
    fn sharers_flush(&self) -> Flush {
        RegionCell::add(&self.remote_flushes, 1);
        match self.sharers.load(Ordering::SeqCst) {
            0 => Flush::every_guest_cpu(),
            cpus => Flush::cpus(cpus),
        }
    }

    /// Counters from zero for a new region (under the world lock; the lock is free), and a
    /// new generation: a `Fast` handle to the slot's previous region is refused.
    pub(crate) fn reset(&self) {
        self.lock.changed();
        self.lock.forget_turn();
        for c in [&self.calls, &self.free_calls, &self.allocated, &self.freed, &self.zeroed, &self.failed, &self.invalidations, &self.remote_flushes, &self.sharers] {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// One call's counts: `op`, its pages, failed entries, frames zeroed.
    fn count(&self, op: u64, pages: u64, failed: u64, zeroed: u64) {
        Self::add(&self.calls, 1);
        Self::add(&self.failed, failed);
        Self::add(&self.zeroed, zeroed);
        match op {
            abi::EXMAP_ALLOC | abi::EXMAP_READ => Self::add(&self.allocated, pages),
            abi::EXMAP_FREE => {
                Self::add(&self.freed, pages);
                Self::add(&self.free_calls, 1);
            }
            _ => {}
        }
    }
}

/// ExMap's state for the run (a region's own counters are in its directory entry and cell).
pub struct Exmaps {
    /// Per vCPU, keyed by (guest, vCPU index); a vCPU's entry is out of the map while its
    /// `Batch` runs.
    vcpus: HashMap<(u32, u32), TryBox<VcpuState>>,
    next_id: Origin,
}

impl Default for Exmaps {
    fn default() -> Self {
        Self::new()
    }
}

impl Exmaps {
    pub fn new() -> Self {
        Exmaps { vcpus: HashMap::new(), next_id: 1 }
    }

    /// `exmap_create(name_ptr, name_len, size, flags)`: the name is reserved like every
    /// morsel's (`Busy` if it exists or another create holds it, `NoMemory` past the guest's
    /// `MORSEL_QUOTA`, which counts regions and morsels together), then committed with the
    /// region's counters; its mount counts in `MOUNT_QUOTA`.
    #[allow(clippy::too_many_arguments)]
    pub fn create<B: Backend>(&mut self, dir: &mut Directory<B::Format>, g: &mut Guest<B>, frames: &Frames, name: abi::Name, size: u64, share_writable: bool) -> Result<u64, Error> {
        let hashed = read_hashed(g, dir.named.keys(), name)?;
        let name = *hashed.name();
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(Error::Invalid);
        }
        if size > abi::EXMAP_MAX_SIZE {
            return Err(Error::TooLarge);
        }
        let ticket = dir.named.reserve_hashed(&hashed, g.id).map_err(|e| match e {
            vmcore::names::Error::Taken => g.refuse(Error::Busy, format_args!("the name {name:?} is taken")),
            e => super::name_error(e),
        })?;
        let m = match Morsel::<B::Format>::create_sparse(size, frames, &IDENTITY) {
            Ok(m) => m,
            Err(e) => {
                dir.named.abort(ticket);
                return Err(if e == morsel::Error::OutOfMemory { Error::NoMemory } else { Error::Invalid });
            }
        };
        let tables = m.table_count();
        let id = self.next_id;
        self.next_id += 1;
        let gpa = dir.add_region(g, frames, ticket, m, share_writable, RegionStats { id, ..Default::default() })?;
        log::info!(target: "exmap", "guest {} created region '{name}': {} ({} pages), {tables} tables, no data frame, at {gpa:#x}",
            g.id, Bytes(size), size / 4096);
        Ok(gpa)
    }

    /// `exmap_action(region_gpa, iov_gpa, count, opcode)`: validation and the table edits
    /// under the world lock; READ's and WRITE's disk I/O is deferred (`Unlocked::Exmap`), run
    /// with the lock let go, and ended by `finish` (results, rollback, counters) under it
    /// again; an ALLOC / FREE on a region no device sees is deferred whole (`Unlocked::Batch`).
    /// `Retry`: another vCPU's batch holds the region, the guest issues the call again; an
    /// answer: the failed-entry count. A region with a batch in flight (`Named::in_io`)
    /// answers every action with `Busy`.
    #[allow(clippy::too_many_arguments)] // the call's four arguments and what it works on
    pub fn action<B: Backend>(&mut self, dir: &mut Directory<B::Format>, mut devices: Option<&mut crate::devices::Devices>, g: &mut Guest<B>, vcpu: u32, frames: &Frames, gpa: u64, iov_gpa: u64, count: u64, op: abi::ExmapOp) -> Result<hypercall::Outcome<Unlocked<B::Format>>, Error> {
        let op = match op {
            abi::ExmapOp::Alloc => abi::EXMAP_ALLOC,
            abi::ExmapOp::Free => abi::EXMAP_FREE,
            abi::ExmapOp::Read => abi::EXMAP_READ,
            abi::ExmapOp::Write => abi::EXMAP_WRITE,
        };
        let space = g.space.lock();
        let mount = space.mounts.iter().find(|m| m.gpa == gpa).ok_or(Error::NotFound)?;
        let (name, at, writable) = (mount.name, mount.at, mount.writable);
        if !writable {
            return Err(Error::Denied);
        }
        // The iovec page: aligned, in guest RAM (never inside a morsel, not even this region,
        // so a FREE cannot pull it away under its own results), readable and writable.
        if !iov_gpa.is_multiple_of(4096) {
            return Err(Error::Invalid);
        }
        if iov_gpa.checked_add(4096).is_none_or(|end| end > g.spec.memory) {
            return Err(Error::BadAddress);
        }
        let (iov_hpa, _) = space.mem.translate(GuestPhysAddr::new(iov_gpa), Perm::RW)?;
        drop(space);
        // The region is found at the slot its mount recorded (no name hash per call; here
        // and in `finish_batch`).
        let n = dir.named.get_mut_at(at, &name).ok_or(Error::NotFound)?;
        let Some(id) = n.region.as_ref().map(|r| r.id) else { return Err(Error::Invalid) };
        if !n.morsel.is_sparse() {
            return Err(Error::Invalid);
        }
        if n.in_io {
            return Err(g.refuse(Error::Busy, format_args!("region {name:?} has an NVMe batch in flight")));
        }
        let io = op == abi::EXMAP_READ || op == abi::EXMAP_WRITE;
        // ALLOC / FREE share the region's lock with the batches in flight; READ / WRITE
        // exclude them (and an exclusive contender waiting for its turn holds both back).
        let who = if io { Contender::DiskAction } else { Contender::Action };
        match n.admit_in_turn(who, super::turn(g.id, vcpu)) {
            Ok(()) => {}
            // Batches hold the region's lock (READ / WRITE), or a mount or READ / WRITE
            // waits for its turn: this vCPU issues the call again (spinning with the world
            // lock let go).
            Err(Refusal::Retry) => return Ok(hypercall::Outcome::Retry),
            Err(Refusal::Busy) => return Err(Error::Busy),
        }
        // READ and WRITE need the disk: its size in 4 KiB pages (disk offset = region offset).
        let disk_pages = match io {
            true => devices.as_deref().and_then(|d| d.nvme).map(|nv| nv.blocks / PAGE_BLOCKS).ok_or(Error::NotFound)?,
            false => 0,
        };
        let key = (g.id, vcpu);
        // Room for a new entry (a capacity check when there is), so the insert below never
        // allocates; one hash for find-or-insert.
        self.vcpus.try_reserve(1).map_err(|_| Error::NoMemory)?;
        // Once per vCPU (its buffers and cache, a few KiB).
        let v = match self.vcpus.entry(key) {
            hashbrown::hash_map::Entry::Occupied(e) => e.into_mut(),
            hashbrown::hash_map::Entry::Vacant(e) => e.insert(VcpuState::try_new()?),
        };
        // The state itself, so that its fields are borrowed apart.
        let v: &mut VcpuState = v;
        v.ready()?;
        let count = (count as usize).min(exmap::MAX_ENTRIES);
        let views = &n.views;
        let any_view = views.vtd.is_some() || views.amd.is_some() || views.amd_ro.is_some() || views.ept.is_some();
        let device_mounted = dir.devices.iter().any(|d| d.name == name);
        if (op == abi::EXMAP_ALLOC || op == abi::EXMAP_FREE) && !any_view && !device_mounted {
            // The batch runs with the world lock let go, under the region's lock.
            let n = dir.named.get_mut_at(at, &name).ok_or(Error::NotFound)?;
            let Some(cell) = n.cell else { return Err(Error::Invalid) };
            // Free: `admit` said so above, in this critical section. The guest mounts are
            // counted now: none can be added while the lock is held (`Contender::Mount`).
            let Ok(held) = cell.lock.take(n.morsel.mount_count()) else { return Ok(hypercall::Outcome::Retry) };
            let Some(v) = self.vcpus.remove(&key) else {
                cell.lock.end(held);
                return Err(Error::NoMemory);
            };
            return Ok(hypercall::Outcome::Defer(Unlocked::Batch(Batch {
                held,
                cell,
                morsel: n.morsel.alias(),
                origin: id,
                v,
                op,
                count,
                iov_hpa: iov_hpa.as_u64(),
                name,
                guest: g.id,
                vcpu,
                gpa,
                iov_gpa,
                outcome: Err(Error::Invalid),
            })));
        }
        let n = dir.named.get_mut_at(at, &name).ok_or(Error::NotFound)?;
        // SAFETY: iov_hpa..+4096 is guest RAM of this guest (translated above, aligned, so
        // inside one page), which stays while the guest does (the caller holds it); sibling
        // vCPUs may write it meanwhile: copied word by word, never a reference.
        let page = unsafe { crate::mm::frames::guest_bytes(iov_hpa.as_u64(), 4096) };
        v.iov.clear();
        // Within the capacity `ready` made sure of: no allocation; count <= 512 words.
        v.iov.extend((0..count).map(|k| page.read_u64_volatile(8 * k).unwrap_or(0)));
        if io {
            v.entries.clear();
            v.entries.extend_from_slice(&v.iov);
        }
        if op == abi::EXMAP_FREE {
            // Room in the cache for every page the entries name (at most 512 x 4095), taken
            // fallibly now: the frames stay in it until the batch's shootdown.
            let pages: u64 = v.iov.iter().map(|&e| exmap::decode(e).1).sum();
            v.cache.reserve(pages as usize).map_err(|_| Error::NoMemory)?;
        }
        let zeroed0 = v.cache.stats().zeroed;
        // Validation, table edits and results in one walk (`exmap`); a device view (NPT
        // region mounted into a device) follows the region page by page, and a region
        // without one keeps no record of the pages.
        let region = Region { morsel: &n.morsel, origin: id, mem: &IDENTITY };
        let views = &n.views;
        let (iov, val, cache) = (&mut v.iov, &mut v.validator, &mut v.cache);
        let b = match (op, any_view) {
            (abi::EXMAP_ALLOC, false) => exmap::alloc(&region, iov, val, cache, frames, &mut |_, _| {}, code),
            (abi::EXMAP_ALLOC, true) => exmap::alloc(&region, iov, val, cache, frames, &mut |p, f| follow(views, p, f), code),
            (abi::EXMAP_FREE, false) => exmap::free(&region, iov, val, cache, &mut |_, _| {}, code),
            (abi::EXMAP_FREE, true) => exmap::free(&region, iov, val, cache, &mut |p, f| follow(views, p, f), code),
            // Every page of a READ entry and a WRITE entry must lie on the disk.
            (abi::EXMAP_READ, _) => exmap::alloc_fresh(&region, iov, disk_pages, val, cache, frames, &mut |p, f| follow(views, p, f), code),
            _ => exmap::collect(&region, iov, disk_pages, val, code),
        };
        let mut rest = Rest { op, b, zeroed0, count, iov_gpa, name, guest: g.id, vcpu, disk: DiskStats::default() };
        if !io || !v.iov.iter().any(|&r| succeeded(r)) {
            return Ok(hypercall::Outcome::Answer(Ok(self.conclude(dir, devices, Some(g), frames, rest))));
        }
        // The device reads into (READ) or from (WRITE) the entries' frames, with the world
        // lock let go: the region is pinned meanwhile (`Named::in_io`), so no FREE, READ,
        // destroy or other batch (of this guest's other vCPUs or of a sharer) touches its
        // pages until `finish`.
        let write = op == abi::EXMAP_WRITE;
        let mut batch = match devices.as_deref_mut() {
            Some(d) => dir.disk_begin(d, frames, &rest.name, write, false),
            None => Err(Error::NotFound),
        };
        let Some(v) = self.vcpus.get_mut(&key) else { return Err(Error::NoMemory) };
        let v: &mut VcpuState = v;
        v.owners.clear();
        if let Ok(batch) = batch.as_mut() {
            for (k, (&r, &e)) in v.iov.iter().zip(v.entries.iter()).enumerate() {
                if succeeded(r) {
                    let (first, count) = exmap::decode(e);
                    batch.reqs.push(Request { iova: batch.iova + first * 4096, lba: first * PAGE_BLOCKS, blocks: count * PAGE_BLOCKS });
                    batch.done.push(Err(IoError::Invalid));
                    v.owners.push(k);
                }
            }
        }
        match batch {
            Ok(batch) => Ok(hypercall::Outcome::Defer(Unlocked::Exmap(ExmapIo {
                batch,
                iov: core::mem::take(&mut v.iov),
                entries: core::mem::take(&mut v.entries),
                owners: core::mem::take(&mut v.owners),
                rest,
            }))),
            Err(e) => {
                // Nothing was mounted: every entry that needed the disk fails.
                log::error!(target: "exmap", "{}: the whole batch failed ({e:?})", if write { "WRITE" } else { "READ" });
                for r in v.iov.iter_mut() {
                    if succeeded(*r) {
                        *r = code(EntryError::Device);
                        rest.disk.failed += 1;
                    }
                }
                Ok(hypercall::Outcome::Answer(Ok(self.conclude(dir, devices, Some(g), frames, rest))))
            }
        }
    }

    /// Ends a READ or WRITE whose disk I/O ran (under the world lock again): the region
    /// leaves the NVMe domain and is unpinned, each entry gets its outcome, a failed READ
    /// is rolled back. `g` is None where the caller's guest is gone: then its cache is
    /// drained here too, and no result is written.
    pub fn finish<B: Backend>(&mut self, dir: &mut Directory<B::Format>, mut devices: Option<&mut crate::devices::Devices>, g: Option<&mut Guest<B>>, frames: &Frames, io: ExmapIo) -> Result<u64, Error> {
        let ExmapIo { batch, mut iov, entries, owners, mut rest } = io;
        let write = batch.write;
        let faulted = dir.disk_end(devices.as_deref_mut(), frames, &batch);
        rest.disk.commands = batch.stats.commands;
        rest.disk.max_depth = batch.stats.max_depth;
        rest.disk.interrupts = batch.stats.interrupts;
        for (&k, r) in owners.iter().zip(batch.done.iter()) {
            match (r, faulted) {
                (Ok(blocks), Ok(false)) => rest.disk.pages += blocks / PAGE_BLOCKS,
                _ => {
                    if let Err(e) = r {
                        log::warn!(target: "exmap", "{} of entry {k} failed: {e:?}", if write { "disk write" } else { "disk read" });
                    }
                    iov[k] = code(EntryError::Device);
                    rest.disk.failed += 1;
                }
            }
        }
        if let Ok(true) | Err(_) = faulted {
            log::error!(target: "exmap", "{}: the whole batch failed ({:?})", if write { "WRITE" } else { "READ" }, faulted);
        }
        let gone = g.is_none();
        let guest = rest.guest;
        // The entry is there: only this vCPU (in this call) removes it, guest_ended aside.
        if let Some(v) = self.vcpus.get_mut(&(guest, rest.vcpu)) {
            (v.iov, v.entries, v.owners) = (iov, entries, owners);
        }
        let r = self.conclude(dir, devices, g, frames, rest);
        if gone {
            self.guest_ended(guest, frames);
        }
        Ok(r)
    }

    /// The end of an action, under the lock: a failed READ's rollback, the shootdown of a
    /// FREE, the counters, the results into the iovec page (`v.iov`).
    fn conclude<B: Backend>(&mut self, dir: &mut Directory<B::Format>, devices: Option<&mut crate::devices::Devices>, mut g: Option<&mut Guest<B>>, frames: &Frames, rest: Rest) -> u64 {
        let Rest { op, mut b, zeroed0, count, iov_gpa, name, guest, vcpu, disk: d } = rest;
        let (Some(v), Some(n)) = (self.vcpus.get_mut(&(guest, vcpu)), dir.named.get_mut(&name)) else {
            // Unreachable: the region is not destroyed while its action runs (pinned).
            log::error!(target: "exmap", "guest {guest} '{name}': the region is gone at the end of its action");
            return 0;
        };
        let v: &mut VcpuState = v;
        // A copy, written back below (the entry's views are followed meanwhile).
        let Some(mut stats) = n.region else {
            log::error!(target: "exmap", "guest {guest} '{name}' is not a region");
            return 0;
        };
        let moved = d.pages;
        stats.commands += d.commands;
        stats.max_depth = stats.max_depth.max(d.max_depth);
        stats.interrupts += d.interrupts;
        b.failed += d.failed;
        if op == abi::EXMAP_READ && d.failed > 0 {
            // A failed read leaves nothing behind: its fresh pages are unmapped again.
            v.undo.clear();
            for (&r, &e) in v.iov.iter().zip(&v.entries) {
                if r == code(EntryError::Device) {
                    // Within the capacity `ready` made sure of.
                    v.undo.push(e);
                    let count = exmap::decode(e).1;
                    b.pages -= count;
                    b.rolled_back += count;
                }
            }
            // The pages go back to the cache they came from in this call; room for them if
            // it can be had (they never exceed what the READ took from it).
            let _ = v.cache.reserve(b.rolled_back as usize);
            let region = Region { morsel: &n.morsel, origin: stats.id, mem: &IDENTITY };
            let views = &n.views;
            exmap::free(&region, &mut v.undo, &mut v.validator, &mut v.cache, &mut |p, f| follow(views, p, f), code);
        }
        let Some(cell) = n.cell else {
            log::error!(target: "exmap", "guest {guest} '{name}' is a region without its cell");
            return 0;
        };
        cell.count(op, b.pages, b.failed as u64, v.cache.stats().zeroed - zeroed0);
        match op {
            abi::EXMAP_READ => stats.read += moved,
            abi::EXMAP_WRITE => stats.written += moved,
            _ => {}
        }
        if op == abi::EXMAP_FREE && b.pages > 0 || b.rolled_back > 0 {
            // ONE shootdown for the whole batch, then the frames may leave the cache: the
            // caller's CPUs, or, where other guests have the region mounted (or the caller
            // is gone), the CPUs of every guest that mounted it.
            let mut flush = match g.as_deref_mut() {
                Some(g) if n.morsel.mount_count() <= 1 => crate::vm::shootdown::of_guest(g),
                _ => cell.sharers_flush(),
            };
            RegionCell::add(&cell.invalidations, 1);
            // Each device domain the region is mounted in is invalidated once for the batch,
            // however many of its mounts (windows) are there (`Flush::merge`).
            let mut mounts = 0;
            for d in dir.devices.iter().filter(|d| d.name == name) {
                flush.merge(Flush::domain(d.bdf));
                mounts += 1;
            }
            let done = flush.commit(&mut Hw(devices));
            if mounts > 0 {
                let flushed = done.domains;
                RegionCell::add(&cell.invalidations, flushed as u64);
                log::info!(target: "exmap", "guest {guest} '{name}' free of {} pages: IOTLB invalidated once in each of {flushed} device domain(s) ({mounts} device mounts)", b.pages);
            }
            // What leaves the cache stays with this CPU until the shootdown is acknowledged.
            v.cache.trim(&crate::vm::shootdown::After(frames));
        }
        n.region = Some(stats);
        // The results go to the iovec page, translated again (guest RAM: it stays while the
        // guest does).
        if let Some(g) = g {
            let iov = g.space.lock().mem.translate(GuestPhysAddr::new(iov_gpa), Perm::RW);
            if let Ok((iov_hpa, _)) = iov {
                // SAFETY: as in `action`: one page of this guest's RAM, which stays while the
                // guest does; written word by word, never a reference.
                let page = unsafe { crate::mm::frames::guest_bytes(iov_hpa.as_u64(), 4096) };
                for (k, &r) in v.iov.iter().enumerate().take(count) {
                    let _ = page.write_u64(8 * k, r);
                }
            }
        }
        log::debug!(target: "exmap", "guest {guest} '{name}' {}: {count} entries, {} pages, {} failed",
            ["alloc", "free", "read", "write"][op as usize], b.pages, b.failed);
        b.failed as u64
    }

    /// `exmap_info(region_gpa, what)`.
    pub fn info<B: Backend>(&self, dir: &Directory<B::Format>, g: &Guest<B>, region: u64, what: u64) -> Result<u64, Error> {
        let name = g.space.lock().mounts.iter().find(|m| m.gpa == region).ok_or(Error::NotFound)?.name;
        let e = dir.named.get(&name).ok_or(Error::Invalid)?;
        let (Some(s), Some(c)) = (e.value.region.as_ref(), e.value.cell) else { return Err(Error::Invalid) };
        let get = RegionCell::get;
        match what {
            abi::EXMAP_INFO_POPULATED => Ok(get(&c.allocated).saturating_sub(get(&c.freed))),
            abi::EXMAP_INFO_CALLS => Ok(get(&c.calls)),
            abi::EXMAP_INFO_INVALIDATIONS => Ok(get(&c.invalidations)),
            abi::EXMAP_INFO_ALLOCATED => Ok(get(&c.allocated)),
            abi::EXMAP_INFO_FREED => Ok(get(&c.freed)),
            abi::EXMAP_INFO_ZEROED => Ok(get(&c.zeroed)),
            abi::EXMAP_INFO_FAILED => Ok(get(&c.failed)),
            abi::EXMAP_INFO_READ => Ok(s.read),
            abi::EXMAP_INFO_WRITTEN => Ok(s.written),
            abi::EXMAP_INFO_COMMANDS => Ok(s.commands),
            abi::EXMAP_INFO_MAX_DEPTH => Ok(s.max_depth),
            _ => Err(Error::NoSuchCall),
        }
    }

    /// A vCPU's state kept in its slot since its batch ended alone goes back in place (the
    /// world lock held); where its guest is gone (`alive` false) or there is no room, its
    /// cache goes through this CPU's `Owed` instead (freed after the acknowledgments).
    pub fn unpark(&mut self, p: Parked, alive: bool, frames: &Frames) {
        let Parked { mut v, guest, vcpu } = p;
        if alive && self.vcpus.try_reserve(1).is_ok() {
            self.vcpus.insert((guest, vcpu), v);
        } else {
            drain(guest, vcpu, &mut v, &crate::vm::shootdown::After(frames));
        }
    }

    /// A guest ended: its vCPUs' caches go back to the allocator.
    pub fn guest_ended(&mut self, id: u32, frames: &Frames) {
        self.vcpus.retain(|&(guest, vcpu), v| {
            if guest == id {
                drain(id, vcpu, v, frames);
            }
            guest != id
        });
    }

    /// Ends an ALLOC / FREE `Batch` under the world lock (where `Batch::finish_alone` could
    /// not: the caller's guest stopped or gone, or the batch failed): a FREE that cleared
    /// pages shoots down ONCE (`Held::targets`: the caller's CPUs, or every CPU that ran a
    /// guest where others had the region mounted at the take, none since), then the
    /// region's lock is given back; its counters; the vCPU's state back in place. `g` is None
    /// where the caller's guest is gone: the vCPU's cache then goes through this CPU's
    /// `Owed`, freed once the shootdown is acknowledged.
    pub fn finish_batch<B: Backend>(&mut self, g: Option<&mut Guest<B>>, frames: &Frames, batch: Batch<B::Format>) -> Result<u64, Error> {
        let Batch { held, cell, mut v, op, name, guest, vcpu, outcome, .. } = batch;
        // The vCPU's state stays only where it has its place back (no allocation but this
        // fallible one).
        let caller = match g.is_some() && self.vcpus.try_reserve(1).is_ok() {
            true => Caller::Stays,
            false => Caller::Gone,
        };
        // Stopped (by a sibling vCPU or the hypervisor) or gone while the batch ran: the
        // guest never reads the results; reported once per such batch (`exmap.abandon`).
        let stopped = g.as_deref().is_none_or(|g| g.state != crate::vm::guest::State::Runnable);
        let cleared = matches!(&outcome, Ok((b, _)) if op == abi::EXMAP_FREE && b.pages > 0 || b.rolled_back > 0);
        let targets = held.targets(cleared, caller);
        if let Ok((b, zeroed)) = &outcome {
            cell.count(op, b.pages, b.failed as u64, *zeroed);
            if let Some(targets) = targets {
                let flush = match (targets, g.as_deref()) {
                    (Targets::Caller, Some(g)) => crate::vm::shootdown::of_guest(g),
                    _ => cell.sharers_flush(),
                };
                // No device sees a batching region: the shootdown alone.
                let _ = flush.commit(&mut Hw(None));
                RegionCell::add(&cell.invalidations, 1);
                // What leaves the cache stays with this CPU until the shootdown is
                // acknowledged (`shootdown::After`).
                v.cache.trim(&crate::vm::shootdown::After(frames));
            }
        }
        // The batches of other vCPUs sharing the lock may still hold it.
        let others = cell.lock.end(held);
        if stopped {
            log::info!(target: "evt", "exmap.abandon guest={guest} vcpu={vcpu} name={name} op={} pages={} guest_state={} held={} shootdown={} cache={}",
                ["alloc", "free"][(op & 1) as usize],
                outcome.as_ref().map_or(0, |(b, _)| b.pages),
                if g.is_some() { "stopped" } else { "gone" },
                others,
                match targets {
                    None => "none",
                    Some(Targets::Caller) => "caller",
                    Some(Targets::Everyone) => "everyone",
                },
                match caller.cache() {
                    Cache::Keep => "keep",
                    Cache::AfterAcks => "after_acks",
                });
        }
        match caller.cache() {
            Cache::Keep => {
                self.vcpus.insert((guest, vcpu), v);
            }
            // Its FREE's frames may still be cached by the CPUs just shot down.
            Cache::AfterAcks => drain(guest, vcpu, &mut v, &crate::vm::shootdown::After(frames)),
        }
        let (b, _) = outcome?;
        log::debug!(target: "exmap", "guest {guest} '{name}' {}: {} pages, {} failed", ["alloc", "free"][(op & 1) as usize], b.pages, b.failed);
        Ok(b.failed as u64)
    }

    /// Prints every region's counters.
    pub fn log_stats<F: morsel::Format>(dir: &Directory<F>) {
        crate::probe::report();
        let (fast, refused) = (FAST_CALLS.load(Ordering::Relaxed), FAST_REFUSED.load(Ordering::Relaxed));
        if fast + refused > 0 {
            log::info!(target: "exmap", "{fast} ALLOC / FREE calls took no world lock (a vCPU's handle to its last region); {refused} handles refused (a change since)");
            log::info!(target: "evt", "exmap.fast calls={fast} refused={refused}");
        }
        for (name, s, c) in dir.named.iter().filter_map(|e| Some((e.name, e.value.region.as_ref()?, e.value.cell?))) {
            let get = RegionCell::get;
            let (calls, allocated, freed, free_calls, invalidations, remote_flushes, zeroed, failed) = (get(&c.calls), get(&c.allocated), get(&c.freed),
                get(&c.free_calls), get(&c.invalidations), get(&c.remote_flushes), get(&c.zeroed), get(&c.failed));
            log::info!(target: "exmap",
                "stats '{name}': {} calls, {} pages allocated, {} freed ({} FREE calls, {} invalidations, {} of them shot down for other guests), {} zeroed, {} failed entries; disk: {} pages read, {} written, {} NVMe commands, up to {} in flight, {} completion interrupts",
                calls, allocated, freed, free_calls, invalidations, remote_flushes, zeroed, failed, s.read, s.written, s.commands, s.max_depth, s.interrupts);
            log::info!(target: "evt",
                "exmap.stats name={name} calls={} allocated={} freed={} free_calls={} invalidations={} remote_flushes={} zeroed={} failed={} read={} written={} commands={} max_depth={} interrupts={}",
                calls, allocated, freed, free_calls, invalidations, remote_flushes, zeroed, failed, s.read, s.written, s.commands, s.max_depth, s.interrupts);
        }
    }
}

/// A vCPU's ExMap state is dropped: its cache goes back through `alloc`. Where its guest
/// ended (`guest_ended`: the allocator), every FREE's shootdown was acknowledged before its
/// vCPU entered the guest again or ended; a batch that ends for a vCPU that cannot keep its
/// state gives `shootdown::After` (`finish_batch`).
fn drain(guest: u32, vcpu: u32, v: &mut VcpuState, frames: &impl morsel::FrameAlloc) {
    let held = v.cache.len();
    v.cache.drain(frames);
    let s = v.cache.stats();
    log::info!(target: "exmap", "guest {guest} vcpu {vcpu}: frame cache drained ({held} frames back); {} bundles in, {} out, {} frames from the allocator, {} back",
        s.refills, s.returns, s.from_allocator, s.to_allocator);
}

/// The ABI code of a failed entry.
fn entry_error(e: EntryError) -> Error {
    match e {
        EntryError::Empty => Error::Invalid,
        EntryError::OutOfRange => Error::BadAddress,
        EntryError::Overflow => Error::TooLarge,
        EntryError::Duplicate => Error::Busy,
        EntryError::NoMemory => Error::NoMemory,
        EntryError::NotPopulated => Error::NotFound,
        EntryError::Device => Error::DeviceFault,
        EntryError::Present => Error::Busy,
        EntryError::PastDisk => Error::TooLarge,
    }
}

/// 512-byte blocks per 4 KiB page.
const PAGE_BLOCKS: u64 = 4096 / abi::NVME_BLOCK;

/// A device view or EPT twin (NPT region mounted into a device domain) follows the region:
/// `page` mapped to `frame` (`Some`) or cleared.
fn follow(views: &crate::iommu::Views, page: u64, frame: Option<HostPhysAddr>) {
    if let Some(view) = &views.vtd {
        let _ = view.set_leaf(page, frame, &IDENTITY);
    }
    for view in [&views.amd, &views.amd_ro].into_iter().flatten() {
        let _ = view.set_leaf(page, frame, &IDENTITY);
    }
    if let Some(twin) = &views.ept {
        let _ = twin.set_leaf(page, frame, &IDENTITY);
    }
}

/// What `disk_io` did.
#[derive(Default)]
struct DiskStats {
    pages: u64,
    failed: u32,
    commands: u64,
    max_depth: u64,
    interrupts: u64,
}

/// A second-level fault at `gpa` that is mapped by the time it is reported, inside a mount
/// that allows the access: the page was unpopulated when the vCPU touched it and another
/// vCPU's ExMap ALLOC populated it again before the report (the report runs after the fault,
/// under the world lock, while sibling batches go on without it).
pub fn describe_refilled<B: Backend>(g: &Guest<B>, gpa: u64, write: bool) -> Option<String> {
    let space = g.space.lock();
    let m = space.mounts.iter().find(|m| m.gpa <= gpa && gpa < m.gpa + m.size && (m.writable || !write))?;
    let off = gpa - m.gpa;
    Some(alloc::format!("page {} (offset {off:#x}) of '{}' (unpopulated at the fault, populated again since)",
        off / 4096, m.name))
}

/// What a second-level fault at `gpa` hit, where the guest has a morsel mounted there:
/// "page N (offset) of 'name', not populated", or past the morsel's end.
pub fn describe_fault<B: Backend>(g: &Guest<B>, gpa: u64) -> Option<String> {
    let space = g.space.lock();
    let m = space.mounts.iter().find(|m| m.gpa <= gpa && gpa < m.gpa + m.window)?;
    let off = gpa - m.gpa;
    Some(if off < m.size {
        alloc::format!("unpopulated page {} (offset {off:#x}) of '{}'", off / 4096, m.name)
    } else {
        alloc::format!("offset {off:#x} past the end of '{}' ({})", m.name, Bytes(m.size))
    })
}
