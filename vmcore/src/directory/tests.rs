//! Tests of the directory's mounts with real morsels on a simulated machine (`SimMem`) and
//! fake guests (a second-level table and a mount list each). Run in debug and `--release`.

use super::*;
use morsel::{can_share, Ept, IoVirtAddr, Npt, PageSize, SimMem, VtdSl};
use proptest::prelude::*;
use std::vec;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const SEED: [u64; 2] = [7, 11];

/// What the directory keeps per morsel, as the hypervisor's `Named` does (counters only).
struct Named<F: Format> {
    morsel: Morsel<F>,
    owner: Owner,
    shared: bool,
    mounts: u32,
    unmounts: u32,
    /// Its view in the fake IOMMU's format where that cannot walk the morsel's (NPT), built
    /// on the first device mount, as the hypervisor's `Named::views`.
    view: Option<Morsel<VtdSl>>,
    /// The space of the last mount or unmount.
    last: Option<SpaceId>,
    /// `Entry::plain` (false: as an ExMap region).
    plain: bool,
}

impl<F: Format> Entry<F> for Named<F> {
    fn morsel(&self) -> &Morsel<F> {
        &self.morsel
    }
    fn owner(&self) -> Owner {
        self.owner
    }
    fn others_may_write(&self) -> bool {
        self.shared
    }
    fn plain(&self) -> bool {
        self.plain
    }
    fn mounted(&mut self, space: SpaceId, _: &MountStats) {
        self.mounts += 1;
        self.last = Some(space);
    }
    fn unmounted(&mut self, space: SpaceId, _: &MountStats) {
        self.unmounts += 1;
        self.last = Some(space);
    }
}

fn n(s: &str) -> Name {
    Name::new(s.as_bytes()).unwrap()
}

/// `s` hashed with the tables' keys, as the hypervisor hashes it before its lock.
fn h(s: &str) -> names::Hashed {
    names::Keys::of(SEED).hash(n(s))
}

/// The device functions the fake IOMMU has domains for.
const EDU: Bdf = Bdf::new(0, 3, 0);
const NIC: Bdf = Bdf::new(0, 4, 0);
/// One it has none for.
const NONE: Bdf = Bdf::new(0, 9, 0);
/// An I/O virtual address in a device domain.
const IOVA: u64 = 0x4000_0000;

/// A fake IOMMU: a VT-d second-level table per device domain, frames from `SimMem`. A morsel
/// whose format it walks (EPT: `can_share`) goes in as its own subtree, another (NPT)
/// through its VT-d view over the same data frames, built on the first device mount and
/// kept with the entry (the hypervisor's `iommu::mount` does the same, in its unit's format).
struct FakeIommu {
    domains: Vec<(Bdf, SecondLevelTable<VtdSl>)>,
}

impl FakeIommu {
    fn table(&mut self, bdf: Bdf) -> Result<&mut SecondLevelTable<VtdSl>, Refusal> {
        self.domains.iter_mut().find(|(b, _)| *b == bdf).map(|(_, t)| t).ok_or(Refusal::Domain(abi::Error::NotFound))
    }
}

impl<F: Format> Domain<F, Named<F>> for FakeIommu {
    fn mount<A: FrameAlloc, M: PhysMem>(&mut self, bdf: Bdf, n: &mut Named<F>, iova: u64, perm: Perm, alloc: &A, mem: &M) -> Result<MountStats, Refusal> {
        let table = self.table(bdf)?;
        let at = IoVirtAddr::new(iova);
        if can_share::<F, VtdSl>() {
            return n.morsel.mount(table, at, perm, alloc, mem).map_err(Refusal::Mount);
        }
        let view = match &mut n.view {
            Some(v) => v,
            slot @ None => slot.insert(n.morsel.view::<VtdSl>(alloc, mem).map_err(Refusal::Mount)?),
        };
        view.mount(table, at, perm, alloc, mem).map_err(Refusal::Mount)
    }
    fn unmount<A: FrameAlloc, M: PhysMem>(&mut self, bdf: Bdf, n: &mut Named<F>, iova: u64, alloc: &A, mem: &M) -> Result<MountStats, Refusal> {
        let table = self.table(bdf)?;
        let at = IoVirtAddr::new(iova);
        match &n.view {
            _ if can_share::<F, VtdSl>() => n.morsel.unmount(table, at, alloc, mem),
            Some(view) => view.unmount(table, at, alloc, mem),
            None => return Err(Refusal::Domain(abi::Error::NotFound)),
        }
        .map_err(Refusal::Unmount)
    }
}

/// A directory, `guests` fake guests and a fake IOMMU with domains for `EDU` and `NIC`, their
/// frames from `mem`.
struct World<'m, F: Format> {
    mem: &'m SimMem,
    names: Names<Named<F>>,
    guests: Vec<(SecondLevelTable<F>, Mounts)>,
    devices: DeviceMounts,
    iommu: FakeIommu,
}

impl<'m, F: Format<Input = GuestPhysAddr>> World<'m, F> {
    fn new(mem: &'m SimMem, guests: u32, quota: u32) -> Self {
        let names = Names::try_new(names::Limits { owners: guests, quota, system: 4 }, SEED).unwrap();
        let guests = (0..guests).map(|_| (SecondLevelTable::new(mem, mem).unwrap(), Mounts::new())).collect();
        let domains = [EDU, NIC].into_iter().map(|b| (b, SecondLevelTable::new(mem, mem).unwrap())).collect();
        World { mem, names, guests, devices: DeviceMounts::new(), iommu: FakeIommu { domains } }
    }

    /// Guest `g`'s view of `bdf`'s domain, a mount going to `iova`.
    fn dma(&mut self, g: u32, bdf: Bdf, iova: u64) -> (&mut Names<Named<F>>, DmaSpace<'_, &mut FakeIommu>) {
        (&mut self.names, DmaSpace { guest: g, bdf, iova, mounts: &mut self.devices, domain: &mut self.iommu })
    }

