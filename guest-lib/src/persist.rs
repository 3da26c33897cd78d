//! Making stores durable on persistent memory without eADR: `persist(range)` writes back
//! every cache line of the range and fences, so a store before it reaches the media before
//! any store after it. The write-back instruction is chosen once from CPUID: CLWB (keeps the
//! line cached), else CLFLUSHOPT, else CLFLUSH (Intel SDM Vol. 2A "CLWB", "CLFLUSHOPT",
//! "CLFLUSH"; CPUID.(EAX=7,ECX=0):EBX bits 24 and 23, CPUID.1:EDX bit 19). A volatile region
//! needs none of this; on one it only costs the write-backs.

use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

/// The write-back instruction (bits 0..8) and the cache line size (bits 8..): 0 = not yet
/// read from CPUID.
static HOW: AtomicU64 = AtomicU64::new(0);

/// The instructions `persist` may use, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteBack {
    /// CLWB: written back, the line may stay cached.
    Clwb = 1,
    /// CLFLUSHOPT: written back and evicted, weakly ordered (SFENCE orders it).
    Clflushopt = 2,
    /// CLFLUSH: written back and evicted, ordered with stores.
    Clflush = 3,
    /// None offered (CPUID says no CLFLUSH): only the fence is done.
    None = 4,
}

/// What this CPU offers (from CPUID; read once) and its cache line size in bytes.
pub fn write_back() -> (WriteBack, u64) {
    let mut how = HOW.load(Ordering::Relaxed);
    if how == 0 {
        // SAFETY: CPUID has no side effects; leaves 1 and 7 exist on every x86-64 CPU that
        // runs a guest (the hypervisor answers CPUID for the guest).
        #[allow(unused_unsafe)] // safe functions since Rust 1.94, unsafe before
        let (l1, l7) = unsafe { (core::arch::x86_64::__cpuid(1), core::arch::x86_64::__cpuid_count(7, 0)) };
        let kind = choose(l7.ebx, l1.edx) as u64;
        let line = match (l1.ebx >> 8) & 0xff {
            0 => 64,
            n => n as u64 * 8,
        };
        how = kind | line << 8;
        HOW.store(how, Ordering::Relaxed);
    }
    let kind = match how & 0xff {
        1 => WriteBack::Clwb,
        2 => WriteBack::Clflushopt,
        3 => WriteBack::Clflush,
        _ => WriteBack::None,
    };
    (kind, how >> 8)
}

/// The best write-back from CPUID leaf 7's EBX and leaf 1's EDX.
fn choose(leaf7_ebx: u32, leaf1_edx: u32) -> WriteBack {
    if leaf7_ebx & 1 << 24 != 0 {
        WriteBack::Clwb
    } else if leaf7_ebx & 1 << 23 != 0 {
        WriteBack::Clflushopt
    } else if leaf1_edx & 1 << 19 != 0 {
        WriteBack::Clflush
    } else {
        WriteBack::None
    }
}

/// The start address of every cache line of `range` (`line` a power of two).
fn lines(range: Range<u64>, line: u64) -> impl Iterator<Item = u64> {
    let start = range.start & !(line - 1);
    let end = if range.end <= range.start { start } else { range.end };
    (start..end).step_by(line as usize)
}

/// Writes back every cache line that holds a byte of `range` (guest addresses, as from
/// `MorselMut::addr`) and fences (SFENCE): the stores to it made before are durable before
/// any store made after returns. An empty range only fences.
pub fn persist(range: Range<u64>) {
    let (kind, line) = write_back();
    for at in lines(range, line) {
        let p = at as *const u8;
        // SAFETY: a cache line write-back of an address the caller stored to (a mapped
        // guest address); it changes no memory and faults like a load if unmapped.
        unsafe {
            match kind {
                WriteBack::Clwb => core::arch::asm!("clwb [{}]", in(reg) p, options(nostack, preserves_flags)),
                WriteBack::Clflushopt => core::arch::asm!("clflushopt [{}]", in(reg) p, options(nostack, preserves_flags)),
                WriteBack::Clflush => core::arch::asm!("clflush [{}]", in(reg) p, options(nostack, preserves_flags)),
                WriteBack::None => {}
            }
        }
    }
    // SAFETY: SFENCE orders the write-backs before later stores; no memory is changed.
    unsafe { core::arch::asm!("sfence", options(nostack, preserves_flags)) };
}

/// `persist` over the bytes of `value`.
pub fn persist_value<T: ?Sized>(value: &T) {
    let start = value as *const T as *const u8 as u64;
    persist(start..start + core::mem::size_of_val(value) as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_instruction_is_chosen() {
        assert_eq!(choose(1 << 24 | 1 << 23, 1 << 19), WriteBack::Clwb);
        assert_eq!(choose(1 << 23, 1 << 19), WriteBack::Clflushopt);
        assert_eq!(choose(0, 1 << 19), WriteBack::Clflush);
        assert_eq!(choose(0, 0), WriteBack::None);
    }

    #[test]
    fn every_line_of_a_range_is_visited_once() {
        let v: std::vec::Vec<u64> = lines(0x1038..0x1041, 64).collect();
        assert_eq!(v, [0x1000, 0x1040]);
        assert_eq!(lines(0x1000..0x1040, 64).count(), 1);
        assert_eq!(lines(0x1000..0x1001, 64).count(), 1);
        assert_eq!(lines(0x1000..0x1000, 64).count(), 0);
        assert_eq!(lines(0x103f..0x1040, 64).collect::<std::vec::Vec<_>>(), [0x1000]);
        assert_eq!(lines(0..4096, 64).count(), 64);
    }
}
