//! Sets of the persistent region's frames: what records hold, what damaged records still
//! reach (quarantined), during recovery's sweep.

use crate::platform::memory::PAGE_SIZE;
use alloc::vec::Vec;
use morsel::HostPhysAddr;

/// A set of the region's 4 KiB frames (one bit each); frames outside the region are never in it.
pub struct FrameSet {
    pub(super) base: u64,
    pub(super) frames: usize,
    pub(super) bits: Vec<u64>,
}

impl FrameSet {
    /// The frame indexes `frame` of `order` covers inside the region.
    fn span(&self, frame: HostPhysAddr, order: u32) -> core::ops::Range<usize> {
        let Some(off) = frame.as_u64().checked_sub(self.base) else { return 0..0 };
        let first = usize::try_from(off / PAGE_SIZE).unwrap_or(usize::MAX).min(self.frames);
        first..first.saturating_add(1usize << order.min(30)).min(self.frames)
    }

    pub(super) fn has(&self, i: usize) -> bool {
        self.bits[i / 64] >> (i % 64) & 1 == 1
    }

    /// Adds the frames; returns how many of them were in the set already.
    pub fn mark(&mut self, frame: HostPhysAddr, order: u32) -> u64 {
        let mut before = 0;
        for i in self.span(frame, order) {
            before += self.has(i) as u64;
            self.bits[i / 64] |= 1 << (i % 64);
        }
        before
    }

    /// Whether any of the frames is in the set.
    pub fn any(&self, frame: HostPhysAddr, order: u32) -> bool {
        self.span(frame, order).any(|i| self.has(i))
    }

    /// Frames in the set.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }
}
