//! Morsels in device DMA domains: `device_mount` writes one entry in the device's IOMMU
//! domain (VT-d or AMD-Vi, `crate::iommu`) and invalidates its IOTLB (the `Flush` the mount
//! returns, committed at once; an unmount's is merged by callers that unmount several). EPT subtrees are
//! mounted into a VT-d domain as they are (the formats share, Xen's `iommu=sharept`);
//! otherwise the morsel gets a view in the IOMMU's format over the same data frames
//! (`Morsel::view`), built on its first device mount and kept with the morsel.

use super::{read_name, Directory, DeviceMount};
use crate::devices::{self, Devices};
use crate::mm::frames::Frames;
use crate::devices::pci::Bdf;
use crate::vm::guest::Guest;
use crate::vm::shootdown::{After, Flush, Hw};
use crate::vm::Backend;
use abi::{self, Error};
use morsel::{Format, GuestPhysAddr, Perm};
use vmcore::directory::Entry as _;
use vmcore::region_lock::Contender;

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    /// `device_mount(name_ptr, name_len, bdf, iova, writable)`. Only edu is offered: the
    /// hypervisor drives the NVMe controller itself (its domain is the proxy's), and other
    /// functions (host bridge, LPC, ...) it does not drive at all (`Denied`; `NotFound` where
    /// no function answers). edu is lent to one guest at a time: while one guest has a
    /// morsel mounted there, others get `Busy`; when a guest takes it over, its buffer is
    /// scrubbed first, so no guest's bytes reach another.
    #[allow(clippy::too_many_arguments)] // the call's four arguments and what it works on
    pub fn device_mount<B: Backend<Format = F>>(&mut self, g: &Guest<B>, devices: Option<&mut Devices>, frames: &Frames, name: abi::Name, bdf: Bdf, iova: u64, writable: bool) -> Result<u64, Error> {
        let name = read_name(g, name)?;
        let n = self.named.get_mut(&name).ok_or(Error::NotFound)?;
        if writable && !n.writable_by(g.id) {
            return Err(Error::Denied);
        }
        // A device view is built from the region's leaves, which a batch edits meanwhile.
        if n.admit(Contender::DeviceMount).is_err() {
            return Err(Error::Busy);
        }
        let window = n.morsel.window_size();
        let perm = if writable { Perm::RW } else { Perm::RO };
        if self.devices.iter().filter(|d| d.guest == g.id).count() >= abi::DEVICE_MOUNT_QUOTA as usize {
            return Err(Error::NoMemory);
        }
        self.devices.try_reserve(1).map_err(|_| Error::NoMemory)?;
        let lent_to = self.devices.iter().find(|d| d.bdf == bdf).map(|d| d.guest);
        let (stats, how) = devices.ok_or(Error::NotFound).and_then(|d| {
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
            let (stats, how, flush) = d.iommu.mount(bdf, &n.morsel, &mut n.views, iova, perm, frames).map_err(mount_error)?;
            if !flush.commit(&mut Hw(Some(d))).ok() {
                return Err(Error::DeviceFault);
            }
            Ok((stats, how))
        })?;
        n.count_mount(&stats, 1);
        log::info!(target: "morsel", "'{name}' mounted {} into device {bdf} at I/O virtual address {iova:#x} for guest {}: {} PTE write (+{} for new intermediate tables), 1 IOTLB invalidation, {how}",
            if writable { "read-write" } else { "read-only" }, g.id, stats.entry_writes, stats.path_writes);
        self.devices.push(DeviceMount { name, bdf, iova, window, guest: g.id });
        Ok(iova)
    }

    /// `device_unmount(bdf, iova)`: the caller's own device mounts only. The domain's IOTLB
    /// is invalidated before the call returns.
    pub fn device_unmount<B: Backend<Format = F>>(&mut self, g: &Guest<B>, devices: Option<&mut Devices>, frames: &Frames, bdf: Bdf, iova: u64) -> Result<u64, Error> {
        let i = self.devices.iter().position(|d| d.bdf == bdf && d.iova == iova && d.guest == g.id).ok_or(Error::NotFound)?;
        let m = self.devices.remove(i);
        let d = devices.ok_or(Error::NotFound)?;
        let flush = self.device_unmount_one(&m, d, &After(frames))?;
        match flush.commit(&mut Hw(Some(d))).ok() {
            true => Ok(0),
            false => Err(Error::DeviceFault),
        }
    }

    /// Clears a device mount's entry (and the intermediate tables it leaves empty, freed
    /// through `frames`: `shootdown::After` where the unit may still cache them, so they go
    /// back after the commit); returns the domain's IOTLB invalidation, for the caller to
    /// commit (merged with others').
    pub(crate) fn device_unmount_one(&mut self, m: &DeviceMount, d: &mut Devices, frames: &impl morsel::FrameAlloc) -> Result<Flush, Error> {
        self.devices.retain(|d| !(d.bdf == m.bdf && d.iova == m.iova));
        let n = self.named.get_mut(&m.name).ok_or(Error::NotFound)?;
        let (stats, flush) = d.iommu.unmount(m.bdf, &n.morsel, &mut n.views, m.iova, frames).map_err(|_| Error::Invalid)?;
        n.count_unmount(&stats);
        log::info!(target: "morsel", "'{}' unmounted from device {} at I/O virtual address {:#x}: {} PTE write, 1 IOTLB invalidation owed (committed once per domain for the call), {} empty intermediate tables freed",
            m.name, m.bdf, m.iova, stats.entry_writes, stats.path_writes);
        Ok(flush)
    }

}

/// A failed mount into a device domain, as the guest sees it.
pub(crate) fn mount_error(e: crate::iommu::MountError) -> Error {
    match e {
        crate::iommu::MountError::NoDomain => Error::NotFound,
        crate::iommu::MountError::Morsel(morsel::Error::Occupied { .. } | morsel::Error::InsideMount { .. }) => Error::Busy,
        crate::iommu::MountError::Morsel(morsel::Error::OutOfMemory) => Error::NoMemory,
        crate::iommu::MountError::Morsel(_) => Error::Invalid,
    }
}