    fn device_mount(&mut self, g: u32, name: &str, bdf: Bdf, iova: u64, writable: bool) -> Result<Mounted, Refusal> {
        let mem = self.mem;
        let (names, mut space) = self.dma(g, bdf, iova);
        open(names, &mut space, &h(name), writable, |_| true, mem, mem).map(|m| m.expect("admitted"))
    }

    fn device_unmount(&mut self, g: u32, bdf: Bdf, iova: u64) -> Result<Unmounted<DeviceMount>, Refusal> {
        let mem = self.mem;
        let (names, mut space) = self.dma(g, bdf, iova);
        unmount(names, &mut space, iova, mem, mem)
    }

    /// Guest `g` leaves: its guest mounts, then its device mounts; how many of each.
    fn leave(&mut self, g: u32) -> (usize, usize) {
        let mem = self.mem;
        let (names, mut space) = self.space(g);
        let guest = drop_mounts(names, &mut space, mem, mem, |_| {});
        let devices = drop_device_mounts(&mut self.names, &mut self.devices, g, &mut self.iommu, mem, mem, |_| {});
        (guest, devices)
    }

    fn translate_device(&self, bdf: Bdf, iova: u64) -> Option<morsel::Translation> {
        let (_, t) = self.iommu.domains.iter().find(|(b, _)| *b == bdf)?;
        t.translate(IoVirtAddr::new(iova), self.mem)
    }

    fn space(&mut self, g: u32) -> (&mut Names<Named<F>>, Space<'_, F>) {
        let (table, mounts) = &mut self.guests[g as usize];
        (&mut self.names, Space { guest: g, table, mounts })
    }

    /// Reserves, builds (4 KiB pages) and enters `name` for `g`, as a create does.
    fn create(&mut self, g: u32, name: &str, size: u64, shared: bool) -> Result<Mounted, Refusal> {
        let mem = self.mem;
        let (names, mut space) = self.space(g);
        let ticket = reserve(names, space.mounts, g, &h(name))?;
        let morsel = Morsel::<F>::create(size, PageSize::Size4K, mem, mem).unwrap();
        let value = Named { morsel, owner: g, shared, mounts: 0, unmounts: 0, view: None, last: None, plain: true };
        match enter(names, &mut space, ticket, value, mem, mem) {
            Ok(m) => Ok(m),
            Err(Entered::Unmounted(r)) => Err(r),
            Err(Entered::Refused(e, _)) => panic!("commit refused: {e}"),
        }
    }

    fn open(&mut self, g: u32, name: &str, writable: bool) -> Result<Mounted, Refusal> {
        let mem = self.mem;
        let (names, mut space) = self.space(g);
        open(names, &mut space, &h(name), writable, |_| true, mem, mem).map(|m| m.expect("admitted"))
    }

    /// `open` in its three steps (`open_begin`, `open_place`, `open_end`); None where the
    /// morsel is not plain (nothing changed).
    fn open_in_steps(&mut self, g: u32, name: &str, writable: bool) -> Result<Option<Mounted>, Refusal> {
        let mem = self.mem;
        let Some(o) = open_begin(&mut self.names, g, &h(name), writable)? else { return Ok(None) };
        let placed = {
            let (_, mut space) = self.space(g);
            open_place(&mut space, &o, mem, mem)
        };
        open_end(&mut self.names, g, o, &placed);
        placed.map(Some)
    }

    /// `unmount` in its two steps (`unmount_begin`, `unmount_end`).
    fn unmount_in_steps(&mut self, g: u32, gpa: u64) -> Result<Option<Unmounted>, Refusal> {
        let mem = self.mem;
        let u = {
            let (_, mut space) = self.space(g);
            unmount_begin(&mut space, gpa, mem, mem)?
        };
        if let Some(u) = &u {
            unmount_end(&mut self.names, g, u);
        }
        Ok(u)
    }

    fn unmount(&mut self, g: u32, gpa: u64) -> Result<Unmounted, Refusal> {
        let mem = self.mem;
        let (names, mut space) = self.space(g);
        unmount(names, &mut space, gpa, mem, mem)
    }

    fn check_destroy(&self, g: u32, name: &str) -> Result<(), Refusal> {
        check_destroy(&self.names, &self.devices, g, &self.names.keys().hash(Name::new(name.as_bytes()).unwrap()), |_| None)
    }

    /// Takes `name` out of the directory and frees its frames and its view's tables (the
    /// caller checked).
    fn destroy(&mut self, name: &str) {
        let (_, _, v) = self.names.remove(name).unwrap();
        if let Some(view) = v.view {
            view.destroy(self.mem, self.mem).unwrap();
        }
        v.morsel.destroy(self.mem, self.mem).unwrap();
    }

    fn translate(&self, g: u32, gpa: u64) -> Option<morsel::Translation> {
        self.guests[g as usize].0.translate(GuestPhysAddr::new(gpa), self.mem)
    }

    fn morsel(&self, name: &str) -> &Morsel<F> {
        &self.names.get(name).unwrap().value.morsel
    }
}

/// Create + commit mounts read-write in the owner, in its morsel window, translating to the
/// morsel's frames; for both formats the hypervisor uses.
fn create_mounts_in_the_owner<F: Format<Input = GuestPhysAddr>>() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<F>::new(&mem, 2, 8);
    let m = w.create(0, "a", 64 * 1024, false).unwrap();
    assert!(m.writable);
    assert!((abi::MORSEL_WINDOW_GPA..abi::MORSEL_WINDOW_GPA + abi::MORSEL_WINDOW_SIZE).contains(&m.addr));
    assert_eq!(m.stats.entry_writes, 1);
    let mount = w.guests[0].1.at(m.addr).unwrap().clone();
    assert_eq!((mount.name, mount.size, mount.window, mount.writable), (n("a"), 64 * 1024, 2 * MIB, true));
    let t = w.translate(0, m.addr + 8192).unwrap();
    assert!(t.perm.write);
    assert_eq!(Some(t.addr), w.morsel("a").translate(8192, &mem));
    assert_eq!(w.morsel("a").mount_count(), 1);
    assert_eq!(w.names.get("a").unwrap().value.mounts, 1);
    // Not in the other guest.
    assert!(w.guests[1].1.is_empty());
    assert_eq!(w.translate(1, m.addr), None);
}

