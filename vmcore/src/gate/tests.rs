//! The rule of `Gate::may_start`, case by case (debug and `--release`).

use super::*;

/// A gate whose last locked start entered at `epoch`'s count now and left nothing to do.
fn settled(epoch: &Epoch) -> Gate {
    let mut g = Gate::new();
    g.record(epoch.now(), true);
    g
}

#[test]
fn a_new_vcpu_starts_under_the_lock() {
    let e = Epoch::new();
    assert!(!Gate::new().may_start(&e, Facts::default()));
    assert!(!Gate::default().may_start(&e, Facts::default()));
}

#[test]
fn a_settled_start_lets_the_next_go_without_the_lock_until_something_changes() {
    let e = Epoch::new();
    e.bump();
    let g = settled(&e);
    assert!(g.may_start(&e, Facts::default()));
    assert!(g.may_start(&e, Facts::default()), "asking does not change the gate");
    assert!(g.may_start(&e, Facts { unfolded_slices: FOLD_EVERY - 1, ..Facts::default() }));
}

#[test]
fn a_bump_after_the_locked_start_sends_the_next_to_the_lock() {
    let e = Epoch::new();
    let mut g = settled(&e);
    e.bump();
    assert!(!g.may_start(&e, Facts::default()));
    // The next locked start sees the change and records the new count.
    g.forget();
    assert!(!g.may_start(&e, Facts::default()));
    g.record(e.now(), true);
    assert!(g.may_start(&e, Facts::default()));
}

#[test]
fn a_start_that_left_work_sends_the_next_to_the_lock() {
    let e = Epoch::new();
    let mut g = settled(&e);
    // An injection, a pending vector or a window asked for: the next start looks again.
    g.record(e.now(), false);
    assert!(!g.may_start(&e, Facts::default()));
}

#[test]
fn a_start_that_did_not_enter_sends_the_next_to_the_lock() {
    let e = Epoch::new();
    let mut g = settled(&e);
    // A locked start begins and returns early (the vCPU waits): nothing recorded.
    g.forget();
    assert!(!g.may_start(&e, Facts::default()));
}

#[test]
fn an_ipi_that_asks_this_cpu_to_look_sends_the_start_to_the_lock() {
    let e = Epoch::new();
    assert!(!settled(&e).may_start(&e, Facts { attention: true, ..Facts::default() }));
}

#[test]
fn a_due_timer_sends_the_start_to_the_lock() {
    let e = Epoch::new();
    assert!(!settled(&e).may_start(&e, Facts { timer_due: true, ..Facts::default() }));
}

#[test]
fn a_guest_with_a_budget_always_starts_under_the_lock() {
    let e = Epoch::new();
    assert!(!settled(&e).may_start(&e, Facts { budgeted: true, ..Facts::default() }));
}

#[test]
fn the_exit_counts_are_folded_at_least_every_fold_every_slices() {
    let e = Epoch::new();
    let g = settled(&e);
    assert!(g.may_start(&e, Facts { unfolded_slices: FOLD_EVERY - 1, ..Facts::default() }));
    assert!(!g.may_start(&e, Facts { unfolded_slices: FOLD_EVERY, ..Facts::default() }));
    assert!(!g.may_start(&e, Facts { unfolded_slices: u64::MAX, ..Facts::default() }));
}

#[test]
fn epochs_of_two_guests_are_apart() {
    let (a, b) = (Epoch::new(), Epoch::new());
    let (ga, gb) = (settled(&a), settled(&b));
    b.bump();
    assert!(ga.may_start(&a, Facts::default()), "another guest's change");
    assert!(!gb.may_start(&b, Facts::default()));
}
