//! Lower level, part 2: the entry per 2 MiB area (LLFree's "child"), one `u16`: bits 0..=9 count
//! the area's free 4 KiB frames that nobody has claimed, bit 15 says "allocated as one huge
//! frame". A small allocation first claims frames here, then takes bits; a huge allocation turns
//! a fully free entry (512, not huge) into "huge" in one CAS. Because a claimed-but-not-yet-taken
//! frame and a freed-but-not-yet-counted frame both keep the count below 512, a huge allocation
//! can never overlap a small frame.

use crate::sync::{AtomicU16, Ordering::*};

/// 4 KiB frames per 2 MiB area.
pub const AREA_FRAMES: usize = 512;
const HUGE: u16 = 1 << 15;
const COUNT: u16 = 0x3ff;

/// Entry value of a fully free area.
pub const FREE: u16 = AREA_FRAMES as u16;
/// Entry value of an area allocated as one huge frame.
pub const ALLOCATED_HUGE: u16 = HUGE;

/// The decoded entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Entry(pub u16);

impl Entry {
    pub const fn free(self) -> usize {
        (self.0 & COUNT) as usize
    }
    pub const fn huge(self) -> bool {
        self.0 & HUGE != 0
    }
}

#[inline]
pub fn load(a: &AtomicU16) -> Entry {
    Entry(a.load(Relaxed))
}

/// Claims every unclaimed free frame of a small area (count n > 0 -> 0) for a CPU's local
/// credit; returns n.
#[inline]
pub fn claim_all(a: &AtomicU16) -> Option<usize> {
    let mut v = a.load(Relaxed);
    loop {
        let e = Entry(v);
        if e.huge() || e.free() == 0 {
            return None;
        }
        match a.compare_exchange(v, 0, AcqRel, Relaxed) {
            Ok(_) => return Some(e.free()),
            Err(now) => v = now,
        }
    }
}

/// Claims one free frame (count n > 0 -> n - 1), for allocations outside a reservation.
#[inline]
pub fn claim_one(a: &AtomicU16) -> bool {
    let mut v = a.load(Relaxed);
    loop {
        let e = Entry(v);
        if e.huge() || e.free() == 0 {
            return false;
        }
        match a.compare_exchange(v, v - 1, AcqRel, Relaxed) {
            Ok(_) => return true,
            Err(now) => v = now,
        }
    }
}

/// Returns `n` claimed or freed frames to the count. Never called on a huge entry: the caller
/// holds a claim or has just cleared a bit of this area, so its count is below 512.
#[inline]
pub fn add(a: &AtomicU16, n: usize) {
    a.fetch_add(n as u16, AcqRel);
}

/// Allocates the whole area as a huge frame: (512, small) -> (0, huge).
#[inline]
pub fn take_huge(a: &AtomicU16) -> bool {
    a.compare_exchange(FREE, ALLOCATED_HUGE, AcqRel, Relaxed)
        .is_ok()
}

/// Frees a huge frame: (0, huge) -> (512, small). Returns the entry seen when it was not huge.
#[inline]
pub fn put_huge(a: &AtomicU16) -> Result<(), Entry> {
    a.compare_exchange(ALLOCATED_HUGE, FREE, AcqRel, Relaxed)
        .map(|_| ())
        .map_err(Entry)
}
