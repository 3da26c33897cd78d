//! The morsel manager: named morsels with an owner, a grant (may others write?), reference
//! counts (the morsel's mount count) and the hypercalls that create, open (mount), unmount,
//! size, destroy and report them. Mounting writes one entry in the guest's second-level
//! table; unmounting clears it and invalidates the guest's cached translations.
//!
//! Devices get morsels the same way: `device_mount` writes one entry in the device's VT-d
//! domain and flushes its IOTLB. EPT subtrees are mounted into the domain as they are (the
//! formats share, Xen's `iommu=sharept`); an NPT morsel gets a VT-d view over the same data
//! frames (`Morsel::view`), built on its first device mount and kept with the morsel. The
//! NVMe proxy (`nvme_io`) mounts the caller's morsel into the NVMe domain for one call.
//!
//! What a guest makes the hypervisor keep is bounded per guest (`abi::MORSEL_QUOTA` morsels,
//! `abi::MOUNT_QUOTA` mounts, `abi::DEVICE_MOUNT_QUOTA` device mounts) and every heap
//! allocation on those paths is fallible (`try_reserve`): `NoMemory`, never a panic.

use super::guest::Guest;
use super::hypercall::refuse;
use super::Backend;
use crate::frames::{Frames, IDENTITY};
use crate::pmem;
use alloc::string::String;
use alloc::vec::Vec;
use abi::{self, Error};
use hashbrown::HashMap;
use formats::units::Bytes;
use crate::devices;
use crate::pci::Bdf;
use morsel::{can_share, Format, GuestPhysAddr, IoVirtAddr, Morsel, MountStats, PageSize, Perm, SecondLevelTable, VtdSl};

/// Longest morsel name.
pub const NAME_MAX: usize = abi::MORSEL_NAME_MAX;

/// One named morsel.
pub(super) struct Named<F: Format> {
    pub(super) morsel: Morsel<F>,
    owner: u32,
    others_may_write: bool,
    /// PTE writes for mounts, unmounts; TLB invalidations.
    mounts: u64,
    unmounts: u64,
    mount_pte_writes: u64,
    path_pte_writes: u64,
    unmount_pte_writes: u64,
    invalidations: u64,
    /// The VT-d view of a morsel whose format the IOMMU cannot walk (NPT), built on the
    /// first device mount; destroyed with the morsel.
    pub(super) vtd_view: Option<Morsel<VtdSl>>,
    /// Its directory slot in persistent memory, for a persistent morsel.
    slot: Option<usize>,
}

/// The owner of a persistent morsel restored after a reboot: no guest.
const RESTORED: u32 = u32::MAX;

/// Frames of the run's RAM or of the persistent region.
#[derive(Clone, Copy)]
enum Source {
    Ram(Frames),
    Pmem(crate::pmem::PmemFrames),
}

impl morsel::FrameAlloc for Source {
    fn alloc(&self, order: u32) -> Option<morsel::HostPhysAddr> {
        match self {
            Source::Ram(f) => morsel::FrameAlloc::alloc(f, order),
            Source::Pmem(p) => p.alloc(order),
        }
    }

    fn free(&self, frame: morsel::HostPhysAddr, order: u32) {
        match self {
            Source::Ram(f) => morsel::FrameAlloc::free(f, frame, order),
            Source::Pmem(p) => p.free(frame, order),
        }
    }
}

/// A morsel mounted into a device's DMA domain on behalf of a guest.
#[derive(Clone, Debug)]
pub struct DeviceMount {
    pub name: String,
    pub bdf: Bdf,
    pub iova: u64,
    /// The I/O virtual span the mount occupies (the span of the morsel's root table).
    pub window: u64,
    pub guest: u32,
}

/// A mount in one guest.
#[derive(Clone, Debug)]
pub struct Mount {
    pub gpa: u64,
    pub size: u64,
    /// The guest-physical span the mount occupies (the span of the morsel's root table).
    pub window: u64,
    pub name: String,
    /// Mounted read-write (else read-only).
    pub writable: bool,
}

