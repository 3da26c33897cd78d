//! guest-lib's heap (feature `heap`): `Vec`, `Box`, `String` and a `BTreeMap` on two vCPUs at
//! once (each checks its own data after the other's churn), a request larger than the heap
//! refused through `try_reserve` (no crash), then everything back: the heap's free bytes
//! equal its size again.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU32, Ordering::SeqCst};
use guest_lib::{heap, println, BootInfo};

guest_lib::entry!(main, vcpu_main);

static DONE: AtomicU32 = AtomicU32::new(0);

/// Allocation churn tagged with `tag`: returns whether every block held what was written.
fn churn(tag: u64) -> bool {
    let mut ok = true;
    let mut map = BTreeMap::new();
    for round in 0..200u64 {
        let v: Vec<u64> = (0..(round % 37) * 16 + 1).map(|i| i ^ tag).collect();
        let b = Box::new([tag ^ round; 33]);
        let mut s = String::new();
        let _ = write!(s, "{tag}-{round}");
        map.insert(round, (v, b, s));
        if round % 3 == 0 {
            map.remove(&(round / 2));
        }
    }
    for (round, (v, b, s)) in &map {
        ok &= v.iter().enumerate().all(|(i, &x)| x == i as u64 ^ tag);
        ok &= b.iter().all(|&x| x == tag ^ round);
        let mut want = String::new();
        let _ = write!(want, "{tag}-{round}");
        ok &= *s == want;
    }
    ok
}

fn vcpu_main(_: &BootInfo, vcpu: u32) -> i32 {
    let ok = churn(0x1111 * vcpu as u64);
    DONE.fetch_add(1, SeqCst);
    if ok { 0 } else { println!("heapuse: vcpu {vcpu}: WRONG data"); 1 }
}

fn main(info: &BootInfo) -> i32 {
    let ok = churn(0xabcd);
    while DONE.load(SeqCst) + 1 < info.vcpu_count as u32 {
        guest_lib::yield_now();
    }
    let (free, total) = heap::stats();
    println!("heapuse: {} vCPUs churned Vec, Box, String and BTreeMap: data {}; heap {} KiB, {} KiB free",
        info.vcpu_count, if ok { "intact" } else { "WRONG" }, total >> 10, free >> 10);
    let mut huge: Vec<u8> = Vec::new();
    let refused = huge.try_reserve(total + 1).is_err();
    println!("heapuse: {} bytes more than the heap: {}", total + 1, if refused { "refused" } else { "WRONG: granted" });
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let _ = blocks.try_reserve(4096);
    let mut taken = 0usize;
    while blocks.len() < blocks.capacity() {
        let mut b = Vec::new();
        if b.try_reserve_exact(64 * 1024).is_err() {
            break;
        }
        b.resize(64 * 1024, 0xa5u8);
        taken += b.len();
        blocks.push(b);
    }
    let full = heap::stats().0 < 64 * 1024 + 64;
    drop(blocks);
    drop(huge);
    let (after, _) = heap::stats();
    println!("heapuse: filled {} KiB until refused ({}), all freed: {} KiB free of {} KiB",
        taken >> 10, if full { "heap full" } else { "WRONG: not full" }, after >> 10, total >> 10);
    if !ok || !refused || !full || after != total {
        println!("heapuse: WRONG");
        return 1;
    }
    0
}
