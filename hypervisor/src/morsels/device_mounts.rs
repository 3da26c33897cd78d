//! Morsels in device DMA domains: the hypervisor's part of a device mount. What the directory
//! decides (who may mount read-write, `abi::DEVICE_MOUNT_QUOTA` per guest, which guest may
//! unmount, a destroy while device-mounted, a leaving guest) is `vmcore::directory`'s, the
//! same code as for guest mounts, over a `DmaSpace` whose `Domain` is `Domains` here: edu
//! lent to one guest at a time (and scrubbed before it changes hands), the entry written in
//! the device's IOMMU domain (VT-d or AMD-Vi, `crate::iommu`) and the IOTLB invalidation it
//! owes (`Flush`, committed by the call; merged by callers that unmount several). EPT
//! subtrees are mounted into a VT-d domain as they are (the formats share, Xen's
//! `iommu=sharept`); otherwise the morsel gets a view in the IOMMU's format over the same
//! data frames (`Morsel::view`), built on its first device mount and kept with the morsel.

use super::{read_hashed, Directory, Named};
use crate::devices::pci::Bdf;
use crate::devices::{self, Devices};
use crate::mm::frames::{Frames, IDENTITY};
use crate::vm::guest::Guest;
use crate::vm::shootdown::{After, Flush, Hw};
use crate::vm::Backend;
use abi::{self, Error};
use morsel::{Format, FrameAlloc, GuestPhysAddr, MountStats, Perm, PhysMem};
use vmcore::directory::{self, DeviceMount, DmaSpace, Refusal, Unmounted};
use vmcore::region_lock::Contender;

/// The device domains as `vmcore::directory` mounts into them for one call: the devices
/// (none without an IOMMU), the IOTLB invalidations owed so far, and for a mount, the guest
/// asking and the one edu is lent to now.
pub(crate) struct Domains<'a> {
    devices: Option<&'a mut Devices>,
    guest: u32,
    /// The guest with a mount in edu's domain (one at a time).
    lent_to: Option<u32>,
    /// The IOTLB invalidations the mounts and unmounts owe, for the caller to commit.
    flush: Flush,
    /// How the last mount went in (for its log line).
    how: &'static str,
}

impl<'a> Domains<'a> {
    pub(crate) fn new(devices: Option<&'a mut Devices>) -> Self {
        Domains { devices, guest: 0, lent_to: None, flush: Flush::none(), how: "" }
    }

    /// Commits the invalidations owed: false if a domain's could not be done.
    fn commit(&mut self) -> bool {
        let flush = core::mem::replace(&mut self.flush, Flush::none());
        flush.commit(&mut Hw(self.devices.as_deref_mut())).ok()
    }
}

