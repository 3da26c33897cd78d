//! Loading a guest: `vmcore::loader` (RAM, segments, page tables, boot information; host-tested
//! there) plus what only the hypervisor has: the record for the debugger and the vCPU's setup.

use super::memory::{GuestMemory, MapError};
use super::VcpuSetup;
use crate::mm::frames::Frames;
use formats::elf;
use morsel::{Format, GuestPhysAddr};

pub use vmcore::loader::Load;

/// Stack space per vCPU kept free of image segments below the top of guest memory (vCPU v's
/// stack starts `v * STACK_RESERVE` below the top).
pub const STACK_RESERVE: u64 = abi::VCPU_STACK_RESERVE;

/// Maps the guest's RAM into `mem` and loads `image` (already checked to lie inside it);
/// returns the vCPU's start: at the image's entry, the stack at the top of guest memory,
/// rdi = the boot information, CR3 = the loader's page tables.
pub fn load<F: Format<Input = GuestPhysAddr>>(mem: &mut GuestMemory<F>, image: &elf::Image, g: &Load) -> Result<VcpuSetup, MapError> {
    let frames = &Frames::here();
    let start = vmcore::loader::load(mem, image, g, frames)?;
    super::report::record_for_debugger(g.id, g.name, mem.root(), g.memory);
    Ok(VcpuSetup { rip: start.rip, rsp: start.rsp, rdi: start.rdi, rsi: 0, cr3: start.cr3, second_level_root: mem.root(), id: g.id })
}
