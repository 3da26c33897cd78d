//! Typed addresses and page sizes.
//!
//! `HostPhysAddr` is what tables point at; `GuestPhysAddr` and `IoVirtAddr` are what a
//! second-level table translates (the input address of EPT/NPT and of VT-d). Conversions to and
//! from `u64` are explicit (`new`/`as_u64`) so the one place they happen is visible.

use core::fmt;

macro_rules! addr_type {
    ($(#[$doc:meta])* $name:ident, $short:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw address.
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }
            /// The raw address.
            pub const fn as_u64(self) -> u64 {
                self.0
            }
            /// `self + bytes`, `None` on overflow.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(a) => Some(Self(a)),
                    None => None,
                }
            }
            /// Whether the address is a multiple of `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($short, "({:#x})"), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

addr_type!(
    /// A host-physical address (what the hardware walker reads tables and data from).
    HostPhysAddr,
    "HPA"
);
addr_type!(
    /// A guest-physical address: the input of EPT and NPT.
    GuestPhysAddr,
    "GPA"
);
addr_type!(
    /// An I/O virtual address: the input of a VT-d second-level table (a device's DMA address).
    IoVirtAddr,
    "IOVA"
);

/// The input address type of a second-level table (`GuestPhysAddr` or `IoVirtAddr`).
pub trait InputAddr: Copy + Eq + fmt::Debug {
    /// Wraps a raw input address.
    fn from_u64(raw: u64) -> Self;
    /// The raw input address.
    fn to_u64(self) -> u64;
}

impl InputAddr for GuestPhysAddr {
    fn from_u64(raw: u64) -> Self {
        Self::new(raw)
    }
    fn to_u64(self) -> u64 {
        self.as_u64()
    }
}

impl InputAddr for IoVirtAddr {
    fn from_u64(raw: u64) -> Self {
        Self::new(raw)
    }
    fn to_u64(self) -> u64 {
        self.as_u64()
    }
}

/// Bytes in a 4 KiB frame, the size of every table.
pub const FRAME_SIZE: u64 = 4096;
/// Entries per table (all three formats use 512 eight-byte entries per 4 KiB table).
pub const ENTRIES: usize = 512;

/// A table level: 1 holds 4 KiB leaves (PT), 2 holds 2 MiB leaves or L1 pointers (PD),
/// 3 holds 1 GiB leaves or L2 pointers (PDPT), 4 holds L3 pointers (PML4).
pub type Level = u8;

/// Bytes covered by a whole table of `level` (L1: 2 MiB, L2: 1 GiB, L3: 512 GiB, L4: 256 TiB).
pub const fn table_span(level: Level) -> u64 {
    FRAME_SIZE << (9 * level as u32)
}

/// Bytes covered by one entry of a table of `level` (L1: 4 KiB, L2: 2 MiB, L3: 1 GiB).
pub const fn entry_span(level: Level) -> u64 {
    FRAME_SIZE << (9 * (level as u32 - 1))
}

/// Index of the entry for `addr` in a table of `level`.
pub const fn index(level: Level, addr: u64) -> usize {
    ((addr >> (12 + 9 * (level as u32 - 1))) & 511) as usize
}

/// The size of a leaf mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum PageSize {
    /// 4 KiB leaf in an L1 table.
    Size4K,
    /// 2 MiB leaf in an L2 table (large-page bit set).
    Size2M,
    /// 1 GiB leaf in an L3 table (large-page bit set).
    Size1G,
}

impl PageSize {
    /// Bytes in a page of this size.
    pub const fn bytes(self) -> u64 {
        entry_span(self.leaf_level())
    }
    /// The level whose entries are leaves of this size.
    pub const fn leaf_level(self) -> Level {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
    /// The allocator order of a frame of this size (0 = 4 KiB, 9 = 2 MiB, 18 = 1 GiB).
    pub const fn order(self) -> u32 {
        9 * (self.leaf_level() as u32 - 1)
    }
    /// The page size of a leaf at `level`, if that level can hold leaves.
    pub const fn from_leaf_level(level: Level) -> Option<Self> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4 KiB",
            PageSize::Size2M => "2 MiB",
            PageSize::Size1G => "1 GiB",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(table_span(1), 2 << 20);
        assert_eq!(table_span(2), 1 << 30);
        assert_eq!(table_span(3), 512 << 30);
        assert_eq!(entry_span(1), 4096);
        assert_eq!(entry_span(3), 1 << 30);
        assert_eq!(PageSize::Size2M.order(), 9);
        assert_eq!(index(2, 3 << 21), 3);
        assert_eq!(index(4, 1 << 39), 1);
    }
}
