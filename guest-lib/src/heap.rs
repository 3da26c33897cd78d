//! The guest's heap (cargo feature `heap`): a `#[global_allocator]`, so a guest may use
//! `alloc` (`Vec`, `Box`, `String`, `BTreeMap`). It covers the guest's own RAM between the
//! end of its image (`__guest_end` in guest.ld) and its vCPUs' stacks
//! (`memory_size - vcpu_count * abi::VCPU_STACK_RESERVE`), set up on the first allocation.
//!
//! A first-fit free list kept in address order, blocks merged with their neighbours on free,
//! behind a spin lock (vCPUs of one guest may allocate at the same time; a handler must not
//! allocate, as it must not take any lock the interrupted code may hold). Sizes are rounded
//! up to 16 bytes, so every free block can hold its list node. Out of memory is a null
//! pointer: `try_reserve` and friends report it, `Vec::push` ends the guest (alloc error).

use core::alloc::Layout;
use core::ptr::null_mut;

/// The granule of every block: a free block holds its `Node`.
const GRANULE: usize = 16;

/// A free block's header, in the block itself.
#[repr(C)]
struct Node {
    size: usize,
    next: *mut Node,
}

/// A free list over memory the caller gave it (`add`).
pub struct Heap {
    /// The first free block (lowest address); null when nothing is free.
    head: *mut Node,
    free: usize,
    total: usize,
}

// SAFETY: the heap owns the free memory its nodes point into; whoever shares it (the global
// allocator) puts it behind a lock.
unsafe impl Send for Heap {}

const fn align_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}

impl Heap {
    /// An empty heap.
    pub const fn empty() -> Heap {
        Heap { head: null_mut(), free: 0, total: 0 }
    }

    /// Bytes free now, and in all.
    pub fn free(&self) -> (usize, usize) {
        (self.free, self.total)
    }

    /// Gives `[start, start + len)` to the heap (trimmed to whole granules).
    ///
    /// # Safety
    /// The range is memory nothing else uses, for as long as the heap lives.
    pub unsafe fn add(&mut self, start: usize, len: usize) {
        let Some(end) = start.checked_add(len) else { return };
        let s = align_up(start, GRANULE);
        let e = end & !(GRANULE - 1);
        if e <= s {
            return;
        }
        self.total += e - s;
        // SAFETY: handed over by the caller.
        unsafe { self.insert(s, e - s) };
    }

    /// The size a request takes from the list.
    fn size_of(layout: Layout) -> usize {
        align_up(layout.size().max(1), GRANULE)
    }

