//! Second-level page-table entry formats: Intel EPT, AMD NPT, Intel VT-d second level, and
//! the AMD IOMMU's own (AMD-Vi host) page tables.
//!
//! A `Format` says only how permissions, presence and the extra leaf/table bits are encoded;
//! the typed `Entry<F>` builds and decodes entries on top of it, and the table code in
//! `table.rs` is written once over `Entry<F>`. All three formats share the x86 geometry:
//! 512 eight-byte entries per 4 KiB table, address bits 51:12, large-page bit 7.

use core::fmt;
use core::marker::PhantomData;

use crate::addr::{
    entry_span, GuestPhysAddr, HostPhysAddr, InputAddr, IoVirtAddr, Level, PageSize,
};

/// Access rights of a mapping. Along a walk they AND: a right is granted only if every entry on
/// the way grants it, which is what makes a read-only mount one cleared bit.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, Default)]
pub struct Perm {
    /// Reads (and, for NPT, presence).
    pub read: bool,
    /// Writes; requires `read`.
    pub write: bool,
    /// Instruction fetches; requires `read`.
    pub exec: bool,
}

impl Perm {
    /// No access (what a non-present entry decodes to).
    pub const NONE: Perm = Perm {
        read: false,
        write: false,
        exec: false,
    };
    /// Read-only.
    pub const RO: Perm = Perm {
        read: true,
        write: false,
        exec: false,
    };
    /// Read-write.
    pub const RW: Perm = Perm {
        read: true,
        write: true,
        exec: false,
    };
    /// Read-execute.
    pub const RX: Perm = Perm {
        read: true,
        write: false,
        exec: true,
    };
    /// Everything.
    pub const RWX: Perm = Perm {
        read: true,
        write: true,
        exec: true,
    };

    /// The rights granted by both.
    pub const fn and(self, other: Perm) -> Perm {
        Perm {
            read: self.read && other.read,
            write: self.write && other.write,
            exec: self.exec && other.exec,
        }
    }

    /// Whether every format can encode it: readable (NPT cannot express "present but not
    /// readable", and EPT write-without-read is a misconfiguration, SDM Vol 3C 29.3.3.1).
    pub const fn is_encodable(self) -> bool {
        self.read
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |b: bool, ch: char| if b { ch } else { '-' };
        write!(
            f,
            "{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x')
        )
    }
}

/// Formats in the same family read each other's entries with the same meaning, so a subtree
/// built in one can be pointed at from a table of the other.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Family {
    /// EPT and VT-d second level: R/W/X in bits 2:0 (VT-d ignores what it does not use).
    IntelSecondLevel,
    /// Ordinary x86-64 long-mode paging (AMD NPT).
    X86Paging,
    /// The AMD IOMMU's host page tables: the level of the next table in every pointer.
    AmdIommu,
}

/// Which format a `Format` is, for decisions that depend on it (`Format::KIND`): code
/// compares kinds, never the names meant for messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum FormatKind {
    /// Intel EPT (`Ept`).
    Ept,
    /// AMD nested paging (`Npt`).
    Npt,
    /// Intel VT-d second level (`VtdSl`).
    VtdSl,
    /// The AMD IOMMU's host page tables (`AmdV1`).
    AmdVi,
}

impl FormatKind {
    /// The format's name for messages (its `Format::NAME`).
    pub const fn name(self) -> &'static str {
        match self {
            FormatKind::Ept => Ept::NAME,
            FormatKind::Npt => Npt::NAME,
            FormatKind::VtdSl => VtdSl::NAME,
            FormatKind::AmdVi => AmdV1::NAME,
        }
    }
}

