//! Long work on one CPU must not stall an unrelated guest on another, one per `arg`:
//! * 0 (two vCPUs on two CPUs): vCPU 0 creates a large morsel (`SIZE_MIB` MiB of 2 MiB
//!   pages, given as `arg` = 0 + 1000 * MiB, default 1 GiB): the hypervisor zeroes it on vCPU
//!   0's CPU; meanwhile vCPU 1 creates, unmounts and destroys a small morsel in a loop: each
//!   unmount shoots down on vCPU 0's CPU (this guest ran there). Phases go to the shared
//!   "stall" morsel: 1 while the big create runs, 2 when it returned.
//! * 1 and 2 (a third guest, alone on its own CPU): makes `info` calls in a loop and
//!   measures with RDTSC the longest gap between two of them while phase 1 lasts; when phase
//!   2 comes it prints it in ms. Arg 1 (Bochs: emulated time, deterministic) exits 1 if the
//!   gap reached two slices; arg 2 (QEMU on a loaded host, whose threads are descheduled for
//!   hundreds of ms at a time) if it reached an eighth of phase 1 as well. Before the fix a
//!   zeroing CPU did not answer shootdowns and the unmount waited for it holding the lock
//!   every exit needs: this guest stood still for the whole zeroing.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guest_lib::morsel::{self, PageSize};
use guest_lib::{abi, println, yield_now, BootInfo, Error};

guest_lib::entry!(main, vcpu_main);

/// The shared "stall" morsel's mount (0: not yet), for vCPU 1.
static SHARED: AtomicU64 = AtomicU64::new(0);
/// vCPU 1 no longer touches "stall".
static UNMOUNTER_DONE: AtomicU64 = AtomicU64::new(0);

/// Words of "stall": the phase, unmounts during phase 1, unmounts in all, the third guest's
/// calls.
const PHASE: usize = 0;
const UNMOUNTS_DURING: usize = 1;
const UNMOUNTS: usize = 2;
const CALLS: usize = 3;

fn main(info: &BootInfo) -> i32 {
    match info.arg % 1000 {
        0 => zeroer(info),
        1 => observer(false),
        2 => observer(true),
        _ => 2,
    }
}

fn vcpu_main(_: &BootInfo, _: u32) -> i32 {
    unmounter()
}

fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the time stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn zeroer(info: &BootInfo) -> i32 {
    let mib = match info.arg / 1000 {
        0 => 1024,
        n => n,
    };
    let s = match morsel::create("stall", 1 << 20, PageSize::Size4K, true) {
        Ok(s) => s,
        Err(e) => {
            println!("stall: cannot create 'stall': {e}");
            return 1;
        }
    };
    let a = s.atomics();
    SHARED.store(s.addr(), SeqCst);
    // The unmounter and the observer are going.
    while a[UNMOUNTS].load(SeqCst) < 3 || a[CALLS].load(SeqCst) < 100 {
        yield_now();
    }
    let per_us = guest_lib::info(abi::INFO_TSC_PER_US).unwrap_or(1).max(1);
    a[PHASE].store(1, SeqCst);
    let t0 = tsc();
    let big = morsel::create("big", mib << 20, PageSize::Size2M, false);
    let ms = (tsc() - t0) / per_us / 1000;
    a[PHASE].store(2, SeqCst);
    match big {
        Ok(m) => {
            drop(m);
            let _ = morsel::destroy("big");
        }
        Err(e) => {
            println!("stall: cannot create a {mib} MiB morsel: {e}: WRONG");
            return 1;
        }
    }
    println!("stall: created (zeroed) a {mib} MiB morsel in {ms} ms on cpu {}; the sibling vCPU unmounted {} times meanwhile",
        guest_lib::cpu_index(), a[UNMOUNTS_DURING].load(SeqCst));
    // The unmounter stops at phase 2; the observer keeps "stall" mounted until it printed.
    while a[PHASE].load(SeqCst) != 3 || UNMOUNTER_DONE.load(SeqCst) == 0 {
        yield_now();
    }
    0
}

fn unmounter() -> i32 {
    let gpa = loop {
        match SHARED.load(SeqCst) {
            0 => yield_now(),
            g => break g,
        }
    };
    let Some(a) = morsel::atomics_at(gpa) else {
        UNMOUNTER_DONE.store(1, SeqCst);
        return 1;
    };
    println!("stall: vcpu 1 unmounting on cpu {}", guest_lib::cpu_index());
    while a[PHASE].load(SeqCst) < 2 {
        match morsel::create("kick", 4096, PageSize::Size4K, false) {
            Ok(m) => drop(m), // morsel_unmount: a shootdown on every CPU this guest ran on
            Err(e) => {
                println!("stall: kick: {e}: WRONG");
                UNMOUNTER_DONE.store(1, SeqCst);
                return 1;
            }
        }
        let _ = morsel::destroy("kick");
        if a[PHASE].load(SeqCst) == 1 {
            a[UNMOUNTS_DURING].fetch_add(1, SeqCst);
        }
        a[UNMOUNTS].fetch_add(1, SeqCst);
    }
    UNMOUNTER_DONE.store(1, SeqCst);
    0
}

fn observer(loaded_host: bool) -> i32 {
    let s = loop {
        match morsel::open_mut("stall") {
            Err(Error::NotFound) => yield_now(),
            Ok(s) => break s,
            Err(e) => {
                println!("stall observer: {e}");
                return 1;
            }
        }
    };
    let a = s.atomics();
    let per_us = guest_lib::info(abi::INFO_TSC_PER_US).unwrap_or(1).max(1);
    let slice_us = guest_lib::info(abi::INFO_SLICE_US).unwrap_or(10_000).max(1);
    let (mut longest, mut calls_during, mut began) = (0u64, 0u64, 0u64);
    let mut last = tsc();
    loop {
        let phase = a[PHASE].load(SeqCst);
        let _ = guest_lib::info(abi::INFO_GUEST_ID);
        let now = tsc();
        if phase == 1 {
            longest = longest.max(now - last);
            calls_during += 1;
            if began == 0 {
                began = last;
            }
        }
        last = now;
        a[CALLS].fetch_add(1, SeqCst);
        if phase >= 2 {
            break;
        }
    }
    let us = longest / per_us;
    let phase_us = (last - began) / per_us;
    let limit_us = if loaded_host { (2 * slice_us).max(phase_us / 8) } else { 2 * slice_us };
    let wrong = us >= limit_us || calls_during == 0;
    println!("stall observer on cpu {}: longest gap between two calls while the other guest zeroed and unmounted: {}.{:03} ms of {} ms ({} calls; limit {} ms){}",
        guest_lib::cpu_index(), us / 1000, us % 1000, phase_us / 1000, calls_during, limit_us / 1000, if wrong { ": WRONG" } else { "" });
    a[PHASE].store(3, SeqCst);
    wrong as i32
}
