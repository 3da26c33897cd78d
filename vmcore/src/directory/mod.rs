//! The morsel directory's mounts, without hardware: which guest may open which morsel, where
//! in the guest's morsel window it goes, the per-guest `abi::MOUNT_QUOTA`, and what an unmount,
//! a destroy and a leaving guest must do. Generic over the second-level format (`F`), the
//! frame source and the physical memory (`morsel::FrameAlloc`, `morsel::PhysMem`) and the
//! directory's entry (`Entry`), so the hypervisor (`hypervisor/src/morsels/directory.rs`,
//! frames from its allocator, memory identity-mapped) and the host tests (`tests.rs`, real
//! morsels on `morsel::SimMem`) run the same code.
//!
//! One mount = one entry in the guest's second-level table (`Morsel::mount`); one unmount =
//! that entry cleared and the intermediate tables it left empty freed, returned as an
//! `Unmounted` the caller must turn into an invalidation of the guest's cached translations
//! before the freed frames are reused.
//!
//! The names themselves (reserve, commit, abort, quota of names) are `crate::names`; the
//! hypervisor keeps reading names from guest memory, logging, persistent records, device
//! mounts and the shootdown.
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
//! - `check_destroy` without the device mounts: `destroy_while_mounted_is_busy`;
//! - `free_slot` comparing only start addresses: `free_slot_never_overlaps` (proptest);
//! - `drop_mounts` stopping after one: `a_leaving_guest_unmounts_everything`;
//! - `free_slot` going one slot past the window's end (`at <= end`): `free_slot_never_overlaps`,
//!   `free_slot_aligns_and_skips_mounts`, `a_full_window_is_busy_and_leaves_the_new_morsel_entered`
//!   (`at < end` survives: equivalent, every window size divides the window's end);
//! - `mount` pushing the list entry before the table entry is written:
//!   `a_mount_out_of_frames_changes_nothing`.

#[cfg(test)]
mod tests;

use crate::names::{self, Name, Names, Owner, SlotId, Ticket, SYSTEM};
use alloc::vec::Vec;
use core::fmt;
use morsel::{Format, FrameAlloc, GuestPhysAddr, Morsel, MountStats, Perm, PhysMem, SecondLevelTable};

/// What the directory keeps per morsel, as this module needs it.
pub trait Entry<F: Format> {
    fn morsel(&self) -> &Morsel<F>;
    /// The guest that created it (`names::SYSTEM` for one restored from persistent memory).
    fn owner(&self) -> Owner;
    /// Whether guests other than the owner may mount it read-write.
    fn others_may_write(&self) -> bool;
    /// A mount wrote `stats` (for the entry's counters).
    fn mounted(&mut self, _stats: &MountStats) {}
    /// An unmount is about to clear the entry (an ExMap region refuses its fast handles).
    fn unmounting(&mut self) {}
    /// An unmount wrote `stats`.
    fn unmounted(&mut self, _stats: &MountStats) {}

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
}

impl core::ops::Deref for Mounts {
    type Target = [Mount];
    fn deref(&self) -> &[Mount] {
        &self.0
    }
}

/// One guest as the directory sees it: its id, its second-level table and its mounts.
pub struct Space<'a, F: Format> {
    pub guest: Owner,
    pub table: &'a mut SecondLevelTable<F>,
    pub mounts: &'a mut Mounts,
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
        }
    }
}

/// A mount made: where, and what it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mounted {
    pub gpa: u64,
    pub writable: bool,
    pub stats: MountStats,
}

/// A mount taken away: its entry is cleared, but the guest's CPUs may still cache the
/// translation (and the emptied tables, which went to the frame source given to `unmount`).
#[must_use = "the guest's cached translations must be invalidated before its frames are reused"]
#[derive(Debug)]
pub struct Unmounted {
    pub mount: Mount,
    pub stats: MountStats,
}

/// Reserves `name` for a morsel `guest` creates: refused if the name table refuses, or if the
/// guest's mounts and reservations (this one included, each takes a mount when it is entered)
/// would pass `abi::MOUNT_QUOTA` (the reservation is aborted then).
pub fn reserve<T>(names: &mut Names<T>, mounts: &Mounts, guest: Owner, name: Name) -> Result<Ticket, Refusal> {
    let ticket = names.reserve(name, guest).map_err(Refusal::Name)?;
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
    let name = *ticket.name();
    names.commit(ticket, value).map_err(|(e, v)| Entered::Refused(e, v))?;
    mount(names, space, &name, true, alloc, mem).map_err(Entered::Unmounted)
}

/// How `enter` failed.
#[derive(Debug)]
pub enum Entered<T> {
    /// The commit was refused: the value is not in the directory.
    Refused(names::Error, T),
    /// Committed, but the mount was refused: it is in the directory, mounted nowhere.
    Unmounted(Refusal),
}