#[test]
fn create_and_commit_mount_read_write_in_the_owner() {
    create_mounts_in_the_owner::<Ept>();
    create_mounts_in_the_owner::<Npt>();
}

#[test]
fn read_write_needs_the_owner_or_a_grant() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "private", 4096, false).unwrap();
    w.create(0, "shared", 4096, true).unwrap();
    assert_eq!(w.open(1, "private", true), Err(Refusal::Denied));
    assert_eq!(Refusal::Denied.error(), abi::Error::Denied);
    assert!(w.guests[1].1.is_empty());
    let ro = w.open(1, "private", false).unwrap();
    assert!(!ro.writable);
    let t = w.translate(1, ro.addr).unwrap();
    assert!(t.perm.read && !t.perm.write);
    let rw = w.open(1, "shared", true).unwrap();
    assert!(w.translate(1, rw.addr).unwrap().perm.write);
    assert_eq!(w.morsel("private").mount_count(), 2);
}

#[test]
fn a_reserved_name_is_not_found_until_committed() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    let ticket = {
        let (names, space) = w.space(0);
        reserve(names, space.mounts, 0, &h("pending")).unwrap()
    };
    assert_eq!(w.open(1, "pending", false), Err(Refusal::NotFound));
    assert_eq!(w.open(1, "nothing", false), Err(Refusal::NotFound));
    let morsel = Morsel::<Ept>::create(4096, PageSize::Size4K, &mem, &mem).unwrap();
    let (names, mut space) = w.space(0);
    enter(names, &mut space, ticket, Named { morsel, owner: 0, shared: false, mounts: 0, unmounts: 0, view: None, last: None, plain: true }, &mem, &mem).map_err(|_| ()).unwrap();
    w.open(1, "pending", false).unwrap();
}

#[test]
fn a_commit_never_replaces() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, false).unwrap();
    let (names, space) = w.space(1);
    assert_eq!(reserve(names, space.mounts, 1, &h("a")).unwrap_err(), Refusal::Name(names::Error::Taken));
    assert_eq!(Refusal::Name(names::Error::Taken).error(), abi::Error::Busy);
    assert_eq!(w.names.get("a").unwrap().owner, 0);
}

#[test]
fn a_second_mount_in_the_same_guest_is_busy() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, false).unwrap();
    assert_eq!(w.open(0, "a", false), Err(Refusal::AlreadyMounted));
    w.open(1, "a", false).unwrap();
    assert_eq!(w.open(1, "a", false), Err(Refusal::AlreadyMounted));
    assert_eq!(Refusal::AlreadyMounted.error(), abi::Error::Busy);
    assert_eq!(w.guests[1].1.len(), 1);
    assert_eq!(w.morsel("a").mount_count(), 2);
}

#[test]
fn a_refused_admission_changes_nothing() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, false).unwrap();
    let (names, mut space) = w.space(1);
    assert_eq!(open(names, &mut space, &h("a"), false, |_| false, &mem, &mem), Ok(None));
    // Permission comes first: a refused writer is told so, not asked to retry.
    assert_eq!(open(names, &mut space, &h("a"), true, |_| false, &mem, &mem), Err(Refusal::Denied));
    assert!(w.guests[1].1.is_empty());
}

#[test]
fn a_mount_past_the_quota_changes_nothing() {
    let quota = abi::MOUNT_QUOTA as usize;
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 3, quota as u32);
    // Guests 1 and 2 create one more than guest 0 may mount.
    for i in 0..=quota {
        w.create(1 + (i % 2) as u32, &std::format!("m{i}"), 4096, false).unwrap();
    }
    for i in 0..quota {
        w.open(0, &std::format!("m{i}"), false).unwrap();
    }
    let last = std::format!("m{quota}");
    let (frames, writes, tables) = (mem.allocated_frames(), mem.writes(), w.guests[0].0.stats());
    assert_eq!(w.open(0, &last, false), Err(Refusal::Quota));
    assert_eq!(Refusal::Quota.error(), abi::Error::NoMemory);
    assert_eq!(w.guests[0].1.len(), quota);
    assert_eq!((mem.allocated_frames(), mem.writes(), w.guests[0].0.stats()), (frames, writes, tables));
    assert_eq!(w.morsel(&last).mount_count(), 1);
    // A create by a guest at its quota is refused at the reservation, which is given back.
    let (names, space) = w.space(0);
    assert_eq!(reserve(names, space.mounts, 0, &h("more")).unwrap_err(), Refusal::Quota);
    assert!(!w.names.is_reserved("more"));
    assert_eq!(w.names.count(0).held, 0);
    // One unmount makes room again.
    let gpa = w.guests[0].1[0].gpa;
    let _ = w.unmount(0, gpa).unwrap();
    w.open(0, &last, false).unwrap();
}

#[test]
fn reservations_count_against_the_mount_quota() {
    let quota = abi::MOUNT_QUOTA as u32;
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, quota + 1);
    let (names, space) = w.space(0);
    let tickets: Vec<Ticket> = (0..quota).map(|i| reserve(names, space.mounts, 0, &h(&std::format!("r{i}"))).unwrap()).collect();
    assert_eq!(reserve(names, space.mounts, 0, &h("one-more")).unwrap_err(), Refusal::Quota);
    for t in tickets {
        names.abort(t);
    }
    assert_eq!(names.count(0).held, 0);
}

