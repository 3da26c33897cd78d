//! The ACPI NVDIMM Firmware Interface Table (ACPI 6.4, 5.2.25): where persistent memory lies.
//! Only the System Physical Address range structures of type "persistent memory" are used.
//! Parsed from bytes with every length checked, so a malformed table is an error, never an
//! out-of-bounds read.

use crate::le::{u16_at, u64_at};
use alloc::vec::Vec;

/// One persistent-memory range (an SPA Range Structure, ACPI 6.4 5.2.25.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmemRange {
    pub base: u64,
    pub len: u64,
}

/// Address range type GUID of byte-addressable persistent memory,
/// 66F0D379-B4F3-4074-AC43-0D3318B78CDB, as stored (ACPI 6.4 Table 5.135).
const PERSISTENT_MEMORY: [u8; 16] =
    [0x79, 0xd3, 0xf0, 0x66, 0xf3, 0xb4, 0x74, 0x40, 0xac, 0x43, 0x0d, 0x33, 0x18, 0xb7, 0x8c, 0xdb];

/// The persistent-memory ranges of a whole NFIT (header included).
pub fn parse(t: &[u8]) -> Result<Vec<PmemRange>, &'static str> {
    if t.get(0..4) != Some(b"NFIT") {
        return Err("not an NFIT");
    }
    // Header 36 bytes, then 4 reserved (ACPI 6.4 Table 5.131).
    if t.len() < 40 {
        return Err("NFIT shorter than its 40-byte header");
    }
    let mut ranges = Vec::new();
    let mut at = 40;
    while at + 4 <= t.len() {
        // Every structure starts with type u16, length u16.
        let (kind, len) = (u16_at(t, at).ok_or("truncated")?, u16_at(t, at + 2).ok_or("truncated")? as usize);
        if len < 4 || at + len > t.len() {
            return Err("NFIT structure length out of range");
        }
        let s = &t[at..at + len];
        // SPA Range Structure (type 0, at least 56 bytes): GUID at 16, base at 32, length at
        // 40 (ACPI 6.4 Table 5.133).
        if kind == 0 {
            if len < 56 {
                return Err("SPA range structure shorter than 56 bytes");
            }
            if s[16..32] == PERSISTENT_MEMORY {
                let (base, size) = (u64_at(s, 32).ok_or("truncated")?, u64_at(s, 40).ok_or("truncated")?);
                if size == 0 || base.checked_add(size).is_none() {
                    return Err("SPA range with an empty or wrapping extent");
                }
                ranges.push(PmemRange { base, len: size });
            }
        }
        at += len;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn spa(guid: [u8; 16], base: u64, len: u64) -> Vec<u8> {
        let mut s = std::vec![0u8; 56];
        s[2..4].copy_from_slice(&56u16.to_le_bytes());
        s[16..32].copy_from_slice(&guid);
        s[32..40].copy_from_slice(&base.to_le_bytes());
        s[40..48].copy_from_slice(&len.to_le_bytes());
        s
    }

    /// An NFIT like QEMU's for one 64 MiB NVDIMM at 4 GiB: its SPA range, then a region
    /// mapping structure (type 1) that the parser skips.
    fn table() -> Vec<u8> {
        let mut t = std::vec![0u8; 40];
        t[..4].copy_from_slice(b"NFIT");
        t.extend_from_slice(&spa(PERSISTENT_MEMORY, 1 << 32, 64 << 20));
        let mut map = std::vec![0u8; 48];
        map[0] = 1;
        map[2] = 48;
        t.extend_from_slice(&map);
        t
    }

    #[test]
    fn finds_the_persistent_range() {
        assert_eq!(parse(&table()).unwrap(), [PmemRange { base: 1 << 32, len: 64 << 20 }]);
    }

    #[test]
    fn skips_ranges_of_other_types() {
        let mut t = table();
        let mut volatile = PERSISTENT_MEMORY;
        volatile[0] ^= 1;
        t.extend_from_slice(&spa(volatile, 8 << 30, 1 << 30));
        assert_eq!(parse(&t).unwrap().len(), 1);
    }

    #[test]
    fn refuses_malformed_tables() {
        assert!(parse(b"DMAR").is_err());
        assert!(parse(&table()[..39]).is_err());
        let mut t = table();
        t.truncate(t.len() - 1); // the last structure runs past the end
        assert!(parse(&t).is_err());
        let mut t = table();
        t[42] = 2; // a structure of length 2
        assert!(parse(&t).is_err());
        let mut t = table();
        t[42] = 40; // an SPA range too short for its fields
        assert!(parse(&t).is_err());
        let mut t = std::vec![0u8; 40];
        t[..4].copy_from_slice(b"NFIT");
        t.extend_from_slice(&spa(PERSISTENT_MEMORY, u64::MAX - 4095, 8192));
        assert!(parse(&t).is_err());
    }
}
