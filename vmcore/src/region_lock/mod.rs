//! An ExMap region's batch lock and the decisions made around it: who may touch the region
//! while an ALLOC / FREE batch edits its leaves with the world lock let go, whom the batch
//! shoots down when it ends, and where its frames go. One atomic flag, taken under the
//! caller's lock (the hypervisor's world lock) and given back with or without it; the
//! hypervisor keeps one per directory slot (`morsels::exmap::RegionCell`) and calls it from
//! `morsels::exmap`; `loom_tests.rs` model-checks it (docs/src/notes/region-lock.md,
//! docs/src/notes/exmap-call.md).
//!
//! # Protocol
//! 1. World lock: [`RegionLock::take`] (the region's leaves and the frames they map are the
//!    holder's until [`RegionLock::end`]), with the region's guest mounts counted now: the
//!    [`Held`] keeps the count. A [`Held`] is neither `Clone` nor `Copy`: the lock is given
//!    back once, by the one `end` that consumes it.
//! 2. No world lock: the batch edits the leaves. Meanwhile [`RegionLock::admit`] answers
//!    every other call on the region: another ExMap action and a guest mount
//!    [`Refusal::Retry`] (the guest issues it again; the lock is never waited for with the
//!    world lock held), destroy, a device mount or an NVMe batch [`Refusal::Busy`]. Guest
//!    unmounts go on (each shoots its own guest's CPUs down).
//! 3. With or without the world lock: the shootdown of a batch that cleared leaves is
//!    decided ([`Held::targets`]) from the mounts counted at the take, which no mount can
//!    have raised since (step 2), and requested; then [`RegionLock::end`] gives the lock back
//!    (Release: whoever is admitted next, under the world lock, sees the cleared leaves; a
//!    mount made after it walks them). The frames the batch freed stay in the caller's vCPU
//!    cache ([`Cache::Keep`]: that vCPU takes one again only in its next call, after this
//!    CPU's acknowledgments), or go through this CPU's `shootdown::Owed`
//!    ([`Cache::AfterAcks`]) where the vCPU is gone: never straight to the allocator.

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;

use crate::sync::{AtomicBool, Ordering};

/// A region's batch lock (see the module doc). Never waited for.
#[derive(Debug, Default)]
pub struct RegionLock {
    held: AtomicBool,
}

/// The region's lock, held by one batch: given back by [`RegionLock::end`] only. It keeps
/// the region's guest mounts as counted at the take (none can be added while it is held).
#[must_use = "a region's lock is given back by `RegionLock::end`"]
#[derive(Debug)]
pub struct Held {
    mounters: u32,
}

/// Another call on the region, made while a batch may hold its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// `exmap_action` of any op, by any vCPU of any guest (a batch takes the lock this way).
    Action,
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
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        RegionLock { held: AtomicBool::new(false) }
    }

    /// Not held (loom's atomics are not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        RegionLock { held: AtomicBool::new(false) }
    }

    /// Whether a batch holds it.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Whether `who` may go on now (the caller's lock held).
    pub fn admit(&self, who: Contender) -> Result<(), Refusal> {
        match (self.is_held(), who) {
            (false, _) => Ok(()),
            (true, Contender::Action | Contender::Mount) => Err(Refusal::Retry),
            (true, Contender::Destroy | Contender::DeviceMount | Contender::DiskBatch) => Err(Refusal::Busy),
        }
    }

    /// Takes the lock for a batch (the caller's lock held), `mounters` the region's guest
    /// mounts now: [`Refusal::Retry`] if another holds it.
    pub fn take(&self, mounters: u32) -> Result<Held, Refusal> {
        match self.held.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(Held { mounters }),
            Err(_) => Err(Refusal::Retry),
        }
    }

    /// Gives the lock back at the batch's end, with or without the caller's lock: every
    /// edit the batch made is seen by whoever is admitted next. The shootdown is decided
    /// ([`Held::targets`]) and requested before.
    pub fn end(&self, held: Held) {
        let Held { .. } = held;
        self.held.store(false, Ordering::Release);
    }
}

impl Held {
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
