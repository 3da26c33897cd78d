//! Lower level, part 2: the entry per 2 MiB area (LLFree's "child"), one `u16`: bits 0..=9 hold
//! a count of the area's free 4 KiB frames, bit 14 says "claimed by one CPU for small frames",
//! bit 15 "allocated as one huge frame".
//!
//! # Invariant (what keeps a huge frame off small ones)
//! * Only the CPU that holds an area's claim sets bits in it (takes small frames). A claim is
//!   taken with one CAS from an unclaimed, non-huge entry ([`claim`]) and given back with one
//!   store by its holder ([`release`]); nobody else writes a claimed entry.
//! * The count of an unclaimed, non-huge entry never *overstates* the area's clear bits: the
//!   holder writes it while it still holds the claim, after its last bit set, as a recount of
//!   the bits or as the count it claimed with less the frames it took (that count did not
//!   overstate either); afterwards bits can only be cleared (frees) until the next claim. It
//!   may *understate*: a free of a 4 KiB frame clears its bit and does not touch the entry (one
//!   atomic per put); a holder's recount (when its credit runs out, or when it claims an entry
//!   that shows none) or a [`claim`]-recount-[`release`] ("refresh") by any CPU counts it.
//! * A huge allocation is one CAS from exactly (512, unclaimed, small) to huge ([`take_huge`]):
//!   the count says all 512 bits were clear when the last holder let go, nobody holds a claim,
//!   and nobody can take one until the huge frame is freed. So a huge frame never overlaps a
//!   small one, whatever the count lags behind.
//!
//! Crash consistency: the entry is not the truth of the small frames; recovery rebuilds every
//! count from the bit fields and drops every claim (only the huge flag is kept).

use crate::sync::{AtomicU16, Ordering::*};

/// 4 KiB frames per 2 MiB area.
pub const AREA_FRAMES: usize = 512;
const HUGE: u16 = 1 << 15;
const CLAIMED: u16 = 1 << 14;
const COUNT: u16 = 0x3ff;

/// Entry value of a fully free, unclaimed area.
pub const FREE: u16 = AREA_FRAMES as u16;
/// Entry value of an area allocated as one huge frame.
pub const ALLOCATED_HUGE: u16 = HUGE;

/// The decoded entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Entry(pub u16);

impl Entry {
    /// Free frames counted (a lower bound; 0 while claimed).
    pub const fn free(self) -> usize {
        (self.0 & COUNT) as usize
    }
    pub const fn huge(self) -> bool {
        self.0 & HUGE != 0
    }
    pub const fn claimed(self) -> bool {
        self.0 & CLAIMED != 0
    }
    /// Neither huge nor claimed: a CPU may claim it.
    pub const fn claimable(self) -> bool {
        self.0 & (HUGE | CLAIMED) == 0
    }
}

#[inline]
pub fn load(a: &AtomicU16) -> Entry {
    Entry(a.load(Relaxed))
}

/// Claims the area for small frames if its entry still is `seen` (which must be claimable):
/// from now on only the caller sets its bits. Acquire: the bits the last holder set before its
/// release are visible to the caller's recount.
#[inline]
pub fn claim(a: &AtomicU16, seen: Entry) -> bool {
    debug_assert!(seen.claimable());
    a.compare_exchange(seen.0, CLAIMED, AcqRel, Relaxed).is_ok()
}

/// Gives the claim back with `free` counted, which the holder read from the bits after its last
/// bit set (so it does not overstate). Release: a later claimer or huge allocation sees those
/// bit sets.
#[inline]
pub fn release(a: &AtomicU16, free: usize) {
    debug_assert!(load(a).claimed() && free <= AREA_FRAMES);
    a.store(free as u16, Release);
}

/// Allocates the whole area as a huge frame: (512, unclaimed, small) -> huge.
#[inline]
pub fn take_huge(a: &AtomicU16) -> bool {
    a.compare_exchange(FREE, ALLOCATED_HUGE, AcqRel, Relaxed)
        .is_ok()
}

/// Frees a huge frame: huge -> (512, unclaimed, small). Returns the entry seen when it was not
/// huge.
#[inline]
pub fn put_huge(a: &AtomicU16) -> Result<(), Entry> {
    a.compare_exchange(ALLOCATED_HUGE, FREE, AcqRel, Relaxed)
        .map(|_| ())
        .map_err(Entry)
}