#[test]
fn unmount_of_an_unknown_address_is_not_found() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    let m = w.create(0, "a", 4096, false).unwrap();
    assert_eq!(w.unmount(0, m.addr + 4096).unwrap_err(), Refusal::NotFound);
    assert_eq!(w.unmount(1, m.addr).unwrap_err(), Refusal::NotFound);
    assert_eq!(w.guests[0].1.len(), 1);
    assert!(w.translate(0, m.addr).is_some());
}

#[test]
fn unmount_clears_the_entry_and_frees_emptied_tables() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, false).unwrap();
    let (tables, frames) = (mem.table_frames(), mem.allocated_frames());
    let m = w.open(1, "a", true).unwrap_err();
    assert_eq!(m, Refusal::Denied);
    let m = w.open(1, "a", false).unwrap();
    assert!(m.stats.path_writes > 0, "the first mount into an empty window builds tables");
    assert!(mem.table_frames() > tables);
    assert!(w.translate(1, m.addr).is_some());
    let u = w.unmount(1, m.addr).unwrap();
    assert_eq!(u.mount.name, n("a"));
    assert_eq!(u.stats.path_writes, m.stats.path_writes);
    assert_eq!(w.translate(1, m.addr), None);
    assert!(w.guests[1].1.is_empty());
    assert_eq!((mem.table_frames(), mem.allocated_frames()), (tables, frames));
    assert_eq!(w.morsel("a").mount_count(), 1);
    assert_eq!(w.names.get("a").unwrap().value.unmounts, 1);
    // The owner's mount is untouched.
    assert!(w.translate(0, w.guests[0].1[0].gpa).is_some());
}

#[test]
fn destroy_by_a_non_owner_is_denied() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    let m = w.create(0, "a", 4096, true).unwrap();
    let _ = w.unmount(0, m.addr).unwrap();
    assert_eq!(w.check_destroy(1, "a"), Err(Refusal::Denied));
    assert_eq!(w.check_destroy(0, "a"), Ok(()));
    assert_eq!(w.check_destroy(0, "b"), Err(Refusal::NotFound));
    // One restored from persistent memory (no owner) that others may write: anyone.
    for (name, shared, want) in [("restored-rw", true, Ok(())), ("restored-ro", false, Err(Refusal::Denied))] {
        let t = w.names.reserve(n(name), SYSTEM).unwrap();
        let morsel = Morsel::<Ept>::create(4096, PageSize::Size4K, &mem, &mem).unwrap();
        w.names.commit(t, Named { morsel, owner: SYSTEM, shared, mounts: 0, unmounts: 0, view: None, last: None, plain: true }).map_err(|_| ()).unwrap();
        assert_eq!(w.check_destroy(1, name), want);
    }
}

#[test]
fn destroy_while_mounted_is_busy() {
    let mem = SimMem::new(16 * GIB);
    // NPT: the device mount goes through the view, the morsel's count is its guest mounts.
    let mut w = World::<Npt>::new(&mem, 2, 8);
    let m = w.create(0, "a", 4096, false).unwrap();
    let seen = w.open(1, "a", false).unwrap();
    assert_eq!(w.check_destroy(0, "a"), Err(Refusal::Mounted { guests: 2, devices: 0 }));
    w.device_mount(1, "a", EDU, IOVA, false).unwrap();
    let _ = w.unmount(0, m.addr).unwrap();
    let _ = w.unmount(1, seen.addr).unwrap();
    assert_eq!(w.check_destroy(0, "a"), Err(Refusal::Mounted { guests: 0, devices: 1 }));
    assert_eq!(Refusal::Mounted { guests: 0, devices: 1 }.error(), abi::Error::Busy);
    let _ = w.device_unmount(1, EDU, IOVA).unwrap();
    assert_eq!(check_destroy(&w.names, &w.devices, 0, &w.names.keys().hash(Name::new(b"a").unwrap()), |_| Some("has I/O in flight")), Err(Refusal::Pinned("has I/O in flight")));
    assert_eq!(w.check_destroy(0, "a"), Ok(()));
}

#[test]
fn destroy_after_unmount_gives_every_frame_back() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    let before = (mem.allocated_frames(), mem.free_pages(), mem.table_frames());
    // 3 MiB of 4 KiB pages: a root at L2, a 1 GiB window.
    let m = w.create(0, "a", 3 * MIB, true).unwrap();
    let seen = w.open(1, "a", true).unwrap();
    assert_eq!(w.guests[0].1[0].window, GIB);
    assert!(mem.allocated_frames() > before.0 + 3 * 256);
    let _ = w.unmount(1, seen.addr).unwrap();
    let _ = w.unmount(0, m.addr).unwrap();
    w.check_destroy(0, "a").unwrap();
    w.destroy("a");
    assert_eq!((mem.allocated_frames(), mem.free_pages(), mem.table_frames()), before);
    assert!(w.names.get("a").is_none());
}

#[test]
fn free_slot_aligns_and_skips_mounts() {
    let m = |gpa, window| Mount { gpa, size: window, window, name: n("x"), at: names_slot(), writable: false, plain: None };
    let base = abi::MORSEL_WINDOW_GPA;
    assert_eq!(free_slot(&[], 2 * MIB), Some(base));
    let small = [m(base, 2 * MIB)];
    assert_eq!(free_slot(&small, 2 * MIB), Some(base + 2 * MIB));
    assert_eq!(free_slot(&small, GIB), Some(base + GIB));
    // The whole window taken by one 512 GiB mount per slot: nothing left.
    let full: Vec<Mount> = (0..abi::MORSEL_WINDOW_SIZE / (512 * GIB)).map(|k| m(base + k * 512 * GIB, 512 * GIB)).collect();
    assert_eq!(free_slot(&full, 2 * MIB), None);
}

