//! The AMD IOMMU's in-memory formats (AMD I/O Virtualization Technology (IOMMU) Specification
//! 48882): device table entries (2.2.2), commands (2.4) and event log entries (2.5), plus the
//! MMIO register encodings (3.4). Pure encodings, host-tested; `iommu/amdvi.rs` uses them.

/// One 256-bit device table entry (spec 2.2.2.1), as four quadwords.
pub type Dte = [u64; 4];

/// DTE quadword 0: V bit 0, TV bit 1, Mode bits 11:9, page table root 51:12, IR bit 61, IW
/// bit 62; quadword 1: DomainID bits 15:0 (spec 2.2.2.1, "Device Table Entry Fields").
const DTE_V: u64 = 1 << 0;
const DTE_TV: u64 = 1 << 1;
const DTE_IR: u64 = 1 << 61;
const DTE_IW: u64 = 1 << 62;

/// A device translated through a `levels`-level page table at `root` in domain `domain`:
/// V, TV, Mode = levels, IR and IW (the page tables narrow the rights).
pub fn dte_translated(root: u64, levels: u8, domain: u16) -> Dte {
    debug_assert!(root.is_multiple_of(4096) && (1..=6).contains(&levels));
    [DTE_V | DTE_TV | (levels as u64) << 9 | root | DTE_IR | DTE_IW, domain as u64, 0, 0]
}

/// A device that may not reach memory: translated (V, TV, Mode = `levels`, IR, IW) through the
/// table at `empty_root`, whose entries are all not present, in DomainID 0 (no domain uses
/// it). Every access walks to a PR = 0 entry: an IO_PAGE_FAULT, target-aborted and logged
/// (spec 2.2.3, 2.5.3). The spec's other blocking form, Mode 0 with IR = IW = 0 ("access
/// controlled by IR and IW", spec 2.2.2.1), is not used: QEMU 10.1 and later (with
/// `dma-remap=on`) treat every Mode 0 entry as pass-through whatever IR and IW say
/// (`amdvi_update_addr_translation_mode`), so that entry would block on silicon and let
/// everything through there. An entry with V = 0 would let the device through untranslated.
pub fn dte_blocked(empty_root: u64, levels: u8) -> Dte {
    dte_translated(empty_root, levels, 0)
}

/// Device table size field for 65536 entries of 32 bytes: 2 MiB = 512 pages, the register
/// holds pages - 1 in bits 8:0 (spec 3.4.1, Device Table Base Address Register).
pub fn devtab_register(base: u64) -> u64 {
    debug_assert!(base.is_multiple_of(4096));
    base | 0x1ff
}

/// Command buffer / event log base registers: base bits 51:12, length bits 59:56 as log2 of
/// the number of 16-byte entries, at least 8 (spec 3.4.2, 3.4.3).
pub fn ring_register(base: u64, log2_entries: u8) -> u64 {
    debug_assert!(base.is_multiple_of(4096) && (8..=15).contains(&log2_entries));
    base | (log2_entries as u64) << 56
}

/// One 128-bit command (spec 2.4): opcode in bits 63:60 of the first quadword.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command(pub [u64; 2]);

pub const OP_COMPLETION_WAIT: u64 = 0x1;
pub const OP_INVALIDATE_DEVTAB_ENTRY: u64 = 0x2;
pub const OP_INVALIDATE_IOMMU_PAGES: u64 = 0x3;

/// COMPLETION_WAIT (spec 2.4.1): S bit 0 (store `data` at `addr` when every earlier command
/// has completed), store address bits 51:3, data in the second quadword. No interrupt (I).
pub fn completion_wait(addr: u64, data: u64) -> Command {
    debug_assert!(addr.is_multiple_of(8) && addr >> 52 == 0);
    Command([OP_COMPLETION_WAIT << 60 | addr | 1, data])
}

/// INVALIDATE_DEVTAB_ENTRY (spec 2.4.2): DeviceID bits 15:0.
pub fn invalidate_devtab_entry(device_id: u16) -> Command {
    Command([OP_INVALIDATE_DEVTAB_ENTRY << 60 | device_id as u64, 0])
}

/// INVALIDATE_IOMMU_PAGES for every page of `domain` (spec 2.4.3): DomainID bits 47:32; S
/// bit 0 and PDE bit 1 of the second quadword with address 7FFF_FFFF_FFFF_F000h mean "all
/// pages and the page directory entries caching them" (spec table "Invalidate all pages").
pub fn invalidate_domain(domain: u16) -> Command {
    Command([OP_INVALIDATE_IOMMU_PAGES << 60 | (domain as u64) << 32, 0x7fff_ffff_ffff_f000 | 1 << 1 | 1])
}

/// One event log entry (spec 2.5), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// EventCode, bits 63:60 of the first quadword.
    pub code: u8,
    /// DeviceID bits 15:0.
    pub device_id: u16,
    /// Flags, bits 59:48 (IO_PAGE_FAULT: GN 48, NX 49, US 50, I 51, PR 52, RW 53, PE 54,
    /// RZ 55, TR 56; spec 2.5.3).
    pub flags: u16,
    /// The second quadword: the faulting address (I/O virtual, or the table entry's address).
    pub address: u64,
}

pub const EVENT_ILLEGAL_DEV_TABLE_ENTRY: u8 = 0x1;
pub const EVENT_IO_PAGE_FAULT: u8 = 0x2;
pub const EVENT_DEV_TAB_HARDWARE_ERROR: u8 = 0x3;
pub const EVENT_PAGE_TAB_HARDWARE_ERROR: u8 = 0x4;
pub const EVENT_ILLEGAL_COMMAND_ERROR: u8 = 0x5;
pub const EVENT_COMMAND_HARDWARE_ERROR: u8 = 0x6;

