//! The morsel directory's mounts, without hardware: which guest may mount which morsel into
//! its own address space or a device's DMA domain, where it goes, the per-guest quotas
//! (`abi::MOUNT_QUOTA`, `abi::DEVICE_MOUNT_QUOTA`), and what an unmount, a destroy and a
//! leaving guest must do. Generic over the second-level format (`F`), the frame source and
//! the physical memory (`morsel::FrameAlloc`, `morsel::PhysMem`) and the directory's entry
//! (`Entry`), so the hypervisor (`hypervisor/src/morsels/directory.rs` and
//! `device_mounts.rs`, frames from its allocator, memory identity-mapped) and the host tests
//! (`tests.rs`, real morsels on `morsel::SimMem`, a fake IOMMU) run the same code.
//!
//! One abstraction for both kinds of address space (NOVA's `space_mem` and `space_dma`):
//! `AddressSpace`, implemented by a guest's `Space` (its second-level table and mounts: the
//! lowest free slot of its morsel window, each morsel once) and a device's `DmaSpace` (its
//! PCI function, the run's `DeviceMounts`, and a `Domain`: the IOMMU's part, which writes the
//! entry in the unit's format; the hypervisor's, or the tests' fake). `open`, `unmount` and
//! `drop_mounts` are written once over it: the permission check, the quota, the place, the
//! entry's counters; `check_destroy` counts both kinds. Spaces are named by a typed
//! `SpaceId` (a guest's id or a device's `Bdf`).
//!
//! One mount = one entry in the space's table (`Morsel::mount`, or the `Domain`'s); one
//! unmount = that entry cleared and the intermediate tables it left empty freed, returned as
//! an `Unmounted` the caller must turn into an invalidation of the space's cached
//! translations (the guest's CPUs, the domain's IOTLB) before the freed frames are reused.
//!
//! The names themselves (reserve, commit, abort, quota of names) are `crate::names`; the
//! hypervisor keeps reading names from guest memory, logging, persistent records, which
//! devices are offered (edu lent to one guest at a time), views in the IOMMU's format and
//! the shootdown and IOTLB invalidations.
//!
//! Mutations the tests were seen to catch (each made by hand, the named tests failed, undone):
//! - `open` without the writable check: `read_write_needs_the_owner_or_a_grant` (and two more);
//! - `unmount` that takes the mount off the list but leaves the entry (no `Morsel::unmount`):
//!   `unmount_clears_the_entry_and_frees_emptied_tables` and five more;
//! - `Morsel::unmount` freeing no emptied intermediate table (`morsel/src/morsel.rs`):
//!   `unmount_clears_the_entry_and_frees_emptied_tables`, `a_leaving_guest_unmounts_everything`,
//!   `destroy_after_unmount_gives_every_frame_back`;
//! - `mount`'s quota check `>` for `>=`: `a_mount_past_the_quota_changes_nothing`;
//! - `reserve` not counting reservations: `reservations_count_against_the_mount_quota`;
//! - `check_destroy` without the device mounts (then a count the caller passed):
//!   `destroy_while_mounted_is_busy`;
//! - `free_slot` comparing only start addresses: `free_slot_never_overlaps` (proptest);
//! - `drop_mounts` stopping after one: `a_leaving_guest_unmounts_everything`;
//! - `free_slot` going one slot past the window's end (`at <= end`): `free_slot_never_overlaps`,
//!   `free_slot_aligns_and_skips_mounts`, `a_full_window_is_busy_and_leaves_the_new_morsel_entered`
//!   (`at < end` survives: equivalent, every window size divides the window's end);
//! - `mount` pushing the list entry before the table entry is written:
//!   `a_mount_out_of_frames_changes_nothing`.
//!
//! and, for device spaces (`DmaSpace`):
//! - `DmaSpace::held` counting every guest's device mounts (`mounts.len()`):
//!   `device_mounts_past_the_quota_change_nothing`;
//! - `DmaSpace::take` not matching the guest: `a_device_unmount_only_by_the_guest_that_mounted_it`;
//! - `check_destroy` counting no device mounts: `destroy_while_mounted_is_busy`,
//!   `destroy_after_device_unmount_gives_every_frame_back`;
//! - `drop_device_mounts` leaving after one domain (`if` for `while`):
//!   `a_leaving_guest_drops_its_device_mounts`;
//! - `open` without the writable check: `device_mount_read_write_needs_the_owner_or_a_grant`
//!   (and the three guest tests above);
//! - `DmaSpace::record` recording every mount read-write:
//!   `device_mount_read_write_needs_the_owner_or_a_grant`;
//! - the generic quota check `>` for `>=`: `device_mounts_past_the_quota_change_nothing`,
//!   `a_mount_past_the_quota_changes_nothing`;
//! - `DeviceMounts::covers` not matching the guest, or checking only the transfer's start:
//!   `device_transfers_only_inside_own_mount_windows`;
//! - `mounted` / `unmounted` told the guest's `SpaceId` for a device mount:
//!   `device_mount_read_write_needs_the_owner_or_a_grant`,
//!   `a_device_unmount_only_by_the_guest_that_mounted_it`.

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(test)]
mod tests;