/// A `SlotId` for mounts made up by hand (`free_slot` looks only at addresses).
fn names_slot() -> SlotId {
    let mut t = Names::<()>::try_new(names::Limits { owners: 1, quota: 1, system: 0 }, SEED).unwrap();
    let r = t.reserve(n("x"), 0).unwrap();
    r.slot()
}

proptest! {
    /// Whatever was mounted and unmounted before, a free slot is aligned to its size, inside
    /// the morsel window, and overlaps no mount.
    #[test]
    fn free_slot_never_overlaps(steps in prop::collection::vec((0u32..4, any::<bool>(), any::<prop::sample::Index>()), 1..80)) {
        let sizes = [2 * MIB, GIB, 512 * GIB, 2 * MIB];
        let at = names_slot();
        let mut mounts: Vec<Mount> = vec![];
        for (size, remove, which) in steps {
            if remove && !mounts.is_empty() {
                mounts.remove(which.index(mounts.len()));
                continue;
            }
            let size = sizes[size as usize];
            let Some(gpa) = free_slot(&mounts, size) else { continue };
            prop_assert_eq!(gpa % size, 0);
            prop_assert!(gpa >= abi::MORSEL_WINDOW_GPA && gpa + size <= abi::MORSEL_WINDOW_GPA + abi::MORSEL_WINDOW_SIZE);
            for m in &mounts {
                prop_assert!(gpa + size <= m.gpa || m.gpa + m.window <= gpa, "{:#x}+{:#x} overlaps {:#x}+{:#x}", gpa, size, m.gpa, m.window);
            }
            mounts.push(Mount { gpa, size, window: size, name: n("x"), at, writable: false, plain: None });
        }
    }
}

#[test]
fn a_leaving_guest_unmounts_everything() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, false).unwrap();
    w.create(0, "b", 3 * MIB, false).unwrap();
    w.create(0, "c", 8192, true).unwrap();
    let tables = mem.table_frames();
    let gpas: Vec<u64> = ["a", "b", "c"].iter().map(|s| w.open(1, s, false).unwrap().addr).collect();
    let (names, mut space) = w.space(1);
    let mut gone = vec![];
    let count = drop_mounts(names, &mut space, &mem, &mem, |u| gone.push(u.mount.gpa));
    assert_eq!(count, 3);
    gone.reverse();
    assert_eq!(gone, gpas);
    assert!(w.guests[1].1.is_empty());
    for (s, gpa) in ["a", "b", "c"].iter().zip(&gpas) {
        assert_eq!(w.morsel(s).mount_count(), 1, "{s}: only the owner's mount is left");
        assert_eq!(w.translate(1, *gpa), None);
    }
    assert_eq!(mem.table_frames(), tables);
    assert_eq!(w.guests[1].0.mounts(), 0);
}

#[test]
fn a_full_window_is_busy_and_leaves_the_new_morsel_entered() {
    let mem = SimMem::new(64 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 16);
    let slots = abi::MORSEL_WINDOW_SIZE / (512 * GIB);
    // 2 GiB of 2 MiB pages: a root at L3, a 512 GiB window; the window holds `slots` of them.
    let big = |w: &mut World<Ept>, name: &str| {
        let (names, mut space) = w.space(0);
        let ticket = reserve(names, space.mounts, 0, &h(name)).unwrap();
        let morsel = Morsel::<Ept>::create(2 * GIB, PageSize::Size2M, &mem, &mem).unwrap();
        enter(names, &mut space, ticket, Named { morsel, owner: 0, shared: false, mounts: 0, unmounts: 0, view: None, last: None, plain: true }, &mem, &mem)
    };
    for i in 0..slots {
        let m = big(&mut w, &std::format!("big{i}")).map_err(|_| ()).unwrap();
        assert_eq!(m.addr, abi::MORSEL_WINDOW_GPA + i * 512 * GIB);
    }
    let (frames, tables) = (mem.allocated_frames(), w.guests[0].0.stats());
    match big(&mut w, "one-more") {
        Err(Entered::Unmounted(r)) => assert_eq!((r, r.error()), (Refusal::WindowFull, abi::Error::Busy)),
        other => panic!("not refused for the window: {:?}", other.map_err(|_| ())),
    }
    // In the directory, mounted nowhere: the caller destroys it.
    assert_eq!(w.morsel("one-more").mount_count(), 0);
    assert_eq!(w.guests[0].0.stats(), tables);
    w.check_destroy(0, "one-more").unwrap();
    w.destroy("one-more");
    assert_eq!(mem.allocated_frames(), frames);
    // A small morsel finds no slot either: every 512 GiB is taken.
    w.create(1, "small", 4096, false).unwrap();
    assert_eq!(w.open(0, "small", false), Err(Refusal::WindowFull));
}

#[test]
fn a_mount_out_of_frames_changes_nothing() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, false).unwrap();
    // Guest 1's window is empty: its first mount needs intermediate tables.
    mem.limit_free(0);
    let (frames, tables) = (mem.allocated_frames(), w.guests[1].0.stats());
    assert_eq!(w.open(1, "a", false), Err(Refusal::Mount(morsel::Error::OutOfMemory)));
    assert_eq!(Refusal::Mount(morsel::Error::OutOfMemory).error(), abi::Error::NoMemory);
    assert_eq!((mem.allocated_frames(), w.guests[1].0.stats()), (frames, tables));
    assert!(w.guests[1].1.is_empty());
    assert_eq!(w.morsel("a").mount_count(), 1);
}

