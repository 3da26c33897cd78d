//! An ExMap region's batch lock and the decisions made around it: who may touch the region
//! while an ALLOC / FREE batch edits its leaves with the world lock let go, whom the batch
//! shoots down when it ends, and where its frames go. One atomic flag, taken under the
//! caller's lock (the hypervisor's world lock) and given back with or without it; the
//! hypervisor keeps one per directory slot (`crate::region::RegionCell`) and calls it from
//! `morsels::exmap`; `loom_tests.rs` model-checks it (docs/src/notes/region-lock.md,
//! docs/src/notes/exmap-call.md).
//!
//! # Protocol
//! 1. World lock: [`RegionLock::take`], shared with the other ALLOC / FREE batches on the
//!    region (branch `sharedcas`: the word counts them; each leaf is changed by
//!    compare-and-swap, `morsel::Leaves::try_map` / `take`, so of several batches one maps a
//!    page and one gets a freed frame), with the region's guest mounts counted now: the
//!    [`Held`] keeps the count. A [`Held`] is neither `Clone` nor `Copy`: the lock is given
//!    back once, by the one `end` that consumes it.
//! 2. No world lock: the batch edits the leaves. Meanwhile [`RegionLock::admit`] answers
//!    every other call on the region: another ALLOC / FREE goes on (shared), a READ / WRITE
//!    and a guest mount [`Refusal::Retry`] (the guest issues it again; the lock is never
//!    waited for with the world lock held), destroy, a device mount or an NVMe batch
//!    [`Refusal::Busy`]. Guest unmounts go on (each shoots its own guest's CPUs down).
//! 3. With or without the world lock: the shootdown of a batch that cleared leaves is
//!    decided ([`Held::targets`]) from the mounts counted at the take, which no mount can
//!    have raised since (step 2), and requested; then [`RegionLock::end`] gives the lock back
//!    (Release: whoever is admitted next, under the world lock, sees the cleared leaves; a
//!    mount made after it walks them). The frames the batch freed stay in the caller's vCPU
//!    cache ([`Cache::Keep`]: that vCPU takes one again only in its next call, after this
//!    CPU's acknowledgments), or go through this CPU's `shootdown::Owed`
//!    ([`Cache::AfterAcks`]) where the vCPU is gone: never straight to the allocator.
//!
//! # Without the world lock at the start: handles (branch `exmap-lockless`)
//! The lock and the region's *generation* are one atomic word ([`RegionLock`]'s `state`:
//! bits 0..16 the batches that hold it, bits 16.. the generation), so every decision below is
//! one read-modify-write on one location and the modification order of that word is the
//! whole story:
//!
//! - A take under the world lock ([`RegionLock::take`]) gives a [`Held`] whose
//!   [`Held::handle`] names the region as it is *now*: the word's generation and the guest
//!   mounts counted at that take (the directory slot is the cell's; the caller keeps the
//!   cell's `&'static` beside it).
//! - Every change that a later call without the world lock must not miss bumps the
//!   generation, under the world lock, with one RMW that also reads the held bit:
//!   [`RegionLock::admit`] for a guest mount, READ / WRITE, destroy, device mount and NVMe
//!   batch (refused where the count is not 0), [`RegionLock::changed`] for a guest unmount
//!   (which goes on) and for a new region entering the slot (slot reuse).
//! - [`RegionLock::take_fast`] (no world lock) is a compare-and-swap that adds one batch to
//!   a word whose generation is exactly the handle's (AcqRel; retried only where another
//!   batch's take or end moved the count): it succeeds only if no such change happened
//!   since the handle was made. Where it fails the caller goes to the world path, which
//!   answers as before. Where it succeeds, the region is the one the handle named, still
//!   mounted read-write by the caller at the address it recorded (its unmount would have
//!   bumped), with the mounts counted then (a mount would have bumped), and every later
//!   exclusive contender's bump sees the count.
//! - [`RegionLock::end`] subtracts one batch (`fetch_sub`, Release): generations bumped
//!   meanwhile (unmounts) stay; an exclusive contender admitted later (an acquiring RMW on
//!   the word) sees every ended batch's edits.
//!
//! Lock order is unchanged: world lock → region lock → this CPU's `Owed`; the fast take is
//! made with no lock held and never waits. Loom model (e) `loom_fast_take_vs_unmount_destroy_reuse`;
//! the sharing: (f) `loom_shared_batches_vs_an_exclusive_contender`, (g)
//! `loom_two_vcpus_alloc_and_free_one_leaf` (docs/src/notes/region-lock.md, "Shared by
//! batches").

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;

use crate::sync::{AtomicU64, Ordering};

/// One batch in [`RegionLock`]'s word: its low [`BATCHES`] bits count the batches that hold
/// it (shared), the rest is the generation (one [`GENERATION`] per change).
const BATCH: u64 = 1;
/// The batch count's bits (at most 65,535 batches at once: one per vCPU).
const BATCHES: u64 = 0xffff;
/// One generation.
const GENERATION: u64 = BATCHES + 1;

