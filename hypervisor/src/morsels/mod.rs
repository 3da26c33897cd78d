//! The morsel manager: named morsels with an owner, a grant (may others write?), counters,
//! and the hypercalls on them. Mounting writes one entry in the guest's second-level table
//! (or a device domain's); unmounting clears it and invalidates the cached translations.
//!
//! - `directory`: create, open (mount), unmount, size, destroy, stats, end of run; what decides
//!   a guest mount (permissions, `abi::MOUNT_QUOTA`, window slots, unmount, destroy check, a
//!   leaving guest) is `vmcore::directory`, host-tested with real morsels, which this module
//!   calls with the guest's `Guest::space` and the hypervisor's frames;
//! - `persist`: persistent morsels (frames and records in the persistent region, recovery);
//! - `device_mounts`: morsels in device DMA domains (VT-d or AMD-Vi, `crate::iommu`; an NPT
//!   morsel through a view in the IOMMU's format): the IOMMU's part (`Domains`), under the
//!   same `vmcore::directory` decisions as guest mounts (a `DmaSpace` beside the guest's
//!   `Space`);
//! - `proxy`: calls that make a device move a guest's morsel (edu DMA, the NVMe proxy);
//! - `exmap`: ExMap regions (sparse morsels populated and evicted in batches).
//!
//! Names: every creator (RAM and persistent `morsel_create`, `exmap_create`, the restore of
//! persistent morsels at boot) goes through one table, `vmcore::names::Names`: reserve the
//! name (refused `Busy` if it exists or is reserved, charged to the creator's
//! `abi::MORSEL_QUOTA`), build, then commit or abort; a commit never replaces an entry. The
//! table is sized at the start of the run for every guest's whole quota plus the persistent
//! records, and allocates nothing after that.
//!
//! Locking: the `Directory` (names, owners, mounts, device mounts, reservations, quota
//! counts) lives in the run's world and is only touched under the world lock
//! (`vm/runqueue.rs`). A RAM morsel's create reserves its name and checks its size under the
//! lock, and allocates its frames, builds its tables and zeroes its data with the lock let go
//! (`PendingCreate`, which says why frames may be taken outside the lock: the name is
//! reserved meanwhile, holding its `Ticket`: taken for every other creator, counted in the
//! quota, "not found" to `open`; nobody else can reach the frames); its destroy takes it out of the directory under the lock and
//! frees its frames outside (`Removed`: mounted nowhere, its last unmount's shootdown done).
//! Persistent morsels stay under the lock throughout (their records and frames). An NVMe
//! batch (the proxy, ExMap READ and WRITE) is prepared and mounted under the lock, runs with
//! the lock let go while the target morsel is pinned (`Named::in_io`), and is unmounted
//! under the lock again (`proxy::DiskBatch`). Each of these works implements its own steps,
//! `vmcore::hypercall::Deferred` (run outside, then finish or abandon under the lock), beside
//! the code that makes it (`directory.rs`, `proxy.rs`, `exmap.rs`).
//!
//! What a guest makes the hypervisor keep is bounded per guest (`abi::MORSEL_QUOTA` morsels,
//! `abi::MOUNT_QUOTA` mounts, `abi::DEVICE_MOUNT_QUOTA` device mounts) and every heap
//! allocation on those paths is fallible (`try_reserve`): `NoMemory`, never a panic.

mod device_mounts;
mod directory;
pub(crate) use directory::{open_alone, size_alone, unmount_alone};
pub mod exmap;
mod persist;
mod proxy;

pub use proxy::{DiskBatch, ProxyIo};

use alloc::vec::Vec;
use abi::Error;
use crate::vm::guest::Guest;
use crate::vm::Backend;
use morsel::{Format, GuestPhysAddr, Morsel, MountStats};
use vmcore::directory::{DeviceMounts, SpaceId};
pub use vmcore::names::Name;
use vmcore::names::{Limits, Names, Ticket};
use vmcore::region_lock::{Contender, Refusal};


/// Longest morsel name.
pub const NAME_MAX: usize = abi::MORSEL_NAME_MAX;
const _: () = assert!(vmcore::names::NAME_MAX == NAME_MAX);