use crate::names::{self, Hashed, Name, Names, Owner, SlotId, Ticket, SYSTEM};
use alloc::vec::Vec;
use core::fmt;
pub use formats::bdf::Bdf;
use morsel::{Format, FrameAlloc, GuestPhysAddr, Morsel, MountHandle, MountStats, Perm, PhysMem, SecondLevelTable};

/// What the directory keeps per morsel, as this module needs it.
pub trait Entry<F: Format> {
    fn morsel(&self) -> &Morsel<F>;
    /// The guest that created it (`names::SYSTEM` for one restored from persistent memory).
    fn owner(&self) -> Owner;
    /// Whether guests other than the owner may mount it read-write.
    fn others_may_write(&self) -> bool;
    /// A mount into `space` wrote `stats` (for the entry's counters).
    fn mounted(&mut self, _space: SpaceId, _stats: &MountStats) {}
    /// An unmount from a guest is about to clear the entry (an ExMap region refuses its fast
    /// handles).
    fn unmounting(&mut self) {}
    /// An unmount from `space` wrote `stats`.
    fn unmounted(&mut self, _space: SpaceId, _stats: &MountStats) {}

    /// Whether a guest mount and unmount of it need nothing of the entry but its counters
    /// (false for an ExMap region: its lock and fast handles), so they may be made in steps
    /// with the directory's lock let go in between (`open_begin`, `unmount_begin`).
    fn plain(&self) -> bool {
        true
    }

    /// Whether `guest` may mount it read-write.
    fn writable_by(&self, guest: Owner) -> bool {
        self.owner() == guest || self.others_may_write()
    }
}

/// A mount in one guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub gpa: u64,
    pub size: u64,
    /// The guest-physical span the mount occupies (the span of the morsel's root table).
    pub window: u64,
    pub name: Name,
    /// Where `name` is in the directory (`Names::slot`): ExMap calls reach the region there
    /// without hashing the name (`Names::get_mut_at` checks that the slot still holds it).
    pub at: SlotId,
    /// Mounted read-write (else read-only).
    pub writable: bool,
    /// The morsel's `MountHandle`, for a morsel whose mounts need nothing of its entry
    /// (`Entry::plain`): its unmount can clear the entry with the guest's lock alone
    /// (`unmount_begin`). None for an ExMap region's mount and one `Mounts::unmount_whole`
    /// named (their unmount goes through `unmount`).
    pub plain: Option<MountHandle>,
}

/// The morsels mounted in one guest's window (at most `abi::MOUNT_QUOTA`).
#[derive(Debug, Default)]
pub struct Mounts(Vec<Mount>);

impl Mounts {
    pub const fn new() -> Self {
        Mounts(Vec::new())
    }

    /// The mount at `gpa`.
    pub fn at(&self, gpa: u64) -> Option<&Mount> {
        self.0.iter().find(|m| m.gpa == gpa)
    }

    /// From now on the mount at `gpa` is taken away only by the whole `unmount` (the caller
    /// keeps state of its own to end with it: a notify subscription); `unmount_begin`
    /// answers None for it.
    pub fn unmount_whole(&mut self, gpa: u64) {
        if let Some(m) = self.0.iter_mut().find(|m| m.gpa == gpa) {
            m.plain = None;
        }
    }
}

impl core::ops::Deref for Mounts {
    type Target = [Mount];
    fn deref(&self) -> &[Mount] {
        &self.0
    }
}

/// Which address space a mount is in: typed, never a name or a format's name compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpaceId {
    /// A guest's second-level table (EPT or NPT), by the guest's id.
    Guest(Owner),
    /// A device's DMA domain (its IOMMU table, VT-d or AMD-Vi), by the device's PCI function.
    Device(Bdf),
}

impl fmt::Display for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            SpaceId::Guest(g) => write!(f, "guest {g}"),
            SpaceId::Device(bdf) => write!(f, "device {bdf}"),
        }
    }
}

/// An address space the directory mounts morsels into and unmounts them from, on behalf of
/// one guest: the guest's own (`Space`) or a device's DMA domain (`DmaSpace`). What the
/// directory decides is written once over it (`open`, `unmount`, `drop_mounts`): who may
/// mount read-write, the guest's quota of mounts of the kind, where the mount goes, and the
/// entry's counters; `check_destroy` counts the mounts of both kinds. Writing and clearing
/// the mount entry in the space's table is the implementor's.
pub trait AddressSpace<F: Format, T: Entry<F>> {
    /// What the space's list keeps per mount.
    type Mount;
    /// How many mounts of this kind one guest may hold (`abi::MOUNT_QUOTA`,
    /// `abi::DEVICE_MOUNT_QUOTA`).
    const QUOTA: usize;

