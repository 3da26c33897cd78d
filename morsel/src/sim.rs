//! `SimMem`: a simulated machine for host tests and the benchmark. It is both the `PhysMem`
//! and the `FrameAlloc`: it hands out frame addresses from a simulated physical range but backs
//! only frames used as tables, so a 64 GiB morsel of 2 MiB pages costs its ~65 tables.
//!
//! It checks what real hardware would not: touching a frame that is not a live table, freeing
//! a frame twice or with the wrong order panics (a bug in this crate, not guest input).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::addr::{HostPhysAddr, ENTRIES, FRAME_SIZE};
use crate::mem::{FrameAlloc, PhysMem};

/// Frame addresses are distinct multiples of 4 KiB: one multiply spreads them well enough, and
/// is much cheaper than SipHash, so the benchmark measures table work, not hashing.
#[derive(Default)]
struct FrameHasher(u64);

impl Hasher for FrameHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type FrameMap<V> = HashMap<u64, V, BuildHasherDefault<FrameHasher>>;

/// Simulated physical memory and frame allocator (single-threaded).
pub struct SimMem {
    state: RefCell<State>,
    reads: Cell<u64>,
    writes: Cell<u64>,
}

struct State {
    tables: FrameMap<Box<[u64; ENTRIES]>>,
    allocated: FrameMap<u32>,
    free_lists: [Vec<u64>; 3],
    /// 4 KiB frames grow up from here...
    low: u64,
    /// ...large frames grow down from here.
    high: u64,
    used_pages: u64,
    limit_pages: u64,
}

const BASE: u64 = 1 << 32;

fn list(order: u32) -> Option<usize> {
    match order {
        0 => Some(0),
        9 => Some(1),
        18 => Some(2),
        _ => None,
    }
}

impl SimMem {
    /// A machine with `bytes` of simulated physical memory (rounded down to 1 GiB), starting at
    /// 4 GiB so that address 0 is never a valid frame.
    pub fn new(bytes: u64) -> Self {
        let bytes = bytes & !((1 << 30) - 1);
        Self {
            state: RefCell::new(State {
                tables: FrameMap::default(),
                allocated: FrameMap::default(),
                free_lists: [Vec::new(), Vec::new(), Vec::new()],
                low: BASE,
                high: BASE + bytes,
                used_pages: 0,
                limit_pages: bytes / FRAME_SIZE,
            }),
            reads: Cell::new(0),
            writes: Cell::new(0),
        }
    }

    /// Lets at most `pages` more 4 KiB pages be allocated from now on (to test running out).
    pub fn limit_free(&self, pages: u64) {
        let mut s = self.state.borrow_mut();
        s.limit_pages = s.limit_pages.min(s.used_pages + pages);
    }
    /// 4 KiB pages that can still be allocated.
    pub fn free_pages(&self) -> u64 {
        let s = self.state.borrow();
        s.limit_pages - s.used_pages
    }
    /// Frames currently handed out (any order).
    pub fn allocated_frames(&self) -> usize {
        self.state.borrow().allocated.len()
    }
    /// Frames currently backed as tables.
    pub fn table_frames(&self) -> usize {
        self.state.borrow().tables.len()
    }
    /// Entry writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.get()
    }
    /// Entry reads so far.
    pub fn reads(&self) -> u64 {
        self.reads.get()
    }
}

impl FrameAlloc for SimMem {
    fn alloc(&self, order: u32) -> Option<HostPhysAddr> {
        let l = list(order)?;
        let mut s = self.state.borrow_mut();
        let pages = 1u64 << order;
        if s.used_pages + pages > s.limit_pages {
            return None;
        }
        let frame = match s.free_lists[l].pop() {
            Some(f) => f,
            None => {
                let size = pages * FRAME_SIZE;
                if order == 0 {
                    if s.low + size > s.high {
                        return None;
                    }
                    s.low += size;
                    s.low - size
                } else {
                    let f = (s.high - size) & !(size - 1);
                    if f < s.low {
                        return None;
                    }
                    s.high = f;
                    f
                }
            }
        };
        s.used_pages += pages;
        let fresh = s.allocated.insert(frame, order).is_none();
        assert!(fresh, "sim: frame {frame:#x} handed out twice");
        Some(HostPhysAddr::new(frame))
    }

    fn free(&self, frame: HostPhysAddr, order: u32) {
        let f = frame.as_u64();
        let mut s = self.state.borrow_mut();
        match s.allocated.remove(&f) {
            Some(o) if o == order => {}
            Some(o) => panic!("sim: frame {f:#x} of order {o} freed as order {order}"),
            None => panic!("sim: frame {f:#x} freed but not allocated"),
        }
        s.tables.remove(&f);
        s.used_pages -= 1 << order;
        let l = list(order).expect("order checked at alloc");
        s.free_lists[l].push(f);
    }
}

impl PhysMem for SimMem {
    fn read(&self, table: HostPhysAddr, index: usize) -> u64 {
        self.reads.set(self.reads.get() + 1);
        match self.state.borrow().tables.get(&table.as_u64()) {
            Some(t) => t[index],
            None => panic!("sim: read of {table:?}, which is not a table"),
        }
    }

    fn write(&self, table: HostPhysAddr, index: usize, value: u64) {
        self.writes.set(self.writes.get() + 1);
        match self.state.borrow_mut().tables.get_mut(&table.as_u64()) {
            Some(t) => t[index] = value,
            None => panic!("sim: write to {table:?}, which is not a table"),
        }
    }

    fn zero_table(&self, table: HostPhysAddr) {
        let mut s = self.state.borrow_mut();
        assert_eq!(
            s.allocated.get(&table.as_u64()),
            Some(&0),
            "sim: {table:?} is not an allocated 4 KiB frame"
        );
        s.tables.insert(table.as_u64(), Box::new([0; ENTRIES]));
    }

    fn zero_data(&self, frame: HostPhysAddr, order: u32) {
        // Data is not simulated; only check that the frame is really ours.
        assert_eq!(
            self.state.borrow().allocated.get(&frame.as_u64()),
            Some(&order),
            "sim: zeroing {frame:?}"
        );
    }
}
