//! ExMap in the hypervisor: `exmap_create` makes a region (a sparse morsel in the morsel
//! directory, so it is opened, shared read-only or read-write, device-mounted and destroyed
//! like any morsel), `exmap_action` runs one batch of up to 512 iovec entries over it
//! (ALLOC, FREE, READ and WRITE through the NVMe disk), `exmap_info` reads its counters.
//! The host-tested core (validation, frame cache, table edits) is the `exmap` crate.
//!
//! Per guest: a frame cache, a validator and result buffers (`VcpuState`), keyed by guest id
//! (all of ExMap's state is behind the world lock, so a guest's vCPUs take turns on it).
//! Invalidation: FREE clears all its PTEs, then shoots down ONCE (`vm/shootdown.rs`): the
//! CPUs that ran the caller's vCPUs, or every CPU that ran any guest where other guests have
//! the region mounted, and the IOTLB of every device domain that has it mounted; the call
//! returns after every CPU acknowledged.

use crate::vm::guest::Guest;
use super::{read_name, Directory};
use crate::vm::Backend;
use crate::mm::frames::{Frames, IDENTITY};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use crate::devices::nvme::{IoError, Request};
use exmap::{EntryError, FrameCache, Origin, Outcome, Range, Validator};
use super::Named;
use super::device_mounts::mount_error;
use formats::units::Bytes;
use abi::{self, Error};
use hashbrown::HashMap;
use morsel::{GuestPhysAddr, HostPhysAddr, Morsel, Perm};

const _: () = assert!(exmap::MAX_ENTRIES as u64 == abi::EXMAP_MAX_ENTRIES);
const _: () = assert!(exmap::MAX_COUNT == abi::EXMAP_MAX_COUNT);
const _: () = assert!(exmap::encode(5, 9) == abi::exmap_entry(5, 9));

/// What one vCPU keeps between calls (no allocation per call).
struct VcpuState {
    cache: FrameCache,
    validator: Validator,
    iov: Box<[u64; exmap::MAX_ENTRIES]>,
    out: Vec<Outcome>,
    changed: Vec<(u64, HostPhysAddr)>,
    /// The validated entries (READ / WRITE add `PastDisk`), the entries to roll back, their
    /// throwaway results, and the NVMe batch (requests, the entry of each, their outcomes).
    checked: Vec<Result<Range, EntryError>>,
    undo: Vec<Result<Range, EntryError>>,
    spare: Vec<Outcome>,
    reqs: Vec<Request>,
    owners: Vec<usize>,
    done: Vec<Result<u64, IoError>>,
}

/// Counters of one region.
#[derive(Default, Clone, Copy)]
struct RegionStats {
    id: Origin,
    calls: u64,
    free_calls: u64,
    allocated: u64,
    freed: u64,
    zeroed: u64,
    failed: u64,
    invalidations: u64,
    remote_flushes: u64,
    /// Pages the disk read into (READ) / wrote from (WRITE); NVMe commands; most in flight.
    read: u64,
    written: u64,
    commands: u64,
    max_depth: u64,
    /// NVMe completion interrupts taken during its batches.
    interrupts: u64,
}

/// ExMap's state for the run.
pub struct Exmaps {
    vcpus: HashMap<u32, VcpuState>,
    regions: HashMap<String, RegionStats>,
    next_id: Origin,
}

impl Default for Exmaps {
    fn default() -> Self {
        Self::new()
    }
}

impl Exmaps {
    pub fn new() -> Self {
        Exmaps { vcpus: HashMap::new(), regions: HashMap::new(), next_id: 1 }
    }