    fn id(&self) -> SpaceId;
    /// The guest the mounts are made for and unmounted by: its permission, its quota.
    fn guest(&self) -> Owner;
    /// How many mounts of this kind the guest holds (in every space of the kind).
    fn held(&self) -> usize;
    /// A refusal of the kind before its quota is looked at (a guest's: the morsel is mounted
    /// there already).
    fn check(&self, _name: &Name) -> Result<(), Refusal> {
        Ok(())
    }
    /// Room in the list for one more mount (the heap may refuse: `NoMemory`).
    fn make_room(&mut self) -> Result<(), Refusal>;
    /// Where a morsel whose root spans `window` goes.
    fn place(&self, window: u64) -> Result<u64, Refusal>;
    /// Writes the mount entry of `entry`'s morsel at `addr` with `perm`.
    fn write<A: FrameAlloc, M: PhysMem>(&mut self, entry: &mut T, addr: u64, perm: Perm, alloc: &A, mem: &M) -> Result<MountStats, Refusal>;
    /// Adds the mount to the list (room was made: no allocation).
    fn record(&mut self, placed: Placed);
    /// Takes the guest's mount at `addr` in this space off the list.
    fn take(&mut self, addr: u64) -> Option<Self::Mount>;
    /// Where in the directory the mount's morsel is.
    fn morsel_of(mount: &Self::Mount) -> (&Name, SlotId);
    /// Clears the mount entry at `addr` (the emptied intermediate tables go to `alloc`).
    fn clear<A: FrameAlloc, M: PhysMem>(&mut self, entry: &mut T, addr: u64, alloc: &A, mem: &M) -> Result<MountStats, Refusal>;
    /// The address of the guest's latest mount in this space.
    fn last(&self) -> Option<u64>;
}

/// A mount about to be recorded, as `open` placed it.
#[derive(Clone, Copy, Debug)]
pub struct Placed {
    pub addr: u64,
    pub size: u64,
    pub window: u64,
    pub name: Name,
    pub at: SlotId,
    pub writable: bool,
    /// `Mount::plain`.
    pub plain: Option<MountHandle>,
}

/// One guest as the directory sees it: its id, its second-level table and its mounts.
pub struct Space<'a, F: Format> {
    pub guest: Owner,
    pub table: &'a mut SecondLevelTable<F>,
    pub mounts: &'a mut Mounts,
}

/// A guest space's rules, written once for `AddressSpace` and for `open_place` (the step
/// made without the directory's lock).
impl<F: Format> Space<'_, F> {
    const MOUNTS: usize = abi::MOUNT_QUOTA as usize;

    fn mounted_already(&self, name: &Name) -> Result<(), Refusal> {
        match self.mounts.iter().any(|m| m.name == *name) {
            true => Err(Refusal::AlreadyMounted),
            false => Ok(()),
        }
    }
    fn room(&mut self) -> Result<(), Refusal> {
        self.mounts.0.try_reserve(1).map_err(|_| Refusal::NoMemory)
    }
    fn slot(&self, window: u64) -> Result<u64, Refusal> {
        free_slot(self.mounts, window).ok_or(Refusal::WindowFull)
    }
    fn push(&mut self, p: Placed) {
        self.mounts.0.push(Mount { gpa: p.addr, size: p.size, window: p.window, name: p.name, at: p.at, writable: p.writable, plain: p.plain });
    }
}

/// A guest's space: morsels at the lowest free slot of its morsel window, each once, at most
/// `abi::MOUNT_QUOTA`.
impl<F: Format<Input = GuestPhysAddr>, T: Entry<F>> AddressSpace<F, T> for Space<'_, F> {
    type Mount = Mount;
    const QUOTA: usize = Self::MOUNTS;

    fn id(&self) -> SpaceId {
        SpaceId::Guest(self.guest)
    }
    fn guest(&self) -> Owner {
        self.guest
    }
    fn held(&self) -> usize {
        self.mounts.len()
    }
    fn check(&self, name: &Name) -> Result<(), Refusal> {
        self.mounted_already(name)
    }
    fn make_room(&mut self) -> Result<(), Refusal> {
        self.room()
    }
    fn place(&self, window: u64) -> Result<u64, Refusal> {
        self.slot(window)
    }
    fn write<A: FrameAlloc, M: PhysMem>(&mut self, entry: &mut T, addr: u64, perm: Perm, alloc: &A, mem: &M) -> Result<MountStats, Refusal> {
        entry.morsel().mount(self.table, GuestPhysAddr::new(addr), perm, alloc, mem).map_err(Refusal::Mount)
    }
    fn record(&mut self, p: Placed) {
        self.push(p);
    }
    fn take(&mut self, addr: u64) -> Option<Mount> {
        let i = self.mounts.iter().position(|m| m.gpa == addr)?;
        Some(self.mounts.0.remove(i))
    }
    fn morsel_of(m: &Mount) -> (&Name, SlotId) {
        (&m.name, m.at)
    }
    fn clear<A: FrameAlloc, M: PhysMem>(&mut self, entry: &mut T, addr: u64, alloc: &A, mem: &M) -> Result<MountStats, Refusal> {
        entry.unmounting();
        entry.morsel().unmount(self.table, GuestPhysAddr::new(addr), alloc, mem).map_err(Refusal::Unmount)
    }
    fn last(&self) -> Option<u64> {
        self.mounts.last().map(|m| m.gpa)
    }
}

