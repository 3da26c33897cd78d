//! The IOMMU, vendor-neutral: the `Iommu` trait over Intel VT-d (`vtd`, found through the
//! ACPI DMAR) and the AMD IOMMU (`amdvi`, found through the IVRS), and the device-mount
//! operations written once over it: a morsel goes into a device's domain with one entry,
//! its own subtree where the IOMMU walks the morsel's format, else a view in the IOMMU's
//! format over the same data frames (built on first use and kept with the morsel; AMD-Vi
//! keeps a second, read-only one for read-only mounts, see `Views::amd_ro`).
//! `Unit` is the one found at boot; which one comes from the ACPI tables, not the CPU.

pub mod amdvi;
pub mod dmar;
pub mod domain;
pub mod vtd;

use crate::mm::frames::Frames;
use crate::devices::pci::Bdf;
use alloc::vec::Vec;
use morsel::{can_share, AmdV1, Ept, Format, FormatKind, FrameAlloc, HostPhysAddr, IoVirtAddr, Morsel, MountStats, PageSize, Perm, PhysMem, SecondLevelTable, VtdSl};

pub use amdvi::AmdVi;
pub use vtd::Vtd;

/// What a mount or unmount in a domain still owes: its IOTLB invalidation (`vmcore::flush`;
/// the VM layer's `shootdown::Flush`, committed there).
type Flush = vmcore::flush::Flush<Bdf>;

/// Why an IOMMU cannot be used, or an operation on it failed.
#[derive(Debug)]
pub enum Error {
    NoLevels(u64),
    NoMemory,
    Timeout(&'static str),
    TooManyDomains,
    BadBase(u64),
    /// The unit rejected a queued descriptor or command at this offset.
    QueueRejected(u64),
    /// No domain for that device.
    NoDomain,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            Error::NoLevels(sagaw) => write!(f, "no supported second-level table depth (SAGAW {sagaw:#x})"),
            Error::NoMemory => write!(f, "out of memory for tables"),
            Error::Timeout(what) => write!(f, "{what} did not complete"),
            Error::TooManyDomains => write!(f, "out of domain ids"),
            Error::BadBase(base) => write!(f, "register page {base:#x} is not below 4 GiB"),
            Error::QueueRejected(at) => write!(f, "invalidation queue error at offset {at:#x}"),
            Error::NoDomain => write!(f, "the device has no domain"),
        }
    }
}

/// A DMA the IOMMU blocked, from VT-d's fault records or the AMD IOMMU's event log.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub source: Bdf,
    /// The I/O virtual address (VT-d: its page).
    pub address: u64,
    pub write: bool,
}

/// What one IOMMU offers: per-device domains whose tables are in `Format`, invalidation,
/// faults. Everything else (mounting morsels) is written once over it, below.
pub trait Iommu {
    /// The domain tables' format.
    type Format: Format<Input = IoVirtAddr>;
    /// How the unit sees table stores (cache flushes where its walks do not snoop).
    type Mem: PhysMem + Copy;
    /// "VT-d" or "AMD-Vi".
    const NAME: &'static str;

    fn mem(&self) -> Self::Mem;
    /// Gives `bdf` its own domain with an empty table (idempotent); from then on it reaches
    /// only what is mounted or mapped there.
    fn attach(&mut self, bdf: Bdf) -> Result<(), Error>;
    /// The domain table of `bdf`.
    fn table(&mut self, bdf: Bdf) -> Option<&mut SecondLevelTable<Self::Format>>;
    /// Drops the cached translations of `bdf`'s domain (after one or a batch of changes).
    fn invalidate(&mut self, bdf: Bdf) -> Result<(), Error>;
    /// Reads, logs and clears every fault reported since the last call.
    fn poll_faults(&mut self) -> Vec<Fault>;
    /// Gives back the tables that unmounts left empty in every domain (end of run).
    fn prune_domains(&mut self);
    /// Faults reported and invalidations issued so far.
    fn counters(&self) -> (u64, u64);
    /// Where a morsel keeps its view in this IOMMU's format for a mount with `perm`, and the
    /// most that view's entries grant (`Morsel::view_limited`).
    fn view_slot(views: &mut Views, perm: Perm) -> (&mut Option<Morsel<Self::Format>>, Perm);
    /// Whether a morsel whose format this IOMMU cannot walk goes through its EPT twin (VT-d
    /// with `iommu=sharept`) rather than a view in the IOMMU's own format.
    fn shares_ept(&self) -> bool {
        false
    }
}

