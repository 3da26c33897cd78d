//! The batched operations over a region (a sparse `Morsel`), on the iovec page itself: each
//! reads the page's entries, validates each inside its one walk of the region's tables (a
//! `Leaves` cursor: one walk from the root per L1 table the batch touches, not per entry),
//! and overwrites each entry with its result: `Ok(pages)` as the page count, an error as
//! `code(error)` (the caller's ABI encoding), like the Linux module's `{res, pages}`.
//!
//! - `alloc`: maps a frame from the cache into every page of the entry that is not present
//!   (present pages are skipped); if the frames run out, the entry's new pages are given
//!   back and it fails with `NoMemory` (the entries done before it stay done).
//! - `free`: clears every present page of the entry and gives its frame to the cache. The
//!   caller invalidates ONCE for the batch (if `BatchStats::pages` > 0), then trims the cache.
//! - `alloc_fresh` (READ): as `alloc`, but every page of the entry must be unpopulated (else
//!   `Present`, and nothing of it changes) and lie below the disk's end (`PastDisk`).
//! - `collect` (WRITE): every page of the entry must be populated (else `NotPopulated`) and
//!   lie below the disk's end; changes nothing.
//!
//! Entries are done in their order in the page. Validation per entry as `Validator::validate`
//! defines it (`Empty`, `OutOfRange`, `Overflow`, `Duplicate`: overlapping an entry earlier
//! in the page); the duplicate check costs a few compares per entry, inside the same loop, for
//! entries in page order or one window that wraps around the region's end, and one sort of
//! the whole page at the first entry that breaks that order (the entries before it are saved
//! in the `Validator` as they are overwritten). ALLOC and FREE do runs of single-page entries
//! (what a buffer manager sends) in a tight loop of their own (`singles_alloc`,
//! `singles_free`) that indexes the cache's stack locally; anything else in the page goes the
//! general way, and the tight loop takes over again after it.
//! `follow(page, frame)` is told every leaf the batch maps (`Some`) or clears (`None`), a
//! rolled-back page too, for a device view that mirrors the region; a region without one
//! passes a closure that does nothing, and no record of the pages is kept.

use morsel::{Format, FrameAlloc, HostPhysAddr, Morsel, PhysMem};

use crate::cache::{must_zero, FrameCache, Origin};
use crate::iov::{decode, EntryError, Shape, Validator, COUNT_BITS, MAX_COUNT, MAX_ENTRIES};

/// Result of one entry: pages changed (or, for `collect`, pages listed), or why it failed.
pub type Outcome = Result<u64, EntryError>;

/// What a batch did.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BatchStats {
    /// Pages mapped (alloc), cleared (free) or listed (collect).
    pub pages: u64,
    /// Entries that failed.
    pub failed: u32,
    /// Pages that were mapped and cleared again inside the call (an entry rolled back):
    /// on several CPUs these need the invalidation too.
    pub rolled_back: u64,
}

/// The region a batch works on: its sparse morsel, its `Origin` for the zeroing rule, and
/// the memory its tables are in.
pub struct Region<'a, F: Format, M: PhysMem> {
    pub morsel: &'a Morsel<F>,
    pub origin: Origin,
    pub mem: &'a M,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Alloc,
    Fresh,
    Free,
    Collect,
}

/// No frame source (`free`, `collect`).
struct NoFrames;
impl FrameAlloc for NoFrames {
    fn alloc(&self, _: u32) -> Option<HostPhysAddr> {
        None
    }
    fn free(&self, _: HostPhysAddr, _: u32) {}
}

/// ALLOC (see the module doc).
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn alloc<F: Format, M: PhysMem>(
    r: &Region<F, M>,
    iov: &mut [u64],
    v: &mut Validator,
    cache: &mut FrameCache,
    frames: &impl FrameAlloc,
    follow: &mut impl FnMut(u64, Option<HostPhysAddr>),
    code: impl Fn(EntryError) -> u64,
) -> BatchStats {
    run(Mode::Alloc, r, iov, u64::MAX, v, cache, frames, follow, code)
}