/// A morsel mounted into a device's DMA domain on behalf of a guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMount {
    pub name: Name,
    /// Where `name` is in the directory (`Names::slot`).
    pub at: SlotId,
    pub bdf: Bdf,
    pub iova: u64,
    /// The I/O virtual span the mount occupies (the span of the morsel's root table).
    pub window: u64,
    /// The guest that mounted it (the only one that may unmount it).
    pub guest: Owner,
    pub writable: bool,
}

impl DeviceMount {
    pub fn space(&self) -> SpaceId {
        SpaceId::Device(self.bdf)
    }
}

/// Every device mount of the run, in every device domain (at most
/// `abi::DEVICE_MOUNT_QUOTA` per guest).
#[derive(Debug, Default)]
pub struct DeviceMounts(Vec<DeviceMount>);

impl DeviceMounts {
    pub const fn new() -> Self {
        DeviceMounts(Vec::new())
    }

    /// How many device mounts `guest` holds.
    pub fn held_by(&self, guest: Owner) -> usize {
        self.0.iter().filter(|d| d.guest == guest).count()
    }

    /// How many device mounts of `name` there are (in any domain, by any guest).
    pub fn of(&self, name: &str) -> usize {
        self.0.iter().filter(|d| d.name == *name).count()
    }

    /// The guest with a mount in `bdf`'s domain (the first one, if several).
    pub fn user_of(&self, bdf: Bdf) -> Option<Owner> {
        self.0.iter().find(|d| d.bdf == bdf).map(|d| d.guest)
    }

    /// Whether `[iova, end)` lies inside the window of one of `guest`'s own mounts in `bdf`'s
    /// domain: where `edu_dma` may have the device move bytes (inside, the IOMMU decides).
    pub fn covers(&self, guest: Owner, bdf: Bdf, iova: u64, end: u64) -> bool {
        self.0.iter().any(|d| d.guest == guest && d.bdf == bdf && d.iova <= iova && d.iova.checked_add(d.window).is_some_and(|e| end <= e))
    }

    /// Takes every mount out of the list (the end of the run).
    pub fn take_all(&mut self) -> DeviceMounts {
        DeviceMounts(core::mem::take(&mut self.0))
    }
}

impl core::ops::Deref for DeviceMounts {
    type Target = [DeviceMount];
    fn deref(&self) -> &[DeviceMount] {
        &self.0
    }
}

/// The IOMMU's part of a device space: writing and clearing a mount entry in a device's
/// domain table (in the IOMMU's format: the morsel's own subtree where the IOMMU walks it,
/// else a view over the same data frames), with the device's own refusals
/// (`Refusal::Domain`). The hypervisor's is `crate::iommu::Unit` with its IOTLB
/// invalidations; the tests' is a fake over `SimMem`.
pub trait Domain<F: Format, T> {
    fn mount<A: FrameAlloc, M: PhysMem>(&mut self, bdf: Bdf, entry: &mut T, iova: u64, perm: Perm, alloc: &A, mem: &M) -> Result<MountStats, Refusal>;
    fn unmount<A: FrameAlloc, M: PhysMem>(&mut self, bdf: Bdf, entry: &mut T, iova: u64, alloc: &A, mem: &M) -> Result<MountStats, Refusal>;
}

/// A device's DMA domain as the directory sees it for one guest's call: the device, the
/// I/O virtual address the guest asks for (a mount's; unmounts name theirs), the run's device
/// mounts, and the domain's tables (`domain`).
pub struct DmaSpace<'a, D> {
    pub guest: Owner,
    pub bdf: Bdf,
    pub iova: u64,
    pub mounts: &'a mut DeviceMounts,
    pub domain: D,
}

/// A device's space: where the guest asks, the same morsel as often as it likes (each mount
/// a window of its own), at most `abi::DEVICE_MOUNT_QUOTA` per guest in all domains.
impl<F: Format, T: Entry<F>, D: Domain<F, T>> AddressSpace<F, T> for DmaSpace<'_, D> {
    type Mount = DeviceMount;
    const QUOTA: usize = abi::DEVICE_MOUNT_QUOTA as usize;

    fn id(&self) -> SpaceId {
        SpaceId::Device(self.bdf)
    }
    fn guest(&self) -> Owner {
        self.guest
    }
    fn held(&self) -> usize {
        self.mounts.held_by(self.guest)
    }
    fn make_room(&mut self) -> Result<(), Refusal> {
        self.mounts.0.try_reserve(1).map_err(|_| Refusal::NoMemory)
    }
    fn place(&self, _window: u64) -> Result<u64, Refusal> {
        Ok(self.iova)
    }
    fn write<A: FrameAlloc, M: PhysMem>(&mut self, entry: &mut T, addr: u64, perm: Perm, alloc: &A, mem: &M) -> Result<MountStats, Refusal> {
        self.domain.mount(self.bdf, entry, addr, perm, alloc, mem)
    }
    fn record(&mut self, p: Placed) {
        let (bdf, guest) = (self.bdf, self.guest);
        self.mounts.0.push(DeviceMount { name: p.name, at: p.at, bdf, iova: p.addr, window: p.window, guest, writable: p.writable });
    }
    fn take(&mut self, addr: u64) -> Option<DeviceMount> {
        let (bdf, guest) = (self.bdf, self.guest);
        let i = self.mounts.iter().position(|d| d.bdf == bdf && d.iova == addr && d.guest == guest)?;
        Some(self.mounts.0.remove(i))
    }
    fn morsel_of(m: &DeviceMount) -> (&Name, SlotId) {
        (&m.name, m.at)
    }
    fn clear<A: FrameAlloc, M: PhysMem>(&mut self, entry: &mut T, addr: u64, alloc: &A, mem: &M) -> Result<MountStats, Refusal> {
        self.domain.unmount(self.bdf, entry, addr, alloc, mem)
    }
    fn last(&self) -> Option<u64> {
        let (bdf, guest) = (self.bdf, self.guest);
        self.mounts.iter().rev().find(|d| d.bdf == bdf && d.guest == guest).map(|d| d.iova)
    }
}

