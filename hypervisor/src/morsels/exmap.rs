//! ExMap in the hypervisor: `exmap_create` makes a region (a sparse morsel in the morsel
//! directory, so it is opened, shared read-only or read-write, device-mounted and destroyed
//! like any morsel), `exmap_action` runs one batch of up to 512 iovec entries over it
//! (ALLOC, FREE, READ and WRITE through the NVMe disk), `exmap_info` reads its counters.
//! The host-tested core (validation, frame cache, table edits) is the `exmap` crate; an
//! ALLOC / FREE batch with no world lock (the region's cell, a vCPU's state, the `Batch`, its
//! end alone, the `Fast` handle) is `vmcore::region`, also host-tested: this file takes the
//! region's lock under the world lock, builds the batch, ends it there where it must, and
//! lends it this CPU (`Here`: the identity map, the allocator handle, the shootdown).
//!
//! Per vCPU: a frame cache, a validator and result buffers (`VcpuState`), keyed by (guest,
//! vCPU) (`vmcore::region::States`, which also ends a batch under the world lock and drains
//! a gone vCPU's cache). ALLOC and FREE on a region no device sees run with the world lock let go, under the
//! region's lock, which they share (several vCPUs' batches on one region at once; each leaf
//! changed by compare-and-swap in `exmap`) (`Unlocked::Batch`, its `Deferred::run`, then
//! `Batch::finish_alone` with no world lock
//! or `Exmaps::finish_batch` under it; the lock order is in `vm/sched.rs`); the region's lock
//! and batch counters are its `RegionCell`, the rest of ExMap's state is behind the world
//! lock (a vCPU's own state in its slot between a batch ended alone and its next world-path exit,
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
use crate::mm::frames::{Frames, Identity, IDENTITY};
use crate::devices::pci::Bdf;
use alloc::string::String;
use alloc::vec::Vec;
use crate::devices::nvme::{IoError, Request};
use exmap::{EntryError, FrameCache, Origin, Region};
use super::DiskBatch;
use formats::units::Bytes;
use abi::{self, Error};
use morsel::{GuestPhysAddr, HostPhysAddr, Morsel, Perm};
use vmcore::hypercall::{self, Deferred};
use vmcore::region::{code, succeeded, Call, EndedBatch, States, VcpuState, Who};
pub use vmcore::region::{Batch, Fast, FastCall, Parked, RegionCell};
use vmcore::region_lock::{Cache, Contender, Refusal, Targets};

const _: () = assert!(exmap::MAX_ENTRIES as u64 == abi::EXMAP_MAX_ENTRIES);
const _: () = assert!(exmap::MAX_COUNT == abi::EXMAP_MAX_COUNT);
const _: () = assert!(exmap::encode(5, 9) == abi::exmap_entry(5, 9));

/// This CPU as an ALLOC / FREE batch sees it (`vmcore::region::Machine`): the identity map,
/// its allocator handle, its shootdown (`Flush::commit` with no device: no device sees a
/// batching region), and the frames a FREE trimmed kept until the acknowledgments
/// (`shootdown::After`).
pub struct Here(pub Frames);

impl vmcore::region::Machine for Here {
    type Mem = Identity;
    type Frames = Frames;
    type Domain = Bdf;

    fn mem(&self) -> &Identity {
        &IDENTITY
    }

    fn frames(&self) -> &Frames {
        &self.0
    }

    fn shoot(&mut self, flush: Flush) {
        let _ = flush.commit(&mut Hw(None));
    }

    fn local(&mut self, me: usize) {
        crate::vm::shootdown::local(me);
    }

    fn trim(&mut self, cache: &mut FrameCache) {
        cache.trim(&crate::vm::shootdown::After(&self.0));
    }

    fn drain_after(&mut self, cache: &mut FrameCache) {
        cache.drain(&crate::vm::shootdown::After(&self.0));
    }

    fn mark(&self, point: usize) {
        crate::probe::mark(point);
    }
}

/// An ALLOC / FREE batch, deferred (`Unlocked::Batch`): run with the world lock let go, then
/// ended with no world lock (`Batch::finish_alone`, `sched`) or under it
/// (`Exmaps::finish_batch`, its guest there or gone).
impl<B: Backend> Deferred<Hv<B>> for Batch<B::Format> {
    /// The batch, no lock held but the region's: reads the iovec page, validates and edits
    /// the leaves in one walk (`exmap`), writes the results back. Frames come from and go to
    /// this vCPU's cache (`frames` is this CPU's allocator handle, the vCPU loop's `percpu::of(me).frames()`); a FREE's frames stay in
    /// that cache until the batch's shootdown, so none is reused before.
    fn run(&mut self, frames: &Frames) {
        Batch::run(self, &Here(*frames));
    }

    fn finish(self, w: Under<'_, B>, g: &mut Guest<B>) -> Result<u64, Error> {
        w.cx.exmaps.finish_batch(Some(g), self)
    }