/// READ's first half (see the module doc): ALLOC of entries whose pages are all unpopulated
/// and below `disk_pages`.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn alloc_fresh<F: Format, M: PhysMem>(
    r: &Region<F, M>,
    iov: &mut [u64],
    disk_pages: u64,
    v: &mut Validator,
    cache: &mut FrameCache,
    frames: &impl FrameAlloc,
    follow: &mut impl FnMut(u64, Option<HostPhysAddr>),
    code: impl Fn(EntryError) -> u64,
) -> BatchStats {
    run(Mode::Fresh, r, iov, disk_pages, v, cache, frames, follow, code)
}

/// FREE (see the module doc).
#[inline]
pub fn free<F: Format, M: PhysMem>(
    r: &Region<F, M>,
    iov: &mut [u64],
    v: &mut Validator,
    cache: &mut FrameCache,
    follow: &mut impl FnMut(u64, Option<HostPhysAddr>),
    code: impl Fn(EntryError) -> u64,
) -> BatchStats {
    run(Mode::Free, r, iov, u64::MAX, v, cache, &NoFrames, follow, code)
}

/// WRITE's check (see the module doc): entries whose pages are all populated and below
/// `disk_pages` succeed with their page count.
#[inline]
pub fn collect<F: Format, M: PhysMem>(
    r: &Region<F, M>,
    iov: &mut [u64],
    disk_pages: u64,
    v: &mut Validator,
    code: impl Fn(EntryError) -> u64,
) -> BatchStats {
    let mut cache = FrameCache::empty();
    run(Mode::Collect, r, iov, disk_pages, v, &mut cache, &NoFrames, &mut |_, _| {}, code)
}

/// Rollback marks of one entry: bit k set when the entry mapped its page `first + k`.
struct Mapped([u64; 64]);

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn run<F: Format, M: PhysMem>(
    mode: Mode,
    r: &Region<F, M>,
    iov: &mut [u64],
    disk_pages: u64,
    v: &mut Validator,
    cache: &mut FrameCache,
    frames: &impl FrameAlloc,
    follow: &mut impl FnMut(u64, Option<HostPhysAddr>),
    code: impl Fn(EntryError) -> u64,
) -> BatchStats {
    let iov = {
        let n = iov.len().min(MAX_ENTRIES);
        &mut iov[..n]
    };
    let mut stats = BatchStats::default();
    let pages = r.morsel.pages();
    let mut leaves = match r.morsel.leaves(r.mem) {
        Ok(l) => l,
        Err(_) => {
            // Not a sparse morsel: nothing to do, every entry fails.
            for e in iov.iter_mut() {
                *e = code(EntryError::OutOfRange);
            }
            stats.failed = iov.len() as u32;
            return stats;
        }
    };
    // Made (and zeroed) by the first ALLOC entry of several pages only.
    let mut mapped: Option<Mapped> = None;
    // The order of the valid entries so far; once it breaks, `sorted`: the entries are sorted
    // once and `is_duplicate` answers for the rest.
    let mut shape = Shape::new();
    let mut sorted = false;
    let mut i = 0;
    while i < iov.len() {
        if !sorted && (mode == Mode::Alloc || mode == Mode::Free) {
            // Runs of single-page entries in order: the tight loop; it stops before the first
            // entry it does not do, and the general path below does that one.
            i = match mode {
                Mode::Alloc => singles_alloc(r, &mut leaves, iov, i, v, &mut shape, cache, follow, &mut stats),
                _ => singles_free(r, &mut leaves, iov, i, v, &mut shape, cache, follow, &mut stats),
            };
            if i == iov.len() {
                break;
            }
        }
        let raw = iov[i];
        v.saved[i] = raw;
        let (first, count) = decode(raw);
        let end = first + count;
        let outcome: Outcome = if count == 0 {
            Err(EntryError::Empty)
        } else if first >= pages {
            Err(EntryError::OutOfRange)
        } else if end > pages {
            Err(EntryError::Overflow)
        } else if overlaps(v, &mut shape, &mut sorted, iov, i, first, end, pages) {
            Err(EntryError::Duplicate)
        } else if end > disk_pages {
            Err(EntryError::PastDisk)
        } else {
            match mode {
                Mode::Alloc | Mode::Fresh => populate(mode, r, &mut leaves, first, end, cache, frames, follow, &mut mapped, &mut stats),
                Mode::Free => {
                    let mut n = 0;
                    let mut res = Ok(0);
                    for page in first..end {
                        let Ok(slot) = leaves.slot(page) else {
                            // Only a morsel whose tables are not what `create_sparse` built.
                            res = Err(EntryError::OutOfRange);
                            break;
                        };
                        // By compare-and-swap: of vCPUs freeing the page at once, one gets
                        // its frame.
                        if let Some(f) = leaves.take(slot) {
                            cache.give(f, r.origin);
                            follow(page, None);
                            n += 1;
                        }
                    }
                    stats.pages += n;
                    res.map(|_| n)
                }
                Mode::Collect => {
                    let mut res = Ok(count);
                    for page in first..end {
                        match leaves.slot(page) {
                            Ok(slot) if leaves.get(slot).is_some() => {}
                            Ok(_) => {
                                res = Err(EntryError::NotPopulated);
                                break;
                            }
                            Err(_) => {
                                res = Err(EntryError::OutOfRange);
                                break;
                            }
                        }
                    }
                    if res.is_ok() {
                        stats.pages += count;
                    }
                    res
                }
            }
        };
        iov[i] = match outcome {
            Ok(n) => n,
            Err(err) => {
                stats.failed += 1;
                code(err)
            }
        };
        i += 1;
    }
    stats
}

