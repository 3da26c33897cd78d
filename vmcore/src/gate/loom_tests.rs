//! loom model of the slice-start protocol (`Epoch`, `Gate`), with
//! `RUSTFLAGS="--cfg loom" cargo test --release -p vmcore --lib loom`. Two CPUs: CPU 0 makes
//! a change to guest G under the world lock (a stop, or a ring that raises a virtual
//! interrupt for G's vCPU X) and kicks CPU 1 (`ipi::send`: the attention flag, then the
//! interrupt); CPU 1 runs X: a start under the lock, then another vCPU's exit (which may take
//! the attention flag and the world lock for itself), then X's next start (without the lock
//! where `Gate::may_start` allows), X in the guest until an exit (the kick's interrupt forces
//! one; the model waits for the flag, or for CPU 0 to be done), and that exit's look under the
//! lock where it took the flag. The property: the change is seen (X ends, or its vector is
//! injected) by the start or by that exit, never missed until some later exit.
//!
//! Mutations seen to fail (made by hand, then undone), each with "a change was seen neither
//! by the start nor by the next exit": `bump` moved after the kick, the world lock let go
//! first (all four models; moved after a kick made under the lock but before the lock is let
//! go, it passes: the exit that takes the flag waits for that lock), the ring without its
//! `bump` (the two ring models), `may_start` without its epoch comparison (all four).

use super::*;
use crate::sync::spin;
use loom::sync::atomic::AtomicBool;
use loom::sync::{Arc, Mutex};
use loom::thread;

/// What a start decides from, behind the model's world lock.
#[derive(Default)]
struct Start {
    stopped: bool,
    /// A virtual interrupt raised for X and not yet injected.
    pending: bool,
}

struct World {
    lock: Mutex<Start>,
    /// Guest G's epoch.
    epoch: Epoch,
    /// CPU 1's attention flag (`ipi::send` sets it, an exit takes it).
    attention: AtomicBool,
    /// CPU 0 made its change and sent its kick.
    done: AtomicBool,
}

#[derive(Clone, Copy, Debug)]
enum Change {
    Stop,
    Ring,
}

/// CPU 0: the change under the world lock, its bump, the kick (under the lock or after).
fn change(w: &World, c: Change, kick_under_lock: bool) {
    {
        let mut s = w.lock.lock().unwrap();
        match c {
            Change::Stop => s.stopped = true,
            Change::Ring => s.pending = true,
        }
        w.epoch.bump();
        if kick_under_lock {
            w.attention.store(true, Ordering::Release);
        }
    }
    if !kick_under_lock {
        w.attention.store(true, Ordering::Release);
    }
    w.done.store(true, Ordering::Release);
}

/// X's start (or its exit's look) under the world lock, as `prepare`: ends a stopped vCPU,
/// injects a pending vector, records what it saw. Returns whether X goes on, and notes in
/// `seen` that the change was seen.
fn locked_start(w: &World, gate: &mut Gate, seen: &mut bool) -> bool {
    let mut s = w.lock.lock().unwrap();
    gate.forget();
    if s.stopped {
        *seen = true;
        return false;
    }
    let injected = core::mem::take(&mut s.pending);
    *seen |= injected;
    gate.record(w.epoch.now(), !injected);
    true
}

/// Takes the attention flag (`ipi::attention`). A compare-and-swap, not `swap`: under loom
/// 0.7 a `swap(false)` after a `swap(false)` that read false was seen to read false again
/// although an Acquire load just before it had seen a Release store made after the flag's
/// store (a two-thread model of just that fails; with compare_exchange it passes).
fn take(flag: &AtomicBool) -> bool {
    flag.compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

/// CPU 1: runs X as `sched::run_slice` does across one slice boundary.
fn run_x(w: &World) {
    let (mut gate, mut seen) = (Gate::new(), false);
    if !locked_start(w, &mut gate, &mut seen) {
        return;
    }
    // Another vCPU's exit on this CPU may take the flag; its world path takes the lock for
    // itself and looks at nothing of X.
    if take(&w.attention) {
        drop(w.lock.lock().unwrap());
    }
    // X's next slice start.
    let facts = Facts { attention: w.attention.load(Ordering::Acquire), ..Facts::default() };
    if !gate.may_start(&w.epoch, facts) && !locked_start(w, &mut gate, &mut seen) {
        return;
    }
    // X runs until an exit: the kick's interrupt forces one once it is sent.
    loop {
        let done = w.done.load(Ordering::Acquire);
        if take(&w.attention) {
            locked_start(w, &mut gate, &mut seen);
            break;
        }
        if done {
            break;
        }
        spin();
    }
    assert!(seen, "a change was seen neither by the start nor by the next exit");
}

fn model(c: Change, kick_under_lock: bool) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(move || {
        let w = Arc::new(World { lock: Mutex::new(Start::default()), epoch: Epoch::new(), attention: AtomicBool::new(false), done: AtomicBool::new(false) });
        let w0 = w.clone();
        let cpu0 = thread::spawn(move || change(&w0, c, kick_under_lock));
        run_x(&w);
        cpu0.join().unwrap();
    });
}

#[test]
fn loom_a_stop_reaches_a_slice_started_without_the_lock() {
    model(Change::Stop, false);
}

#[test]
fn loom_a_stop_kicked_under_the_lock_reaches_a_slice_started_without_it() {
    model(Change::Stop, true);
}

#[test]
fn loom_a_raised_vector_reaches_a_slice_started_without_the_lock() {
    model(Change::Ring, false);
}

#[test]
fn loom_a_raised_vector_kicked_under_the_lock_reaches_a_slice_started_without_it() {
    model(Change::Ring, true);
}

