//! A region's calls with no world lock, over a simulated machine (`memory::tests::Backed`):
//! the batch taken under the world lock, its end alone, the `Fast` handle's calls and
//! refusals, the shootdown's targets and order, the frames kept until it is acknowledged,
//! and the vCPUs' states under the world lock (`States`: unpark, a batch ended there, a
//! guest's end).
//!
//! Mutations tried by hand, each caught:
//!
//! | mutation | tests that fail |
//! | --- | --- |
//! | `end_alone` gives the lock back before the shootdown | the three FREE tests that shoot down (`held: false`) |
//! | `end_alone` trims the cache straight into the allocator | `a_free_shoots_down_the_guests_other_cpus_...` (frames back at once), `a_free_of_a_guest_alone_...` (no trim seen) |
//! | `Fast::take` does not compare the iovec page | `a_handle_takes_only_its_own_region_page_and_vcpu_...` |
//! | `Targets::Everyone` shoots down the caller's CPUs only | `a_free_of_a_region_others_mounted_shoots_down_every_sharer` |
//! | only the local flush, whatever CPUs the guest ran on | `a_free_shoots_down_the_guests_other_cpus_...` |
//! | every FREE shoots down, cleared or not | `a_free_of_a_guest_alone_on_this_cpu_...` |
//! | `States::unpark` of a gone guest frees its cache at once | `a_parked_state_comes_back_in_place_or_...` |
//! | `States::end_batch` keeps a gone caller's state | `a_batch_ended_under_the_world_lock_...` |
//! | `States::guest_ended` keeps the ended guest's entries, or drains every guest's | `a_guest_that_ends_gives_back_...` |
use super::*;
use crate::memory::tests::{machine, Backed};
use core::cell::RefCell;
use morsel::Npt;
use std::boxed::Box;
use std::vec::Vec;

/// What the test machine saw, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// A shootdown committed: its CPUs and whether every CPU that ran a guest, and whether
    /// the region's lock was still held then.
    Shoot { cpus: u64, every: bool, held: bool },
    /// Only this CPU's local flush, and whether the lock was held.
    Local { me: usize, held: bool },
    /// Frames trimmed from the cache (kept until the acknowledgments), after which event.
    Trim { frames: usize },
}

/// The frames a trim gave back: kept here (as the hypervisor keeps them until the
/// shootdown's acknowledgments), never given to the allocator.
#[derive(Default)]
struct Kept(RefCell<Vec<HostPhysAddr>>);

impl FrameAlloc for Kept {
    fn alloc(&self, _: u32) -> Option<HostPhysAddr> {
        None
    }
    fn free(&self, frame: HostPhysAddr, _: u32) {
        self.0.borrow_mut().push(frame);
    }
}

struct Here {
    m: &'static Backed,
    cell: &'static RegionCell,
    events: Vec<Event>,
    kept: Kept,
}

impl Machine for Here {
    type Mem = Backed;
    type Frames = morsel::SimMem;
    type Domain = u8;
    fn mem(&self) -> &Backed {
        self.m
    }
    fn frames(&self) -> &morsel::SimMem {
        &self.m.sim
    }
    fn shoot(&mut self, flush: Flush<u8>) {
        let (cpus, every) = flush.shootdown().expect("a shootdown, not an empty flush");
        self.events.push(Event::Shoot { cpus, every, held: self.cell.lock.is_held() });
        // As `Flush::commit` does it (its drop asserts it was committed).
        struct Sink;
        impl crate::flush::Invalidate<u8> for Sink {
            fn every_guest_cpu(&self) -> u64 {
                0
            }
            fn shoot(&mut self, _: u64) {}
            fn iotlb(&mut self, _: u8) -> bool {
                true
            }
            fn iotlb_all(&mut self) -> (u32, u32) {
                (0, 0)
            }
        }
        let _ = flush.commit(&mut Sink);
    }
    fn local(&mut self, me: usize) {
        self.events.push(Event::Local { me, held: self.cell.lock.is_held() });
    }
    fn trim(&mut self, cache: &mut FrameCache) {
        let before = self.kept.0.borrow().len();
        cache.trim(&self.kept);
        let frames = self.kept.0.borrow().len() - before;
        self.events.push(Event::Trim { frames });
    }
    fn drain_after(&mut self, cache: &mut FrameCache) {
        cache.drain(&self.kept);
    }
}