/// A morsel's views for device domains whose IOMMU cannot walk its format.
#[derive(Default)]
pub struct Views {
    pub vtd: Option<Morsel<VtdSl>>,
    /// For read-write AMD-Vi mounts: entries read-write, the mount entry limits the rights.
    pub amd: Option<Morsel<AmdV1>>,
    /// For read-only AMD-Vi mounts: IW = 0 in every entry, so the mount is read-only at
    /// every level, also for a walker that checks the leaf alone (QEMU 11.1's; the spec,
    /// 2.2.3, ANDs the levels). Built on the first read-only mount.
    pub amd_ro: Option<Morsel<AmdV1>>,
    /// `iommu=sharept`: the morsel in the EPT format (the entries `Morsel::<Ept>::create`
    /// writes for a VMX guest's morsel) over the same data frames, whose own subtree goes
    /// into VT-d domains as an EPT morsel's does. Kept in step with ExMap like the views.
    pub ept: Option<Morsel<Ept>>,
}

impl Views {
    /// Destroys the views (their tables are RAM frames, never data); returns how many views
    /// and tables went back, with the (first) view's format.
    pub fn destroy(&mut self) -> Option<(u32, u32, FormatKind)> {
        fn one<G: Format>(v: &mut Option<Morsel<G>>) -> Option<(u32, FormatKind)> {
            let frames = &Frames::here();
            let view = v.take()?;
            let tables = view.table_count();
            match view.destroy(frames, &crate::mm::frames::IDENTITY) {
                Ok(()) => Some((tables, G::KIND)),
                Err((_, e)) => {
                    log::error!(target: "morsel", "{} view cannot be destroyed: {e}", G::NAME);
                    None
                }
            }
        }
        let all = [one(&mut self.vtd), one(&mut self.amd), one(&mut self.amd_ro), one(&mut self.ept)];
        let name = all.iter().flatten().map(|&(_, n)| n).next()?;
        Some(all.iter().flatten().fold((0, 0, name), |(v, t, n), &(tables, _)| (v + 1, t + tables, n)))
    }
}

/// Why a mount into a device domain failed.
#[derive(Debug)]
pub enum MountError {
    NoDomain,
    Morsel(morsel::Error),
}

/// What the log says of a mount through an EPT twin (`iommu=sharept`).
pub const EPT_TWIN_MOUNT: &str = "the EPT subtree itself was mounted (iommu=sharept: the morsel's EPT twin over the same data frames, no VT-d view)";

// Read-only device mounts and walkers that look at the leaf alone (issue 20.9): a mount
// entry without W makes the whole subtree read-only only where the walker ANDs the rights
// of every level. VT-d does (VT-d spec 3.7; QEMU's `vtd_iova_to_slpte` ANDs R and W at each
// level and faults at the first entry that lacks the right), so the VT-d paths below (an
// EPT morsel's own subtree, the EPT twin, the VT-d view of an NPT morsel) keep W in their
// leaves and limit the rights in the mount entry. QEMU 11.1's AMD IOMMU checks the leaf
// alone, so every AMD-Vi mount goes through a view whose entries all carry the limit
// (`AmdVi::view_slot`: `Views::amd_ro` for read-only mounts): the own-subtree branch never
// meets AMD-Vi, because no format a guest morsel is built in shares with it.
const _: () = assert!(!can_share::<Ept, morsel::AmdV1>() && !can_share::<morsel::Npt, morsel::AmdV1>());