impl fmt::Display for FormatKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One second-level page-table format (a zero-sized type).
pub trait Format: 'static {
    /// Name for messages.
    const NAME: &'static str;
    /// Which format it is (decisions compare this, not `NAME`).
    const KIND: FormatKind;
    /// What the table translates: `GuestPhysAddr` (EPT, NPT) or `IoVirtAddr` (VT-d).
    type Input: InputAddr;
    /// Which formats can share a subtree with this one.
    const FAMILY: Family;
    /// Smallest supported number of levels.
    const MIN_LEVELS: Level;
    /// Largest supported number of levels.
    const MAX_LEVELS: Level;
    /// Levels a table gets from `SecondLevelTable::new`.
    const DEFAULT_LEVELS: Level;
    /// Physical address bits 51:12 of the next table or of a 4 KiB page (all three formats).
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// Large-page bit 7 in L2 and L3 leaves (all three formats).
    const LARGE: u64 = 1 << 7;
    /// Software bit marking a mount entry (a pointer to a morsel root). Must be ignored by the
    /// hardware in non-leaf entries; bit 52 is in every format's ignored/available range.
    const SW_MOUNT: u64 = 1 << 52;
    /// Bits set in every leaf besides permissions, address and the large-page bit.
    const LEAF_BITS: u64;
    /// Bits set in every table pointer besides permissions and address.
    const TABLE_BITS: u64;

    /// Presence and permission bits for `perm` (which is readable).
    fn perm_bits(perm: Perm) -> u64;
    /// The permission an entry grants at its level (`Perm::NONE` if not present).
    fn perm_of(raw: u64) -> Perm;
    /// Whether the hardware treats the entry as present.
    fn is_present(raw: u64) -> bool;
    /// Bits a pointer to a table of `next_level` carries besides `TABLE_BITS` (AMD-Vi: the
    /// Next Level field); 0 for the formats whose pointers do not name the level.
    fn pointer_bits(_next_level: Level) -> u64 {
        0
    }
}

/// Whether a subtree built in format `A` can be mounted into a table of format `B`
/// (EPT and VT-d second level: yes, the `iommu=sharept` of Xen; NPT with either: no).
/// Both must also write the same extra leaf bits: those carry the memory type (EPT bits
/// 5:3, SDM Vol 3C 29.3.7), so a leaf one format writes must mean write-back to every
/// format that walks it; formats that disagree do not share (a view is built instead).
pub const fn can_share<A: Format, B: Format>() -> bool {
    matches!(
        (A::FAMILY, B::FAMILY),
        (Family::IntelSecondLevel, Family::IntelSecondLevel)
            | (Family::X86Paging, Family::X86Paging)
            | (Family::AmdIommu, Family::AmdIommu)
    ) && A::LEAF_BITS == B::LEAF_BITS
}

/// Intel Extended Page Tables (SDM Vol 3C 29.3.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ept;

/// EPT bit 0: read access (SDM Vol 3C 29.3.2, tables 29-1..29-6).
const EPT_R: u64 = 1 << 0;
/// EPT bit 1: write access (SDM Vol 3C 29.3.2).
const EPT_W: u64 = 1 << 1;
/// EPT bit 2: execute access (supervisor-mode execute with MBEC) (SDM Vol 3C 29.3.2).
const EPT_X: u64 = 1 << 2;
/// EPT leaf bits 5:3: memory type, 6 = write-back (SDM Vol 3C 29.3.7).
const EPT_MT_WB: u64 = 6 << 3;

impl Format for Ept {
    const NAME: &'static str = "EPT";
    const KIND: FormatKind = FormatKind::Ept;
    type Input = GuestPhysAddr;
    const FAMILY: Family = Family::IntelSecondLevel;
    // 4-level EPT (EPTP bits 5:3 = 3); 5-level EPT is not used here (SDM Vol 3C 25.6.11).
    const MIN_LEVELS: Level = 4;
    const MAX_LEVELS: Level = 4;
    const DEFAULT_LEVELS: Level = 4;
    const LEAF_BITS: u64 = EPT_MT_WB;
    // Non-leaf bits 7:3 are reserved and stay 0 (SDM Vol 3C 29.3.2).
    const TABLE_BITS: u64 = 0;

    fn perm_bits(perm: Perm) -> u64 {
        bit(perm.read, EPT_R) | bit(perm.write, EPT_W) | bit(perm.exec, EPT_X)
    }
    fn perm_of(raw: u64) -> Perm {
        Perm {
            read: raw & EPT_R != 0,
            write: raw & EPT_W != 0,
            exec: raw & EPT_X != 0,
        }
    }
    // Not present iff bits 2:0 are all 0 (SDM Vol 3C 29.3.2).
    fn is_present(raw: u64) -> bool {
        raw & (EPT_R | EPT_W | EPT_X) != 0
    }
}