impl Event {
    /// Decodes a raw entry; `None` for an all-zero slot (nothing written there yet).
    pub fn decode(raw: [u64; 2]) -> Option<Event> {
        if raw == [0, 0] {
            return None;
        }
        Some(Event { code: (raw[0] >> 60) as u8, device_id: raw[0] as u16, flags: (raw[0] >> 48 & 0xfff) as u16, address: raw[1] })
    }

    /// The event's name (spec 2.5, table "Event Codes").
    pub fn name(&self) -> &'static str {
        match self.code {
            EVENT_ILLEGAL_DEV_TABLE_ENTRY => "ILLEGAL_DEV_TABLE_ENTRY",
            EVENT_IO_PAGE_FAULT => "IO_PAGE_FAULT",
            EVENT_DEV_TAB_HARDWARE_ERROR => "DEV_TAB_HARDWARE_ERROR",
            EVENT_PAGE_TAB_HARDWARE_ERROR => "PAGE_TAB_HARDWARE_ERROR",
            EVENT_ILLEGAL_COMMAND_ERROR => "ILLEGAL_COMMAND_ERROR",
            EVENT_COMMAND_HARDWARE_ERROR => "COMMAND_HARDWARE_ERROR",
            0x7 => "IOTLB_INV_TIMEOUT",
            0x8 => "INVALID_DEVICE_REQUEST",
            _ => "other",
        }
    }

    /// Whether the event is a device's access that was refused.
    pub fn is_page_fault(&self) -> bool {
        self.code == EVENT_IO_PAGE_FAULT
    }
}

/// Runs of equal consecutive events, each with its length. A unit may log one event per
/// access of a blocked DMA (QEMU logs one per 4-byte store: about 1024 for a 4 KiB transfer),
/// so the driver logs and returns one fault per run.
pub fn coalesce(events: impl IntoIterator<Item = Event>) -> alloc::vec::Vec<(Event, u32)> {
    let mut runs: alloc::vec::Vec<(Event, u32)> = alloc::vec::Vec::new();
    for e in events {
        match runs.last_mut() {
            Some((last, n)) if *last == e => *n = n.saturating_add(1),
            _ => runs.push((e, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_table_entries() {
        // 4-level table at 0x1234000, domain 2: V | TV | Mode 4 | root | IR | IW.
        assert_eq!(dte_translated(0x123_4000, 4, 2), [0x6000_0000_0123_4803, 2, 0, 0]);
        // Blocked: translated through an empty table in domain 0; never V = 0 (that would
        // be pass-through) and never Mode 0 (pass-through under QEMU 10.1+).
        assert_eq!(dte_blocked(0x5000, 4), [0x6000_0000_0000_5803, 0, 0, 0]);
        assert_ne!(dte_blocked(0x5000, 4)[0] >> 9 & 7, 0);
        // QEMU 7.2 rejects DTEs with reserved bits (its AMDVI_DTE_*_RESERVED masks,
        // quadword 0: 0x80300000000000fc; quadword 3 entirely).
        for d in [dte_translated(0xf_ffff_f000, 6, u16::MAX), dte_blocked(0xf_ffff_f000, 4)] {
            assert_eq!(d[0] & 0x8030_0000_0000_00fc, 0);
            assert_eq!(d[3], 0);
        }
    }

    #[test]
    fn commands() {
        // COMPLETION_WAIT: opcode 1, S, address in place, data in the second quadword.
        assert_eq!(completion_wait(0x5000_0008, 7), Command([0x1000_0000_5000_0009, 7]));
        assert_eq!(invalidate_devtab_entry(0x0020), Command([0x2000_0000_0000_0020, 0]));
        assert_eq!(invalidate_domain(3), Command([0x3000_0003_0000_0000, 0x7fff_ffff_ffff_f003]));
        // Reserved fields stay clear (QEMU 7.2 logs ILLEGAL_COMMAND_ERROR otherwise):
        // COMPLETION_WAIT bits 59:52, INVALIDATE_IOMMU_PAGES bits 31:20, 63:48 less the
        // opcode and bits 11:3 of the second quadword.
        assert_eq!(completion_wait(0xf_ffff_ffff_fff8, u64::MAX).0[0] >> 52 & 0xff, 0);
        let p = invalidate_domain(u16::MAX).0;
        assert_eq!(p[0] >> 20 & 0xfff, 0);
        assert_eq!(p[0] >> 48 & 0xfff, 0);
        assert_eq!(p[1] >> 3 & 0x1ff, 0);
    }

    #[test]
    fn registers() {
        assert_eq!(devtab_register(0x20_0000), 0x20_01ff);
        assert_eq!(ring_register(0x30_0000, 8), 0x0800_0000_0030_0000);
    }

    #[test]
    fn events() {
        assert_eq!(Event::decode([0, 0]), None);
        // An IO_PAGE_FAULT from 00:04.0 at 0x204000 with the RW flag (bit 53).
        let e = Event::decode([0x2020_0000_0000_0020, 0x20_4000]).unwrap();
        assert_eq!((e.code, e.device_id, e.flags, e.address), (2, 0x20, 0x020, 0x20_4000));
        assert!(e.is_page_fault());
        assert_eq!(e.name(), "IO_PAGE_FAULT");
    }

    #[test]
    fn equal_consecutive_events_coalesce() {
        let a = Event::decode([0x2020_0000_0000_0018, 0x20_4000]).unwrap();
        let b = Event { address: 0x60_0000, ..a };
        assert_eq!(coalesce([a, a, a, b, a]), [(a, 3), (b, 1), (a, 1)]);
        assert_eq!(coalesce([]), []);
    }
}