/// One named morsel.
pub(crate) struct Named<F: Format> {
    pub(crate) morsel: Morsel<F>,
    pub(crate) owner: u32,
    pub(crate) others_may_write: bool,
    /// PTE writes for mounts, unmounts; TLB invalidations.
    mounts: u64,
    unmounts: u64,
    mount_pte_writes: u64,
    path_pte_writes: u64,
    unmount_pte_writes: u64,
    invalidations: u64,
    /// The views of a morsel whose format the IOMMU cannot walk (NPT), built on the first
    /// device mount; destroyed with the morsel.
    pub(crate) views: crate::iommu::Views,
    /// Its directory slot in persistent memory, for a persistent morsel.
    pub(crate) slot: Option<usize>,
    /// The counters of an ExMap region (None for a plain morsel): they live and go with the
    /// region's entry.
    pub(crate) region: Option<exmap::RegionStats>,
    /// An NVMe batch DMAs into or out of its frames now, with the world lock let go
    /// (`proxy::DiskBatch`): it is pinned. Its destroy, an ExMap call on it and a second NVMe
    /// batch on it answer `Busy` until the batch finished (under the lock again); nothing
    /// else frees or moves its data frames or its device views.
    pub(crate) in_io: bool,
    /// An ExMap region's lock and batch counters (`vmcore::region::RegionCell`, its directory
    /// slot's; None for a plain morsel): the lock is held while an ALLOC / FREE batch edits
    /// its leaves with the world lock let go (`vmcore::region::Batch`), taken under the world lock and
    /// given back with or without it. Meanwhile another action on it and a guest mount
    /// retry (`hypercall::Action::Retry`); its destroy, a device mount of it and an NVMe
    /// batch on it answer `Busy` (`Named::admit`).
    pub(crate) cell: Option<&'static exmap::RegionCell>,
}

impl<F: Format> Named<F> {
    pub(crate) fn new(morsel: Morsel<F>, owner: u32, others_may_write: bool, slot: Option<usize>) -> Self {
        Named {
            morsel,
            owner,
            others_may_write,
            mounts: 0,
            unmounts: 0,
            mount_pte_writes: 0,
            path_pte_writes: 0,
            unmount_pte_writes: 0,
            invalidations: 0,
            views: Default::default(),
            slot,
            region: None,
            in_io: false,
            cell: None,
        }
    }

    /// Whether `who` may go on now: always for a plain morsel, by the region's lock for an
    /// ExMap region (`vmcore::region_lock`).
    pub(crate) fn admit(&self, who: Contender) -> Result<(), Refusal> {
        self.cell.map_or(Ok(()), |c| c.lock.admit(who))
    }

    /// `admit` with a hand-over for an action or a guest mount (`RegionLock::admit_in_turn`):
    /// one refused while a batch holds the region's lock is the next one in.
    pub(crate) fn admit_in_turn(&self, who: Contender, turn: vmcore::region_lock::Turn) -> Result<(), Refusal> {
        self.cell.map_or(Ok(()), |c| c.lock.admit_in_turn(who, turn))
    }

    /// Counts a mount (into a guest or a device domain) and what it wrote.
    fn count_mount(&mut self, stats: &MountStats, invalidations: u64) {
        self.mounts += 1;
        self.mount_pte_writes += stats.entry_writes as u64;
        self.path_pte_writes += stats.path_writes as u64;
        self.invalidations += invalidations;
    }

    /// Counts an unmount and its invalidation.
    fn count_unmount(&mut self, stats: &MountStats) {
        self.unmounts += 1;
        self.unmount_pte_writes += stats.entry_writes as u64;
        self.invalidations += 1;
    }
}

