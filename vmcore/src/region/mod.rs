//! An ExMap region's ALLOC / FREE calls that run with no world lock: the region's cell (its
//! lock, counters and sharers), a vCPU's call state, a batch taken under the world lock, and
//! a vCPU's handle to the region of its last call, which takes the region's lock by CAS with
//! no world lock at all (`Fast`). The table edits themselves are the `exmap` crate's (each
//! leaf by compare-and-swap); the lock is `crate::region_lock`'s; this module is what ties
//! them to a call: the iovec page read and written back, a FREE's one shootdown before the
//! lock is given back, its frames kept until that shootdown is acknowledged, the counters.
//!
//! The hypervisor (`morsels/exmap.rs`) takes the lock under the world lock, builds the
//! [`Batch`] and ends it with or without the world lock; what it lends for that is a
//! [`Machine`]: memory, this CPU's allocator handle and its shootdown. Tested on the host
//! over a simulated machine (`tests.rs`, debug and `--release`).
//!
//! # The order at a batch's end
//!
//! 1. the batch's leaves are edited (FREE: cleared; the frames go to the vCPU's cache);
//! 2. if it cleared anything: ONE shootdown, of the caller's CPUs where nobody else has the
//!    region mounted ([`crate::region_lock::Held::targets`]), else of every CPU of every guest
//!    that mounted it ([`RegionCell::sharers_flush`]); the cache's surplus leaves through
//!    [`Machine::trim`], which keeps the frames until every acknowledgment is in;
//! 3. the region's lock is given back (Release): the next contender admitted sees the edits.
//!
//! The caller's vCPU enters its guest again only after this CPU's acknowledgments arrived (the
//! hypervisor's `shootdown::complete`), so no vCPU reads a freed page after the call returns.

use crate::flush::Flush;
use crate::heap::TryBox;
use crate::memory::DataMem;
use crate::names::Name;
use crate::region_lock::{Cache, Caller, Handle, Held, RegionLock, Targets};
use abi::Error;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use hashbrown::HashMap;
use exmap::{EntryError, FrameCache, Origin, Region, Validator};
use morsel::{FrameAlloc, HostPhysAddr, Morsel};

#[cfg(all(test, not(loom)))]
mod tests;

/// What a batch uses of the CPU it runs on: host-physical memory (the region's tables, the
/// iovec page), this CPU's allocator handle, and its TLB shootdown.
pub trait Machine {
    /// Host-physical memory (the hypervisor's identity map; a simulated machine on the host).
    type Mem: DataMem;
    /// This CPU's allocator handle.
    type Frames: FrameAlloc;
    /// A device domain's name (the flush's; no device sees a batching region).
    type Domain: Copy + Eq;
    fn mem(&self) -> &Self::Mem;
    fn frames(&self) -> &Self::Frames;
    /// Commits `flush` (CPUs only): the IPIs go now; the caller's vCPU waits for the
    /// acknowledgments before it enters its guest again.
    fn shoot(&mut self, flush: Flush<Self::Domain>);
    /// Only this CPU `me` may cache the cleared translations: its local flush.
    fn local(&mut self, me: usize);
    /// Gives back what `cache` holds beyond its reserve, through an allocator that keeps the
    /// frames until every shootdown committed so far is acknowledged.
    fn trim(&mut self, cache: &mut FrameCache);
    /// Gives back every frame `cache` holds, through the allocator that keeps them until every
    /// shootdown committed so far is acknowledged (a vCPU whose guest is gone, or whose state
    /// has no place to go back to).
    fn drain_after(&mut self, cache: &mut FrameCache);
    /// A probe point (the hypervisor's `--probe` build); none by default.
    fn mark(&self, _point: usize) {}
}

/// What one vCPU keeps between calls (no allocation per call).
pub struct VcpuState {
    pub cache: FrameCache,
    pub validator: Validator,
    /// The iovec page's entries, overwritten with their results by the batch (`exmap`),
    /// written back to the guest's page at the end.
    pub iov: Vec<u64>,
    /// READ / WRITE: the entries as the guest wrote them (the results replace them in `iov`),
    /// for the NVMe requests and a failed READ's rollback; the entries to roll back; the
    /// entry each request of an NVMe batch serves.
    pub entries: Vec<u64>,
    pub undo: Vec<u64>,
    pub owners: Vec<usize>,
}