/// Mounts `morsel` into `bdf`'s domain at `iova` with one entry: its own subtree where the
/// IOMMU walks the morsel's format (EPT into VT-d: Xen's `iommu=sharept`), else, with
/// `shares_ept` (VT-d and `iommu=sharept`), the own subtree of its EPT twin through that same
/// path, else its view in the IOMMU's format. The caller invalidates (`Unit::mount` returns
/// the `Flush` for it). Returns what it wrote and how.
pub fn mount<I: Iommu, F: Format>(unit: &mut I, bdf: Bdf, morsel: &Morsel<F>, views: &mut Views, iova: u64, perm: Perm, frames: &impl FrameAlloc) -> Result<(MountStats, &'static str), MountError> {
    let mem = unit.mem();
    if can_share::<F, I::Format>() {
        let table = unit.table(bdf).ok_or(MountError::NoDomain)?;
        let how = if F::KIND == FormatKind::Ept { "the morsel's own EPT subtree (shared with the IOMMU, no view)" } else { "the morsel's own subtree" };
        return morsel.mount(table, IoVirtAddr::new(iova), perm, frames, &mem).map(|s| (s, how)).map_err(MountError::Morsel);
    }
    if unit.shares_ept() && can_share::<Ept, I::Format>() {
        unit.table(bdf).ok_or(MountError::NoDomain)?;
        let twin = match &mut views.ept {
            Some(t) => t,
            slot @ None => {
                let t = morsel.view::<Ept>(frames, &mem).map_err(MountError::Morsel)?;
                log::info!(target: "morsel", "EPT twin of a {} {} morsel built (iommu=sharept): {} tables over the same data frames",
                    formats::units::Bytes(t.len()), F::NAME, t.table_count());
                slot.insert(t)
            }
        };
        // The path a VMX guest's EPT morsel takes (the branch above).
        return mount(unit, bdf, twin, &mut Views::default(), iova, perm, frames).map(|(s, _)| (s, EPT_TWIN_MOUNT));
    }
    let table = unit.table(bdf).ok_or(MountError::NoDomain)?;
    let at = IoVirtAddr::new(iova);
    let (slot, limit) = I::view_slot(views, perm);
    let read_only = !limit.write;
    let view = match slot {
        Some(v) => v,
        slot @ None => {
            let v = morsel.view_limited::<I::Format>(limit, frames, &mem).map_err(MountError::Morsel)?;
            log::info!(target: "morsel", "{} {}view of a {} {} morsel built: {} tables over the same data frames{}",
                I::NAME, if read_only { "read-only " } else { "" }, formats::units::Bytes(v.len()), F::NAME, v.table_count(),
                if read_only { " (no write right in any entry)" } else { "" });
            slot.insert(v)
        }
    };
    let how = match (<I::Format as Format>::KIND, read_only) {
        (FormatKind::VtdSl, _) => "its VT-d view over the same frames",
        (_, false) => "its AMD-Vi view over the same frames",
        (_, true) => "its read-only AMD-Vi view over the same frames (IW = 0 at every level)",
    };
    view.mount(table, at, perm, frames, &mem).map(|s| (s, how)).map_err(MountError::Morsel)
}

/// Undoes `mount` (the same subtree: the morsel's own, its EPT twin's or its view's), with
/// the intermediate tables it left empty; the caller invalidates (`Unit::unmount` returns the
/// `Flush` for it).
pub fn unmount<I: Iommu, F: Format>(unit: &mut I, bdf: Bdf, morsel: &Morsel<F>, views: &mut Views, iova: u64, frames: &impl FrameAlloc) -> Result<MountStats, MountError> {
    let mem = unit.mem();
    if can_share::<F, I::Format>() {
        let table = unit.table(bdf).ok_or(MountError::NoDomain)?;
        return morsel.unmount(table, IoVirtAddr::new(iova), frames, &mem).map_err(MountError::Morsel);
    }
    if unit.shares_ept() && can_share::<Ept, I::Format>() {
        let twin = views.ept.as_ref().ok_or(MountError::NoDomain)?;
        return unmount(unit, bdf, twin, &mut Views::default(), iova, frames);
    }
    let table = unit.table(bdf).ok_or(MountError::NoDomain)?;
    let at = IoVirtAddr::new(iova);
    // Whichever view the mount took: the entry there points at its root.
    let mut result = Err(MountError::NoDomain);
    for perm in [Perm::RW, Perm::RO] {
        if let (Some(view), _) = I::view_slot(views, perm) {
            result = view.unmount(table, at, frames, &mem).map_err(MountError::Morsel);
            if !matches!(result, Err(MountError::Morsel(morsel::Error::NotMounted { .. }))) {
                break;
            }
        }
    }
    result
}

/// Maps one 4 KiB frame at `iova` in `bdf`'s domain with `perm` and invalidates (the
/// hypervisor's own transfers: NVMe queues, edu's scrub, the DMA-fault test).
pub fn map_page<I: Iommu>(unit: &mut I, bdf: Bdf, iova: u64, frame: HostPhysAddr, perm: Perm) -> Result<(), Error> {
    let frames = &Frames::here();
    let mem = unit.mem();
    let table = unit.table(bdf).ok_or(Error::NoDomain)?;
    table.map(IoVirtAddr::new(iova), frame, PageSize::Size4K, perm, frames, &mem).map_err(|_| Error::NoMemory)?;
    unit.invalidate(bdf)
}