/// A region's batch lock and generation (see the module doc). Never waited for.
#[derive(Debug, Default)]
pub struct RegionLock {
    /// Bits 0..16: the batches that hold it. Bits 16..: the generation, bumped by every
    /// change a [`Handle`] must see (48 bits: never wraps).
    state: AtomicU64,
    /// The contender the lock goes to next ([`Turn::who`]; 0: none) and until when (a TSC
    /// value): see [`RegionLock::admit_in_turn`]. Read and written under the caller's lock
    /// only (never by the fast take), so `Relaxed`.
    waiter: AtomicU64,
    waiter_until: AtomicU64,
}

/// Who asks [`RegionLock::admit_in_turn`], and when: `who` names the caller (nonzero; the
/// hypervisor: guest and vCPU), `now` the time, `patience` how long a refused caller keeps
/// its turn when it does not come back (its vCPU descheduled or stopped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Turn {
    pub who: u64,
    pub now: u64,
    pub patience: u64,
}

/// The region's lock, held by one batch: given back by [`RegionLock::end`] only. It keeps
/// the region's guest mounts as counted at the take (none can be added while it is held).
#[must_use = "a region's lock is given back by `RegionLock::end`"]
#[derive(Debug)]
pub struct Held {
    mounters: u32,
    handle: Handle,
}

/// A region as a take under the world lock saw it: its generation (the lock's word, held
/// clear) and its guest mounts then. [`RegionLock::take_fast`] takes the lock with it, with no
/// world lock, only while nothing changed since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handle {
    state: u64,
    mounters: u32,
}
/// Another call on the region, made while a batch may hold its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// `exmap_action` ALLOC or FREE, by any vCPU of any guest: shares the lock with the
    /// batches that hold it (its batch takes it this way).
    Action,
    /// `exmap_action` READ or WRITE: maps fresh pages (READ) and pins the region for its
    /// NVMe batch, under the caller's lock with plain leaf writes: excludes batches.
    DiskAction,
    /// A guest mount (`morsel_open`): would add a mounter the batch's shootdown does not
    /// count.
    Mount,
    /// `morsel_destroy`: would free the frames the batch edits.
    Destroy,
    /// A device mount: would build a device view from the leaves the batch edits.
    DeviceMount,
    /// An NVMe batch (`disk_begin`): would DMA into frames the batch may free.
    DiskBatch,
}

/// Why a [`Contender`] does not go on now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The guest issues the call again (the ABI sees nothing; the holder finishes meanwhile).
    Retry,
    /// The ABI's `Busy`: the guest decides.
    Busy,
}

/// The caller of a batch at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Its vCPU goes on (stopped or not) and keeps its ExMap state: it enters its guest again
    /// only after this CPU's acknowledgments arrived.
    Stays,
    /// Its guest is gone (`hypercall::abandon`), or its state cannot be kept.
    Gone,
}

/// Whom the batch's shootdown reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    /// The CPUs that ran the caller's vCPUs: nobody else has the region mounted.
    Caller,
    /// Beyond the caller's CPUs: others have the region mounted, or the caller is gone (the
    /// hypervisor shoots down the CPUs of every guest that mounted the region).
    Everyone,
}

/// Where the caller's frame cache (holding the frames its FREE cleared) goes at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// Back into the vCPU's state.
    Keep,
    /// Every frame through this CPU's `shootdown::Owed`: freed after the acknowledgments.
    AfterAcks,
}

