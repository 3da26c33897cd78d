//! Reads guest-physical memory beyond its own RAM: the hypervisor must stop it.
#![no_std]
#![no_main]

use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

fn main(info: &BootInfo) -> i32 {
    let target = info.memory_size + (1 << 20);
    println!("reading {target:#x}, outside my {} MiB", info.memory_size >> 20);
    // SAFETY: deliberately not safe: the guest's identity map covers this address, its
    // second-level table does not, so the hypervisor sees a violation.
    let value = unsafe { core::ptr::read_volatile(target as *const u64) };
    println!("still running after the read: {value:#x}");
    0
}