/// All morsels of the run.
pub struct Directory<F: Format> {
    pub(super) named: HashMap<String, Named<F>>,
    pub(super) devices: Vec<DeviceMount>,
}

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    pub fn new() -> Self {
        Directory { named: HashMap::new(), devices: Vec::new() }
    }

    /// `morsel_create(name_ptr, name_len, size, flags)`. A persistent morsel takes its frames
    /// from the persistent region and gets a directory record after its subtree is complete.
    pub fn create<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, a: [u64; 4]) -> Result<u64, Error> {
        let name = read_name(g, a[0], a[1])?;
        let (size, flags) = (a[2], a[3]);
        if flags & !(abi::MORSEL_HUGE_PAGES | abi::MORSEL_SHARE_WRITABLE | abi::MORSEL_PERSISTENT) != 0 {
            return Err(Error::Invalid);
        }
        let page = if flags & abi::MORSEL_HUGE_PAGES != 0 { PageSize::Size2M } else { PageSize::Size4K };
        if size == 0 || size % page.bytes() != 0 {
            return Err(refuse(Error::Invalid, format_args!("size {} is not a positive multiple of the {} page", Bytes(size), Bytes(page.bytes()))));
        }
        if size > morsel::MAX_MORSEL || size > abi::MORSEL_WINDOW_SIZE {
            return Err(refuse(Error::TooLarge, format_args!("size {} is above the largest morsel, {}", Bytes(size), Bytes(morsel::MAX_MORSEL.min(abi::MORSEL_WINDOW_SIZE)))));
        }
        if self.named.contains_key(&name) {
            return Err(refuse(Error::Busy, format_args!("the name {name:?} is taken")));
        }
        if self.named.values().filter(|n| n.owner == g.id).count() >= abi::MORSEL_QUOTA as usize
            || g.mounts.len() >= abi::MOUNT_QUOTA as usize
        {
            return Err(Error::NoMemory);
        }
        self.named.try_reserve(1).map_err(|_| Error::NoMemory)?;
        let others_may_write = flags & abi::MORSEL_SHARE_WRITABLE != 0;
        let pm = if flags & abi::MORSEL_PERSISTENT != 0 {
            let pm = pmem::get().ok_or(Error::Invalid)?;
            pm.claim_format(F::NAME).map_err(|_| Error::Invalid)?;
            Some(pm)
        } else {
            None
        };
        // More than the free RAM fails at once, not after taking (and giving back) all of it.
        if pm.is_none() && size / 4096 > frames.free_frames() as u64 {
            let free = Bytes(frames.free_frames() as u64 * 4096);
            return Err(refuse(Error::NoMemory, format_args!("size {} is more than the free memory, {free}", Bytes(size))));
        }
        let source = pm.map_or(Source::Ram(*frames), |pm| Source::Pmem(pm.frames()));
        let morsel = Morsel::<F>::create(size, page, &source, &IDENTITY).map_err(|e| match e {
            morsel::Error::OutOfMemory => Error::NoMemory,
            _ => Error::Invalid,
        })?;
        let slot = match pm {
            Some(pm) => {
                let record = pmem::Record { name: name.clone(), root: morsel.root(), len: morsel.len(), page, others_may_write };
                match pm.add_record(&record, |mark| morsel.for_each_frame(&IDENTITY, mark)) {
                    Some(slot) => Some(slot),
                    None => {
                        let _ = morsel.destroy(&source, &IDENTITY);
                        return Err(Error::NoMemory);
                    }
                }
            }
            None => None,
        };
        log::info!(target: "morsel", "guest {} created '{name}': {} of {} pages, root L{}, {} tables{}",
            g.id, Bytes(size), if page == PageSize::Size2M { "2 MiB" } else { "4 KiB" },
            morsel.root_level(), morsel.table_count(),
            if let Some(i) = slot { alloc::format!(", in persistent memory (record {i})") } else { String::new() });
        self.named.insert(name.clone(), Named {
            morsel,
            owner: g.id,
            others_may_write,
            mounts: 0,
            unmounts: 0,
            mount_pte_writes: 0,
            path_pte_writes: 0,
            unmount_pte_writes: 0,
            invalidations: 0,
            vtd_view: None,
            slot,
        });
        let gpa = self.mount(g, frames, &name, true);
        if gpa.is_err() {
            // Nobody can have mounted it yet: give the frames back.
            self.remove(&name, frames);
        }
        gpa
    }

    /// Adds an ExMap region (a sparse morsel, see `vm/exmap.rs`) named `name`, owned by `g`,
    /// and mounts it read-write there; from then on it is shared like any morsel.
    pub(super) fn add_region<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, name: String, morsel: Morsel<F>, others_may_write: bool) -> Result<u64, Error> {
        if self.named.contains_key(&name) {
            let _ = morsel.destroy(frames, &IDENTITY);
            return Err(Error::Busy);
        }
        self.named.insert(name.clone(), Named {
            morsel, owner: g.id, others_may_write, mounts: 0, unmounts: 0, mount_pte_writes: 0,
            path_pte_writes: 0, unmount_pte_writes: 0, invalidations: 0, vtd_view: None, slot: None,
        });
        let gpa = self.mount(g, frames, &name, true);
        if gpa.is_err() {
            self.remove(&name, frames);
        }
        gpa
    }

    /// Restores the persistent region's morsels (after a reboot or a crash), drops the records
    /// the command line names (`pmem=drop:...`), quarantines the frames that each damaged
    /// record still reaches (kept, never handed out, until the record is dropped) and frees
    /// the region's frames that nothing reaches. Call once, before any guest runs.
    pub fn load_persistent(&mut self) {
        let Some(pm) = pmem::get() else { return };
        if let Err(other) = pm.claim_format(F::NAME) {
            log::warn!(target: "pmem", "its morsels are {other} subtrees and this backend uses {}: left untouched", F::NAME);
            return;
        }
        // A damaged record: slot, name (if readable), what it says (root, length, page size).
        let mut damaged: Vec<(usize, String, morsel::HostPhysAddr, u64, Option<PageSize>)> = Vec::new();
        let mut restored: Vec<(usize, pmem::Record, Morsel<F>)> = Vec::new();
        for r in pm.records() {
            let slot = match &r {
                Ok((slot, _)) | Err(pmem::Unreadable { slot, .. }) => *slot,
            };
            if pm.drop.has(slot) {
                pm.remove_record(slot);
                log::warn!(target: "pmem", "record {slot}{} dropped (pmem=drop:{slot})",
                    r.as_ref().map_or(String::new(), |(_, r)| alloc::format!(" ('{}')", r.name)));
                continue;
            }
            let (slot, r) = match r {
                Ok(x) => x,
                Err(u) => {
                    log::error!(target: "pmem", "record {slot} is unreadable");
                    damaged.push((slot, String::new(), u.root, u.len, u.page));
                    continue;
                }
            };
            match Morsel::<F>::restore(r.root, r.len, r.page, &IDENTITY, |f, o| pm.holds(f, o)) {
                Ok(morsel) if !restored.iter().any(|(_, o, _)| o.name == r.name) => restored.push((slot, r, morsel)),
                Ok(_) => {
                    log::error!(target: "pmem", "record {slot}: a second morsel named '{}'", r.name);
                    damaged.push((slot, r.name, r.root, r.len, Some(r.page)));
                }
                Err(e) => {
                    log::error!(target: "pmem", "record {slot} ('{}'): {e}", r.name);
                    damaged.push((slot, r.name, r.root, r.len, Some(r.page)));
                }
            }
        }
        // Records that share frames: destroying one would free frames the other maps.
        let (mut seen, mut twice) = (pm.frame_set(), pm.frame_set());
        for (_, _, m) in &restored {
            m.for_each_frame(&IDENTITY, |f, o| {
                if seen.mark(f, o) > 0 {
                    twice.mark(f, o);
                }
            });
        }
        if twice.count() > 0 {
            log::error!(target: "pmem", "records share {} frames (damaged directory): those records are not loaded", twice.count());
            for (slot, r, m) in core::mem::take(&mut restored) {
                let mut shares = false;
                m.for_each_frame(&IDENTITY, |f, o| shares |= twice.any(f, o));
                if shares {
                    log::error!(target: "pmem", "record {slot} ('{}'): shares frames with another record", r.name);
                    damaged.push((slot, r.name, r.root, r.len, Some(r.page)));
                } else {
                    restored.push((slot, r, m));
                }
            }
        }
        let mut held = pm.frame_set();
        for (slot, r, morsel) in restored {
            morsel.for_each_frame(&IDENTITY, |f, o| {
                held.mark(f, o);
            });
            log::info!(target: "pmem", "'{}' restored from record {slot}: {} of {} pages, root L{} at {:#x}, {} tables",
                r.name, Bytes(r.len), if r.page == PageSize::Size2M { "2 MiB" } else { "4 KiB" },
                morsel.root_level(), r.root.as_u64(), morsel.table_count());
            self.named.insert(r.name, Named {
                morsel, owner: RESTORED, others_may_write: r.others_may_write, mounts: 0, unmounts: 0,
                mount_pte_writes: 0, path_pte_writes: 0, unmount_pte_writes: 0, invalidations: 0,
                vtd_view: None, slot: Some(slot),
            });
        }
        // Quarantine: what a damaged record still reaches (inside the region, allocated, not a
        // loaded record's) stays allocated, for the operator to repair or drop.
        let mut kept = pm.frame_set();
        let mut quarantined = 0;
        for (slot, name, root, len, page) in damaged {
            let what = if name.is_empty() { String::new() } else { alloc::format!(" ('{name}')") };
            if pm.drop.damaged {
                pm.remove_record(slot);
                log::warn!(target: "pmem", "record {slot}{what} dropped (pmem=drop:damaged)");
                continue;
            }
            let before = kept.count();
            Morsel::<F>::salvage(root, len, page, &IDENTITY, |f, o| {
                let take = pm.holds(f, o) && !held.any(f, o) && !kept.any(f, o);
                if take {
                    kept.mark(f, o);
                }
                take
            });
            quarantined += 1;
            log::error!(target: "pmem", "record {slot}{what}: {} frames it reaches quarantined; `pmem=drop:{slot}` drops the record and frees them",
                kept.count() - before);
        }
        let freed = pm.sweep(&held, &kept);
        let persistent: Vec<&Named<F>> = self.named.values().filter(|n| n.slot.is_some()).collect();
        let holding: u64 = persistent.iter().map(|n| n.morsel.table_count() as u64 + n.morsel.len() / 4096).sum();
        let allocated = pm.allocated_frames();
        log::info!(target: "pmem", "{} persistent morsel(s); {freed} frames freed that no record reached; {allocated} frames allocated, {holding} held by records{}: {}",
            persistent.len(),
            if quarantined > 0 { alloc::format!(", {} quarantined for {quarantined} damaged record(s)", kept.count()) } else { String::new() },
            if allocated == holding + kept.count() { "nothing lost, nothing shared" } else { "MISMATCH" });
    }

    /// `morsel_open(name_ptr, name_len, writable)`.
    pub fn open<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, a: [u64; 3]) -> Result<u64, Error> {
        let name = read_name(g, a[0], a[1])?;
        let writable = match a[2] {
            0 => false,
            1 => true,
            _ => return Err(Error::Invalid),
        };
        let n = self.named.get(&name).ok_or(Error::NotFound)?;
        if writable && n.owner != g.id && !n.others_may_write {
            return Err(Error::Denied);
        }
        if g.mounts.iter().any(|m| m.name == name) {
            return Err(refuse(Error::Busy, format_args!("{name:?} is already mounted in this guest")));
        }
        self.mount(g, frames, &name, writable)
    }

    fn mount<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, name: &str, writable: bool) -> Result<u64, Error> {
        let n = self.named.get_mut(name).ok_or(Error::NotFound)?;
        if g.mounts.len() >= abi::MOUNT_QUOTA as usize {
            return Err(Error::NoMemory);
        }
        g.mounts.try_reserve(1).map_err(|_| Error::NoMemory)?;
        let mount_name = try_string(name)?;
        let size = n.morsel.window_size();
        // No free slot of this size: the window is full, not the memory.
        let gpa = free_slot(&g.mounts, size).ok_or(Error::Busy)?;
        let perm = if writable { Perm::RW } else { Perm::RO };
        let stats = n.morsel.mount(g.mem.table_mut(), GuestPhysAddr::new(gpa), perm, frames, &IDENTITY).map_err(|e| match e {
            morsel::Error::OutOfMemory => Error::NoMemory,
            morsel::Error::Occupied { .. } | morsel::Error::InsideMount { .. } => Error::Busy,
            _ => Error::Invalid,
        })?;
        n.mounts += 1;
        n.mount_pte_writes += stats.entry_writes as u64;
        n.path_pte_writes += stats.path_writes as u64;
        log::info!(target: "morsel", "'{name}' mounted {} into guest {} at {gpa:#x}: {} PTE write (+{} for new intermediate tables)",
            if writable { "read-write" } else { "read-only" }, g.id, stats.entry_writes, stats.path_writes);
        g.mounts.push(Mount { gpa, size: n.morsel.len(), window: size, name: mount_name, writable });
        Ok(gpa)
    }

    /// `morsel_unmount(gpa)`. The intermediate tables the mount created go with it (else a
    /// later morsel with a larger window would find its slot taken).
    pub fn unmount<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, _backend: &mut B, frames: &Frames, gpa: u64) -> Result<u64, Error> {
        let i = g.mounts.iter().position(|m| m.gpa == gpa).ok_or(Error::NotFound)?;
        let m = g.mounts.remove(i);
        let n = self.named.get_mut(&m.name).ok_or(Error::NotFound)?;
        let stats = n.morsel.unmount(g.mem.table_mut(), GuestPhysAddr::new(gpa), frames, &IDENTITY).map_err(|_| Error::Invalid)?;
        super::shootdown::guest(g);
        n.unmounts += 1;
        n.unmount_pte_writes += stats.entry_writes as u64;
        n.invalidations += 1;
        log::info!(target: "morsel", "'{}' unmounted from guest {} at {gpa:#x}: {} PTE write, 1 invalidation, {} empty intermediate tables freed",
            m.name, g.id, stats.entry_writes, stats.path_writes);
        Ok(0)
    }

    /// `morsel_size(gpa)`.
    pub fn size<B: Backend<Format = F>>(&self, g: &Guest<B>, gpa: u64) -> Result<u64, Error> {
        g.mounts.iter().find(|m| m.gpa == gpa).map(|m| m.size).ok_or(Error::NotFound)
    }

    /// `morsel_destroy(name_ptr, name_len)`: the owner only, and only while unmounted.
    pub fn destroy<B: Backend<Format = F>>(&mut self, g: &Guest<B>, frames: &Frames, a: [u64; 2]) -> Result<u64, Error> {
        let name = read_name(g, a[0], a[1])?;
        let n = self.named.get(&name).ok_or(Error::NotFound)?;
        if n.owner != g.id && !(n.owner == RESTORED && n.others_may_write) {
            return Err(Error::Denied);
        }
        if n.morsel.mount_count() > 0 || self.devices.iter().any(|d| d.name == name) {
            let devices = self.devices.iter().filter(|d| d.name == name).count();
            return Err(refuse(Error::Busy, format_args!("{name:?} is still mounted ({} guest, {devices} device mounts)", n.morsel.mount_count())));
        }
        self.remove(&name, frames);
        Ok(0)
    }

    /// Destroys a morsel that is mounted nowhere (the callers check). A persistent one loses
    /// its record first, then its frames.
    fn remove(&mut self, name: &str, frames: &Frames) {
        if let Some(mut n) = self.named.remove(name) {
            self.drop_view(name, &mut n, frames);
            let source = match (n.slot, pmem::get()) {
                (Some(slot), Some(pm)) => {
                    pm.remove_record(slot);
                    Source::Pmem(pm.frames())
                }
                _ => Source::Ram(*frames),
            };
            let len = n.morsel.len();
            match n.morsel.destroy(&source, &IDENTITY) {
                Ok(()) => log::info!(target: "morsel", "'{name}' destroyed, {} given back{}", Bytes(len),
                    if n.slot.is_some() { " to persistent memory" } else { "" }),
                Err((_, e)) => log::error!(target: "morsel", "'{name}' cannot be destroyed: {e}"),
            }
        }
    }

    /// Destroys a morsel's VT-d view (its tables are RAM frames, also for a persistent morsel).
    fn drop_view(&self, name: &str, n: &mut Named<F>, frames: &Frames) {
        if let Some(view) = n.vtd_view.take() {
            let tables = view.table_count();
            match view.destroy(frames, &IDENTITY) {
                Ok(()) => log::info!(target: "morsel", "'{name}': VT-d view destroyed, {tables} tables given back"),
                Err((_, e)) => log::error!(target: "morsel", "'{name}': VT-d view cannot be destroyed: {e}"),
            }
        }
    }

    /// Drops every mount of a guest that is leaving (device mounts too).
    pub fn drop_mounts<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, backend: &mut B, frames: &Frames) {
        while let Some(d) = self.devices.iter().find(|d| d.guest == g.id).cloned() {
            let _ = self.device_unmount_one(&d, frames);
        }
        while let Some(m) = g.mounts.last().cloned() {
            if self.unmount(g, backend, frames, m.gpa).is_err() {
                g.mounts.pop();
            }
        }
    }

    /// Prints the counters of every morsel.
    pub fn log_stats(&self) {
        for (name, n) in &self.named {
            log::info!(target: "morsel",
                "stats '{name}': {}, owner {}, mounted now {}, mounts {} ({} PTE writes, {} per mount; +{} for intermediate tables), unmounts {} ({} PTE writes), invalidations {}",
                Bytes(n.morsel.len()),
                if n.owner == RESTORED { "none (restored from persistent memory)".into() } else { alloc::format!("guest {}", n.owner) },
                n.morsel.mount_count(), n.mounts, n.mount_pte_writes,
                n.mount_pte_writes.checked_div(n.mounts).unwrap_or(0), n.path_pte_writes,
                n.unmounts, n.unmount_pte_writes, n.invalidations);
        }
    }

    /// Destroys every morsel left at the end of the run (all guests are gone).
    pub fn destroy_all(&mut self, frames: &Frames) {
        for d in core::mem::take(&mut self.devices) {
            let _ = self.device_unmount_one(&d, frames);
        }
        devices::with(|d| {
            d.vtd.prune_domains(frames);
            d.vtd.poll_faults();
            log::info!(target: "iommu", "end of run: {} DMA fault(s) reported, {} IOTLB invalidations",
                d.vtd.faults_seen, d.vtd.invalidations);
        });
        let names: Vec<String> = self.named.keys().cloned().collect();
        for name in names {
            let persistent = self.named.get(&name).is_some_and(|n| n.slot.is_some());
            if !persistent {
                self.remove(&name, frames);
            } else if let Some(mut n) = self.named.remove(&name) {
                self.drop_view(&name, &mut n, frames);
                log::info!(target: "pmem", "'{name}' stays in persistent memory ({})", Bytes(n.morsel.len()));
            }
        }
        if let Some(pm) = pmem::get() {
            log::info!(target: "pmem", "end of run: {} allocated, {} free", Bytes(pm.allocated_frames() * 4096), Bytes(pm.free_bytes()));
        }
    }
}

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    /// `device_mount(name_ptr, name_len, bdf, iova, writable)`. Only edu is offered: the
    /// hypervisor drives the NVMe controller itself (its domain is the proxy's), and other
    /// functions (host bridge, LPC, ...) it does not drive at all (`Denied`; `NotFound` where
    /// no function answers). edu is lent to one guest at a time: while one guest has a
    /// morsel mounted there, others get `Busy`; when a guest takes it over, its buffer is
    /// scrubbed first, so no guest's bytes reach another.
    pub fn device_mount<B: Backend<Format = F>>(&mut self, g: &Guest<B>, frames: &Frames, a: [u64; 5]) -> Result<u64, Error> {
        let name = read_name(g, a[0], a[1])?;
        let bdf = device(a[2])?;
        let iova = a[3];
        let writable = match a[4] {
            0 => false,
            1 => true,
            _ => return Err(Error::Invalid),
        };
        let n = self.named.get_mut(&name).ok_or(Error::NotFound)?;
        if writable && n.owner != g.id && !n.others_may_write {
            return Err(Error::Denied);
        }
        let window = n.morsel.window_size();
        let perm = if writable { Perm::RW } else { Perm::RO };
        if self.devices.iter().filter(|d| d.guest == g.id).count() >= abi::DEVICE_MOUNT_QUOTA as usize {
            return Err(Error::NoMemory);
        }
        self.devices.try_reserve(1).map_err(|_| Error::NoMemory)?;
        let lent_to = self.devices.iter().find(|d| d.bdf == bdf).map(|d| d.guest);
        let (stats, how) = devices::with(|d| {
            let mem = d.vtd.mem;
            if !d.functions.iter().any(|f| f.bdf == bdf) {
                return Err(Error::NotFound);
            }
            if d.edu.as_ref().map(|e| e.bdf) != Some(bdf) {
                return Err(Error::Denied);
            }
            match lent_to {
                Some(other) if other != g.id => return Err(Error::Busy),
                Some(_) => {}
                None => devices::edu_scrub(d, frames)?,
            }
            let dom = d.vtd.domain_of(bdf).ok_or(Error::NotFound)?;
            let r = mount_in_domain(n, &mut dom.table, iova, perm, frames, &mem)?;
            let id = dom.id;
            d.vtd.flush_domain(id).map_err(|_| Error::DeviceFault)?;
            Ok((r.0, r.1))
        })
        .unwrap_or(Err(Error::NotFound))?;
        n.mounts += 1;
        n.mount_pte_writes += stats.entry_writes as u64;
        n.path_pte_writes += stats.path_writes as u64;
        n.invalidations += 1;
        log::info!(target: "morsel", "'{name}' mounted {} into device {bdf} at I/O virtual address {iova:#x} for guest {}: {} PTE write (+{} for new intermediate tables), 1 IOTLB invalidation, {how}",
            if writable { "read-write" } else { "read-only" }, g.id, stats.entry_writes, stats.path_writes);
        self.devices.push(DeviceMount { name, bdf, iova, window, guest: g.id });
        Ok(iova)
    }

    /// `edu_dma(direction, iova, len)`: a guest may only have edu move bytes inside the window
    /// of one of its own mounts in edu's domain (else it could read or overwrite morsels it
    /// did not mount there); only the guest edu is lent to has such mounts. Inside the window
    /// the IOMMU decides: past the end of the morsel, or a write through a read-only mount, is
    /// blocked and reported.
    pub fn edu_dma<B: Backend<Format = F>>(&self, g: &Guest<B>, a: [u64; 3]) -> Result<u64, Error> {
        let [direction, iova, len] = a;
        let edu = devices::with(|d| d.edu.as_ref().map(|e| e.bdf)).flatten().ok_or(Error::NotFound)?;
        let end = iova.checked_add(len).ok_or(Error::TooLarge)?;
        let inside = |d: &DeviceMount| d.guest == g.id && d.bdf == edu && d.iova <= iova && end <= d.iova + d.window;
        if !self.devices.iter().any(inside) {
            return Err(Error::Denied);
        }
        devices::edu_dma(direction, iova, len)
    }

    /// `device_unmount(bdf, iova)`: the caller's own device mounts only.
    pub fn device_unmount<B: Backend<Format = F>>(&mut self, g: &Guest<B>, frames: &Frames, a: [u64; 2]) -> Result<u64, Error> {
        let bdf = device(a[0])?;
        let i = self.devices.iter().position(|d| d.bdf == bdf && d.iova == a[1] && d.guest == g.id).ok_or(Error::NotFound)?;
        let d = self.devices.remove(i);
        self.device_unmount_one(&d, frames)
    }

    /// Clears a device mount's entry (and the intermediate tables it leaves empty) and
    /// flushes the domain's IOTLB.
    fn device_unmount_one(&mut self, m: &DeviceMount, frames: &Frames) -> Result<u64, Error> {
        self.devices.retain(|d| !(d.bdf == m.bdf && d.iova == m.iova));
        let n = self.named.get_mut(&m.name).ok_or(Error::NotFound)?;
        let stats = devices::with(|d| {
            let mem = d.vtd.mem;
            let dom = d.vtd.domain_of(m.bdf).ok_or(Error::NotFound)?;
            let s = unmount_in_domain(n, &mut dom.table, m.iova, frames, &mem)?;
            let id = dom.id;
            d.vtd.flush_domain(id).map_err(|_| Error::DeviceFault)?;
            Ok(s)
        })
        .unwrap_or(Err(Error::NotFound))?;
        n.unmounts += 1;
        n.unmount_pte_writes += stats.entry_writes as u64;
        n.invalidations += 1;
        log::info!(target: "morsel", "'{}' unmounted from device {} at I/O virtual address {:#x}: {} PTE write, 1 IOTLB invalidation, {} empty intermediate tables freed",
            m.name, m.bdf, m.iova, stats.entry_writes, stats.path_writes);
        Ok(0)
    }

    /// `nvme_read` / `nvme_write(gpa, offset, lba, count)`: the caller's morsel mounted at
    /// `gpa` is mounted into the NVMe domain for this call; the device moves the blocks. No
    /// guest can mount anything into that domain (`device_mount` does not offer NVMe), and the
    /// unmount takes the tables its mount created, so every call finds the proxy's I/O virtual
    /// addresses free.
    pub fn nvme_io<B: Backend<Format = F>>(&mut self, g: &Guest<B>, frames: &Frames, write: bool, a: [u64; 4]) -> Result<u64, Error> {
        let (gpa, offset, lba, count) = (a[0], a[1], a[2], a[3]);
        let m = g.mounts.iter().find(|m| m.gpa == gpa).ok_or(Error::NotFound)?;
        let bytes = count.checked_mul(abi::NVME_BLOCK).ok_or(Error::TooLarge)?;
        if count == 0 || offset % abi::NVME_BLOCK != 0 {
            return Err(Error::Invalid);
        }
        if offset.checked_add(bytes).is_none_or(|end| end > m.size) {
            return Err(Error::TooLarge);
        }
        // The device writes the morsel on a read: the caller must hold it writable.
        if !write && g.mem.translate(GuestPhysAddr::new(gpa), Perm::RW).is_err() {
            return Err(Error::Denied);
        }
        let perm = if write { Perm::RO } else { Perm::RW };
        let name = m.name.clone();
        let n = self.named.get_mut(&name).ok_or(Error::NotFound)?;
        let window = n.morsel.window_size();
        devices::with(|d| {
            let mem = d.vtd.mem;
            let bdf = d.nvme.as_ref().ok_or(Error::NotFound)?.bdf;
            let dom = d.vtd.domain_of(bdf).ok_or(Error::NotFound)?;
            let iova = devices::nvme::PROXY_IOVA.next_multiple_of(window);
            if iova.checked_add(window).is_none_or(|end| end > dom.table.limit()) {
                return Err(Error::TooLarge);
            }
            let (stats, how) = mount_in_domain(n, &mut dom.table, iova, perm, frames, &mem)?;
            let id = dom.id;
            d.vtd.flush_domain(id).map_err(|_| Error::DeviceFault)?;
            log::info!(target: "morsel", "'{name}' mounted {} into device {bdf} at I/O virtual address {iova:#x} for the NVMe proxy: {} PTE write (+{}), {how}",
                if write { "read-only" } else { "read-write" }, stats.entry_writes, stats.path_writes);
            let done = match d.nvme.as_mut() {
                Some(nv) => nv.io(write, iova + offset, lba, count),
                None => Err(devices::nvme::IoError::Invalid),
            };
            let faulted = devices::faults_of(d, bdf);
            let freed = match d.vtd.domain_of(bdf) {
                Some(dom) => unmount_in_domain(n, &mut dom.table, iova, frames, &mem).map_or(0, |s| s.path_writes),
                None => 0,
            };
            d.vtd.flush_domain(id).map_err(|_| Error::DeviceFault)?;
            log::info!(target: "morsel", "'{name}' unmounted from device {bdf} at {iova:#x}: 1 PTE write, 1 IOTLB invalidation, {freed} empty intermediate tables freed");
            match done {
                Ok(_) if faulted => Err(Error::DeviceFault),
                Ok(blocks) => Ok(blocks),
                Err(devices::nvme::IoError::Range) => Err(Error::TooLarge),
                Err(devices::nvme::IoError::Invalid) => Err(Error::Invalid),
                Err(devices::nvme::IoError::Device(status)) => {
                    log::error!(target: "nvme", "device {bdf}: command failed with status {status:#x} (0xffff: timeout)");
                    Err(Error::DeviceFault)
                }
            }
        })
        .unwrap_or(Err(Error::NotFound))
    }
}

