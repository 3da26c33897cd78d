//! The hypervisor's heap (`alloc` for hashbrown and the morsel directory): power-of-two
//! size classes from 16 B to 1 MiB over a fixed region, each with a free list. Small and
//! predictable; page frames for guests and tables come from the frame allocator instead.
//! What guests make the hypervisor keep here is bounded by the per-guest quotas
//! (`abi::MORSEL_QUOTA` and the mount quotas) and allocated with `try_reserve`,
//! so a full heap is an error code. The morsel directory (`vmcore::names`) is allocated
//! whole at the start of a run, for every guest's quota plus the persistent records (about
//! 400 B per name, in chunks of 64 names; at most 64 guests: 4,160 names, about 1.6 MiB).

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;
use spin::Mutex;

const HEAP_SIZE: usize = 16 << 20;
const MIN_SHIFT: usize = 4;
const MAX_SHIFT: usize = 20;
const CLASSES: usize = MAX_SHIFT - MIN_SHIFT + 1;

#[repr(C, align(4096))]
struct Arena([u8; HEAP_SIZE]);
static mut ARENA: Arena = Arena([0; HEAP_SIZE]);

struct State {
    /// Next unused byte of the arena.
    next: usize,
    /// Head of each class's free list (a freed block holds the next pointer).
    free: [usize; CLASSES],
}

/// The global allocator.
pub struct Heap(Mutex<State>);

#[global_allocator]
static HEAP: Heap = Heap(Mutex::new(State { next: 0, free: [0; CLASSES] }));

fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT).next_power_of_two();
    let shift = size.trailing_zeros() as usize;
    (shift <= MAX_SHIFT).then(|| shift - MIN_SHIFT)
}

// SAFETY: blocks of class c are 2^(c+4) bytes, aligned to their size (the arena is page
// aligned and every block is carved at a multiple of its size), so every returned block
// satisfies the layout; a freed block is only reused for the same class.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else { return null_mut() };
        let size = 1usize << (class + MIN_SHIFT);
        let mut s = self.0.lock();
        if s.free[class] != 0 {
            let block = s.free[class];
            // SAFETY: a free block's first word holds the next free block of its class.
            s.free[class] = unsafe { (block as *const usize).read() };
            return block as *mut u8;
        }
        let start = (s.next + size - 1) & !(size - 1);
        if start + size > HEAP_SIZE {
            return null_mut();
        }
        s.next = start + size;
        // SAFETY: in bounds of the arena, checked above.
        unsafe { (&raw mut ARENA).cast::<u8>().add(start) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout) else { return };
        let mut s = self.0.lock();
        // SAFETY: the block came from `alloc` with the same class and is now unused.
        unsafe { (ptr as *mut usize).write(s.free[class]) };
        s.free[class] = ptr as usize;
    }
}

/// Bytes of the arena handed out so far (high-water mark).
pub fn used() -> usize {
    HEAP.0.lock().next
}
