//! A per-vCPU cache of free 4 KiB frames. ALLOC takes from it and FREE gives back to it, so
//! in the steady state (a buffer manager evicting as much as it reads) no page goes to the
//! frame allocator. It is refilled with a bundle of `BUNDLE` frames when empty and returns a
//! bundle when it holds more than two, after the caller's invalidation (a frame must not go
//! back to the allocator while a TLB may still map it).
//!
//! Each cached frame remembers the region it was freed from (`Origin`). A frame taken for
//! the same region is handed out as it is (the guests that see it saw it before); a frame
//! fresh from the allocator or from another region is zeroed first, so nothing leaks across
//! regions and so across guests.
//!
//! One cache per vCPU, owned by it: no lock, no atomic. (ExMap's global lock-free stack of
//! full bundles between CPUs is not needed while a bundle can go back to LLFree, whose per-CPU
//! trees already keep CPUs apart.)

use alloc::vec::Vec;
use morsel::{FrameAlloc, HostPhysAddr};

/// Frames moved between the cache and the allocator at once.
pub const BUNDLE: usize = 512;

/// Where a cached frame comes from: a region id (unique for the run, never reused), or `FRESH`.
pub type Origin = u64;
/// A frame straight from the allocator: unknown contents.
pub const FRESH: Origin = u64::MAX;

/// Whether a frame cached from `origin` must be zeroed before region `into` maps it: fresh
/// from the allocator, or from another region.
#[inline(always)]
pub(crate) fn must_zero(origin: Origin, into: Origin) -> bool {
    origin != into || origin == FRESH
}

/// Counters of one cache.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct CacheStats {
    /// Bundles taken from the allocator.
    pub refills: u64,
    /// Bundles given back to the allocator (`trim`, `drain` counts as one).
    pub returns: u64,
    /// Frames taken from / given back to the allocator.
    pub from_allocator: u64,
    pub to_allocator: u64,
    /// Frames handed out that had to be zeroed (fresh or from another region).
    pub zeroed: u64,
}

/// The cache (see the module doc).
pub struct FrameCache {
    frames: Vec<(HostPhysAddr, Origin)>,
    stats: CacheStats,
}

impl Default for FrameCache {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameCache {
    /// An empty cache with room for three bundles (it never grows past that plus one batch).
    pub fn new() -> Self {
        Self { frames: Vec::with_capacity(3 * BUNDLE), stats: CacheStats::default() }
    }

    /// `new` without the allocation panic: None if the heap cannot hold its room.
    pub fn try_new() -> Option<Self> {
        let mut frames = Vec::new();
        frames.try_reserve_exact(3 * BUNDLE).ok()?;
        Some(Self { frames, stats: CacheStats::default() })
    }

    /// A cache with no room (no allocation), for a batch that takes and gives nothing.
    pub const fn empty() -> Self {
        Self { frames: Vec::new(), stats: CacheStats { refills: 0, returns: 0, from_allocator: 0, to_allocator: 0, zeroed: 0 } }
    }

    /// Frames held now.
    pub fn len(&self) -> usize {
        self.frames.len()
    }
    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
    /// Counters.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// A frame for region `into`, and whether the caller must zero it before mapping it
    /// (counted in `zeroed`). `None` when the allocator has nothing left either.
    #[inline]
    pub fn take(&mut self, into: Origin, alloc: &impl FrameAlloc) -> Option<(HostPhysAddr, bool)> {
        if self.frames.is_empty() {
            self.refill(alloc);
        }
        let (frame, origin) = self.frames.pop()?;
        let zero = must_zero(origin, into);
        self.stats.zeroed += zero as u64;
        Some((frame, zero))
    }

    /// The frames held, for a batch's inner loop that takes from the top with an index of
    /// its own (`take` per frame keeps the length and a counter in memory): it then keeps the
    /// first `held` (`keep`).
    #[inline(always)]
    pub(crate) fn held(&self) -> &[(HostPhysAddr, Origin)] {
        &self.frames
    }

    /// After taking from `held()` down to `held` frames, `zeroed` of them to be zeroed.
    #[inline(always)]
    pub(crate) fn keep(&mut self, held: usize, zeroed: u64) {
        self.frames.truncate(held);
        self.stats.zeroed += zeroed;
    }

    /// The room left without growing, for a batch's inner loop that gives frames with an
    /// index of its own and then calls `gave`.
    #[inline(always)]
    pub(crate) fn room(&mut self) -> &mut [core::mem::MaybeUninit<(HostPhysAddr, Origin)>] {
        self.frames.spare_capacity_mut()
    }

