//! The iovec page: up to `MAX_ENTRIES` little-endian u64 entries, each `page << 12 | count`
//! (page index inside the region: 52 bits; page count: 12 bits, 1..=4095), and their
//! validation. Every entry is checked on its own: a count of 0, a first page past the region
//! (`OutOfRange`), a range that runs past its end (`Overflow`) and a range that overlaps an
//! entry earlier in the page (`Duplicate`) fail that entry alone.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Entries in one 4 KiB iovec page.
pub const MAX_ENTRIES: usize = 512;
/// Bits of the page count in an entry.
pub const COUNT_BITS: u32 = 12;
/// Largest page count of one entry.
pub const MAX_COUNT: u64 = (1 << COUNT_BITS) - 1;

/// The entry for `count` pages from page `page` (`page` below 2^52, `count` up to `MAX_COUNT`;
/// higher bits are cut off).
pub const fn encode(page: u64, count: u64) -> u64 {
    page << COUNT_BITS | (count & MAX_COUNT)
}

/// (page, count) of an entry.
pub const fn decode(raw: u64) -> (u64, u64) {
    (raw >> COUNT_BITS, raw & MAX_COUNT)
}

/// Pages `first .. first + count` of a region.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Range {
    pub first: u64,
    pub count: u64,
}

impl Range {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// Why one entry failed (the others are done regardless).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EntryError {
    /// A page count of 0.
    Empty,
    /// The first page is past the region's end.
    OutOfRange,
    /// The range starts inside the region but runs past its end.
    Overflow,
    /// The range overlaps an entry earlier in the same page.
    Duplicate,
    /// No frame left for this entry (its pages are given back; earlier entries stay done).
    NoMemory,
    /// WRITE of a page that is not populated.
    NotPopulated,
    /// The device failed the entry's I/O.
    Device,
    /// READ of a range with a page that is already populated.
    Present,
    /// READ or WRITE of a range that reaches past the disk's end.
    PastDisk,
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryError::Empty => "page count 0",
            EntryError::OutOfRange => "first page past the region",
            EntryError::Overflow => "range runs past the region",
            EntryError::Duplicate => "overlaps an earlier entry",
            EntryError::NoMemory => "out of frames",
            EntryError::NotPopulated => "a page is not populated",
            EntryError::Device => "device error",
            EntryError::Present => "a page is already populated",
            EntryError::PastDisk => "range runs past the disk",
        })
    }
}

/// Validates iovec pages; keeps its buffers between calls (one per vCPU, no allocation in
/// the steady state). The batch operations (`batch`) validate inside their walk: they follow
/// the order of the entries with a `Shape` as they go and, only for input that is not in page
/// order, sort once (`sort_saved`) from the copy of the raw entries they keep in `saved`;
/// `validate` checks a whole page up front (the definition the batch operations are tested
/// against).
pub struct Validator {
    checked: Vec<Result<Range, EntryError>>,
    sorted: Vec<(u64, u64, u16)>,
    /// Entries (by index) that overlap an earlier entry, from the last sort.
    dup: [u64; MAX_ENTRIES / 64],
    /// The raw entries of the batch running now, saved as the batch overwrites them with
    /// results (a sort midway needs the entries already done). On the heap: a vCPU's
    /// validator is built on small hypervisor stacks.
    pub(crate) saved: Box<[u64; MAX_ENTRIES]>,
}

impl Default for Validator {
    fn default() -> Self {
        // Zeroed on the heap, never a 4 KiB array on the stack.
        let saved = match vec![0; MAX_ENTRIES].into_boxed_slice().try_into() {
            Ok(s) => s,
            Err(_) => unreachable!("MAX_ENTRIES long"),
        };
        Self { checked: Vec::new(), sorted: Vec::new(), dup: [0; MAX_ENTRIES / 64], saved }
    }
}

/// The order of the valid entries seen so far, followed one entry at a time without looking
/// back: ascending and disjoint, or two such runs where the second lies wholly below the
/// first (a window that wrapped around the region's end). While `next` says yes, no entry
/// seen overlaps another.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    /// The first valid entry's first page (the floor of a wrapped second run).
    floor: u64,
    /// The end of the entry before.
    prev_end: u64,
    /// The ceiling of the run: `u64::MAX` before the wrap, the floor after it.
    ceil: u64,
}

impl Shape {
    pub(crate) const fn new() -> Self {
        Self { floor: u64::MAX, prev_end: 0, ceil: u64::MAX }
    }

    /// Takes the next valid entry `first .. end`; false when it breaks the shape (then the
    /// shape is of no further use).
    #[inline(always)]
    pub(crate) fn next(&mut self, first: u64, end: u64) -> bool {
        if self.floor == u64::MAX {
            self.floor = first;
        }
        if first >= self.prev_end && end <= self.ceil {
            self.prev_end = end;
            true
        } else if self.ceil == u64::MAX && end <= self.floor {
            // The wrap (once: a valid entry's end is below `u64::MAX`).
            self.ceil = self.floor;
            self.prev_end = end;
            true
        } else {
            false
        }
    }
}