/// AMD nested paging: ordinary x86-64 long-mode paging (AMD APM Vol 2 15.25, 5.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Npt;

/// NPT bit 0: present (APM Vol 2 5.4.1).
const NPT_P: u64 = 1 << 0;
/// NPT bit 1: read/write (APM Vol 2 5.4.1).
const NPT_RW: u64 = 1 << 1;
/// NPT bit 2: user/supervisor; nested walks are user accesses, so it is set at every level
/// (APM Vol 2 15.25.5).
const NPT_US: u64 = 1 << 2;
/// NPT bit 63: no-execute; needs host EFER.NXE=1, which nested paging uses (APM Vol 2 15.25.5).
const NPT_NX: u64 = 1 << 63;

impl Format for Npt {
    const NAME: &'static str = "NPT";
    const KIND: FormatKind = FormatKind::Npt;
    type Input = GuestPhysAddr;
    const FAMILY: Family = Family::X86Paging;
    // Long-mode 4-level paging in the host (APM Vol 2 15.25.3).
    const MIN_LEVELS: Level = 4;
    const MAX_LEVELS: Level = 4;
    const DEFAULT_LEVELS: Level = 4;
    // PWT=PCD=PAT=0 selects PAT entry 0 = write-back by default (APM Vol 2 7.8.2).
    const LEAF_BITS: u64 = 0;
    const TABLE_BITS: u64 = 0;

    fn perm_bits(perm: Perm) -> u64 {
        bit(perm.read, NPT_P | NPT_US) | bit(perm.write, NPT_RW) | bit(!perm.exec, NPT_NX)
    }
    fn perm_of(raw: u64) -> Perm {
        let p = raw & NPT_P != 0;
        Perm {
            read: p,
            write: p && raw & NPT_RW != 0,
            exec: p && raw & NPT_NX == 0,
        }
    }
    fn is_present(raw: u64) -> bool {
        raw & NPT_P != 0
    }
}

/// Intel VT-d second-level translation (VT-d spec 3.7, 9.8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtdSl;

/// VT-d second level bit 0: read (VT-d spec 9.8).
const VTD_R: u64 = 1 << 0;
/// VT-d second level bit 1: write (VT-d spec 9.8).
const VTD_W: u64 = 1 << 1;
/// VT-d second level bit 2: execute, used only with second-level execute enabled, else
/// ignored (VT-d spec 9.8); set like EPT so subtrees stay shareable.
const VTD_X: u64 = 1 << 2;

impl Format for VtdSl {
    const NAME: &'static str = "VT-d SL";
    const KIND: FormatKind = FormatKind::VtdSl;
    type Input = IoVirtAddr;
    const FAMILY: Family = Family::IntelSecondLevel;
    // 3-level (39-bit AGAW) or 4-level (48-bit AGAW) per CAP_REG.SAGAW (VT-d spec 3.7, 10.4.2).
    const MIN_LEVELS: Level = 3;
    const MAX_LEVELS: Level = 4;
    const DEFAULT_LEVELS: Level = 4;
    // Bits 5:3 are EMT, the extended memory type, used only with extended memory types
    // (ECAP.EMTS and EMTE), else ignored; IPAT (bit 6) and SNP (bit 11) stay 0 (VT-d spec
    // 9.8). EMT is 6, write-back, the same bits as EPT's memory type: a VT-d subtree
    // mounted into EPT (`can_share`) maps write-back memory there, not uncacheable (0).
    const LEAF_BITS: u64 = EPT_MT_WB;
    const TABLE_BITS: u64 = 0;

    fn perm_bits(perm: Perm) -> u64 {
        bit(perm.read, VTD_R) | bit(perm.write, VTD_W) | bit(perm.exec, VTD_X)
    }
    fn perm_of(raw: u64) -> Perm {
        Perm {
            read: raw & VTD_R != 0,
            write: raw & VTD_W != 0,
            exec: raw & VTD_X != 0,
        }
    }
    // Not present iff R and W are both 0 (VT-d spec 9.8).
    fn is_present(raw: u64) -> bool {
        raw & (VTD_R | VTD_W) != 0
    }
}

