//! Persistent memory: the first byte-addressable persistent range of the ACPI NFIT (QEMU: an
//! NVDIMM backed by a host file). It holds a superblock, a directory of persistent morsels and
//! a second LLFree allocator whose metadata lives in the region and which hands out the
//! region's frames. The first boot formats it; a later boot recovers it (the allocator
//! recounts from its bit fields, `Init::Recover`), and the morsel manager then restores the
//! directory's morsels and frees what no record reaches (`sweep`): an operation cut short by
//! a crash. QEMU's file-backed memory keeps every store that happened before the emulator
//! dies; on an NVDIMM without eADR, `persist` (cache-line flush + fence) orders the records.

use crate::acpi::Platform;
use crate::memory::{self, PAGE_SIZE};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use allocator::{Allocator, Init, Order, Pfn};
use formats::nfit;
use formats::units::Bytes;
use morsel::{FrameAlloc, HostPhysAddr, PageSize};
use spin::Once;

static PMEM: Once<Pmem> = Once::new();

/// The region in use.
pub struct Pmem {
    base: u64,
    len: u64,
    alloc: Allocator<'static>,
    /// Bytes at the start the region keeps for itself: superblock, directory, allocator
    /// metadata.
    reserved: u64,
}

/// Superblock words (at the region's base).
const SB_MAGIC: usize = 0;
const SB_VERSION: usize = 1;
const SB_LEN: usize = 2;
/// The second-level format the directory's morsels are built in (`Format::NAME`, 8 bytes).
const SB_FORMAT: usize = 3;
const SB_BOOTS: usize = 4;
const MAGIC: u64 = u64::from_le_bytes(*b"PPOSPMEM");
const VERSION: u64 = 1;

/// The directory page: `SLOTS` records of 64 bytes.
const DIRECTORY: u64 = 0x1000;
const SLOTS: usize = 64;
const SLOT: u64 = 64;
/// A record: state (0 free, `VALID`), root, length, page size and flags, name length, name.
const R_STATE: u64 = 0;
const R_ROOT: u64 = 8;
const R_LEN: u64 = 16;
const R_PAGE: u64 = 24;
const R_WRITABLE: u64 = 25;
const R_NAME_LEN: u64 = 26;
const R_NAME: u64 = 32;
const VALID: u64 = u64::from_le_bytes(*b"MORSEL01");
/// Allocator metadata from here on.
const META: u64 = 0x2000;

/// The one CPU (allocator index).
const CORE: usize = 0;

/// A persistent morsel as its record describes it.
#[derive(Clone, Debug)]
pub struct Record {
    pub name: String,
    pub root: HostPhysAddr,
    pub len: u64,
    pub page: PageSize,
    pub others_may_write: bool,
}

/// Writes back the cache lines of `len` bytes at `pa` and orders them before later stores.
fn persist(pa: u64, len: u64) {
    let mut line = pa & !63;
    while line < pa + len {
        // SAFETY: `line` is identity-mapped region memory; CLFLUSH only writes back a line.
        unsafe { core::arch::x86_64::_mm_clflush(line as *const u8) };
        line += 64;
    }
    // SAFETY: a store fence has no operands.
    unsafe { core::arch::x86_64::_mm_sfence() };
}