impl VcpuState {
    /// A vCPU's state, on the heap, made at its first call (`ready` then gives the buffers
    /// their room): `NoMemory`, never the allocation panic.
    pub fn try_new() -> Result<TryBox<Self>, Error> {
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

    /// Room for a whole batch in the buffers a READ / WRITE in flight takes along (another
    /// vCPU's call meanwhile finds them empty): `NoMemory`, never the allocation panic.
    pub fn ready(&mut self) -> Result<(), Error> {
        let n = exmap::MAX_ENTRIES;
        for b in [&mut self.iov, &mut self.entries, &mut self.undo] {
            b.try_reserve(n.saturating_sub(b.len())).map_err(|_| Error::NoMemory)?;
        }
        self.owners.try_reserve(n.saturating_sub(self.owners.len())).map_err(|_| Error::NoMemory)?;
        Ok(())
    }
}

/// The ABI code of a failed entry.
#[inline]
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

/// The result the guest reads for a failed entry: the ABI's (negative) error number.
#[inline]
pub fn code(e: EntryError) -> u64 {
    entry_error(e) as i64 as u64
}

/// Whether an entry's result in the iovec page is a success (a page count).
pub fn succeeded(result: u64) -> bool {
    (result as i64) >= 0
}

/// A region's counters as read now (`RegionCell::counts`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub calls: u64,
    pub free_calls: u64,
    pub allocated: u64,
    pub freed: u64,
    pub zeroed: u64,
    pub failed: u64,
    pub invalidations: u64,
    pub remote_flushes: u64,
}

/// What an ExMap region's ALLOC / FREE batches reach with the world lock let go: the
/// region's lock (`crate::region_lock`) and the counters they change (atomics, `Relaxed`:
/// counters, read under the world lock by `exmap_info` and the stats). One per directory
/// slot in the hypervisor, a region's is its slot's; reset when a region enters the slot.
pub struct RegionCell {
    pub lock: RegionLock,
    calls: AtomicU64,
    free_calls: AtomicU64,
    allocated: AtomicU64,
    freed: AtomicU64,
    zeroed: AtomicU64,
    failed: AtomicU64,
    invalidations: AtomicU64,
    remote_flushes: AtomicU64,
    /// The CPUs of every guest that mounted the region since it entered the slot
    /// (`mounted_by`, OR-ed in under the directory's lock, SeqCst; never cleared until the
    /// slot's next region): a superset of the CPUs that may cache its translations, what a
    /// FREE where others have it mounted shoots down (`sharers_flush`) instead of every CPU
    /// that ran any guest.
    sharers: AtomicU64,
}

impl Default for RegionCell {
    fn default() -> Self {
        Self::new()
    }
}

impl RegionCell {
    pub fn new() -> Self {
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

    /// A guest whose vCPUs are placed on `cpus` mounted the region: they join its sharers.
    pub fn mounted_by(&self, cpus: u64) {
        self.sharers.fetch_or(cpus, Ordering::SeqCst);
    }

    /// The shootdown of a batch where others have the region mounted (or its caller is
    /// gone): the CPUs of every guest that mounted it (each of them did, the caller too,
    /// before any batch that this shootdown ends; a mount is admitted only while no batch
    /// holds the region, and refuses every fast handle made before it), or, where none is
    /// known, every CPU that ran any guest.
    pub fn sharers_flush<D: Copy + Eq>(&self) -> Flush<D> {
        Self::add(&self.remote_flushes, 1);
        match self.sharers.load(Ordering::SeqCst) {
            0 => Flush::every_guest_cpu(),
            cpus => Flush::cpus(cpus),
        }
    }

    /// Counters from zero for a new region (under the world lock; the lock is free), and a
    /// new generation: a `Fast` handle to the slot's previous region is refused.
    pub fn reset(&self) {
        self.lock.changed();
        self.lock.forget_turn();
        for c in [&self.calls, &self.free_calls, &self.allocated, &self.freed, &self.zeroed, &self.failed, &self.invalidations, &self.remote_flushes, &self.sharers] {
            c.store(0, Ordering::Relaxed);
        }
    }

    #[inline]
    fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// One call's counts: `op`, its pages, failed entries, frames zeroed.
    #[inline]
    pub fn count(&self, op: u64, pages: u64, failed: u64, zeroed: u64) {
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

    /// `n` more invalidations (a shootdown, or device domains' IOTLBs).
    #[inline]
    pub fn invalidated(&self, n: u64) {
        Self::add(&self.invalidations, n);
    }

    /// The counters now.
    pub fn counts(&self) -> Counts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            calls: get(&self.calls),
            free_calls: get(&self.free_calls),
            allocated: get(&self.allocated),
            freed: get(&self.freed),
            zeroed: get(&self.zeroed),
            failed: get(&self.failed),
            invalidations: get(&self.invalidations),
            remote_flushes: get(&self.remote_flushes),
        }
    }
}