/// Why a directory call was refused. Nothing changed, except where a variant says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No morsel of that name (one reserved but not committed counts as none), or no mount at
    /// that address.
    NotFound,
    /// Read-write by a guest that may not write it, or a destroy by a guest that may not.
    Denied,
    /// The morsel is mounted in this guest already (`Busy`).
    AlreadyMounted,
    /// The guest's morsel window has no free slot of the morsel's window size (`Busy`).
    WindowFull,
    /// The guest holds `abi::MOUNT_QUOTA` mounts (with its reservations, at a create).
    Quota,
    /// The heap refused the mount's list entry.
    NoMemory,
    /// The name table refused a reservation.
    Name(names::Error),
    /// `Morsel::mount` refused.
    Mount(morsel::Error),
    /// `Morsel::unmount` refused; the mount left the guest's list.
    Unmount(morsel::Error),
    /// The caller's check (`check_destroy`) found it pinned, saying why.
    Pinned(&'static str),
    /// Destroy of a morsel still mounted: in `guests` guests and `devices` device domains.
    Mounted { guests: u32, devices: usize },
    /// The device domain refused (the hypervisor's part of a device mount: no such device,
    /// one not offered, one lent to another guest, no domain, an invalidation that failed).
    Domain(abi::Error),
}

impl Refusal {
    /// The refusal as the guest sees it.
    pub fn error(self) -> abi::Error {
        use abi::Error as E;
        match self {
            Refusal::NotFound => E::NotFound,
            Refusal::Denied => E::Denied,
            Refusal::AlreadyMounted | Refusal::WindowFull | Refusal::Pinned(_) | Refusal::Mounted { .. } => E::Busy,
            Refusal::Quota | Refusal::NoMemory => E::NoMemory,
            Refusal::Name(names::Error::Taken) => E::Busy,
            Refusal::Name(names::Error::Quota | names::Error::NoOwner | names::Error::Full) => E::NoMemory,
            Refusal::Name(names::Error::Stale) => E::Invalid,
            Refusal::Mount(morsel::Error::OutOfMemory) => E::NoMemory,
            Refusal::Mount(morsel::Error::Occupied { .. } | morsel::Error::InsideMount { .. }) => E::Busy,
            Refusal::Mount(_) | Refusal::Unmount(_) => E::Invalid,
            Refusal::Domain(e) => e,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Refusal::NotFound => f.write_str("not found"),
            Refusal::Denied => f.write_str("not allowed"),
            Refusal::AlreadyMounted => f.write_str("already mounted in this guest"),
            Refusal::WindowFull => f.write_str("no free slot in the morsel window"),
            Refusal::Quota => f.write_str("the guest holds its quota of mounts"),
            Refusal::NoMemory => f.write_str("out of heap"),
            Refusal::Name(e) => write!(f, "{e}"),
            Refusal::Mount(e) => write!(f, "mount: {e}"),
            Refusal::Unmount(e) => write!(f, "unmount: {e}"),
            Refusal::Pinned(why) => f.write_str(why),
            Refusal::Mounted { guests, devices } => write!(f, "still mounted ({guests} guest, {devices} device mounts)"),
            Refusal::Domain(e) => write!(f, "device domain: {e:?}"),
        }
    }
}

/// A mount made: where (a guest-physical or an I/O virtual address), and what it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mounted {
    pub addr: u64,
    pub writable: bool,
    pub stats: MountStats,
}

/// A mount taken away: its entry is cleared, but the space's CPUs or IOMMU may still cache
/// the translation (and the emptied tables, which went to the frame source given to
/// `unmount`).
#[must_use = "the space's cached translations must be invalidated before its frames are reused"]
#[derive(Debug)]
pub struct Unmounted<M = Mount> {
    pub mount: M,
    pub stats: MountStats,
}