/// Mounts a morsel into a device domain's table: its own subtree where the IOMMU can walk
/// the format (EPT), else its VT-d view (built on first use). Returns what it wrote and how.
fn mount_in_domain<F: Format>(
    n: &mut Named<F>,
    table: &mut SecondLevelTable<VtdSl>,
    iova: u64,
    perm: Perm,
    frames: &Frames,
    mem: &crate::iommu::vtd::VtdMem,
) -> Result<(MountStats, &'static str), Error> {
    let at = IoVirtAddr::new(iova);
    let r = if can_share::<F, VtdSl>() {
        n.morsel.mount(table, at, perm, frames, mem).map(|s| (s, "the morsel's own subtree (shared with EPT)"))
    } else {
        let view = match &mut n.vtd_view {
            Some(v) => v,
            slot @ None => {
                let v = n.morsel.view::<VtdSl>(frames, mem).map_err(|_| Error::NoMemory)?;
                log::info!(target: "morsel", "VT-d view of a {} {} morsel built: {} tables over the same data frames",
                    Bytes(v.len()), F::NAME, v.table_count());
                slot.insert(v)
            }
        };
        view.mount(table, at, perm, frames, mem).map(|s| (s, "its VT-d view over the same frames"))
    };
    r.map_err(|e| match e {
        morsel::Error::Occupied { .. } | morsel::Error::InsideMount { .. } => Error::Busy,
        morsel::Error::OutOfMemory => Error::NoMemory,
        _ => Error::Invalid,
    })
}