    fn abandon(self, w: Under<'_, B>) {
        let _ = w.cx.exmaps.finish_batch::<B>(None, self);
    }
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
        cx.exmaps.finish(&mut cx.morsels.lock(), cx.devices.as_mut(), Some(g), self)
    }

    fn abandon(self, w: Under<'_, B>) {
        let cx = w.cx;
        let _ = cx.exmaps.finish::<B>(&mut cx.morsels.lock(), cx.devices.as_mut(), None, self);
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

/// ExMap's state for the run (a region's own counters are in its directory entry and cell).
pub struct Exmaps {
    /// Per vCPU, keyed by (guest, vCPU index); a vCPU's entry is out of the map while its
    /// `Batch` runs or while it is parked in its slot (`vmcore::region::States`).
    states: States,
    next_id: Origin,
}

impl Default for Exmaps {
    fn default() -> Self {
        Self::new()
    }
}

impl Exmaps {
    pub fn new() -> Self {
        Exmaps { states: States::new(), next_id: 1 }
    }

    /// `exmap_create(name_ptr, name_len, size, flags)`: the name is reserved like every
    /// morsel's (`Busy` if it exists or another create holds it, `NoMemory` past the guest's
    /// `MORSEL_QUOTA`, which counts regions and morsels together), then committed with the
    /// region's counters; its mount counts in `MOUNT_QUOTA`.
    #[allow(clippy::too_many_arguments)]
    pub fn create<B: Backend>(&mut self, dir: &mut Directory<B::Format>, g: &mut Guest<B>, name: abi::Name, size: u64, share_writable: bool) -> Result<u64, Error> {
        let frames = &Frames::here();
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
        let gpa = dir.add_region(g, ticket, m, share_writable, RegionStats { id, ..Default::default() })?;
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
    pub fn action<B: Backend>(&mut self, dir: &mut Directory<B::Format>, mut devices: Option<&mut crate::devices::Devices>, g: &mut Guest<B>, vcpu: u32, gpa: u64, iov_gpa: u64, count: u64, op: abi::ExmapOp) -> Result<hypercall::Outcome<Unlocked<B::Format>>, Error> {
        let frames = &Frames::here();
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
        // Made once per vCPU (its buffers and cache, a few KiB), with room for a whole batch.
        let v = self.states.ready(g.id, vcpu)?;
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
            let Some(v) = self.states.take(g.id, vcpu) else {
                cell.lock.end(held);
                return Err(Error::NoMemory);
            };
            let call = Call { op, count, gpa, iov_gpa, iov_hpa: iov_hpa.as_u64() };
            let who = Who { name, guest: g.id, vcpu };
            return Ok(hypercall::Outcome::Defer(Unlocked::Batch(Batch::new(held, cell, n.morsel.alias(), id, v, call, who))));
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
            return Ok(hypercall::Outcome::Answer(Ok(self.conclude(dir, devices, Some(g), rest))));
        }
        // The device reads into (READ) or from (WRITE) the entries' frames, with the world
        // lock let go: the region is pinned meanwhile (`Named::in_io`), so no FREE, READ,
        // destroy or other batch (of this guest's other vCPUs or of a sharer) touches its
        // pages until `finish`.
        let write = op == abi::EXMAP_WRITE;
        let mut batch = match devices.as_deref_mut() {
            Some(d) => dir.disk_begin(d, &rest.name, write, false),
            None => Err(Error::NotFound),
        };
        let Some(v) = self.states.get_mut(g.id, vcpu) else { return Err(Error::NoMemory) };
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
                Ok(hypercall::Outcome::Answer(Ok(self.conclude(dir, devices, Some(g), rest))))
            }
        }
    }

    /// Ends a READ or WRITE whose disk I/O ran (under the world lock again): the region
    /// leaves the NVMe domain and is unpinned, each entry gets its outcome, a failed READ
    /// is rolled back. `g` is None where the caller's guest is gone: then its cache is
    /// drained here too, and no result is written.
    pub fn finish<B: Backend>(&mut self, dir: &mut Directory<B::Format>, mut devices: Option<&mut crate::devices::Devices>, g: Option<&mut Guest<B>>, io: ExmapIo) -> Result<u64, Error> {
        let ExmapIo { batch, mut iov, entries, owners, mut rest } = io;
        let write = batch.write;
        let faulted = dir.disk_end(devices.as_deref_mut(), &batch);
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
        if let Some(v) = self.states.get_mut(guest, rest.vcpu) {
            (v.iov, v.entries, v.owners) = (iov, entries, owners);
        }
        let r = self.conclude(dir, devices, g, rest);
        if gone {
            self.guest_ended(guest);
        }
        Ok(r)
    }

    /// The end of an action, under the lock: a failed READ's rollback, the shootdown of a
    /// FREE, the counters, the results into the iovec page (`v.iov`).
    fn conclude<B: Backend>(&mut self, dir: &mut Directory<B::Format>, devices: Option<&mut crate::devices::Devices>, mut g: Option<&mut Guest<B>>, rest: Rest) -> u64 {
        let frames = &Frames::here();
        let Rest { op, mut b, zeroed0, count, iov_gpa, name, guest, vcpu, disk: d } = rest;
        let (Some(v), Some(n)) = (self.states.get_mut(guest, vcpu), dir.named.get_mut(&name)) else {
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
            cell.invalidated(1);
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
                cell.invalidated(flushed as u64);
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
        let c = c.counts();
        match what {
            abi::EXMAP_INFO_POPULATED => Ok(c.allocated.saturating_sub(c.freed)),
            abi::EXMAP_INFO_CALLS => Ok(c.calls),
            abi::EXMAP_INFO_INVALIDATIONS => Ok(c.invalidations),
            abi::EXMAP_INFO_ALLOCATED => Ok(c.allocated),
            abi::EXMAP_INFO_FREED => Ok(c.freed),
            abi::EXMAP_INFO_ZEROED => Ok(c.zeroed),
            abi::EXMAP_INFO_FAILED => Ok(c.failed),
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
    /// `here`: this CPU (the vCPU loop's `Here(percpu::of(me).frames())`: it runs at every
    /// world-lock exit of a vCPU that parked, so it reads no APIC ID).
    pub fn unpark(&mut self, p: Parked, alive: bool, here: &mut Here) {
        self.states.unpark(p, alive, here);
    }

    /// A guest ended: its vCPUs' caches go back to the allocator.
    pub fn guest_ended(&mut self, id: u32) {
        self.states.guest_ended(id, &Here(Frames::here()));
    }

    /// Ends an ALLOC / FREE `Batch` under the world lock (where `Batch::finish_alone` could
    /// not: the caller's guest stopped or gone, or the batch failed): a FREE that cleared
    /// pages shoots down ONCE (`Held::targets`: the caller's CPUs, or every CPU that ran a
    /// guest where others had the region mounted at the take, none since), then the
    /// region's lock is given back; its counters; the vCPU's state back in place. `g` is None
    /// where the caller's guest is gone: the vCPU's cache then goes through this CPU's
    /// `Owed`, freed once the shootdown is acknowledged.
    pub fn finish_batch<B: Backend>(&mut self, g: Option<&mut Guest<B>>, batch: Batch<B::Format>) -> Result<u64, Error> {
        // Stopped (by a sibling vCPU or the hypervisor) or gone while the batch ran: the
        // guest never reads the results; reported once per such batch (`exmap.abandon`).
        let stopped = g.as_deref().is_none_or(|g| g.state != crate::vm::guest::State::Runnable);
        // The caller's CPUs (`Targets::Caller` comes only with a caller that stays, so with
        // its guest); what leaves the cache stays with this CPU until the shootdown is
        // acknowledged (`Here::trim`, `Here::drain_after`).
        let caller_flush = || g.as_deref().map_or_else(Flush::every_guest_cpu, crate::vm::shootdown::of_guest);
        let EndedBatch { who, op, outcome, others, targets, cache } = self.states.end_batch(batch, g.is_some(), caller_flush, &mut Here(Frames::here()));
        let Who { name, guest, vcpu } = who;
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
                match cache {
                    Cache::Keep => "keep",
                    Cache::AfterAcks => "after_acks",
                });
        }
        let (b, _) = outcome?;
        log::debug!(target: "exmap", "guest {guest} '{name}' {}: {} pages, {} failed", ["alloc", "free"][(op & 1) as usize], b.pages, b.failed);
        Ok(b.failed as u64)
    }

    /// Prints every region's counters.
    pub fn log_stats<F: morsel::Format>(dir: &Directory<F>) {
        crate::probe::report();
        let (fast, refused) = vmcore::region::fast_counts();
        if fast + refused > 0 {
            log::info!(target: "exmap", "{fast} ALLOC / FREE calls took no world lock (a vCPU's handle to its last region); {refused} handles refused (a change since)");
            log::info!(target: "evt", "exmap.fast calls={fast} refused={refused}");
        }
        for (name, s, c) in dir.named.iter().filter_map(|e| Some((e.name, e.value.region.as_ref()?, e.value.cell?))) {
            let c = c.counts();
            let (calls, allocated, freed, free_calls, invalidations, remote_flushes, zeroed, failed) = (c.calls, c.allocated, c.freed,
                c.free_calls, c.invalidations, c.remote_flushes, c.zeroed, c.failed);
            log::info!(target: "exmap",
                "stats '{name}': {} calls, {} pages allocated, {} freed ({} FREE calls, {} invalidations, {} of them shot down for other guests), {} zeroed, {} failed entries; disk: {} pages read, {} written, {} NVMe commands, up to {} in flight, {} completion interrupts",
                calls, allocated, freed, free_calls, invalidations, remote_flushes, zeroed, failed, s.read, s.written, s.commands, s.max_depth, s.interrupts);
            log::info!(target: "evt",
                "exmap.stats name={name} calls={} allocated={} freed={} free_calls={} invalidations={} remote_flushes={} zeroed={} failed={} read={} written={} commands={} max_depth={} interrupts={}",
                calls, allocated, freed, free_calls, invalidations, remote_flushes, zeroed, failed, s.read, s.written, s.commands, s.max_depth, s.interrupts);
        }
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