/// Reserves `name` for a morsel `guest` creates: refused if the name table refuses, or if the
/// guest's mounts and reservations (this one included, each takes a mount when it is entered)
/// would pass `abi::MOUNT_QUOTA` (the reservation is aborted then).
pub fn reserve<T>(names: &mut Names<T>, mounts: &Mounts, guest: Owner, name: &Hashed) -> Result<Ticket, Refusal> {
    let ticket = names.reserve_hashed(name, guest).map_err(Refusal::Name)?;
    if mounts.len() + names.count(guest).reserved as usize > abi::MOUNT_QUOTA as usize {
        names.abort(ticket);
        return Err(Refusal::Quota);
    }
    Ok(ticket)
}

/// Commits a complete new morsel `value` under its reservation and mounts it read-write in
/// its creator `space`. A refused commit hands the value back (nothing entered, never
/// replaced); a refused mount leaves it entered, for the caller to destroy.
pub fn enter<F, T, A, M>(names: &mut Names<T>, space: &mut Space<F>, ticket: Ticket, value: T, alloc: &A, mem: &M) -> Result<Mounted, Entered<T>>
where
    F: Format<Input = GuestPhysAddr>,
    T: Entry<F>,
    A: FrameAlloc,
    M: PhysMem,
{
    let (name, at) = (*ticket.name(), ticket.slot());
    names.commit(ticket, value).map_err(|(e, v)| Entered::Refused(e, v))?;
    mount(names, space, at, &name, true, alloc, mem).map_err(Entered::Unmounted)
}

/// How `enter` failed.
#[derive(Debug)]
pub enum Entered<T> {
    /// The commit was refused: the value is not in the directory.
    Refused(names::Error, T),
    /// Committed, but the mount was refused: it is in the directory, mounted nowhere.
    Unmounted(Refusal),
}

/// `morsel_open` (a guest `Space`) and `device_mount` (a `DmaSpace`): mounts `name` into
/// `space`, read-write if `writable` (the owner's, or one others may write). `admit` is
/// asked after the permission check: false (an ExMap batch holds the region) answers
/// `Ok(None)`, nothing changed, for the guest to ask again.
pub fn open<F, T, S, A, M>(names: &mut Names<T>, space: &mut S, name: &Hashed, writable: bool, admit: impl FnOnce(&T) -> bool, alloc: &A, mem: &M) -> Result<Option<Mounted>, Refusal>
where
    F: Format,
    T: Entry<F>,
    S: AddressSpace<F, T>,
    A: FrameAlloc,
    M: PhysMem,
{
    // The name comes hashed (`names::Keys::hash`, SipHash: the table's costly step, which
    // the caller can do before it takes its lock); `mount` finds the entry again by its slot.
    let (at, name) = (names.slot_hashed(name).ok_or(Refusal::NotFound)?, name.name());
    let n: &T = names.get_mut_at(at, name).ok_or(Refusal::NotFound)?;
    if writable && !n.writable_by(space.guest()) {
        return Err(Refusal::Denied);
    }
    if !admit(n) {
        return Ok(None);
    }
    space.check(name)?;
    mount(names, space, at, name, writable, alloc, mem).map(Some)
}

/// Mounts `name`, committed at slot `at`, into `space` where the space places it, within the
/// guest's quota of the kind (no permission check: `open` and `enter` do theirs).
fn mount<F, T, S, A, M>(names: &mut Names<T>, space: &mut S, at: SlotId, name: &Name, writable: bool, alloc: &A, mem: &M) -> Result<Mounted, Refusal>
where
    F: Format,
    T: Entry<F>,
    S: AddressSpace<F, T>,
    A: FrameAlloc,
    M: PhysMem,
{
    let n = names.get_mut_at(at, name).ok_or(Refusal::NotFound)?;
    if space.held() >= S::QUOTA {
        return Err(Refusal::Quota);
    }
    space.make_room()?;
    let (window, size) = (n.morsel().window_size(), n.morsel().len());
    let addr = space.place(window)?;
    let perm = if writable { Perm::RW } else { Perm::RO };
    let stats = space.write(n, addr, perm, alloc, mem)?;
    n.mounted(space.id(), &stats);
    let plain = n.plain().then(|| n.morsel().handle());
    space.record(Placed { addr, size, window, name: *name, at, writable, plain });
    Ok(Mounted { addr, writable, stats })
}

/// `morsel_unmount` (a guest `Space`) and `device_unmount` (a `DmaSpace`): takes the
/// guest's mount at `addr` out of `space`; the intermediate tables it left empty go to
/// `alloc` (which must keep them until the invalidation is done). A mount only the guest
/// that made it can take away: another's is `NotFound`.
pub fn unmount<F, T, S, A, M>(names: &mut Names<T>, space: &mut S, addr: u64, alloc: &A, mem: &M) -> Result<Unmounted<S::Mount>, Refusal>
where
    F: Format,
    T: Entry<F>,
    S: AddressSpace<F, T>,
    A: FrameAlloc,
    M: PhysMem,
{
    let mount = space.take(addr).ok_or(Refusal::NotFound)?;
    let (name, at) = S::morsel_of(&mount);
    let n = names.get_mut_at(at, name).ok_or(Refusal::NotFound)?;
    let stats = space.clear(n, addr, alloc, mem)?;
    n.unmounted(space.id(), &stats);
    Ok(Unmounted { mount, stats })
}