/// Undoes `mount_in_domain`, with the intermediate tables the mount left empty; the caller
/// flushes the domain's IOTLB.
fn unmount_in_domain<F: Format>(n: &mut Named<F>, table: &mut SecondLevelTable<VtdSl>, iova: u64, frames: &Frames, mem: &crate::iommu::vtd::VtdMem) -> Result<MountStats, Error> {
    let at = IoVirtAddr::new(iova);
    let r = if can_share::<F, VtdSl>() {
        n.morsel.unmount(table, at, frames, mem)
    } else {
        n.vtd_view.as_ref().ok_or(Error::NotFound)?.unmount(table, at, frames, mem)
    };
    r.map_err(|_| Error::Invalid)
}

/// A `bdf` argument: a 16-bit source id.
fn device(bdf: u64) -> Result<Bdf, Error> {
    u16::try_from(bdf).map(Bdf::from_source_id).map_err(|_| Error::Invalid)
}

/// The lowest window slot of `size` alignment that overlaps no mount.
fn free_slot(mounts: &[Mount], size: u64) -> Option<u64> {
    let (start, end) = (abi::MORSEL_WINDOW_GPA, abi::MORSEL_WINDOW_GPA + abi::MORSEL_WINDOW_SIZE);
    let mut at = start.next_multiple_of(size);
    while at + size <= end {
        match mounts.iter().find(|m| m.gpa < at + size && at < m.gpa + m.window) {
            None => return Some(at),
            Some(m) => at = (m.gpa + m.window).next_multiple_of(size),
        }
    }
    None
}

pub(super) fn read_name<B: Backend>(g: &Guest<B>, ptr: u64, len: u64) -> Result<String, Error> {
    if len == 0 || len > NAME_MAX as u64 {
        return Err(Error::Invalid);
    }
    let mut buf = [0u8; NAME_MAX];
    let buf = &mut buf[..len as usize];
    g.mem.read(GuestPhysAddr::new(ptr), buf)?;
    // Printable ASCII without spaces: names appear in logs and in other guests' calls.
    if !buf.iter().all(u8::is_ascii_graphic) {
        return Err(Error::Invalid);
    }
    try_string(core::str::from_utf8(buf).map_err(|_| Error::Invalid)?)
}

/// A copy of `s` on the heap, or `NoMemory` (never the allocation-failure panic).
fn try_string(s: &str) -> Result<String, Error> {
    let mut out = String::new();
    out.try_reserve_exact(s.len()).map_err(|_| Error::NoMemory)?;
    out.push_str(s);
    Ok(out)
}
