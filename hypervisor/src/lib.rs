//! The host-testable part of the hypervisor: formats it reads from untrusted or external
//! input (the guest archive, guest ELF images, the ACPI DMAR table), kept free of hardware
//! access so that
//! `cargo test -p hypervisor --lib` checks them on the build machine.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod archive;
pub mod bdf;
pub mod dmar;
pub mod elf;