/// The ALLOC fast path from entry `i` on: entries of one page each, below the region's end,
/// that keep the `shape` (so none overlaps an earlier one), while the cache holds a frame.
/// The same as the general path for those entries (result 1, or 0 for a page that is already
/// present), with the cache's stack indexed locally. Returns the first entry not done.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn singles_alloc<F: Format, M: PhysMem>(
    r: &Region<F, M>,
    leaves: &mut morsel::Leaves<'_, F, M>,
    iov: &mut [u64],
    mut i: usize,
    v: &mut Validator,
    shape: &mut Shape,
    cache: &mut FrameCache,
    follow: &mut impl FnMut(u64, Option<HostPhysAddr>),
    stats: &mut BatchStats,
) -> usize {
    let pages = r.morsel.pages();
    let mut held = cache.held();
    let had = held.len();
    let mut zeroed = 0;
    while i < iov.len() && !held.is_empty() {
        let raw = iov[i];
        let page = raw >> COUNT_BITS;
        if raw & MAX_COUNT != 1 || page >= pages {
            break;
        }
        let Ok(slot) = leaves.slot(page) else { break };
        // Nothing changed yet for this entry: a break here leaves it to the general path.
        if !shape.next(page, page + 1) {
            break;
        }
        v.saved[i] = raw;
        let Some((&(f, origin), rest)) = held.split_last() else { break };
        let zero = must_zero(origin, r.origin);
        // No read before the swap (it fails on a present page), but a frame is zeroed only
        // for a page that was not present.
        iov[i] = if zero && leaves.get(slot).is_some() {
            0
        } else {
            if zero {
                r.mem.zero_data(f, 0);
                zeroed += 1;
            }
            match leaves.try_map(slot, f) {
                true => {
                    held = rest;
                    follow(page, Some(f));
                    1
                }
                // Present already, or another vCPU mapped it first: already populated; the
                // frame stays on top of the cache.
                false => 0,
            }
        };
        i += 1;
    }
    // Every frame taken was mapped.
    stats.pages += (had - held.len()) as u64;
    cache.keep(held.len(), zeroed);
    i
}

