//! Persistent memory: the first byte-addressable persistent range of the ACPI NFIT (QEMU: an
//! NVDIMM backed by a host file). It holds a superblock, a directory of persistent morsels and
//! a second LLFree allocator whose metadata lives in the region and which hands out the
//! region's frames. The first boot formats it; a later boot recovers it (the allocator
//! recounts from its bit fields, `Init::Recover`), and the morsel manager then restores the
//! directory's morsels, quarantines what damaged records still reach and frees the rest
//! (`sweep`): an operation cut short by a crash. The layout and the order in which writes must
//! reach the media (cache-line write-back + fence, `formats::pmem_layout`) are host-tested;
//! QEMU's file-backed memory keeps every store that happened before the emulator dies.

use crate::platform::acpi::Platform;
use crate::platform::memory::{self, PAGE_SIZE};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use allocator::{Allocator, Init, Order, Pfn};
use formats::nfit;
use formats::pmem_layout::{self as layout, Media, DIRECTORY, FORMATTING, MAGIC, META, R_LEN, R_NAME, R_PAGE, R_ROOT, R_STATE, SB_BOOTS, SB_FORMAT, SB_LEN, SB_MAGIC, SB_VERSION, SLOT, SLOTS, VALID, VERSION};
use formats::units::Bytes;
use morsel::{FormatKind, FrameAlloc, HostPhysAddr, PageSize};
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Once;

mod frameset;
mod media;

pub use frameset::FrameSet;
pub use media::FlushOp;
use media::Cpu;

static PMEM: Once<Pmem> = Once::new();

/// The region in use.
pub struct Pmem {
    base: u64,
    len: u64,
    alloc: Allocator<'static>,
    /// Bytes at the start the region keeps for itself: superblock, directory, allocator
    /// metadata.
    reserved: u64,
    meta_size: u64,
    flush: FlushOp,
    /// Frames were freed since the metadata was last written back: the next allocation must
    /// write those frees back first (see `write_back_frees`).
    frees_pending: AtomicBool,
    /// `pmem=drop:...`: records to drop at recovery.
    pub drop: DropList,
}

/// What the command line asks of persistent memory.
#[derive(Clone, Copy, Default, Debug)]
pub struct Options {
    /// `pmem=format`: overwrite a region with unknown contents.
    pub format: bool,
    pub drop: DropList,
    /// `test=pmem-crash:...`: stop the machine at this point (a power loss there).
    pub crash: Option<CrashPoint>,
}

/// `pmem=drop:N,...` and `pmem=drop:damaged`: directory records that recovery removes
/// (their frames are then freed like any that no record reaches).
#[derive(Clone, Copy, Default, Debug)]
pub struct DropList {
    /// Slot numbers, one bit each (`SLOTS` = 64).
    pub slots: u64,
    /// Every record that does not restore.
    pub damaged: bool,
}

impl DropList {
    pub fn has(&self, slot: usize) -> bool {
        slot < SLOTS && self.slots >> slot & 1 == 1
    }
}

/// Where `test=pmem-crash:` stops a format.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CrashPoint {
    /// `format`: right after the format's first write (its marker).
    Format,
    /// `magic`: right after the superblock's magic.
    Magic,
}

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

/// A valid slot whose record does not read back (bad page size, flags or name): what it says.
#[derive(Clone, Debug)]
pub struct Unreadable {
    pub slot: usize,
    pub root: HostPhysAddr,
    pub len: u64,
    pub page: Option<PageSize>,
}

/// `test=pmem-crash:...`: stops the machine here, as a power loss would.
fn crash_here(opts: &Options, at: CrashPoint) {
    if opts.crash == Some(at) {
        log::warn!(target: "pmem", "test=pmem-crash: stopping the machine {}", match at {
            CrashPoint::Format => "right after the format's first write",
            CrashPoint::Magic => "right after the superblock's magic",
        });
        crate::platform::exit::exit(crate::platform::exit::Status::Failure)
    }
}