/// A region of `pages` pages, its cell, and the iovec page (a frame of the machine).
struct Setup {
    here: Here,
    region: Morsel<Npt>,
    iov_hpa: u64,
}

const GPA: u64 = 1 << 40;
const IOV_GPA: u64 = 0x10_0000;
const ME: usize = 0;
const GUEST: u32 = 3;
const VCPU: u32 = 1;

fn setup(pages: u64) -> Setup {
    let m = machine();
    let cell: &'static RegionCell = Box::leak(Box::new(RegionCell::new()));
    let region = Morsel::<Npt>::create_sparse(pages * 4096, &m.sim, m).unwrap();
    let iov_hpa = morsel::FrameAlloc::alloc(&m.sim, 0).unwrap().as_u64();
    Setup { here: Here { m, cell, events: Vec::new(), kept: Kept::default() }, region, iov_hpa }
}

fn who() -> Who {
    Who { name: Name::new(b"rg").unwrap(), guest: GUEST, vcpu: VCPU }
}

impl Setup {
    /// Writes `entries` into the iovec page.
    fn entries(&self, entries: &[u64]) {
        // SAFETY: a frame of the machine, alive as long as it.
        let page = unsafe { self.here.m.bytes(HostPhysAddr::new(self.iov_hpa), 4096) };
        for (k, &e) in entries.iter().enumerate() {
            page.write_u64(8 * k, e).unwrap();
        }
    }

    /// The first `n` results in the iovec page.
    fn results(&self, n: usize) -> Vec<i64> {
        // SAFETY: as in `entries`.
        let page = unsafe { self.here.m.bytes(HostPhysAddr::new(self.iov_hpa), 4096) };
        (0..n).map(|k| page.read_u64(8 * k).unwrap() as i64).collect()
    }

    /// A batch of `op` on `entries`, taken as under the world lock with `mounters` guest
    /// mounts, run, and ended alone by `me` with the guest's CPUs `cpus`: the handle.
    fn first(&mut self, op: u64, entries: &[u64], mounters: u32, cpus: u64) -> (u64, Parked, Fast<Npt>) {
        self.entries(entries);
        let held = self.here.cell.lock.take(mounters).unwrap();
        let mut v = VcpuState::try_new().unwrap();
        v.ready().unwrap();
        let call = Call { op, count: entries.len(), gpa: GPA, iov_gpa: IOV_GPA, iov_hpa: self.iov_hpa };
        let mut b = Batch::new(held, self.here.cell, self.region.alias(), 7, v, call, who());
        b.run(&self.here);
        match b.finish_alone(ME, || cpus, &mut self.here) {
            Ok(r) => r,
            Err(_) => panic!("the batch failed"),
        }
    }

    /// `op` on `entries` through the handle, no stop.
    fn fast(&mut self, fast: &Fast<Npt>, parked: &mut Option<Parked>, op: u64, entries: &[u64], cpus: u64) -> Option<u64> {
        self.entries(entries);
        match fast.call(parked, GPA, IOV_GPA, op, entries.len() as u64, &mut self.here, || false, ME, || cpus) {
            FastCall::NotTaken => None,
            FastCall::Ended(failed) => Some(failed),
            FastCall::Locked(_) => panic!("ended under the world lock"),
        }
    }
}

fn one(page: u64) -> u64 {
    exmap::encode(page, 1)
}