/// The FREE fast path from entry `i` on, as `singles_alloc`, while the cache has room
/// without growing. Returns the first entry not done.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn singles_free<F: Format, M: PhysMem>(
    r: &Region<F, M>,
    leaves: &mut morsel::Leaves<'_, F, M>,
    iov: &mut [u64],
    mut i: usize,
    v: &mut Validator,
    shape: &mut Shape,
    cache: &mut FrameCache,
    follow: &mut impl FnMut(u64, Option<HostPhysAddr>),
    stats: &mut BatchStats,
) -> usize {
    let pages = r.morsel.pages();
    let room = cache.room();
    let mut gave = 0;
    while i < iov.len() && gave < room.len() {
        let raw = iov[i];
        let page = raw >> COUNT_BITS;
        if raw & MAX_COUNT != 1 || page >= pages {
            break;
        }
        let Ok(slot) = leaves.slot(page) else { break };
        if !shape.next(page, page + 1) {
            break;
        }
        v.saved[i] = raw;
        iov[i] = match leaves.take(slot) {
            Some(f) => {
                room[gave].write((f, r.origin));
                gave += 1;
                follow(page, None);
                1
            }
            None => 0,
        };
        i += 1;
    }
    // SAFETY: the loop wrote the first `gave` slots of `room`.
    unsafe { cache.gave(gave) };
    stats.pages += gave as u64;
    i
}

/// Whether the valid entry `i` (`first .. end`) overlaps an entry earlier in the page. While
/// the entries keep the `shape` (page order, or one wrapped window), none does; at the first
/// that breaks it, the page is sorted once from `saved` (the entries before `i` are saved
/// there, `iov` holds their results now) and `sorted` is set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn overlaps(v: &mut Validator, shape: &mut Shape, sorted: &mut bool, iov: &[u64], i: usize, first: u64, end: u64, pages: u64) -> bool {
    if !*sorted {
        if shape.next(first, end) {
            return false;
        }
        v.saved[i..iov.len()].copy_from_slice(&iov[i..]);
        v.sort_saved(iov.len(), pages);
        *sorted = true;
    }
    v.is_duplicate(i)
}