/// How the valid entries of an iovec page are ordered (`Validator::order`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    /// Ascending and disjoint, or two such runs where the second lies wholly below the
    /// first (a window that wrapped around the region's end): no entry overlaps another,
    /// nothing was sorted.
    Disjoint,
    /// Anything else: sorted, and `Validator::is_duplicate` says which entries overlap an
    /// earlier one.
    Sorted,
}

impl Validator {
    /// A validator with room for a full page.
    pub fn new() -> Self {
        Self { checked: Vec::with_capacity(MAX_ENTRIES), sorted: Vec::with_capacity(MAX_ENTRIES), ..Self::default() }
    }

    /// `new` without the allocation panic: None if the heap cannot hold its room (for a
    /// validator a guest's call makes the hypervisor build).
    pub fn try_new() -> Option<Self> {
        let (mut checked, mut sorted, mut saved) = (Vec::new(), Vec::new(), Vec::new());
        checked.try_reserve_exact(MAX_ENTRIES).ok()?;
        sorted.try_reserve_exact(MAX_ENTRIES).ok()?;
        saved.try_reserve_exact(MAX_ENTRIES).ok()?;
        saved.resize(MAX_ENTRIES, 0);
        // Exactly `MAX_ENTRIES` long and as long as its capacity: no reallocation.
        let saved = saved.into_boxed_slice().try_into().ok()?;
        Some(Self { checked, sorted, dup: [0; MAX_ENTRIES / 64], saved })
    }

    /// Finds how the valid entries of `raw` (at most `MAX_ENTRIES`) are ordered, in one pass
    /// that only compares; only input that is neither in page order nor one wrapped window
    /// is sorted, to find the entries that overlap an earlier one (`is_duplicate`). Entries
    /// with a count of 0 or past `pages` take no part (they fail on their own).
    #[inline]
    pub fn order(&mut self, raw: &[u64], pages: u64) -> Order {
        let raw = &raw[..raw.len().min(MAX_ENTRIES)];
        let mut shape = Shape::new();
        for &r in raw {
            let (first, count) = decode(r);
            let end = first + count;
            if count == 0 || end > pages {
                continue;
            }
            if !shape.next(first, end) {
                self.sort(raw, pages);
                return Order::Sorted;
            }
        }
        Order::Disjoint
    }

    /// After `order` answered `Sorted` (or after `sort_saved`): whether entry `i` overlaps an
    /// entry with a smaller index (valid or itself a duplicate).
    #[inline]
    pub fn is_duplicate(&self, i: usize) -> bool {
        self.dup[i / 64] >> (i % 64) & 1 != 0
    }

    /// `sort` over the first `n` entries of `saved` (a batch whose entries stopped being in
    /// page order: it has saved every entry so far and copies the rest in first).
    #[cold]
    #[inline(never)]
    pub(crate) fn sort_saved(&mut self, n: usize, pages: u64) {
        mark_overlaps(&mut self.sorted, &mut self.dup, &self.saved[..n], pages);
    }

    /// Sorts the valid entries and marks every entry that overlaps one with a smaller index.
    #[cold]
    fn sort(&mut self, raw: &[u64], pages: u64) {
        mark_overlaps(&mut self.sorted, &mut self.dup, raw, pages);
    }

    /// Checks every entry of `raw` (at most `MAX_ENTRIES`; more are cut off) against a region
    /// of `pages` pages. An entry that overlaps an entry with a smaller index fails as
    /// `Duplicate`, whether that one is valid or itself a duplicate; the first stays valid.
    /// Costs O(n) for entries sorted by page (the usual case), else O(n log n + overlaps).
    pub fn validate(&mut self, raw: &[u64], pages: u64) -> &[Result<Range, EntryError>] {
        let raw = &raw[..raw.len().min(MAX_ENTRIES)];
        self.checked.clear();
        let order = self.order(raw, pages);
        for (i, &r) in raw.iter().enumerate() {
            self.checked.push(check(r, pages).and_then(|r| match order == Order::Sorted && self.is_duplicate(i) {
                true => Err(EntryError::Duplicate),
                false => Ok(r),
            }));
        }
        &self.checked
    }
}

/// `Validator::sort` on the validator's buffers.
fn mark_overlaps(sorted: &mut Vec<(u64, u64, u16)>, dup: &mut [u64; MAX_ENTRIES / 64], raw: &[u64], pages: u64) {
    sorted.clear();
    *dup = [0; MAX_ENTRIES / 64];
    for (i, &r) in raw.iter().enumerate() {
        let (first, count) = decode(r);
        if count != 0 && first + count <= pages {
            sorted.push((first, first + count, i as u16));
        }
    }
    sorted.sort_unstable();
    let s = &*sorted;
    for i in 0..s.len() {
        let mut j = i + 1;
        while j < s.len() && s[j].0 < s[i].1 {
            let later = s[i].2.max(s[j].2) as usize;
            dup[later / 64] |= 1 << (later % 64);
            j += 1;
        }
    }
}