#[test]
fn a_batch_ends_alone_then_its_handle_takes_the_next_call_with_no_world_lock() {
    let mut s = setup(64);
    let (failed, parked, fast) = s.first(abi::EXMAP_ALLOC, &[one(0), one(5)], 1, 1 << ME);
    assert_eq!(failed, 0);
    assert_eq!(s.results(2), [1, 1], "each entry's page count written back");
    assert!(!s.here.cell.lock.is_held(), "the lock given back");
    assert!(s.here.events.is_empty(), "an ALLOC clears nothing: no shootdown {:?}", s.here.events);
    let mut parked = Some(parked);
    let (calls0, _) = fast_counts();
    assert_eq!(s.fast(&fast, &mut parked, abi::EXMAP_ALLOC, &[one(9), one(5), one(64)], 1 << ME), Some(1), "page 64 is past the end: one failed entry");
    assert!(fast_counts().0 > calls0, "counted as a call with no world lock");
    assert_eq!(s.results(3), [1, 0, code(EntryError::OutOfRange) as i64], "page 5 was populated already: 0 pages");
    assert!(parked.is_some(), "the state back in the slot");
    let c = s.here.cell.counts();
    assert_eq!((c.calls, c.allocated, c.failed), (2, 3, 1), "{c:?}");
    assert!(!s.here.cell.lock.is_held());
}

#[test]
fn a_free_of_a_guest_alone_on_this_cpu_flushes_here_only_before_the_lock_goes() {
    let mut s = setup(64);
    let (_, parked, fast) = s.first(abi::EXMAP_ALLOC, &[one(1)], 1, 1 << ME);
    let mut parked = Some(parked);
    assert_eq!(s.fast(&fast, &mut parked, abi::EXMAP_FREE, &[one(1)], 1 << ME), Some(0));
    assert_eq!(s.here.events, [Event::Local { me: ME, held: true }, Event::Trim { frames: 0 }]);
    // A FREE of nothing populated clears nothing: no flush at all.
    s.here.events.clear();
    assert_eq!(s.fast(&fast, &mut parked, abi::EXMAP_FREE, &[one(1)], 1 << ME), Some(0));
    assert_eq!(s.results(1), [0]);
    assert!(s.here.events.is_empty(), "{:?}", s.here.events);
    assert_eq!(s.here.cell.counts().invalidations, 1);
}

#[test]
fn a_free_shoots_down_the_guests_other_cpus_and_keeps_the_frames_until_then() {
    let mut s = setup(4096);
    // 1,500 pages in three entries: the FREE leaves more than two bundles in the cache.
    let big = [exmap::encode(0, 500), exmap::encode(500, 500), exmap::encode(1000, 500)];
    let (_, parked, fast) = s.first(abi::EXMAP_ALLOC, &big, 1, 0b101);
    let mut parked = Some(parked);
    let free0 = s.here.m.sim.free_pages();
    assert_eq!(s.fast(&fast, &mut parked, abi::EXMAP_FREE, &big, 0b101), Some(0));
    let [Event::Shoot { cpus: 0b101, every: false, held: true }, Event::Trim { frames }] = s.here.events[..] else {
        panic!("one shootdown of the guest's CPUs, under the lock, then the trim: {:?}", s.here.events)
    };
    assert!(frames >= exmap::BUNDLE, "a bundle or more left the cache: {frames}");
    assert_eq!(s.here.kept.0.borrow().len(), frames);
    assert_eq!(s.here.m.sim.free_pages(), free0, "no frame went straight back to the allocator");
    assert!(!s.here.cell.lock.is_held());
}

