//! The morsel manager: named morsels with an owner, a grant (may others write?), reference
//! counts (the morsel's mount count) and the hypercalls that create, open (mount), unmount,
//! size, destroy and report them. Mounting writes one entry in the guest's second-level
//! table; unmounting clears it and invalidates the guest's cached translations.

use super::guest::Guest;
use super::Backend;
use crate::frames::{Frames, IDENTITY};
use alloc::string::String;
use alloc::vec::Vec;
use guest_lib::abi::{self, Error};
use hashbrown::HashMap;
use morsel::{Format, GuestPhysAddr, Morsel, PageSize, Perm};

/// Longest morsel name.
pub const NAME_MAX: usize = 32;

/// One named morsel.
struct Named<F: Format> {
    morsel: Morsel<F>,
    owner: u32,
    others_may_write: bool,
    /// PTE writes for mounts, unmounts; TLB invalidations.
    mounts: u64,
    unmounts: u64,
    mount_pte_writes: u64,
    path_pte_writes: u64,
    unmount_pte_writes: u64,
    invalidations: u64,
}

/// A mount in one guest.
#[derive(Clone, Debug)]
pub struct Mount {
    pub gpa: u64,
    pub size: u64,
    /// The guest-physical span the mount occupies (the span of the morsel's root table).
    pub window: u64,
    pub name: String,
}

