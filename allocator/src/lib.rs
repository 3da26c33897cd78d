//! Lock-free, log-free page-frame allocator after the LLFree design (Wrenger et al., USENIX
//! ATC'23), written from its description, with a persistent mode.
//!
//! # Structure
//! * Lower level, per 2 MiB area: a 512-bit field (one bit per 4 KiB frame, module `bitfield`) and
//!   one `u16` entry with a count of the area's free frames, a claim flag and a huge flag
//!   (module `child`, which states the invariant that keeps huge frames off small ones).
//! * Upper level, per tree of 32 areas (64 MiB): a reservation word (module `tree`). Each CPU
//!   reserves one tree for small and one for huge frames, so CPUs work in different cache
//!   lines; a tree's free count is the sum of its 32 area entries (one cache line).
//! * Per CPU (module `local`): the reserved trees, the area the CPU has *claimed* for small
//!   frames (one CAS on its entry; only the holder sets its bits) and a *credit*, the frames it
//!   may take there before it recounts. A small `get` costs one atomic bit set; a `put` one
//!   atomic bit clear and nothing else: the entry's count lags behind frees (it may understate,
//!   never overstate) until the area is claimed or refreshed again, when it is recounted from
//!   the bits.
//!
//! Every state change is one atomic instruction on one word; there are no locks and no log.
//! The bits and huge flags are the persistent truth; everything else is recounted by
//! [`Init::Recover`].
//!
//! # Use
//! ```
//! use allocator::{Allocator, Init, Order, Pfn};
//! let frames = 1 << 18; // 1 GiB
//! let size = Allocator::metadata_size(2, frames);
//! #[repr(C, align(128))]
//! struct Line([u8; 128]);
//! let mut buf: Vec<Line> = (0..size.div_ceil(128)).map(|_| Line([0; 128])).collect();
//! // SAFETY: `buf` has at least `size` bytes, aligned to `META_ALIGN` (128), and outlives `alloc`.
//! let meta = unsafe { core::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), size) };
//! // Start with every frame allocated, then free the usable ranges of the memory map.
//! let alloc = Allocator::new(2, Pfn(0), frames, meta, Init::Allocated).unwrap();
//! alloc.free_range(Pfn(256), frames - 256).unwrap();
//! let f = alloc.get(0, Order::BASE).unwrap();
//! let h = alloc.get(1, Order::HUGE).unwrap();
//! alloc.put(0, f, Order::BASE).unwrap();
//! alloc.put(1, h, Order::HUGE).unwrap();
//! assert_eq!(alloc.free_frames(), frames - 256);
//! ```
//! * [`Allocator::metadata_size`]`(cores, frames)`: bytes of metadata; the memory must be
//!   aligned to [`META_ALIGN`] (128 bytes; page alignment is a good choice).
//! * [`Allocator::new`]`(cores, first_pfn, frames, meta, init)`: the allocator manages frames
//!   `first_pfn .. first_pfn + frames`; `first_pfn` must be 2 MiB aligned (a multiple of 512)
//!   so huge frames are physically aligned. The hypervisor covers all of RAM from frame 0 with
//!   [`Init::Allocated`] and hands the usable ranges of its memory map to
//!   [`Allocator::free_range`] (one atomic per 64 frames). [`Init::Free`] starts all free.
//!   [`Init::Recover`] rebuilds the state found in `meta` after a crash or reboot.
//! * [`Allocator::get`] / [`Allocator::put`] for a CPU index `core < cores`: each index must be
//!   used by one thread at a time (its CPU). Breaking that cannot hand a frame out twice or
//!   break memory safety, but may make the free counts drift.
//! * [`Allocator::drain`]`(core)` gives the CPU's reservations back.
//!
//! Persistent mode is this allocator with `meta` in persistent memory: every allocation and
//! free is committed by its one bit/flag update, so after a crash [`Init::Recover`] over the
//! same memory keeps every allocated frame allocated and loses no free frame.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

mod bitfield;
mod child;
mod hook;
mod local;
mod sync;
mod tree;

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;

use core::fmt;

use child::AREA_FRAMES;
use local::{Local, NONE};
use sync::{AtomicU16, AtomicU32, AtomicU64, Ordering::*};

/// A host-physical frame number (address / 4096).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Pfn(pub usize);

impl Pfn {
    /// The frame's first byte address.
    pub const fn addr(self) -> u64 {
        (self.0 as u64) << 12
    }
    /// The frame containing `addr`.
    pub const fn from_addr(addr: u64) -> Self {
        Pfn((addr >> 12) as usize)
    }
}

/// Size of an allocation: 2^order frames of 4 KiB.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Order(pub u8);

impl Order {
    /// One 4 KiB frame.
    pub const BASE: Order = Order(0);
    /// One 2 MiB frame (512 aligned 4 KiB frames).
    pub const HUGE: Order = Order(9);
    /// Number of 4 KiB frames.
    pub const fn frames(self) -> usize {
        1 << self.0
    }
}