#[test]
fn a_free_of_a_region_others_mounted_shoots_down_every_sharer() {
    let mut s = setup(64);
    s.here.cell.mounted_by(0b0011);
    s.here.cell.mounted_by(0b1000);
    // Two guest mounts counted at the take: not the caller's alone.
    let (_, parked, fast) = s.first(abi::EXMAP_ALLOC, &[one(2)], 2, 1 << ME);
    let mut parked = Some(parked);
    assert_eq!(s.fast(&fast, &mut parked, abi::EXMAP_FREE, &[one(2)], 1 << ME), Some(0));
    assert_eq!(s.here.events[0], Event::Shoot { cpus: 0b1011, every: false, held: true });
    assert_eq!(s.here.cell.counts().remote_flushes, 1);
    // No sharer known (the cell was reset since): every CPU that ran a guest.
    s.here.cell.reset();
    let (_, parked, fast) = s.first(abi::EXMAP_ALLOC, &[one(3)], 2, 1 << ME);
    let mut parked = Some(parked);
    s.here.events.clear();
    assert_eq!(s.fast(&fast, &mut parked, abi::EXMAP_FREE, &[one(3)], 1 << ME), Some(0));
    assert_eq!(s.here.events[0], Event::Shoot { cpus: 0, every: true, held: true });
}

#[test]
fn a_handle_takes_only_its_own_region_page_and_vcpu_and_only_while_nothing_changed() {
    let mut s = setup(64);
    let (_, parked, fast) = s.first(abi::EXMAP_ALLOC, &[one(0)], 1, 1 << ME);
    let mut parked = Some(parked);
    let ops = |s: &mut Setup, parked: &mut Option<Parked>, gpa: u64, iov: u64| {
        s.entries(&[one(4)]);
        matches!(fast.call(parked, gpa, iov, abi::EXMAP_ALLOC, 1, &mut s.here, || false, ME, || 1), FastCall::NotTaken)
    };
    assert!(ops(&mut s, &mut parked, GPA + 4096, IOV_GPA), "another region");
    assert!(ops(&mut s, &mut parked, GPA, IOV_GPA + 4096), "another iovec page");
    assert!(parked.is_some(), "a refused call leaves the state in the slot");
    let mut other = parked.take().map(|p| Parked { vcpu: VCPU + 1, ..p });
    assert!(ops(&mut s, &mut other, GPA, IOV_GPA), "another vCPU's state");
    let mut parked = other.map(|p| Parked { vcpu: VCPU, ..p });
    let mut none = None;
    assert!(ops(&mut s, &mut none, GPA, IOV_GPA), "no state in the slot");
    assert_eq!(s.results(1), [one(4) as i64], "nothing ran: the entry is as written");
    // Another batch holding the lock does not refuse the handle.
    let other_batch = s.here.cell.lock.take(1).unwrap();
    assert!(!ops(&mut s, &mut parked, GPA, IOV_GPA), "shared with a batch in flight");
    s.here.cell.lock.end(other_batch);
    // An unmount, destroy, device mount or NVMe batch bumps the generation: refused for good.
    s.here.cell.lock.changed();
    let (_, refused0) = fast_counts();
    assert!(ops(&mut s, &mut parked, GPA, IOV_GPA), "a change since the handle was made");
    assert!(fast_counts().1 > refused0);
    assert!(!s.here.cell.lock.is_held(), "a refused handle leaves the lock alone");
}

