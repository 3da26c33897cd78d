//! What a ParPerOS guest unikernel links. A guest is a `#![no_std] #![no_main]` binary:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! guest_lib::entry!(main);
//! fn main(info: &guest_lib::BootInfo) -> i32 { guest_lib::println!("hi"); 0 }
//! ```
//!
//! The hypervisor starts the guest in 64-bit mode with identity paging over its memory
//! and the morsel window, a stack, and the boot information in rdi. `main`'s return value
//! is the exit code; a panic prints its message and exits with code 101 (that vCPU).
//!
//! A guest with several vCPUs (`:vcpus=N` on the hypervisor's command line) names a second
//! function for them: `entry!(main, vcpu_main)` with `fn vcpu_main(info: &BootInfo, vcpu:
//! u32) -> i32`; vCPU 0 runs `main`, every other vCPU `vcpu_main` on its own stack, all at
//! the same time on different CPUs where there are several. The guest ends when the last
//! vCPU returned; its exit code is `main`'s unless another vCPU returned non-zero first.
//! With `entry!(main)` alone the other vCPUs return 0 at once. `vcpu_index()` and
//! `BootInfo::vcpu_count` say which and how many; memory that vCPUs (or guests) use at the
//! same time is shared soundly through atomics (`morsel::MorselRef::atomics`).
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

// Host tests (`cargo test -p guest-lib`) link the host's libc instead.
#[cfg(not(test))]
extern crate freestanding;
#[cfg(feature = "heap")]
extern crate alloc;
#[cfg(test)]
extern crate std;

/// The hypercall ABI (its own crate, shared with the hypervisor).
pub use abi;
pub mod channel;
pub mod console;
pub mod device;
pub mod exmap;
pub mod heap;
pub mod hypercall;
pub mod interrupts;
pub mod morsel;
pub mod notify;
pub mod persist;

pub use persist::persist;

pub use abi::{BootInfo, Error};

use abi::*;
use hypercall::call;

/// Stops the guest with `code`.
pub fn exit(code: i32) -> ! {
    let _ = call(HC_EXIT, [code as u32 as u64, 0, 0, 0, 0, 0]);
    // The hypervisor never resumes an exited guest; spin defensively.
    loop {
        core::hint::spin_loop();
    }
}

/// Gives the CPU to the next guest.
pub fn yield_now() {
    let _ = call(HC_YIELD, [0; 6]);
}

/// Asks the hypervisor for a fact (`abi::INFO_*`).
pub fn info(what: u64) -> Result<u64, Error> {
    call(HC_INFO, [what, 0, 0, 0, 0, 0])
}

/// `bench_frames`: the hypervisor allocates and frees one frame of `page` size `count` times
/// (1..=`abi::BENCH_MAX_COUNT`) through the allocator core of the CPU this vCPU runs on and
/// returns the TSC ticks it took (`Denied` unless the hypervisor runs with `bench=on`).
pub fn bench_frames(page: morsel::PageSize, count: u64) -> Result<u64, Error> {
    let order = match page {
        morsel::PageSize::Size4K => BENCH_ORDER_4K,
        morsel::PageSize::Size2M => BENCH_ORDER_2M,
    };
    call(HC_BENCH_FRAMES, [order, count, 0, 0, 0, 0])
}

/// The calling vCPU's index in this guest (0 for the vCPU that runs `main`).
pub fn vcpu_index() -> u32 {
    info(INFO_VCPU_INDEX).unwrap_or(0) as u32
}

/// The index of the CPU the calling vCPU runs on.
pub fn cpu_index() -> u32 {
    info(INFO_CPU_INDEX).unwrap_or(0) as u32
}

/// The guest's name from the boot information.
pub fn name(info: &BootInfo) -> &str {
    let len = info.name.iter().position(|&b| b == 0).unwrap_or(info.name.len());
    core::str::from_utf8(&info.name[..len]).unwrap_or("?")
}

#[doc(hidden)]
pub fn start(info: &BootInfo, vcpu: u64, ist_top: u64, main: fn(&BootInfo) -> i32, secondary: fn(&BootInfo, u32) -> i32) -> ! {
    interrupts::load_on_this_vcpu(vcpu, ist_top);
    if vcpu == 0 {
        console::init_logger(info);
        exit(main(info))
    }
    exit(secondary(info, vcpu as u32))
}

#[doc(hidden)]
pub fn no_secondary(_: &BootInfo, _: u32) -> i32 {
    0
}

#[doc(hidden)]
pub fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest panicked: {info}");
    exit(101)
}

/// Defines the guest's entry point (`_start`, which aligns the stack, keeps its top
/// `interrupts::IST_RESERVE` bytes for the vCPU's interrupt stacks, loads the vCPU's
/// interrupt tables and calls `main` on vCPU 0, and `vcpu_main` on the others if given) and
/// its panic handler.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        $crate::entry!($main, $crate::no_secondary);
    };
    ($main:path, $secondary:path) => {
        core::arch::global_asm!(
            ".section .text._start, \"ax\"",
            ".global _start",
            "_start:",
            "and rsp, -16",
            // The top of the stack holds this vCPU's interrupt stacks (`interrupts`).
            "mov rdx, rsp",
            "sub rsp, {ist}",
            "call {start}",
            "ud2",
            start = sym __guest_start,
            ist = const $crate::interrupts::IST_RESERVE,
        );

        extern "C" fn __guest_start(info: &'static $crate::BootInfo, vcpu: u64, ist_top: u64) -> ! {
            $crate::start(info, vcpu, ist_top, $main, $secondary)
        }

        #[panic_handler]
        fn __guest_panic(info: &core::panic::PanicInfo) -> ! {
            $crate::panic(info)
        }
    };
}
