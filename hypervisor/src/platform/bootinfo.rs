//! What the loader tells us, read from either boot protocol into one `BootInfo`:
//! multiboot2 (GRUB; spec "Boot information format") or PVH (QEMU `-kernel`;
//! Xen `hvm_start_info`). Both are read in place: the structures stay identity-mapped.

use crate::platform::boot::{MULTIBOOT2_MAGIC, PVH_MAGIC};
use core::{slice, str};

/// Kind of a memory-map region (ACPI/E820 numbering, shared by both protocols).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RegionKind {
    Usable,
    Reserved,
    AcpiReclaimable,
    AcpiNvs,
    Bad,
    Other(u32),
}

impl RegionKind {
    fn from_e820(kind: u32) -> Self {
        match kind {
            1 => Self::Usable,
            2 => Self::Reserved,
            3 => Self::AcpiReclaimable,
            4 => Self::AcpiNvs,
            5 => Self::Bad,
            other => Self::Other(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Usable => "usable",
            Self::Reserved => "reserved",
            Self::AcpiReclaimable => "ACPI reclaimable",
            Self::AcpiNvs => "ACPI NVS",
            Self::Bad => "bad",
            Self::Other(_) => "other",
        }
    }
}

/// One region of the physical memory map.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub start: u64,
    pub len: u64,
    pub kind: RegionKind,
}

/// A boot module (the guest archive).
#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub start: u64,
    pub len: u64,
}

pub const MAX_REGIONS: usize = 64;

/// Everything the rest of the hypervisor needs from the loader.
pub struct BootInfo {
    pub protocol: &'static str,
    pub cmdline: &'static str,
    pub regions: [Region; MAX_REGIONS],
    pub region_count: usize,
    pub module: Option<Module>,
    pub rsdp: Option<u64>,
    /// Physical range of the loader's own structures, which must not be handed out.
    pub info_range: (u64, u64),
}

/// Why the boot information could not be read.
#[derive(Debug)]
pub enum Error {
    UnknownLoader(u32),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            Self::UnknownLoader(m) => write!(f, "unknown boot protocol (magic {m:#x}); boot through GRUB multiboot2 or QEMU -kernel (PVH)"),
        }
    }
}

impl BootInfo {
    /// Usable regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.region_count]
    }

    fn push(&mut self, region: Region) {
        if self.region_count < MAX_REGIONS {
            self.regions[self.region_count] = region;
            self.region_count += 1;
        }
    }

    /// Reads the loader's structures.
    ///
    /// # Safety
    /// `info` must be the physical address the loader passed in ebx, with `magic` from eax,
    /// and low memory must be identity-mapped.
    pub unsafe fn parse(magic: u32, info: u64) -> Result<BootInfo, Error> {
        let mut bi = BootInfo {
            protocol: "",
            cmdline: "",
            regions: [Region { start: 0, len: 0, kind: RegionKind::Reserved }; MAX_REGIONS],
            region_count: 0,
            module: None,
            rsdp: None,
            info_range: (info, info),
        };
        // SAFETY: forwarded from the caller.
        unsafe {
            if magic == MULTIBOOT2_MAGIC {
                bi.parse_multiboot2(info);
            } else if (info as *const u32).read() == PVH_MAGIC {
                bi.parse_pvh(info);
            } else {
                return Err(Error::UnknownLoader(magic));
            }
        }
        Ok(bi)
    }

    unsafe fn parse_multiboot2(&mut self, info: u64) {
        self.protocol = "multiboot2";
        // SAFETY: the caller guarantees a multiboot2 information structure at `info`.
        unsafe {
            let total = (info as *const u32).read() as u64;
            self.info_range = (info, info + total);
            let mut tag = info + 8;
            while tag + 8 <= info + total {
                let kind = (tag as *const u32).read();
                let size = ((tag + 4) as *const u32).read() as u64;
                match kind {
                    0 => break,
                    1 => self.cmdline = c_str(tag + 8),
                    3 => {
                        let start = ((tag + 8) as *const u32).read() as u64;
                        let end = ((tag + 12) as *const u32).read() as u64;
                        self.module.get_or_insert(Module { start, len: end - start });
                    }
                    6 => {
                        let entry_size = ((tag + 8) as *const u32).read() as u64;
                        let mut e = tag + 16;
                        while e + entry_size <= tag + size {
                            let start = (e as *const u64).read();
                            let len = ((e + 8) as *const u64).read();
                            let kind = RegionKind::from_e820(((e + 16) as *const u32).read());
                            self.push(Region { start, len, kind });
                            e += entry_size;
                        }
                    }
                    // ACPI old (14) and new (15) RSDP: a copy of the RSDP follows the header.
                    14 | 15 => self.rsdp = Some(tag + 8),
                    _ => {}
                }
                tag += (size + 7) & !7;
            }
        }
    }

    unsafe fn parse_pvh(&mut self, info: u64) {
        self.protocol = "PVH";
        // SAFETY: the caller guarantees an hvm_start_info at `info` (version >= 1 for the map).
        unsafe {
            let at32 = |off: u64| ((info + off) as *const u32).read();
            let at64 = |off: u64| ((info + off) as *const u64).read();
            self.info_range = (info, info + 56);
            let (nr_modules, modlist) = (at32(12), at64(16));
            let (cmdline, rsdp) = (at64(24), at64(32));
            if cmdline != 0 {
                self.cmdline = c_str(cmdline);
            }
            if rsdp != 0 {
                self.rsdp = Some(rsdp);
            }
            if nr_modules > 0 {
                let m = modlist as *const u64;
                self.module = Some(Module { start: m.read(), len: m.add(1).read() });
            }
            if at32(4) >= 1 {
                let (map, entries) = (at64(40), at32(48));
                for i in 0..entries as u64 {
                    let e = map + i * 24;
                    let start = (e as *const u64).read();
                    let len = ((e + 8) as *const u64).read();
                    let kind = RegionKind::from_e820(((e + 16) as *const u32).read());
                    self.push(Region { start, len, kind });
                }
            }
        }
    }
}

/// A NUL-terminated string in identity-mapped memory (invalid UTF-8 reads as empty).
///
/// # Safety
/// `addr` must point to a NUL-terminated string that lives for the rest of the run.
unsafe fn c_str(addr: u64) -> &'static str {
    let p = addr as *const u8;
    let mut len = 0;
    // SAFETY: forwarded from the caller; the scan stops at the terminator.
    unsafe {
        while p.add(len).read() != 0 && len < 4096 {
            len += 1;
        }
        str::from_utf8(slice::from_raw_parts(p, len)).unwrap_or("")
    }
}
