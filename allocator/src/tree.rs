//! Upper level: one word per tree of 32 areas (64 MiB) holding its reservation, 0 = free,
//! otherwise the reserving CPU + 1, taken and given back with one CAS / store. A tree's free
//! count is not stored beside the flag: it is the sum of its 32 area entries, which share one
//! cache line, so the free and alloc fast paths never touch this level (see README, "Design").

use crate::sync::{AtomicU32, Ordering::*};

/// Areas per tree.
pub const AREAS: usize = 32;

/// Reserves the tree for `core`; false when another CPU holds it.
#[inline]
pub fn reserve(t: &AtomicU32, core: usize) -> bool {
    t.compare_exchange(0, core as u32 + 1, AcqRel, Relaxed)
        .is_ok()
}

/// Gives the reservation back.
#[inline]
pub fn release(t: &AtomicU32) {
    t.store(0, Release);
}

/// Whether some CPU holds the tree.
#[inline]
pub fn reserved(t: &AtomicU32) -> bool {
    t.load(Relaxed) != 0
}
