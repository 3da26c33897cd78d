//! Writing the persistent region back to the media: the cache-line write-back instruction
//! this CPU has, and the `formats::pmem_layout::Media` the host-tested write order runs on.

use formats::pmem_layout::Media;

/// How this CPU writes a cache line back to the media: CLWB (the line may stay cached),
/// CLFLUSHOPT, else CLFLUSH (CPUID.(EAX=7,ECX=0):EBX bit 24 CLWB, bit 23 CLFLUSHOPT; Intel SDM
/// Vol. 2A "CLWB", "CLFLUSHOPT"). The first two are unordered among themselves: `fence`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FlushOp {
    Clwb,
    Clflushopt,
    Clflush,
}

impl FlushOp {
    pub(super) fn detect() -> FlushOp {
        let f = raw_cpuid::CpuId::new().get_extended_feature_info();
        match f {
            Some(f) if f.has_clwb() => FlushOp::Clwb,
            Some(f) if f.has_clflushopt() => FlushOp::Clflushopt,
            _ => FlushOp::Clflush,
        }
    }
}

/// The region's memory through the identity map, written back with `FlushOp`.
pub(super) struct Cpu {
    pub(super) op: FlushOp,
    /// The region: every store and flush lies inside.
    pub(super) base: u64,
    pub(super) len: u64,
}

impl Media for Cpu {
    fn store(&mut self, pa: u64, value: u64) {
        assert!(pa >= self.base && pa + 8 <= self.base + self.len && pa.is_multiple_of(8));
        // SAFETY: an aligned word of the region (checked above), identity-mapped; only the
        // pmem code writes the superblock and the directory.
        unsafe { (pa as *mut u64).write_volatile(value) }
    }

    fn flush(&mut self, pa: u64) {
        // SAFETY: `pa` is an identity-mapped address; these only write back its cache line.
        unsafe {
            match self.op {
                FlushOp::Clwb => core::arch::asm!("clwb [{}]", in(reg) pa, options(nostack, preserves_flags)),
                FlushOp::Clflushopt => core::arch::asm!("clflushopt [{}]", in(reg) pa, options(nostack, preserves_flags)),
                FlushOp::Clflush => core::arch::x86_64::_mm_clflush(pa as *const u8),
            }
        }
    }

    fn fence(&mut self) {
        // SAFETY: a store fence has no operands.
        unsafe { core::arch::x86_64::_mm_sfence() };
    }
}