/// The AMD IOMMU's host page tables ("AMD-Vi v1", AMD I/O Virtualization Technology (IOMMU)
/// Specification 48882, 2.2.3 "I/O Page Tables for Host Translations", tables "PDE" and
/// "PTE"): PR bit 0, Next Level bits 11:9 (the level of the table a PDE points at; 0 in a
/// PTE, whose page size is then that of the level it sits in), address bits 51:12, IR bit
/// 61, IW bit 62. There is no execute right (a DMA read is a read). The spec leaves bits 4:1
/// ignored: bit 1 marks a mount entry, bit 2 a large leaf (the walker reads neither).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AmdV1;

/// AMD-Vi PR: present (IOMMU spec 2.2.3).
const AMD_PR: u64 = 1 << 0;
/// AMD-Vi IR / IW: DMA read / write permission (IOMMU spec 2.2.3).
const AMD_IR: u64 = 1 << 61;
const AMD_IW: u64 = 1 << 62;

impl Format for AmdV1 {
    const NAME: &'static str = "AMD-Vi";
    const KIND: FormatKind = FormatKind::AmdVi;
    type Input = IoVirtAddr;
    const FAMILY: Family = Family::AmdIommu;
    // DTE Mode 1-6 selects 1 to 6 levels; 4 levels translate 48 bits (IOMMU spec 2.2.2).
    const MIN_LEVELS: Level = 3;
    const MAX_LEVELS: Level = 4;
    const DEFAULT_LEVELS: Level = 4;
    const LARGE: u64 = 1 << 2;
    const SW_MOUNT: u64 = 1 << 1;
    const LEAF_BITS: u64 = 0;
    const TABLE_BITS: u64 = 0;

    fn perm_bits(perm: Perm) -> u64 {
        bit(perm.read, AMD_PR | AMD_IR) | bit(perm.write, AMD_IW)
    }
    fn perm_of(raw: u64) -> Perm {
        let read = raw & AMD_PR != 0 && raw & AMD_IR != 0;
        Perm {
            read,
            write: raw & AMD_PR != 0 && raw & AMD_IW != 0,
            // No execute control: whatever a device may read it may "fetch".
            exec: read,
        }
    }
    fn is_present(raw: u64) -> bool {
        raw & AMD_PR != 0
    }
    // Next Level, bits 11:9 (IOMMU spec 2.2.3).
    fn pointer_bits(next_level: Level) -> u64 {
        (next_level as u64 & 7) << 9
    }
}

const fn bit(on: bool, mask: u64) -> u64 {
    if on {
        mask
    } else {
        0
    }
}

/// One 64-bit entry of a format-`F` table.
#[repr(transparent)]
pub struct Entry<F: Format> {
    raw: u64,
    _format: PhantomData<fn() -> F>,
}

static_assertions::const_assert_eq!(core::mem::size_of::<Entry<Ept>>(), 8);

impl<F: Format> Clone for Entry<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Format> Copy for Entry<F> {}
impl<F: Format> PartialEq for Entry<F> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl<F: Format> Eq for Entry<F> {}

impl<F: Format> fmt::Debug for Entry<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}Entry({:#018x})", F::NAME, self.raw)
    }
}

/// What an entry at a known level means.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Decoded {
    /// Not present.
    Empty,
    /// Points at the table of the next lower level; `mount` if it is a morsel mount entry.
    Table {
        next: HostPhysAddr,
        perm: Perm,
        mount: bool,
    },
    /// Maps a page.
    Leaf {
        frame: HostPhysAddr,
        perm: Perm,
        size: PageSize,
    },
}

impl<F: Format> Entry<F> {
    /// The non-present entry.
    pub const EMPTY: Self = Self::from_raw(0);