/// Calls that took the region's lock with a `Fast` handle (no world lock), and those whose
/// handle was refused (a change since, or too many batches held the lock).
static FAST_CALLS: AtomicU64 = AtomicU64::new(0);
static FAST_REFUSED: AtomicU64 = AtomicU64::new(0);

/// (calls that took no world lock, handles refused) so far.
pub fn fast_counts() -> (u64, u64) {
    (FAST_CALLS.load(Ordering::Relaxed), FAST_REFUSED.load(Ordering::Relaxed))
}

/// One ALLOC / FREE call as checked under the world lock: `op` of `count` entries (at most
/// `exmap::MAX_ENTRIES`) on the region mounted read-write at `gpa`, with the iovec page at
/// `iov_gpa` (aligned, in the caller's RAM, translated to `iov_hpa`: it stays while the
/// calling vCPU lives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    pub op: u64,
    pub count: usize,
    pub gpa: u64,
    pub iov_gpa: u64,
    pub iov_hpa: u64,
}

/// Who calls: the guest, its vCPU and the region's name (for the handle's check and logs).
#[derive(Clone, Copy)]
pub struct Who {
    pub name: Name,
    pub guest: u32,
    pub vcpu: u32,
}

/// What a batch did (pages, failed entries, frames zeroed), or why it did nothing.
pub type Outcome = Result<(exmap::BatchStats, u64), Error>;

/// An ALLOC or FREE batch run with the world lock let go ([`Batch::run`]), ended with no
/// world lock ([`Batch::finish_alone`]) or under it ([`States::end_batch`]). It holds the region's
/// lock, shared with other batches, and the calling vCPU's own `VcpuState`: nothing in it is
/// reached by another CPU (the region's leaves are, by compare-and-swap).
pub struct Batch<F: morsel::Format> {
    /// The region's lock, given back by `finish_alone` or `end` only.
    held: Held,
    /// The region's cell (its lock and batch counters).
    cell: &'static RegionCell,
    /// A descriptor of the region's subtree (`Morsel::alias`); the region cannot be
    /// destroyed, device-mounted or batched exclusively by another call while `held`.
    morsel: Morsel<F>,
    origin: Origin,
    v: TryBox<VcpuState>,
    call: Call,
    who: Who,
    /// What the batch did, or why it did nothing (`Invalid` until it ran).
    outcome: Outcome,
}

/// `Batch::run` on its parts, borrowed (the lock-free path runs it in place, `Fast::call`):
/// reads the iovec page, validates and edits the leaves in one walk (`exmap`), writes the
/// results back. Frames come from and go to the vCPU's cache; a FREE's frames stay in it
/// until the batch's end has shot the translations down.
#[inline(always)]
fn run_batch<F: morsel::Format, M: Machine>(v: &mut VcpuState, morsel: &Morsel<F>, origin: Origin, call: &Call, m: &M) -> Outcome {
    let count = call.count.min(exmap::MAX_ENTRIES);
    // SAFETY: `iov_hpa` is a 4 KiB-aligned page of the caller's guest RAM (checked and
    // translated read-write under the world lock), which stays while the calling vCPU lives
    // (it is in this call). Sibling vCPUs may write it meanwhile: `GuestBytes` copies word by
    // word through raw pointers, never a reference.
    let page = unsafe { m.mem().bytes(HostPhysAddr::new(call.iov_hpa), 4096) };
    v.iov.clear();
    // Within the capacity `ready` made sure of: no allocation; count <= 512 words, inside the
    // page (an aligned page: never refused).
    v.iov.extend(page.words_volatile(0, count).map_err(|_| Error::BadAddress)?);
    if call.op == abi::EXMAP_FREE {
        let pages: u64 = v.iov.iter().map(|&e| exmap::decode(e).1).sum();
        if v.cache.reserve(pages as usize).is_err() {
            return Err(Error::NoMemory);
        }
    }
    let zeroed0 = v.cache.stats().zeroed;
    let region = Region { morsel, origin, mem: m.mem() };
    let (iov, val, cache) = (&mut v.iov, &mut v.validator, &mut v.cache);
    let b = match call.op {
        abi::EXMAP_ALLOC => exmap::alloc(&region, iov, val, cache, m.frames(), &mut |_, _| {}, code),
        _ => exmap::free(&region, iov, val, cache, &mut |_, _| {}, code),
    };
    let _ = page.write_words(0, &v.iov[..count.min(v.iov.len())]);
    Ok((b, v.cache.stats().zeroed - zeroed0))
}

