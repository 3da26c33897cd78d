//! The host-testable part of the hypervisor (`cargo test -p formats`): formats it reads from
//! untrusted or external input (the guest archive, guest ELF images, the ACPI DMAR and NFIT
//! tables, guest instructions), the persistent region's layout and write order, the bounds
//! of device register windows (`mmio`, whose accesses the tests never make), and the
//! backends' capability decisions from CPUID/MSR snapshots (`vmx_caps`, `svm_caps`).
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod amdvi;
pub mod archive;
pub mod bdf;
pub mod decode;
pub mod dmar;
pub mod elf;
pub mod ivrs;
pub mod le;
pub mod mmio;
pub mod nfit;
pub mod pmem_layout;
pub mod svm_caps;
pub mod units;
pub mod vmx_caps;
pub mod vtd_qi;
