//! PCI bus/device/function numbers, as the IOMMU and the device hypercalls name devices.

use core::fmt;

/// A PCI function address: bus, device, function.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    pub const fn new(bus: u8, dev: u8, func: u8) -> Bdf {
        Bdf { bus, dev, func }
    }
    /// From a 16-bit requester/source id: bus 15:8, device 7:3, function 2:0 (PCIe base
    /// spec 2.2.6.2); the device calls' `bdf` argument and VT-d fault records use it.
    pub const fn from_source_id(sid: u16) -> Bdf {
        Bdf { bus: (sid >> 8) as u8, dev: (sid >> 3 & 0x1f) as u8, func: (sid & 7) as u8 }
    }
    /// Device and function as one byte (the VT-d context table index, VT-d spec 3.4.3).
    /// The 16-bit requester / source id (bus << 8 | devfn), the inverse of `from_source_id`.
    pub const fn source_id(self) -> u16 {
        (self.bus as u16) << 8 | self.devfn() as u16
    }

    pub const fn devfn(self) -> u8 {
        self.dev << 3 | self.func
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}
