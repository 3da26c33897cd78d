//! `cargo xtask bench exmap-smp`: what ExMap ALLOC + FREE of single-page entries costs per
//! page, timed with RDTSC by every vCPU at once: 512 entries per call, then 1 entry per
//! call. One line per vCPU: `exmapbench.result key=value ...` (ticks per page of each batch
//! size, and the pages the hypervisor zeroed meanwhile: the region's `EXMAP_INFO_ZEROED`).
//! `arg` = `mode + 10 * rounds`: mode 0, each vCPU has a region of its own; mode 1, all vCPUs
//! of the guest share one region (each its own 512 pages of it); rounds of 512 pages
//! (default 8; batch 1 does `32 * rounds` pages). Every vCPU of every guest of the run
//! starts each phase together (a barrier in the morsel 'xb-sync'); a warm-up round first
//! fills the vCPU's frame cache, so the timed rounds are the steady state.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guest_lib::abi::{self, Error};
use guest_lib::exmap::{Iovec, Range, Region};
use guest_lib::hypercall::call;
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, BootInfo};

guest_lib::entry!(main, vcpu_main);

/// Pages of one batch (and of each vCPU's part of a region).
const BATCH: u64 = abi::EXMAP_MAX_ENTRIES;

/// The shared region's address (mode 1), published by vCPU 0.
static SHARED: AtomicU64 = AtomicU64::new(0);
/// The address of 'xb-sync' in this guest, published by vCPU 0.
static SYNC: AtomicU64 = AtomicU64::new(0);
/// vCPUs of this guest done with 'xb-sync' and the shared region (vCPU 0 unmounts them after).
static DONE: AtomicU64 = AtomicU64::new(0);

/// One iovec page and one range list per vCPU (`buffers_of`): the vCPU stacks are 64 KiB,
/// 48 of them usable, and these are 12 KiB.
struct Buffers([UnsafeCell<(Iovec, [Range; BATCH as usize])>; 16]);
// SAFETY: slot v is only ever used by vCPU v (`buffers_of`), so no two CPUs touch one.
unsafe impl Sync for Buffers {}
static BUFFERS: Buffers = Buffers([const { UnsafeCell::new((Iovec::new(), [Range::new(0, 1); BATCH as usize])) }; 16]);

fn buffers_of(vcpu: u32) -> &'static mut (Iovec, [Range; BATCH as usize]) {
    // SAFETY: vCPU indices are unique in a guest (at most 16) and each vCPU takes its own
    // slot once (`run`), so this is the only reference to it.
    unsafe { &mut *BUFFERS.0[vcpu as usize % 16].get() }
}

fn tsc() -> u64 {
    // SAFETY: RDTSC has no side effects; the hypervisor does not trap it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn main(info: &BootInfo) -> i32 {
    // The sync morsel: the first guest to get here creates it, the others open it.
    let sync = match morsel::create("xb-sync", 4096, PageSize::Size4K, true) {
        Ok(m) => Ok(m),
        Err(Error::Busy) => morsel::open_mut_when_created("xb-sync"),
        Err(e) => Err(e),
    };
    let sync = match sync {
        Ok(m) => m,
        Err(e) => {
            println!("exmapbench: xb-sync: {e:?} FAILED");
            return 1;
        }
    };
    SYNC.store(sync.addr(), SeqCst);
    let mode = info.arg % 10;
    // The shared region lives (mounted) as long as vCPU 0 runs, and vCPU 0 waits for the others
    // at the last barrier.
    let shared = match mode {
        1 => match create(&region_name(0), BATCH * 4096 * info.vcpu_count.max(1) as u64) {
            Ok(r) => {
                SHARED.store(r.addr(), SeqCst);
                Some(r)
            }
            Err(e) => {
                println!("exmapbench: shared region: {e:?} FAILED");
                return 1;
            }
        },
        _ => None,
    };
    let ok = run(info, 0);
    while DONE.load(SeqCst) < info.vcpu_count.max(1) as u64 {
        core::hint::spin_loop();
    }
    if let Some(r) = shared {
        unmount(r);
    }
    drop(sync);
    if ok { 0 } else { 1 }
}

fn vcpu_main(info: &BootInfo, vcpu: u32) -> i32 {
    if run(info, vcpu) { 0 } else { 1 }
}

/// 'xb-G-V': the region of guest G's vCPU V (V = 0 for a shared one).
fn region_name(vcpu: u32) -> heapless_name::Name {
    heapless_name::Name::new(guest_lib::info(abi::INFO_GUEST_ID).unwrap_or(0), vcpu)
}

/// A region name without the heap.
mod heapless_name {
    pub struct Name([u8; 12], usize);
    impl Name {
        pub fn new(guest: u64, vcpu: u32) -> Self {
            let mut b = *b"xb-00-00    ";
            b[3] = b'0' + (guest / 10 % 10) as u8;
            b[4] = b'0' + (guest % 10) as u8;
            b[6] = b'0' + (vcpu / 10 % 10) as u8;
            b[7] = b'0' + (vcpu % 10) as u8;
            Name(b, 8)
        }
    }
    impl core::ops::Deref for Name {
        type Target = str;
        fn deref(&self) -> &str {
            core::str::from_utf8(&self.0[..self.1]).unwrap_or("xb")
        }
    }
}

