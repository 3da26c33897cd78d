//! The smallest guest: prints a greeting with what the hypervisor told it, exits 0.
#![no_std]
#![no_main]

use guest_lib::{abi, println, BootInfo};

guest_lib::entry!(main);

fn main(info: &BootInfo) -> i32 {
    let version = guest_lib::info(abi::INFO_ABI_VERSION).unwrap_or(0);
    println!("hello from guest {} ({}), {} MiB of memory, ABI v{}",
        info.guest_id, guest_lib::name(info), info.memory_size >> 20, version);
    // Shown only with the hypervisor's `log=debug` (or trace): the guest logger follows it.
    log::debug!(target: "hello", "debug output is on");
    0
}