    /// `exmap_create(name_ptr, name_len, size, flags)`.
    #[allow(clippy::too_many_arguments)]
    pub fn create<B: Backend>(&mut self, dir: &mut Directory<B::Format>, g: &mut Guest<B>, frames: &Frames, name: abi::Name, size: u64, share_writable: bool) -> Result<u64, Error> {
        let name = read_name(g, name)?;
        if size == 0 || size % 4096 != 0 {
            return Err(Error::Invalid);
        }
        if size > abi::EXMAP_MAX_SIZE {
            return Err(Error::TooLarge);
        }
        if dir.named.contains_key(&name) {
            return Err(Error::Busy);
        }
        let m = Morsel::<B::Format>::create_sparse(size, frames, &IDENTITY).map_err(|e| match e {
            morsel::Error::OutOfMemory => Error::NoMemory,
            _ => Error::Invalid,
        })?;
        let tables = m.table_count();
        let gpa = dir.add_region(g, frames, name.clone(), m, share_writable)?;
        log::info!(target: "exmap", "guest {} created region '{name}': {} ({} pages), {tables} tables, no data frame, at {gpa:#x}",
            g.id, Bytes(size), size / 4096);
        let id = self.next_id;
        self.next_id += 1;
        self.regions.insert(name, RegionStats { id, ..Default::default() });
        Ok(gpa)
    }