#[test]
fn a_batch_that_a_stop_reached_ends_under_the_world_lock_holding_the_region() {
    let mut s = setup(64);
    let (_, parked, fast) = s.first(abi::EXMAP_ALLOC, &[one(0)], 1, 0b11);
    let mut parked = Some(parked);
    s.entries(&[one(0)]);
    let FastCall::Locked(batch) = fast.call(&mut parked, GPA, IOV_GPA, abi::EXMAP_FREE, 1, &mut s.here, || true, ME, || 0b11) else {
        panic!("a stop reached this CPU: the batch ends under the world lock")
    };
    assert!(parked.is_none(), "the state went into the batch");
    assert!(s.here.cell.lock.is_held(), "held until the batch ends");
    assert!(s.here.events.is_empty(), "nothing shot down yet: {:?}", s.here.events);
    // Its guest stopped: the caller's CPUs are shot down (`caller_flush`), the lock given back.
    let (_, ended) = batch.end(Caller::Stays, || Flush::cpus(0b11), &mut s.here);
    assert_eq!(ended.targets, Some(Targets::Caller));
    assert_eq!(ended.others, 0);
    assert_eq!(s.here.events[0], Event::Shoot { cpus: 0b11, every: false, held: true });
    assert!(!s.here.cell.lock.is_held());
    assert!(matches!(ended.outcome, Ok((b, _)) if b.pages == 1));
    // Gone: every sharer (none known: every CPU that ran a guest).
    let (_, parked, fast) = s.first(abi::EXMAP_ALLOC, &[one(0)], 1, 0b11);
    let mut parked = Some(parked);
    s.here.events.clear();
    s.entries(&[one(0)]);
    let FastCall::Locked(batch) = fast.call(&mut parked, GPA, IOV_GPA, abi::EXMAP_FREE, 1, &mut s.here, || true, ME, || 0b11) else { panic!() };
    let (_, ended) = batch.end(Caller::Gone, || panic!("not the caller's CPUs"), &mut s.here);
    assert_eq!(ended.targets, Some(Targets::Everyone));
    assert_eq!(s.here.events[0], Event::Shoot { cpus: 0, every: true, held: true });
}

#[test]
fn a_free_that_cannot_reserve_room_does_nothing_and_ends_under_the_world_lock() {
    let mut s = setup(64);
    let (_, parked, _) = s.first(abi::EXMAP_ALLOC, &[one(0)], 1, 1);
    // A batch whose outcome is an error comes back from `finish_alone` untouched.
    let held = s.here.cell.lock.take(1).unwrap();
    let call = Call { op: abi::EXMAP_FREE, count: 1, gpa: GPA, iov_gpa: IOV_GPA, iov_hpa: s.iov_hpa };
    let b = Batch::new(held, s.here.cell, s.region.alias(), 7, parked.v, call, who());
    let Err(b) = b.finish_alone(ME, || 1, &mut s.here) else { panic!("a batch that did not run has no outcome to end alone") };
    let (_, ended) = b.end(Caller::Stays, || Flush::cpus(1), &mut s.here);
    assert_eq!(ended.outcome.err(), Some(Error::Invalid));
    assert_eq!(ended.targets, None, "nothing cleared, nothing shot down");
    assert!(s.here.events.is_empty());
    assert_eq!(s.here.cell.counts().calls, 1, "only the first call counted");
    assert!(!s.here.cell.lock.is_held());
}

#[test]
fn every_frame_comes_back_when_the_region_and_the_cache_go() {
    let mut s = setup(4096);
    let big = [exmap::encode(0, 1500)];
    let (_, parked, fast) = s.first(abi::EXMAP_ALLOC, &big, 1, 1);
    let mut parked = Some(parked);
    assert_eq!(s.fast(&fast, &mut parked, abi::EXMAP_FREE, &big, 1), Some(0));
    let mut p = parked.take().unwrap();
    p.v.cache.drain(&s.here.m.sim);
    for f in s.here.kept.0.take() {
        morsel::FrameAlloc::free(&s.here.m.sim, f, 0);
    }
    s.region.destroy(&s.here.m.sim, s.here.m).map_err(|(_, e)| e).unwrap();
    morsel::FrameAlloc::free(&s.here.m.sim, HostPhysAddr::new(s.iov_hpa), 0);
    assert_eq!(s.here.m.sim.allocated_frames(), 0, "every frame and table back");
}

/// A state with `n` frames in its cache (ALLOC, then FREE of `n` pages), ended alone: parked.
fn parked_with_frames(s: &mut Setup, n: u64) -> Parked {
    let e = [exmap::encode(0, n)];
    let (_, parked, fast) = s.first(abi::EXMAP_ALLOC, &e, 1, 1);
    let mut parked = Some(parked);
    assert_eq!(s.fast(&fast, &mut parked, abi::EXMAP_FREE, &e, 1), Some(0));
    parked.unwrap()
}

