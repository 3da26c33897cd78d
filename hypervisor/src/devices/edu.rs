//! QEMU's `edu` teaching device (vendor 1234, device 11e8; QEMU docs/specs/edu.rst): a 4 KiB
//! buffer at device address 0x40000 and a DMA engine that copies between it and an I/O
//! virtual address. Every DMA goes through the device's IOMMU domain.

use formats::mmio::Mmio;
use crate::devices::pci::Bdf;

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x11e8;
/// The device's buffer, as the DMA engine addresses it (edu spec: "DMA buffer at 0x40000").
pub const BUFFER: u64 = 0x40000;
pub const BUFFER_LEN: u64 = 4096;
/// Longest transfer: QEMU 7.2's edu range check wants the end strictly inside the buffer
/// (`within(addr + size, start, start + 4096)`), so a full 4096-byte transfer aborts QEMU
/// with "DMA range out of bounds"; 4095 bytes is the most it takes.
pub const MAX_TRANSFER: u64 = BUFFER_LEN - 1;
/// edu's DMA address mask is 28 bits: higher I/O virtual addresses would be clamped.
pub const DMA_LIMIT: u64 = 1 << 28;

/// BAR0 registers (edu spec): identification, DMA source, destination, count, command.
const ID: u64 = 0x00;
const DMA_SRC: u64 = 0x80;
const DMA_DST: u64 = 0x88;
const DMA_COUNT: u64 = 0x90;
const DMA_CMD: u64 = 0x98;
/// DMA command: bit 0 start (clears when done), bit 1 direction (1 = buffer to RAM).
const CMD_START: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;
/// The engine runs 100 ms (virtual) after the start; give up after 2 s.
const DMA_TIMEOUT_US: u64 = 2_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Length 0 or above `MAX_TRANSFER`.
    BadLength,
    /// I/O virtual address range beyond the 28-bit DMA mask.
    BadAddress,
    /// The engine did not finish in time.
    Timeout,
}

pub struct Edu {
    pub bdf: Bdf,
    regs: Mmio,
    pub transfers: u64,
    /// Whether the buffer may hold bytes from memory (a DMA into the device since the last
    /// `scrub`): the next guest to get the device must not see them.
    pub holds_data: bool,
}

impl Edu {
    /// The device at `bdf` with BAR0 `regs` (decoding and bus mastering on).
    pub fn new(bdf: Bdf, regs: Mmio) -> Edu {
        let e = Edu { bdf, regs, transfers: 0, holds_data: false };
        let id = e.r64(ID) as u32;
        log::info!(target: "edu", "device {bdf}: edu version {}.{} at {:#x}, 4 KiB buffer at device address {BUFFER:#x}",
            id >> 24, id >> 16 & 0xff, e.regs.base());
        e
    }

    fn r64(&self, off: u64) -> u64 {
        // ID is a 32-bit register; the DMA registers take 64-bit accesses.
        if off == ID { self.regs.read32(off) as u64 } else { self.regs.read64(off) }
    }

    fn w64(&self, off: u64, v: u64) {
        self.regs.write64(off, v)
    }

    /// Copies `len` bytes between the start of the device's buffer and `iova`: into the
    /// device (`to_device`) or out to memory. Waits for the engine; returns the microseconds
    /// it took. The IOMMU decides whether `iova` reaches memory.
    pub fn dma(&mut self, to_device: bool, iova: u64, len: u64) -> Result<u64, Error> {
        if len == 0 || len > MAX_TRANSFER {
            return Err(Error::BadLength);
        }
        if iova.checked_add(len).is_none_or(|end| end > DMA_LIMIT) {
            return Err(Error::BadAddress);
        }
        let (src, dst, dir) = if to_device { (iova, BUFFER, 0) } else { (BUFFER, iova, CMD_TO_RAM) };
        // Even a transfer that faults or times out may have loaded part of the buffer.
        self.holds_data |= to_device;
        self.w64(DMA_SRC, src);
        self.w64(DMA_DST, dst);
        self.w64(DMA_COUNT, len);
        let start = crate::platform::time::micros();
        self.w64(DMA_CMD, CMD_START | dir);
        while self.r64(DMA_CMD) & CMD_START != 0 {
            if crate::platform::time::micros() - start > DMA_TIMEOUT_US {
                return Err(Error::Timeout);
            }
            core::hint::spin_loop();
        }
        self.transfers += 1;
        let us = crate::platform::time::micros() - start;
        log::info!(target: "edu", "DMA {} bytes {} I/O virtual address {iova:#x} in {us} us",
            len, if to_device { "into the device from" } else { "out of the device to" });
        Ok(us)
    }

    /// Overwrites every byte a transfer can reach (the first `MAX_TRANSFER`; the buffer's last
    /// byte is out of every transfer's reach) with the zeros the caller mapped at `zeros`.
    pub fn scrub(&mut self, zeros: u64) -> Result<u64, Error> {
        let us = self.dma(true, zeros, MAX_TRANSFER)?;
        self.holds_data = false;
        Ok(us)
    }
}