/// A guest leaves: unmounts everything it has mounted in `space`, last first, each passed to
/// `each` (one invalidation for all of them is the caller's). Returns how many were unmounted.
pub fn drop_mounts<F, T, S, A, M>(names: &mut Names<T>, space: &mut S, alloc: &A, mem: &M, mut each: impl FnMut(Unmounted<S::Mount>)) -> usize
where
    F: Format,
    T: Entry<F>,
    S: AddressSpace<F, T>,
    A: FrameAlloc,
    M: PhysMem,
{
    let mut count = 0;
    while let Some(addr) = space.last() {
        // A refused unmount has taken the mount out of the list too: the loop ends.
        if let Ok(u) = unmount(names, space, addr, alloc, mem) {
            each(u);
            count += 1;
        }
    }
    count
}

/// A guest leaves (or the run ends, for each guest): unmounts its device mounts, in every
/// domain, last first, through `domain`, each passed to `each`. Returns how many were
/// unmounted.
pub fn drop_device_mounts<F, T, D, A, M>(names: &mut Names<T>, mounts: &mut DeviceMounts, guest: Owner, mut domain: D, alloc: &A, mem: &M, mut each: impl FnMut(Unmounted<DeviceMount>)) -> usize
where
    F: Format,
    T: Entry<F>,
    D: Domain<F, T>,
    A: FrameAlloc,
    M: PhysMem,
{
    let mut count = 0;
    while let Some(bdf) = mounts.iter().rev().find(|d| d.guest == guest).map(|d| d.bdf) {
        let mut space = DmaSpace { guest, bdf, iova: 0, mounts: &mut *mounts, domain: &mut domain };
        count += drop_mounts(names, &mut space, alloc, mem, &mut each);
    }
    count
}

/// A domain borrowed (for `drop_device_mounts`' one space per device).
impl<F: Format, T, D: Domain<F, T>> Domain<F, T> for &mut D {
    fn mount<A: FrameAlloc, M: PhysMem>(&mut self, bdf: Bdf, entry: &mut T, iova: u64, perm: Perm, alloc: &A, mem: &M) -> Result<MountStats, Refusal> {
        (**self).mount(bdf, entry, iova, perm, alloc, mem)
    }
    fn unmount<A: FrameAlloc, M: PhysMem>(&mut self, bdf: Bdf, entry: &mut T, iova: u64, alloc: &A, mem: &M) -> Result<MountStats, Refusal> {
        (**self).unmount(bdf, entry, iova, alloc, mem)
    }
}

/// A `morsel_open` of a plain morsel between its steps (`open_begin`): the morsel is pinned
/// (one mount counted, so `check_destroy` refuses it) and what the mount needs is copied
/// out, so the directory's lock can be let go while the guest's table is written.
#[must_use = "an opening holds a pin: `open_end` keeps it as the mount's or takes it back"]
#[derive(Debug)]
pub struct Opening {
    at: SlotId,
    name: Name,
    writable: bool,
    handle: MountHandle,
    size: u64,
}

