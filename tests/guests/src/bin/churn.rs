//! Scenario svm_world_switch_survives_tcg_stress: many of these guests churn small morsels
//! (create, tag, yield, check, destroy) on every CPU at once, `arg` rounds each (default
//! 200), so the world switch runs tens of thousands of times a second with the translation
//! cache of QEMU's multi-threaded TCG flushed over and over. Each guest's names carry its id,
//! so guests never wait for each other. Exits 0 after its rounds; a frame handed out twice or
//! a non-zero new morsel is reported and exits 1.
#![no_std]
#![no_main]

use core::sync::atomic::Ordering::SeqCst;
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, yield_now, BootInfo, Error};

guest_lib::entry!(main);

/// `w<guest id in hex>`: unique per guest, at most 17 bytes.
fn name_of(buf: &mut [u8; 20], id: u64) -> &str {
    buf[0] = b'w';
    let mut len = 1;
    for shift in (0..16).rev() {
        let digit = ((id >> (shift * 4)) & 0xf) as u8;
        if digit != 0 || len > 1 || shift == 0 {
            buf[len] = if digit < 10 { b'0' + digit } else { b'a' + digit - 10 };
            len += 1;
        }
    }
    core::str::from_utf8(&buf[..len]).unwrap_or("w")
}

fn main(info: &BootInfo) -> i32 {
    let rounds = if info.arg == 0 { 200 } else { info.arg };
    let mut buf = [0u8; 20];
    let name = name_of(&mut buf, info.guest_id);
    for round in 0..rounds {
        let m = loop {
            match morsel::create(name, 16 << 10, PageSize::Size4K, false) {
                Ok(m) => break m,
                Err(Error::NoMemory) | Err(Error::Busy) => yield_now(),
                Err(e) => {
                    println!("churn: create {name} (round {round}): {e}");
                    return 1;
                }
            }
        };
        let a = m.atomics();
        let tag = (info.guest_id << 32) | round;
        for k in (0..a.len()).step_by(512) {
            let old = a[k].load(SeqCst);
            if old != 0 {
                println!("churn: {name} word {k} of a new morsel holds {old:#x}, not zero UNEXPECTED");
                return 1;
            }
            a[k].store(tag ^ k as u64, SeqCst);
        }
        yield_now();
        for k in (0..a.len()).step_by(512) {
            let got = a[k].load(SeqCst);
            if got != tag ^ k as u64 {
                println!("churn: {name} word {k} holds {got:#x}, not its own tag UNEXPECTED");
                return 1;
            }
        }
        drop(m);
        if let Err(e) = morsel::destroy(name) {
            println!("churn: destroy {name} (round {round}): {e}");
            return 1;
        }
    }
    println!("churn: {rounds} rounds on cpu {}", guest_lib::cpu_index());
    0
}
