//! An ExMap region's batch lock and the decisions made around it: who may touch the region
//! while an ALLOC / FREE batch edits its leaves with the world lock let go, whom the batch
//! shoots down when it ends, and where its frames go. Plain data behind the caller's lock
//! (the hypervisor's world lock, `morsels::Named::batching`); the hypervisor's
//! `morsels::exmap` calls it, `loom_tests.rs` model-checks it (docs/src/notes/region-lock.md).
//!
//! # Protocol
//! 1. World lock: [`RegionLock::take`] (the region's leaves and the frames they map are the
//!    holder's until [`RegionLock::end`]). A [`Held`] is neither `Clone` nor `Copy`: the lock
//!    is given back once, by the one `end` that consumes it.
//! 2. No world lock: the batch edits the leaves. Meanwhile [`RegionLock::admit`] answers
//!    every other call on the region: another ExMap action [`Refusal::Retry`] (the guest
//!    issues it again; the lock is never waited for with the world lock held), destroy, a
//!    device mount or an NVMe batch [`Refusal::Busy`]. Guest mounts and unmounts go on.
//! 3. World lock: [`RegionLock::end`] gives the lock back and decides the shootdown of a batch
//!    that cleared leaves from the region's mounters *now*: a mount made during the batch
//!    took the world lock, so it is counted; a mount made after it walks cleared leaves. The
//!    frames the batch freed stay in the caller's vCPU cache ([`Cache::Keep`]: that vCPU
//!    takes one again only in its next call, after this CPU's acknowledgments), or go
//!    through this CPU's `shootdown::Owed` ([`Cache::AfterAcks`]) where the vCPU is gone:
//!    never straight to the allocator.

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;

/// A region's batch lock (see the module doc). Behind the caller's lock; never waited for.
#[derive(Debug, Default)]
pub struct RegionLock {
    held: bool,
}

/// The region's lock, held by one batch: given back by [`RegionLock::end`] only.
#[must_use = "a region's lock is given back by `RegionLock::end`"]
#[derive(Debug)]
pub struct Held(());

/// Another call on the region, made while a batch may hold its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// `exmap_action` of any op, by any vCPU of any guest (a batch takes the lock this way).
    Action,
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
    /// Every CPU that ran any guest: others have the region mounted, or the caller is gone.
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
    /// Not held.
    pub const fn new() -> Self {
        RegionLock { held: false }
    }

    /// Whether a batch holds it.
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// Whether `who` may go on now.
    pub fn admit(&self, who: Contender) -> Result<(), Refusal> {
        match (self.held, who) {
            (false, _) => Ok(()),
            (true, Contender::Action) => Err(Refusal::Retry),
            (true, Contender::Destroy | Contender::DeviceMount | Contender::DiskBatch) => Err(Refusal::Busy),
        }
    }

    /// Takes the lock for a batch: [`Refusal::Retry`] if another holds it.
    pub fn take(&mut self) -> Result<Held, Refusal> {
        self.admit(Contender::Action)?;
        self.held = true;
        Ok(Held(()))
    }

    /// Gives the lock back at the batch's end and says whom to shoot down: nobody if the
    /// batch cleared no leaf, else by `mounters`, the region's guest mounts read now (in
    /// this critical section, after the leaves were cleared), and by the `caller`.
    pub fn end(&mut self, held: Held, cleared: bool, mounters: u32, caller: Caller) -> Option<Targets> {
        let Held(()) = held;
        self.held = false;
        if !cleared {
            return None;
        }
        Some(match caller {
            Caller::Stays if mounters <= 1 => Targets::Caller,
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