impl<F: Format> vmcore::directory::Domain<F, Named<F>> for Domains<'_> {
    /// Only edu is offered: the hypervisor drives the NVMe controller itself (its domain is
    /// the proxy's), and other functions (host bridge, LPC, ...) it does not drive at all
    /// (`Denied`; `NotFound` where no function answers). edu is lent to one guest at a time:
    /// while one guest has a morsel mounted there, others get `Busy`; when a guest takes it
    /// over, its buffer is scrubbed first, so no guest's bytes reach another.
    fn mount<A: FrameAlloc, M: PhysMem>(&mut self, bdf: Bdf, n: &mut Named<F>, iova: u64, perm: Perm, alloc: &A, _: &M) -> Result<MountStats, Refusal> {
        let refuse = |e| Err(Refusal::Domain(e));
        let Some(d) = self.devices.as_deref_mut() else { return refuse(Error::NotFound) };
        if !d.functions.iter().any(|f| f.bdf == bdf) {
            return refuse(Error::NotFound);
        }
        if d.edu.as_ref().map(|e| e.bdf) != Some(bdf) {
            return refuse(Error::Denied);
        }
        match self.lent_to {
            Some(other) if other != self.guest => return refuse(Error::Busy),
            Some(_) => {}
            None => devices::edu_scrub(d).map_err(Refusal::Domain)?,
        }
        // The unit's tables are seen through its own memory (`Iommu::Mem`), not `mem`.
        let (stats, how, flush) = d.iommu.mount(bdf, &n.morsel, &mut n.views, iova, perm, alloc).map_err(mount_refusal)?;
        self.flush.merge(flush);
        self.how = how;
        Ok(stats)
    }

    fn unmount<A: FrameAlloc, M: PhysMem>(&mut self, bdf: Bdf, n: &mut Named<F>, iova: u64, alloc: &A, _: &M) -> Result<MountStats, Refusal> {
        let d = self.devices.as_deref_mut().ok_or(Refusal::Domain(Error::NotFound))?;
        let (stats, flush) = d.iommu.unmount(bdf, &n.morsel, &mut n.views, iova, alloc).map_err(|e| match e {
            crate::iommu::MountError::NoDomain => Refusal::Domain(Error::Invalid),
            crate::iommu::MountError::Morsel(e) => Refusal::Unmount(e),
        })?;
        self.flush.merge(flush);
        Ok(stats)
    }
}

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    /// `device_mount(name_ptr, name_len, bdf, iova, writable)`: `vmcore::directory::open`
    /// into `bdf`'s domain (see `Domains` for which devices take mounts); the domain's IOTLB
    /// is invalidated before the call returns.
    #[allow(clippy::too_many_arguments)] // the call's four arguments and what it works on
    pub fn device_mount<B: Backend<Format = F>>(&mut self, g: &Guest<B>, devices: Option<&mut Devices>, name: abi::Name, bdf: Bdf, iova: u64, writable: bool) -> Result<u64, Error> {
        let frames = &Frames::here();
        let hashed = read_hashed(g, self.named.keys(), name)?;
        let name = *hashed.name();
        let mut domains = Domains { guest: g.id, lent_to: self.devices.user_of(bdf), ..Domains::new(devices) };
        let mut space = DmaSpace { guest: g.id, bdf, iova, mounts: &mut self.devices, domain: &mut domains };
        // A device view is built from the region's leaves, which a batch edits meanwhile.
        let admit = |n: &Named<F>| n.admit(Contender::DeviceMount).is_ok();
        let m = match directory::open(&mut self.named, &mut space, &hashed, writable, admit, frames, &IDENTITY) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Error::Busy),
            Err(e) => return Err(e.error()),
        };
        if !domains.commit() {
            // Recorded: the guest (or its leaving) unmounts it.
            return Err(Error::DeviceFault);
        }
        log::info!(target: "morsel", "'{name}' mounted {} into device {bdf} at I/O virtual address {iova:#x} for guest {}: {} PTE write (+{} for new intermediate tables), 1 IOTLB invalidation, {}",
            if writable { "read-write" } else { "read-only" }, g.id, m.stats.entry_writes, m.stats.path_writes, domains.how);
        Ok(m.addr)
    }

    /// `device_unmount(bdf, iova)`: the caller's own device mounts only. The domain's IOTLB
    /// is invalidated before the call returns.
    pub fn device_unmount<B: Backend<Format = F>>(&mut self, g: &Guest<B>, devices: Option<&mut Devices>, bdf: Bdf, iova: u64) -> Result<u64, Error> {
        let frames = &Frames::here();
        let mut domains = Domains::new(devices);
        let mut space = DmaSpace { guest: g.id, bdf, iova, mounts: &mut self.devices, domain: &mut domains };
        // The emptied tables stay with this CPU until the invalidation is done.
        let u = directory::unmount(&mut self.named, &mut space, iova, &After(frames), &IDENTITY).map_err(Refusal::error)?;
        log_device_unmount(u);
        match domains.commit() {
            true => Ok(0),
            false => Err(Error::DeviceFault),
        }
    }

    /// Unmounts every device mount of `guest` (each domain's IOTLB invalidation merged into
    /// `flush`, for the caller to commit; the emptied tables go to `alloc`, which keeps them
    /// until then where the unit may still walk them).
    pub(crate) fn drop_device_mounts(&mut self, guest: u32, devices: Option<&mut Devices>, alloc: &impl FrameAlloc, flush: &mut Flush) {
        let mut domains = Domains::new(devices);
        directory::drop_device_mounts(&mut self.named, &mut self.devices, guest, &mut domains, alloc, &IDENTITY, log_device_unmount);
        flush.merge(domains.flush);
    }
}

/// Logs a device unmount (the text scenarios match); its invalidation is the caller's.
fn log_device_unmount(u: Unmounted<DeviceMount>) {
    let (m, stats) = (u.mount, u.stats);
    log::info!(target: "morsel", "'{}' unmounted from device {} at I/O virtual address {:#x}: {} PTE write, 1 IOTLB invalidation owed (committed once per domain for the call), {} empty intermediate tables freed",
        m.name, m.bdf, m.iova, stats.entry_writes, stats.path_writes);
}

/// A failed mount into a device domain, as `vmcore::directory` words it.
fn mount_refusal(e: crate::iommu::MountError) -> Refusal {
    match e {
        crate::iommu::MountError::NoDomain => Refusal::Domain(Error::NotFound),
        crate::iommu::MountError::Morsel(e) => Refusal::Mount(e),
    }
}

/// A failed mount into a device domain, as the guest sees it (the NVMe proxy's too).
pub(crate) fn mount_error(e: crate::iommu::MountError) -> Error {
    mount_refusal(e).error()
}