/// All morsels of the run.
pub struct Directory<F: Format> {
    named: HashMap<String, Named<F>>,
}

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    pub fn new() -> Self {
        Directory { named: HashMap::new() }
    }

    /// `morsel_create(name_ptr, name_len, size, flags)`.
    pub fn create<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, a: [u64; 4]) -> Result<u64, Error> {
        let name = read_name(g, a[0], a[1])?;
        let (size, flags) = (a[2], a[3]);
        if flags & !(abi::MORSEL_HUGE_PAGES | abi::MORSEL_SHARE_WRITABLE) != 0 {
            return Err(Error::Invalid);
        }
        let page = if flags & abi::MORSEL_HUGE_PAGES != 0 { PageSize::Size2M } else { PageSize::Size4K };
        if size == 0 || size % page.bytes() != 0 {
            return Err(Error::Invalid);
        }
        if size > morsel::MAX_MORSEL || size > abi::MORSEL_WINDOW_SIZE {
            return Err(Error::TooLarge);
        }
        if self.named.contains_key(&name) {
            return Err(Error::Busy);
        }
        let morsel = Morsel::<F>::create(size, page, frames, &IDENTITY).map_err(|e| match e {
            morsel::Error::OutOfMemory => Error::NoMemory,
            _ => Error::Invalid,
        })?;
        log::info!(target: "morsel", "guest {} created '{name}': {} MiB of {} pages, root L{}, {} tables",
            g.id, size >> 20, if page == PageSize::Size2M { "2 MiB" } else { "4 KiB" },
            morsel.root_level(), morsel.table_count());
        self.named.insert(name.clone(), Named {
            morsel,
            owner: g.id,
            others_may_write: flags & abi::MORSEL_SHARE_WRITABLE != 0,
            mounts: 0,
            unmounts: 0,
            mount_pte_writes: 0,
            path_pte_writes: 0,
            unmount_pte_writes: 0,
            invalidations: 0,
        });
        let gpa = self.mount(g, frames, &name, true);
        if gpa.is_err() {
            // Nobody can have mounted it yet: give the frames back.
            if let Some(n) = self.named.remove(&name) {
                let _ = n.morsel.destroy(frames, &IDENTITY);
            }
        }
        gpa
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
            return Err(Error::Busy);
        }
        self.mount(g, frames, &name, writable)
    }

    fn mount<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, frames: &Frames, name: &str, writable: bool) -> Result<u64, Error> {
        let n = self.named.get_mut(name).ok_or(Error::NotFound)?;
        let size = n.morsel.window_size();
        let gpa = free_slot(&g.mounts, size).ok_or(Error::NoMemory)?;
        let perm = if writable { Perm::RW } else { Perm::RO };
        let stats = n
            .morsel
            .mount(&mut g.mem, GuestPhysAddr::new(gpa), perm, frames, &IDENTITY)
            .map_err(|_| Error::NoMemory)?;
        n.mounts += 1;
        n.mount_pte_writes += stats.entry_writes as u64;
        n.path_pte_writes += stats.path_writes as u64;
        log::info!(target: "morsel", "'{name}' mounted {} into guest {} at {gpa:#x}: {} PTE write (+{} for new intermediate tables)",
            if writable { "read-write" } else { "read-only" }, g.id, stats.entry_writes, stats.path_writes);
        g.mounts.push(Mount { gpa, size: n.morsel.len(), window: size, name: name.into() });
        Ok(gpa)
    }

    /// `morsel_unmount(gpa)`.
    pub fn unmount<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, backend: &mut B, gpa: u64) -> Result<u64, Error> {
        let i = g.mounts.iter().position(|m| m.gpa == gpa).ok_or(Error::NotFound)?;
        let m = g.mounts.remove(i);
        let n = self.named.get_mut(&m.name).ok_or(Error::NotFound)?;
        let stats = n.morsel.unmount(&mut g.mem, GuestPhysAddr::new(gpa), &IDENTITY).map_err(|_| Error::Invalid)?;
        if let Some(vcpu) = g.vcpu.as_mut() {
            backend.flush_second_level(vcpu);
        }
        n.unmounts += 1;
        n.unmount_pte_writes += stats.entry_writes as u64;
        n.invalidations += 1;
        log::info!(target: "morsel", "'{}' unmounted from guest {} at {gpa:#x}: {} PTE write, 1 invalidation",
            m.name, g.id, stats.entry_writes);
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
        if n.owner != g.id {
            return Err(Error::Denied);
        }
        if n.morsel.mount_count() > 0 {
            return Err(Error::Busy);
        }
        self.remove(&name, frames);
        Ok(0)
    }

    /// Destroys a morsel that is mounted nowhere (the callers check).
    fn remove(&mut self, name: &str, frames: &Frames) {
        if let Some(n) = self.named.remove(name) {
            let len = n.morsel.len();
            match n.morsel.destroy(frames, &IDENTITY) {
                Ok(()) => log::info!(target: "morsel", "'{name}' destroyed, {} MiB given back", len >> 20),
                Err((_, e)) => log::error!(target: "morsel", "'{name}' cannot be destroyed: {e}"),
            }
        }
    }

    /// Drops every mount of a guest that is leaving.
    pub fn drop_mounts<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, backend: &mut B) {
        while let Some(m) = g.mounts.last().cloned() {
            if self.unmount(g, backend, m.gpa).is_err() {
                g.mounts.pop();
            }
        }
    }

    /// Prints the counters of every morsel.
    pub fn log_stats(&self) {
        for (name, n) in &self.named {
            log::info!(target: "morsel",
                "stats '{name}': {} MiB, owner guest {}, mounted now {}, mounts {} ({} PTE writes, {} per mount; +{} for intermediate tables), unmounts {} ({} PTE writes), invalidations {}",
                n.morsel.len() >> 20, n.owner, n.morsel.mount_count(), n.mounts, n.mount_pte_writes,
                if n.mounts > 0 { n.mount_pte_writes / n.mounts } else { 0 }, n.path_pte_writes,
                n.unmounts, n.unmount_pte_writes, n.invalidations);
        }
    }

    /// Destroys every morsel left at the end of the run (all guests are gone).
    pub fn destroy_all(&mut self, frames: &Frames) {
        let names: Vec<String> = self.named.keys().cloned().collect();
        for name in names {
            self.remove(&name, frames);
        }
    }
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

fn read_name<B: Backend>(g: &Guest<B>, ptr: u64, len: u64) -> Result<String, Error> {
    if len == 0 || len > NAME_MAX as u64 {
        return Err(Error::Invalid);
    }
    let mut buf = [0u8; NAME_MAX];
    let buf = &mut buf[..len as usize];
    if ptr.checked_add(len).is_none() || !g.read(ptr, buf) {
        return Err(Error::BadAddress);
    }
    core::str::from_utf8(buf).map(String::from).map_err(|_| Error::Invalid)
}