/// Undoes `map_page`, frees the tables it leaves empty and invalidates.
pub fn unmap_page<I: Iommu>(unit: &mut I, bdf: Bdf, iova: u64) -> Result<(), Error> {
    let frames = &Frames::here();
    let mem = unit.mem();
    if let Some(table) = unit.table(bdf) {
        let _ = table.unmap(IoVirtAddr::new(iova), PageSize::Size4K, &mem);
        table.prune(frames, &mem);
    }
    unit.invalidate(bdf)
}

/// The IOMMU found at boot.
pub enum Unit {
    Vtd(Vtd),
    AmdVi(AmdVi),
}

/// Runs `$body` with `$u` bound to the unit's driver, whichever it is.
#[macro_export]
macro_rules! with_unit {
    ($unit:expr, $u:ident => $body:expr) => {
        match $unit {
            $crate::iommu::Unit::Vtd($u) => $body,
            $crate::iommu::Unit::AmdVi($u) => $body,
        }
    };
}

impl Unit {
    pub fn name(&self) -> &'static str {
        match self {
            Unit::Vtd(_) => Vtd::NAME,
            Unit::AmdVi(_) => AmdVi::NAME,
        }
    }
    pub fn attach(&mut self, bdf: Bdf) -> Result<(), Error> {
        with_unit!(self, u => Iommu::attach(u, bdf))
    }
    pub fn invalidate(&mut self, bdf: Bdf) -> Result<(), Error> {
        with_unit!(self, u => Iommu::invalidate(u, bdf))
    }
    pub fn poll_faults(&mut self) -> Vec<Fault> {
        with_unit!(self, u => Iommu::poll_faults(u))
    }
    pub fn prune_domains(&mut self) {
        with_unit!(self, u => Iommu::prune_domains(u))
    }
    pub fn counters(&self) -> (u64, u64) {
        with_unit!(self, u => u.counters())
    }
    pub fn has_domain(&mut self, bdf: Bdf) -> bool {
        with_unit!(self, u => Iommu::table(u, bdf).is_some())
    }
    /// The I/O virtual span of `bdf`'s domain table.
    pub fn limit(&mut self, bdf: Bdf) -> Option<u64> {
        with_unit!(self, u => Iommu::table(u, bdf).map(|t| t.limit()))
    }
    /// `mount`, with the IOTLB invalidation of `bdf`'s domain it owes (a unit may cache
    /// not-present entries: VT-d's caching mode, CAP.CM, VT-d spec 6.1).
    /// The views it builds take their tables from `frames`, which must be the hypervisor's
    /// `Frames` (`Views::destroy` gives them back there).
    pub fn mount<F: Format>(&mut self, bdf: Bdf, morsel: &Morsel<F>, views: &mut Views, iova: u64, perm: Perm, frames: &impl FrameAlloc) -> Result<(MountStats, &'static str, Flush), MountError> {
        with_unit!(self, u => mount(u, bdf, morsel, views, iova, perm, frames)).map(|(s, how)| (s, how, Flush::domain(bdf)))
    }
    /// `unmount`, with the IOTLB invalidation of `bdf`'s domain it owes. The tables it
    /// empties go to `frames`: `shootdown::After` keeps them until the world lock is let go,
    /// after the commit (the unit may still walk a cached pointer to them until then).
    pub fn unmount<F: Format>(&mut self, bdf: Bdf, morsel: &Morsel<F>, views: &mut Views, iova: u64, frames: &impl FrameAlloc) -> Result<(MountStats, Flush), MountError> {
        with_unit!(self, u => unmount(u, bdf, morsel, views, iova, frames)).map(|s| (s, Flush::domain(bdf)))
    }
    pub fn map_page(&mut self, bdf: Bdf, iova: u64, frame: HostPhysAddr, perm: Perm) -> Result<(), Error> {
        with_unit!(self, u => map_page(u, bdf, iova, frame, perm))
    }
    pub fn unmap_page(&mut self, bdf: Bdf, iova: u64) -> Result<(), Error> {
        with_unit!(self, u => unmap_page(u, bdf, iova))
    }
}