    /// `exmap_action(region_gpa, iov_gpa, count, opcode)`.
    #[allow(clippy::too_many_arguments)] // the call's four arguments and what it works on
    pub fn action<B: Backend>(&mut self, dir: &mut Directory<B::Format>, mut devices: Option<&mut crate::devices::Devices>, g: &mut Guest<B>, frames: &Frames, gpa: u64, iov_gpa: u64, count: u64, op: abi::ExmapOp) -> Result<u64, Error> {
        let op = match op {
            abi::ExmapOp::Alloc => abi::EXMAP_ALLOC,
            abi::ExmapOp::Free => abi::EXMAP_FREE,
            abi::ExmapOp::Read => abi::EXMAP_READ,
            abi::ExmapOp::Write => abi::EXMAP_WRITE,
        };
        let mount = g.mounts.iter().find(|m| m.gpa == gpa).ok_or(Error::NotFound)?;
        let name = mount.name.clone();
        let writable = mount.writable;
        let stats = self.regions.get_mut(&name).ok_or(Error::Invalid)?;
        if !writable {
            return Err(Error::Denied);
        }
        // The iovec page: aligned, in guest RAM (never inside a morsel, not even this region,
        // so a FREE cannot pull it away under its own results), readable and writable.
        if iov_gpa % 4096 != 0 {
            return Err(Error::Invalid);
        }
        if iov_gpa.checked_add(4096).is_none_or(|end| end > g.spec.memory) {
            return Err(Error::BadAddress);
        }
        let (iov_hpa, _) = g.mem.translate(GuestPhysAddr::new(iov_gpa), Perm::RW)?;
        let n = dir.named.get_mut(&name).ok_or(Error::NotFound)?;
        if !n.morsel.is_sparse() {
            return Err(Error::Invalid);
        }
        let io = op == abi::EXMAP_READ || op == abi::EXMAP_WRITE;
        // READ and WRITE need the disk: its size in 4 KiB pages (disk offset = region offset).
        let disk_pages = match io {
            true => devices.as_deref().and_then(|d| d.nvme.as_ref()).map(|nv| nv.blocks / PAGE_BLOCKS).ok_or(Error::NotFound)?,
            false => 0,
        };
        let v = self.vcpus.entry(g.id).or_insert_with(|| VcpuState {
            cache: FrameCache::new(),
            validator: Validator::new(),
            iov: Box::new([0; exmap::MAX_ENTRIES]),
            out: Vec::with_capacity(exmap::MAX_ENTRIES),
            changed: Vec::with_capacity(exmap::MAX_ENTRIES),
            checked: Vec::with_capacity(exmap::MAX_ENTRIES),
            undo: Vec::with_capacity(exmap::MAX_ENTRIES),
            spare: Vec::with_capacity(exmap::MAX_ENTRIES),
            reqs: Vec::with_capacity(exmap::MAX_ENTRIES),
            owners: Vec::with_capacity(exmap::MAX_ENTRIES),
            done: Vec::with_capacity(exmap::MAX_ENTRIES),
        });
        let count = count as usize;
        // SAFETY: iov_hpa..+4096 is guest RAM of this guest (translated above, aligned, so
        // inside one page), read-write; the guest does not run during the call.
        let page = unsafe { crate::mm::frames::host_bytes_mut(iov_hpa.as_u64(), 4096) };
        for (k, e) in v.iov[..count].iter_mut().enumerate() {
            *e = u64::from_le_bytes(page[8 * k..8 * k + 8].try_into().unwrap_or([0; 8]));
        }
        v.checked.clear();
        v.checked.extend_from_slice(v.validator.validate(&v.iov[..count], n.morsel.pages()));
        if io {
            // Every page of the entry must lie on the disk, else it fails alone, first.
            for c in v.checked.iter_mut() {
                if matches!(c, Ok(r) if r.end() > disk_pages) {
                    *c = Err(EntryError::PastDisk);
                }
            }
        }
        v.changed.clear();
        let zeroed0 = v.cache.stats().zeroed;
        let mut b = match op {
            abi::EXMAP_ALLOC => exmap::alloc(&n.morsel, stats.id, &v.checked, &mut v.out, &mut v.cache, frames, &IDENTITY, &mut v.changed),
            abi::EXMAP_READ => exmap::alloc_fresh(&n.morsel, stats.id, &v.checked, &mut v.out, &mut v.cache, frames, &IDENTITY, &mut v.changed),
            abi::EXMAP_WRITE => exmap::collect(&n.morsel, &v.checked, &mut v.out, &IDENTITY, &mut v.changed),
            _ => exmap::free(&n.morsel, stats.id, &v.checked, &mut v.out, &mut v.cache, &IDENTITY, &mut v.changed),
        };
        // A device view (NPT region mounted into a device) follows the region page by page.
        let mapped = op == abi::EXMAP_ALLOC || op == abi::EXMAP_READ;
        if op != abi::EXMAP_WRITE {
            follow_views(n, &v.changed, mapped);
        }
        let mut moved = 0;
        if io {
            // The device reads into (READ) or from (WRITE) the entries' frames. The region
            // stays in this call's hands all along (the directory is held for the call), so
            // no FREE can evict a page under I/O.
            let d = disk_io(n, devices.as_deref_mut(), frames, op == abi::EXMAP_WRITE, &v.checked, &mut v.out, &mut v.reqs, &mut v.owners, &mut v.done);
            moved = d.pages;
            stats.commands += d.commands;
            stats.max_depth = stats.max_depth.max(d.max_depth);
            stats.interrupts += d.interrupts;
            b.failed += d.failed;
            if op == abi::EXMAP_READ && d.failed > 0 {
                // A failed read leaves nothing behind: its fresh pages are unmapped again.
                v.undo.clear();
                for (c, o) in v.checked.iter().zip(&v.out) {
                    if let (Ok(r), Err(EntryError::Device)) = (c, o) {
                        v.undo.push(Ok(*r));
                        b.pages -= r.count;
                        b.rolled_back += r.count;
                    }
                }
                v.changed.clear();
                exmap::free(&n.morsel, stats.id, &v.undo, &mut v.spare, &mut v.cache, &IDENTITY, &mut v.changed);
                follow_views(n, &v.changed, false);
            }
        }
        stats.calls += 1;
        stats.failed += b.failed as u64;
        stats.zeroed += v.cache.stats().zeroed - zeroed0;
        match op {
            abi::EXMAP_ALLOC => stats.allocated += b.pages,
            abi::EXMAP_READ => {
                stats.allocated += b.pages;
                stats.read += moved;
            }
            abi::EXMAP_WRITE => stats.written += moved,
            _ => {
                stats.freed += b.pages;
                stats.free_calls += 1;
            }
        }
        if op == abi::EXMAP_FREE && b.pages > 0 || b.rolled_back > 0 {
            // ONE shootdown for the whole batch, then the frames may leave the cache: the
            // caller's CPUs, or, where other guests have the region mounted, every CPU that
            // ran any guest.
            if n.morsel.mount_count() > 1 {
                crate::vm::shootdown::cpus(crate::vm::shootdown::any_ran_on());
                stats.remote_flushes += 1;
            } else {
                crate::vm::shootdown::guest(g);
            }
            stats.invalidations += 1;
            // Each device domain the region is mounted in is invalidated once for the batch,
            // however many of its mounts (windows) are there.
            let mut domains: Vec<_> = dir.devices.iter().filter(|d| d.name == name).map(|d| d.bdf).collect();
            let mounts = domains.len();
            domains.sort_unstable_by_key(|b| b.source_id());
            domains.dedup();
            if !domains.is_empty() {
                let mut flushed = 0;
                if let Some(d) = devices {
                    for &bdf in &domains {
                        if d.iommu.invalidate(bdf).is_ok() {
                            flushed += 1;
                        }
                    }
                }
                stats.invalidations += flushed;
                log::info!(target: "exmap", "guest {} '{name}' free of {} pages: IOTLB invalidated once in each of {flushed} device domain(s) ({mounts} device mounts)", g.id, b.pages);
            }
            v.cache.trim(frames);
        }
        for (k, o) in v.out.iter().enumerate() {
            let r: i64 = match o {
                Ok(pages) => *pages as i64,
                Err(e) => entry_error(*e) as i64,
            };
            page[8 * k..8 * k + 8].copy_from_slice(&r.to_le_bytes());
        }
        log::debug!(target: "exmap", "guest {} '{name}' {}: {count} entries, {} pages, {} failed",
            g.id, ["alloc", "free", "read", "write"][op as usize], b.pages, b.failed);
        Ok(b.failed as u64)
    }