    /// First fit: a block that holds `layout` at its alignment; the space before and after
    /// it goes back to the list. Null if none is large enough.
    pub fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let size = Self::size_of(layout);
        let align = layout.align().max(GRANULE);
        let mut prev: *mut Node = null_mut();
        let mut cur = self.head;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list (free memory the heap owns).
            let (block_size, next) = unsafe { ((*cur).size, (*cur).next) };
            let start = cur as usize;
            let at = align_up(start, align);
            let fits = at.checked_add(size).is_some_and(|end| end <= start + block_size);
            if fits {
                // Unlink, then give back the front padding (a whole number of granules) and
                // the tail.
                // SAFETY: `prev` is null or the node before `cur`.
                unsafe { self.unlink(prev, next) };
                self.free -= block_size;
                // SAFETY: both pieces lie in the block just taken out of the list.
                unsafe {
                    if at > start {
                        self.insert(start, at - start);
                    }
                    if start + block_size > at + size {
                        self.insert(at + size, start + block_size - (at + size));
                    }
                }
                return at as *mut u8;
            }
            prev = cur;
            cur = next;
        }
        null_mut()
    }

    /// Gives a block from `alloc` back.
    ///
    /// # Safety
    /// `ptr` came from this heap's `alloc` with this `layout` and is not used any more.
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's promise.
        unsafe { self.insert(ptr as usize, Self::size_of(layout)) };
    }

    /// # Safety
    /// `prev` is null (then `head` is the node being unlinked) or the node before it.
    unsafe fn unlink(&mut self, prev: *mut Node, next: *mut Node) {
        if prev.is_null() {
            self.head = next;
        } else {
            // SAFETY: a node of the list.
            unsafe { (*prev).next = next };
        }
    }

    /// Puts the free block `[at, at + size)` into the list in address order, merged with a
    /// neighbour it touches.
    ///
    /// # Safety
    /// The block is free memory of this heap, granule-aligned, in no list node.
    unsafe fn insert(&mut self, at: usize, size: usize) {
        self.free += size;
        let mut prev: *mut Node = null_mut();
        let mut cur = self.head;
        // SAFETY (whole body): nodes of the list and the block the caller gave are memory the
        // heap owns; no two of them overlap.
        unsafe {
            while !cur.is_null() && (cur as usize) < at {
                prev = cur;
                cur = (*cur).next;
            }
            let node = at as *mut Node;
            node.write(Node { size, next: cur });
            if !cur.is_null() && at + size == cur as usize {
                (*node).size += (*cur).size;
                (*node).next = (*cur).next;
            }
            if prev.is_null() {
                self.head = node;
            } else if prev as usize + (*prev).size == at {
                (*prev).size += (*node).size;
                (*prev).next = (*node).next;
            } else {
                (*prev).next = node;
            }
        }
    }

    /// The free blocks as (address, size), in list order (for tests).
    #[cfg(test)]
    fn blocks(&self) -> std::vec::Vec<(usize, usize)> {
        let mut v = std::vec::Vec::new();
        let mut cur = self.head;
        while !cur.is_null() {
            // SAFETY: nodes of the list.
            unsafe {
                v.push((cur as usize, (*cur).size));
                cur = (*cur).next;
            }
        }
        v
    }
}

#[cfg(all(feature = "heap", not(test)))]
mod global {
    use super::Heap;
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::UnsafeCell;
    use core::sync::atomic::{AtomicBool, Ordering};

    /// The heap behind a spin lock, set up on first use.
    pub struct GuestHeap {
        locked: AtomicBool,
        heap: UnsafeCell<(bool, Heap)>,
    }

    // SAFETY: `heap` is touched only with `locked` held.
    unsafe impl Sync for GuestHeap {}

    extern "C" {
        /// The end of the image (guest.ld).
        static __guest_end: u8;
    }

    impl GuestHeap {
        pub fn with<R>(&self, f: impl FnOnce(&mut Heap) -> R) -> R {
            while self.locked.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
                core::hint::spin_loop();
            }
            // SAFETY: the lock is held; nothing else reaches `heap`.
            let (ready, heap) = unsafe { &mut *self.heap.get() };
            if !*ready {
                *ready = true;
                // SAFETY: the boot information page is the hypervisor's, read-only for us
                // in practice; RAM from the image's end to the stacks is used by nothing else.
                unsafe {
                    let info = &*(crate::abi::BOOT_INFO_GPA as *const crate::abi::BootInfo);
                    let start = &raw const __guest_end as usize;
                    let stacks = (info.vcpu_count.max(1)).saturating_mul(crate::abi::VCPU_STACK_RESERVE);
                    let end = info.memory_size.saturating_sub(stacks) as usize;
                    if end > start {
                        heap.add(start, end - start);
                    }
                }
            }
            let r = f(heap);
            self.locked.store(false, Ordering::Release);
            r
        }
    }

    unsafe impl GlobalAlloc for GuestHeap {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            self.with(|h| h.alloc(layout))
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: GlobalAlloc's contract: `ptr` came from `alloc` with `layout`.
            self.with(|h| unsafe { h.dealloc(ptr, layout) })
        }
    }

    #[global_allocator]
    pub static HEAP: GuestHeap = GuestHeap { locked: AtomicBool::new(false), heap: UnsafeCell::new((false, Heap::empty())) };
}