/// Whether a batch's outcome cleared leaves (a FREE of some page, or an ALLOC rolled back):
/// a shootdown is owed.
#[inline]
fn cleared(op: u64, b: &exmap::BatchStats) -> bool {
    op == abi::EXMAP_FREE && b.pages > 0 || b.rolled_back > 0
}

/// `Batch::finish_alone` on its parts (the lock-free path ends its batch in place,
/// `Fast::call`): the shootdown of a batch that cleared leaves (`guest_cpus`: the CPUs that
/// ran the caller's vCPUs, read only if needed; only this CPU `me`: its local flush), the
/// counters, the region's lock given back. Returns the failed-entry count.
#[allow(clippy::too_many_arguments)]
fn end_alone<M: Machine>(held: Held, cell: &RegionCell, v: &mut VcpuState, op: u64, done: (exmap::BatchStats, u64), who: &Who, me: usize,
    guest_cpus: impl FnOnce() -> u64, m: &mut M) -> u64 {
    let (b, zeroed) = done;
    let (pages, failed) = (b.pages, b.failed as u64);
    if let Some(targets) = held.targets(cleared(op, &b), Caller::Stays) {
        let flush = match targets {
            Targets::Caller => match guest_cpus() {
                // The caller's guest ran on this CPU alone: its local flush, as
                // `Flush::commit` would do it, without building one.
                cpus if cpus & !(1 << me) == 0 => None,
                cpus => Some(Flush::cpus(cpus)),
            },
            Targets::Everyone => Some(cell.sharers_flush()),
        };
        match flush {
            Some(flush) => m.shoot(flush),
            None => m.local(me),
        }
        cell.invalidated(1);
        m.trim(&mut v.cache);
    }
    cell.count(op, pages, failed, zeroed);
    cell.lock.end(held);
    log::debug!(target: "exmap", "guest {} '{}' {}: {pages} pages, {failed} failed", who.guest, who.name, ["alloc", "free"][(op & 1) as usize]);
    failed
}

