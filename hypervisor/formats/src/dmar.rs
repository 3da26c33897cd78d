//! The ACPI DMA Remapping table (VT-d spec 8): the host address width and each remapping
//! unit (DRHD) with its register base and device scope. Parsed from bytes with every length
//! checked, so a malformed table is an error, never an out-of-bounds read.

use crate::bdf::Bdf;
use crate::le::{u16_at, u64_at};
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

/// Parses the whole table (header included).
pub fn parse(t: &[u8]) -> Result<Dmar, &'static str> {
    if t.get(0..4) != Some(b"DMAR") {
        return Err("not a DMAR table");
    }
    // Header 36 bytes, host address width at 36, flags at 37, 10 reserved (VT-d spec 8.1).
    if t.len() < 48 {
        return Err("DMAR shorter than its 48-byte header");
    }
    let haw = t[36];
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// A DMAR like QEMU q35's: HAW 38 (39 bits), one DRHD at 0xfed90000 listing 00:03.0
    /// and 00:04.0.
    fn table() -> Vec<u8> {
        let mut t = std::vec![0u8; 48];
        t[..4].copy_from_slice(b"DMAR");
        t[36] = 38;
        let mut drhd = std::vec![0u8; 16];
        drhd[8..16].copy_from_slice(&0xfed9_0000u64.to_le_bytes());
        for dev in [3u8, 4] {
            drhd.extend_from_slice(&[1, 8, 0, 0, 0, 0, dev, 0]);
        }
        let len = drhd.len() as u16;
        drhd[2..4].copy_from_slice(&len.to_le_bytes());
        t.extend_from_slice(&drhd);
        let total = t.len() as u32;
        t[4..8].copy_from_slice(&total.to_le_bytes());
        t
    }

    #[test]
    fn parses_a_q35_like_table() {
        let d = parse(&table()).unwrap();
        assert_eq!(d.host_address_width, 39);
        assert_eq!(d.units.len(), 1);
        assert_eq!(d.units[0].register_base, 0xfed9_0000);
        assert!(!d.units[0].include_all);
        assert_eq!(d.units[0].devices, [Bdf::new(0, 3, 0), Bdf::new(0, 4, 0)]);
    }

    #[test]
    fn rejects_malformed_tables() {
        let mut t = table();
        t[0] = b'X';
        assert!(parse(&t).is_err());
        let t = table();
        assert!(parse(&t[..40]).is_err());
        // A remapping structure claiming more bytes than the table has.
        let mut t = table();
        t[50..52].copy_from_slice(&200u16.to_le_bytes());
        assert!(parse(&t).is_err());
        // A device scope with a length running past its structure.
        let mut t = table();
        t[48 + 17] = 60;
        assert!(parse(&t).is_err());
        // Every truncation is an error or a shorter table, never a panic.
        let t = table();
        for n in 0..t.len() {
            let _ = parse(&t[..n]);
        }
    }
}
