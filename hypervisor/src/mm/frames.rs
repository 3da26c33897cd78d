//! Every host-physical frame the hypervisor hands out comes from here: the LLFree allocator
//! (crate `allocator`) over all RAM, its metadata carved from the first free range that
//! fits, and the usable ranges of the memory map freed into it. Also the identity-mapped
//! `PhysMem` through which the morsel crate edits page tables.

use crate::platform::bootinfo::BootInfo;
use crate::platform::memory::{self, PAGE_SIZE};
use allocator::{Allocator, Init, Order, Pfn};
use morsel::{FrameAlloc, HostPhysAddr, PhysMem};
use spin::Once;

static ALLOCATOR: Once<Allocator<'static>> = Once::new();
/// Out-of-memory `get`s that asked the other CPUs to drain.
pub static RECLAIMS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Handle to the frame allocator for one CPU (cheap to copy): every CPU allocates and
/// frees through its own allocator core index (`Frames::for_cpu`), so that its reservations
/// are its own (the allocator's contract: one user per index at a time). A frame may be freed
/// through any CPU's handle, not only the one that allocated it. Each CPU keeps its handle in
/// its per-CPU entry (`arch::percpu`) and reaches it there: `Frames::here()`, or
/// `percpu::of(me).frames()` where it knows its index.
#[derive(Clone, Copy)]
pub struct Frames {
    alloc: &'static Allocator<'static>,
    core: usize,
}

/// Why the allocator could not be set up.
#[derive(Debug)]
pub enum InitError {
    NoRoomForMetadata(usize),
    Allocator(allocator::Error),
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            InitError::NoRoomForMetadata(n) => write!(f, "no free range holds the {n} bytes of allocator metadata"),
            InitError::Allocator(e) => write!(f, "allocator: {e}"),
        }
    }
}

/// Puts all free memory under the allocator, with `cpus` core indices (at least 1). Call
/// once; memory must be identity-mapped up to `top` (see `memory::identity_map_up_to`).
/// The handle returned is the boot CPU's (index 0).
pub fn init(bi: &BootInfo, top: u64, cpus: usize) -> Result<Frames, InitError> {
    let cpus = cpus.max(1);
    let frames = (top / PAGE_SIZE) as usize;
    let meta_size = Allocator::metadata_size(cpus, frames);
    let meta_bytes = (meta_size as u64).next_multiple_of(PAGE_SIZE);
    let mut meta_at = None;
    memory::for_each_free_range(bi, |s, e| {
        if meta_at.is_none() && e - s >= meta_bytes {
            meta_at = Some(s);
        }
    });
    let meta_at = meta_at.ok_or(InitError::NoRoomForMetadata(meta_size))?;
    // SAFETY: [meta_at, meta_at + meta_bytes) is free RAM, identity-mapped, page aligned, and
    // from now on used only as allocator metadata (it is not freed into the allocator below).
    let meta = unsafe { core::slice::from_raw_parts_mut(meta_at as *mut u8, meta_size) };
    let alloc = Allocator::new(cpus, Pfn(0), frames, meta, Init::Allocated).map_err(InitError::Allocator)?;
    let mut free = 0u64;
    let mut result = Ok(());
    memory::for_each_free_range(bi, |s, e| {
        let s = if s == meta_at { s + meta_bytes } else { s };
        if s < e && result.is_ok() {
            free += e - s;
            result = alloc.free_range(Pfn((s / PAGE_SIZE) as usize), ((e - s) / PAGE_SIZE) as usize);
        }
    });
    result.map_err(InitError::Allocator)?;
    let alloc = ALLOCATOR.call_once(|| alloc);
    log::info!(target: "alloc", "LLFree allocator: {} frames managed ({} MiB free, {} huge frames), metadata {} KiB at {:#x} ({} bytes per GiB), {} CPU(s)",
        frames, free >> 20, alloc.free_huge(), meta_size / 1024, meta_at,
        meta_size as u64 * (1 << 30) / top.max(1), cpus);
    Ok(Frames { alloc, core: 0 })
}

impl Frames {
    /// This CPU's handle, from its per-CPU entry (`arch::percpu::frames`: one APIC ID read;
    /// code that knows its CPU index `me` takes `percpu::of(me).frames()`). Panics on a CPU
    /// that has not come up yet (`percpu::come_up`) rather than use another CPU's core.
    pub fn here() -> Frames {
        crate::arch::percpu::frames()
    }

    /// The allocator core index this handle allocates through (its CPU's index).
    pub fn core(&self) -> usize {
        self.core
    }

    /// The handle for the CPU with allocator index `core`, or None past the indices `init`
    /// made room for.
    pub fn for_cpu(&self, core: usize) -> Option<Frames> {
        (core < self.alloc.cores()).then_some(Frames { alloc: self.alloc, core })
    }

    /// A zeroed frame of `order` (`Order::BASE`: 4 KiB, `Order::HUGE`: 2 MiB).
    pub fn alloc_zeroed(&self, order: Order) -> Option<HostPhysAddr> {
        let pa = FrameAlloc::alloc(self, order.0 as u32)?;
        IDENTITY.zero_data(pa, order.0 as u32);
        Some(pa)
    }

    /// Gives back a frame of `order` that `alloc_zeroed` (through any CPU's handle) returned.
    pub fn free(&self, frame: HostPhysAddr, order: Order) {
        FrameAlloc::free(self, frame, order.0 as u32)
    }

    /// Gives this CPU's reservations (credit, uncounted frees, trees) back to all CPUs: when
    /// its work is done, so that other CPUs and the end-of-run count see every frame.
    pub fn drain(&self) {
        if let Err(e) = self.alloc.drain(self.core) {
            log::error!(target: "alloc", "drain of core {}: {e}", self.core);
        }
    }

