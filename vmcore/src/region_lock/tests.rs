//! The lock's decisions on one thread (debug and release): who is admitted while it is held,
//! that batches share it and it is free again after the last `end`, and the shootdown and
//! cache rules at the end.

use super::*;

const ALL: [Contender; 6] = [Contender::Action, Contender::DiskAction, Contender::Mount, Contender::Destroy, Contender::DeviceMount, Contender::DiskBatch];

#[test]
fn free_lock_admits_everyone() {
    let l = RegionLock::new();
    assert!(!l.is_held());
    for who in ALL {
        assert_eq!(l.admit(who), Ok(()), "{who:?}");
    }
}

#[test]
fn batches_share_the_lock_and_exclude_the_rest() {
    let l = RegionLock::new();
    let h = l.take(1).unwrap();
    assert!(l.is_held());
    assert_eq!(l.admit(Contender::Action), Ok(()), "ALLOC / FREE share the lock");
    let h2 = l.take(1).expect("a second batch takes it too");
    assert_eq!(l.batches(), 2);
    assert_eq!(l.admit(Contender::Mount), Err(Refusal::Retry), "no mounter added while held");
    assert_eq!(l.admit(Contender::DiskAction), Err(Refusal::Retry), "READ / WRITE exclude batches");
    for who in [Contender::Destroy, Contender::DeviceMount, Contender::DiskBatch] {
        assert_eq!(l.admit(who), Err(Refusal::Busy), "{who:?}");
    }
    assert_eq!(h.targets(false, Caller::Stays), None);
    assert_eq!(l.end(h), 1, "the other batch still holds it");
    assert!(l.is_held());
    assert_eq!(l.admit(Contender::Mount), Err(Refusal::Retry), "held by one batch still");
    assert_eq!(l.end(h2), 0);
    assert!(!l.is_held());
    for who in ALL {
        assert_eq!(l.admit(who), Ok(()), "{who:?} after the ends");
    }
}

#[test]
fn next_batch_takes_the_lock_after_end_whatever_the_caller() {
    let l = RegionLock::new();
    for caller in [Caller::Stays, Caller::Gone] {
        for cleared in [false, true] {
            let h = l.take(3).unwrap();
            let _ = h.targets(cleared, caller);
            l.end(h);
            assert!(!l.is_held(), "{caller:?} cleared={cleared}");
        }
    }
}

#[test]
fn no_shootdown_without_cleared_leaves() {
    let l = RegionLock::new();
    for caller in [Caller::Stays, Caller::Gone] {
        for mounters in 0..3 {
            let h = l.take(mounters).unwrap();
            assert_eq!(h.targets(false, caller), None);
            l.end(h);
        }
    }
}

#[test]
fn shootdown_reaches_everyone_when_others_mount_the_region_or_the_caller_is_gone() {
    let l = RegionLock::new();
    let cases = [
        (0, Caller::Stays, Targets::Caller),
        (1, Caller::Stays, Targets::Caller),
        (2, Caller::Stays, Targets::Everyone),
        (5, Caller::Stays, Targets::Everyone),
        (0, Caller::Gone, Targets::Everyone),
        (1, Caller::Gone, Targets::Everyone),
        (2, Caller::Gone, Targets::Everyone),
    ];
    for (mounters, caller, want) in cases {
        let h = l.take(mounters).unwrap();
        assert_eq!(h.targets(true, caller), Some(want), "{mounters} mounters, {caller:?}");
        l.end(h);
    }
}

#[test]
fn freed_frames_leave_a_gone_caller_only_after_acknowledgments() {
    assert_eq!(Caller::Stays.cache(), Cache::Keep);
    assert_eq!(Caller::Gone.cache(), Cache::AfterAcks);
}

#[test]
fn fast_take_goes_only_while_nothing_changed() {
    let l = RegionLock::new();
    let h = l.take(2).unwrap();
    let handle = h.handle();
    let f0 = l.take_fast(&handle).expect("shared with the world-path batch");
    assert_eq!(l.end(h), 1);
    let f = l.take_fast(&handle).expect("nothing changed since the handle");
    assert_eq!(l.batches(), 2);
    l.end(f0);
    assert_eq!(f.targets(true, Caller::Stays), Some(Targets::Everyone), "the mounts counted at the world take");
    assert_eq!(l.admit(Contender::Action), Ok(()), "a fast take is shared");
    assert_eq!(l.admit(Contender::Mount), Err(Refusal::Retry), "a fast take is seen held");
    assert_eq!(l.admit(Contender::Destroy), Err(Refusal::Busy));
    l.end(f);
    // Every change refuses the handle from then on; a new world take makes a new one.
    for change in [Some(Contender::Mount), Some(Contender::DiskAction), Some(Contender::Destroy), Some(Contender::DeviceMount), Some(Contender::DiskBatch), None] {
        let h = l.take(1).unwrap();
        let handle = h.handle();
        l.end(h);
        match change {
            Some(who) => assert_eq!(l.admit(who), Ok(())),
            None => l.changed(),
        }
        assert!(l.take_fast(&handle).is_none(), "{change:?}: stale handle taken");
        assert!(!l.is_held());
        assert_eq!(l.admit(Contender::Action), Ok(()), "{change:?}: an action does not change the region");
    }
    let h = l.take(1).unwrap();
    let handle = h.handle();
    l.end(h);
    assert_eq!(l.admit(Contender::Action), Ok(()));
    let f = l.take_fast(&handle).expect("an action admitted does not refuse the handle");
    l.changed();
    assert!(l.take_fast(&handle).is_none(), "a change while a batch holds it refuses the handle too");
    assert!(l.is_held(), "an unmount during the batch keeps the lock held");
    l.end(f);
    assert!(!l.is_held() && l.take_fast(&handle).is_none(), "the unmount's bump stays after the end");
}