/// Finds, maps and formats or recovers the region. `None` without one (or when it cannot be
/// used: the reason is logged, and the region is left untouched). A region is formatted only
/// when its superblock is all zero (fresh, or a format a crash cut short) or `format` says so
/// (`pmem=format`): unknown contents are not overwritten.
pub fn init(platform: &Platform, gib_pages: bool, format: bool) -> Option<&'static Pmem> {
    let at = platform.nfit?;
    // SAFETY: the address comes from the RSDT and points at the NFIT's header.
    let ranges = match unsafe { read_nfit(at) } {
        Ok(r) => r,
        Err(e) => {
            log::error!(target: "pmem", "NFIT at {at:#x}: {e}");
            return None;
        }
    };
    let Some(r) = ranges.first() else {
        log::info!(target: "pmem", "NFIT: no persistent memory range");
        return None;
    };
    const AREA: u64 = 2 << 20;
    if r.base % AREA != 0 || r.len % AREA != 0 || r.len < 2 * AREA {
        log::error!(target: "pmem", "range {:#x}+{:#x} is not 2 MiB aligned or smaller than 4 MiB: not used", r.base, r.len);
        return None;
    }
    let end = r.base + r.len;
    if memory::identity_map_up_to(end, gib_pages) < end {
        log::error!(target: "pmem", "range {:#x}-{end:#x} cannot be mapped (needs 1 GiB pages): not used", r.base);
        return None;
    }
    let frames = (r.len / PAGE_SIZE) as usize;
    let meta_size = Allocator::metadata_size(1, frames);
    let reserved = META + (meta_size as u64).next_multiple_of(PAGE_SIZE);
    // SAFETY: the region is identity-mapped (above), persistent memory that nothing else
    // uses; the superblock is its first page.
    let sb = unsafe { core::slice::from_raw_parts_mut(r.base as *mut u64, 512) };
    let known = sb[SB_MAGIC] == MAGIC && sb[SB_VERSION] == VERSION && sb[SB_LEN] == r.len;
    // Fresh: all zero, or a format that a crash interrupted (it writes the magic last).
    let fresh = sb[SB_MAGIC] == 0 && [0, VERSION].contains(&sb[SB_VERSION]) && [0, r.len].contains(&sb[SB_LEN])
        && sb[SB_FORMAT..].iter().all(|&w| w == 0);
    if !known && !fresh && !format {
        log::error!(target: "pmem", "{} at {:#x} holds something else (superblock {:#018x}, version {}, length {:#x}): left untouched; `pmem=format` overwrites it",
            Bytes(r.len), r.base, sb[SB_MAGIC], sb[SB_VERSION], sb[SB_LEN]);
        return None;
    }
    // SAFETY: as above; [META, META + meta_size) holds only the allocator's metadata.
    let meta = unsafe { core::slice::from_raw_parts_mut((r.base + META) as *mut u8, meta_size) };
    let pfn = Pfn((r.base / PAGE_SIZE) as usize);
    let alloc = if known {
        match Allocator::new(1, pfn, frames, meta, Init::Recover) {
            Ok(a) => a,
            Err(e) => {
                log::error!(target: "pmem", "{} at {:#x}: allocator metadata does not recover ({e}): left untouched", Bytes(r.len), r.base);
                return None;
            }
        }
    } else {
        sb[SB_MAGIC] = 0;
        persist(r.base, 8);
        // SAFETY: superblock and directory pages of the region.
        unsafe { core::ptr::write_bytes(r.base as *mut u8, 0, META as usize) };
        let a = match Allocator::new(1, pfn, frames, meta, Init::Allocated) {
            Ok(a) => a,
            Err(e) => {
                log::error!(target: "pmem", "cannot format {}: {e}", Bytes(r.len));
                return None;
            }
        };
        let first = Pfn(pfn.0 + (reserved / PAGE_SIZE) as usize);
        if let Err(e) = a.free_range(first, frames - (reserved / PAGE_SIZE) as usize) {
            log::error!(target: "pmem", "cannot format {}: {e}", Bytes(r.len));
            return None;
        }
        sb[SB_VERSION] = VERSION;
        sb[SB_LEN] = r.len;
        persist(r.base, 4096);
        persist(r.base + META, meta_size as u64);
        sb[SB_MAGIC] = MAGIC;
        persist(r.base, 8);
        a
    };
    sb[SB_BOOTS] += 1;
    persist(r.base + 8 * SB_BOOTS as u64, 8);
    let p = PMEM.call_once(|| Pmem { base: r.base, len: r.len, alloc, reserved });
    log::info!(target: "pmem", "{} of persistent memory at {:#x}: {} (boot {} of this region), {} free, allocator metadata {}",
        Bytes(r.len), r.base, if known { "recovered" } else { "formatted" }, sb[SB_BOOTS],
        Bytes(p.alloc.free_frames() as u64 * PAGE_SIZE), Bytes(meta_size as u64));
    Some(p)
}

/// Reads the NFIT at physical address `pa` (identity-mapped).
///
/// # Safety
/// `pa` must be the address of an ACPI table (its header's length is trusted as the extent).
unsafe fn read_nfit(pa: u64) -> Result<Vec<nfit::PmemRange>, &'static str> {
    // SAFETY: an ACPI table header is 36 bytes; bytes 4..8 are its length.
    let len = unsafe { ((pa + 4) as *const u32).read_unaligned() } as usize;
    if !(40..=1 << 20).contains(&len) {
        return Err("NFIT length out of range");
    }
    // SAFETY: the table spans `len` bytes in identity-mapped firmware memory.
    nfit::parse(unsafe { core::slice::from_raw_parts(pa as *const u8, len) })
}

