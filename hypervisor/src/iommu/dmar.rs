//! The ACPI DMA Remapping table (VT-d spec 8): the host address width and each remapping
//! unit (DRHD) with its register base and device scope. Parsed from bytes with every length
//! checked, so a malformed table is an error, never an out-of-bounds read.

use crate::pci::Bdf;
use alloc::vec::Vec;

/// One DMA remapping hardware unit (DRHD, VT-d spec 8.3).
#[derive(Clone, Debug)]
pub struct Drhd {
    pub segment: u16,
    pub register_base: u64,
    /// INCLUDE_PCI_ALL: the unit covers every device of the segment not listed elsewhere.
    pub include_all: bool,
    /// Endpoint devices from the device scope (type 1) with a direct path.
    pub devices: Vec<Bdf>,
}

/// What the hypervisor uses from the DMAR.
#[derive(Clone, Debug)]
pub struct Dmar {
    /// Host address width: N + 1 bits (VT-d spec 8.1).
    pub host_address_width: u8,
    pub units: Vec<Drhd>,
}

/// Reads the DMAR at physical address `pa` (identity-mapped).
///
/// # Safety
/// `pa` must be the address of an ACPI table (its header's length is trusted as the extent).
pub unsafe fn read(pa: u64) -> Result<Dmar, &'static str> {
    // SAFETY: an ACPI table header is 36 bytes; bytes 4..8 are its length.
    let len = unsafe { ((pa + 4) as *const u32).read_unaligned() } as usize;
    if !(48..=1 << 20).contains(&len) {
        return Err("DMAR length out of range");
    }
    // SAFETY: the table spans `len` bytes in identity-mapped firmware memory.
    parse(unsafe { core::slice::from_raw_parts(pa as *const u8, len) })
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?))
}

fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// Parses the whole table (header included).
pub fn parse(t: &[u8]) -> Result<Dmar, &'static str> {
    if t.get(0..4) != Some(b"DMAR") {
        return Err("not a DMAR table");
    }
    // Header 36 bytes, host address width at 36, flags at 37, 10 reserved (VT-d spec 8.1).
    let haw = *t.get(36).ok_or("DMAR too short")?;
    let mut units = Vec::new();
    let mut at = 48;
    while at + 4 <= t.len() {
        // Remapping structure: type u16, length u16 (VT-d spec 8.2).
        let (kind, len) = (u16_at(t, at).ok_or("truncated")?, u16_at(t, at + 2).ok_or("truncated")? as usize);
        if len < 4 || at + len > t.len() {
            return Err("remapping structure length out of range");
        }
        let s = &t[at..at + len];
        if kind == 0 {
            // DRHD: flags at 4 (bit 0 INCLUDE_PCI_ALL), segment at 6, register base at 8,
            // device scopes from 16 (VT-d spec 8.3).
            let base = u64_at(s, 8).ok_or("DRHD too short")?;
            let mut unit = Drhd { segment: u16_at(s, 6).ok_or("DRHD too short")?, register_base: base,
                include_all: s[4] & 1 != 0, devices: Vec::new() };
            let mut d = 16;
            while d + 6 <= s.len() {
                // Device scope: type, length, reserved u16, enumeration id, start bus, then
                // (device, function) pairs of the path (VT-d spec 8.3.1).
                let (stype, slen) = (s[d], s[d + 1] as usize);
                if slen < 6 || d + slen > s.len() {
                    return Err("device scope length out of range");
                }
                // Type 1 = PCI endpoint; a one-hop path names the device on the start bus.
                if stype == 1 && slen == 8 {
                    unit.devices.push(Bdf::new(s[d + 5], s[d + 6], s[d + 7]));
                }
                d += slen;
            }
            units.push(unit);
        }
        at += len;
    }
    Ok(Dmar { host_address_width: haw + 1, units })
}
