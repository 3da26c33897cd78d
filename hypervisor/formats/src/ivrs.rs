//! The ACPI I/O Virtualization Reporting Structure (AMD I/O Virtualization Technology (IOMMU)
//! Specification 48882, 5 "I/O Virtualization ACPI Table"): each IOMMU (IVHD block) with its
//! PCI function, register base and the devices it translates. Parsed from bytes with every
//! length checked, so a malformed table is an error, never an out-of-bounds read.

use crate::bdf::Bdf;
use crate::le::{u16_at, u64_at};
use alloc::vec::Vec;

/// One IOMMU (IVHD, IOMMU spec 5.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ivhd {
    /// Block type: 0x10, 0x11 or 0x40 (the later ones add the EFR image, spec 5.2.2.2-3).
    pub kind: u8,
    /// The IOMMU's own PCI function.
    pub device: Bdf,
    pub capability_offset: u16,
    /// The MMIO register base (16 KiB, spec 3.4).
    pub register_base: u64,
    pub segment: u16,
    /// Inclusive ranges of device ids (bus << 8 | devfn) it translates (select, range and
    /// "all" entries, spec 5.2.2.4 table "IVHD device entry types").
    pub devices: Vec<(u16, u16)>,
}

impl Ivhd {
    /// Whether the IVHD names `bdf` among its devices.
    pub fn covers(&self, bdf: Bdf) -> bool {
        let id = bdf.source_id();
        self.devices.iter().any(|&(a, b)| a <= id && id <= b)
    }
}

/// What the hypervisor uses from the IVRS.
#[derive(Clone, Debug)]
pub struct Ivrs {
    /// IVinfo bits 14:8: physical address size (spec 5.2.1).
    pub pa_bits: u8,
    /// IVinfo bits 21:15: virtual address size.
    pub va_bits: u8,
    /// One entry per IOMMU (the first IVHD block of each register base).
    pub units: Vec<Ivhd>,
}

/// Parses the whole table (header included).
pub fn parse(t: &[u8]) -> Result<Ivrs, &'static str> {
    if t.get(0..4) != Some(b"IVRS") {
        return Err("not an IVRS table");
    }
    // Header 36 bytes, IVinfo u32 at 36, 8 reserved bytes (spec 5.2.1).
    if t.len() < 48 {
        return Err("IVRS shorter than its 48-byte header");
    }
    let info = u32::from_le_bytes([t[36], t[37], t[38], t[39]]);
    let mut units: Vec<Ivhd> = Vec::new();
    let mut at = 48;
    while at + 4 <= t.len() {
        // IVDB: type u8, flags u8, length u16 (spec 5.2.2).
        let (kind, len) = (t[at], u16_at(t, at + 2).ok_or("truncated")? as usize);
        if len < 4 || at + len > t.len() {
            return Err("IVRS block length out of range");
        }
        let b = &t[at..at + len];
        // IVHD types 10h, 11h, 40h; IVMD blocks (20h-22h) and unknown types are skipped.
        if matches!(kind, 0x10 | 0x11 | 0x40) {
            // DeviceID at 4, capability offset at 6, base at 8, segment at 16; device
            // entries from 24 (type 10h) or 40 (11h, 40h: EFR image at 24..40).
            let start = if kind == 0x10 { 24 } else { 40 };
            if len < start {
                return Err("IVHD shorter than its header");
            }
            let unit = Ivhd {
                kind,
                device: Bdf::from_source_id(u16_at(b, 4).ok_or("IVHD too short")?),
                capability_offset: u16_at(b, 6).ok_or("IVHD too short")?,
                register_base: u64_at(b, 8).ok_or("IVHD too short")?,
                segment: u16_at(b, 16).ok_or("IVHD too short")?,
                devices: entries(&b[start..])?,
            };
            if !units.iter().any(|u| u.register_base == unit.register_base) {
                units.push(unit);
            }
        }
        at += len;
    }
    Ok(Ivrs { pa_bits: (info >> 8 & 0x7f) as u8, va_bits: (info >> 15 & 0x7f) as u8, units })
}

