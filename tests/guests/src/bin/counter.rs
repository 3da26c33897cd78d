//! Counts to five, yielding after each line: two of these interleave their output.
#![no_std]
#![no_main]

use guest_lib::{println, yield_now, BootInfo};

guest_lib::entry!(main);

fn main(info: &BootInfo) -> i32 {
    for i in 0..5 {
        println!("count {i} (guest {})", info.guest_id);
        yield_now();
    }
    0
}
