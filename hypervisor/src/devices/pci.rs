//! PCI Express configuration through the ECAM window from the MCFG table: config space
//! reads and writes, enumeration of bus 0, BAR sizing, and BAR programming for memory BARs
//! the firmware left unassigned (or placed above the identity-mapped 4 GiB).

use crate::platform::acpi::Ecam;
use alloc::vec::Vec;

pub use formats::bdf::Bdf;
use formats::mmio::Mmio;

/// Config space register offsets (PCI Local Bus spec 3.0, 6.1).
const VENDOR_ID: u16 = 0x00;
const COMMAND: u16 = 0x04;
/// Status register bit 4: the function has a capability list (PCI 3.0, 6.2.3).
const STATUS: u16 = 0x06;
const STATUS_CAPABILITIES: u16 = 1 << 4;
/// The first capability's offset, bits 7:2 (PCI 3.0, 6.7).
const CAPABILITIES_POINTER: u16 = 0x34;
/// Capability ID of MSI-X (PCI 3.0, 6.8.2).
const CAP_MSIX: u8 = 0x11;
const CLASS_REV: u16 = 0x08;
/// Dword 0x0c: header type in bits 23:16 (byte 0x0e).
const HEADER_DWORD: u16 = 0x0c;
const BAR0: u16 = 0x10;
/// Command register bit 1: memory space enable; bit 2: bus master enable (PCI 3.0, 6.2.2).
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;

/// Where unassigned memory BARs go: a part of q35's 32-bit PCI hole (below the 0xfe.. device
/// MMIO, above the ECAM window) that the firmware does not use for 2 GiB of RAM.
const BAR_WINDOW: (u64, u64) = (0xd000_0000, 0xe000_0000);

/// A memory BAR.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub index: u8,
    pub addr: u64,
    pub size: u64,
    pub is_64: bool,
}

/// One function found on bus 0.
#[derive(Clone, Debug)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub bars: Vec<Bar>,
}

/// Configuration space through the MCFG's ECAM window.
#[derive(Clone, Copy)]
pub struct Pci {
    ecam: Ecam,
    /// 1 MiB per bus from `bus_start` to `bus_end`.
    regs: Mmio,
}

impl Pci {
    /// `None` where the window does not lie in the identity-mapped low 4 GiB (as it does on q35).
    pub fn new(ecam: Ecam) -> Option<Pci> {
        let len = (ecam.bus_end.saturating_sub(ecam.bus_start) as u64 + 1) << 20;
        // SAFETY: the MCFG names this range as the segment's configuration space.
        let regs = unsafe { Mmio::new(ecam.base, len) }?;
        Some(Pci { ecam, regs })
    }

    /// The offset of register `off` of `bdf` in the window.
    fn offset(&self, bdf: Bdf, off: u16) -> Option<u64> {
        if bdf.bus < self.ecam.bus_start || bdf.bus > self.ecam.bus_end || bdf.dev >= 32 || bdf.func >= 8 || off >= 4096 {
            return None;
        }
        // ECAM: bus 27:20, device 19:15, function 14:12, register 11:0 (PCIe base spec 7.2.2).
        let rel = ((bdf.bus - self.ecam.bus_start) as u64) << 20 | (bdf.dev as u64) << 15 | (bdf.func as u64) << 12;
        Some(rel + off as u64)
    }

    /// All ones for a function outside the window, as an absent function reads.
    pub fn read32(&self, bdf: Bdf, off: u16) -> u32 {
        self.offset(bdf, off & !3).map_or(u32::MAX, |o| self.regs.read32(o))
    }

    pub fn write32(&self, bdf: Bdf, off: u16, value: u32) {
        if let Some(o) = self.offset(bdf, off & !3) {
            self.regs.write32(o, value)
        }
    }

    pub fn read16(&self, bdf: Bdf, off: u16) -> u16 {
        (self.read32(bdf, off) >> ((off & 2) * 8)) as u16
    }

    pub fn write16(&self, bdf: Bdf, off: u16, value: u16) {
        let shift = (off & 2) * 8;
        let old = self.read32(bdf, off);
        self.write32(bdf, off, (old & !(0xffff << shift)) | (value as u32) << shift);
    }

