//! Spins forever without yielding: only preemption lets the other guests run.
#![no_std]
#![no_main]

use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

fn main(_: &BootInfo) -> i32 {
    println!("spinning forever");
    let mut n: u64 = 0;
    loop {
        // SAFETY: a plain local; volatile keeps the loop from being optimised away.
        unsafe { core::ptr::write_volatile(&mut n, n.wrapping_add(1)) };
    }
}
