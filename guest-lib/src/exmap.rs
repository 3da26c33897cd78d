//! ExMap from the guest side: a region whose 4 KiB pages this guest populates and evicts
//! explicitly, in batches (`alloc`, `free`), instead of faulting. `ExMap` keeps the iovec
//! page (4 KiB, aligned, in guest RAM: on the heap with the `heap` feature, else inside the
//! `ExMap`) and fills it from
//! `Range`s; after a call `results()` holds one result per range: pages changed, or the
//! `Error` of that range alone.
//!
//! ```ignore
//! use guest_lib::exmap::{ExMap, Range};
//! let mut pool = ExMap::create("pool", 64 << 20, false)?;
//! pool.alloc(&[Range::new(0, 16), Range::new(100, 1)])?;   // one hypercall
//! unsafe { pool.page_mut(3)[0] = 7 };                        // populated: plain memory
//! assert_eq!(pool.free(&[Range::new(0, 16)])?, 0);          // 0 failed, one invalidation
//! // touching page 3 now would stop the guest with a fault naming 'pool' and page 3
//! ```
//!
//! Other guests open the region with `morsel::open` (read-only: they see pages as they are
//! populated) or `ExMap::open_mut` if the owner shared it writable.
//!
//! Several vCPUs of one guest share one region as a buffer manager's threads share one
//! pool: the `ExMap` stays with one of them, each vCPU calls through a `Region` (its
//! address, `Copy`) with its own `Iovec` page, so no two calls share an iovec.

use crate::abi::{self, Error};
use crate::hypercall::{call, call_mount};

/// Pages `page .. page + count` of a region (count 1..=4095 per range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// The first page, counted in 4 KiB pages from the region's start.
    pub page: u64,
    /// How many pages (1..=4095).
    pub count: u64,
}

impl Range {
    /// Pages `page .. page + count`.
    pub const fn new(page: u64, count: u64) -> Self {
        Range { page, count }
    }
}

/// The iovec page handed to the hypervisor.
#[repr(C, align(4096))]
struct IovPage([u64; abi::EXMAP_MAX_ENTRIES as usize]);

/// Where an `ExMap` keeps its iovec page: on the heap with the `heap` feature, so that an
/// `ExMap` is a few words and moving one (a `Result`, an `Option`, a return value) puts no
/// 4 KiB-aligned page on the stack: a chain of calls that moved one took a vCPU 80 KiB down
/// its 64 KiB stack reserve, into its sibling's (before the stack guard pages, 2026-12-08).
/// Inside the `ExMap` without the heap.
#[cfg(feature = "heap")]
type IovHome = alloc::boxed::Box<IovPage>;
#[cfg(not(feature = "heap"))]
type IovHome = IovPage;

/// A zeroed iovec page where `IovHome` keeps it; `NoMemory` if the heap has no room.
#[cfg(feature = "heap")]
fn new_iov() -> Result<IovHome, Error> {
    let layout = core::alloc::Layout::new::<IovPage>();
    // SAFETY: the layout's size is 4 KiB, not zero.
    let page = unsafe { alloc::alloc::alloc_zeroed(layout) }.cast::<IovPage>();
    if page.is_null() {
        return Err(Error::NoMemory);
    }
    // SAFETY: a fresh allocation of `IovPage`'s layout from the global allocator, which
    // `Box` frees with the same layout; all-zero bytes are a valid `IovPage` (u64s).
    Ok(unsafe { alloc::boxed::Box::from_raw(page) })
}

#[cfg(not(feature = "heap"))]
fn new_iov() -> Result<IovHome, Error> {
    Ok(IovPage([0; abi::EXMAP_MAX_ENTRIES as usize]))
}

/// One vCPU's iovec page for `Region` calls (4 KiB, aligned; keep it in guest RAM: a
/// static or the stack, never inside a morsel).
#[repr(C, align(4096))]
pub struct Iovec([u64; abi::EXMAP_MAX_ENTRIES as usize]);

impl Iovec {
    /// An empty iovec page.
    pub const fn new() -> Self {
        Iovec([0; abi::EXMAP_MAX_ENTRIES as usize])
    }

