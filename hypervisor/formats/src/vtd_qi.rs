//! VT-d queued invalidation: the 128-bit descriptors the hypervisor writes into the
//! invalidation queue (VT-d spec 6.5.2) and the queue registers' encodings (VT-d spec 10.4.23
//! to 10.4.25). Pure encodings, host-tested; the driver (`iommu/vtd.rs`) writes them.

/// One 128-bit invalidation descriptor (legacy format, IQA_REG.DW = 0): `lo` is bits 63:0,
/// `hi` bits 127:64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub lo: u64,
    pub hi: u64,
}

/// Descriptor types, bits 3:0 (VT-d spec 6.5.2, table "Invalidation descriptor types").
pub const TYPE_CONTEXT: u64 = 0x1;
pub const TYPE_IOTLB: u64 = 0x2;
pub const TYPE_WAIT: u64 = 0x5;

/// Bytes per descriptor in the legacy 128-bit format.
pub const DESCRIPTOR_BYTES: u64 = 16;

/// What an invalidation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Global,
    Domain(u16),
}

/// Context-cache invalidate descriptor (VT-d spec 6.5.2.1): type 1, granularity bits 5:4
/// (1 global, 2 domain-selective), domain id bits 31:16.
pub fn context(scope: Scope) -> Descriptor {
    let lo = match scope {
        Scope::Global => TYPE_CONTEXT | 1 << 4,
        Scope::Domain(did) => TYPE_CONTEXT | 2 << 4 | (did as u64) << 16,
    };
    Descriptor { lo, hi: 0 }
}

/// IOTLB invalidate descriptor (VT-d spec 6.5.2.3): type 2, granularity bits 5:4 (1 global,
/// 2 domain-selective), drain writes bit 6 and drain reads bit 7 (honoured where CAP.DWD/DRD),
/// domain id bits 31:16; `hi` (address, AM) is used only for page-selective invalidation.
pub fn iotlb(scope: Scope) -> Descriptor {
    const DRAIN: u64 = 1 << 6 | 1 << 7;
    let lo = match scope {
        Scope::Global => TYPE_IOTLB | 1 << 4 | DRAIN,
        Scope::Domain(did) => TYPE_IOTLB | 2 << 4 | DRAIN | (did as u64) << 16,
    };
    Descriptor { lo, hi: 0 }
}

/// Invalidation wait descriptor (VT-d spec 6.5.2.8): type 5, status write bit 5 (SW: the unit
/// writes `data` to `status_addr` once every earlier descriptor has completed), fence bit 6
/// (FN: later descriptors wait for this one), status data bits 63:32; `hi` holds the status
/// address, 4-byte aligned (bits 63:2). No interrupt (IF bit 4 = 0): the driver polls.
pub fn wait(status_addr: u64, data: u32) -> Descriptor {
    debug_assert!(status_addr.is_multiple_of(4));
    Descriptor { lo: TYPE_WAIT | 1 << 5 | 1 << 6 | (data as u64) << 32, hi: status_addr & !3 }
}

/// IQA_REG (VT-d spec 10.4.25): queue base bits 63:12, descriptor width bit 11 (0 = 128-bit),
/// queue size bits 2:0 (2^QS pages of 4 KiB, 256 descriptors each).
pub fn iqa(base: u64, qs: u8) -> u64 {
    debug_assert!(base.is_multiple_of(4096) && qs <= 7);
    base | qs as u64
}

/// Number of descriptors in a queue of 2^`qs` pages.
pub const fn entries(qs: u8) -> u64 {
    (4096 << qs) / DESCRIPTOR_BYTES
}

/// IQT_REG / IQH_REG value for descriptor slot `n` (VT-d spec 10.4.23-24: the offset in the
/// queue, bits 18:4 for 128-bit descriptors).
pub const fn slot_offset(n: u64) -> u64 {
    n * DESCRIPTOR_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_spec_layout() {
        // Global context-cache invalidation: type 1, granularity 1.
        assert_eq!(context(Scope::Global), Descriptor { lo: 0x11, hi: 0 });
        // Domain 3: granularity 2, DID in 31:16.
        assert_eq!(context(Scope::Domain(3)), Descriptor { lo: 0x0003_0021, hi: 0 });
        // IOTLB: type 2, granularity 1 or 2, DW|DR (bits 6, 7), DID.
        assert_eq!(iotlb(Scope::Global), Descriptor { lo: 0xd2, hi: 0 });
        assert_eq!(iotlb(Scope::Domain(0x1234)), Descriptor { lo: 0x1234_00e2, hi: 0 });
        // Wait: type 5 | SW | FN, data in 63:32, address in hi.
        assert_eq!(wait(0x12_3458, 0xabcd), Descriptor { lo: 0x0000_abcd_0000_0065, hi: 0x12_3458 });
        // The same as Linux's `QI_IWD_STATUS_DATA(2) | QI_IWD_STATUS_WRITE | QI_IWD_FENCE |
        // QI_IWD_TYPE` (its debugfs dump shows 0000000200000065 for a wait).
        assert_eq!(wait(0x1000, 2).lo, 0x0000_0002_0000_0065);
    }

    #[test]
    fn reserved_bits_stay_clear() {
        // QEMU 7.2 rejects a wait descriptor with bits 31:7 of lo or 1:0 of hi set, an IOTLB
        // descriptor with bits 15:8 / 63:32 set, and a context descriptor with bits 15:6 set
        // (its VTD_INV_DESC_*_RSVD masks; the spec marks them reserved, 6.5.2.1-8).
        for d in [wait(0xfff_fffc, u32::MAX), wait(0, 0)] {
            assert_eq!(d.lo & 0xffff_ff80, 0);
            assert_eq!(d.hi & 3, 0);
        }
        for d in [iotlb(Scope::Global), iotlb(Scope::Domain(u16::MAX))] {
            assert_eq!(d.lo & 0xffff_ffff_0000_ff00, 0);
        }
        for d in [context(Scope::Global), context(Scope::Domain(u16::MAX))] {
            assert_eq!(d.lo & 0xffc0, 0);
        }
    }

    #[test]
    fn queue_registers() {
        assert_eq!(iqa(0x7654_3000, 0), 0x7654_3000);
        assert_eq!(iqa(0x7654_3000, 2), 0x7654_3002);
        assert_eq!(entries(0), 256);
        assert_eq!(slot_offset(255), 0xff0);
    }
}