    /// `exmap_info(region_gpa, what)`.
    pub fn info<B: Backend>(&self, g: &Guest<B>, region: u64, what: u64) -> Result<u64, Error> {
        let m = g.mounts.iter().find(|m| m.gpa == region).ok_or(Error::NotFound)?;
        let s = self.regions.get(&m.name).ok_or(Error::Invalid)?;
        match what {
            abi::EXMAP_INFO_POPULATED => Ok(s.allocated - s.freed),
            abi::EXMAP_INFO_CALLS => Ok(s.calls),
            abi::EXMAP_INFO_INVALIDATIONS => Ok(s.invalidations),
            abi::EXMAP_INFO_ALLOCATED => Ok(s.allocated),
            abi::EXMAP_INFO_FREED => Ok(s.freed),
            abi::EXMAP_INFO_ZEROED => Ok(s.zeroed),
            abi::EXMAP_INFO_FAILED => Ok(s.failed),
            abi::EXMAP_INFO_READ => Ok(s.read),
            abi::EXMAP_INFO_WRITTEN => Ok(s.written),
            abi::EXMAP_INFO_COMMANDS => Ok(s.commands),
            abi::EXMAP_INFO_MAX_DEPTH => Ok(s.max_depth),
            _ => Err(Error::NoSuchCall),
        }
    }

    /// A guest ended: its vCPU's cache goes back to the allocator.
    pub fn guest_ended(&mut self, id: u32, frames: &Frames) {
        if let Some(mut v) = self.vcpus.remove(&id) {
            let held = v.cache.len();
            v.cache.drain(frames);
            let s = v.cache.stats();
            log::info!(target: "exmap", "guest {id}: frame cache drained ({held} frames back); {} bundles in, {} out, {} frames from the allocator, {} back",
                s.refills, s.returns, s.from_allocator, s.to_allocator);
        }
    }