    /// The results of the first `n` ranges of the last call through this page (as
    /// `ExMap::results`; `n` at most the ranges that call had).
    pub fn results(&self, n: usize) -> impl Iterator<Item = Result<u64, Error>> + '_ {
        self.0[..n.min(self.0.len())].iter().map(|&r| decode(r))
    }
}

impl Default for Iovec {
    fn default() -> Self {
        Self::new()
    }
}

/// A region's address, for any vCPU of the guest that mounted it (`ExMap::region`). It is
/// valid while that `ExMap` lives; after it dropped, calls answer `NotFound`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    gpa: u64,
}

impl Region {
    /// The region mounted at `gpa` (another vCPU's `ExMap::addr`).
    pub const fn at(gpa: u64) -> Self {
        Region { gpa }
    }
    /// Guest-physical address of the region.
    pub fn addr(&self) -> u64 {
        self.gpa
    }
    /// `ExMap::alloc` through this vCPU's `iov`.
    pub fn alloc(&self, iov: &mut Iovec, ranges: &[Range]) -> Result<u64, Error> {
        self.action(iov, abi::EXMAP_ALLOC, ranges)
    }
    /// `ExMap::free` through this vCPU's `iov`.
    pub fn free(&self, iov: &mut Iovec, ranges: &[Range]) -> Result<u64, Error> {
        self.action(iov, abi::EXMAP_FREE, ranges)
    }
    /// `ExMap::read` through this vCPU's `iov`.
    pub fn read(&self, iov: &mut Iovec, ranges: &[Range]) -> Result<u64, Error> {
        self.action(iov, abi::EXMAP_READ, ranges)
    }
    /// `ExMap::write` through this vCPU's `iov`.
    pub fn write(&self, iov: &mut Iovec, ranges: &[Range]) -> Result<u64, Error> {
        self.action(iov, abi::EXMAP_WRITE, ranges)
    }
    /// A counter of the region (`abi::EXMAP_INFO_*`).
    pub fn info(&self, what: u64) -> Result<u64, Error> {
        call(abi::HC_EXMAP_INFO, [self.gpa, what, 0, 0, 0, 0])
    }

    fn action(&self, iov: &mut Iovec, op: u64, ranges: &[Range]) -> Result<u64, Error> {
        if ranges.len() > iov.0.len() {
            return Err(Error::TooLarge);
        }
        for (e, r) in iov.0.iter_mut().zip(ranges) {
            *e = abi::exmap_entry(r.page, r.count);
        }
        call(abi::HC_EXMAP_ACTION, [self.gpa, iov.0.as_ptr() as u64, ranges.len() as u64, op, 0, 0])
    }
}

fn decode(r: u64) -> Result<u64, Error> {
    let r = r as i64;
    if r >= 0 { Ok(r as u64) } else { Err(Error::from_status(r).unwrap_or(Error::Invalid)) }
}

/// A region mounted read-write in this guest; dropping it unmounts.
pub struct ExMap {
    gpa: u64,
    len: u64,
    iov: IovHome,
    used: usize,
}

impl ExMap {
    /// Creates the region `name` of `size` bytes (every page unpopulated); `share_writable`
    /// lets other guests open it read-write.
    pub fn create(name: &str, size: u64, share_writable: bool) -> Result<ExMap, Error> {
        let flags = if share_writable { abi::MORSEL_SHARE_WRITABLE } else { 0 };
        let iov = new_iov()?;
        Ok(Self::mounted(call_mount(abi::HC_EXMAP_CREATE, [name.as_ptr() as u64, name.len() as u64, size, flags, 0, 0])?, iov))
    }

    /// Opens another guest's region read-write (if its owner shared it writable).
    pub fn open_mut(name: &str) -> Result<ExMap, Error> {
        let iov = new_iov()?;
        Ok(Self::mounted(call_mount(abi::HC_MORSEL_OPEN, [name.as_ptr() as u64, name.len() as u64, 1, 0, 0, 0])?, iov))
    }