impl<F: morsel::Format> Batch<F> {
    /// A batch of `call` by `who` on the region whose lock `held` is (taken under the world
    /// lock from `cell`), its subtree `morsel` (an alias) at `origin`, with the vCPU's state
    /// `v`; not run yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(held: Held, cell: &'static RegionCell, morsel: Morsel<F>, origin: Origin, v: TryBox<VcpuState>, call: Call, who: Who) -> Self {
        Batch { held, cell, morsel, origin, v, call, who, outcome: Err(Error::Invalid) }
    }

    /// The batch, no lock held but the region's.
    pub fn run(&mut self, m: &impl Machine) {
        self.outcome = run_batch(&mut self.v, &self.morsel, self.origin, &self.call, m);
    }

    /// Ends the batch with the world lock let go, where nothing shared needs it: the batch
    /// succeeded and its vCPU goes on (the caller checked that no stop reached this CPU). A
    /// batch that cleared leaves shoots down ONCE (`Held::targets` from the mounts counted at
    /// the take: `guest_cpus`, the CPUs that ran the caller's vCPUs, read now (only this CPU
    /// `me`: its local flush), or the CPUs of every guest that mounted the region,
    /// `RegionCell::sharers_flush`), then the region's lock is given back (Release: the next
    /// one admitted under the world lock sees the edits).
    /// Returns the failed-entry count, the vCPU's state (its slot keeps it until its next
    /// world lock) and the region's handle for the vCPU's next call (`Fast`); the caller
    /// settles this CPU's shootdown before the vCPU enters its guest again. The batch comes
    /// back untouched where it failed ([`States::end_batch`] reports it).
    #[allow(clippy::result_large_err)] // the batch moves back once, on the rare fallback; boxing would allocate
    pub fn finish_alone(self, me: usize, guest_cpus: impl FnOnce() -> u64, m: &mut impl Machine) -> Result<(u64, Parked, Fast<F>), Self> {
        let Ok(done) = self.outcome else { return Err(self) };
        let Batch { held, cell, morsel, origin, mut v, call, who, .. } = self;
        let handle = held.handle();
        let failed = end_alone(held, cell, &mut v, call.op, done, &who, me, guest_cpus, m);
        let fast = Fast { cell, handle, morsel, origin, call, who };
        Ok((failed, Parked { v, guest: who.guest, vcpu: who.vcpu }, fast))
    }

    /// Ends the batch under the world lock (where `finish_alone` could not: the caller's
    /// guest stopped or gone, or the batch failed): a batch that cleared leaves shoots down
    /// ONCE (`Held::targets`: the caller's CPUs, `caller_flush()`, or every CPU of every guest
    /// that mounted the region), the cache's surplus leaves through `Machine::trim`, then the
    /// region's lock is given back. `caller`: whether the vCPU keeps its state
    /// ([`Caller::Stays`]) or not (its guest gone, or no room for it). Returns that state
    /// beside the report ([`States::end_batch`] puts it back or drains it).
    fn end<M: Machine>(self, caller: Caller, caller_flush: impl FnOnce() -> Flush<M::Domain>, m: &mut M) -> (TryBox<VcpuState>, EndedBatch) {
        let Batch { held, cell, mut v, call, who, outcome, .. } = self;
        let op = call.op;
        let targets = held.targets(matches!(&outcome, Ok((b, _)) if cleared(op, b)), caller);
        if let Ok((b, zeroed)) = &outcome {
            cell.count(op, b.pages, b.failed as u64, *zeroed);
            if let Some(targets) = targets {
                let flush = match targets {
                    Targets::Caller => caller_flush(),
                    Targets::Everyone => cell.sharers_flush(),
                };
                m.shoot(flush);
                cell.invalidated(1);
                m.trim(&mut v.cache);
            }
        }
        // The batches of other vCPUs sharing the lock may still hold it.
        let others = cell.lock.end(held);
        (v, EndedBatch { who, op, outcome, others, targets, cache: caller.cache() })
    }
}

/// A vCPU's handle to the region of its last ALLOC / FREE (kept in its slot), made where a
/// batch taken under the world lock ended alone: the region's cell and generation
/// (`crate::region_lock::Handle`, with the guest mounts counted then), and what that call
/// checked under the world lock: the guest's read-write mount at `gpa`, the iovec page at
/// `iov_gpa` (aligned, guest RAM, translated to `iov_hpa`). The next call on the same region
/// with the same iovec page takes the region's lock with it, no world lock (`Fast::call`):
/// only while the generation is unchanged, so that mount is still there (an unmount bumps
/// it), the region was not destroyed and its slot not reused (destroy and `exmap_create`
/// bump it), and no device saw it since (a device mount or NVMe batch bumps it). Anything
/// else goes to the world path, which answers as before.
pub struct Fast<F: morsel::Format> {
    cell: &'static RegionCell,
    handle: Handle,
    /// The region's subtree (`Morsel::alias`): dereferenced only while `handle` takes the
    /// lock (the region then exists and cannot be destroyed).
    morsel: Morsel<F>,
    origin: Origin,
    /// The call that made the handle (its `op` and `count` are not the next call's).
    call: Call,
    who: Who,
}

/// What `Fast::call` did.
#[allow(clippy::large_enum_variant)] // `Locked` is the rare fallback; boxing would allocate
pub enum FastCall<F: morsel::Format> {
    /// Not taken, nothing changed: the world path handles the call.
    NotTaken,
    /// Run and ended in place, no world lock: the failed-entry count, the guest's answer. The
    /// caller settles this CPU's shootdown before the next entry.
    Ended(u64),
    /// Run, but it ends under the world lock ([`States::end_batch`]): it failed, or a stop reached
    /// this CPU meanwhile. The vCPU's state went into the batch.
    Locked(Batch<F>),
}

