//! Whether a vCPU's time slice may start without the world lock (issue 21): a slice starts
//! under it (`prepare` in `hypervisor/src/vm/sched.rs`: the guest's state, wake-ups,
//! injections, exit counts) unless nothing that start would decide can have changed since
//! the vCPU's last start under the lock. Each guest has an [`Epoch`], bumped under the world
//! lock by every change that can alter a start of its vCPUs; a vCPU's [`Gate`] keeps the
//! epoch its last locked start saw where that start left nothing to do; [`Gate::may_start`]
//! is the rule.
//!
//! # The protocol
//! A change to what a start decides (a stop, a virtual interrupt raised, a wait, a timer, a
//! new exception bitmap) is made under the world lock and bumps the guest's epoch (Release)
//! before that lock is let go and before any IPI that tells the vCPU's CPU to look. A start
//! without the lock loads the epoch (Acquire): where it equals the one its gate kept, every
//! change made before that load is one it saw under the lock. A change made after the load
//! is seen by the vCPU's next exit: the change's IPI to every CPU that ran the guest (stop,
//! new bitmap) or on the wake-up edge (a raised vector) forces one, and the flag it sets
//! (`ipi::attention`) sends that exit to the world lock, or, where another vCPU's exit took
//! the flag first, that exit took the world lock after the change, so this CPU's load sees
//! the bump. Changes from the vCPU's own CPU are ordered before its start by program order.
//! What needs no bump: bits rung (only a waiting vCPU looks at them, and a waiting vCPU
//! never starts without the lock: its last start did not enter), subscriptions, unmounts.
//! A loom model checks this (`loom_tests.rs`); `tests.rs` checks the rule.
//!
//! # Mutations the tests catch
//! Broken by hand once each, the tests failed, and the code was restored:
//! - `may_start` without its epoch comparison: `a_bump_after_the_locked_start_sends_the_next_to_the_lock`,
//!   `epochs_of_two_guests_are_apart` and all four loom models ("a change was seen neither
//!   by the start nor by the next exit").
//! - `bump` after the kick, the world lock let go first, in the model's changer (as a
//!   hypervisor site that bumped after its IPI would be): all four loom models.
//! - A ring that raised a vector without a bump (the model's `Change::Ring` without it):
//!   the two loom models of a ring.
//! - `may_start` ignoring the timer: `a_due_timer_sends_the_start_to_the_lock`.
//! - `may_start` ignoring a budget: `a_guest_with_a_budget_always_starts_under_the_lock`.
//! - `may_start` ignoring the fold bound (`FOLD_EVERY`): `the_exit_counts_are_folded_at_least_every_fold_every_slices`.
//! - `record` keeping the epoch where the start left something pending:
//!   `a_start_that_left_work_sends_the_next_to_the_lock`.

use crate::sync::{AtomicU64, Ordering};

#[cfg(all(test, not(loom)))]
mod tests;
#[cfg(all(test, loom))]
mod loom_tests;

/// A slice that starts without the world lock leaves its exit counts in the vCPU's slot (the
/// guest's counters, `INFO_EXITS` / `INFO_SLICES` of its other vCPUs and the end-of-run
/// report, get them at its next start under the lock): after this many slices ended (its
/// unfolded `preempted` count) the next start takes the lock, so the guest's counts lag by
/// at most this many slices of each vCPU (plus the current one, as before).
pub const FOLD_EVERY: u64 = 16;

/// A guest's count of changes that alter what its vCPUs' slice starts decide: bumped under
/// the world lock, read with no lock by a start (`Gate::may_start`) and under it by the
/// start that records it (`Gate::record`).
#[derive(Debug)]
pub struct Epoch(AtomicU64);

impl Default for Epoch {
    fn default() -> Self {
        Self::new()
    }
}

impl Epoch {
    pub fn new() -> Self {
        Epoch(AtomicU64::new(0))
    }

    /// A change that can alter a slice start of the guest's vCPUs, made under the world
    /// lock: called before that lock is let go and before the IPIs that tell other CPUs to
    /// look (module doc). Release: a start that loads the new value sees the change.
    #[inline]
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    /// The count now (Acquire: the changes of every bump it includes are visible).
    #[inline]
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// Guests whose epochs a change must bump, named by id modulo 64 (bit `id % 64`): it may
/// name more guests than were added, never fewer, and a bump too many only sends a start
/// to the lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Guests(pub u64);

impl Guests {
    pub fn add(&mut self, id: u32) {
        self.0 |= 1 << (id % 64);
    }

    /// Whether guest `id`'s epoch must be bumped.
    pub fn has(self, id: u32) -> bool {
        self.0 & (1 << (id % 64)) != 0
    }
}

/// What a vCPU's slice start knows with no lock, besides its gate and epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Another CPU sent this one an IPI that asks it to look (`ipi::attention_pending`, not
    /// taken: the next exit takes it).
    pub attention: bool,
    /// The vCPU's one-shot timer is due (its deadline as of the last locked start passed):
    /// the start must fire it.
    pub timer_due: bool,
    /// The guest has a budget of slices (`slices=N`): each start folds the exit counts and
    /// checks it under the lock.
    pub budgeted: bool,
    /// Slices the vCPU ended whose counts are not yet in its guest's (`vcpu::Core::unfolded`).
    pub unfolded_slices: u64,
}

/// One vCPU's memory of its last slice start under the world lock (in its slot; only its
/// CPU touches it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gate {
    /// The guest's epoch that start read under the lock, where it entered the guest and left
    /// nothing for the next start to do; None: the next start takes the lock.
    settled: Option<u64>,
}

impl Gate {
    pub const fn new() -> Self {
        Gate { settled: None }
    }

    /// A start under the world lock (that lock held) begins: until it says otherwise, the
    /// next one takes the lock too (a start that does not enter, a vCPU that waits or ends).
    #[inline]
    pub fn forget(&mut self) {
        self.settled = None;
    }

    /// A start under the world lock entered the guest having read `epoch` (under that lock,
    /// after every check); `settled`: it left nothing for the next start (no virtual
    /// interrupt injected or pending, no interrupt window asked for, this CPU already in the
    /// guest's `ran_on`). Only then may the next start go without the lock.
    #[inline]
    pub fn record(&mut self, epoch: u64, settled: bool) {
        self.settled = settled.then_some(epoch);
    }

    /// The rule: the next slice may start without the world lock where the last start under
    /// it left nothing to do, no change to the guest's start state was made since (`epoch`
    /// unchanged), no IPI asked this CPU to look, the vCPU's timer is not due, the guest has
    /// no slice budget, and fewer than `FOLD_EVERY` slices' counts wait in the slot.
    #[inline]
    pub fn may_start(&self, epoch: &Epoch, f: Facts) -> bool {
        let Some(seen) = self.settled else { return false };
        if f.attention || f.timer_due || f.budgeted || f.unfolded_slices >= FOLD_EVERY {
            return false;
        }
        epoch.now() == seen
    }
}
