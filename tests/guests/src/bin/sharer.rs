//! Two guests share a 64 MiB morsel of 4 KiB pages read-write and see each other's writes:
//! `arg=0` creates "shared" and writes at offset 0; `arg=1` opens it read-write and writes
//! at 32 MiB; each waits for the other's mark.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};
use guest_lib::morsel::{self, MorselMut, PageSize};
use guest_lib::{println, yield_now, BootInfo, Error};

guest_lib::entry!(main);

const SIZE: u64 = 64 << 20;
const MARK: [u64; 2] = [0xaaaa_0000_0000_0001, 0xbbbb_0000_0000_0002];
const OFFSET: [usize; 2] = [0, 32 << 20];

fn main(info: &BootInfo) -> i32 {
    let me = (info.arg & 1) as usize;
    let other = 1 - me;
    let mut m: MorselMut = if me == 0 {
        match morsel::create("shared", SIZE, PageSize::Size4K, true) {
            Ok(m) => m,
            Err(e) => {
                println!("sharer {me}: create failed: {e}");
                return 1;
            }
        }
    } else {
        loop {
            match morsel::open_mut("shared") {
                Ok(m) => break m,
                Err(Error::NotFound) => yield_now(),
                Err(e) => {
                    println!("sharer {me}: open failed: {e}");
                    return 1;
                }
            }
        }
    };
    let base = m.as_mut_ptr();
    // SAFETY: both offsets lie inside the 64 MiB mount; volatile because the other guest
    // writes the same memory.
    unsafe { write_volatile(base.add(OFFSET[me]) as *mut u64, MARK[me]) };
    println!("sharer {me}: wrote {:#x} at offset {:#x} of a {} MiB read-write morsel at {:#x}", MARK[me], OFFSET[me], m.len() >> 20, base as u64);
    for _ in 0..1000 {
        // SAFETY: as above.
        let seen = unsafe { read_volatile(base.add(OFFSET[other]) as *const u64) };
        if seen == MARK[other] {
            println!("sharer {me}: sees the other guest's write {seen:#x} at offset {:#x}", OFFSET[other]);
            return 0;
        }
        yield_now();
    }
    println!("sharer {me}: never saw the other guest's write");
    1
}