/// What `vmcore::directory` needs of an entry: the morsel, its owner and grant, and the
/// counters of its mounts and unmounts (guest and device).
impl<F: Format> vmcore::directory::Entry<F> for Named<F> {
    fn morsel(&self) -> &Morsel<F> {
        &self.morsel
    }
    fn owner(&self) -> u32 {
        self.owner
    }
    fn others_may_write(&self) -> bool {
        self.others_may_write
    }
    /// An ExMap region is not: its mounts go with its lock and its fast handles.
    fn plain(&self) -> bool {
        self.region.is_none() && self.cell.is_none()
    }
    /// A device mount's invalidation (its domain's IOTLB) is counted with it.
    fn mounted(&mut self, space: SpaceId, stats: &MountStats) {
        self.count_mount(stats, u64::from(matches!(space, SpaceId::Device(_))));
        // An ExMap region's FREE shoots down the CPUs of the guests that mounted it.
        if let (SpaceId::Guest(id), Some(cell)) = (space, self.cell) {
            cell.mounted_by(crate::vm::shootdown::placed_on(id));
        }
    }
    /// A region's `Fast` handles made before (the unmounting guest's among them) are refused
    /// from here on: the guest's calls on it go to the world path, which finds no mount.
    fn unmounting(&mut self) {
        if let Some(cell) = self.cell {
            cell.lock.changed();
        }
    }
    fn unmounted(&mut self, _: SpaceId, stats: &MountStats) {
        self.count_unmount(stats);
    }
}

/// The owner of a persistent morsel restored after a reboot: no guest (its names are charged
/// to the persistent directory's record count, `Limits::system`).
pub(crate) const RESTORED: u32 = vmcore::names::SYSTEM;

/// All morsels of the run.
pub struct Directory<F: Format> {
    /// Names of morsels and ExMap regions, with their reservations (`vmcore::names`).
    pub(crate) named: Names<Named<F>>,
    /// One `vmcore::region::RegionCell` per slot of `named` (a region's is its slot's): allocated
    /// once, never freed (the run's directory lives as long as the run), reached by ExMap
    /// batches with the world lock let go.
    pub(crate) cells: &'static [exmap::RegionCell],
    /// Every device mount of the run (`vmcore::directory::DeviceMounts`).
    pub(crate) devices: DeviceMounts,
    /// The persistent region (from `main` through the context), for persistent morsels.
    pub(crate) pmem: Option<&'static crate::mm::pmem::Pmem>,
}

impl<F: Format> Directory<F> {
    /// Whether a morsel or ExMap region named `name` is in the directory (a create that is
    /// not finished does not count): what `name_watch` asks (`vm/notify.rs`).
    pub fn exists(&self, name: &vmcore::names::Hashed) -> bool {
        self.named.get_hashed(name).is_some()
    }

    /// The directory of a run of `guests` guests (ids `0..guests`): room for each one's whole
    /// `abi::MORSEL_QUOTA` and for every persistent record, allocated now (`NoMemory` if the
    /// heap cannot hold it; the run does not start). `seed` keys the name hash.
    pub fn new(pmem: Option<&'static crate::mm::pmem::Pmem>, guests: u32, seed: [u64; 2]) -> Result<Self, vmcore::names::NoMemory> {
        let limits = Limits { owners: guests, quota: abi::MORSEL_QUOTA as u32, system: formats::pmem_layout::SLOTS as u32 };
        let named = Names::try_new(limits, seed)?;
        let mut cells = Vec::new();
        cells.try_reserve_exact(named.capacity()).map_err(|_| vmcore::names::NoMemory)?;
        cells.extend((0..named.capacity()).map(|_| exmap::RegionCell::new()));
        // Exactly `capacity` elements: no reallocation; leaked, as the run's `World` is.
        let cells: &'static [exmap::RegionCell] = alloc::boxed::Box::leak(cells.into_boxed_slice());
        log::info!(target: "morsel", "directory: {} names ({guests} guests x {} + {} persistent records), {} KiB of heap",
            named.capacity(), limits.quota, limits.system, (named.heap_bytes() + core::mem::size_of_val(cells)) / 1024);
        Ok(Directory { named, cells, devices: DeviceMounts::new(), pmem })
    }
}

/// A refusal of the name table as the guest sees it.
pub(crate) fn name_error(e: vmcore::names::Error) -> Error {
    vmcore::directory::Refusal::Name(e).error()
}

