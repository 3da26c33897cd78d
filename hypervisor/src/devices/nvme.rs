//! NVMe (stub, filled in below).
use crate::frames::Frames;
use crate::iommu::Vtd;
use crate::pci::Bdf;

/// Class code 01 08 02: mass storage, non-volatile memory, NVM Express (PCI code and ID spec).
pub const CLASS: u32 = 0x01_08_02;

pub struct Nvme {
    pub bdf: Bdf,
}

impl Nvme {
    pub fn new(bdf: Bdf, _mmio: u64, _vtd: &mut Vtd, _domain: usize, _frames: &Frames) -> Result<Nvme, &'static str> {
        Ok(Nvme { bdf })
    }
}

/// Where the proxy mounts a morsel in the NVMe domain (above the driver's identity-mapped queues).
pub const PROXY_IOVA: u64 = 1 << 36;

#[derive(Debug)]
pub enum IoError {
    Range,
    Invalid,
    Device(u16),
}

impl Nvme {
    pub fn io(&mut self, _write: bool, _iova: u64, _lba: u64, _count: u64) -> Result<u64, IoError> {
        Err(IoError::Invalid)
    }
}
