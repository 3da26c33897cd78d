//! Per-CPU state: the CPU's reserved tree for small frames, the area it currently takes small
//! frames from and how many of that area's frames it has claimed ("credit"), and its reserved
//! tree for huge frames. Only the owning CPU writes it, with plain (relaxed) loads and stores,
//! so the fast paths spend no atomic read-modify-write here. Other CPUs only read `balance`
//! (`free_frames`). It lives in the metadata memory but is volatile: recovery resets it.

use crate::sync::{AtomicU32, Ordering::Relaxed};

/// "No tree / no area".
pub const NONE: u32 = u32::MAX;

/// Bytes per CPU in the metadata (two cache lines, so adjacent-line prefetch does not make
/// neighbouring CPUs share).
pub const SIZE: usize = 128;
/// Alignment of `Local` in the metadata (its `repr(align)`).
pub const ALIGN: usize = 128;

#[cfg_attr(not(loom), repr(C, align(128)))]
pub struct Local {
    /// Tree reserved for small frames.
    pub small_tree: Cell,
    /// Area the CPU has claimed for small frames (its entry's claim flag: only this CPU sets
    /// its bits), or `NONE`.
    pub area: Cell,
    /// Frames of `area` this CPU may still take without a recount (never more than its clear
    /// bits).
    pub credit: Cell,
    /// Word of `area` to start the next bit search at.
    pub hint: Cell,
    /// Tree reserved for huge frames.
    pub huge_tree: Cell,
    /// Area (index in `huge_tree`) to start the next huge search at.
    pub huge_next: Cell,
    /// Tree to start the next search for a small-frame tree at.
    pub search: Cell,
    /// Tree to start the next search for a huge-frame tree at.
    pub huge_search: Cell,
    /// Frames this CPU freed less the frames it took (wrapping): `free_frames` sums it over
    /// the CPUs, so it needs no scan of the areas.
    pub balance: Balance,
}

#[cfg(not(loom))]
const _: () =
    assert!(core::mem::size_of::<Local>() == SIZE && core::mem::align_of::<Local>() == ALIGN);

/// A wrapping frame count that only its owning CPU writes (plain load and store, no locked
/// instruction) and any CPU may read. It is statistics, not part of the allocation protocol:
/// under loom it stays a `core` atomic, so the models spend no interleavings on it.
pub struct Balance(core::sync::atomic::AtomicUsize);

impl Balance {
    #[cfg_attr(not(loom), allow(dead_code))]
    pub fn new() -> Self {
        Balance(core::sync::atomic::AtomicUsize::new(0))
    }
    #[inline(always)]
    pub fn get(&self) -> usize {
        self.0.load(core::sync::atomic::Ordering::Relaxed)
    }
    #[inline(always)]
    pub fn add(&self, n: usize) {
        self.0.store(
            self.get().wrapping_add(n),
            core::sync::atomic::Ordering::Relaxed,
        )
    }
    #[inline(always)]
    pub fn sub(&self, n: usize) {
        self.0.store(
            self.get().wrapping_sub(n),
            core::sync::atomic::Ordering::Relaxed,
        )
    }
    fn reset(&self) {
        self.0.store(0, core::sync::atomic::Ordering::Relaxed)
    }
}

/// A `u32` that only its owning CPU writes.
pub struct Cell(AtomicU32);

impl Cell {
    #[cfg_attr(not(loom), allow(dead_code))]
    pub fn new(v: u32) -> Self {
        Cell(AtomicU32::new(v))
    }
    #[inline(always)]
    pub fn get(&self) -> u32 {
        self.0.load(Relaxed)
    }
    #[inline(always)]
    pub fn set(&self, v: u32) {
        self.0.store(v, Relaxed)
    }
}

impl Local {
    #[cfg_attr(not(loom), allow(dead_code))]
    pub fn new(search: u32) -> Self {
        Local {
            small_tree: Cell::new(NONE),
            area: Cell::new(NONE),
            credit: Cell::new(0),
            hint: Cell::new(0),
            huge_tree: Cell::new(NONE),
            huge_next: Cell::new(0),
            search: Cell::new(search),
            huge_search: Cell::new(search),
            balance: Balance::new(),
        }
    }

    /// Resets to "nothing reserved" (recovery, initialisation).
    pub fn reset(&self, search: u32) {
        self.small_tree.set(NONE);
        self.area.set(NONE);
        self.credit.set(0);
        self.hint.set(0);
        self.huge_tree.set(NONE);
        self.huge_next.set(0);
        self.search.set(search);
        self.huge_search.set(search);
        self.balance.reset();
    }
}
