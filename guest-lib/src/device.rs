//! Devices from the guest side: share a morsel with a PCI device's DMA domain, drive QEMU's
//! edu DMA engine, and ask the NVMe proxy to read or write disk blocks straight into a morsel.

use crate::abi::{self, Error};
use crate::hypercall::call;

/// QEMU's edu device on q35 (`-device edu`).
pub const EDU: u64 = abi::device_bdf(0, 3, 0);

/// Mounts the morsel `name` into the DMA domain of `bdf` at I/O virtual address `iova`.
pub fn mount(name: &str, bdf: u64, iova: u64, writable: bool) -> Result<u64, Error> {
    call(abi::HC_DEVICE_MOUNT, [name.as_ptr() as u64, name.len() as u64, bdf, iova, writable as u64, 0])
}

/// Undoes `mount`.
pub fn unmount(bdf: u64, iova: u64) -> Result<(), Error> {
    call(abi::HC_DEVICE_UNMOUNT, [bdf, iova, 0, 0, 0, 0]).map(|_| ())
}

/// edu copies `len` bytes from `iova` into its buffer; returns microseconds.
pub fn edu_to_device(iova: u64, len: u64) -> Result<u64, Error> {
    call(abi::HC_EDU_DMA, [abi::EDU_TO_DEVICE, iova, len, 0, 0, 0])
}

/// edu copies `len` bytes of its buffer out to `iova`; returns microseconds.
pub fn edu_to_memory(iova: u64, len: u64) -> Result<u64, Error> {
    call(abi::HC_EDU_DMA, [abi::EDU_TO_MEMORY, iova, len, 0, 0, 0])
}

/// Reads `count` disk blocks from `lba` into the morsel mounted at `gpa`, at `offset`.
pub fn nvme_read(gpa: u64, offset: u64, lba: u64, count: u64) -> Result<u64, Error> {
    call(abi::HC_NVME_READ, [gpa, offset, lba, count, 0, 0])
}

/// Writes `count` disk blocks at `lba` from the morsel mounted at `gpa`, at `offset`.
pub fn nvme_write(gpa: u64, offset: u64, lba: u64, count: u64) -> Result<u64, Error> {
    call(abi::HC_NVME_WRITE, [gpa, offset, lba, count, 0, 0])
}