/// ALLOC / READ of one valid entry `first .. end`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn populate<F: Format, M: PhysMem>(
    mode: Mode,
    r: &Region<F, M>,
    leaves: &mut morsel::Leaves<'_, F, M>,
    first: u64,
    end: u64,
    cache: &mut FrameCache,
    frames: &impl FrameAlloc,
    follow: &mut impl FnMut(u64, Option<HostPhysAddr>),
    mapped: &mut Option<Mapped>,
    stats: &mut BatchStats,
) -> Outcome {
    // Pages mapped so far; only an ALLOC of several pages needs to know which (a READ maps
    // every page, a single page has nothing to roll back but itself).
    let track = mode == Mode::Alloc && end - first > 1;
    let mut marks: &mut [u64] = &mut [];
    if track {
        marks = &mut mapped.get_or_insert(Mapped([0; 64])).0[..((end - first - 1) / 64 + 1) as usize];
        marks.fill(0);
    }
    let mut n = 0;
    let mut failed = None;
    let mut page = first;
    while page < end {
        let Ok(slot) = leaves.slot(page) else {
            failed = Some(EntryError::OutOfRange);
            break;
        };
        if leaves.get(slot).is_some() {
            if mode == Mode::Fresh {
                failed = Some(EntryError::Present);
                break;
            }
        } else {
            let Some((f, zero)) = cache.take(r.origin, frames) else {
                failed = Some(EntryError::NoMemory);
                break;
            };
            if zero {
                r.mem.zero_data(f, 0);
            }
            if !leaves.try_map(slot, f) {
                // Another vCPU mapped the page since the read: as a present page; the frame
                // goes back where it came from (room: it was just taken), zeroed or of this
                // region.
                cache.give(f, r.origin);
                if mode == Mode::Fresh {
                    failed = Some(EntryError::Present);
                    break;
                }
                page += 1;
                continue;
            }
            follow(page, Some(f));
            if track {
                let k = page - first;
                marks[(k / 64) as usize] |= 1 << (k % 64);
            }
            n += 1;
        }
        page += 1;
    }
    let Some(err) = failed else {
        stats.pages += n;
        return Ok(n);
    };
    // Undo this entry only: the pages it mapped (a READ: every page before `page`).
    if n > 0 {
        for p in first..page {
            let ours = !track || marks[((p - first) / 64) as usize] >> ((p - first) % 64) & 1 != 0;
            if !ours {
                continue;
            }
            if let Ok(slot) = leaves.slot(p) {
                // Whatever the leaf maps now (another vCPU may have freed and mapped it
                // since): one CPU gets each frame.
                if let Some(f) = leaves.take(slot) {
                    cache.give(f, r.origin);
                    follow(p, None);
                }
            }
        }
    }
    stats.rolled_back += n;
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::BUNDLE;
    use crate::iov::{check, encode};
    use morsel::{Npt, SimMem};
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::collections::{HashMap, HashSet};

    /// SimMem that records which frames were zeroed.
    struct Zeroes<'a>(&'a SimMem, RefCell<Vec<HostPhysAddr>>);
    impl PhysMem for Zeroes<'_> {
        fn read(&self, t: HostPhysAddr, i: usize) -> u64 {
            self.0.read(t, i)
        }
        fn write(&self, t: HostPhysAddr, i: usize, v: u64) {
            self.0.write(t, i, v)
        }
        fn zero_table(&self, t: HostPhysAddr) {
            self.0.zero_table(t)
        }
        fn zero_data(&self, f: HostPhysAddr, o: u32) {
            self.0.zero_data(f, o);
            self.1.borrow_mut().push(f)
        }
    }

    /// The tests' result encoding of an error: the top bit and the variant.
    fn code(e: EntryError) -> u64 {
        1 << 63 | e as u64
    }
    fn enc(o: Outcome) -> u64 {
        o.unwrap_or_else(code)
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Op {
        Alloc,
        Free,
        Read(u64),
        Write(u64),
    }

    /// The reference: every entry checked against the definition (pairwise for overlaps
    /// with earlier entries), then done in page order over a set of populated pages.
    fn reference(op: Op, raw: &[u64], pages: u64, populated: &mut HashSet<u64>) -> Vec<Outcome> {
        let valid: Vec<Option<(u64, u64)>> = raw.iter().map(|&r| check(r, pages).ok().map(|r| (r.first, r.end()))).collect();
        let mut out = Vec::new();
        for (i, &r) in raw.iter().enumerate() {
            let o = check(r, pages).and_then(|rg| {
                let (a, b) = (rg.first, rg.end());
                if valid[..i].iter().flatten().any(|&(c, d)| c < b && a < d) {
                    return Err(EntryError::Duplicate);
                }
                let present = (a..b).filter(|p| populated.contains(p)).count() as u64;
                match op {
                    Op::Read(disk) | Op::Write(disk) if b > disk => Err(EntryError::PastDisk),
                    Op::Alloc => {
                        populated.extend(a..b);
                        Ok(rg.count - present)
                    }
                    Op::Read(_) if present > 0 => Err(EntryError::Present),
                    Op::Read(_) => {
                        populated.extend(a..b);
                        Ok(rg.count)
                    }
                    Op::Free => {
                        (a..b).for_each(|p| { populated.remove(&p); });
                        Ok(present)
                    }
                    Op::Write(_) if present < rg.count => Err(EntryError::NotPopulated),
                    Op::Write(_) => Ok(rg.count),
                }
            });
            out.push(o);
        }
        out
    }

    /// A batch of entries, shaped as guests send them: any order, in page order (overlaps
    /// possible), a window of single pages that wraps around the region's end, or entries
    /// in page order that wrap once.
    fn entries(pages: u64) -> impl Strategy<Value = Vec<u64>> {
        let any = prop::collection::vec((0u64..pages + 100, 0u64..40), 1..60)
            .prop_map(|v| v.into_iter().map(|(p, c)| encode(p, c)).collect::<Vec<_>>());
        let sorted = any.clone().prop_map(|mut v| {
            v.sort_by_key(|&e| e >> 12);
            v
        });
        let window = (0..pages, 1u64..9, 1usize..200).prop_map(move |(base, stride, n)| {
            (0..n as u64).map(|k| encode((base + k * stride) % pages, 1)).collect::<Vec<_>>()
        });
        let runs = (0..pages, prop::collection::vec((1u64..20, 1u64..4), 1..80)).prop_map(move |(base, steps)| {
            let mut p = base;
            steps.iter().map(|&(gap, c)| {
                p = (p + gap + c) % pages;
                encode(p, c)
            }).collect::<Vec<_>>()
        });
        prop_oneof![any, sorted, window, runs]
    }

    fn ops() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Alloc),
            3 => Just(Op::Free),
            1 => (900u64..1200).prop_map(Op::Read),
            1 => (900u64..1200).prop_map(Op::Write),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// The batch operations against the reference on random batches: each entry's result
        /// in the iovec page, the region's translations, the pages the device view is told
        /// of, frames never mapped twice, and every frame back at the end. The region spans
        /// three L1 tables, so entries cross tables and a batch returns to tables it left.
        #[test]
        fn batches_match_the_reference(batches in prop::collection::vec((ops(), entries(1100)), 1..25)) {
            let sim = SimMem::new(4 << 30);
            let m = Morsel::<Npt>::create_sparse(1100 * 4096, &sim, &sim).unwrap();
            let r = Region { morsel: &m, origin: 7, mem: &sim };
            let mut populated = HashSet::new();
            let mut view: HashMap<u64, HostPhysAddr> = HashMap::new();
            let (mut v, mut cache) = (Validator::new(), FrameCache::new());
            for (op, raw) in &batches {
                let want = reference(*op, raw, m.pages(), &mut populated);
                let mut iov = raw.clone();
                let mut bad = None;
                let mut f = |p: u64, f: Option<HostPhysAddr>| {
                    let ok = match f {
                        Some(f) => view.insert(p, f).is_none(),
                        None => view.remove(&p).is_some(),
                    };
                    if !ok {
                        bad.get_or_insert(p);
                    }
                };
                let s = match op {
                    Op::Alloc => alloc(&r, &mut iov, &mut v, &mut cache, &sim, &mut f, code),
                    Op::Read(d) => alloc_fresh(&r, &mut iov, *d, &mut v, &mut cache, &sim, &mut f, code),
                    Op::Free => free(&r, &mut iov, &mut v, &mut cache, &mut f, code),
                    Op::Write(d) => collect(&r, &mut iov, *d, &mut v, code),
                };
                prop_assert_eq!(bad, None, "the view was told of a page twice");
                let want_enc: Vec<u64> = want.iter().map(|&o| enc(o)).collect();
                prop_assert_eq!(&iov, &want_enc, "{:?} of {:x?}", op, raw);
                prop_assert_eq!(s.failed as usize, want.iter().filter(|o| o.is_err()).count());
                prop_assert_eq!(s.pages, want.iter().map(|o| o.unwrap_or(0)).sum::<u64>());
                if *op == Op::Free { cache.trim(&sim); }
                let mut seen = HashSet::new();
                for p in 0..m.pages() {
                    let t = m.translate(p * 4096, &sim);
                    prop_assert_eq!(t.is_some(), populated.contains(&p), "page {}", p);
                    prop_assert_eq!(t, view.get(&p).copied(), "the view of page {}", p);
                    if let Some(f) = t { prop_assert!(seen.insert(f), "frame mapped twice"); }
                }
            }
            let mut all = vec![encode(0, 1100 / 2), encode(550, 1100 - 550)];
            free(&r, &mut all, &mut v, &mut cache, &mut |_, _| {}, code);
            cache.drain(&sim);
            m.destroy(&sim, &sim).unwrap();
            prop_assert_eq!(sim.allocated_frames(), 0);
        }
    }

    /// The single-page fast paths stop where the cache runs dry (ALLOC: the general path
    /// refills it) or full (FREE: the general path grows it) and go on after that entry.
    #[test]
    fn fast_paths_hand_over_at_an_empty_or_full_cache() {
        let sim = SimMem::new(4 << 30);
        let m = Morsel::<Npt>::create_sparse(4096 << 12, &sim, &sim).unwrap();
        let r = Region { morsel: &m, origin: 1, mem: &sim };
        let (mut v, mut cache) = (Validator::new(), FrameCache::new());
        let room = cache.room().len();
        let batch = |k: u64| (0..500).map(|p| encode(k * 500 + p, 1)).collect::<Vec<_>>();
        let mut view = 0i64;
        for k in 0..4 {
            let mut iov = batch(k);
            let s = alloc(&r, &mut iov, &mut v, &mut cache, &sim, &mut |_, f| view += f.is_some() as i64, code);
            assert_eq!((s.pages, s.failed), (500, 0));
            assert!(iov.iter().all(|&e| e == 1));
        }
        assert_eq!(view, 2000);
        assert_eq!(cache.stats().refills, 4, "dry at every 512th page");
        for k in 0..4 {
            let mut iov = batch(k);
            let s = free(&r, &mut iov, &mut v, &mut cache, &mut |_, f| view -= f.is_none() as i64, code);
            assert_eq!((s.pages, s.failed), (500, 0));
            assert!(iov.iter().all(|&e| e == 1));
        }
        assert!(cache.len() > room, "the third FREE ran out of room ({room}) and went on");
        assert_eq!((view, cache.len()), (0, 2048));
        assert!((0..2000).all(|p| m.translate(p << 12, &sim).is_none()));
        cache.drain(&sim);
        m.destroy(&sim, &sim).unwrap();
        assert_eq!(sim.allocated_frames(), 0);
    }

    #[test]
    fn zeroing_only_across_regions_and_for_fresh_frames() {
        let sim = SimMem::new(4 << 30);
        let mem = Zeroes(&sim, RefCell::new(Vec::new()));
        let a = Morsel::<Npt>::create_sparse(64 << 12, &sim, &mem).unwrap();
        let b = Morsel::<Npt>::create_sparse(64 << 12, &sim, &mem).unwrap();
        let (ra, rb) = (Region { morsel: &a, origin: 1, mem: &mem }, Region { morsel: &b, origin: 2, mem: &mem });
        let (mut v, mut cache) = (Validator::new(), FrameCache::new());
        let all = || vec![encode(0, 64)];
        alloc(&ra, &mut all(), &mut v, &mut cache, &sim, &mut |_, _| {}, code);
        assert_eq!(mem.1.borrow().len(), 64, "fresh frames are zeroed");
        free(&ra, &mut all(), &mut v, &mut cache, &mut |_, _| {}, code);
        alloc(&ra, &mut all(), &mut v, &mut cache, &sim, &mut |_, _| {}, code);
        assert_eq!(mem.1.borrow().len(), 64, "back into the same region: not zeroed");
        free(&ra, &mut all(), &mut v, &mut cache, &mut |_, _| {}, code);
        let mut got = Vec::new();
        alloc(&rb, &mut all(), &mut v, &mut cache, &sim, &mut |_, f| got.push(f.unwrap()), code);
        let zeroed = mem.1.borrow().clone();
        assert_eq!(zeroed.len(), 128, "into another region: zeroed");
        assert!(got.iter().all(|f| zeroed[64..].contains(f)));
        free(&rb, &mut all(), &mut v, &mut cache, &mut |_, _| {}, code);
        cache.drain(&sim);
        a.destroy(&sim, &sim).unwrap();
        b.destroy(&sim, &sim).unwrap();
        assert_eq!(sim.allocated_frames(), 0);
    }

    #[test]
    fn out_of_memory_fails_the_entry_alone_and_collect_needs_every_page() {
        let sim = SimMem::new(4 << 30);
        let m = Morsel::<Npt>::create_sparse(4096 << 12, &sim, &sim).unwrap();
        let r = Region { morsel: &m, origin: 1, mem: &sim };
        sim.limit_free(BUNDLE as u64 + 10);
        let (mut v, mut cache) = (Validator::new(), FrameCache::new());
        // Page 101 is populated before: the failed entry must keep it.
        let mut iov = [encode(101, 1)];
        alloc(&r, &mut iov, &mut v, &mut cache, &sim, &mut |_, _| {}, code);
        let kept = m.translate(101 << 12, &sim);
        let mut iov = [encode(0, 8), encode(100, 3000), encode(4090, 2)];
        let mut view = 0i64;
        let s = alloc(&r, &mut iov, &mut v, &mut cache, &sim, &mut |_, f| view += if f.is_some() { 1 } else { -1 }, code);
        assert_eq!(iov, [8, code(EntryError::NoMemory), 2]);
        assert_eq!((s.pages, s.failed), (10, 1));
        assert!(s.rolled_back > 0);
        assert_eq!(view, 10, "the view saw the rolled-back pages come and go");
        assert_eq!(m.translate(100 << 12, &sim), None, "the failed entry left nothing mapped");
        assert_eq!(m.translate(102 << 12, &sim), None);
        assert_eq!(m.translate(101 << 12, &sim), kept, "but kept what was there");
        let mut iov = [encode(0, 8), encode(8, 4), encode(4090, 2), encode(4095, 2), encode(0, 1)];
        let s = collect(&r, &mut iov, 4091, &mut v, code);
        assert_eq!(iov, [8, code(EntryError::NotPopulated), code(EntryError::PastDisk), code(EntryError::Overflow), code(EntryError::Duplicate)]);
        assert_eq!(s.pages, 8);
        free(&r, &mut [encode(0, 4095)], &mut v, &mut cache, &mut |_, _| {}, code);
        cache.drain(&sim);
        m.destroy(&sim, &sim).unwrap();
        assert_eq!(sim.allocated_frames(), 0);
    }

    #[test]
    fn alloc_fresh_refuses_present_pages_and_maps_nothing_of_them() {
        let sim = SimMem::new(4 << 30);
        let m = Morsel::<Npt>::create_sparse(64 << 12, &sim, &sim).unwrap();
        let r = Region { morsel: &m, origin: 1, mem: &sim };
        let (mut v, mut cache) = (Validator::new(), FrameCache::new());
        alloc(&r, &mut [encode(6, 1)], &mut v, &mut cache, &sim, &mut |_, _| {}, code);
        let six = m.translate(6 << 12, &sim);
        let mut iov = [encode(0, 4), encode(4, 4), encode(10, 2), encode(70, 1)];
        let mut seen = Vec::new();
        let s = alloc_fresh(&r, &mut iov, 64, &mut v, &mut cache, &sim, &mut |p, f| seen.push((p, f.is_some())), code);
        assert_eq!(iov, [4, code(EntryError::Present), 2, code(EntryError::OutOfRange)]);
        assert_eq!((s.pages, s.failed, s.rolled_back), (6, 2, 2));
        let maps: Vec<u64> = seen.iter().filter(|s| s.1).map(|s| s.0).collect();
        assert_eq!(maps, [0, 1, 2, 3, 4, 5, 10, 11], "pages 4 and 5 were mapped, then rolled back");
        assert_eq!(m.translate(4 << 12, &sim), None, "the refused entry mapped nothing");
        assert_eq!(m.translate(6 << 12, &sim), six, "and kept the present page");
        free(&r, &mut [encode(0, 64)], &mut v, &mut cache, &mut |_, _| {}, code);
        cache.drain(&sim);
        m.destroy(&sim, &sim).unwrap();
        assert_eq!(sim.allocated_frames(), 0);
    }
}
