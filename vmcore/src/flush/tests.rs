//! `Flush` on the host (debug and release): merging, one commit, the drop check.

use super::*;
use alloc::vec::Vec;

/// Records what a commit asked for.
#[derive(Default)]
struct Fake {
    guest_cpus: u64,
    shots: Vec<u64>,
    iotlbs: Vec<u16>,
    all: u32,
    /// Domains whose invalidation fails.
    broken: Vec<u16>,
}

impl Invalidate<u16> for Fake {
    fn every_guest_cpu(&self) -> u64 {
        self.guest_cpus
    }
    fn shoot(&mut self, cpus: u64) {
        self.shots.push(cpus);
    }
    fn iotlb(&mut self, d: u16) -> bool {
        self.iotlbs.push(d);
        !self.broken.contains(&d)
    }
    fn iotlb_all(&mut self) -> (u32, u32) {
        self.all += 1;
        (7, 0)
    }
}

#[test]
fn none_is_empty_and_commits_nothing() {
    let f = Flush::<u16>::none();
    assert!(f.is_empty());
    let mut hw = Fake::default();
    assert_eq!(f.commit(&mut hw), Committed::default());
    assert!(hw.shots.is_empty() && hw.iotlbs.is_empty());
    // Dropping an empty one is fine.
    drop(Flush::<u16>::default());
}

#[test]
fn merge_is_one_shootdown_of_the_union_and_each_domain_once() {
    let mut f = Flush::<u16>::cpus(0b0011);
    f.merge(Flush::cpus(0b0110));
    f.merge(Flush::domain(5));
    f.merge(Flush::domain(9));
    f.merge(Flush::domain(5));
    let mut g = Flush::domain(9);
    g.merge(Flush::none());
    f.merge(g);
    assert_eq!(f.shootdown(), Some((0b0111, false)));
    assert_eq!(f.domains().0.collect::<Vec<_>>(), [5, 9]);
    let mut hw = Fake::default();
    let done = f.commit(&mut hw);
    assert_eq!(hw.shots, [0b0111], "one shootdown for the batch");
    assert_eq!(hw.iotlbs, [5, 9], "each domain once, in the order named");
    assert_eq!(done, Committed { shot: Some(0b0111), domains: 2, failed: 0 });
    assert!(done.ok());
}

#[test]
fn an_empty_cpu_set_still_shoots_down_locally() {
    // `shootdown::guest` of a caller that ran on no other CPU: this CPU flushes.
    let mut hw = Fake::default();
    assert_eq!(Flush::<u16>::cpus(0).commit(&mut hw).shot, Some(0));
    assert_eq!(hw.shots, [0]);
}

#[test]
fn every_guest_cpu_is_read_at_the_commit() {
    let mut f = Flush::<u16>::cpus(0b1000_0000);
    f.merge(Flush::every_guest_cpu());
    assert_eq!(f.shootdown(), Some((0b1000_0000, true)));
    let mut hw = Fake { guest_cpus: 0b101, ..Fake::default() };
    // A CPU that started a guest after the flush was made, before its commit, is counted.
    hw.guest_cpus |= 0b10;
    assert_eq!(f.commit(&mut hw).shot, Some(0b1000_0111));
    assert_eq!(hw.shots, [0b1000_0111]);
}

#[test]
fn domains_only_means_no_shootdown() {
    let mut f = Flush::<u16>::domain(3);
    f.merge(Flush::domain(4));
    assert_eq!(f.shootdown(), None);
    let mut hw = Fake { broken: alloc::vec![4], ..Fake::default() };
    let done = f.commit(&mut hw);
    assert!(hw.shots.is_empty());
    assert_eq!((done.shot, done.domains, done.failed), (None, 1, 1));
    assert!(!done.ok());
}

#[test]
fn more_domains_than_room_invalidate_every_domain_once() {
    let mut f = Flush::<u16>::none();
    for d in 0..=DOMAINS as u16 {
        f.merge(Flush::domain(d));
    }
    f.merge(Flush::domain(100));
    let (named, every) = f.domains();
    assert_eq!((named.count(), every), (0, true));
    let mut other = Flush::domain(1);
    other.merge(f);
    assert!(other.domains().1, "merging into a smaller one keeps 'every domain'");
    let mut hw = Fake::default();
    let done = other.commit(&mut hw);
    assert_eq!((hw.all, hw.iotlbs.len(), done.domains), (1, 0, 7));
}

/// Debug builds: the drop check is an assertion.
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "dropped uncommitted")]
fn dropping_one_uncommitted_asserts_in_debug() {
    let f = Flush::<u16>::cpus(0b1);
    drop(f);
}

/// Debug builds: a domain alone is owed too.
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "dropped uncommitted")]
fn dropping_a_domain_flush_asserts_in_debug() {
    let _unused = Flush::<u16>::domain(4);
}

/// Release builds: merged and committed flushes are not counted as dropped; one dropped
/// uncommitted is, and nothing else happens. (Debug builds check the same through the
/// assertion: every other test here would panic.) The only test that drops one in release,
/// so the global counter is not raced.
#[cfg(not(debug_assertions))]
#[test]
fn dropping_one_uncommitted_is_counted_in_release() {
    let before = dropped();
    let mut f = Flush::<u16>::cpus(1);
    f.merge(Flush::domain(2));
    f.merge(Flush::every_guest_cpu());
    let _ = f.commit(&mut Fake::default());
    assert_eq!(dropped(), before, "merge and commit leave nothing owed behind");
    let f = Flush::<u16>::domain(4);
    drop(f);
    assert_eq!(dropped(), before + 1);
}