    /// After writing the first `n` slots of `room()`.
    ///
    /// # Safety
    /// Those `n` slots are initialised (a `(frame, origin)` written into each).
    #[inline(always)]
    pub(crate) unsafe fn gave(&mut self, n: usize) {
        // SAFETY: `n` <= the room `room()` gave (the caller wrote that many slots of it), and
        // they are initialised (the caller's contract); `(u64, u64)` has no drop.
        unsafe { self.frames.set_len(self.frames.len() + n) }
    }

    /// Takes back a frame that region `from` no longer maps. Call `trim` after the
    /// invalidation that makes it unreachable.
    #[inline]
    pub fn give(&mut self, frame: HostPhysAddr, from: Origin) {
        self.frames.push((frame, from));
    }

    /// Makes room for `n` more frames, fallibly, so that the next `n` `give`s never grow
    /// the cache (a FREE reserves for every page its entries name before it runs: one batch
    /// can evict far more than three bundles, and the frames may go back to the allocator
    /// only after the invalidation).
    pub fn reserve(&mut self, n: usize) -> Result<(), alloc::collections::TryReserveError> {
        self.frames.try_reserve(n)
    }

    /// Gives bundles back to the allocator while more than two are held (after an
    /// invalidation: every frame held is unreachable).
    pub fn trim(&mut self, alloc: &impl FrameAlloc) {
        while self.frames.len() > 2 * BUNDLE {
            // The oldest frames go (the bottom of the stack); the recently freed stay warm.
            for (f, _) in self.frames.drain(..BUNDLE) {
                alloc.free(f, 0);
            }
            self.stats.returns += 1;
            self.stats.to_allocator += BUNDLE as u64;
        }
    }

    /// Gives every frame back (the vCPU goes away).
    pub fn drain(&mut self, alloc: &impl FrameAlloc) {
        if self.frames.is_empty() {
            return;
        }
        self.stats.to_allocator += self.frames.len() as u64;
        self.stats.returns += 1;
        for (f, _) in self.frames.drain(..) {
            alloc.free(f, 0);
        }
    }

    fn refill(&mut self, alloc: &impl FrameAlloc) {
        let before = self.frames.len();
        while self.frames.len() < before + BUNDLE {
            match alloc.alloc(0) {
                Some(f) => self.frames.push((f, FRESH)),
                None => break,
            }
        }
        let got = self.frames.len() - before;
        if got > 0 {
            self.stats.refills += 1;
            self.stats.from_allocator += got as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use morsel::SimMem;

    #[test]
    fn bundles_move_only_at_the_watermarks() {
        bundles_move_only_at_the_watermarks_with(FrameCache::new());
        bundles_move_only_at_the_watermarks_with(FrameCache::try_new().expect("a host heap holds it"));
    }

    fn bundles_move_only_at_the_watermarks_with(mut c: FrameCache) {
        assert!(c.frames.capacity() >= 3 * BUNDLE && c.is_empty());
        let mem = SimMem::new(1 << 30);
        let (f, zero) = c.take(1, &mem).unwrap();
        assert!(zero, "fresh frames are zeroed");
        assert_eq!((c.len(), c.stats().refills), (BUNDLE - 1, 1));
        c.give(f, 1);
        assert_eq!(c.take(1, &mem), Some((f, false)), "same region: as it is");
        c.give(f, 1);
        assert_eq!(c.take(2, &mem), Some((f, true)), "another region: zeroed");
        // Freeing three bundles' worth keeps two after trim.
        let mut held = vec![f];
        for _ in 0..3 * BUNDLE {
            held.push(c.take(2, &mem).unwrap().0);
        }
        for f in held.drain(..) {
            c.give(f, 2);
        }
        let n = c.len();
        c.trim(&mem);
        assert!(c.len() <= 2 * BUNDLE && c.len() > BUNDLE, "{n} -> {}", c.len());
        c.drain(&mem);
        assert_eq!(mem.allocated_frames(), 0, "every frame back");
        c.reserve(10 * BUNDLE).unwrap();
        assert!(c.frames.capacity() >= 10 * BUNDLE, "room for a large FREE before it runs");
        let s = c.stats();
        assert_eq!(s.from_allocator, s.to_allocator);
    }

    #[test]
    fn runs_dry_cleanly() {
        let mem = SimMem::new(1 << 30);
        mem.limit_free(3);
        let mut c = FrameCache::new();
        for _ in 0..3 {
            assert!(c.take(0, &mem).is_some());
        }
        assert_eq!(c.take(0, &mem), None);
        assert_eq!(c.stats().refills, 1);
    }
}