/// Finds, maps and formats or recovers the region. `None` without one (or when it cannot be
/// used: the reason is logged, and the region is left untouched). A region is formatted only
/// when its superblock is all zero (fresh), says a format was under way (`FORMATTING`: a crash
/// cut it short), or `opts.format` says so (`pmem=format`): unknown contents are not
/// overwritten.
pub fn init(platform: &Platform, gib_pages: bool, opts: &Options) -> Option<&'static Pmem> {
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
    let mut sb = [0u64; 512];
    for (i, w) in sb.iter_mut().enumerate() {
        // SAFETY: the region is identity-mapped (above); the superblock is its first page.
        *w = unsafe { ((r.base + 8 * i as u64) as *const u64).read_volatile() };
    }
    let known = sb[SB_MAGIC] == MAGIC && sb[SB_VERSION] == VERSION && sb[SB_LEN] == r.len;
    let interrupted = sb[SB_MAGIC] == FORMATTING;
    // Fresh: all zero (or the same with version and length: an older format's crash).
    let fresh = sb[SB_MAGIC] == 0 && [0, VERSION].contains(&sb[SB_VERSION]) && [0, r.len].contains(&sb[SB_LEN])
        && sb[SB_FORMAT..].iter().all(|&w| w == 0);
    if !known && !fresh && !interrupted && !opts.format {
        log::error!(target: "pmem", "{} at {:#x} holds something else (superblock {:#018x}, version {}, length {:#x}): left untouched; `pmem=format` overwrites it (a `pmem=format` that stopped before its first write left it so too: give it again)",
            Bytes(r.len), r.base, sb[SB_MAGIC], sb[SB_VERSION], sb[SB_LEN]);
        return None;
    }
    if interrupted {
        log::warn!(target: "pmem", "a format of {} at {:#x} was cut short (the machine stopped): formatting it again", Bytes(r.len), r.base);
    }
    let mut media = Cpu { op: FlushOp::detect(), base: r.base, len: r.len };
    // SAFETY: as above; [META, META + meta_size) holds only the allocator's metadata.
    let meta = unsafe { core::slice::from_raw_parts_mut((r.base + META) as *mut u8, meta_size) };
    let pfn = Pfn((r.base / PAGE_SIZE) as usize);
    let (alloc, boots) = if known {
        match Allocator::new(1, pfn, frames, meta, Init::Recover) {
            Ok(a) => {
                let boots = sb[SB_BOOTS] + 1;
                layout::count_boot(&mut media, r.base, boots);
                (a, boots)
            }
            Err(e) => {
                log::error!(target: "pmem", "{} at {:#x}: allocator metadata does not recover ({e}): left untouched", Bytes(r.len), r.base);
                return None;
            }
        }
    } else {
        layout::begin_format(&mut media, r.base);
        crash_here(opts, CrashPoint::Format);
        let mut made = None;
        let first = Pfn(pfn.0 + (reserved / PAGE_SIZE) as usize);
        let done = layout::finish_format(&mut media, r.base, r.len, (r.base + META, meta_size as u64), |_| -> Result<(), allocator::Error> {
            let a = Allocator::new(1, pfn, frames, meta, Init::Allocated)?;
            a.free_range(first, frames - (reserved / PAGE_SIZE) as usize)?;
            made = Some(a);
            Ok(())
        });
        match (done, made) {
            (Ok(()), Some(a)) => {
                crash_here(opts, CrashPoint::Magic);
                (a, 1)
            }
            (Err(e), _) => {
                log::error!(target: "pmem", "cannot format {}: {e}", Bytes(r.len));
                return None;
            }
            (Ok(()), None) => return None,
        }
    };
    let flush = media.op;
    if alloc.repaired_areas() > 0 {
        log::warn!(target: "pmem", "{} areas held a 2 MiB flag and 4 KiB bits at once (a switch between the two cut short by the power loss): kept allocated for the sweep",
            alloc.repaired_areas());
    }
    let p = PMEM.call_once(|| Pmem { base: r.base, len: r.len, alloc, reserved, meta_size: meta_size as u64, flush, frees_pending: AtomicBool::new(false), drop: opts.drop });
    log::info!(target: "pmem", "{} of persistent memory at {:#x}: {} (boot {boots} of this region), {} free, allocator metadata {}, cache lines written back with {flush:?}",
        Bytes(r.len), r.base, if known { "recovered" } else { "formatted" },
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

impl Pmem {
    fn word(&self, off: u64) -> *mut u64 {
        debug_assert!(off.is_multiple_of(8) && off < self.reserved);
        (self.base + off) as *mut u64
    }

    fn read(&self, off: u64) -> u64 {
        // SAFETY: a word of the region's first pages (superblock, directory), identity-mapped.
        unsafe { self.word(off).read_volatile() }
    }

    fn media(&self) -> Cpu {
        Cpu { op: self.flush, base: self.base, len: self.len }
    }

    /// Ties the directory to one second-level format (the first backend that uses it), or
    /// says which format its morsels were built in when it is another. On the media the
    /// format is the first 8 bytes of its name (`FormatKind::name`: "EPT", "NPT").
    pub fn claim_format(&self, kind: FormatKind) -> Result<(), String> {
        let name = kind.name();
        let mut want = [0u8; 8];
        let n = name.len().min(8);
        want[..n].copy_from_slice(&name.as_bytes()[..n]);
        let want = u64::from_le_bytes(want);
        let off = 8 * SB_FORMAT as u64;
        match self.read(off) {
            0 => {
                let mut m = self.media();
                m.store(self.base + off, want);
                layout::persist(&mut m, self.base + off, 8);
                Ok(())
            }
            w if w == want => Ok(()),
            w => Err(String::from_utf8_lossy(&w.to_le_bytes()).trim_end_matches('\0').into()),
        }
    }

    /// The valid records with their slot numbers; a slot that is valid but unreadable is
    /// returned as an error with what it says.
    pub fn records(&self) -> Vec<Result<(usize, Record), Unreadable>> {
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
            let (root, len) = (HostPhysAddr::new(self.read(s + R_ROOT)), self.read(s + R_LEN));
            let ok_name = (1..=32).contains(&name_len) && name.iter().all(u8::is_ascii_graphic);
            match (page, ok_name, writable <= 1) {
                (Some(page), true, true) => out.push(Ok((i, Record {
                    name: String::from_utf8(name).unwrap_or_default(),
                    root,
                    len,
                    page,
                    others_may_write: writable == 1,
                }))),
                _ => out.push(Err(Unreadable { slot: i, root, len, page })),
            }
        }
        out
    }

    /// Writes `r` into a free slot: first every line of the morsel's subtree (`subtree` names
    /// its frames, as `Morsel::for_each_frame` does) and of the allocator metadata, then the
    /// fields, then the state word (`layout::commit_record`): a power loss leaves either no
    /// record or the whole record over a subtree on the media. `None` when the directory is full.
    pub fn add_record(&self, r: &Record, subtree: impl FnOnce(&mut dyn FnMut(HostPhysAddr, u32))) -> Option<usize> {
        let i = (0..SLOTS).find(|&i| self.read(DIRECTORY + i as u64 * SLOT + R_STATE) != VALID)?;
        let words = layout::record_words(r.root, r.len, r.page == PageSize::Size2M, r.others_may_write, r.name.as_bytes());
        layout::commit_record(&mut self.media(), self.base + DIRECTORY + i as u64 * SLOT, &words, (self.base + META, self.meta_size), subtree);
        Some(i)
    }

    /// Writes frees back to the media (the whole allocator metadata, then a fence) if there
    /// were any since the last write-back. Without eADR an area's huge flag and its bit field
    /// are separate cache lines: a free left in the cache while a later allocation of the other
    /// order takes the same area could reach the media mixed with that allocation's bits.
    /// Called before every allocation after a free, and at the end of a destroy and the sweep.
    pub fn write_back_frees(&self) {
        if self.frees_pending.swap(false, Ordering::AcqRel) {
            layout::persist(&mut self.media(), self.base + META, self.meta_size);
        }
    }

    /// Drops the record in `slot` (before its frames are freed: a crash in between leaves
    /// frames that no record reaches, which the next boot's sweep frees).
    pub fn remove_record(&self, slot: usize) {
        layout::clear_record(&mut self.media(), self.base + DIRECTORY + slot as u64 * SLOT);
    }

    /// Whether `frame` (of order `order`) lies in the region's managed part and is allocated.
    pub fn holds(&self, frame: HostPhysAddr, order: u32) -> bool {
        let (pa, size) = (frame.as_u64(), PAGE_SIZE << order);
        order <= 18 && pa % size == 0 && pa >= self.base + self.reserved && pa.checked_add(size).is_some_and(|e| e <= self.base + self.len)
            && (0..1u64 << order).all(|k| self.alloc.is_allocated(Pfn(((pa + k * PAGE_SIZE) / PAGE_SIZE) as usize)) == Ok(true))
    }

    /// An empty set of the region's frames.
    pub fn frame_set(&self) -> FrameSet {
        let frames = (self.len / PAGE_SIZE) as usize;
        FrameSet { base: self.base, frames, bits: vec![0u64; frames.div_ceil(64)] }
    }

    /// Frees every allocated frame of the managed part that neither `held` (the loaded
    /// records' frames) nor `kept` (the quarantined frames of damaged records) contains.
    /// Returns the frames (4 KiB) freed.
    pub fn sweep(&self, held: &FrameSet, kept: &FrameSet) -> u64 {
        let frames = (self.len / PAGE_SIZE) as usize;
        let skip = (self.reserved / PAGE_SIZE) as usize;
        let first_pfn = (self.base / PAGE_SIZE) as usize;
        let is_seen = |i: usize| held.has(i) || kept.has(i);
        let mut freed = 0;
        let mut area = skip.next_multiple_of(512).min(frames);
        // The partial first area (after the reserved pages) holds small frames only.
        for i in skip..area {
            freed += self.free_unseen(first_pfn + i, is_seen(i));
        }
        while area < frames {
            let whole_unseen = (area..area + 512).all(|i| !is_seen(i));
            if whole_unseen && self.alloc.put(CORE, Pfn(first_pfn + area), Order::HUGE).is_ok() {
                self.frees_pending.store(true, Ordering::Release);
                freed += 512;
            } else {
                for i in area..area + 512 {
                    freed += self.free_unseen(first_pfn + i, is_seen(i));
                }
            }
            area += 512;
        }
        self.write_back_frees();
        freed
    }

    fn free_unseen(&self, pfn: usize, seen: bool) -> u64 {
        let allocated = self.alloc.is_allocated(Pfn(pfn)) == Ok(true);
        let freed = !seen && allocated && self.alloc.put(CORE, Pfn(pfn), Order::BASE).is_ok();
        if freed {
            self.frees_pending.store(true, Ordering::Release);
        }
        freed as u64
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
        // A free still in the cache must not reach the media after this allocation's bits.
        self.0.write_back_frees();
        let pfn = self.0.alloc.get(CORE, Order(order as u8)).ok()?;
        Some(HostPhysAddr::new(pfn.0 as u64 * PAGE_SIZE))
    }

    fn free(&self, frame: HostPhysAddr, order: u32) {
        match self.0.alloc.put(CORE, Pfn((frame.as_u64() / PAGE_SIZE) as usize), Order(order as u8)) {
            Ok(()) => self.0.frees_pending.store(true, Ordering::Release),
            Err(e) => log::error!(target: "pmem", "freeing frame {:#x} (order {order}): {e}", frame.as_u64()),
        }
    }
}
