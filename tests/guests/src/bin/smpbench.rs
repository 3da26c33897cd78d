//! `cargo xtask bench smp`: every vCPU of this guest (one per CPU) measures, at the same
//! time as the others, what the hypervisor's allocator and morsel manager cost per call:
//! create + destroy of a 64 KiB morsel of 4 KiB pages and of a 2 MiB morsel of one 2 MiB
//! page (each one hypercall pair, frames from the CPU's own allocator core), and unmount +
//! open of a mounted morsel (every unmount is a TLB shootdown to the CPUs the guest ran on).
//! Prints one line per vCPU with calls per second, from the TSC (`info` TSC rate).
//! First, when the hypervisor runs with `bench=on`, all vCPUs start together (a barrier) and
//! have the hypervisor allocate and free 4 KiB and 2 MiB frames in a loop through their CPU's
//! allocator core (`bench_frames`, timed inside the hypervisor, no lock held): one more line
//! per vCPU with pairs per second and nanoseconds per pair.
//! Then, all vCPUs together again, null exits: `20 * arg` CPUID instructions (each an exit
//! the hypervisor emulates) and as many `info` hypercalls, TSC ticks per exit (under Bochs
//! about one tick per emulated instruction): one more line per vCPU.
//! The morsel line ends with the TSC ticks per operation (under Bochs deterministic, finer
//! than the rates; the rates depend on the TSC calibration, which varies from boot to boot
//! under Bochs). Every guest keeps the morsel 'sb-sync' mounted during the morsel phase, and
//! several guests (one per CPU, `cpu=K`: `bench smp`'s guest-per-CPU configuration, no
//! shootdown to another CPU) start it together through a counter there; names carry the
//! guest id, so the guests never share one.
//! `arg`: calls per measurement (default 200; frame pairs: 64 times as many).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering::SeqCst};
use guest_lib::abi::{self, Error};
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, BootInfo};

guest_lib::entry!(main, vcpu_main);

/// vCPUs that finished measuring.
static DONE: AtomicU32 = AtomicU32::new(0);
/// vCPUs ready to measure the frame allocator (they start when all are).
static READY: AtomicU32 = AtomicU32::new(0);
/// 'sb-sync' mounted and every guest there: 1; failed: 2 (`guests_together`).
static SYNCED: AtomicU32 = AtomicU32::new(0);
/// vCPUs ready to measure null exits.
static EXITS_READY: AtomicU32 = AtomicU32::new(0);

fn main(info: &BootInfo) -> i32 {
    let ok = measure(info, 0);
    let vcpus = info.vcpu_count.max(1) as u32;
    while DONE.load(SeqCst) < vcpus {
        core::hint::spin_loop();
    }
    // The hypervisor prints its counters, the shootdown figures among them.
    morsel::print_stats();
    if ok { 0 } else { 1 }
}

fn vcpu_main(info: &BootInfo, vcpu: u32) -> i32 {
    if measure(info, vcpu) { 0 } else { 1 }
}

