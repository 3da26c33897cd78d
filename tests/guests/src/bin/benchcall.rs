//! The `bench_frames` hypercall from a hostile caller. `arg` 0: the hypervisor runs without
//! `bench=on`, every call (good arguments or not) must be `Denied` or a decoding error, never
//! run. `arg` 1: with `bench=on`: a bad order, a count of 0 and counts past
//! `BENCH_MAX_COUNT` get their defined errors, good calls return a tick count; a loop of the
//! largest calls that take 8 slices of the hypervisor's time is preempted at least 7 times
//! (the time is charged to this guest's slices, `INFO_SLICES`); the end-of-run frame count shows nothing was kept.
#![no_std]
#![no_main]

use guest_lib::abi::{self, Error, BENCH_MAX_COUNT, BENCH_ORDER_2M, BENCH_ORDER_4K, HC_BENCH_FRAMES};
use guest_lib::hypercall::call;
use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

/// Calls `bench_frames(order, count)`; false (and a line) if the answer is not `want`.
fn expect(what: &str, order: u64, count: u64, want: Result<(), Error>) -> bool {
    let got = call(HC_BENCH_FRAMES, [order, count, 0, 0, 0, 0]);
    let ok = match (&got, want) {
        (Ok(ticks), Ok(())) => *ticks > 0,
        (Err(e), Err(w)) => *e == w,
        _ => false,
    };
    if !ok {
        println!("benchcall: {what} (order {order}, count {count}): got {got:?}, want {want:?} UNEXPECTED");
    }
    ok
}

fn main(info: &BootInfo) -> i32 {
    let enabled = info.arg == 1;
    let mut ok = true;
    let bad_orders = [1, 8, 10, 18, u64::MAX];
    for order in bad_orders {
        ok &= expect("bad order", order, 1, Err(Error::Invalid));
    }
    ok &= expect("count 0", BENCH_ORDER_4K, 0, Err(Error::Invalid));
    ok &= expect("count past the bound", BENCH_ORDER_2M, BENCH_MAX_COUNT + 1, Err(Error::TooLarge));
    ok &= expect("count u64::MAX", BENCH_ORDER_4K, u64::MAX, Err(Error::TooLarge));
    if !enabled {
        ok &= expect("4 KiB without bench=on", BENCH_ORDER_4K, 1, Err(Error::Denied));
        ok &= expect("2 MiB without bench=on", BENCH_ORDER_2M, BENCH_MAX_COUNT, Err(Error::Denied));
        println!("benchcall: without bench=on every call refused{}", if ok { "" } else { " FAILED" });
        return if ok { 0 } else { 1 };
    }
    ok &= expect("one 4 KiB pair", BENCH_ORDER_4K, 1, Ok(()));
    ok &= expect("one 2 MiB pair", BENCH_ORDER_2M, 1, Ok(()));
    // The largest calls until they took 8 slices of the hypervisor's time: that time must
    // show up as preemptions of this guest (at least 7: the rest of the loop adds more).
    let per_us = guest_lib::info(abi::INFO_TSC_PER_US).unwrap_or(1).max(1);
    let slice = guest_lib::info(abi::INFO_SLICE_US).unwrap_or(10_000).max(1) * per_us;
    let slices_before = guest_lib::info(abi::INFO_SLICES).unwrap_or(0);
    let (mut calls, mut spent) = (0u64, 0u64);
    while spent < 8 * slice && calls < 1_000_000 {
        match call(HC_BENCH_FRAMES, [BENCH_ORDER_2M, BENCH_MAX_COUNT, 0, 0, 0, 0]) {
            Ok(ticks) => spent += ticks,
            Err(e) => {
                println!("benchcall: largest 2 MiB call: {e:?} UNEXPECTED");
                ok = false;
                break;
            }
        }
        calls += 1;
    }
    let slices = guest_lib::info(abi::INFO_SLICES).unwrap_or(0) - slices_before;
    if slices * slice + slice < spent {
        println!("benchcall: {calls} calls took {} us in the hypervisor but only {slices} slices were charged UNEXPECTED", spent / per_us);
        ok = false;
    }
    println!("benchcall: with bench=on bad calls refused, {calls} largest calls took {} us in the hypervisor, {slices} slices charged{}", spent / per_us,
        if ok { "" } else { " FAILED" });
    if ok { 0 } else { 1 }
}