impl<F: morsel::Format> Fast<F> {
    /// `exmap_action(gpa, iov_gpa, count, op)` (ALLOC or FREE) with no world lock, run and
    /// ended in place with the vCPU's state `parked` (none: `NotTaken`): no `Batch` is built
    /// and nothing large moved per call (Bochs counts every byte a move copies). The batch is
    /// `Batch::run`'s, and it ends as `Batch::finish_alone` ends it (`me`, `guest_cpus`: the
    /// shootdown's) where it succeeded and `stopped` (asked after the batch ran) says no stop
    /// reached this CPU; otherwise it ends under the world lock (`Locked`). The handle
    /// stays: a fast take leaves the generation as it was. `NotTaken` where the call does not
    /// name this handle's region and iovec page or the lock is not taken by CAS at the
    /// handle's generation (`RegionLock::take_fast`): the first call on a region, another
    /// iovec page, a change since (batches of other vCPUs holding the lock do not refuse it).
    #[allow(clippy::too_many_arguments)]
    pub fn call<M: Machine>(&self, parked: &mut Option<Parked>, gpa: u64, iov_gpa: u64, op: u64, count: u64, m: &mut M,
        stopped: impl FnOnce() -> bool, me: usize, guest_cpus: impl FnOnce() -> u64) -> FastCall<F> {
        // `Parked` is a box and two numbers: taking it out and back copies 16 bytes.
        let Some(mut p) = parked.take() else { return FastCall::NotTaken };
        let Some(held) = self.take(&p, gpa, iov_gpa) else {
            *parked = Some(p);
            return FastCall::NotTaken;
        };
        m.mark(2);
        let call = Call { op, count: (count as usize).min(exmap::MAX_ENTRIES), ..self.call };
        let outcome = run_batch(&mut p.v, &self.morsel, self.origin, &call, m);
        m.mark(3);
        match outcome {
            Ok(done) if !stopped() => {
                let failed = end_alone(held, self.cell, &mut p.v, op, done, &self.who, me, guest_cpus, m);
                *parked = Some(p);
                FastCall::Ended(failed)
            }
            outcome => FastCall::Locked(Batch { outcome, ..Batch::new(held, self.cell, self.morsel.alias(), self.origin, p.v, call, self.who) }),
        }
    }

    /// The region's lock for a call on `gpa` with the iovec page `iov_gpa` by the vCPU whose
    /// state is `p`: where they are this handle's and the lock is taken by CAS at its
    /// generation (`RegionLock::take_fast`).
    fn take(&self, p: &Parked, gpa: u64, iov_gpa: u64) -> Option<Held> {
        if gpa != self.call.gpa || iov_gpa != self.call.iov_gpa || p.guest != self.who.guest || p.vcpu != self.who.vcpu {
            return None;
        }
        let Some(held) = self.cell.lock.take_fast(&self.handle) else {
            FAST_REFUSED.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        FAST_CALLS.fetch_add(1, Ordering::Relaxed);
        Some(held)
    }
}

/// A vCPU's ExMap state after a batch ended alone (`Batch::finish_alone`): kept in the vCPU's
/// slot until its next world-path exit or its end puts it back (the hypervisor's
/// `Exmaps::unpark`; a slice's start under the world lock leaves it there). Nothing in
/// it is reached by another CPU.
pub struct Parked {
    pub v: TryBox<VcpuState>,
    pub guest: u32,
    pub vcpu: u32,
}

/// Every vCPU's ExMap state while it is neither in a batch ([`Batch`]) nor parked in its slot
/// ([`Parked`]), keyed by (guest, vCPU index). The hypervisor keeps it under the world lock;
/// a vCPU's entry is looked for only by that vCPU's own calls and by its guest's end.
#[derive(Default)]
pub struct States {
    vcpus: HashMap<(u32, u32), TryBox<VcpuState>>,
}

/// How a batch ended under the world lock ([`States::end_batch`]), for the hypervisor's report.
pub struct EndedBatch {
    pub who: Who,
    pub op: u64,
    pub outcome: Outcome,
    /// The batches that still held the region's lock after this one gave it back.
    pub others: u64,
    /// Whom the shootdown reached (None: it cleared nothing).
    pub targets: Option<Targets>,
    /// Where the vCPU's state went: back in its place, or drained after the acknowledgments.
    pub cache: Cache,
}

impl States {
    pub fn new() -> Self {
        States { vcpus: HashMap::new() }
    }