    /// Wraps a raw entry read from a table.
    pub const fn from_raw(raw: u64) -> Self {
        Self {
            raw,
            _format: PhantomData,
        }
    }
    /// The raw bits to store in a table.
    pub const fn raw(self) -> u64 {
        self.raw
    }

    /// A pointer to the next lower table at `next` (4 KiB aligned), limiting rights to `perm`.
    pub fn table(next: HostPhysAddr, perm: Perm) -> Self {
        debug_assert!(next.is_aligned(4096) && next.as_u64() & !F::ADDR_MASK == 0);
        Self::from_raw((next.as_u64() & F::ADDR_MASK) | F::perm_bits(perm) | F::TABLE_BITS)
    }

    /// A mount entry: a table pointer to a morsel root, marked so table code never frees or
    /// edits below it.
    pub fn mount(root: HostPhysAddr, perm: Perm) -> Self {
        Self::from_raw(Self::table(root, perm).raw | F::SW_MOUNT)
    }

    /// `table` for a next table of `next_level`, with the bits formats that name it need.
    pub fn table_to(next: HostPhysAddr, next_level: Level, perm: Perm) -> Self {
        Self::from_raw(Self::table(next, perm).raw | F::pointer_bits(next_level))
    }

    /// `mount` for a morsel root of `root_level`.
    pub fn mount_to(root: HostPhysAddr, root_level: Level, perm: Perm) -> Self {
        Self::from_raw(Self::mount(root, perm).raw | F::pointer_bits(root_level))
    }

    /// A leaf mapping `frame` with a page of `size`, (`frame` aligned to `size`).
    pub fn leaf(size: PageSize, frame: HostPhysAddr, perm: Perm) -> Self {
        debug_assert!(frame.is_aligned(size.bytes()) && frame.as_u64() & !F::ADDR_MASK == 0);
        let large = if size == PageSize::Size4K {
            0
        } else {
            F::LARGE
        };
        Self::from_raw((frame.as_u64() & F::ADDR_MASK) | F::perm_bits(perm) | F::LEAF_BITS | large)
    }