#[test]
fn a_parked_state_comes_back_in_place_or_its_frames_wait_for_the_acknowledgments() {
    let mut s = setup(64);
    let mut states = States::new();
    let p = parked_with_frames(&mut s, 8);
    let held = p.v.cache.len();
    assert!(held >= 8, "the FREE's frames are in the cache: {held}");
    states.unpark(p, true, &mut s.here);
    assert_eq!(states.get_mut(GUEST, VCPU).map(|v| v.cache.len()), Some(held), "back in its place, cache and all");
    // Its guest is gone: every frame through the keeping allocator, none to the allocator.
    let p = Parked { v: states.take(GUEST, VCPU).unwrap(), guest: GUEST, vcpu: VCPU };
    let free0 = s.here.m.sim.free_pages();
    states.unpark(p, false, &mut s.here);
    assert!(states.get_mut(GUEST, VCPU).is_none());
    assert_eq!(s.here.kept.0.borrow().len(), held);
    assert_eq!(s.here.m.sim.free_pages(), free0, "no frame straight back to the allocator");
}

#[test]
fn a_batch_ended_under_the_world_lock_puts_the_state_back_or_drains_it_after_the_acks() {
    let mut s = setup(64);
    let mut states = States::new();
    states.ready(GUEST, VCPU).unwrap();
    for (alive, keep) in [(true, Cache::Keep), (false, Cache::AfterAcks)] {
        let v = states.take(GUEST, VCPU).unwrap_or_else(|| VcpuState::try_new().unwrap());
        s.entries(&[exmap::encode(0, 4)]);
        let held = s.here.cell.lock.take(1).unwrap();
        let call = Call { op: abi::EXMAP_ALLOC, count: 1, gpa: GPA, iov_gpa: IOV_GPA, iov_hpa: s.iov_hpa };
        let mut b = Batch::new(held, s.here.cell, s.region.alias(), 7, v, call, who());
        b.run(&s.here);
        // An ALLOC clears nothing: no shootdown, whoever the caller.
        let e = states.end_batch(b, alive, || panic!("no shootdown for an ALLOC"), &mut s.here);
        assert_eq!((e.cache, e.targets, e.others), (keep, None, 0));
        assert!(matches!(e.outcome, Ok((b, _)) if b.failed == 0));
        assert_eq!(states.get_mut(GUEST, VCPU).is_some(), alive, "alive {alive}");
        assert!(!s.here.cell.lock.is_held());
    }
    // The gone caller's cache (a bundle from the allocator) went through the keeping allocator.
    assert_eq!(s.here.kept.0.borrow().len(), exmap::BUNDLE - 4);
}

#[test]
fn a_guest_that_ends_gives_back_its_vcpus_caches_and_no_one_elses() {
    let s = setup(64);
    let mut states = States::new();
    for (guest, vcpu) in [(1, 0), (1, 1), (2, 0)] {
        let v = states.ready(guest, vcpu).unwrap();
        // A frame in each cache, taken from the allocator.
        v.cache.give(morsel::FrameAlloc::alloc(&s.here.m.sim, 0).unwrap(), exmap::FRESH);
    }
    let free0 = s.here.m.sim.free_pages();
    states.guest_ended(1, &s.here);
    assert_eq!(s.here.m.sim.free_pages(), free0 + 2, "guest 1's two frames back to the allocator");
    assert!(states.get_mut(1, 0).is_none() && states.get_mut(1, 1).is_none());
    assert_eq!(states.get_mut(2, 0).map(|v| v.cache.len()), Some(1), "guest 2's state untouched");
    assert!(s.here.kept.0.borrow().is_empty(), "an ended guest's frames wait for nothing");
}