/// Why an operation failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Error {
    /// No free frame of the order (other CPUs' credits may still hold a few; see `drain`).
    Memory,
    /// The frame lies outside the managed range.
    AddressOutOfRange,
    /// The frame is not allocated (double free).
    DoubleFree,
    /// Unsupported order, a misaligned huge frame, or a frame allocated with the other order.
    WrongOrder,
    /// CPU index not below `cores`.
    InvalidCore,
    /// Bad geometry or metadata memory, or `Recover` found no valid metadata.
    Initialization,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Memory => "out of memory",
            Error::AddressOutOfRange => "frame outside the managed range",
            Error::DoubleFree => "frame is not allocated (double free)",
            Error::WrongOrder => {
                "wrong order (unsupported, misaligned or allocated with another order)"
            }
            Error::InvalidCore => "CPU index out of range",
            Error::Initialization => "invalid allocator geometry or metadata",
        })
    }
}

#[cfg(any(test, feature = "std"))]
impl std::error::Error for Error {}

/// How [`Allocator::new`] treats the metadata memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Init {
    /// Fresh metadata, every frame free.
    Free,
    /// Fresh metadata, every frame allocated; free usable memory with `free_range`.
    Allocated,
    /// Metadata written earlier by this allocator (persistent memory after a crash or reboot):
    /// validate it, recount the area entries from the bit fields, drop every reservation.
    Recover,
}

/// Alignment the metadata memory needs: that of the per-CPU state (128 bytes, two cache lines),
/// the strictest of its parts. Page alignment is a good choice.
pub const META_ALIGN: usize = local::ALIGN;

const MAGIC: u64 = u64::from_le_bytes(*b"LLFreePP");
const VERSION: u64 = 1;
const HEADER_WORDS: usize = 8;
const TREE_FRAMES: usize = tree::AREAS * AREA_FRAMES;
/// A tree with at least this many free frames (and not all free) is the best pick for small
/// frames: it is partly used already, so fully free trees stay whole for huge frames.
const PARTIAL_MIN: usize = TREE_FRAMES / 16;
/// Usable trees a reservation search looks at before it settles for the best seen (huge
/// frames: fewer free areas than a whole tree; small frames: no partly used tree).
const SEARCH_CANDIDATES: usize = 8;
/// Bound on retries of the fast paths before the slow (stealing) path.
const ROUNDS: usize = 64;
/// Largest frame count (area indices must fit the `u32` per-CPU fields).
#[cfg(not(loom))]
const MAX_FRAMES: usize = 1 << 40;

/// Byte offsets of the metadata parts. Persistent parts first, per-CPU state last, so the
/// number of CPUs may change across a recovery.
#[cfg_attr(loom, allow(dead_code))]
struct Layout {
    trees: usize,
    areas: usize,
    off_trees: usize,
    off_children: usize,
    off_bits: usize,
    off_locals: usize,
    size: usize,
}

const fn round64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

// Every part's offset is a multiple of its alignment (checked in `Layout::new`), and the
// metadata start is aligned to `META_ALIGN`, which must cover every part's alignment.
#[cfg(not(loom))]
const _: () = {
    assert!(META_ALIGN >= core::mem::align_of::<Local>());
    assert!(META_ALIGN >= core::mem::align_of::<AtomicU64>());
    assert!(META_ALIGN.is_power_of_two());
};

impl Layout {
    const fn new(cores: usize, frames: usize) -> Self {
        let areas = frames.div_ceil(AREA_FRAMES);
        let trees = areas.div_ceil(tree::AREAS);
        let off_trees = HEADER_WORDS * 8;
        let off_children = off_trees + round64(trees * 4);
        let off_bits = off_children + trees * tree::AREAS * 2;
        // The per-CPU state needs `local::ALIGN` (128): the parts before it end at a multiple
        // of 64 only, an odd one for about half of all memory sizes.
        let off_locals = (off_bits + areas * bitfield::WORDS * 8).next_multiple_of(local::ALIGN);
        let size = off_locals + cores * local::SIZE;
        assert!(off_trees.is_multiple_of(64) && off_children.is_multiple_of(64));
        assert!(off_bits.is_multiple_of(64) && off_locals.is_multiple_of(local::ALIGN));
        Layout {
            trees,
            areas,
            off_trees,
            off_children,
            off_bits,
            off_locals,
            size,
        }
    }
}

/// The allocator over caller-provided metadata memory. `Sync`: share it between CPUs.
pub struct Allocator<'a> {
    base: usize,
    frames: usize,
    header: &'a [AtomicU64],
    trees: &'a [AtomicU32],
    children: &'a [AtomicU16],
    /// One bit field per area (indexing an area checks one bound; its word index is masked).
    bits: &'a [[AtomicU64; bitfield::WORDS]],
    locals: &'a [Local],
    /// Areas `Recover` found with both the huge flag and set bits (see `init`).
    repaired: core::sync::atomic::AtomicUsize,
    /// Free frames at `init` plus those `free_range` added; with the CPUs' `balance` the free
    /// frames (volatile: `init` sets it, `Recover` from the bits).
    counted: core::sync::atomic::AtomicUsize,
}