    /// Every function on bus 0 with its memory BARs; unassigned BARs get an address.
    pub fn enumerate(&self) -> Vec<Function> {
        let mut found = Vec::new();
        let mut next_free = BAR_WINDOW.0;
        for dev in 0..32 {
            for func in 0..8 {
                let bdf = Bdf::new(self.ecam.bus_start, dev, func);
                let id = self.read32(bdf, VENDOR_ID);
                if id & 0xffff == 0xffff {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                let class = self.read32(bdf, CLASS_REV) >> 8;
                let header = (self.read32(bdf, HEADER_DWORD) >> 16) as u8;
                let bars = if header & 0x7f == 0 { self.bars(bdf, &mut next_free) } else { Vec::new() };
                let f = Function { bdf, vendor: id as u16, device: (id >> 16) as u16, class, bars };
                let mut line = alloc::string::String::new();
                for b in &f.bars {
                    line.push_str(&alloc::format!(", BAR{} {:#x} ({} KiB{})", b.index, b.addr, b.size >> 10,
                        if b.is_64 { ", 64-bit" } else { "" }));
                }
                log::info!(target: "pci", "{bdf}: vendor {:04x} device {:04x} class {:06x}{line}", f.vendor, f.device, f.class);
                found.push(f);
                if func == 0 && header & 0x80 == 0 {
                    break;
                }
            }
        }
        found
    }

    /// Sizes the memory BARs of a type-0 header (PCI 3.0, 6.2.5.1) and programs those that are
    /// unassigned or above 4 GiB into `BAR_WINDOW`.
    fn bars(&self, bdf: Bdf, next_free: &mut u64) -> Vec<Bar> {
        let mut bars = Vec::new();
        let cmd = self.read16(bdf, COMMAND);
        // Decoding off while the BARs read back their size masks.
        self.write16(bdf, COMMAND, cmd & !CMD_MEMORY);
        let mut i = 0u8;
        while i < 6 {
            let off = BAR0 + 4 * i as u16;
            let low = self.read32(bdf, off);
            // Bit 0: I/O space; bits 2:1 = 2: 64-bit memory BAR (PCI 3.0, 6.2.5.1).
            if low & 1 != 0 {
                i += 1;
                continue;
            }
            let is_64 = low >> 1 & 3 == 2;
            self.write32(bdf, off, u32::MAX);
            let mut mask = (self.read32(bdf, off) & !0xf) as u64;
            self.write32(bdf, off, low);
            let mut addr = (low & !0xf) as u64;
            if is_64 {
                let high = self.read32(bdf, off + 4);
                self.write32(bdf, off + 4, u32::MAX);
                mask |= (self.read32(bdf, off + 4) as u64) << 32;
                self.write32(bdf, off + 4, high);
                addr |= (high as u64) << 32;
            } else {
                mask |= 0xffff_ffff_0000_0000;
            }
            // A BAR that reads back 0 after the all-ones write is not implemented.
            let size = if mask as u32 == 0 && mask >> 32 == if is_64 { 0 } else { 0xffff_ffff } { 0 } else { (!mask).wrapping_add(1) };
            if size != 0 {
                if addr == 0 || addr + size > 1 << 32 {
                    let at = next_free.next_multiple_of(size);
                    if at + size <= BAR_WINDOW.1 {
                        self.write32(bdf, off, at as u32 | (low & 0xf));
                        if is_64 {
                            self.write32(bdf, off + 4, 0);
                        }
                        log::info!(target: "pci", "{bdf}: BAR{i} programmed at {at:#x} ({} KiB, was {addr:#x})", size >> 10);
                        addr = at;
                        *next_free = at + size;
                    } else {
                        log::warn!(target: "pci", "{bdf}: BAR{i} ({} KiB) does not fit the BAR window", size >> 10);
                    }
                }
                bars.push(Bar { index: i, addr, size, is_64 });
            }
            i += if is_64 { 2 } else { 1 };
        }
        self.write16(bdf, COMMAND, cmd);
        bars
    }

    /// The config-space offset of the first capability of `bdf` with ID `id`, walking the
    /// capability list (at most 48 entries: a looped list ends the walk).
    pub fn capability(&self, bdf: Bdf, id: u8) -> Option<u16> {
        if self.read16(bdf, STATUS) & STATUS_CAPABILITIES == 0 {
            return None;
        }
        let mut at = self.read32(bdf, CAPABILITIES_POINTER) as u16 & 0xfc;
        for _ in 0..48 {
            if at < 0x40 {
                return None;
            }
            // Each capability: ID in byte 0, next pointer in byte 1 (PCI 3.0, 6.7).
            let head = self.read16(bdf, at);
            if head as u8 == id {
                return Some(at);
            }
            at = (head >> 8) & 0xfc;
        }
        None
    }

    /// The MSI-X capability of `f` with its table mapped, if it has one whose table lies in
    /// one of its memory BARs (PCI 3.0, 6.8.2). MSI-X stays disabled until `Msix::enable`.
    pub fn msix(&self, f: &Function) -> Option<Msix> {
        let cap = self.capability(f.bdf, CAP_MSIX)?;
        // Message Control (cap + 2): table size N - 1 in bits 10:0; Table Offset/BIR
        // (cap + 4): BAR indicator 2:0, offset 31:3 (qword aligned) (PCI 3.0, 6.8.2.3-4).
        let entries = (self.read16(f.bdf, cap + 2) & 0x7ff) + 1;
        let table = self.read32(f.bdf, cap + 4);
        let bar = f.bars.iter().find(|b| b.index == (table & 7) as u8)?;
        let offset = (table & !7) as u64;
        let len = 16 * entries as u64;
        if offset.checked_add(len).is_none_or(|end| end > bar.size) {
            return None;
        }
        // SAFETY: `len` bytes at `offset` inside a memory BAR that `enumerate` sized and
        // placed: the device's MSI-X table, registers only.
        let regs = unsafe { Mmio::new(bar.addr + offset, len) }?;
        Some(Msix { pci: *self, bdf: f.bdf, cap, entries, regs, bar: bar.index, offset })
    }

    /// Turns on memory decoding and bus mastering (DMA) for a function we drive.
    pub fn enable(&self, bdf: Bdf) {
        let cmd = self.read16(bdf, COMMAND);
        self.write16(bdf, COMMAND, cmd | CMD_MEMORY | CMD_BUS_MASTER);
    }
}

/// A function's MSI-X table (PCI 3.0, 6.8.2): 16-byte entries of message address (low,
/// high), message data and vector control (bit 0: masked). Every entry is masked at reset.
pub struct Msix {
    pci: Pci,
    pub bdf: Bdf,
    cap: u16,
    /// Table entries (vectors) the function offers.
    pub entries: u16,
    regs: Mmio,
    /// Where the table lies: BAR index and offset in it (for the log).
    pub bar: u8,
    pub offset: u64,
}

/// MSI address: 0xFEE in bits 31:20, destination APIC ID 19:12, redirection hint (bit 3) and
/// destination mode (bit 2) 0: physical, to that one CPU (Intel SDM Vol. 3A 11.11.1).
const MSI_ADDRESS: u32 = 0xfee0_0000;
/// Message Control bit 15: MSI-X enable; bit 14: function mask (PCI 3.0, 6.8.2.3).
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

impl Msix {
    /// Points entry `entry` at `vector` on the CPU with xAPIC ID `apic_id` and unmasks it.
    /// Data: vector 7:0, delivery mode 10:8 = 000 (fixed), trigger bit 15 = 0 (edge)
    /// (Intel SDM Vol. 3A 11.11.2). False if the entry or the ID is out of range.
    pub fn route(&self, entry: u16, apic_id: u32, vector: u8) -> bool {
        if entry >= self.entries || apic_id > 0xff {
            return false;
        }
        let at = 16 * entry as u64;
        self.regs.write32(at + 12, 1); // masked while it changes
        self.regs.write32(at, MSI_ADDRESS | apic_id << 12);
        self.regs.write32(at + 4, 0);
        self.regs.write32(at + 8, vector as u32);
        self.regs.write32(at + 12, 0);
        true
    }

    /// Masks entry `entry` (a message it would send stays pending in the PBA).
    pub fn mask(&self, entry: u16) {
        if entry < self.entries {
            self.regs.write32(16 * entry as u64 + 12, 1);
        }
    }

    /// Turns MSI-X on for the function (INTx is then off: PCI 3.0, 6.8.2), function mask off.
    pub fn enable(&self) {
        let control = self.pci.read16(self.bdf, self.cap + 2);
        self.pci.write16(self.bdf, self.cap + 2, (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
    }

    /// Turns MSI-X off again (the function falls back to INTx, which nothing here routes).
    pub fn disable(&self) {
        let control = self.pci.read16(self.bdf, self.cap + 2);
        self.pci.write16(self.bdf, self.cap + 2, control & !MSIX_ENABLE);
    }
}