/// What `Directory::create` did: all of it (a persistent morsel, mounted at this address), or
/// only the checks and the name's reservation: the call's deferred part (`PendingCreate`,
/// `hypercall::Unlocked::Build`) builds the morsel (frames, tables, zeroed data) with the
/// world lock let go before `Directory::create_finish` enters it and mounts it. Kept rather
/// than `vmcore::hypercall::Outcome`: a create is never retried, and only `Done` is a mount
/// the service still has to announce (`Notify::entered`).
pub enum Started<F: Format> {
    Done(u64),
    Build(PendingCreate<F>),
}

/// A new RAM morsel nobody else knows yet: its name is reserved (the ticket), its size
/// checked against the free memory; `build` allocates its frames, builds its tables and
/// zeroes its data with the world lock let go.
///
/// Why frames may be taken outside the world lock: the allocator never holds a frame that a
/// CPU may still cache a translation to. Every frame an unmount, a FREE or a leaving guest
/// takes away reaches it only after the shootdown that covers it was acknowledged (its
/// emptied tables and trimmed caches through `vm::shootdown::After`, settled when the world
/// lock is let go; a destroyed morsel's frames behind `vm::shootdown::barrier`; an `Owed`
/// overflow waits before it frees). So a frame is safe to hand out whoever takes it and
/// whenever, as ExMap batches already do (their frame caches refill with no world lock).
pub struct PendingCreate<F: Format> {
    pub(crate) ticket: Ticket,
    pub(crate) size: u64,
    pub(crate) page: morsel::PageSize,
    pub(crate) others_may_write: bool,
    /// None until `build` ran; its refusal (out of memory) then, or the morsel.
    pub(crate) built: Option<Result<Morsel<F>, Error>>,
}

impl<F: Format> PendingCreate<F> {
    /// Allocates the frames (this CPU's allocator core, `frames`: `Deferred::run`'s, which the
    /// vCPU loop takes from its per-CPU entry), builds the tables and zeroes the data frames:
    /// no lock needed (the morsel is reachable only from here). The frames are taken and the data zeroed in 2 MiB pieces, answering this CPU's shootdown
    /// and drain requests after each 2 MiB (`vm::shootdown::Answering`): a 1 GiB morsel keeps
    /// no other CPU waiting for it.
    pub fn build(&mut self, frames: &crate::mm::frames::Frames) {
        let source = crate::vm::shootdown::Answering::wrap(frames);
        let built = match Morsel::<F>::create(self.size, self.page, &source, &directory::TablesOnly) {
            Ok(m) => {
                Self::zero(&m);
                Ok(m)
            }
            Err(morsel::Error::OutOfMemory) => Err(Error::NoMemory),
            Err(_) => Err(Error::Invalid),
        };
        self.built = Some(built);
    }

    /// Zeroes the data frames of `morsel`, answering every 2 MiB.
    fn zero(morsel: &Morsel<F>) {
        use morsel::PhysMem;
        let mem = &crate::mm::frames::IDENTITY;
        let answer = crate::vm::shootdown::Answering::new();
        morsel.for_each_data_frame(mem, |frame, order| {
            if order <= 9 {
                mem.zero_data(frame, order);
                answer.did(1 << order);
            } else {
                for k in 0..1u64 << (order - 9) {
                    mem.zero_data(morsel::HostPhysAddr::new(frame.as_u64() + (k << 21)), 9);
                    answer.did(512);
                }
            }
        });
    }
}

/// A RAM morsel taken out of the directory (mounted nowhere, its last unmount's shootdown
/// done), with its name: `free` gives its frames back, with or without the world lock.
pub struct Removed<F: Format> {
    pub(crate) name: Name,
    /// None once freed.
    pub(crate) morsel: Option<Morsel<F>>,
}

impl<F: Format> Removed<F> {
    /// Frees the frames through `frames` (any CPU's handle), answering shootdown requests
    /// every 2 MiB given back. First waits until every shootdown requested so far was
    /// acknowledged (`vm::shootdown::barrier`): a CPU may still cache a translation of this
    /// morsel from a mount another CPU removed just before (its caller waits for the
    /// acknowledgments with no lock held), and no such frame may go to another owner before.
    pub fn free(&mut self, frames: &crate::mm::frames::Frames) {
        let Some(morsel) = self.morsel.take() else { return };
        let (name, len) = (&self.name, morsel.len());
        crate::vm::shootdown::barrier();
        let frames = crate::vm::shootdown::Answering::wrap(frames);
        match morsel.destroy(&frames, &crate::mm::frames::IDENTITY) {
            Ok(()) => log::info!(target: "morsel", "'{name}' destroyed, {} given back", formats::units::Bytes(len)),
            Err((_, e)) => log::error!(target: "morsel", "'{name}' cannot be destroyed: {e}"),
        }
    }
}

