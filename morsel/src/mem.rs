//! The two boundaries to the rest of the system: `PhysMem` (access to table frames by
//! host-physical address) and `FrameAlloc` (where table and data frames come from).
//!
//! In the hypervisor memory is identity-mapped, so `PhysMem` is a pointer cast and `FrameAlloc`
//! wraps the `allocator` crate; host tests use `SimMem` (module `sim`), which does both.

use crate::addr::HostPhysAddr;

/// Access to 4 KiB page-table frames by host-physical address.
///
/// This crate only passes addresses of frames it got from a `FrameAlloc` for use as tables,
/// and `index < 512`.
pub trait PhysMem {
    /// Reads entry `index` of the table frame at `table`.
    fn read(&self, table: HostPhysAddr, index: usize) -> u64;
    /// Writes entry `index` of the table frame at `table`. The hardware walker may read the
    /// entry concurrently: implementations store the 8 bytes with one (volatile) store.
    fn write(&self, table: HostPhysAddr, index: usize, value: u64);
    /// Fills a freshly allocated table frame with zeros (all entries not present).
    fn zero_table(&self, table: HostPhysAddr);
    /// Clears a data frame of `1 << order` 4 KiB pages before a morsel hands it out, so no
    /// previous owner's data leaks. Simulated memory, which has no data, does nothing.
    fn zero_data(&self, frame: HostPhysAddr, order: u32);
    /// Writes `new` into entry `index` of `table` only if it holds `current` now: `Ok(current)`,
    /// or `Err(what it holds)` and nothing written. Where several CPUs edit the same leaves at
    /// once (ExMap batches sharing a region: `Leaves::try_map`, `Leaves::take`) this must be
    /// one atomic compare-and-swap (AcqRel; the hypervisor's identity map overrides it). The
    /// default reads, compares and writes: enough for memory only one thread edits.
    fn compare_exchange(&self, table: HostPhysAddr, index: usize, current: u64, new: u64) -> Result<u64, u64> {
        match self.read(table, index) {
            now if now == current => {
                self.write(table, index, new);
                Ok(now)
            }
            now => Err(now),
        }
    }
    /// Writes `new` into entry `index` of `table` and returns what it held, in one atomic
    /// exchange where several CPUs edit the same leaves at once (`Leaves::take`; the
    /// hypervisor's identity map overrides it). The default reads, then writes.
    fn swap(&self, table: HostPhysAddr, index: usize, new: u64) -> u64 {
        let old = self.read(table, index);
        self.write(table, index, new);
        old
    }
}

/// A source of physical frames (order 0 = 4 KiB, 9 = 2 MiB, 18 = 1 GiB).
pub trait FrameAlloc {
    /// A free frame of `1 << order` pages aligned to its size, or `None` when out of memory.
    fn alloc(&self, order: u32) -> Option<HostPhysAddr>;
    /// Gives back a frame that `alloc(order)` returned.
    fn free(&self, frame: HostPhysAddr, order: u32);
}

impl<T: PhysMem + ?Sized> PhysMem for &T {
    fn read(&self, table: HostPhysAddr, index: usize) -> u64 {
        (**self).read(table, index)
    }
    fn write(&self, table: HostPhysAddr, index: usize, value: u64) {
        (**self).write(table, index, value)
    }
    fn zero_table(&self, table: HostPhysAddr) {
        (**self).zero_table(table)
    }
    fn zero_data(&self, frame: HostPhysAddr, order: u32) {
        (**self).zero_data(frame, order)
    }
    fn compare_exchange(&self, table: HostPhysAddr, index: usize, current: u64, new: u64) -> Result<u64, u64> {
        (**self).compare_exchange(table, index, current, new)
    }
    fn swap(&self, table: HostPhysAddr, index: usize, new: u64) -> u64 {
        (**self).swap(table, index, new)
    }
}

impl<T: FrameAlloc + ?Sized> FrameAlloc for &T {
    fn alloc(&self, order: u32) -> Option<HostPhysAddr> {
        (**self).alloc(order)
    }
    fn free(&self, frame: HostPhysAddr, order: u32) {
        (**self).free(frame, order)
    }
}
