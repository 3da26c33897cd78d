//! ExMap in the hypervisor: `exmap_create` makes a region (a sparse morsel in the morsel
//! directory, so it is opened, shared read-only or read-write, device-mounted and destroyed
//! like any morsel), `exmap_action` runs one batch of up to 512 iovec entries over it
//! (ALLOC, FREE; READ and WRITE are refused as not done yet), `exmap_info` reads its counters.
//! The host-tested core (validation, frame cache, table edits) is the `exmap` crate.
//!
//! Per guest: a frame cache, a validator and result buffers (`VcpuState`), keyed by guest id
//! (all of ExMap's state is behind the world lock, so a guest's vCPUs take turns on it).
//! Invalidation: FREE clears all its PTEs, then shoots down ONCE (`vm/shootdown.rs`): the
//! CPUs that ran the caller's vCPUs, or every CPU that ran any guest where other guests have
//! the region mounted, and the IOTLB of every device domain that has it mounted; the call
//! returns after every CPU acknowledged.

use super::guest::Guest;
use super::morsels::{read_name, Directory};
use super::Backend;
use crate::frames::{Frames, IDENTITY};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use exmap::{EntryError, FrameCache, Origin, Outcome, Validator};
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
    pub fn create<B: Backend>(&mut self, dir: &mut Directory<B::Format>, g: &mut Guest<B>, frames: &Frames, a: [u64; 4]) -> Result<u64, Error> {
        let name = read_name(g, a[0], a[1])?;
        let (size, flags) = (a[2], a[3]);
        if flags & !abi::MORSEL_SHARE_WRITABLE != 0 || size == 0 || size % 4096 != 0 {
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
        let gpa = dir.add_region(g, frames, name.clone(), m, flags & abi::MORSEL_SHARE_WRITABLE != 0)?;
        log::info!(target: "exmap", "guest {} created region '{name}': {} ({} pages), {tables} tables, no data frame, at {gpa:#x}",
            g.id, Bytes(size), size / 4096);
        let id = self.next_id;
        self.next_id += 1;
        self.regions.insert(name, RegionStats { id, ..Default::default() });
        Ok(gpa)
    }

    /// `exmap_action(region_gpa, iov_gpa, count, opcode)`.
    pub fn action<B: Backend>(&mut self, dir: &mut Directory<B::Format>, g: &mut Guest<B>, _backend: &mut B, frames: &Frames, a: [u64; 4]) -> Result<u64, Error> {
        let [gpa, iov_gpa, count, op] = a;
        let mount = g.mounts.iter().find(|m| m.gpa == gpa).ok_or(Error::NotFound)?;
        let name = mount.name.clone();
        let writable = mount.writable;
        let stats = self.regions.get_mut(&name).ok_or(Error::Invalid)?;
        if !writable {
            return Err(Error::Denied);
        }
        if !(1..=abi::EXMAP_MAX_ENTRIES).contains(&count) {
            return Err(Error::Invalid);
        }
        if op > abi::EXMAP_WRITE {
            return Err(Error::Invalid);
        }
        if op == abi::EXMAP_READ || op == abi::EXMAP_WRITE {
            // Not done yet: the batched NVMe path (README, ExMap).
            return Err(Error::NoSuchCall);
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
        let n = dir.named.get(&name).ok_or(Error::NotFound)?;
        if !n.morsel.is_sparse() {
            return Err(Error::Invalid);
        }
        let v = self.vcpus.entry(g.id).or_insert_with(|| VcpuState {
            cache: FrameCache::new(),
            validator: Validator::new(),
            iov: Box::new([0; exmap::MAX_ENTRIES]),
            out: Vec::with_capacity(exmap::MAX_ENTRIES),
            changed: Vec::with_capacity(exmap::MAX_ENTRIES),
        });
        let count = count as usize;
        // SAFETY: iov_hpa..+4096 is guest RAM of this guest (translated above, aligned, so
        // inside one page), read-write; the guest does not run during the call.
        let page = unsafe { crate::frames::host_bytes_mut(iov_hpa.as_u64(), 4096) };
        for (k, e) in v.iov[..count].iter_mut().enumerate() {
            *e = u64::from_le_bytes(page[8 * k..8 * k + 8].try_into().unwrap_or([0; 8]));
        }
        let checked = v.validator.validate(&v.iov[..count], n.morsel.pages());
        v.changed.clear();
        let zeroed0 = v.cache.stats().zeroed;
        let b = if op == abi::EXMAP_ALLOC {
            exmap::alloc(&n.morsel, stats.id, checked, &mut v.out, &mut v.cache, frames, &IDENTITY, &mut v.changed)
        } else {
            exmap::free(&n.morsel, stats.id, checked, &mut v.out, &mut v.cache, &IDENTITY, &mut v.changed)
        };
        // A VT-d view (NPT region mounted into a device) follows the region page by page.
        if let Some(view) = &n.vtd_view {
            for &(p, f) in &v.changed {
                let _ = view.set_leaf(p, (op == abi::EXMAP_ALLOC).then_some(f), &IDENTITY);
            }
        }
        stats.calls += 1;
        stats.failed += b.failed as u64;
        stats.zeroed += v.cache.stats().zeroed - zeroed0;
        if op == abi::EXMAP_ALLOC {
            stats.allocated += b.pages;
        } else {
            stats.freed += b.pages;
            stats.free_calls += 1;
        }
        if op == abi::EXMAP_FREE && b.pages > 0 || b.rolled_back > 0 {
            // ONE shootdown for the whole batch, then the frames may leave the cache: the
            // caller's CPUs, or, where other guests have the region mounted, every CPU that
            // ran any guest.
            if n.morsel.mount_count() > 1 {
                super::shootdown::cpus(super::shootdown::any_ran_on());
                stats.remote_flushes += 1;
            } else {
                super::shootdown::guest(g);
            }
            stats.invalidations += 1;
            let domains: Vec<_> = dir.devices.iter().filter(|d| d.name == name).map(|d| d.bdf).collect();
            if !domains.is_empty() {
                crate::devices::with(|d| {
                    for bdf in domains {
                        if let Some(id) = d.vtd.domain_of(bdf).map(|dom| dom.id) {
                            let _ = d.vtd.flush_domain(id);
                            stats.invalidations += 1;
                        }
                    }
                });
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
            g.id, if op == abi::EXMAP_ALLOC { "alloc" } else { "free" }, b.pages, b.failed);
        Ok(b.failed as u64)
    }

    /// `exmap_info(region_gpa, what)`.
    pub fn info<B: Backend>(&self, dir: &Directory<B::Format>, g: &Guest<B>, a: [u64; 2]) -> Result<u64, Error> {
        let m = g.mounts.iter().find(|m| m.gpa == a[0]).ok_or(Error::NotFound)?;
        let s = self.regions.get(&m.name).ok_or(Error::Invalid)?;
        match a[1] {
            abi::EXMAP_INFO_POPULATED => Ok(s.allocated - s.freed),
            abi::EXMAP_INFO_CALLS => Ok(s.calls),
            abi::EXMAP_INFO_INVALIDATIONS => Ok(s.invalidations),
            abi::EXMAP_INFO_ALLOCATED => Ok(s.allocated),
            abi::EXMAP_INFO_FREED => Ok(s.freed),
            abi::EXMAP_INFO_ZEROED => Ok(s.zeroed),
            abi::EXMAP_INFO_FAILED => Ok(s.failed),
            _ => {
                let _ = dir;
                Err(Error::NoSuchCall)
            }
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
                "stats '{name}': {} calls, {} pages allocated, {} freed ({} FREE calls, {} invalidations, {} of them shot down for other guests), {} zeroed, {} failed entries",
                s.calls, s.allocated, s.freed, s.free_calls, s.invalidations, s.remote_flushes, s.zeroed, s.failed);
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
    }
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