/// Device mounts: the same permission check as a guest mount (read-write by the owner or
/// with the grant, read-only by anyone), the entry in the device's domain, translating to
/// the morsel's frames with the rights asked for.
fn device_mount_permission<F: Format<Input = GuestPhysAddr>>() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<F>::new(&mem, 2, 8);
    w.create(0, "private", 4096, false).unwrap();
    w.create(0, "shared", 4096, true).unwrap();
    assert_eq!(w.device_mount(1, "private", EDU, IOVA, true), Err(Refusal::Denied));
    assert!(w.devices.is_empty());
    assert_eq!(w.translate_device(EDU, IOVA), None);
    let ro = w.device_mount(1, "private", EDU, IOVA, false).unwrap();
    assert_eq!((ro.addr, ro.writable, ro.stats.entry_writes), (IOVA, false, 1));
    let t = w.translate_device(EDU, IOVA).unwrap();
    assert!(t.perm.read && !t.perm.write);
    assert_eq!(Some(t.addr), w.morsel("private").translate(0, &mem));
    let rw = w.device_mount(1, "shared", EDU, IOVA + GIB, true).unwrap();
    assert!(rw.writable && w.translate_device(EDU, IOVA + GIB).unwrap().perm.write);
    w.device_mount(0, "private", NIC, IOVA, true).unwrap();
    assert!(w.translate_device(NIC, IOVA).unwrap().perm.write);
    assert_eq!(w.names.get("private").unwrap().value.last, Some(SpaceId::Device(NIC)));
    let d = &w.devices[0];
    assert_eq!((d.name, d.bdf, d.iova, d.guest, d.writable, d.space()), (n("private"), EDU, IOVA, 1, false, SpaceId::Device(EDU)));
    assert_eq!(w.names.get("private").unwrap().value.mounts, 3, "the owner's, two device mounts");
    // A device the IOMMU has no domain for: the domain refuses, nothing recorded.
    assert_eq!(w.device_mount(0, "private", NONE, IOVA, false), Err(Refusal::Domain(abi::Error::NotFound)));
    assert_eq!(Refusal::Domain(abi::Error::NotFound).error(), abi::Error::NotFound);
    assert_eq!(w.devices.len(), 3);
    assert_eq!(w.device_mount(0, "nothing", EDU, IOVA, false), Err(Refusal::NotFound));
}

#[test]
fn device_mount_read_write_needs_the_owner_or_a_grant() {
    device_mount_permission::<Ept>();
    device_mount_permission::<Npt>();
}

/// `abi::DEVICE_MOUNT_QUOTA` per guest, counted over every domain; one past it changes
/// nothing; another guest has its own.
#[test]
fn device_mounts_past_the_quota_change_nothing() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, true).unwrap();
    let quota = abi::DEVICE_MOUNT_QUOTA;
    for i in 0..quota {
        let bdf = if i % 2 == 0 { EDU } else { NIC };
        w.device_mount(1, "a", bdf, IOVA + i * GIB, false).unwrap();
    }
    let (frames, writes, count) = (mem.allocated_frames(), mem.writes(), w.morsel("a").mount_count());
    assert_eq!(w.device_mount(1, "a", EDU, IOVA + quota * GIB, false), Err(Refusal::Quota));
    assert_eq!(Refusal::Quota.error(), abi::Error::NoMemory);
    assert_eq!((mem.allocated_frames(), mem.writes(), w.morsel("a").mount_count()), (frames, writes, count));
    assert_eq!(w.translate_device(EDU, IOVA + quota * GIB), None);
    assert_eq!(w.devices.held_by(1), quota as usize);
    // Guest mounts are another quota; the other guest has its own.
    w.open(1, "a", false).unwrap();
    w.device_mount(0, "a", EDU, IOVA + quota * GIB, true).unwrap();
    // One given back makes room again.
    let _ = w.device_unmount(1, NIC, IOVA + GIB).unwrap();
    w.device_mount(1, "a", NIC, IOVA + GIB, false).unwrap();
}

/// A device mount is the mounting guest's: another guest's unmount of it (or one at an
/// address or a device where it has none) is `NotFound` and leaves it mapped.
#[test]
fn a_device_unmount_only_by_the_guest_that_mounted_it() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, true).unwrap();
    w.device_mount(1, "a", EDU, IOVA, true).unwrap();
    assert_eq!(w.device_unmount(0, EDU, IOVA).unwrap_err(), Refusal::NotFound);
    assert_eq!(w.device_unmount(1, NIC, IOVA).unwrap_err(), Refusal::NotFound);
    assert_eq!(w.device_unmount(1, EDU, IOVA + 4096).unwrap_err(), Refusal::NotFound);
    assert!(w.translate_device(EDU, IOVA).is_some());
    assert_eq!(w.devices.len(), 1);
    let u = w.device_unmount(1, EDU, IOVA).unwrap();
    assert_eq!((u.mount.guest, u.mount.bdf, u.mount.iova, u.stats.entry_writes), (1, EDU, IOVA, 1));
    assert_eq!(w.translate_device(EDU, IOVA), None);
    assert!(w.devices.is_empty());
    assert_eq!(w.names.get("a").unwrap().value.unmounts, 1);
    assert_eq!(w.names.get("a").unwrap().value.last, Some(SpaceId::Device(EDU)));
    let _ = w.unmount(0, w.guests[0].1[0].gpa).unwrap();
    assert_eq!(w.names.get("a").unwrap().value.last, Some(SpaceId::Guest(0)));
}

/// A destroy is refused while a device mount is left and, after the device unmount, gives
/// every frame back: the morsel's, its view's (NPT), the domain's emptied tables.
fn device_destroy_gives_every_frame_back<F: Format<Input = GuestPhysAddr>>() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<F>::new(&mem, 2, 8);
    let before = (mem.allocated_frames(), mem.free_pages(), mem.table_frames());
    // 3 MiB of 4 KiB pages: a root at L2, a 1 GiB window.
    let m = w.create(0, "a", 3 * MIB, true).unwrap();
    w.device_mount(1, "a", EDU, IOVA, true).unwrap();
    w.device_mount(0, "a", NIC, 512 * GIB, false).unwrap();
    let _ = w.unmount(0, m.addr).unwrap();
    assert!(matches!(w.check_destroy(0, "a"), Err(Refusal::Mounted { devices: 2, .. })));
    let _ = w.device_unmount(1, EDU, IOVA).unwrap();
    assert!(matches!(w.check_destroy(0, "a"), Err(Refusal::Mounted { devices: 1, .. })));
    let _ = w.device_unmount(0, NIC, 512 * GIB).unwrap();
    w.check_destroy(0, "a").unwrap();
    w.destroy("a");
    assert_eq!((mem.allocated_frames(), mem.free_pages(), mem.table_frames()), before);
    assert_eq!(w.iommu.domains.iter().map(|(_, t)| t.mounts()).sum::<u32>(), 0);
}