/// A morsel name from guest memory (its length was checked by `abi::Call::decode`): printable
/// ASCII without spaces, since names appear in logs and in other guests' calls. A name in
/// guest RAM is copied through the guest's fixed RAM frames (`guest::Shared::ram_pieces`, as
/// `console_write` does: no walk of its second-level table, which cost ~200 Bochs ticks of
/// the ~340 under the world lock); one elsewhere (in a mounted morsel) through the table.
pub(crate) fn read_name<B: Backend>(g: &Guest<B>, name: abi::Name) -> Result<Name, Error> {
    let mut buf = [0u8; NAME_MAX];
    let buf = buf.get_mut(..name.0.len as usize).ok_or(Error::Invalid)?;
    if copy_from_ram(&g.shared, name.0.ptr, buf).is_none() {
        g.space.lock().mem.read(GuestPhysAddr::new(name.0.ptr), buf)?;
    }
    Name::new(buf).map_err(|_| Error::Invalid)
}

/// `buf.len()` bytes at guest-physical `ptr` through the guest's fixed RAM frames (no lock
/// needed); None if they are not wholly in guest RAM.
fn copy_from_ram(shared: &crate::vm::guest::Shared, ptr: u64, buf: &mut [u8]) -> Option<()> {
    shared.ram_pieces(ptr, buf.len(), |piece, done| {
        let n = piece.len();
        let _ = piece.copy_to(0, &mut buf[done..done + n]);
    })
}

/// A valid name read whole from guest RAM (`guest::Shared::ram_pieces`), which needs no lock:
/// `sched::name_ahead` reads a call's name so before it takes the world lock. None if it is
/// not wholly in guest RAM or not a valid name (`read_name` then reads it under the lock, with
/// the same checks and their errors).
pub(crate) fn read_ram_name(shared: &crate::vm::guest::Shared, name: abi::Name) -> Option<Name> {
    let mut buf = [0u8; NAME_MAX];
    let buf = buf.get_mut(..name.0.len as usize)?;
    copy_from_ram(shared, name.0.ptr, buf)?;
    Name::new(buf).ok()
}

/// `read_name`, hashed with `keys` (the directory's): the name this call's vCPU read and
/// hashed before the world lock (`Guest::name_ahead`) if it is this call's, else read and
/// hashed now, under the lock.
pub(crate) fn read_hashed<B: Backend>(g: &Guest<B>, keys: vmcore::names::Keys, name: abi::Name) -> Result<vmcore::names::Hashed, Error> {
    match vmcore::hypercall::NameAhead::for_call(g.name_ahead.as_ref(), name) {
        Some(h) => Ok(h),
        None => read_name(g, name).map(|n| keys.hash(n)),
    }
}

/// How long a caller refused at an ExMap region's lock keeps its turn
/// (`RegionLock::admit_in_turn`) when it does not come back: two time slices, so a waiter
/// whose CPU runs another vCPU meanwhile is back in time, and a stopped one holds nobody up
/// longer.
const TURN_PATIENCE_US: u64 = 2 * crate::vm::sched::SLICE_US;

/// The turn of guest `guest`'s vCPU `vcpu` (`u32::MAX`: a call that is not one vCPU's own,
/// `morsel_open`) at an ExMap region's lock, now.
pub(crate) fn turn(guest: u32, vcpu: u32) -> vmcore::region_lock::Turn {
    let per_us = crate::platform::time::tsc_per_us().max(1);
    vmcore::region_lock::Turn {
        who: (u64::from(guest) + 1) << 32 | u64::from(vcpu),
        now: crate::platform::time::tsc(),
        patience: TURN_PATIENCE_US * per_us,
    }
}