impl<'a> Allocator<'a> {
    /// Bytes of metadata for `cores` CPUs and `frames` 4 KiB frames (about 33 KiB per GiB plus
    /// 128 bytes per CPU, plus up to 64 bytes of padding), to be aligned to [`META_ALIGN`].
    pub const fn metadata_size(cores: usize, frames: usize) -> usize {
        Layout::new(cores, frames).size
    }

    /// Creates the allocator for frames `first .. first + frames` with its metadata in `meta`
    /// (at least `metadata_size(cores, frames)` bytes, aligned to [`META_ALIGN`]). `first`
    /// must be a multiple of 512. Any content of `meta` is safe: `Recover` validates it and
    /// fails with [`Error::Initialization`] when it does not match.
    #[cfg(not(loom))]
    pub fn new(
        cores: usize,
        first: Pfn,
        frames: usize,
        meta: &'a mut [u8],
        init: Init,
    ) -> Result<Self, Error> {
        if cores == 0
            || cores >= NONE as usize
            || frames == 0
            || frames > MAX_FRAMES
            || !first.0.is_multiple_of(AREA_FRAMES)
        {
            return Err(Error::Initialization);
        }
        let l = Layout::new(cores, frames);
        if meta.len() < l.size || !(meta.as_ptr() as usize).is_multiple_of(META_ALIGN) {
            return Err(Error::Initialization);
        }
        let p = meta.as_mut_ptr();
        debug_assert!((p as usize + l.off_locals).is_multiple_of(core::mem::align_of::<Local>()));
        // SAFETY: every part lies inside `meta` (length checked) at an offset that is a multiple
        // of its alignment (asserted in `Layout::new`: 64 for the atomics, 128 for `Local`) from
        // a `META_ALIGN`-aligned start (checked above, >= every part's alignment); the atomics
        // (and the bit fields, arrays of 8 `AtomicU64`) have the size and alignment of their
        // integers and every bit pattern is valid for them, `Local` is 8 `AtomicU32` and an
        // `AtomicUsize` plus padding (repr(C)); `meta` is borrowed exclusively for 'a, so nothing
        // else accesses it.
        let (header, trees, children, bits, locals) = unsafe {
            (
                core::slice::from_raw_parts(p.cast::<AtomicU64>(), HEADER_WORDS),
                core::slice::from_raw_parts(p.add(l.off_trees).cast::<AtomicU32>(), l.trees),
                core::slice::from_raw_parts(
                    p.add(l.off_children).cast::<AtomicU16>(),
                    l.trees * tree::AREAS,
                ),
                core::slice::from_raw_parts(
                    p.add(l.off_bits).cast::<[AtomicU64; bitfield::WORDS]>(),
                    l.areas,
                ),
                core::slice::from_raw_parts(p.add(l.off_locals).cast::<Local>(), cores),
            )
        };
        let a = Allocator {
            base: first.0,
            frames,
            header,
            trees,
            children,
            bits,
            locals,
            repaired: core::sync::atomic::AtomicUsize::new(0),
            counted: core::sync::atomic::AtomicUsize::new(0),
        };
        a.init(init)?;
        Ok(a)
    }

