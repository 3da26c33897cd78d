//! The physical memory map: printed as a table at boot, and turned into the list of free
//! ranges (usable RAM minus low memory, the image, the loader's structures and modules)
//! that the frame allocator manages.

use crate::platform::bootinfo::{BootInfo, RegionKind};

pub const PAGE_SIZE: u64 = 4096;
const MIB: u64 = 1 << 20;

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// Physical range of the hypervisor image (code, data, bss).
pub fn kernel_range() -> (u64, u64) {
    // Linker-defined symbols: only their addresses are used, never their contents.
    (&raw const __kernel_start as u64, &raw const __kernel_end as u64)
}

/// Prints the memory map and returns the usable total in bytes.
pub fn log_map(bi: &BootInfo) -> u64 {
    log::info!(target: "mem", "physical memory map ({} regions, from {}):", bi.regions().len(), bi.protocol);
    log::info!(target: "mem", "  {:>18}  {:>18}  {:>10}  {}", "start", "end", "size", "kind");
    let mut usable = 0;
    for r in bi.regions() {
        log::info!(target: "mem", "  {:#018x}  {:#018x}  {:>6} KiB  {}",
            r.start, r.start + r.len, r.len / 1024, r.kind.name());
        if r.kind == RegionKind::Usable {
            usable += r.len;
        }
    }
    log::info!(target: "mem", "usable memory: {} MiB ({} KiB)", usable / MIB, usable / 1024);
    usable
}

/// Calls `f(start, end)` for every page-aligned free range: usable RAM above 1 MiB that
/// is not the image, the boot information or the boot module.
pub fn for_each_free_range(bi: &BootInfo, mut f: impl FnMut(u64, u64)) {
    let mut taken = [(0u64, MIB), kernel_range(), bi.info_range, (0, 0)];
    if let Some(m) = bi.module {
        taken[3] = (m.start, m.start + m.len);
    }
    for r in bi.regions().iter().filter(|r| r.kind == RegionKind::Usable) {
        let start = (r.start + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let end = (r.start + r.len) & !(PAGE_SIZE - 1);
        split(start, end, &taken, &mut f);
    }
}

/// Emits the parts of [start, end) not covered by any range in `taken`.
fn split(start: u64, end: u64, taken: &[(u64, u64)], f: &mut impl FnMut(u64, u64)) {
    if start >= end {
        return;
    }
    for (i, &(ts, te)) in taken.iter().enumerate() {
        let ts = ts & !(PAGE_SIZE - 1);
        let te = (te + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        if ts < end && te > start {
            let rest = &taken[i + 1..];
            split(start, ts.max(start), rest, f);
            split(te.min(end), end, rest, f);
            return;
        }
    }
    f(start, end);
}

extern "C" {
    /// The boot PDPT (boot.rs): entries 0-3 map the first 4 GiB through 2 MiB pages.
    static mut boot_pdpt: [u64; 512];
}

/// Highest end of usable RAM.
pub fn top_of_ram(bi: &BootInfo) -> u64 {
    bi.regions().iter().filter(|r| r.kind == RegionKind::Usable).map(|r| r.start + r.len).max().unwrap_or(0)
}

/// Extends the identity map beyond 4 GiB up to `top` with 1 GiB pages (up to 512 GiB);
/// returns how far memory is now mapped. Without 1 GiB pages memory stays at 4 GiB.
pub fn identity_map_up_to(top: u64, gib_pages: bool) -> u64 {
    const GIB: u64 = 1 << 30;
    let top = top.min(512 * GIB);
    if top <= 4 * GIB || !gib_pages {
        return top.min(4 * GIB);
    }
    let gibs = top.div_ceil(GIB) as usize;
    // SAFETY: boot_pdpt is the live PDPT; entries 4.. are unused, and each new entry is a
    // present, writable 1 GiB identity page (PS, bit 7). Nothing maps them yet, so no TLB
    // entry can be stale.
    unsafe {
        let pdpt = &raw mut boot_pdpt;
        for i in 4..gibs {
            (*pdpt)[i] = (i as u64 * GIB) | 0x83;
        }
    }
    gibs as u64 * GIB
}
