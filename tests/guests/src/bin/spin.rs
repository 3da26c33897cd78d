//! Spins forever without yielding: only preemption lets the other guests run. With `arg=1`
//! it first disables interrupts (CLI), which must not stop the hypervisor's timer: guest
//! RFLAGS.IF gates only the guest's own interrupts.
#![no_std]
#![no_main]

use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

fn main(info: &BootInfo) -> i32 {
    if info.arg == 1 {
        // SAFETY: the guest runs in ring 0 and takes no interrupts of its own.
        unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
        println!("spinning forever with interrupts disabled");
    } else {
        println!("spinning forever");
    }
    let mut n: u64 = 0;
    loop {
        // SAFETY: a plain local; volatile keeps the loop from being optimised away.
        unsafe { core::ptr::write_volatile(&mut n, n.wrapping_add(1)) };
    }
}
