//! Morsels in device DMA domains: `device_mount` writes one entry in the device's VT-d
//! domain and flushes its IOTLB. EPT subtrees are mounted into the domain as they are (the
//! formats share, Xen's `iommu=sharept`); an NPT morsel gets a VT-d view over the same data
//! frames (`Morsel::view`), built on its first device mount and kept with the morsel.

use super::{read_name, Directory, DeviceMount, Named};
use crate::devices;
use crate::frames::Frames;
use crate::pci::Bdf;
use crate::vm::guest::Guest;
use crate::vm::Backend;
use abi::{self, Error};
use formats::units::Bytes;
use morsel::{can_share, Format, GuestPhysAddr, IoVirtAddr, MountStats, Perm, SecondLevelTable, VtdSl};

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
        if writable && !n.writable_by(g.id) {
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
        n.count_mount(&stats, 1);
        log::info!(target: "morsel", "'{name}' mounted {} into device {bdf} at I/O virtual address {iova:#x} for guest {}: {} PTE write (+{} for new intermediate tables), 1 IOTLB invalidation, {how}",
            if writable { "read-write" } else { "read-only" }, g.id, stats.entry_writes, stats.path_writes);
        self.devices.push(DeviceMount { name, bdf, iova, window, guest: g.id });
        Ok(iova)
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
    pub(crate) fn device_unmount_one(&mut self, m: &DeviceMount, frames: &Frames) -> Result<u64, Error> {
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
        n.count_unmount(&stats);
        log::info!(target: "morsel", "'{}' unmounted from device {} at I/O virtual address {:#x}: {} PTE write, 1 IOTLB invalidation, {} empty intermediate tables freed",
            m.name, m.bdf, m.iova, stats.entry_writes, stats.path_writes);
        Ok(0)
    }

}

/// Mounts a morsel into a device domain's table: its own subtree where the IOMMU can walk
/// the format (EPT), else its VT-d view (built on first use). Returns what it wrote and how.
pub(crate) fn mount_in_domain<F: Format>(
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
pub(crate) fn unmount_in_domain<F: Format>(n: &mut Named<F>, table: &mut SecondLevelTable<VtdSl>, iova: u64, frames: &Frames, mem: &crate::iommu::vtd::VtdMem) -> Result<MountStats, Error> {
    let at = IoVirtAddr::new(iova);
    let r = if can_share::<F, VtdSl>() {
        n.morsel.unmount(table, at, frames, mem)
    } else {
        n.vtd_view.as_ref().ok_or(Error::NotFound)?.unmount(table, at, frames, mem)
    };
    r.map_err(|_| Error::Invalid)
}

/// A `bdf` argument: a 16-bit source id.
pub(crate) fn device(bdf: u64) -> Result<Bdf, Error> {
    u16::try_from(bdf).map(Bdf::from_source_id).map_err(|_| Error::Invalid)
}