/// An entry checked on its own: count 0 (`Empty`), first page past the region
/// (`OutOfRange`), running past its end (`Overflow`).
#[inline]
pub fn check(raw: u64, pages: u64) -> Result<Range, EntryError> {
    let (first, count) = decode(raw);
    if count == 0 {
        Err(EntryError::Empty)
    } else if first >= pages {
        Err(EntryError::OutOfRange)
    } else if first + count > pages {
        // `first` < 2^52 and `count` < 2^12: the sum cannot wrap.
        Err(EntryError::Overflow)
    } else {
        Ok(Range { first, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encoding_round_trips_and_cuts_off() {
        assert_eq!(decode(encode(7, 3)), (7, 3));
        assert_eq!(decode(encode((1 << 52) - 1, MAX_COUNT)), ((1 << 52) - 1, 4095));
        assert_eq!(encode(1, 4096), 1 << 12, "count 4096 does not fit: it reads as 0");
    }

    #[test]
    fn try_new_has_the_room_of_new() {
        let (a, b) = (Validator::new(), Validator::try_new().expect("a host heap holds it"));
        for v in [&a, &b] {
            assert!(v.checked.capacity() >= MAX_ENTRIES && v.sorted.capacity() >= MAX_ENTRIES);
            assert!(v.saved.iter().all(|&e| e == 0) && v.dup == [0; MAX_ENTRIES / 64]);
        }
    }

    #[test]
    fn bad_entries_fail_alone() {
        for v in [Validator::new(), Validator::try_new().expect("a host heap holds it")] {
            bad_entries_fail_alone_with(v);
        }
    }

    fn bad_entries_fail_alone_with(mut v: Validator) {
        let raw = [encode(0, 4), encode(0, 0), encode(100, 1), encode(98, 4), encode(2, 1), encode(10, 2), u64::MAX];
        let c = v.validate(&raw, 100).to_vec();
        assert_eq!(c[0], Ok(Range { first: 0, count: 4 }));
        assert_eq!(c[1], Err(EntryError::Empty));
        assert_eq!(c[2], Err(EntryError::OutOfRange));
        assert_eq!(c[3], Err(EntryError::Overflow));
        assert_eq!(c[4], Err(EntryError::Duplicate), "page 2 is inside entry 0");
        assert_eq!(c[5], Ok(Range { first: 10, count: 2 }));
        assert_eq!(c[6], Err(EntryError::OutOfRange));
        // The earlier entry wins even when it comes later in page order.
        let c = v.validate(&[encode(50, 10), encode(45, 6), encode(60, 1)], 100).to_vec();
        assert_eq!(c, [Ok(Range { first: 50, count: 10 }), Err(EntryError::Duplicate), Ok(Range { first: 60, count: 1 })]);
        // More than a page's worth is cut off.
        assert_eq!(v.validate(&[encode(0, 1); 600], 10).len(), MAX_ENTRIES);
    }

    #[test]
    fn order_sorts_only_what_is_out_of_order() {
        let mut v = Validator::new();
        let e = |p| encode(p, 2);
        assert_eq!(v.order(&[e(0), e(2), e(10), 0, e(500)], 100), Order::Disjoint, "ascending; invalid entries skipped");
        assert_eq!(v.order(&[e(50), e(60), e(0), e(10)], 100), Order::Disjoint, "one wrapped window");
        assert_eq!(v.order(&[e(50), e(60), e(0), e(49)], 100), Order::Sorted, "the second run reaches into the first");
        assert!(v.is_duplicate(3) && !v.is_duplicate(0));
        assert_eq!(v.order(&[e(50), e(0), e(60)], 100), Order::Sorted, "a third run");
        assert!(!v.is_duplicate(0) && !v.is_duplicate(1) && !v.is_duplicate(2));
        assert_eq!(v.order(&[e(50), e(51)], 100), Order::Sorted);
        assert!(v.is_duplicate(1));
    }

    proptest! {
        /// The validator agrees with the definition, checked pair by pair.
        #[test]
        fn matches_the_definition(entries in prop::collection::vec((0u64..80, 0u64..12), 0..80), pages in 1u64..80) {
            let raw: Vec<u64> = entries.iter().map(|&(p, c)| encode(p, c)).collect();
            let mut v = Validator::new();
            let got = v.validate(&raw, pages).to_vec();
            for (i, &(p, c)) in entries.iter().enumerate() {
                let valid = |p: u64, c: u64| c > 0 && p + c <= pages;
                let want = if c == 0 { Err(EntryError::Empty) }
                    else if p >= pages { Err(EntryError::OutOfRange) }
                    else if p + c > pages { Err(EntryError::Overflow) }
                    else if entries[..i].iter().any(|&(q, d)| valid(q, d) && q < p + c && p < q + d) { Err(EntryError::Duplicate) }
                    else { Ok(Range { first: p, count: c }) };
                prop_assert_eq!(got[i], want, "entry {}", i);
            }
        }
    }
}
