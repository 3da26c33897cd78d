//! The SVM world switch: load the guest's general registers and FPU state, VMRUN, and save
//! them again on #VMEXIT. RAX, RSP and RIP travel in the VMCB. Interrupts: CLGI, then STI,
//! so that a physical interrupt during the guest run causes an INTR intercept; after the
//! exit (GIF = 0) STGI lets the host take that interrupt (its handler acknowledges it on an
//! IST stack), then CLI.

use crate::vm::fpu::FpuState;
use crate::vm::Regs;
use crate::vm::switch::{load_guest_gprs, save_guest_gprs};
use core::arch::global_asm;

global_asm!(
    ".global svm_world_switch",
    "svm_world_switch:",
    // rdi = &mut Regs, rsi = VMCB physical address, rdx = guest FPU, rcx = host FPU
    "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
    "push rdi",
    "push rcx",
    "fxsave64 [rcx]",
    "fxrstor64 [rdx]",
    "push rdx",
    "mov rax, rsi",
    load_guest_gprs!(),
    "clgi",
    "sti",
    "vmrun rax",
    // #VMEXIT: GIF = 0, rax = VMCB address again; the guest's registers are live.
    "push rdi",
    save_guest_gprs!(),
    "pop rax",
    "mov [rdi + 40], rax",
    "pop rdx",
    "pop rcx",
    "fxsave64 [rdx]",
    "fxrstor64 [rcx]",
    "stgi",
    "cli",
    "pop rdi",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
    "ret",
);

extern "C" {
    fn svm_world_switch(regs: *mut Regs, vmcb: u64, guest_fpu: *mut FpuState, host_fpu: *mut FpuState);
}

/// Runs the guest until the next #VMEXIT.
///
/// # Safety
/// `vmcb` must be a valid, fully initialised VMCB whose guest state and nested page table
/// only grant the guest its own memory; SVM must be enabled with a host save area.
pub unsafe fn run(regs: &mut Regs, vmcb: u64, guest_fpu: &mut FpuState) {
    // SAFETY: forwarded from the caller; HOST_FPU is only used here, on the one CPU that
    // runs guests.
    unsafe { svm_world_switch(regs, vmcb, guest_fpu, &raw mut crate::vm::fpu::HOST_FPU) }
}