/// `exmap_create` of a region mounted read-write in this guest. Not `ExMap::create`: an
/// `ExMap` carries a 4 KiB iovec page, and its copies on the stack overflowed the 48 KiB a
/// vCPU has for it.
fn create(name: &str, size: u64) -> Result<Region, Error> {
    call(abi::HC_EXMAP_CREATE, [name.as_ptr() as u64, name.len() as u64, size, 0, 0, 0]).map(Region::at)
}

fn unmount(r: Region) {
    let _ = call(abi::HC_MORSEL_UNMOUNT, [r.addr(), 0, 0, 0, 0, 0]);
}

/// Every vCPU of every guest of the run at `phase` (1, 2, ...): waits until all have come.
fn barrier(sync: &[AtomicU64], phase: u64, everyone: u64) {
    sync[0].fetch_add(1, SeqCst);
    while sync[0].load(SeqCst) < phase * everyone {
        core::hint::spin_loop();
    }
}

/// ALLOC then FREE of `pages` pages from `first`, `per_call` single-page entries per call;
/// false if any call or entry failed.
fn rounds(r: &Region, iov: &mut Iovec, ranges: &mut [Range; BATCH as usize], first: u64, pages: u64, per_call: u64) -> bool {
    let mut ok = true;
    let mut p = 0;
    while p < pages {
        let n = per_call.min(pages - p);
        for (k, e) in ranges.iter_mut().enumerate().take(n as usize) {
            *e = Range::new(first + (p % BATCH) + k as u64, 1);
        }
        ok &= r.alloc(iov, &ranges[..n as usize]) == Ok(0);
        ok &= r.free(iov, &ranges[..n as usize]) == Ok(0);
        p += n;
    }
    ok
}

fn run(info: &BootInfo, vcpu: u32) -> bool {
    let mode = info.arg % 10;
    let rounds512 = match info.arg / 10 {
        0 => 8,
        n => n,
    };
    let pages1 = 32 * rounds512;
    let everyone = guest_lib::info(abi::INFO_GUEST_COUNT).unwrap_or(1) * info.vcpu_count.max(1) as u64;
    while SYNC.load(SeqCst) == 0 || (mode == 1 && SHARED.load(SeqCst) == 0) {
        core::hint::spin_loop();
    }
    let Some(sync) = morsel::atomics_at(SYNC.load(SeqCst)) else {
        println!("exmapbench vcpu {vcpu}: xb-sync not mounted FAILED");
        DONE.fetch_add(1, SeqCst);
        return false;
    };
    // Own region (mode 0): 512 pages of this vCPU's; shared (mode 1): its 512 pages of it.
    let own = match mode {
        1 => None,
        _ => match create(&region_name(vcpu), BATCH * 4096) {
            Ok(r) => Some(r),
            Err(e) => {
                println!("exmapbench vcpu {vcpu}: region: {e:?} FAILED");
                DONE.fetch_add(1, SeqCst);
                return false;
            }
        },
    };
    let (r, first) = match own {
        Some(r) => (r, 0),
        None => (Region::at(SHARED.load(SeqCst)), vcpu as u64 * BATCH),
    };
    let (iov, ranges) = buffers_of(vcpu);
    let cpu = guest_lib::cpu_index();
    let zeroed = || r.info(abi::EXMAP_INFO_ZEROED).unwrap_or(u64::MAX);
    // Warm-up: one round of each size fills this vCPU's frame cache.
    barrier(sync, 1, everyone);
    let mut ok = rounds(&r, iov, ranges, first, BATCH, BATCH);
    ok &= rounds(&r, iov, ranges, first, 8, 1);
    let mut measure = |phase: u64, pages: u64, per_call: u64| {
        barrier(sync, phase, everyone);
        let z = zeroed();
        let start = tsc();
        ok &= rounds(&r, iov, ranges, first, pages, per_call);
        let ticks = tsc() - start;
        (ticks / pages, zeroed().wrapping_sub(z))
    };
    let (t512, z512) = measure(2, rounds512 * BATCH, BATCH);
    let (t1, z1) = measure(3, pages1, 1);
    println!("exmapbench.result guest={} vcpu={vcpu} cpu={cpu} region={} b512_ticks_per_page={t512} b512_pages={} b512_zeroed={z512} b1_ticks_per_page={t1} b1_pages={pages1} b1_zeroed={z1}{}",
        guest_lib::info(abi::INFO_GUEST_ID).unwrap_or(0), if mode == 1 { "shared" } else { "own" }, rounds512 * BATCH,
        if ok { "" } else { " FAILED" });
    // Nobody unmounts the shared region or 'xb-sync' while another vCPU still uses them.
    barrier(sync, 4, everyone);
    if let Some(r) = own {
        unmount(r);
    }
    DONE.fetch_add(1, SeqCst);
    ok
}