fn tsc() -> u64 {
    // SAFETY: RDTSC has no side effects; the hypervisor does not trap it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Calls per second from `calls` calls in `ticks` TSC ticks.
fn rate(calls: u64, ticks: u64, per_us: u64) -> u64 {
    calls * 1_000_000 * per_us / ticks.max(1)
}

fn measure(info: &BootInfo, vcpu: u32) -> bool {
    let calls = if info.arg == 0 { 200 } else { info.arg };
    let per_us = guest_lib::info(abi::INFO_TSC_PER_US).unwrap_or(1).max(1);
    let cpu = guest_lib::cpu_index();
    let mut ok = true;
    READY.fetch_add(1, SeqCst);
    while READY.load(SeqCst) < info.vcpu_count.max(1) as u32 {
        core::hint::spin_loop();
    }
    ok &= frames(vcpu, cpu, calls, per_us);
    EXITS_READY.fetch_add(1, SeqCst);
    while EXITS_READY.load(SeqCst) < info.vcpu_count.max(1) as u32 {
        core::hint::spin_loop();
    }
    null_exits(vcpu, cpu, 20 * calls);
    let guest = guest_lib::info(abi::INFO_GUEST_ID).unwrap_or(0);
    if !guests_together(vcpu) {
        ok = false;
    }
    let mut name = [b'b', b'0' + (guest % 10) as u8, b'0' + (vcpu % 10) as u8, b'x'];
    let mut pair = |page: PageSize, size: u64, tag: u8| {
        name[3] = tag;
        let n = core::str::from_utf8(&name).unwrap_or("b00x");
        let start = tsc();
        for _ in 0..calls {
            match morsel::create(n, size, page, false) {
                Ok(m) => {
                    drop(m);
                    ok &= morsel::destroy(n).is_ok();
                }
                Err(_) => ok = false,
            }
        }
        let ticks = tsc() - start;
        (rate(calls, ticks, per_us), ticks / calls.max(1))
    };
    let (small, small_ticks) = pair(PageSize::Size4K, 64 * 1024, b's');
    let (huge, huge_ticks) = pair(PageSize::Size2M, 2 << 20, b'h');
    // Unmount + open: the unmount shoots the guest's translations down on every CPU it ran on.
    name[3] = b'm';
    let n = core::str::from_utf8(&name).unwrap_or("b00m");
    let mut mounts = 0;
    let (mut start, mut end) = (0, 0);
    if let Ok(m) = morsel::create(n, 64 * 1024, PageSize::Size4K, false) {
        drop(m);
        start = tsc();
        for _ in 0..calls {
            match morsel::open(n) {
                Ok(r) => {
                    drop(r);
                    mounts += 1;
                }
                Err(_) => ok = false,
            }
        }
        end = tsc();
        ok &= morsel::destroy(n).is_ok();
    }
    let remount = rate(mounts, end - start, per_us);
    let remount_ticks = (end - start) / mounts.max(1);
    println!("smpbench vcpu {vcpu} cpu {cpu}: 4 KiB morsel create+destroy {small}/s, 2 MiB morsel create+destroy {huge}/s, unmount+open {remount}/s ({calls} calls each){}",
        if ok { "" } else { " FAILED" });
    println!("smpbench vcpu {vcpu} cpu {cpu} guest {guest}: morsel ticks per op: small {small_ticks} huge {huge_ticks} remount {remount_ticks}");
    DONE.fetch_add(1, SeqCst);
    ok
}

/// Mounts the morsel 'sb-sync' (made by the first guest, opened by the others) and keeps it
/// mounted to the end, in every configuration: so every later mount of the bench finds its
/// intermediate tables in place (a lone mount allocates and frees them on each open and
/// unmount, ~10,000 Bochs ticks, and a configuration where another mount kept them would
/// look faster for it). With several guests (a guest per CPU) every guest's vCPU then waits
/// until all have come (a counter in it), so the morsel phases overlap. One vCPU per guest
/// does this (vCPU 0; the others wait for it). False if it failed.
fn guests_together(vcpu: u32) -> bool {
    if vcpu != 0 {
        while SYNCED.load(SeqCst) == 0 {
            core::hint::spin_loop();
        }
        return SYNCED.load(SeqCst) == 1;
    }
    let everyone = guest_lib::info(abi::INFO_GUEST_COUNT).unwrap_or(1);
    let sync = match morsel::create("sb-sync", 4096, PageSize::Size4K, true) {
        Err(Error::Busy) => morsel::open_mut_when_created("sb-sync"),
        other => other,
    };
    let Ok(sync) = sync else {
        SYNCED.store(2, SeqCst);
        return false;
    };
    let count = &sync.atomics()[0];
    count.fetch_add(1, SeqCst);
    while count.load(SeqCst) < everyone {
        core::hint::spin_loop();
    }
    // Mounted to the end (the run's end unmounts and destroys it).
    core::mem::forget(sync);
    SYNCED.store(1, SeqCst);
    true
}

/// Frame alloc+free inside the hypervisor: `64 * calls` pairs of each size (in calls of at
/// most `BENCH_MAX_COUNT`), ticks as the hypervisor counted them. Without `bench=on` (`Denied`)
/// nothing is printed; any other error fails the bench.
fn frames(vcpu: u32, cpu: u32, calls: u64, per_us: u64) -> bool {
    let pairs = (64 * calls).next_multiple_of(abi::BENCH_MAX_COUNT);
    let measure = |page: PageSize| -> Result<u64, guest_lib::Error> {
        let mut ticks = 0;
        for _ in 0..pairs / abi::BENCH_MAX_COUNT {
            ticks += guest_lib::bench_frames(page, abi::BENCH_MAX_COUNT)?;
        }
        Ok(ticks)
    };
    match (measure(PageSize::Size4K), measure(PageSize::Size2M)) {
        (Ok(small), Ok(huge)) => {
            let ns = |ticks: u64| ticks * 1000 / (per_us * pairs);
            println!("smpbench vcpu {vcpu} cpu {cpu}: frame alloc+free 4 KiB {}/s ({} ns), 2 MiB {}/s ({} ns) ({pairs} pairs each)",
                rate(pairs, small, per_us), ns(small), rate(pairs, huge, per_us), ns(huge));
            true
        }
        (Err(guest_lib::Error::Denied), _) => true,
        (a, b) => {
            println!("smpbench vcpu {vcpu} cpu {cpu}: frame alloc+free: {a:?} {b:?} FAILED");
            false
        }
    }
}

/// `n` CPUID exits and `n` `info` hypercalls: TSC ticks per exit of each.
fn null_exits(vcpu: u32, cpu: u32, n: u64) {
    let start = tsc();
    for _ in 0..n {
        // CPUID leaf 0: an exit the hypervisor emulates.
        let _ = core::arch::x86_64::__cpuid(0);
    }
    let cpuid = (tsc() - start) / n.max(1);
    let start = tsc();
    for _ in 0..n {
        let _ = guest_lib::info(abi::INFO_GUEST_ID);
    }
    let info = (tsc() - start) / n.max(1);
    println!("smpbench vcpu {vcpu} cpu {cpu}: null exits: CPUID {cpuid} ticks, info {info} ticks per exit ({n} each)");
}