    /// `bench_frames`: allocates and frees one frame of `order` `count` times through this
    /// handle's core (no zeroing, no lock: the allocator is lock-free) and returns the TSC
    /// ticks it took, or None if a frame could not be had (nothing is kept either way).
    /// Acknowledges shootdowns every `SERVICE_EVERY` pairs, so that a CPU waiting for this one
    /// inside a hypercall does not wait for the whole loop. It runs outside the world lock, so
    /// it may take a frame an unmount freed before its shootdown ended: harmless, since it
    /// never writes the frames it takes.
    pub fn bench(&self, order: Order, count: u64) -> Option<u64> {
        const SERVICE_EVERY: u64 = 256;
        let start = crate::platform::time::tsc();
        for i in 0..count {
            let frame = FrameAlloc::alloc(self, order.0 as u32)?;
            FrameAlloc::free(self, frame, order.0 as u32);
            if i % SERVICE_EVERY == SERVICE_EVERY - 1 {
                crate::arch::ipi::service();
            }
        }
        Some(crate::platform::time::tsc() - start)
    }

    /// Free 4 KiB frames right now (all orders).
    pub fn free_frames(&self) -> usize {
        self.alloc.free_frames()
    }
}

/// Drains allocator core `core` (called on that CPU, by `arch::ipi::service`).
pub fn drain_core(core: usize) {
    if let Some(a) = ALLOCATOR.get() {
        let _ = a.drain(core);
    }
}

impl FrameAlloc for Frames {
    /// Out of memory with several CPUs: up to one 2 MiB area per other CPU (its credit and
    /// uncounted frees) may be reserved there; every other CPU is asked to drain (IPI,
    /// acknowledged) and the allocation is tried once more, so `None` means no frame of that
    /// order is free anywhere.
    fn alloc(&self, order: u32) -> Option<HostPhysAddr> {
        let pfn = match self.alloc.get(self.core, Order(order as u8)) {
            Ok(pfn) => pfn,
            Err(allocator::Error::Memory) if self.alloc.cores() > 1 => {
                let _ = self.alloc.drain(self.core);
                let asked = crate::arch::ipi::drain_others();
                RECLAIMS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                log::debug!(target: "alloc", "out of memory on core {}: {asked} other CPUs drained, trying again", self.core);
                self.alloc.get(self.core, Order(order as u8)).ok()?
            }
            Err(_) => return None,
        };
        Some(HostPhysAddr::new(pfn.0 as u64 * PAGE_SIZE))
    }

    fn free(&self, frame: HostPhysAddr, order: u32) {
        if let Err(e) = self.alloc.put(self.core, Pfn((frame.as_u64() / PAGE_SIZE) as usize), Order(order as u8)) {
            log::error!(target: "alloc", "freeing frame {:#x} (order {order}): {e}", frame.as_u64());
        }
    }
}

/// Physical memory seen through the hypervisor's identity map.
#[derive(Clone, Copy)]
pub struct Identity;

/// The identity-mapped physical memory.
pub static IDENTITY: Identity = Identity;

impl PhysMem for Identity {
    fn read(&self, table: HostPhysAddr, index: usize) -> u64 {
        // SAFETY: the morsel crate passes only table frames it allocated, index < 512, and
        // all RAM is identity-mapped.
        unsafe { ((table.as_u64() as *const u64).add(index)).read_volatile() }
    }

    fn write(&self, table: HostPhysAddr, index: usize, value: u64) {
        // SAFETY: as for read; one 8-byte volatile store, atomic for the hardware walker.
        unsafe { ((table.as_u64() as *mut u64).add(index)).write_volatile(value) }
    }

    fn compare_exchange(&self, table: HostPhysAddr, index: usize, current: u64, new: u64) -> Result<u64, u64> {
        // SAFETY: as for read; the entry is 8-byte aligned, and every other access to it is
        // an 8-byte volatile access, an atomic one or the hardware walker's locked update.
        let entry = unsafe { core::sync::atomic::AtomicU64::from_ptr((table.as_u64() as *mut u64).add(index)) };
        entry.compare_exchange(current, new, core::sync::atomic::Ordering::AcqRel, core::sync::atomic::Ordering::Acquire)
    }

    fn swap(&self, table: HostPhysAddr, index: usize, new: u64) -> u64 {
        // SAFETY: as for compare_exchange.
        let entry = unsafe { core::sync::atomic::AtomicU64::from_ptr((table.as_u64() as *mut u64).add(index)) };
        entry.swap(new, core::sync::atomic::Ordering::AcqRel)
    }

    fn zero_table(&self, table: HostPhysAddr) {
        // SAFETY: as for read; the frame is 4 KiB.
        unsafe { core::ptr::write_bytes(table.as_u64() as *mut u8, 0, PAGE_SIZE as usize) }
    }

    fn zero_data(&self, frame: HostPhysAddr, order: u32) {
        // SAFETY: a frame of `1 << order` pages that the caller owns, identity-mapped.
        unsafe { core::ptr::write_bytes(frame.as_u64() as *mut u8, 0, (PAGE_SIZE << order) as usize) }
    }
}

/// Guest memory at host-physical `pa` (identity-mapped), `len` bytes, as `GuestBytes`: copied
/// through raw pointers, never a Rust reference (sibling vCPUs and devices may write it).
///
/// # Safety
/// The range must be guest RAM or morsel frames, translated through a guest's second-level
/// table, that stay allocated while the value is used (`GuestBytes::new`'s contract).
pub unsafe fn guest_bytes(pa: u64, len: usize) -> vmcore::guestbytes::GuestBytes {
    // SAFETY: forwarded from the caller; the host maps all RAM at its physical address.
    unsafe { vmcore::guestbytes::GuestBytes::new(pa as *mut u8, len) }
}