#[test]
fn destroy_after_device_unmount_gives_every_frame_back() {
    device_destroy_gives_every_frame_back::<Ept>();
    device_destroy_gives_every_frame_back::<Npt>();
}

/// A leaving guest's device mounts go with it, in every domain; other guests' stay.
#[test]
fn a_leaving_guest_drops_its_device_mounts() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Npt>::new(&mem, 2, 8);
    let tables = mem.table_frames();
    w.create(0, "a", 4096, true).unwrap();
    w.create(0, "b", 3 * MIB, false).unwrap();
    w.open(1, "a", false).unwrap();
    w.device_mount(1, "a", EDU, IOVA, true).unwrap();
    w.device_mount(1, "b", NIC, IOVA, false).unwrap();
    w.device_mount(1, "b", EDU, IOVA + 512 * GIB, false).unwrap();
    w.device_mount(0, "a", NIC, 2 * IOVA, true).unwrap();
    assert_eq!(w.leave(1), (1, 3));
    assert!(w.guests[1].1.is_empty());
    assert_eq!(w.devices.len(), 1);
    assert_eq!((w.devices[0].guest, w.devices[0].bdf), (0, NIC));
    for (bdf, iova) in [(EDU, IOVA), (NIC, IOVA), (EDU, IOVA + 512 * GIB)] {
        assert_eq!(w.translate_device(bdf, iova), None);
    }
    assert!(w.translate_device(NIC, 2 * IOVA).is_some());
    assert_eq!(w.names.get("b").unwrap().value.unmounts, 2);
    // Guest 0 leaves too: every intermediate table the mounts made is back; the morsels'
    // tables and their views' are left (they go with the morsels).
    assert_eq!(w.leave(0), (2, 1));
    assert!(w.devices.is_empty());
    let kept: u32 = ["a", "b"].iter().map(|s| w.names.get(s).unwrap().value).map(|v| v.morsel.table_count() + v.view.as_ref().unwrap().table_count()).sum();
    assert_eq!(mem.table_frames(), tables + kept as usize);
}

/// `edu_dma`'s check: a transfer inside one of the caller's own mounts in that domain, never
/// another guest's, another domain's, or one reaching past the window.
#[test]
fn device_transfers_only_inside_own_mount_windows() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, true).unwrap();
    w.device_mount(1, "a", EDU, IOVA, true).unwrap();
    w.device_mount(0, "a", NIC, 4 * IOVA, true).unwrap();
    let window = w.devices[0].window;
    assert_eq!(window, 2 * MIB);
    assert!(w.devices.covers(1, EDU, IOVA, IOVA + 4096));
    assert!(w.devices.covers(1, EDU, IOVA + window - 8, IOVA + window));
    assert!(!w.devices.covers(1, EDU, IOVA + window - 8, IOVA + window + 1), "past the window");
    assert!(!w.devices.covers(1, EDU, IOVA - 8, IOVA + 8), "before the window");
    assert!(!w.devices.covers(0, EDU, IOVA, IOVA + 4096), "another guest's mount");
    assert!(!w.devices.covers(1, NIC, IOVA, IOVA + 4096), "another domain");
    assert!(!w.devices.covers(1, NIC, 4 * IOVA, 4 * IOVA + 8), "another guest's, in another domain");
    let _ = w.device_unmount(1, EDU, IOVA).unwrap();
    assert!(!w.devices.covers(1, EDU, IOVA, IOVA + 4096), "unmounted");
}

/// `open` in steps mounts as `open` does: the same place, rights, translation and counters;
/// its refusals change nothing (the pin of step 1 taken back).
fn open_in_steps_as_open<F: Format<Input = GuestPhysAddr>>() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<F>::new(&mem, 3, 8);
    w.create(0, "a", 64 * 1024, false).unwrap();
    w.create(0, "b", 4096, true).unwrap();
    let by_open = w.open(1, "a", false).unwrap();
    let by_steps = w.open_in_steps(2, "a", false).unwrap().unwrap();
    assert_eq!((by_steps.addr, by_steps.writable, by_steps.stats), (by_open.addr, by_open.writable, by_open.stats));
    let t = w.translate(2, by_steps.addr + 8192).unwrap();
    assert!(t.perm.read && !t.perm.write);
    assert_eq!(Some(t.addr), w.morsel("a").translate(8192, &mem));
    assert_eq!(w.guests[2].1.at(by_steps.addr).map(|m| (m.name, m.size, m.writable)), Some((n("a"), 64 * 1024, false)));
    assert_eq!(w.morsel("a").mount_count(), 3);
    assert_eq!(w.names.get("a").unwrap().value.mounts, 3);
    assert_eq!(w.names.get("a").unwrap().value.last, Some(SpaceId::Guest(2)));
    // Refused: not the owner's to write, already mounted, unknown. Counts unchanged.
    assert_eq!(w.open_in_steps(2, "a", true), Err(Refusal::Denied));
    assert_eq!(w.open_in_steps(2, "a", false), Err(Refusal::AlreadyMounted));
    assert_eq!(w.open_in_steps(2, "nothing", false), Err(Refusal::NotFound));
    assert_eq!(w.morsel("a").mount_count(), 3);
    assert_eq!(w.names.get("a").unwrap().value.mounts, 3);
    assert_eq!(w.guests[2].1.len(), 1);
    // Granted: read-write.
    let rw = w.open_in_steps(2, "b", true).unwrap().unwrap();
    assert!(w.translate(2, rw.addr).unwrap().perm.write);
}