/// Bytes free in the guest's heap now, and its size (feature `heap`; both 0 before the first
/// allocation).
#[cfg(all(feature = "heap", not(test)))]
pub fn stats() -> (usize, usize) {
    global::HEAP.with(|h| h.free())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Area(std::vec::Vec<u128>);

    fn heap(bytes: usize) -> (Heap, Area, usize) {
        let mut area = Area(std::vec![0u128; bytes / 16]);
        let start = area.0.as_mut_ptr() as usize;
        let mut h = Heap::empty();
        // SAFETY: the vector is ours and outlives the heap in each test.
        unsafe { h.add(start, bytes) };
        (h, area, start)
    }

    #[test]
    fn blocks_come_from_the_area_aligned_and_go_back_merged() {
        let (mut h, _area, start) = heap(4096);
        assert_eq!(h.free(), (4096, 4096));
        let a = h.alloc(Layout::from_size_align(1, 1).unwrap());
        let b = h.alloc(Layout::from_size_align(100, 8).unwrap());
        let c = h.alloc(Layout::from_size_align(64, 256).unwrap());
        assert_eq!(a as usize, start);
        assert_eq!(b as usize, start + 16);
        assert_eq!(c as usize % 256, 0);
        assert_eq!(h.free().0, 4096 - 16 - 112 - 64);
        // SAFETY: each from `alloc` with that layout.
        unsafe {
            h.dealloc(b, Layout::from_size_align(100, 8).unwrap());
            h.dealloc(a, Layout::from_size_align(1, 1).unwrap());
            h.dealloc(c, Layout::from_size_align(64, 256).unwrap());
        }
        assert_eq!(h.blocks(), [(start, 4096)]);
        assert_eq!(h.free(), (4096, 4096));
    }

    #[test]
    fn out_of_memory_is_null_and_harms_nothing() {
        let (mut h, _area, _) = heap(1024);
        assert!(h.alloc(Layout::from_size_align(1025, 1).unwrap()).is_null());
        assert!(h.alloc(Layout::from_size_align(isize::MAX as usize - 64, 1).unwrap()).is_null());
        assert!(h.alloc(Layout::from_size_align(16, 1 << 20).unwrap()).is_null());
        let all = h.alloc(Layout::from_size_align(1024, 16).unwrap());
        assert!(!all.is_null());
        assert!(h.alloc(Layout::new::<u8>()).is_null());
        assert_eq!(h.free().0, 0);
    }

    /// Random allocations and frees: no two live blocks overlap, all lie in the area, and
    /// freeing everything leaves one block of the whole area.
    #[test]
    fn random_churn_never_overlaps_and_merges_back() {
        let size = 64 * 1024;
        let (mut h, _area, start) = heap(size);
        let mut live: std::vec::Vec<(usize, Layout)> = std::vec::Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 3 != 0 || live.is_empty() {
                let layout = Layout::from_size_align((x >> 8) as usize % 700 + 1, 1 << ((x >> 20) % 8)).unwrap();
                let p = h.alloc(layout) as usize;
                if p == 0 {
                    continue;
                }
                assert_eq!(p % layout.align(), 0);
                assert!(p >= start && p + layout.size() <= start + size);
                for &(q, l) in &live {
                    assert!(p + layout.size() <= q || q + l.size() <= p, "{p:#x} overlaps {q:#x}");
                }
                live.push((p, layout));
            } else {
                let (p, l) = live.swap_remove((x >> 32) as usize % live.len());
                // SAFETY: from `alloc` with `l`.
                unsafe { h.dealloc(p as *mut u8, l) };
            }
        }
        for (p, l) in live.drain(..) {
            // SAFETY: from `alloc` with `l`.
            unsafe { h.dealloc(p as *mut u8, l) };
        }
        assert_eq!(h.blocks(), [(start, size)]);
    }
}
