//! The directory's hypercalls: create, open (mount into the caller), unmount, size,
//! destroy, and what happens when a guest leaves and when the run ends. One mount = one entry
//! in the guest's second-level table; one unmount = one entry cleared, the intermediate
//! tables it left empty freed, and one invalidation of the guest's cached translations.

use super::persist::{self, Source};
use super::{read_name, try_string, Directory, Mount, Named, PendingCreate, Removed, Started, RESTORED};
use crate::devices::Devices;
use crate::mm::frames::{Frames, Identity, IDENTITY};
use crate::vm::guest::Guest;
use crate::vm::Backend;
use abi::{self, Error};
use alloc::string::String;
use alloc::vec::Vec;
use formats::units::Bytes;
use morsel::{Format, GuestPhysAddr, Morsel, PageSize, Perm};

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    /// `morsel_create(name_ptr, name_len, size, flags)`. A persistent morsel takes its frames
    /// from the persistent region and gets a directory record after its subtree is complete
    /// (all under the world lock: `Started::Done`). A RAM morsel gets its frames and tables
    /// here, its data frames are zeroed by the caller with the lock let go, and
    /// `create_finish` enters and mounts it (`Started::Zero`).
    pub fn create<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, name: abi::Name, size: u64, flags: abi::CreateFlags) -> Result<Started<F>, Error> {
        let name = read_name(g, name)?;
        let page = if flags.huge_pages { PageSize::Size2M } else { PageSize::Size4K };
        if size == 0 || size % page.bytes() != 0 {
            return Err(g.refuse(Error::Invalid, format_args!("size {} is not a positive multiple of the {} page", Bytes(size), Bytes(page.bytes()))));
        }
        if size > morsel::MAX_MORSEL || size > abi::MORSEL_WINDOW_SIZE {
            return Err(g.refuse(Error::TooLarge, format_args!("size {} is above the largest morsel, {}", Bytes(size), Bytes(morsel::MAX_MORSEL.min(abi::MORSEL_WINDOW_SIZE)))));
        }
        if self.named.contains_key(&name) || self.pending.iter().any(|(n, _)| *n == name) {
            return Err(g.refuse(Error::Busy, format_args!("the name {name:?} is taken")));
        }
        let pending = self.pending.iter().filter(|(_, owner)| *owner == g.id).count();
        if self.named.values().filter(|n| n.owner == g.id).count() + pending >= abi::MORSEL_QUOTA as usize
            || g.mounts.len() + pending >= abi::MOUNT_QUOTA as usize
        {
            return Err(Error::NoMemory);
        }
        self.named.try_reserve(1).map_err(|_| Error::NoMemory)?;
        self.pending.try_reserve(1).map_err(|_| Error::NoMemory)?;
        let others_may_write = flags.share_writable;
        let pm = if flags.persistent {
            let pm = self.pmem.ok_or(Error::Invalid)?;
            pm.claim_format(F::NAME).map_err(|_| Error::Invalid)?;
            Some(pm)
        } else {
            None
        };
        // More than the free RAM fails at once, not after taking (and giving back) all of it.
        if pm.is_none() && size / 4096 > frames.free_frames() as u64 {
            let free = Bytes(frames.free_frames() as u64 * 4096);
            return Err(g.refuse(Error::NoMemory, format_args!("size {} is more than the free memory, {free}", Bytes(size))));
        }
        let source = pm.map_or(Source::Ram(*frames), |pm| Source::Pmem(pm.frames()));
        let no_memory = |e| match e {
            morsel::Error::OutOfMemory => Error::NoMemory,
            _ => Error::Invalid,
        };
        if pm.is_none() {
            let reserved = try_string(&name)?;
            let morsel = Morsel::<F>::create(size, page, &source, &TablesOnly).map_err(no_memory)?;
            self.pending.push((reserved, g.id));
            return Ok(Started::Zero(PendingCreate { name, morsel, others_may_write }));
        }
        let morsel = Morsel::<F>::create(size, page, &source, &IDENTITY).map_err(no_memory)?;
        let slot = match pm.map(|pm| persist::add_record(pm, &name, &morsel, page, others_may_write)) {
            Some(None) => {
                let _ = morsel.destroy(&source, &IDENTITY);
                return Err(Error::NoMemory);
            }
            slot => slot.flatten(),
        };
        self.enter(g, frames, name, morsel, others_may_write, slot).map(Started::Done)
    }

    /// The rest of a RAM morsel's `create` once its data frames are zeroed (`Started::Zero`):
    /// into the directory and mounted read-write in `g`.
    pub fn create_finish<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, p: PendingCreate<F>) -> Result<u64, Error> {
        self.pending.retain(|(n, _)| *n != p.name);
        if self.named.try_reserve(1).is_err() {
            let _ = p.morsel.destroy(frames, &IDENTITY);
            return Err(Error::NoMemory);
        }
        self.enter(g, frames, p.name, p.morsel, p.others_may_write, None)
    }

    /// A `PendingCreate` whose guest is gone: its frames go back.
    pub fn abandon(&mut self, frames: &Frames, p: PendingCreate<F>) {
        self.pending.retain(|(n, _)| *n != p.name);
        let _ = p.morsel.destroy(frames, &IDENTITY);
    }

    /// Enters a complete new morsel (room reserved in `named`) and mounts it read-write in `g`.
    fn enter<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, name: String, morsel: Morsel<F>, others_may_write: bool, slot: Option<usize>) -> Result<u64, Error> {
        let page = morsel.page_size();
        log::info!(target: "morsel", "guest {} created '{name}': {} of {} pages, root L{}, {} tables{}",
            g.id, Bytes(morsel.len()), if page == PageSize::Size2M { "2 MiB" } else { "4 KiB" },
            morsel.root_level(), morsel.table_count(),
            if let Some(i) = slot { alloc::format!(", in persistent memory (record {i})") } else { String::new() });
        self.named.insert(name.clone(), Named::new(morsel, g.id, others_may_write, slot));
        let gpa = self.mount(g, frames, &name, true);
        if gpa.is_err() {
            // Nobody can have mounted it yet: give the frames back.
            self.remove(&name, frames);
        }
        gpa
    }

    /// Adds an ExMap region (a sparse morsel, see `vm/exmap.rs`) named `name`, owned by `g`,
    /// and mounts it read-write there; from then on it is shared like any morsel.
    pub(crate) fn add_region<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, name: String, morsel: Morsel<F>, others_may_write: bool) -> Result<u64, Error> {
        if self.named.contains_key(&name) {
            let _ = morsel.destroy(frames, &IDENTITY);
            return Err(Error::Busy);
        }
        self.named.insert(name.clone(), Named::new(morsel, g.id, others_may_write, None));
        let gpa = self.mount(g, frames, &name, true);
        if gpa.is_err() {
            self.remove(&name, frames);
        }
        gpa
    }

    /// `morsel_open(name_ptr, name_len, writable)`.
    pub fn open<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, name: abi::Name, writable: bool) -> Result<u64, Error> {
        let name = read_name(g, name)?;
        let n = self.named.get(&name).ok_or(Error::NotFound)?;
        if writable && !n.writable_by(g.id) {
            return Err(Error::Denied);
        }
        if g.mounts.iter().any(|m| m.name == name) {
            return Err(g.refuse(Error::Busy, format_args!("{name:?} is already mounted in this guest")));
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
        n.count_mount(&stats, 0);
        log::info!(target: "morsel", "'{name}' mounted {} into guest {} at {gpa:#x}: {} PTE write (+{} for new intermediate tables)",
            if writable { "read-write" } else { "read-only" }, g.id, stats.entry_writes, stats.path_writes);
        log::info!(target: "evt", "morsel.mount guest={} name={name} writable={} gpa={gpa:#x} pte_writes={} path_writes={}",
            g.id, u8::from(writable), stats.entry_writes, stats.path_writes);
        g.mounts.push(Mount { gpa, size: n.morsel.len(), window: size, name: mount_name, writable });
        Ok(gpa)
    }

    /// `morsel_unmount(gpa)`. The intermediate tables the mount created go with it (else a
    /// later morsel with a larger window would find its slot taken).
    pub fn unmount<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, gpa: u64) -> Result<u64, Error> {
        let i = g.mounts.iter().position(|m| m.gpa == gpa).ok_or(Error::NotFound)?;
        let m = g.mounts.remove(i);
        let n = self.named.get_mut(&m.name).ok_or(Error::NotFound)?;
        let stats = n.morsel.unmount(g.mem.table_mut(), GuestPhysAddr::new(gpa), frames, &IDENTITY).map_err(|_| Error::Invalid)?;
        crate::vm::shootdown::guest(g);
        n.count_unmount(&stats);
        log::info!(target: "morsel", "'{}' unmounted from guest {} at {gpa:#x}: {} PTE write, 1 invalidation, {} empty intermediate tables freed",
            m.name, g.id, stats.entry_writes, stats.path_writes);
        log::info!(target: "evt", "morsel.unmount guest={} name={} gpa={gpa:#x} pte_writes={} invalidations=1 tables_freed={}",
            g.id, m.name, stats.entry_writes, stats.path_writes);
        Ok(0)
    }

    /// `morsel_size(gpa)`.
    pub fn size<B: Backend<Format = F>>(&self, g: &Guest<B>, gpa: u64) -> Result<u64, Error> {
        g.mounts.iter().find(|m| m.gpa == gpa).map(|m| m.size).ok_or(Error::NotFound)
    }

    /// `morsel_destroy(name_ptr, name_len)`: the owner only, and only while unmounted. A RAM
    /// morsel leaves the directory here and is returned with its name, for the caller to free
    /// its frames with the world lock let go (`Removed::free`); a persistent one is freed here.
    pub fn destroy<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, name: abi::Name) -> Result<Option<(String, Removed<F>)>, Error> {
        let name = read_name(g, name)?;
        let n = self.named.get(&name).ok_or(Error::NotFound)?;
        if n.owner != g.id && !(n.owner == RESTORED && n.others_may_write) {
            return Err(Error::Denied);
        }
        if n.in_io {
            return Err(g.refuse(Error::Busy, format_args!("{name:?} has NVMe I/O in flight")));
        }
        if n.morsel.mount_count() > 0 || self.devices.iter().any(|d| d.name == name) {
            let devices = self.devices.iter().filter(|d| d.name == name).count();
            return Err(g.refuse(Error::Busy, format_args!("{name:?} is still mounted ({} guest, {devices} device mounts)", n.morsel.mount_count())));
        }
        if n.slot.is_some() {
            self.remove(&name, frames);
            return Ok(None);
        }
        let Some(mut n) = self.named.remove(&name) else { return Err(Error::NotFound) };
        self.drop_view(&name, &mut n, frames);
        Ok(Some((name, Removed { morsel: n.morsel })))
    }

    /// Destroys a morsel that is mounted nowhere (the callers check). A persistent one loses
    /// its record first, then its frames.
    pub(crate) fn remove(&mut self, name: &str, frames: &Frames) {
        if let Some(mut n) = self.named.remove(name) {
            self.drop_view(name, &mut n, frames);
            let source = match (n.slot, self.pmem) {
                (Some(slot), Some(pm)) => {
                    pm.remove_record(slot);
                    Source::Pmem(pm.frames())
                }
                _ => Source::Ram(*frames),
            };
            let len = n.morsel.len();
            let destroyed = n.morsel.destroy(&source, &IDENTITY);
            if let (Some(_), Some(pm)) = (n.slot, self.pmem) {
                // The frees reach the media before anything else changes there.
                pm.write_back_frees();
            }
            match destroyed {
                Ok(()) => log::info!(target: "morsel", "'{name}' destroyed, {} given back{}", Bytes(len),
                    if n.slot.is_some() { " to persistent memory" } else { "" }),
                Err((_, e)) => log::error!(target: "morsel", "'{name}' cannot be destroyed: {e}"),
            }
        }
    }

    /// Destroys a morsel's device views or EPT twin (their tables are RAM frames, also for a
    /// persistent morsel; data frames stay the morsel's).
    pub(crate) fn drop_view(&self, name: &str, n: &mut Named<F>, frames: &Frames) {
        if let Some((count, tables, format)) = n.views.destroy(frames) {
            let what = if format == "EPT" { "twin" } else if count > 1 { "views" } else { "view" };
            log::info!(target: "morsel", "'{name}': {format} {what} destroyed, {tables} tables given back");
        }
    }

    /// Drops every mount of a guest that is leaving (device mounts too).
    pub fn drop_mounts<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, mut devices: Option<&mut Devices>, frames: &Frames) {
        while let Some(m) = self.devices.iter().find(|d| d.guest == g.id).cloned() {
            match devices.as_deref_mut() {
                Some(d) => {
                    let _ = self.device_unmount_one(&m, d, frames);
                }
                None => self.devices.retain(|d| d.guest != g.id),
            }
        }
        while let Some(m) = g.mounts.last().cloned() {
            if self.unmount(g, frames, m.gpa).is_err() {
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
    pub fn destroy_all(&mut self, devices: Option<&mut Devices>, frames: &Frames) {
        let mounts = core::mem::take(&mut self.devices);
        if let Some(d) = devices {
            for m in mounts {
                let _ = self.device_unmount_one(&m, d, frames);
            }
            d.iommu.prune_domains(frames);
            d.iommu.poll_faults();
            let (faults, invalidations) = d.iommu.counters();
            log::info!(target: "iommu", "end of run: {faults} DMA fault(s) reported, {invalidations} IOTLB invalidations ({})", d.iommu.name());
        }
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
        if let Some(pm) = self.pmem {
            log::info!(target: "pmem", "end of run: {} allocated, {} free", Bytes(pm.allocated_frames() * 4096), Bytes(pm.free_bytes()));
        }
    }
}

/// The identity map for building a new RAM morsel under the world lock, without zeroing its
/// data frames (`PendingCreate::zero` does that with the lock let go); tables are zeroed.
struct TablesOnly;

impl morsel::PhysMem for TablesOnly {
    fn read(&self, table: morsel::HostPhysAddr, index: usize) -> u64 {
        Identity.read(table, index)
    }
    fn write(&self, table: morsel::HostPhysAddr, index: usize, value: u64) {
        Identity.write(table, index, value)
    }
    fn zero_table(&self, table: morsel::HostPhysAddr) {
        Identity.zero_table(table)
    }
    fn zero_data(&self, _: morsel::HostPhysAddr, _: u32) {}
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