/// The region, if `init` set one up.
pub fn get() -> Option<&'static Pmem> {
    PMEM.get()
}

impl Pmem {
    fn word(&self, off: u64) -> *mut u64 {
        debug_assert!(off.is_multiple_of(8) && off < self.reserved);
        (self.base + off) as *mut u64
    }

    fn read(&self, off: u64) -> u64 {
        // SAFETY: a word of the region's first pages (superblock, directory), identity-mapped.
        unsafe { self.word(off).read_volatile() }
    }

    fn write(&self, off: u64, v: u64) {
        // SAFETY: as for read.
        unsafe { self.word(off).write_volatile(v) }
    }

    /// Ties the directory to one second-level format (the first backend that uses it), or
    /// says which format its morsels were built in when it is another.
    pub fn claim_format(&self, name: &str) -> Result<(), String> {
        let mut want = [0u8; 8];
        let n = name.len().min(8);
        want[..n].copy_from_slice(&name.as_bytes()[..n]);
        let want = u64::from_le_bytes(want);
        let off = 8 * SB_FORMAT as u64;
        match self.read(off) {
            0 => {
                self.write(off, want);
                persist(self.base + off, 8);
                Ok(())
            }
            w if w == want => Ok(()),
            w => Err(String::from_utf8_lossy(&w.to_le_bytes()).trim_end_matches('\0').into()),
        }
    }

    /// The valid records with their slot numbers; a slot that is valid but unreadable is
    /// returned as an error with its number.
    pub fn records(&self) -> Vec<Result<(usize, Record), usize>> {
        let mut out = Vec::new();
        for i in 0..SLOTS {
            let s = DIRECTORY + i as u64 * SLOT;
            if self.read(s + R_STATE) != VALID {
                continue;
            }
            let meta = self.read(s + R_PAGE);
            let (page, writable, name_len) = (meta as u8, (meta >> 8) as u8, (meta >> 16) as u8 as usize);
            let mut name = vec![0u8; 32];
            for (w, chunk) in name.chunks_mut(8).enumerate() {
                chunk.copy_from_slice(&self.read(s + R_NAME + 8 * w as u64).to_le_bytes());
            }
            name.truncate(name_len);
            let page = match page {
                0 => Some(PageSize::Size4K),
                1 => Some(PageSize::Size2M),
                _ => None,
            };
            let ok_name = (1..=32).contains(&name_len) && name.iter().all(u8::is_ascii_graphic);
            match (page, ok_name, writable <= 1) {
                (Some(page), true, true) => out.push(Ok((i, Record {
                    name: String::from_utf8(name).unwrap_or_default(),
                    root: HostPhysAddr::new(self.read(s + R_ROOT)),
                    len: self.read(s + R_LEN),
                    page,
                    others_may_write: writable == 1,
                }))),
                _ => out.push(Err(i)),
            }
        }
        out
    }

    /// Writes `r` into a free slot, fields first, then the state word: a crash leaves either
    /// no record or the whole record. `None` when the directory is full.
    pub fn add_record(&self, r: &Record) -> Option<usize> {
        let i = (0..SLOTS).find(|&i| self.read(DIRECTORY + i as u64 * SLOT + R_STATE) != VALID)?;
        let s = DIRECTORY + i as u64 * SLOT;
        self.write(s + R_ROOT, r.root.as_u64());
        self.write(s + R_LEN, r.len);
        let page = if r.page == PageSize::Size2M { 1u64 } else { 0 };
        self.write(s + R_PAGE, page | (r.others_may_write as u64) << 8 | (r.name.len() as u64) << 16);
        debug_assert_eq!((R_WRITABLE, R_NAME_LEN), (R_PAGE + 1, R_PAGE + 2));
        let mut name = [0u8; 32];
        name[..r.name.len()].copy_from_slice(r.name.as_bytes());
        for (w, chunk) in name.chunks(8).enumerate() {
            self.write(s + R_NAME + 8 * w as u64, u64::from_le_bytes(chunk.try_into().unwrap_or_default()));
        }
        persist(self.base + s, SLOT);
        self.write(s + R_STATE, VALID);
        persist(self.base + s, 8);
        Some(i)
    }