impl RegionLock {
    /// Not held, generation 0.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        RegionLock { state: AtomicU64::new(0), waiter: AtomicU64::new(0), waiter_until: AtomicU64::new(0) }
    }

    /// Not held (loom's atomics are not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        RegionLock { state: AtomicU64::new(0), waiter: AtomicU64::new(0), waiter_until: AtomicU64::new(0) }
    }

    /// Whether a batch holds it.
    pub fn is_held(&self) -> bool {
        self.batches() != 0
    }

    /// How many batches hold it now.
    pub fn batches(&self) -> u64 {
        self.state.load(Ordering::Acquire) & BATCHES
    }

    /// Whether `who` may go on now (the caller's lock held). An ALLOC / FREE action shares
    /// the lock with the batches that hold it: it goes on (its batch takes the lock, `take`).
    /// Every other contender changes the region (or may) and must exclude them: it bumps the
    /// generation first, in the same RMW that reads the batch count, so a handle made before
    /// is refused from here on, and a fast take that came first is seen holding.
    pub fn admit(&self, who: Contender) -> Result<(), Refusal> {
        if who == Contender::Action {
            return Ok(());
        }
        let held = self.state.fetch_add(GENERATION, Ordering::AcqRel) & BATCHES != 0;
        match (held, who) {
            (false, _) => Ok(()),
            (true, Contender::Action | Contender::DiskAction | Contender::Mount) => Err(Refusal::Retry),
            (true, Contender::Destroy | Contender::DeviceMount | Contender::DiskBatch) => Err(Refusal::Busy),
        }
    }

    /// [`RegionLock::admit`] for an action or a guest mount, with a hand-over, so that a
    /// caller that finds the lock held gets it next (the caller's lock held): the first one
    /// refused while no turn is pending is recorded as the waiter; until it is admitted, or
    /// `patience` after its refusal, every *other* action is refused too ([`Refusal::Retry`])
    /// even with the lock free. The holder's handle is refused already (the waiter's refusal
    /// bumped the generation), so its next call comes here and gives way. Without it a vCPU
    /// calling back-to-back (the lock-free path's next call follows ~1,000 emulated
    /// instructions after its batch) took the lock again before the refused caller's retry,
    /// for ever where the timing repeats (Bochs). Mounts are never held back by a turn (they
    /// hold nothing); a mount refused while the lock is held gets the next turn like an
    /// action.
    pub fn admit_in_turn(&self, who: Contender, turn: Turn) -> Result<(), Refusal> {
        let waiter = self.waiter.load(Ordering::Relaxed);
        let pending = waiter != 0 && turn.now < self.waiter_until.load(Ordering::Relaxed);
        if matches!(who, Contender::Action | Contender::DiskAction) && pending && waiter != turn.who {
            return Err(Refusal::Retry);
        }
        let answer = self.admit(who);
        match answer {
            Ok(()) if waiter == turn.who => self.waiter.store(0, Ordering::Relaxed),
            Err(Refusal::Retry) if !pending => {
                self.waiter.store(turn.who, Ordering::Relaxed);
                self.waiter_until.store(turn.now.saturating_add(turn.patience), Ordering::Relaxed);
            }
            _ => {}
        }
        answer
    }

    /// Forgets a pending turn (a new region entering the slot: its callers owe the old
    /// region's waiter nothing). The caller's lock held.
    pub fn forget_turn(&self) {
        self.waiter.store(0, Ordering::Relaxed);
    }

    /// A change that goes on whether or not a batch holds the lock (the caller's lock held):
    /// a guest unmount of the region, a new region entering the slot. Handles made before
    /// are refused from here on.
    pub fn changed(&self) {
        self.state.fetch_add(GENERATION, Ordering::AcqRel);
    }

    /// Takes the lock for a batch, shared with the batches that hold it (the caller's lock
    /// held, the action admitted: no exclusive contender holds the region), `mounters` the
    /// region's guest mounts now: [`Refusal::Retry`] only where 65,535 batches hold it. The
    /// [`Held`] names the region as it is now ([`Held::handle`]).
    pub fn take(&self, mounters: u32) -> Result<Held, Refusal> {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            if cur & BATCHES == BATCHES {
                return Err(Refusal::Retry);
            }
            // Only fast takes and ends can change the word meanwhile (every bump is made
            // under the caller's lock).
            match self.state.compare_exchange_weak(cur, cur + BATCH, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(Held { mounters, handle: Handle { state: cur & !BATCHES, mounters } }),
                Err(now) => cur = now,
            }
        }
    }

    /// Takes the lock, shared, with no lock held, for the region `handle` names: only if
    /// nothing changed since the handle was made (no unmount, mount, destroy, slot reuse,
    /// device mount, NVMe batch, READ / WRITE: every exclusive contender bumps the
    /// generation, refused or not); other batches may hold it. None otherwise (the caller
    /// goes to the world path). A CAS that adds one batch to a word whose generation is the
    /// handle's: the generation is checked in the same RMW that takes the lock (retried only
    /// where another batch's take or end changed the count meanwhile).
    pub fn take_fast(&self, handle: &Handle) -> Option<Held> {
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            if cur & !BATCHES != handle.state || cur & BATCHES == BATCHES {
                return None;
            }
            match self.state.compare_exchange_weak(cur, cur + BATCH, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Held { mounters: handle.mounters, handle: *handle }),
                Err(now) => cur = now,
            }
        }
    }

    /// Gives the lock back at the batch's end, with or without the caller's lock: every
    /// edit the batch made is seen by whoever is admitted next (an exclusive contender reads
    /// the count with an acquiring RMW: every batch's end before it is a release in the
    /// word's modification order). The shootdown is decided ([`Held::targets`]) and
    /// requested before. Only this batch leaves the count: generations bumped meanwhile
    /// (unmounts) stay. Returns how many batches still hold it.
    pub fn end(&self, held: Held) -> u64 {
        let Held { .. } = held;
        (self.state.fetch_sub(BATCH, Ordering::Release) & BATCHES) - 1
    }
}

impl Held {
    /// The region as this take found it: a later [`RegionLock::take_fast`] with it
    /// succeeds only while nothing changed.
    pub fn handle(&self) -> Handle {
        self.handle
    }

    /// Whom the batch's shootdown reaches: nobody if it cleared no leaf, else by the
    /// region's guest mounts counted at the take (none was added since) and the `caller`.
    pub fn targets(&self, cleared: bool, caller: Caller) -> Option<Targets> {
        if !cleared {
            return None;
        }
        Some(match caller {
            Caller::Stays if self.mounters <= 1 => Targets::Caller,
            _ => Targets::Everyone,
        })
    }
}

impl Caller {
    /// Where its frame cache goes: the frames a FREE cleared are reused only after the
    /// shootdown's acknowledgments.
    pub fn cache(self) -> Cache {
        match self {
            Caller::Stays => Cache::Keep,
            Caller::Gone => Cache::AfterAcks,
        }
    }
}
