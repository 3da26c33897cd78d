//! The lock's decisions on one thread (debug and release): who is admitted while it is held,
//! that it is taken by one batch at a time and free again after `end`, and the shootdown and
//! cache rules at the end.

use super::*;

const ALL: [Contender; 5] = [Contender::Action, Contender::Mount, Contender::Destroy, Contender::DeviceMount, Contender::DiskBatch];

#[test]
fn free_lock_admits_everyone() {
    let l = RegionLock::new();
    assert!(!l.is_held());
    for who in ALL {
        assert_eq!(l.admit(who), Ok(()), "{who:?}");
    }
}

#[test]
fn held_lock_retries_actions_and_mounts_and_refuses_the_rest_busy() {
    let l = RegionLock::new();
    let h = l.take(1).unwrap();
    assert!(l.is_held());
    assert_eq!(l.admit(Contender::Action), Err(Refusal::Retry));
    assert_eq!(l.admit(Contender::Mount), Err(Refusal::Retry), "no mounter added while held");
    for who in [Contender::Destroy, Contender::DeviceMount, Contender::DiskBatch] {
        assert_eq!(l.admit(who), Err(Refusal::Busy), "{who:?}");
    }
    assert_eq!(l.take(1).err(), Some(Refusal::Retry), "a second batch must retry");
    assert_eq!(h.targets(false, Caller::Stays), None);
    l.end(h);
    assert!(!l.is_held());
    for who in ALL {
        assert_eq!(l.admit(who), Ok(()), "{who:?} after the end");
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
    assert_eq!(l.take_fast(&handle).map(|_| ()), None, "held by the world-path batch");
    l.end(h);
    let f = l.take_fast(&handle).expect("nothing changed since the handle");
    assert!(l.is_held());
    assert_eq!(f.targets(true, Caller::Stays), Some(Targets::Everyone), "the mounts counted at the world take");
    assert_eq!(l.admit(Contender::Action), Err(Refusal::Retry), "a fast take is seen held");
    assert_eq!(l.admit(Contender::Mount), Err(Refusal::Retry), "a fast take is seen held");
    assert_eq!(l.admit(Contender::Destroy), Err(Refusal::Busy));
    l.end(f);
    // Every change refuses the handle from then on; a new world take makes a new one.
    for change in [Some(Contender::Mount), Some(Contender::Destroy), Some(Contender::DeviceMount), Some(Contender::DiskBatch), None] {
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
    assert!(l.is_held(), "an unmount during the batch keeps the lock held");
    l.end(f);
    assert!(!l.is_held() && l.take_fast(&handle).is_none(), "the unmount's bump stays after the end");
}

#[test]
fn refused_action_sends_the_holder_to_the_world_path() {
    let l = RegionLock::new();
    let h = l.take(1).unwrap();
    let handle = h.handle();
    l.end(h);
    let f = l.take_fast(&handle).unwrap();
    assert_eq!(l.admit(Contender::Action), Err(Refusal::Retry));
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

/// The starvation the hand-over ends: A calls back-to-back (fast takes), B's retries come
/// between A's batches. Without turns A's world-path call after the refusal took the lock
/// again before B's retry (exmap_guest_stopped_in_a_batch hung under Bochs).
#[test]
fn a_refused_action_gets_the_lock_next() {
    let l = RegionLock::new();
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 0)), Ok(()));
    let h = l.take(1).unwrap();
    let handle = h.handle();
    assert_eq!(l.admit_in_turn(Contender::Action, at(B, 1)), Err(Refusal::Retry), "held: B waits");
    l.end(h);
    assert!(l.take_fast(&handle).is_none(), "B's refusal sent A to the world path");
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 2)), Err(Refusal::Retry), "A gives way to B, the lock free");
    assert_eq!(l.admit_in_turn(Contender::Action, at(C, 3)), Err(Refusal::Retry), "so does anyone else");
    assert_eq!(l.admit_in_turn(Contender::Action, at(B, 4)), Ok(()), "B's turn");
    let hb = l.take(1).unwrap();
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 5)), Err(Refusal::Retry), "held by B: A waits now");
    l.end(hb);
    assert_eq!(l.admit_in_turn(Contender::Action, at(B, 6)), Err(Refusal::Retry), "B gives way to A in turn");
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 7)), Ok(()));
    assert_eq!(l.admit_in_turn(Contender::Action, at(B, 8)), Ok(()), "A's turn used: nobody waits");
}

#[test]
fn a_turn_not_taken_expires() {
    let l = RegionLock::new();
    let h = l.take(1).unwrap();
    assert_eq!(l.admit_in_turn(Contender::Action, at(B, 10)), Err(Refusal::Retry));
    l.end(h);
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 10 + PATIENCE - 1)), Err(Refusal::Retry), "B still has its turn");
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 10 + PATIENCE)), Ok(()), "B did not come back: A goes on");
    let h = l.take(1).unwrap();
    assert_eq!(l.admit_in_turn(Contender::Action, at(B, 10 + PATIENCE + 1)), Err(Refusal::Retry), "held");
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
    assert_eq!(l.admit_in_turn(Contender::Action, at(B, 1)), Err(Refusal::Retry));
    l.end(h);
    l.changed();
    l.forget_turn();
    assert_eq!(l.admit_in_turn(Contender::Action, at(A, 2)), Ok(()));
}