    /// Whether the hardware treats the entry as present.
    pub fn is_present(self) -> bool {
        F::is_present(self.raw)
    }
    /// Whether the entry, at `level`, maps a page (L1 always; L2/L3 with the large-page bit;
    /// bit 7 of an L4 entry is reserved and never means a leaf).
    pub fn is_leaf(self, level: Level) -> bool {
        self.is_present() && (level == 1 || (level <= 3 && self.raw & F::LARGE != 0))
    }
    /// Whether the entry is a morsel mount entry.
    pub fn is_mount(self) -> bool {
        self.is_present() && self.raw & F::SW_MOUNT != 0
    }
    /// The rights this entry grants.
    pub fn perm(self) -> Perm {
        F::perm_of(self.raw)
    }
    /// The same entry with its rights replaced by `perm`.
    pub fn with_perm(self, perm: Perm) -> Self {
        // Every bit any permission sets (NPT: P, RW, US, NX; Intel: R, W, X).
        let mask = F::perm_bits(Perm::RWX) | F::perm_bits(Perm::RO);
        Self::from_raw((self.raw & !mask) | F::perm_bits(perm))
    }
    /// The physical address the entry points at, for an entry of a table at `level`: the next
    /// table, or the page frame of a leaf (large leaves: bits 20:12 or 29:12 are not address).
    pub fn addr(self, level: Level) -> HostPhysAddr {
        let mask = if self.is_leaf(level) {
            F::ADDR_MASK & !(entry_span(level) - 1)
        } else {
            F::ADDR_MASK
        };
        HostPhysAddr::new(self.raw & mask)
    }
    /// The meaning of the entry in a table of `level` (1..=4).
    pub fn decode(self, level: Level) -> Decoded {
        if !self.is_present() {
            Decoded::Empty
        } else if let (true, Some(size)) = (self.is_leaf(level), PageSize::from_leaf_level(level)) {
            Decoded::Leaf {
                frame: self.addr(level),
                perm: self.perm(),
                size,
            }
        } else {
            Decoded::Table {
                next: self.addr(level),
                perm: self.perm(),
                mount: self.is_mount(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn perms() -> impl Strategy<Value = Perm> {
        (any::<bool>(), any::<bool>()).prop_map(|(write, exec)| Perm {
            read: true,
            write,
            exec,
        })
    }

    fn round_trip<F: Format>(level: Level, pfn: u64, perm: Perm) {
        let size = PageSize::from_leaf_level(level).unwrap();
        let frame = HostPhysAddr::new((pfn << 12) & F::ADDR_MASK & !(size.bytes() - 1));
        let leaf = Entry::<F>::leaf(size, frame, perm);
        assert!(leaf.is_present() && leaf.is_leaf(level) && !leaf.is_mount());
        assert_eq!(leaf.decode(level), Decoded::Leaf { frame, perm, size });
        assert_eq!(Entry::<F>::from_raw(leaf.raw()), leaf);

        let next = HostPhysAddr::new((pfn << 12) & F::ADDR_MASK);
        for tl in 2..=4 {
            let t = Entry::<F>::table(next, perm);
            assert_eq!(
                t.decode(tl),
                Decoded::Table {
                    next,
                    perm,
                    mount: false
                }
            );
            let m = Entry::<F>::mount(next, perm);
            assert_eq!(
                m.decode(tl),
                Decoded::Table {
                    next,
                    perm,
                    mount: true
                }
            );
            assert_eq!(
                m.with_perm(Perm::RO).decode(tl),
                Decoded::Table {
                    next,
                    perm: Perm::RO,
                    mount: true
                }
            );
        }
        assert_eq!(Entry::<F>::EMPTY.decode(level), Decoded::Empty);
    }

    proptest! {
        #[test]
        fn formats_round_trip(level in 1u8..=3, pfn in 0u64..(1 << 40), perm in perms()) {
            round_trip::<Ept>(level, pfn, perm);
            round_trip::<Npt>(level, pfn, perm);
            round_trip::<VtdSl>(level, pfn, perm);
        }

        #[test]
        fn intel_formats_read_each_other(level in 1u8..=3, pfn in 0u64..(1 << 40), perm in perms()) {
            let size = PageSize::from_leaf_level(level).unwrap();
            let frame = HostPhysAddr::new((pfn << 12) & Ept::ADDR_MASK & !(size.bytes() - 1));
            let e = Entry::<Ept>::leaf(size, frame, perm);
            prop_assert_eq!(Entry::<VtdSl>::from_raw(e.raw()).decode(level), e.decode(level));
            let v = Entry::<VtdSl>::leaf(size, frame, perm);
            prop_assert_eq!(Entry::<Ept>::from_raw(v.raw()).decode(level), v.decode(level));
        }
    }

    /// Each format has its own kind, named as the format is (a kind compared where a name
    /// was: both must agree).
    #[test]
    fn each_format_has_its_kind() {
        let kinds = [Ept::KIND, Npt::KIND, VtdSl::KIND, AmdV1::KIND];
        let names = [Ept::NAME, Npt::NAME, VtdSl::NAME, AmdV1::NAME];
        for (i, k) in kinds.iter().enumerate() {
            assert_eq!(k.name(), names[i]);
            assert!(kinds.iter().filter(|&o| o == k).count() == 1, "{k} twice");
        }
    }

    #[test]
    fn hardware_bits() {
        let f = HostPhysAddr::new(0x20_0000);
        // EPT 2 MiB RW leaf, WB: R|W|MT=6|PS.
        assert_eq!(
            Entry::<Ept>::leaf(PageSize::Size2M, f, Perm::RW).raw(),
            0x20_0000 | 0b11 | 6 << 3 | 1 << 7
        );
        // NPT 2 MiB RO leaf without exec: P|US|PS|NX.
        assert_eq!(
            Entry::<Npt>::leaf(PageSize::Size2M, f, Perm::RO).raw(),
            0x20_0000 | 0b101 | 1 << 7 | 1 << 63
        );
        // NPT table pointers carry US.
        assert_eq!(Entry::<Npt>::table(f, Perm::RWX).raw(), 0x20_0000 | 0b111);
        // VT-d 4 KiB RW leaf, EMT = 6 (write-back, read as the memory type by EPT).
        assert_eq!(
            Entry::<VtdSl>::leaf(PageSize::Size4K, f, Perm::RW).raw(),
            0x20_0000 | 0b11 | 6 << 3
        );
        assert!(can_share::<Ept, VtdSl>() && can_share::<VtdSl, Ept>() && can_share::<Npt, Npt>());
        assert!(!can_share::<Ept, Npt>() && !can_share::<Npt, VtdSl>());
        assert!(!can_share::<Npt, AmdV1>() && !can_share::<Ept, AmdV1>() && can_share::<AmdV1, AmdV1>());
    }

    /// A leaf that one format writes, read by every format that shares its subtrees, has
    /// that format's own memory-type bits: EPT reads bits 5:3 of a VT-d leaf as its memory
    /// type, and 0 would be uncacheable (SDM Vol 3C 29.3.7).
    #[test]
    fn shared_leaves_keep_the_memory_type_of_every_walker() {
        fn check<A: Format, B: Format>() {
            if !can_share::<A, B>() {
                return;
            }
            for level in 1..=3 {
                let size = PageSize::from_leaf_level(level).unwrap();
                let raw = Entry::<A>::leaf(size, HostPhysAddr::new(0x4000_0000), Perm::RW).raw();
                let mine = Entry::<B>::leaf(size, HostPhysAddr::new(0x4000_0000), Perm::RW).raw();
                // Everything but rights and address: memory type, large-page bit.
                let attrs = !(B::ADDR_MASK | B::perm_bits(Perm::RWX) | B::perm_bits(Perm::RO));
                assert_eq!(raw & attrs, mine & attrs, "{} leaf read by {}: {raw:#x}", A::NAME, B::NAME);
            }
        }
        fn all<A: Format>() {
            check::<A, Ept>();
            check::<A, VtdSl>();
            check::<A, Npt>();
            check::<A, AmdV1>();
        }
        all::<Ept>();
        all::<VtdSl>();
        all::<Npt>();
        all::<AmdV1>();
        assert!(can_share::<VtdSl, Ept>(), "the Intel formats still share");
        let v = Entry::<VtdSl>::leaf(PageSize::Size4K, HostPhysAddr::new(0x1000), Perm::RW).raw();
        assert_eq!(v >> 3 & 7, 6, "EPT reads write-back");
    }

    #[test]
    fn amd_iommu_bits() {
        let f = HostPhysAddr::new(0x20_0000);
        // 4 KiB PTE, read-write: PR | IR | IW, Next Level 0.
        assert_eq!(Entry::<AmdV1>::leaf(PageSize::Size4K, f, Perm::RW).raw(), 0x20_0000 | 1 | 3 << 61);
        // 2 MiB PTE, read-only: PR | IR, Next Level 0, the ignored bit 2 marks it large.
        let big = Entry::<AmdV1>::leaf(PageSize::Size2M, f, Perm::RO);
        assert_eq!(big.raw(), 0x20_0000 | 1 | 1 << 2 | 1 << 61);
        assert!(big.is_leaf(2) && big.raw() >> 9 & 7 == 0);
        // A PDE at level 4 pointing at a level-3 table: Next Level 3.
        let pde = Entry::<AmdV1>::table_to(f, 3, Perm::RWX);
        assert_eq!(pde.raw(), 0x20_0000 | 1 | 3 << 9 | 3 << 61);
        assert_eq!(pde.decode(4), Decoded::Table { next: f, perm: Perm::RWX, mount: false });
        // A read-only mount of a level-1 morsel root: Next Level 1, no IW, bit 1 marks it.
        let m = Entry::<AmdV1>::mount_to(f, 1, Perm::RO);
        assert_eq!(m.raw(), 0x20_0000 | 1 | 1 << 1 | 1 << 9 | 1 << 61);
        assert_eq!(m.decode(2), Decoded::Table { next: f, perm: Perm::RX, mount: true });
        // The Intel formats ignore pointer levels.
        assert_eq!(Entry::<VtdSl>::table_to(f, 3, Perm::RW), Entry::<VtdSl>::table(f, Perm::RW));
    }
}
