//! Calls that make a device move a guest's morsel: `edu_dma` (only inside the caller's own
//! edu mounts) and the NVMe proxy (`nvme_io`: ExMap's pread done by hardware: the caller's
//! morsel is mounted into the NVMe domain for one call, the device DMAs into its frames).

use super::device_mounts::mount_error;
use super::{DeviceMount, Directory};
use crate::devices::{self, Devices};
use crate::mm::frames::Frames;
use crate::vm::guest::Guest;
use crate::vm::Backend;
use abi::{self, Error};
use morsel::{Format, GuestPhysAddr, Perm};

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    /// `edu_dma(direction, iova, len)`: a guest may only have edu move bytes inside the window
    /// of one of its own mounts in edu's domain (else it could read or overwrite morsels it
    /// did not mount there); only the guest edu is lent to has such mounts. Inside the window
    /// the IOMMU decides: past the end of the morsel, or a write through a read-only mount, is
    /// blocked and reported.
    pub fn edu_dma<B: Backend<Format = F>>(&self, g: &Guest<B>, devices: Option<&mut Devices>, to_device: bool, iova: u64, len: u64) -> Result<u64, Error> {
        let d = devices.ok_or(Error::NotFound)?;
        let edu = d.edu.as_ref().map(|e| e.bdf).ok_or(Error::NotFound)?;
        let end = iova.checked_add(len).ok_or(Error::TooLarge)?;
        let inside = |d: &DeviceMount| d.guest == g.id && d.bdf == edu && d.iova <= iova && end <= d.iova + d.window;
        if !self.devices.iter().any(inside) {
            return Err(Error::Denied);
        }
        devices::edu_dma(d, to_device, iova, len)
    }

    /// `nvme_read` / `nvme_write(gpa, offset, lba, count)`: the caller's morsel mounted at
    /// `gpa` is mounted into the NVMe domain for this call; the device moves the blocks. No
    /// guest can mount anything into that domain (`device_mount` does not offer NVMe), and the
    /// unmount takes the tables its mount created, so every call finds the proxy's I/O virtual
    /// addresses free.
    #[allow(clippy::too_many_arguments)] // the call's four arguments, the caller and the direction
    pub fn nvme_io<B: Backend<Format = F>>(&mut self, g: &Guest<B>, devices: Option<&mut Devices>, frames: &Frames, write: bool, gpa: u64, offset: u64, lba: u64, count: u64) -> Result<u64, Error> {
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
        devices.ok_or(Error::NotFound).and_then(|d| {
            let bdf = d.nvme.as_ref().ok_or(Error::NotFound)?.bdf;
            let limit = d.iommu.limit(bdf).ok_or(Error::NotFound)?;
            let iova = devices::nvme::PROXY_IOVA.next_multiple_of(window);
            if iova.checked_add(window).is_none_or(|end| end > limit) {
                return Err(Error::TooLarge);
            }
            let (stats, how) = d.iommu.mount(bdf, &n.morsel, &mut n.views, iova, perm, frames).map_err(mount_error)?;
            d.iommu.invalidate(bdf).map_err(|_| Error::DeviceFault)?;
            log::info!(target: "morsel", "'{name}' mounted {} into device {bdf} at I/O virtual address {iova:#x} for the NVMe proxy: {} PTE write (+{}), {how}",
                if write { "read-only" } else { "read-write" }, stats.entry_writes, stats.path_writes);
            let done = match d.nvme.as_mut() {
                Some(nv) => nv.io(write, iova + offset, lba, count),
                None => Err(devices::nvme::IoError::Invalid),
            };
            let faulted = devices::faults_of(d, bdf);
            let freed = d.iommu.unmount(bdf, &n.morsel, &mut n.views, iova, frames).map_or(0, |s| s.path_writes);
            d.iommu.invalidate(bdf).map_err(|_| Error::DeviceFault)?;
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
    }
}