impl Opening {
    /// The morsel's size in bytes (what `morsel_open` answers beside the address).
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// `morsel_open` in three steps, for a caller that holds the directory's lock for steps 1
/// and 3 only and the guest's own lock for step 2 (the hypervisor's `sched::mount_fast`), so
/// that guests mounting on several CPUs wait for each other only for the look-up.
///
/// Step 1, the directory's lock held: looks `name` up, checks that `guest` may mount it
/// (read-write: the owner's, or one others may write) and pins it (`Morsel::pin`). Ok(None),
/// nothing changed, for a morsel that is not `Entry::plain` (an ExMap region): the caller
/// makes the whole `open` under its locks. A refusal changes nothing.
pub fn open_begin<F, T>(names: &mut Names<T>, guest: Owner, name: &Hashed, writable: bool) -> Result<Option<Opening>, Refusal>
where
    F: Format,
    T: Entry<F>,
{
    let (at, name) = (names.slot_hashed(name).ok_or(Refusal::NotFound)?, name.name());
    let n: &T = names.get_mut_at(at, name).ok_or(Refusal::NotFound)?;
    if writable && !n.writable_by(guest) {
        return Err(Refusal::Denied);
    }
    if !n.plain() {
        return Ok(None);
    }
    let m = n.morsel();
    m.pin();
    Ok(Some(Opening { at, name: *name, writable, handle: m.handle(), size: m.len() }))
}

/// Step 2 of `open_begin`, the guest's lock held (not the directory's): where the guest has
/// the morsel mounted already, holds its quota of mounts or has no free slot, a refusal;
/// otherwise the entry is written at the lowest free slot and the mount recorded. Either
/// way `open_end` follows.
pub fn open_place<F, A, M>(space: &mut Space<F>, o: &Opening, alloc: &A, mem: &M) -> Result<Mounted, Refusal>
where
    F: Format<Input = GuestPhysAddr>,
    A: FrameAlloc,
    M: PhysMem,
{
    // As `open` then `mount` decide for a guest space, in their order.
    space.mounted_already(&o.name)?;
    if space.mounts.len() >= Space::<F>::MOUNTS {
        return Err(Refusal::Quota);
    }
    space.room()?;
    let window = o.handle.window_size();
    let addr = space.slot(window)?;
    let perm = if o.writable { Perm::RW } else { Perm::RO };
    let stats = o.handle.mount::<F, F>(space.table, GuestPhysAddr::new(addr), perm, alloc, mem).map_err(Refusal::Mount)?;
    space.push(Placed { addr, size: o.size, window, name: o.name, at: o.at, writable: o.writable, plain: Some(o.handle) });
    Ok(Mounted { addr, writable: o.writable, stats })
}

/// Step 3 of `open_begin`, the directory's lock held again: a mount made (`placed`) is
/// counted in the entry (`Entry::mounted`) and keeps the pin; a refused one takes the pin
/// back. The entry is still there: pinned, it could not be destroyed in between.
pub fn open_end<F, T>(names: &mut Names<T>, guest: Owner, o: Opening, placed: &Result<Mounted, Refusal>)
where
    F: Format,
    T: Entry<F>,
{
    let Some(n) = names.get_mut_at(o.at, &o.name) else { return };
    match placed {
        Ok(m) => n.mounted(SpaceId::Guest(guest), &m.stats),
        Err(_) => n.morsel().unpin(),
    }
}

/// `morsel_unmount` of a plain morsel in two steps (`unmount_end` after the caller started
/// the shootdown), for a caller that holds the guest's own lock for step 1 and the
/// directory's for step 2.
///
/// Step 1, the guest's lock held: takes the mount at `addr` off the list and clears its
/// entry (the emptied intermediate tables go to `alloc`, which must keep them until the
/// invalidation is done). Ok(None), nothing changed, for a mount that is not plain (an
/// ExMap region's: the caller makes the whole `unmount` under its locks); `NotFound` where
/// the guest has no mount there. The morsel stays pinned by the mount's count: it cannot be
/// destroyed before `unmount_end`.
pub fn unmount_begin<F, A, M>(space: &mut Space<F>, addr: u64, alloc: &A, mem: &M) -> Result<Option<Unmounted>, Refusal>
where
    F: Format<Input = GuestPhysAddr>,
    A: FrameAlloc,
    M: PhysMem,
{
    let i = space.mounts.iter().position(|m| m.gpa == addr).ok_or(Refusal::NotFound)?;
    let Some(handle) = space.mounts[i].plain else { return Ok(None) };
    let mount = space.mounts.0.remove(i);
    let stats = handle.unmount::<F, F>(space.table, GuestPhysAddr::new(addr), alloc, mem).map_err(Refusal::Unmount)?;
    Ok(Some(Unmounted { mount, stats }))
}

/// Step 2 of `unmount_begin`, the directory's lock held, after the caller started the
/// invalidation of the guest's cached translations (a destroy that follows waits for every
/// invalidation started before it): the unmount counted in the entry (`Entry::unmounted`)
/// and the mount's count taken off the morsel, which may be destroyed from then on.
pub fn unmount_end<F, T>(names: &mut Names<T>, guest: Owner, u: &Unmounted)
where
    F: Format,
    T: Entry<F>,
{
    let Some(n) = names.get_mut_at(u.mount.at, &u.mount.name) else { return };
    n.unmounted(SpaceId::Guest(guest), &u.stats);
    n.morsel().unpin();
}

/// Whether `guest` may destroy `name` now: it must be the owner (anyone may, for a restored
/// morsel others may write), `pinned` (the caller's checks: NVMe I/O, an ExMap batch) must
/// find nothing, and it must be mounted nowhere (no guest, no device domain). The name comes
/// hashed ([`Keys::hash`](crate::names::Keys::hash), perhaps before the caller's lock).
pub fn check_destroy<F, T>(names: &Names<T>, devices: &DeviceMounts, guest: Owner, name: &Hashed, pinned: impl FnOnce(&T) -> Option<&'static str>) -> Result<(), Refusal>
where
    F: Format,
    T: Entry<F>,
{
    let n = names.get_hashed(name).ok_or(Refusal::NotFound)?.value;
    if n.owner() != guest && !(n.owner() == SYSTEM && n.others_may_write()) {
        return Err(Refusal::Denied);
    }
    if let Some(why) = pinned(n) {
        return Err(Refusal::Pinned(why));
    }
    let (guests, devices) = (n.morsel().mount_count(), devices.of(name.name()));
    if guests > 0 || devices > 0 {
        return Err(Refusal::Mounted { guests, devices });
    }
    Ok(())
}

/// The lowest slot of the morsel window (`abi::MORSEL_WINDOW_GPA`, `MORSEL_WINDOW_SIZE`)
/// aligned to `size` that overlaps no mount.
pub fn free_slot(mounts: &[Mount], size: u64) -> Option<u64> {
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