    /// The state of guest `guest`'s vCPU `vcpu`, made at its first call (a few KiB), with room
    /// for a whole batch in its buffers: `NoMemory`, never the allocation panic.
    pub fn ready(&mut self, guest: u32, vcpu: u32) -> Result<&mut VcpuState, Error> {
        // Room for a new entry (a capacity check when there is), so the insert below never
        // allocates; one hash for find-or-insert.
        self.vcpus.try_reserve(1).map_err(|_| Error::NoMemory)?;
        let v = match self.vcpus.entry((guest, vcpu)) {
            hashbrown::hash_map::Entry::Occupied(e) => e.into_mut(),
            hashbrown::hash_map::Entry::Vacant(e) => e.insert(VcpuState::try_new()?),
        };
        v.ready()?;
        Ok(v)
    }

    /// The state of guest `guest`'s vCPU `vcpu`, where it is in its place.
    pub fn get_mut(&mut self, guest: u32, vcpu: u32) -> Option<&mut VcpuState> {
        self.vcpus.get_mut(&(guest, vcpu)).map(|v| &mut **v)
    }

    /// Takes the state out for a [`Batch`] (its place stays empty until the batch ends).
    pub fn take(&mut self, guest: u32, vcpu: u32) -> Option<TryBox<VcpuState>> {
        self.vcpus.remove(&(guest, vcpu))
    }

    /// A state parked in its vCPU's slot since its batch ended alone comes back: into its
    /// place where its guest is `alive` and there is room, else every frame of its cache
    /// through [`Machine::drain_after`] (the FREE that put them there may still be cached by
    /// the CPUs it shot down).
    pub fn unpark(&mut self, p: Parked, alive: bool, m: &mut impl Machine) {
        let Parked { mut v, guest, vcpu } = p;
        if alive && self.vcpus.try_reserve(1).is_ok() {
            self.vcpus.insert((guest, vcpu), v);
        } else {
            drain(guest, vcpu, &mut v, |c| m.drain_after(c));
        }
    }

    /// Guest `id` ended: its vCPUs' caches go back to the allocator (every FREE's shootdown
    /// was acknowledged before its vCPU entered the guest again or ended).
    pub fn guest_ended(&mut self, id: u32, m: &impl Machine) {
        self.vcpus.retain(|&(guest, vcpu), v| {
            if guest == id {
                drain(id, vcpu, v, |c| c.drain(m.frames()));
            }
            guest != id
        });
    }

    /// Ends `batch` under the world lock (`Batch::end`, where [`Batch::finish_alone`] could
    /// not: its guest stopped or gone, or it failed): `alive` says whether the caller's guest
    /// still exists (`caller_flush`: its CPUs' shootdown). The vCPU's state goes back into its
    /// place where the guest exists and there is room (fallible, no other allocation), else
    /// its cache through [`Machine::drain_after`].
    pub fn end_batch<F: morsel::Format, M: Machine>(&mut self, batch: Batch<F>, alive: bool, caller_flush: impl FnOnce() -> Flush<M::Domain>, m: &mut M) -> EndedBatch {
        let caller = match alive && self.vcpus.try_reserve(1).is_ok() {
            true => Caller::Stays,
            false => Caller::Gone,
        };
        let (mut v, ended) = batch.end(caller, caller_flush, m);
        let Who { guest, vcpu, .. } = ended.who;
        match ended.cache {
            Cache::Keep => {
                self.vcpus.insert((guest, vcpu), v);
            }
            // Its FREE's frames may still be cached by the CPUs just shot down.
            Cache::AfterAcks => drain(guest, vcpu, &mut v, |c| m.drain_after(c)),
        }
        ended
    }
}

/// A vCPU's state is dropped: its cache goes back (`give`), with a line in the log.
fn drain(guest: u32, vcpu: u32, v: &mut VcpuState, give: impl FnOnce(&mut FrameCache)) {
    let held = v.cache.len();
    give(&mut v.cache);
    let s = v.cache.stats();
    log::info!(target: "exmap", "guest {guest} vcpu {vcpu}: frame cache drained ({held} frames back); {} bundles in, {} out, {} frames from the allocator, {} back",
        s.refills, s.returns, s.from_allocator, s.to_allocator);
}
