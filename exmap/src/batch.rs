//! The batched operations over a region (a sparse `Morsel`), entry by entry from what
//! `Validator::validate` checked. Each writes a result per entry into `out` and lists the
//! pages it changed in `changed` (for a VT-d view to follow, and for READ's I/O):
//!
//! - `alloc`: maps a frame from the cache into every page of the entry that is not present
//!   (present pages are skipped); if the frames run out, the entry's new pages are given
//!   back and it fails with `NoMemory` (entries before it stay done).
//! - `free`: clears every present page of the entry and gives its frame to the cache. The
//!   caller invalidates ONCE for the batch (if `BatchStats::pages` > 0), then trims the cache.
//! - `alloc_fresh` (READ): as `alloc`, but every page of the entry must be unpopulated: an
//!   entry with a present page fails with `Present` and changes nothing, so that `changed`
//!   lists exactly the entry's pages, in order, for the device to read into.
//! - `collect`: the frames of the entry's pages, all of which must be present (WRITE).

use alloc::vec::Vec;
use morsel::{Format, FrameAlloc, HostPhysAddr, LeafEdit, Morsel, PhysMem};

use crate::cache::{FrameCache, Origin};
use crate::iov::{EntryError, Range};

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

/// ALLOC (see the module doc). `region` is the region's `Origin` for the zeroing rule.
#[allow(clippy::too_many_arguments)]
pub fn alloc<F: Format>(
    m: &Morsel<F>,
    region: Origin,
    checked: &[Result<Range, EntryError>],
    out: &mut Vec<Outcome>,
    cache: &mut FrameCache,
    frames: &impl FrameAlloc,
    mem: &impl PhysMem,
    changed: &mut Vec<(u64, HostPhysAddr)>,
) -> BatchStats {
    populate(m, region, checked, out, cache, frames, mem, changed, false)
}

/// READ's first half (see the module doc): ALLOC of entries whose pages are all unpopulated.
#[allow(clippy::too_many_arguments)]
pub fn alloc_fresh<F: Format>(
    m: &Morsel<F>,
    region: Origin,
    checked: &[Result<Range, EntryError>],
    out: &mut Vec<Outcome>,
    cache: &mut FrameCache,
    frames: &impl FrameAlloc,
    mem: &impl PhysMem,
    changed: &mut Vec<(u64, HostPhysAddr)>,
) -> BatchStats {
    populate(m, region, checked, out, cache, frames, mem, changed, true)
}

#[allow(clippy::too_many_arguments)]
fn populate<F: Format>(
    m: &Morsel<F>,
    region: Origin,
    checked: &[Result<Range, EntryError>],
    out: &mut Vec<Outcome>,
    cache: &mut FrameCache,
    frames: &impl FrameAlloc,
    mem: &impl PhysMem,
    changed: &mut Vec<(u64, HostPhysAddr)>,
    fresh_only: bool,
) -> BatchStats {
    let mut stats = BatchStats::default();
    out.clear();
    for c in checked {
        let r = match c {
            Ok(r) => r,
            Err(e) => {
                out.push(Err(*e));
                stats.failed += 1;
                continue;
            }
        };
        let start = changed.len();
        let mut dry = false;
        let mut present = false;
        let walked = m.edit_leaves(r.first, r.count, mem, |page, cur| {
            if cur.is_some() && fresh_only {
                present = true;
                return LeafEdit::Stop;
            }
            if cur.is_some() {
                return LeafEdit::Keep;
            }
            match cache.take(region, frames) {
                Some((f, zero)) => {
                    if zero {
                        mem.zero_data(f, 0);
                    }
                    changed.push((page, f));
                    LeafEdit::Map(f)
                }
                None => {
                    dry = true;
                    LeafEdit::Stop
                }
            }
        });
        if walked.is_err() || dry || present {
            // Undo this entry only: its pages were not present before.
            for &(page, f) in &changed[start..] {
                let _ = m.set_leaf(page, None, mem);
                cache.give(f, region);
            }
            stats.rolled_back += (changed.len() - start) as u64;
            changed.truncate(start);
            out.push(Err(if dry {
                EntryError::NoMemory
            } else if present {
                EntryError::Present
            } else {
                EntryError::OutOfRange
            }));
            stats.failed += 1;
        } else {
            let n = (changed.len() - start) as u64;
            stats.pages += n;
            out.push(Ok(n));
        }
    }
    stats
}