/// The device entries of one IVHD (spec 5.2.2.4): types 0-63 are 4 bytes, 64-127 8 bytes,
/// 128 and up variable (F0h: 22 bytes plus the UID length in byte 21).
fn entries(e: &[u8]) -> Result<Vec<(u16, u16)>, &'static str> {
    let mut out = Vec::new();
    let mut range_start: Option<u16> = None;
    let mut at = 0;
    while at < e.len() {
        let kind = e[at];
        let len = match kind {
            0..=63 => 4,
            64..=127 => 8,
            0xf0 => 22 + *e.get(at + 21).ok_or("truncated ACPI HID entry")? as usize,
            _ => return Err("unknown variable-length IVHD entry"),
        };
        if at + len > e.len() {
            return Err("IVHD entry runs past its block");
        }
        let id = u16_at(e, at + 1).ok_or("truncated")?;
        match kind {
            // All: every device id (spec: type 1).
            1 => out.push((0, u16::MAX)),
            // Select (2), alias select (42h: the device at 1, its alias at 5), extended select (46h).
            2 | 0x42 | 0x46 => out.push((id, id)),
            // Range start (3), alias range (43h), extended range (47h), ended by type 4.
            3 | 0x43 | 0x47 => range_start = Some(id),
            4 => match range_start.take() {
                Some(s) if s <= id => out.push((s, id)),
                _ => return Err("IVHD range end without a start"),
            },
            // Padding (0), special devices (48h: IOAPIC/HPET), ACPI HID (F0h): no PCI function.
            _ => {}
        }
        at += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IVRS QEMU 7.2 builds for `-machine q35 -device amd-iommu -device edu -device nvme`
    /// (dumped from a boot): IVinfo PASize 40, one IVHD type 10h for the IOMMU at 00:03.0
    /// with base 0xfed80000, select entries for 00:00.0 .. 00:05.0, 00:1f.0/2/3, and an
    /// IOAPIC special entry.
    const QEMU_Q35: [u8; 0x74] = [
        0x49, 0x56, 0x52, 0x53, 0x74, 0x00, 0x00, 0x00, 0x01, 0xbd, 0x42, 0x4f, 0x43, 0x48, 0x53, 0x20,
        0x42, 0x58, 0x50, 0x43, 0x20, 0x20, 0x20, 0x20, 0x01, 0x00, 0x00, 0x00, 0x42, 0x58, 0x50, 0x43,
        0x01, 0x00, 0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x10, 0xd1, 0x44, 0x00, 0x18, 0x00, 0x40, 0x00, 0x00, 0x00, 0xd8, 0xfe, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x44, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0x00,
        0x02, 0x10, 0x00, 0x00, 0x02, 0x18, 0x00, 0x00, 0x02, 0x20, 0x00, 0x00, 0x02, 0x28, 0x00, 0x00,
        0x02, 0xf8, 0x00, 0x00, 0x02, 0xfa, 0x00, 0x00, 0x02, 0xfb, 0x00, 0x00, 0x48, 0x00, 0x00, 0x00,
        0x00, 0xa0, 0x00, 0x01,
    ];

    #[test]
    fn parses_qemu_q35() {
        let i = parse(&QEMU_Q35).unwrap();
        assert_eq!(i.pa_bits, 40);
        assert_eq!(i.units.len(), 1);
        let u = &i.units[0];
        assert_eq!((u.kind, u.device, u.capability_offset, u.register_base, u.segment),
            (0x10, Bdf::new(0, 3, 0), 0x40, 0xfed8_0000, 0));
        assert_eq!(u.devices.len(), 9);
        assert!(u.covers(Bdf::new(0, 4, 0)) && u.covers(Bdf::new(0, 0x1f, 3)));
        assert!(!u.covers(Bdf::new(0, 6, 0)) && !u.covers(Bdf::new(1, 0, 0)));
    }

    #[test]
    fn ranges_all_and_later_block_types() {
        let mut t = QEMU_Q35[..48].to_vec();
        // IVHD 11h: 40-byte header, then range 00:10.0-00:11.7, an 8-byte alias select, all.
        let mut b = std::vec![0x11u8, 0, 0, 0, 0x10, 0, 0x40, 0];
        b.extend_from_slice(&0xfeb8_0000u64.to_le_bytes());
        b.resize(40, 0);
        b.extend_from_slice(&[3, 0x80, 0, 0, 4, 0x8f, 0, 0]);
        b.extend_from_slice(&[0x42, 0x20, 0, 0, 0, 0x28, 0, 0]);
        b.extend_from_slice(&[1, 0, 0, 0]);
        let len = b.len() as u16;
        b[2..4].copy_from_slice(&len.to_le_bytes());
        t.extend_from_slice(&b);
        // A second block for the same unit (type 40h) is not a second unit.
        let mut b40 = b.clone();
        b40[0] = 0x40;
        t.extend_from_slice(&b40);
        let n = t.len() as u32;
        t[4..8].copy_from_slice(&n.to_le_bytes());
        let i = parse(&t).unwrap();
        assert_eq!(i.units.len(), 1);
        assert_eq!(i.units[0].devices, [(0x80, 0x8f), (0x20, 0x20), (0, u16::MAX)]);
        assert_eq!(i.units[0].register_base, 0xfeb8_0000);
    }

    #[test]
    fn rejects_malformed_tables() {
        let mut t = QEMU_Q35;
        t[0] = b'X';
        assert!(parse(&t).is_err());
        assert!(parse(&QEMU_Q35[..40]).is_err());
        // A block claiming more bytes than the table has.
        let mut t = QEMU_Q35;
        t[50..52].copy_from_slice(&0x200u16.to_le_bytes());
        assert!(parse(&t).is_err());
        // A range end without a start.
        let mut t = QEMU_Q35;
        t[0x48] = 4;
        assert!(parse(&t).is_err());
        // An unknown variable-length entry.
        let mut t = QEMU_Q35;
        t[0x48] = 0x90;
        assert!(parse(&t).is_err());
        // Every truncation is an error or a shorter table, never a panic.
        for n in 0..QEMU_Q35.len() {
            let _ = parse(&QEMU_Q35[..n]);
        }
    }
}