    /// Drops the record in `slot` (before its frames are freed: a crash in between leaves
    /// frames that no record reaches, which the next boot's sweep frees).
    pub fn remove_record(&self, slot: usize) {
        let s = DIRECTORY + slot as u64 * SLOT;
        self.write(s + R_STATE, 0);
        persist(self.base + s, 8);
    }

    /// Whether `frame` (of order `order`) lies in the region's managed part and is allocated.
    pub fn holds(&self, frame: HostPhysAddr, order: u32) -> bool {
        let (pa, size) = (frame.as_u64(), PAGE_SIZE << order);
        pa % size == 0 && pa >= self.base + self.reserved && pa + size <= self.base + self.len
            && (0..1u64 << order).all(|k| self.alloc.is_allocated(Pfn(((pa + k * PAGE_SIZE) / PAGE_SIZE) as usize)) == Ok(true))
    }

    /// Frees every allocated frame that `reachable` does not name (it calls its argument for
    /// every frame of every record). Returns the frames (4 KiB) freed, or, when some frame is
    /// named twice (two records claim it: the directory is damaged), that count and frees
    /// nothing.
    pub fn sweep(&self, reachable: impl FnOnce(&mut dyn FnMut(HostPhysAddr, u32))) -> Result<u64, u64> {
        let frames = (self.len / PAGE_SIZE) as usize;
        let mut seen = vec![0u64; frames.div_ceil(64)];
        let mut twice = 0;
        let mut mark = |f: HostPhysAddr, order: u32| {
            let first = ((f.as_u64() - self.base) / PAGE_SIZE) as usize;
            for i in first..(first + (1 << order)).min(frames) {
                twice += (seen[i / 64] >> (i % 64) & 1) as u64;
                seen[i / 64] |= 1 << (i % 64);
            }
        };
        reachable(&mut mark);
        if twice > 0 {
            return Err(twice);
        }
        let skip = (self.reserved / PAGE_SIZE) as usize;
        let first_pfn = (self.base / PAGE_SIZE) as usize;
        let is_seen = |i: usize| seen[i / 64] & (1 << (i % 64)) != 0;
        let mut freed = 0;
        let mut area = skip.next_multiple_of(512).min(frames);
        // The partial first area (after the reserved pages) holds small frames only.
        for i in skip..area {
            freed += self.free_unseen(first_pfn + i, is_seen(i));
        }
        while area < frames {
            let whole_unseen = (area..area + 512).all(|i| !is_seen(i));
            if whole_unseen && self.alloc.put(CORE, Pfn(first_pfn + area), Order::HUGE).is_ok() {
                freed += 512;
            } else {
                for i in area..area + 512 {
                    freed += self.free_unseen(first_pfn + i, is_seen(i));
                }
            }
            area += 512;
        }
        Ok(freed)
    }

    fn free_unseen(&self, pfn: usize, seen: bool) -> u64 {
        let allocated = self.alloc.is_allocated(Pfn(pfn)) == Ok(true);
        (!seen && allocated && self.alloc.put(CORE, Pfn(pfn), Order::BASE).is_ok()) as u64
    }

    /// Frames of the managed part that are allocated now (4 KiB units).
    pub fn allocated_frames(&self) -> u64 {
        (self.len - self.reserved) / PAGE_SIZE - self.alloc.free_frames() as u64
    }

    pub fn free_bytes(&self) -> u64 {
        self.alloc.free_frames() as u64 * PAGE_SIZE
    }

    /// The region's frames as a `FrameAlloc` for `Morsel::create`.
    pub fn frames(&'static self) -> PmemFrames {
        PmemFrames(self)
    }
}

/// Allocation from the persistent region.
#[derive(Clone, Copy)]
pub struct PmemFrames(&'static Pmem);

impl FrameAlloc for PmemFrames {
    fn alloc(&self, order: u32) -> Option<HostPhysAddr> {
        let pfn = self.0.alloc.get(CORE, Order(order as u8)).ok()?;
        Some(HostPhysAddr::new(pfn.0 as u64 * PAGE_SIZE))
    }

    fn free(&self, frame: HostPhysAddr, order: u32) {
        if let Err(e) = self.0.alloc.put(CORE, Pfn((frame.as_u64() / PAGE_SIZE) as usize), Order(order as u8)) {
            log::error!(target: "pmem", "freeing frame {:#x} (order {order}): {e}", frame.as_u64());
        }
    }
}