    /// The same over metadata the caller built as typed slices (loom models: loom's atomics
    /// cannot live in raw memory).
    #[cfg(loom)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        first: Pfn,
        frames: usize,
        header: &'a [AtomicU64],
        trees: &'a [AtomicU32],
        children: &'a [AtomicU16],
        bits: &'a [AtomicU64],
        locals: &'a [Local],
        init: Init,
    ) -> Result<Self, Error> {
        let (bits, rest) = bits.as_chunks::<{ bitfield::WORDS }>();
        if !rest.is_empty() {
            return Err(Error::Initialization);
        }
        let a = Allocator {
            base: first.0,
            frames,
            header,
            trees,
            children,
            bits,
            locals,
            repaired: core::sync::atomic::AtomicUsize::new(0),
            counted: core::sync::atomic::AtomicUsize::new(0),
        };
        a.init(init)?;
        Ok(a)
    }

    fn init(&self, init: Init) -> Result<(), Error> {
        let areas = self.areas();
        match init {
            Init::Free | Init::Allocated => {
                self.header[0].store(0, Relaxed);
                for t in self.trees {
                    t.store(0, Relaxed);
                }
                for c in &self.children[areas..] {
                    c.store(0, Relaxed);
                }
                for a in 0..areas {
                    let n = self.area_frames(a);
                    let (word, entry) = if init == Init::Free {
                        (0, n as u16)
                    } else {
                        (u64::MAX, 0)
                    };
                    for (w, bits) in self.area_bits(a).iter().enumerate() {
                        bits.store(word | out_of_range_mask(n, w), Relaxed);
                    }
                    self.children[a].store(entry, Relaxed);
                }
                self.counted
                    .store(if init == Init::Free { self.frames } else { 0 }, Relaxed);
                self.header[1].store(VERSION, Relaxed);
                self.header[2].store(self.base as u64, Relaxed);
                self.header[3].store(self.frames as u64, Relaxed);
                // Written last: metadata is valid for `Recover` only once complete.
                self.header[0].store(MAGIC, Release);
            }
            Init::Recover => {
                if self.header[0].load(Acquire) != MAGIC
                    || self.header[1].load(Relaxed) != VERSION
                    || self.header[2].load(Relaxed) != self.base as u64
                    || self.header[3].load(Relaxed) != self.frames as u64
                {
                    return Err(Error::Initialization);
                }
                for t in self.trees {
                    t.store(0, Relaxed);
                }
                for c in &self.children[areas..] {
                    c.store(0, Relaxed);
                }
                let mut repaired = 0;
                let mut free = 0;
                for a in 0..areas {
                    let n = self.area_frames(a);
                    let bits = self.area_bits(a);
                    for (w, word) in bits.iter().enumerate() {
                        word.fetch_or(out_of_range_mask(n, w), Relaxed);
                    }
                    let set = bitfield::count_set(bits);
                    let e = child::load(&self.children[a]);
                    let entry = if e.huge() {
                        // A huge frame is taken only from a whole area.
                        if n != AREA_FRAMES {
                            return Err(Error::Initialization);
                        }
                        if set != 0 {
                            // Huge flag and set bits: on memory without eADR the flag's line
                            // and the bits' line reached the media from two states of an area
                            // that switched between one 2 MiB frame and 4 KiB frames (a free
                            // not yet written back, then an allocation of the other order). A
                            // caller that writes the metadata back before it commits anything
                            // (the hypervisor's pmem records) has no committed frame there, but
                            // which state is older cannot be told: keep the whole area
                            // allocated, as one huge frame, so that nothing either state holds
                            // is handed out; the caller's sweep of what no record reaches
                            // frees it.
                            for w in bits {
                                w.store(0, Relaxed);
                            }
                            repaired += 1;
                        }
                        child::ALLOCATED_HUGE
                    } else {
                        free += AREA_FRAMES - set;
                        (AREA_FRAMES - set) as u16
                    };
                    self.children[a].store(entry, Relaxed);
                }
                self.repaired.store(repaired, Relaxed);
                self.counted.store(free, Relaxed);
            }
        }
        for (core, l) in self.locals.iter().enumerate() {
            l.reset(self.search_start(core));
        }
        sync::fence(SeqCst);
        Ok(())
    }

    /// Allocates 2^order frames (order 0 or 9) for CPU `core`.
    #[inline]
    pub fn get(&self, core: usize, order: Order) -> Result<Pfn, Error> {
        let l = self.locals.get(core).ok_or(Error::InvalidCore)?;
        let i = match order {
            Order::BASE => self.get_small(l, core)?,
            Order::HUGE => self.get_huge(l, core)?,
            _ => return Err(Error::WrongOrder),
        };
        l.balance.sub(order.frames());
        Ok(Pfn(self.base + i))
    }

    /// Frees 2^order frames at `pfn`, allocated earlier with the same order (by any CPU).
    #[inline]
    pub fn put(&self, core: usize, pfn: Pfn, order: Order) -> Result<(), Error> {
        let l = self.locals.get(core).ok_or(Error::InvalidCore)?;
        let i = pfn.0.wrapping_sub(self.base);
        if i >= self.frames {
            return Err(Error::AddressOutOfRange);
        }
        let area = i / AREA_FRAMES;
        match order {
            Order::BASE => {
                if !bitfield::clear(self.area_bits(area), i % AREA_FRAMES) {
                    return Err(if child::load(&self.children[area]).huge() {
                        Error::WrongOrder
                    } else {
                        Error::DoubleFree
                    });
                }
                hook::point();
                // The one locked update of a put. The entry is not touched: its count may
                // understate (see `child`); the next claim or refresh of the area counts it.
                if area as u32 == l.area.get() {
                    // The CPU's claimed area: the frame joins its credit, no atomic needed.
                    l.credit.set(l.credit.get() + 1);
                }
                l.balance.add(1);
                Ok(())
            }
            Order::HUGE => {
                if !i.is_multiple_of(AREA_FRAMES) {
                    return Err(Error::WrongOrder);
                }
                if self.area_frames(area) != AREA_FRAMES {
                    return Err(Error::AddressOutOfRange);
                }
                match child::put_huge(&self.children[area]) {
                    Ok(()) => {
                        hook::point();
                        l.balance.add(AREA_FRAMES);
                        Ok(())
                    }
                    Err(_) if bitfield::count_set(self.area_bits(area)) != 0 => {
                        Err(Error::WrongOrder)
                    }
                    Err(_) => Err(Error::DoubleFree),
                }
            }
            _ => Err(Error::WrongOrder),
        }
    }

    /// Frees `count` frames from `first` on, all allocated as 4 KiB frames (initialisation with
    /// [`Init::Allocated`]: hand over the usable ranges). Checks first, then frees with one
    /// atomic per 64-frame word; fails without change if a frame is free or out of range.
    pub fn free_range(&self, first: Pfn, count: usize) -> Result<(), Error> {
        let start = first.0.wrapping_sub(self.base);
        if start >= self.frames || count > self.frames - start {
            return Err(Error::AddressOutOfRange);
        }
        let end = start + count;
        // Pass 1: everything must be allocated. Pass 2: clear, then recount each area's entry
        // from its bits under a claim (`refresh`; a claimed area's holder recounts it itself).
        for pass in 0..2 {
            let mut i = start;
            while i < end {
                let w = i / 64;
                let hi = end.min((w + 1) * 64);
                let mask = bit_range(i % 64, hi - w * 64);
                if pass == 0 {
                    if self.word(w).load(Acquire) & mask != mask {
                        return Err(Error::DoubleFree);
                    }
                } else {
                    self.word(w).fetch_and(!mask, AcqRel);
                    hook::point();
                    if hi == end || hi.is_multiple_of(AREA_FRAMES) {
                        self.refresh((hi - 1) / AREA_FRAMES);
                    }
                }
                i = hi;
            }
        }
        self.counted.fetch_add(count, Relaxed);
        Ok(())
    }

    /// Gives CPU `core`'s claimed area (with its credit) and tree reservations back (call on
    /// that CPU, or when it is idle), so other CPUs can use its frames and huge frames can form
    /// there.
    pub fn drain(&self, core: usize) -> Result<(), Error> {
        let l = self.locals.get(core).ok_or(Error::InvalidCore)?;
        if l.area.get() != NONE {
            self.release_area(l.area.get() as usize);
        }
        l.credit.set(0);
        l.area.set(NONE);
        for t in [&l.small_tree, &l.huge_tree] {
            if t.get() != NONE {
                tree::release(&self.trees[t.get() as usize]);
                t.set(NONE);
                hook::point();
            }
        }
        Ok(())
    }

    /// Free 4 KiB frames (huge frames count 512 each): the count at initialisation plus each
    /// CPU's frees less its allocations, O(CPUs) (callers ask under locks: the hypervisor before
    /// every morsel create). Exact when no operation runs.
    pub fn free_frames(&self) -> usize {
        let moved = self
            .locals
            .iter()
            .fold(0usize, |s, l| s.wrapping_add(l.balance.get()));
        self.counted.load(Relaxed).wrapping_add(moved)
    }

    /// Free 4 KiB frames counted from the bit fields, O(areas) (tests: must equal
    /// [`Self::free_frames`] when no operation runs).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn free_frames_by_bits(&self) -> usize {
        (0..self.areas())
            .filter(|&a| !child::load(&self.children[a]).huge())
            .map(|a| AREA_FRAMES - bitfield::count_set(self.area_bits(a)))
            .sum()
    }

    /// Free 2 MiB frames: whole areas that are free and not claimed by a CPU (O(areas) scan of
    /// the bit fields; entries may lag behind frees, `get` recounts them).
    pub fn free_huge(&self) -> usize {
        (0..self.areas())
            .filter(|&a| {
                child::load(&self.children[a]).claimable()
                    && self.area_frames(a) == AREA_FRAMES
                    && bitfield::count_set(self.area_bits(a)) == 0
            })
            .count()
    }

    /// Free frames of `order`: [`Self::free_frames`] for order 0, [`Self::free_huge`] for 9.
    pub fn free(&self, order: Order) -> Result<usize, Error> {
        match order {
            Order::BASE => Ok(self.free_frames()),
            Order::HUGE => Ok(self.free_huge()),
            _ => Err(Error::WrongOrder),
        }
    }

    /// Areas the last [`Init::Recover`] found holding both a huge flag and set bits (two
    /// states of an area that switched order, mixed on memory without eADR) and kept
    /// allocated as one huge frame for the caller's sweep; 0 after a fresh init.
    pub fn repaired_areas(&self) -> usize {
        self.repaired.load(Relaxed)
    }

    /// Managed 4 KiB frames.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// First managed frame.
    pub fn first(&self) -> Pfn {
        Pfn(self.base)
    }

    /// CPUs the allocator was made for.
    pub fn cores(&self) -> usize {
        self.locals.len()
    }

    /// Whether `pfn` is allocated (as a 4 KiB frame or inside a huge frame).
    pub fn is_allocated(&self, pfn: Pfn) -> Result<bool, Error> {
        let i = pfn.0.wrapping_sub(self.base);
        if i >= self.frames {
            return Err(Error::AddressOutOfRange);
        }
        let area = i / AREA_FRAMES;
        let word = self.word(i / 64).load(Acquire);
        Ok(word & (1 << (i % 64)) != 0 || child::load(&self.children[area]).huge())
    }

    // ---- small frames ----

    /// The common case inline: the claimed area has credit left and its hint word a clear bit
    /// (one `lock bts`; the hint stays). Everything else in [`Self::get_small_slow`].
    #[inline(always)]
    fn get_small(&self, l: &Local, core: usize) -> Result<usize, Error> {
        let credit = l.credit.get();
        if credit > 0 {
            let area = l.area.get() as usize;
            let w = l.hint.get() as usize % bitfield::WORDS;
            let word = &self.area_bits(area)[w];
            let v = word.load(Relaxed);
            if v != u64::MAX {
                if let Some(bit) = bitfield::take_seen(word, v) {
                    hook::point();
                    l.credit.set(credit - 1);
                    return Ok(area * AREA_FRAMES + w * 64 + bit);
                }
            }
        }
        self.get_small_slow(l, core)
    }

    /// A small `get` whose claimed area has no credit or whose hint word is full: search the
    /// area's other words, move on to another area or tree, refresh, steal.
    #[cold]
    #[inline(never)]
    fn get_small_slow(&self, l: &Local, core: usize) -> Result<usize, Error> {
        let mut refreshed = false;
        for _ in 0..ROUNDS {
            let credit = l.credit.get();
            if credit > 0 {
                let area = l.area.get() as usize;
                l.credit.set(credit - 1);
                if let Some(i) = self.take_bit(area, l.hint.get() as usize) {
                    hook::point();
                    l.hint.set((i / 64) as u32);
                    return Ok(area * AREA_FRAMES + i);
                }
                // Unreachable: the credit never exceeds the clear bits of the claimed area,
                // whose bits only this CPU sets. `claim_area` recounts it.
                l.credit.set(0);
            }
            if self.claim_area(l) || self.reserve(l, core, false) {
                continue;
            }
            // No tree to reserve shows free frames: count the frees that puts left out of the
            // entries of one unreserved tree, then reserve again.
            if !refreshed {
                refreshed = true;
                if self.refresh_a_tree(l) {
                    continue;
                }
            }
            break;
        }
        // Take one frame where the bits show it (in other CPUs' trees too).
        self.steal_small(core)
    }

    /// Takes a bit of `area`, whose claim the caller holds.
    #[inline]
    fn take_bit(&self, area: usize, hint: usize) -> Option<usize> {
        let bits = self.area_bits(area);
        (0..ROUNDS).find_map(|_| bitfield::take(bits, hint))
    }

    /// Free frames of area `a` by its bits.
    #[inline]
    fn count_free(&self, a: usize) -> usize {
        AREA_FRAMES - bitfield::count_set(self.area_bits(a))
    }

    /// Whether area `a`'s bits show more than `n` free frames; reads only as many words as it
    /// takes (none when `n` is the whole area: a count never overstates).
    #[inline]
    fn more_free_than(&self, a: usize, n: usize) -> bool {
        n < AREA_FRAMES && bitfield::fewer_set_than(self.area_bits(a), AREA_FRAMES - n)
    }

    /// Claims area `a` if its entry still is `seen`; returns the frames the claim may take:
    /// `seen.free()` (an unclaimed count never overstates its clear bits, and under the claim
    /// only this CPU sets bits), recounted from the bits only when that is 0 (frees that puts
    /// left uncounted). A count that lags stays so until the holder recounts (`claim_area`,
    /// when the credit is spent) or a refresh.
    #[inline]
    fn claim(&self, a: usize, seen: child::Entry) -> Option<usize> {
        if !self.claim_entry(a, seen) {
            return None;
        }
        Some(match seen.free() {
            0 => self.count_free(a),
            n => n,
        })
    }

    /// Claims area `a` if its entry still is `seen` (one CAS).
    #[inline]
    fn claim_entry(&self, a: usize, seen: child::Entry) -> bool {
        if a >= self.areas() || !seen.claimable() || !child::claim(&self.children[a], seen) {
            return false;
        }
        hook::point();
        true
    }

    /// Gives the claim of area `a` back, with its free frames counted from the bits after the
    /// holder's last bit set (so the count cannot overstate).
    #[inline]
    fn release_area(&self, a: usize) {
        self.release_counted(a, self.count_free(a));
    }

    /// Gives the claim of area `a` back with `free` counted, which must not exceed its clear
    /// bits: a count the holder read after its last bit set, less what it took since.
    #[inline]
    fn release_counted(&self, a: usize, free: usize) {
        child::release(&self.children[a], free);
        hook::point();
    }

    /// Counts into area `a`'s entry the frees it does not show yet (a put only clears a bit):
    /// claim, recount from the bits, release. Reads the bits first and does nothing unless
    /// that adds frames. Returns whether the count grew.
    fn refresh(&self, a: usize) -> bool {
        if a >= self.areas() {
            return false;
        }
        let e = child::load(&self.children[a]);
        if !e.claimable() || !self.more_free_than(a, e.free()) {
            return false;
        }
        if !self.claim_entry(a, e) {
            return false;
        }
        // A recount under the claim is a valid release count: this CPU sets no bit under it,
        // others only clear bits. It is at least `e.free()` (counts never overstate).
        let n = self.count_free(a);
        self.release_counted(a, n);
        n > e.free()
    }

    /// [`Self::refresh`] over the areas of unreserved trees, from the CPU's last search start
    /// on, until one tree's counts grow (O(32 areas) when puts left frees uncounted; every
    /// area's bits only when no unreserved tree has a free frame). Whether some count grew.
    #[cold]
    fn refresh_a_tree(&self, l: &Local) -> bool {
        let n = self.trees.len();
        let start = l.search.get() as usize;
        for k in 0..n {
            let t = (start + k) % n;
            if tree::reserved(&self.trees[t]) {
                continue;
            }
            let first = t * tree::AREAS;
            if (first..first + tree::AREAS).fold(false, |g, a| self.refresh(a) | g) {
                return true;
            }
        }
        false
    }

    /// Moves the CPU's small allocations on when its credit is spent: keeps its claimed area
    /// if other CPUs freed frames there, else gives it back and claims another area of its small
    /// tree (partly used areas first, so free areas stay whole; then areas whose frees are not
    /// counted yet); releases the tree when it has none.
    fn claim_area(&self, l: &Local) -> bool {
        let cur = l.area.get();
        if cur != NONE {
            let n = self.count_free(cur as usize);
            if n > 0 {
                l.credit.set(n as u32);
                return true;
            }
            self.release_counted(cur as usize, 0);
            l.area.set(NONE);
        }
        let t = l.small_tree.get();
        if t == NONE {
            return false;
        }
        let first = t as usize * tree::AREAS;
        let start = (cur as usize).wrapping_sub(first).wrapping_add(1) % tree::AREAS;
        let take = |a: usize, n: usize| {
            l.area.set(a as u32);
            l.credit.set(n as u32);
            l.hint.set(0);
        };
        for _ in 0..ROUNDS {
            let mut whole = None;
            let mut partial = None;
            for k in 0..tree::AREAS {
                let i = (start + k) % tree::AREAS;
                let e = child::load(&self.children[first + i]);
                if !e.claimable() || e.free() == 0 {
                    continue;
                }
                if e.free() < AREA_FRAMES {
                    partial = Some((i, e));
                    break;
                }
                whole = whole.or(Some((i, e)));
            }
            let Some((i, e)) = partial.or(whole) else {
                break;
            };
            match self.claim(first + i, e) {
                Some(n) if n > 0 => {
                    take(first + i, n);
                    return true;
                }
                Some(_) => self.release_counted(first + i, 0),
                None => {}
            }
        }
        // No area counts free frames: look for frees that puts left uncounted.
        for k in 0..tree::AREAS {
            let a = first + (start + k) % tree::AREAS;
            let e = child::load(&self.children[a]);
            if a >= self.areas() || !e.claimable() || !self.more_free_than(a, 0) {
                continue;
            }
            match self.claim(a, e) {
                Some(n) if n > 0 => {
                    take(a, n);
                    return true;
                }
                Some(_) => self.release_counted(a, 0),
                None => {}
            }
        }
        l.small_tree.set(NONE);
        tree::release(&self.trees[t as usize]);
        hook::point();
        false
    }

    /// Outside any reservation: claim any area with a free frame (by its entry, else by its
    /// bits), take one, give it back. `Memory` means no unclaimed area had a clear bit when
    /// the scan passed it.
    #[cold]
    fn steal_small(&self, core: usize) -> Result<usize, Error> {
        let n = self.areas();
        let start = core * n / self.locals.len();
        for k in 0..n {
            let a = (start + k) % n;
            let e = child::load(&self.children[a]);
            if !e.claimable() || (e.free() == 0 && !self.more_free_than(a, 0)) {
                continue;
            }
            if let Some(free) = self.claim(a, e) {
                let got = if free > 0 { self.take_bit(a, 0) } else { None };
                if let Some(i) = got {
                    hook::point();
                    // Counted under the claim, less the frame just taken.
                    self.release_counted(a, free - 1);
                    return Ok(a * AREA_FRAMES + i);
                }
                self.release_area(a);
            }
        }
        Err(Error::Memory)
    }

    // ---- huge frames ----

    #[inline]
    fn get_huge(&self, l: &Local, core: usize) -> Result<usize, Error> {
        for _ in 0..ROUNDS {
            let t = l.huge_tree.get();
            if t != NONE {
                let first = t as usize * tree::AREAS;
                for pass in 0..2 {
                    let next = l.huge_next.get() as usize;
                    // Whether some area is small and unclaimed: its count may lag behind frees.
                    let mut lagging = false;
                    for k in 0..tree::AREAS {
                        let i = (next + k) % tree::AREAS;
                        let c = &self.children[first + i];
                        let e = child::load(c);
                        if e.0 == child::FREE && child::take_huge(c) {
                            hook::point();
                            l.huge_next.set(((i + 1) % tree::AREAS) as u32);
                            return Ok((first + i) * AREA_FRAMES);
                        }
                        lagging |= e.claimable() && e.free() < AREA_FRAMES;
                    }
                    // Frees that puts left uncounted may complete a free area.
                    if pass == 1
                        || !lagging
                        || !(0..tree::AREAS).fold(false, |g, i| self.refresh(first + i) | g)
                    {
                        break;
                    }
                }
                l.huge_tree.set(NONE);
                tree::release(&self.trees[t as usize]);
                hook::point();
            }
            if self.reserve(l, core, true) {
                continue;
            }
            break;
        }
        // Outside any reservation: count each area's uncounted frees (which may complete it,
        // and lets its tree be reserved next) and take it if it is whole.
        let n = self.areas();
        let start = core * n / self.locals.len();
        for k in 0..n {
            let a = (start + k) % n;
            self.refresh(a);
            let c = &self.children[a];
            if child::load(c).0 == child::FREE && child::take_huge(c) {
                hook::point();
                return Ok(a * AREA_FRAMES);
            }
        }
        Err(Error::Memory)
    }

    // ---- trees ----

    /// Reserves a tree for small (`huge` false) or huge frames, by fill level: for small frames
    /// a partly used tree, else a free one, else any with free frames; for huge frames a free
    /// tree, else any with a free area.
    fn reserve(&self, l: &Local, core: usize, huge: bool) -> bool {
        let n = self.trees.len();
        for _ in 0..4 {
            let search = if huge { &l.huge_search } else { &l.search };
            let start = search.get() as usize % n;
            let (mut best, mut whole, mut any) = (None, None, None);
            let (mut most, mut candidates) = (0, 0);
            for k in 0..n {
                let t = (start + k) % n;
                if tree::reserved(&self.trees[t]) {
                    continue;
                }
                // Bound the search on large memories: after enough usable trees take the best.
                if candidates >= SEARCH_CANDIDATES && (whole.is_some() || any.is_some()) {
                    break;
                }
                let (free, free_areas) = self.tree_stat(t);
                let all = free == self.tree_frames(t);
                if huge {
                    if free_areas == 0 {
                        continue;
                    }
                    if all {
                        best = Some(t);
                        break;
                    }
                    // Otherwise the tree with the most free areas among the first candidates.
                    candidates += 1;
                    if free_areas > most {
                        most = free_areas;
                        any = Some(t);
                    }
                } else {
                    candidates += (free > 0) as usize;
                    if free == 0 {
                        continue;
                    }
                    if !all && free >= PARTIAL_MIN {
                        best = Some(t);
                        break;
                    }
                    if all {
                        whole = whole.or(Some(t));
                    }
                    any = any.or(Some(t));
                }
            }
            let Some(t) = best.or(whole).or(any) else {
                return false;
            };
            if tree::reserve(&self.trees[t], core) {
                hook::point();
                search.set(t as u32);
                if huge {
                    l.huge_tree.set(t as u32);
                    l.huge_next.set(0);
                } else {
                    // `claim_area` gave the claimed area back before this search.
                    debug_assert_eq!(l.area.get(), NONE);
                    l.small_tree.set(t as u32);
                    l.area.set(NONE);
                    l.credit.set(0);
                }
                return true;
            }
        }
        false
    }

    /// Free frames of tree `t` outside credits, and its free areas.
    fn tree_stat(&self, t: usize) -> (usize, usize) {
        let first = t * tree::AREAS;
        self.children[first..first + tree::AREAS]
            .iter()
            .fold((0, 0), |(free, whole), c| {
                let e = child::load(c);
                (free + e.free(), whole + (e.0 == child::FREE) as usize)
            })
    }

    // ---- geometry ----

    fn areas(&self) -> usize {
        self.frames.div_ceil(AREA_FRAMES)
    }

    /// Managed frames of area `a` (512 except maybe in the last).
    #[inline]
    fn area_frames(&self, a: usize) -> usize {
        (self.frames - a * AREA_FRAMES).min(AREA_FRAMES)
    }

    fn tree_frames(&self, t: usize) -> usize {
        (self.frames - t * TREE_FRAMES).min(TREE_FRAMES)
    }

    #[inline(always)]
    fn area_bits(&self, a: usize) -> &[AtomicU64; bitfield::WORDS] {
        &self.bits[a]
    }

    /// Word `w` of the bit fields of all areas in a row (frames `w * 64 ..`).
    #[inline(always)]
    fn word(&self, w: usize) -> &AtomicU64 {
        &self.bits[w / bitfield::WORDS][w % bitfield::WORDS]
    }

    fn search_start(&self, core: usize) -> u32 {
        (core * self.trees.len() / self.locals.len()) as u32
    }
}

/// Bits `lo..hi` of a word (hi <= 64).
const fn bit_range(lo: usize, hi: usize) -> u64 {
    let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

/// Bits of word `w` of an area with `n` managed frames that lie beyond them (kept set).
const fn out_of_range_mask(n: usize, w: usize) -> u64 {
    if n >= (w + 1) * 64 {
        0
    } else if n <= w * 64 {
        u64::MAX
    } else {
        !bit_range(0, n - w * 64)
    }
}