/// `morsel_open`: mounts `name` into `space`, read-write if `writable` (the owner's, or one
/// others may write). `admit` is asked after the permission check: false (an ExMap batch
/// holds the region) answers `Ok(None)`, nothing changed, for the guest to ask again.
pub fn open<F, T, A, M>(names: &mut Names<T>, space: &mut Space<F>, name: &Name, writable: bool, admit: impl FnOnce(&T) -> bool, alloc: &A, mem: &M) -> Result<Option<Mounted>, Refusal>
where
    F: Format<Input = GuestPhysAddr>,
    T: Entry<F>,
    A: FrameAlloc,
    M: PhysMem,
{
    let n = names.get(name).ok_or(Refusal::NotFound)?.value;
    if writable && !n.writable_by(space.guest) {
        return Err(Refusal::Denied);
    }
    if !admit(n) {
        return Ok(None);
    }
    if space.mounts.iter().any(|m| m.name == *name) {
        return Err(Refusal::AlreadyMounted);
    }
    mount(names, space, name, writable, alloc, mem).map(Some)
}

/// Mounts `name` into `space` at the lowest free slot of its window size (no permission
/// check: `open` and `enter` do theirs).
fn mount<F, T, A, M>(names: &mut Names<T>, space: &mut Space<F>, name: &Name, writable: bool, alloc: &A, mem: &M) -> Result<Mounted, Refusal>
where
    F: Format<Input = GuestPhysAddr>,
    T: Entry<F>,
    A: FrameAlloc,
    M: PhysMem,
{
    let at = names.slot(name).ok_or(Refusal::NotFound)?;
    let n = names.get_mut_at(at, name).ok_or(Refusal::NotFound)?;
    let mounts = &mut space.mounts.0;
    if mounts.len() >= abi::MOUNT_QUOTA as usize {
        return Err(Refusal::Quota);
    }
    mounts.try_reserve(1).map_err(|_| Refusal::NoMemory)?;
    let morsel = n.morsel();
    let window = morsel.window_size();
    let gpa = free_slot(mounts, window).ok_or(Refusal::WindowFull)?;
    let perm = if writable { Perm::RW } else { Perm::RO };
    let stats = morsel.mount(space.table, GuestPhysAddr::new(gpa), perm, alloc, mem).map_err(Refusal::Mount)?;
    let size = morsel.len();
    n.mounted(&stats);
    // Room reserved above: no allocation.
    mounts.push(Mount { gpa, size, window, name: *name, at, writable });
    Ok(Mounted { gpa, writable, stats })
}

/// `morsel_unmount`: takes the mount at `gpa` out of `space`; the intermediate tables it
/// left empty go to `alloc` (which must keep them until the invalidation is done).
pub fn unmount<F, T, A, M>(names: &mut Names<T>, space: &mut Space<F>, gpa: u64, alloc: &A, mem: &M) -> Result<Unmounted, Refusal>
where
    F: Format<Input = GuestPhysAddr>,
    T: Entry<F>,
    A: FrameAlloc,
    M: PhysMem,
{
    let mounts = &mut space.mounts.0;
    let i = mounts.iter().position(|m| m.gpa == gpa).ok_or(Refusal::NotFound)?;
    let mount = mounts.remove(i);
    let n = names.get_mut_at(mount.at, &mount.name).ok_or(Refusal::NotFound)?;
    n.unmounting();
    let stats = n.morsel().unmount(space.table, GuestPhysAddr::new(gpa), alloc, mem).map_err(Refusal::Unmount)?;
    n.unmounted(&stats);
    Ok(Unmounted { mount, stats })
}

/// A guest leaves: unmounts everything it has mounted, last first, each passed to `each`
/// (one invalidation for all of them is the caller's). Returns how many were unmounted.
pub fn drop_mounts<F, T, A, M>(names: &mut Names<T>, space: &mut Space<F>, alloc: &A, mem: &M, mut each: impl FnMut(Unmounted)) -> usize
where
    F: Format<Input = GuestPhysAddr>,
    T: Entry<F>,
    A: FrameAlloc,
    M: PhysMem,
{
    let mut count = 0;
    while let Some(gpa) = space.mounts.last().map(|m| m.gpa) {
        // A refused unmount has taken the mount out of the list too: the loop ends.
        if let Ok(u) = unmount(names, space, gpa, alloc, mem) {
            each(u);
            count += 1;
        }
    }
    count
}

/// Whether `guest` may destroy `name` now: it must be the owner (anyone may, for a restored
/// morsel others may write), `pinned` (the caller's checks: NVMe I/O, an ExMap batch) must
/// find nothing, and it must be mounted nowhere (no guest, none of the `devices` device
/// mounts of it the caller counted).
pub fn check_destroy<F, T>(names: &Names<T>, guest: Owner, name: &str, devices: usize, pinned: impl FnOnce(&T) -> Option<&'static str>) -> Result<(), Refusal>
where
    F: Format,
    T: Entry<F>,
{
    let n = names.get(name).ok_or(Refusal::NotFound)?.value;
    if n.owner() != guest && !(n.owner() == SYSTEM && n.others_may_write()) {
        return Err(Refusal::Denied);
    }
    if let Some(why) = pinned(n) {
        return Err(Refusal::Pinned(why));
    }
    let guests = n.morsel().mount_count();
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
