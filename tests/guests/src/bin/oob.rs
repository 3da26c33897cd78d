//! Reads memory it may not: `arg=0` guest-physical memory beyond its own RAM (the hypervisor
//! sees a second-level fault), `arg=1` a linear address its own page tables do not map (a
//! guest #PF, reported with CR2). Either way the hypervisor must stop it.
#![no_std]
#![no_main]

use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

/// Far above guest RAM and the morsel window (512 GiB up): not in the guest's identity map.
const UNMAPPED: u64 = 0x7000_0000_0000;

fn main(info: &BootInfo) -> i32 {
    let target = match info.arg {
        1 => {
            println!("reading {UNMAPPED:#x}, which my page tables do not map");
            UNMAPPED
        }
        _ => {
            let t = info.memory_size + (1 << 20);
            println!("reading {t:#x}, outside my {} MiB", info.memory_size >> 20);
            t
        }
    };
    // SAFETY: deliberately not safe: arg 0: the guest's identity map covers this address, its
    // second-level table does not; arg 1: no guest page table maps it.
    let value = unsafe { core::ptr::read_volatile(target as *const u64) };
    println!("still running after the read: {value:#x}");
    0
}