#[test]
fn a_refused_exclusive_contender_sends_the_batches_to_the_world_path() {
    let l = RegionLock::new();
    let h = l.take(1).unwrap();
    let handle = h.handle();
    l.end(h);
    let f = l.take_fast(&handle).unwrap();
    assert_eq!(l.admit(Contender::Mount), Err(Refusal::Retry));
    assert!(l.take_fast(&handle).is_none(), "no fast take joins the batch in flight");
    l.end(f);
    assert!(l.take_fast(&handle).is_none(), "the holder's next call takes the world path, where the refused one gets its turn");
}

const A: u64 = 1 << 32;
const B: u64 = 2 << 32;
const C: u64 = 3 << 32;
const PATIENCE: u64 = 1_000;

fn at(who: u64, now: u64) -> Turn {
    Turn { who, now, patience: PATIENCE }
}

/// The starvation the hand-over ends: A and B call back-to-back (fast takes), so that the
/// batch count might never fall to 0 between them; the mount C is refused once, and from
/// then on no new batch starts (handles refused by its bump, world-path actions refused by
/// its turn) until C is in: the count falls to 0 when the batches in flight end.
#[test]
fn a_refused_mount_gets_the_lock_next_whatever_the_batches() {
    let l = RegionLock::new();
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 0)), Ok(()));
    let ha = l.take(1).unwrap();
    let handle = ha.handle();
    assert_eq!(l.admit_in_turn(Contender::Action, at(B, 1)), Ok(()), "shared");
    let hb = l.take(1).unwrap();
    assert_eq!(l.admit_in_turn(Contender::Mount, at(C, 2)), Err(Refusal::Retry), "held: C waits");
    assert!(l.take_fast(&handle).is_none(), "C's refusal sent A and B to the world path");
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 3)), Err(Refusal::Retry), "A gives way to C");
    assert_eq!(l.end(ha), 1);
    assert_eq!(l.admit_in_turn(Contender::Action, at(B, 4)), Err(Refusal::Retry), "so does B");
    assert_eq!(l.admit_in_turn(Contender::Mount, at(C, 5)), Err(Refusal::Retry), "B's batch still in flight");
    assert_eq!(l.end(hb), 0);
    assert_eq!(l.admit_in_turn(Contender::DiskAction, at(A, 6)), Err(Refusal::Retry), "a READ gives way to C too");
    assert_eq!(l.admit_in_turn(Contender::Mount, at(C, 7)), Ok(()), "C's turn");
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 8)), Ok(()), "turn used");
}

#[test]
fn a_turn_not_taken_expires() {
    let l = RegionLock::new();
    let h = l.take(1).unwrap();
    assert_eq!(l.admit_in_turn(Contender::DiskAction, at(B, 10)), Err(Refusal::Retry));
    l.end(h);
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 10 + PATIENCE - 1)), Err(Refusal::Retry), "B still has its turn");
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 10 + PATIENCE)), Ok(()), "B did not come back: A goes on");
    let h = l.take(1).unwrap();
    assert_eq!(l.admit_in_turn(Contender::DiskAction, at(B, 10 + PATIENCE + 1)), Err(Refusal::Retry), "held");
    l.end(h);
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 10 + PATIENCE + 2)), Err(Refusal::Retry), "B refused again: a new turn");
}

#[test]
fn a_refused_mount_gets_the_next_turn_and_mounts_never_wait_for_one() {
    let l = RegionLock::new();
    let h = l.take(1).unwrap();
    assert_eq!(l.admit_in_turn(Contender::Mount, at(C, 1)), Err(Refusal::Retry), "held: no mounter added");
    l.end(h);
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 2)), Err(Refusal::Retry), "the mount goes first");
    assert_eq!(l.admit_in_turn(Contender::Mount, at(B, 3)), Ok(()), "another mount is not held back by the turn");
    assert_eq!(l.admit_in_turn(Contender::Mount, at(C, 4)), Ok(()), "the mount's turn");
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 5)), Ok(()), "turn used");
}

#[test]
fn a_new_region_in_the_slot_owes_no_turn() {
    let l = RegionLock::new();
    let h = l.take(1).unwrap();
    assert_eq!(l.admit_in_turn(Contender::Mount, at(B, 1)), Err(Refusal::Retry));
    l.end(h);
    l.changed();
    l.forget_turn();
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 2)), Ok(()));
}
