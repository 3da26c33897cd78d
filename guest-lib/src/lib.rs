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
//! is the exit code; a panic prints its message and exits with code 101.
#![no_std]
#![warn(missing_docs)]

extern crate freestanding;

/// The hypercall ABI (its own crate, shared with the hypervisor).
pub use abi;
pub mod channel;
pub mod console;
pub mod device;
pub mod exmap;
pub mod hypercall;
pub mod interrupts;
pub mod morsel;
pub mod notify;

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

/// The guest's name from the boot information.
pub fn name(info: &BootInfo) -> &str {
    let len = info.name.iter().position(|&b| b == 0).unwrap_or(info.name.len());
    core::str::from_utf8(&info.name[..len]).unwrap_or("?")
}

#[doc(hidden)]
pub fn start(info: &BootInfo, main: fn(&BootInfo) -> i32) -> ! {
    console::init_logger(info);
    exit(main(info))
}

#[doc(hidden)]
pub fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest panicked: {info}");
    exit(101)
}

/// Defines the guest's entry point (`_start`, which aligns the stack and calls `main`)
/// and its panic handler.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        core::arch::global_asm!(
            ".section .text._start, \"ax\"",
            ".global _start",
            "_start:",
            "and rsp, -16",
            "call {start}",
            "ud2",
            start = sym __guest_start,
        );

        extern "C" fn __guest_start(info: &'static $crate::BootInfo) -> ! {
            $crate::start(info, $main)
        }

        #[panic_handler]
        fn __guest_panic(info: &core::panic::PanicInfo) -> ! {
            $crate::panic(info)
        }
    };
}