#[test]
fn open_in_steps_mounts_as_open_does() {
    open_in_steps_as_open::<Ept>();
    open_in_steps_as_open::<Npt>();
}

#[test]
fn an_opening_pins_the_morsel_against_destroy() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, false).unwrap();
    let _ = w.unmount(0, abi::MORSEL_WINDOW_GPA).unwrap();
    assert_eq!(w.check_destroy(0, "a"), Ok(()));
    // Step 1 done, step 2 not yet: the destroy is refused as for a mount.
    let o = open_begin(&mut w.names, 1, &h("a"), false).unwrap().unwrap();
    assert_eq!(w.check_destroy(0, "a"), Err(Refusal::Mounted { guests: 1, devices: 0 }));
    // A step 2 that is refused (the window is full) gives the pin back at step 3.
    let placed = Err(Refusal::WindowFull);
    open_end(&mut w.names, 1, o, &placed);
    assert_eq!(w.morsel("a").mount_count(), 0);
    assert_eq!(w.names.get("a").unwrap().value.mounts, 1);
    assert_eq!(w.check_destroy(0, "a"), Ok(()));
}

#[test]
fn open_in_steps_keeps_the_mount_quota() {
    let mem = SimMem::new(16 * GIB);
    let quota = abi::MOUNT_QUOTA as usize;
    let mut w = World::<Ept>::new(&mem, 2, quota as u32 + 1);
    let names: Vec<std::string::String> = (0..quota).map(|i| std::format!("m{i}")).collect();
    for name in &names {
        w.create(0, name, 4096, false).unwrap();
        w.open_in_steps(1, name, false).unwrap().unwrap();
    }
    // The owner makes room for one more of its own; guest 1 holds its quota.
    let _ = w.unmount(0, w.guests[0].1[0].gpa).unwrap();
    w.create(0, "extra", 4096, false).unwrap();
    let frames = mem.allocated_frames();
    assert_eq!(w.open_in_steps(1, "extra", false), Err(Refusal::Quota));
    assert_eq!(w.guests[1].1.len(), quota);
    assert_eq!(w.morsel("extra").mount_count(), 1);
    assert_eq!(mem.allocated_frames(), frames);
}

#[test]
fn unmount_in_steps_lets_destroy_in_only_at_its_end() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Npt>::new(&mem, 2, 8);
    let before = (mem.allocated_frames(), mem.free_pages(), mem.table_frames());
    let own = w.create(0, "a", 3 * MIB, false).unwrap();
    let seen = w.open_in_steps(1, "a", false).unwrap().unwrap();
    let _ = w.unmount(0, own.addr).unwrap();
    // Step 1: the entry and the emptied tables are gone, the morsel still counted.
    let u = {
        let (_, mut space) = w.space(1);
        unmount_begin(&mut space, seen.addr, &mem, &mem).unwrap().unwrap()
    };
    assert_eq!(w.translate(1, seen.addr), None);
    assert!(w.guests[1].1.is_empty());
    assert_eq!((u.mount.name, u.stats.entry_writes), (n("a"), 1));
    assert_eq!(w.check_destroy(0, "a"), Err(Refusal::Mounted { guests: 1, devices: 0 }));
    // Step 2 (after the shootdown started): counted, and destroy may go on.
    unmount_end(&mut w.names, 1, &u);
    assert_eq!(w.names.get("a").unwrap().value.unmounts, 2);
    assert_eq!(w.check_destroy(0, "a"), Ok(()));
    // No mount there any more: NotFound, nothing changed.
    assert_eq!(w.unmount_in_steps(1, seen.addr).unwrap_err(), Refusal::NotFound);
    w.destroy("a");
    // The guests' tables keep only their roots.
    assert_eq!((mem.allocated_frames(), mem.free_pages(), mem.table_frames()), before);
}

#[test]
fn a_region_is_left_to_the_whole_open_and_unmount() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    let own = w.create(0, "r", 4096, true).unwrap();
    w.names.get_mut(&n("r")).unwrap().plain = false;
    // Not plain: step 1 answers None, nothing pinned or mounted.
    assert_eq!(w.open_in_steps(1, "r", true), Ok(None));
    assert_eq!(w.morsel("r").mount_count(), 1);
    assert!(w.guests[1].1.is_empty());
    let m = w.open(1, "r", true).unwrap();
    assert_eq!(w.guests[1].1[0].plain, None);
    // Its mounts' unmount: None, the mount left in place.
    assert_eq!(w.unmount_in_steps(1, m.addr).unwrap().map(|u| u.mount.gpa), None);
    assert_eq!(w.guests[1].1.len(), 1);
    assert!(w.translate(1, m.addr).is_some());
    let _ = (own, w.unmount(1, m.addr).unwrap());
}

#[test]
fn a_mount_kept_whole_is_left_to_the_whole_unmount() {
    let mem = SimMem::new(16 * GIB);
    let mut w = World::<Ept>::new(&mem, 2, 8);
    w.create(0, "a", 4096, false).unwrap();
    let m = w.open_in_steps(1, "a", false).unwrap().unwrap();
    w.guests[1].1.unmount_whole(m.addr);
    assert_eq!(w.unmount_in_steps(1, m.addr).unwrap().map(|u| u.mount.gpa), None);
    assert!(w.translate(1, m.addr).is_some());
    assert_eq!(w.morsel("a").mount_count(), 2);
    let _ = w.unmount(1, m.addr).unwrap();
    assert_eq!(w.morsel("a").mount_count(), 1);
}