    /// Prints every region's counters.
    pub fn log_stats(&self) {
        for (name, s) in &self.regions {
            log::info!(target: "exmap",
                "stats '{name}': {} calls, {} pages allocated, {} freed ({} FREE calls, {} invalidations, {} of them shot down for other guests), {} zeroed, {} failed entries; disk: {} pages read, {} written, {} NVMe commands, up to {} in flight, {} completion interrupts",
                s.calls, s.allocated, s.freed, s.free_calls, s.invalidations, s.remote_flushes, s.zeroed, s.failed, s.read, s.written, s.commands, s.max_depth, s.interrupts);
        }
    }
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
/// `changed` pages mapped to their frames (`mapped`) or cleared.
fn follow_views<F: morsel::Format>(n: &Named<F>, changed: &[(u64, HostPhysAddr)], mapped: bool) {
    if let Some(view) = &n.views.vtd {
        for &(p, f) in changed {
            let _ = view.set_leaf(p, mapped.then_some(f), &IDENTITY);
        }
    }
    for view in [&n.views.amd, &n.views.amd_ro].into_iter().flatten() {
        for &(p, f) in changed {
            let _ = view.set_leaf(p, mapped.then_some(f), &IDENTITY);
        }
    }
    if let Some(twin) = &n.views.ept {
        for &(p, f) in changed {
            let _ = twin.set_leaf(p, mapped.then_some(f), &IDENTITY);
        }
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

/// READ's and WRITE's device half, for the entries that are `Ok` in `out`: the region is
/// mounted into the NVMe domain for the call (read-write for READ: the device writes its
/// frames; read-only for WRITE), at the proxy's I/O virtual address (`nvme_io` does the same
/// and unmounts before it returns, so the two never meet); one request per entry, at disk
/// offset = region offset, all submitted before any is waited for; then the unmount and the
/// IOTLB invalidation. An entry whose I/O failed, or any entry if the IOMMU reported a DMA
/// fault of the device meanwhile, becomes `Err(Device)`.
#[allow(clippy::too_many_arguments)]
fn disk_io<F: morsel::Format>(
    n: &mut Named<F>,
    devices: Option<&mut crate::devices::Devices>,
    frames: &Frames,
    write: bool,
    checked: &[Result<Range, EntryError>],
    out: &mut [Outcome],
    reqs: &mut Vec<Request>,
    owners: &mut Vec<usize>,
    done: &mut Vec<Result<u64, IoError>>,
) -> DiskStats {
    let mut s = DiskStats::default();
    let window = n.morsel.window_size();
    let iova = crate::devices::nvme::PROXY_IOVA.next_multiple_of(window);
    reqs.clear();
    owners.clear();
    for (k, (c, o)) in checked.iter().zip(out.iter()).enumerate() {
        if let (Ok(r), Ok(_)) = (c, o) {
            reqs.push(Request { iova: iova + r.first * 4096, lba: r.first * PAGE_BLOCKS, blocks: r.count * PAGE_BLOCKS });
            owners.push(k);
        }
    }
    if reqs.is_empty() {
        return s;
    }
    done.clear();
    done.resize(reqs.len(), Err(IoError::Invalid));
    let faulted = devices.ok_or(Error::NotFound).and_then(|d| {
        let bdf = d.nvme.as_ref().ok_or(Error::NotFound)?.bdf;
        let limit = d.iommu.limit(bdf).ok_or(Error::NotFound)?;
        if iova.checked_add(window).is_none_or(|end| end > limit) {
            return Err(Error::TooLarge);
        }
        let perm = if write { Perm::RO } else { Perm::RW };
        d.iommu.mount(bdf, &n.morsel, &mut n.views, iova, perm, frames).map_err(mount_error)?;
        let ready = d.iommu.invalidate(bdf).map_err(|_| Error::DeviceFault);
        if ready.is_ok() {
            if let Some(nv) = d.nvme.as_mut() {
                let b = nv.batch(write, reqs, done);
                (s.commands, s.max_depth, s.interrupts) = (b.commands, b.max_depth, b.interrupts);
            }
        }
        let faulted = crate::devices::faults_of(d, bdf);
        let _ = d.iommu.unmount(bdf, &n.morsel, &mut n.views, iova, frames);
        d.iommu.invalidate(bdf).map_err(|_| Error::DeviceFault)?;
        ready.map(|_| faulted)
    });
    for (&k, r) in owners.iter().zip(done.iter()) {
        match (r, faulted) {
            (Ok(blocks), Ok(false)) => s.pages += blocks / PAGE_BLOCKS,
            _ => {
                if let Err(e) = r {
                    log::warn!(target: "exmap", "{} of entry {k} failed: {e:?}", if write { "disk write" } else { "disk read" });
                }
                out[k] = Err(EntryError::Device);
                s.failed += 1;
            }
        }
    }
    if let Ok(true) | Err(_) = faulted {
        log::error!(target: "exmap", "{}: the whole batch failed ({:?})", if write { "WRITE" } else { "READ" }, faulted);
    }
    s
}

/// What a second-level fault at `gpa` hit, where the guest has a morsel mounted there:
/// "page N (offset) of 'name', not populated", or past the morsel's end.
pub fn describe_fault<B: Backend>(g: &Guest<B>, gpa: u64) -> Option<String> {
    let m = g.mounts.iter().find(|m| m.gpa <= gpa && gpa < m.gpa + m.window)?;
    let off = gpa - m.gpa;
    Some(if off < m.size {
        alloc::format!("unpopulated page {} (offset {off:#x}) of '{}'", off / 4096, m.name)
    } else {
        alloc::format!("offset {off:#x} past the end of '{}' ({})", m.name, Bytes(m.size))
    })
}
