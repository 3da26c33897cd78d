//! Reading the ACPI DMA Remapping table from firmware memory; the checked parser lives in
//! the host-tested library (`formats::dmar`).

pub use formats::dmar::{parse, Dmar};

/// Reads the DMAR at physical address `pa` (identity-mapped).
///
/// # Safety
/// `pa` must be the address of an ACPI table (its header's length is trusted as the extent).
pub unsafe fn read(pa: u64) -> Result<Dmar, &'static str> {
    // SAFETY: the caller's promise.
    unsafe { read_table(pa, parse) }
}

/// Reads the ACPI table at `pa` (its header's length bounds it) and hands its bytes to `parse`.
///
/// # Safety
/// `pa` must be the address of an ACPI table (its header's length is trusted as the extent).
pub unsafe fn read_table<T>(pa: u64, parse: fn(&[u8]) -> Result<T, &'static str>) -> Result<T, &'static str> {
    // SAFETY: an ACPI table header is 36 bytes; bytes 4..8 are its length.
    let len = unsafe { ((pa + 4) as *const u32).read_unaligned() } as usize;
    if !(48..=1 << 20).contains(&len) {
        return Err("table length out of range");
    }
    // SAFETY: the table spans `len` bytes in identity-mapped firmware memory.
    parse(unsafe { core::slice::from_raw_parts(pa as *const u8, len) })
}
