//! The host-testable part of the hypervisor: formats it reads from untrusted or external
//! input (the guest archive, guest ELF images, the ACPI DMAR table, guest instructions) and the bounds of device
//! register windows (`mmio`, whose accesses the tests never make), so that
//! `cargo test -p hypervisor --lib` checks them on the build machine.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod archive;
pub mod bdf;
pub mod decode;
pub mod dmar;
pub mod elf;
pub mod le;
pub mod mmio;
pub mod nfit;
pub mod pmem_layout;
pub mod units;