    /// A mount from `call_mount` (its address and size come in one answer) with its iovec
    /// page (made before the call, so that a full heap leaves nothing mounted).
    fn mounted((gpa, len): (u64, u64), iov: IovHome) -> ExMap {
        ExMap { gpa, len, iov, used: 0 }
    }

    /// Guest-physical address of the region.
    pub fn addr(&self) -> u64 {
        self.gpa
    }
    /// Bytes in the region.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / 4096
    }
    /// The region's address for this guest's other vCPUs (each calls with its own `Iovec`).
    pub fn region(&self) -> Region {
        Region { gpa: self.gpa }
    }

    /// Populates the pages of `ranges` (present ones are skipped); returns how many ranges
    /// failed (see `results`).
    pub fn alloc(&mut self, ranges: &[Range]) -> Result<u64, Error> {
        self.action(abi::EXMAP_ALLOC, ranges)
    }
    /// Evicts the pages of `ranges` (absent ones are skipped), with one invalidation.
    pub fn free(&mut self, ranges: &[Range]) -> Result<u64, Error> {
        self.action(abi::EXMAP_FREE, ranges)
    }
    /// Populates and reads from the NVMe disk at the same byte offsets.
    pub fn read(&mut self, ranges: &[Range]) -> Result<u64, Error> {
        self.action(abi::EXMAP_READ, ranges)
    }
    /// Writes populated pages to the NVMe disk at their byte offsets.
    pub fn write(&mut self, ranges: &[Range]) -> Result<u64, Error> {
        self.action(abi::EXMAP_WRITE, ranges)
    }

    /// Any opcode over raw entries (tests use it to send what `Range` cannot express).
    pub fn action_raw(&mut self, op: u64, entries: &[u64]) -> Result<u64, Error> {
        if entries.len() > self.iov.0.len() {
            return Err(Error::TooLarge);
        }
        self.iov.0[..entries.len()].copy_from_slice(entries);
        self.used = entries.len();
        call(abi::HC_EXMAP_ACTION, [self.gpa, self.iov.0.as_ptr() as u64, entries.len() as u64, op, 0, 0])
    }

    fn action(&mut self, op: u64, ranges: &[Range]) -> Result<u64, Error> {
        if ranges.len() > self.iov.0.len() {
            return Err(Error::TooLarge);
        }
        for (e, r) in self.iov.0.iter_mut().zip(ranges) {
            *e = abi::exmap_entry(r.page, r.count);
        }
        self.used = ranges.len();
        call(abi::HC_EXMAP_ACTION, [self.gpa, self.iov.0.as_ptr() as u64, ranges.len() as u64, op, 0, 0])
    }

    /// Per-range results of the last call: pages changed (>= 0) or a negative `Error` code.
    pub fn results(&self) -> impl Iterator<Item = Result<u64, Error>> + '_ {
        self.iov.0[..self.used].iter().map(|&r| decode(r))
    }

    /// A counter of the region (`abi::EXMAP_INFO_*`).
    pub fn info(&self, what: u64) -> Result<u64, Error> {
        call(abi::HC_EXMAP_INFO, [self.gpa, what, 0, 0, 0, 0])
    }

    /// Pages populated now.
    pub fn populated(&self) -> u64 {
        self.info(abi::EXMAP_INFO_POPULATED).unwrap_or(0)
    }

    /// The bytes of page `page`.
    ///
    /// # Safety
    /// The page must be populated for as long as the slice is used (else the hypervisor
    /// stops the guest at the first touch), and `page < pages()`.
    pub unsafe fn page_mut(&mut self, page: u64) -> &mut [u8; 4096] {
        // SAFETY: forwarded from the caller; the region is mounted read-write at `gpa`.
        unsafe { &mut *((self.gpa + page * 4096) as *mut [u8; 4096]) }
    }
}

impl Drop for ExMap {
    fn drop(&mut self) {
        let _ = call(abi::HC_MORSEL_UNMOUNT, [self.gpa, 0, 0, 0, 0, 0]);
    }
}