/// FREE (see the module doc).
pub fn free<F: Format>(
    m: &Morsel<F>,
    region: Origin,
    checked: &[Result<Range, EntryError>],
    out: &mut Vec<Outcome>,
    cache: &mut FrameCache,
    mem: &impl PhysMem,
    changed: &mut Vec<(u64, HostPhysAddr)>,
) -> BatchStats {
    let mut stats = BatchStats::default();
    out.clear();
    for c in checked {
        let r = match c {
            Ok(r) => r,
            Err(e) => {
                out.push(Err(*e));
                stats.failed += 1;
                continue;
            }
        };
        let start = changed.len();
        let walked = m.edit_leaves(r.first, r.count, mem, |page, cur| match cur {
            Some(f) => {
                cache.give(f, region);
                changed.push((page, f));
                LeafEdit::Clear
            }
            None => LeafEdit::Keep,
        });
        match walked {
            Ok(_) => {
                let n = (changed.len() - start) as u64;
                stats.pages += n;
                out.push(Ok(n));
            }
            Err(_) => {
                // Only a range the validator let through but the morsel does not span.
                stats.pages += (changed.len() - start) as u64;
                out.push(Err(EntryError::OutOfRange));
                stats.failed += 1;
            }
        }
    }
    stats
}

/// Lists `(page, frame)` of every page of each valid entry into `changed`; an entry with a
/// page that is not populated fails with `NotPopulated` and lists nothing.
pub fn collect<F: Format>(
    m: &Morsel<F>,
    checked: &[Result<Range, EntryError>],
    out: &mut Vec<Outcome>,
    mem: &impl PhysMem,
    changed: &mut Vec<(u64, HostPhysAddr)>,
) -> BatchStats {
    let mut stats = BatchStats::default();
    out.clear();
    for c in checked {
        let r = match c {
            Ok(r) => r,
            Err(e) => {
                out.push(Err(*e));
                stats.failed += 1;
                continue;
            }
        };
        let start = changed.len();
        let mut hole = false;
        let walked = m.edit_leaves(r.first, r.count, mem, |page, cur| match cur {
            Some(f) => {
                changed.push((page, f));
                LeafEdit::Keep
            }
            None => {
                hole = true;
                LeafEdit::Stop
            }
        });
        if hole || walked.is_err() {
            changed.truncate(start);
            out.push(Err(if hole { EntryError::NotPopulated } else { EntryError::OutOfRange }));
            stats.failed += 1;
        } else {
            stats.pages += r.count;
            out.push(Ok(r.count));
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::BUNDLE;
    use crate::iov::{encode, Validator};
    use morsel::{Npt, SimMem};
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random ALLOC / FREE batches against a model of which pages are populated: results
        /// per entry, translations, frames never mapped twice, and every frame back at the end.
        #[test]
        fn batches_match_a_model(batches in prop::collection::vec(
            (any::<bool>(), prop::collection::vec((0u64..1100, 0u64..40), 1..40)), 1..30)) {
            let sim = SimMem::new(4 << 30);
            let mem = Zeroes(&sim, RefCell::new(Vec::new()));
            let m = Morsel::<Npt>::create_sparse(1024 * 4096, &sim, &mem).unwrap();
            let mut model: HashMap<u64, HostPhysAddr> = HashMap::new();
            let (mut v, mut cache, mut out, mut changed) = (Validator::new(), FrameCache::new(), Vec::new(), Vec::new());
            for (is_alloc, entries) in &batches {
                let raw: Vec<u64> = entries.iter().map(|&(p, c)| encode(p, c)).collect();
                let checked = v.validate(&raw, m.pages()).to_vec();
                changed.clear();
                let s = if *is_alloc {
                    alloc(&m, 7, &checked, &mut out, &mut cache, &sim, &mem, &mut changed)
                } else {
                    free(&m, 7, &checked, &mut out, &mut cache, &mem, &mut changed)
                };
                prop_assert_eq!(s.failed as usize, checked.iter().filter(|c| c.is_err()).count());
                for (c, o) in checked.iter().zip(&out) {
                    match c {
                        Err(e) => prop_assert_eq!(o, &Err(*e)),
                        Ok(r) => {
                            let before = (r.first..r.end()).filter(|p| model.contains_key(p)).count() as u64;
                            prop_assert_eq!(o, &Ok(if *is_alloc { r.count - before } else { before }));
                            for p in r.first..r.end() {
                                if *is_alloc { model.entry(p).or_insert(HostPhysAddr::new(0)); } else { model.remove(&p); }
                            }
                        }
                    }
                }
                for &(p, f) in &changed {
                    if *is_alloc { model.insert(p, f); }
                }
                if !*is_alloc { cache.trim(&sim); }
                let mut seen = std::collections::HashSet::new();
                for p in 0..m.pages() {
                    let t = m.translate(p * 4096, &sim);
                    prop_assert_eq!(t, model.get(&p).copied());
                    if let Some(f) = t { prop_assert!(seen.insert(f), "frame mapped twice"); }
                }
            }
            cache.drain(&sim);
            m.destroy(&sim, &sim).unwrap();
            prop_assert_eq!(sim.allocated_frames(), 0);
        }
    }

    #[test]
    fn zeroing_only_across_regions_and_for_fresh_frames() {
        let sim = SimMem::new(4 << 30);
        let mem = Zeroes(&sim, RefCell::new(Vec::new()));
        let a = Morsel::<Npt>::create_sparse(64 << 12, &sim, &mem).unwrap();
        let b = Morsel::<Npt>::create_sparse(64 << 12, &sim, &mem).unwrap();
        let (mut v, mut cache, mut out, mut ch) = (Validator::new(), FrameCache::new(), Vec::new(), Vec::new());
        let all = v.validate(&[encode(0, 64)], 64).to_vec();
        alloc(&a, 1, &all, &mut out, &mut cache, &sim, &mem, &mut ch);
        assert_eq!(mem.1.borrow().len(), 64, "fresh frames are zeroed");
        free(&a, 1, &all, &mut out, &mut cache, &mem, &mut ch);
        ch.clear();
        alloc(&a, 1, &all, &mut out, &mut cache, &sim, &mem, &mut ch);
        assert_eq!(mem.1.borrow().len(), 64, "back into the same region: not zeroed");
        free(&a, 1, &all, &mut out, &mut cache, &mem, &mut ch);
        ch.clear();
        alloc(&b, 2, &all, &mut out, &mut cache, &sim, &mem, &mut ch);
        let zeroed = mem.1.borrow().clone();
        assert_eq!(zeroed.len(), 128, "into another region: zeroed");
        assert!(ch.iter().all(|(_, f)| zeroed[64..].contains(f)));
        free(&b, 2, &all, &mut out, &mut cache, &mem, &mut ch);
        cache.drain(&sim);
        a.destroy(&sim, &sim).unwrap();
        b.destroy(&sim, &sim).unwrap();
        assert_eq!(sim.allocated_frames(), 0);
    }

    #[test]
    fn out_of_memory_fails_the_entry_alone_and_collect_needs_every_page() {
        let sim = SimMem::new(4 << 30);
        let m = Morsel::<Npt>::create_sparse(4096 << 12, &sim, &sim).unwrap();
        sim.limit_free(BUNDLE as u64 + 10);
        let (mut v, mut cache, mut out, mut ch) = (Validator::new(), FrameCache::new(), Vec::new(), Vec::new());
        let c = v.validate(&[encode(0, 8), encode(100, 3000), encode(4090, 2)], 4096).to_vec();
        let s = alloc(&m, 1, &c, &mut out, &mut cache, &sim, &sim, &mut ch);
        assert_eq!(out, [Ok(8), Err(EntryError::NoMemory), Ok(2)]);
        assert_eq!((s.pages, s.failed), (10, 1));
        assert!(s.rolled_back > 0);
        assert_eq!(m.translate(100 << 12, &sim), None, "the failed entry left nothing mapped");
        ch.clear();
        let c = v.validate(&[encode(0, 8), encode(8, 4), encode(4090, 2), encode(4095, 2)], 4096).to_vec();
        let s = collect(&m, &c, &mut out, &sim, &mut ch);
        assert_eq!(out, [Ok(8), Err(EntryError::NotPopulated), Ok(2), Err(EntryError::Overflow)]);
        assert_eq!((s.pages, ch.len()), (10, 10));
        let all = v.validate(&[encode(0, 4095)], 4096).to_vec();
        free(&m, 1, &all, &mut out, &mut cache, &sim, &mut ch);
        cache.drain(&sim);
        m.destroy(&sim, &sim).unwrap();
        assert_eq!(sim.allocated_frames(), 0);
    }

    #[test]
    fn alloc_fresh_refuses_present_pages_and_lists_every_page_in_order() {
        let sim = SimMem::new(4 << 30);
        let m = Morsel::<Npt>::create_sparse(64 << 12, &sim, &sim).unwrap();
        let (mut v, mut cache, mut out, mut ch) = (Validator::new(), FrameCache::new(), Vec::new(), Vec::new());
        let c = v.validate(&[encode(6, 1)], 64).to_vec();
        alloc(&m, 1, &c, &mut out, &mut cache, &sim, &sim, &mut ch);
        let six = m.translate(6 << 12, &sim);
        ch.clear();
        let c = v.validate(&[encode(0, 4), encode(4, 4), encode(10, 2), encode(70, 1)], 64).to_vec();
        let s = alloc_fresh(&m, 1, &c, &mut out, &mut cache, &sim, &sim, &mut ch);
        assert_eq!(out, [Ok(4), Err(EntryError::Present), Ok(2), Err(EntryError::OutOfRange)]);
        assert_eq!((s.pages, s.failed), (6, 2));
        assert_eq!(ch.iter().map(|&(p, _)| p).collect::<Vec<_>>(), [0, 1, 2, 3, 10, 11]);
        assert!(ch.iter().all(|&(p, f)| m.translate(p << 12, &sim) == Some(f)));
        assert_eq!(m.translate(4 << 12, &sim), None, "the refused entry mapped nothing");
        assert_eq!(m.translate(6 << 12, &sim), six, "and kept the present page");
        let all = v.validate(&[encode(0, 64)], 64).to_vec();
        free(&m, 1, &all, &mut out, &mut cache, &sim, &mut ch);
        cache.drain(&sim);
        m.destroy(&sim, &sim).unwrap();
        assert_eq!(sim.allocated_frames(), 0);
    }
}
