//! The VMX world switch: write host RSP/RIP into the current VMCS, load the guest's general
//! registers (all of them: unlike the VMCB, the VMCS holds no RAX) and FPU state, VMLAUNCH
//! or VMRESUME, and save them again at the VM exit, which lands on the label after the
//! instruction with the stack as it was. RSP, RIP and RFLAGS travel in the VMCS. A failed
//! VMLAUNCH/VMRESUME falls through with CF or ZF set (SDM Vol. 3C 31.2) and is reported.

use crate::vm::fpu::FpuState;
use crate::vm::Regs;
use crate::vm::switch::{load_guest_gprs, save_guest_gprs};
use core::arch::global_asm;

/// `vmx_world_switch` results.
pub const EXITED: u64 = 0;
/// VMLAUNCH/VMRESUME failed with CF = 1: no valid current VMCS.
pub const FAIL_INVALID: u64 = 1;
/// VMLAUNCH/VMRESUME failed with ZF = 1: the VM-instruction error field says why.
pub const FAIL_VALID: u64 = 2;

global_asm!(
    ".global vmx_world_switch",
    "vmx_world_switch:",
    // rdi = &mut Regs, rsi = launched (0 or 1), rdx = guest FPU, rcx = host FPU
    "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
    "push rdi",
    "push rcx",
    "fxsave64 [rcx]",
    "fxrstor64 [rdx]",
    "push rdx",
    // Stack: [rsp] guest FPU, [rsp + 8] host FPU, [rsp + 16] &mut Regs. The exit returns
    // with exactly this RSP (SDM Vol. 3C 28.5.1: RSP and RIP from the host-state area).
    "mov rax, {host_rsp}",
    "vmwrite rax, rsp",
    "mov rax, {host_rip}",
    "lea rbx, [rip + 2f]",
    "vmwrite rax, rbx",
    "test rsi, rsi", // MOVs below keep the flags for the jump
    "mov rax, [rdi]",
    load_guest_gprs!(),
    "jnz 5f",
    "vmlaunch",
    "jmp 3f",
    "5:",
    "vmresume",
    // Entry failed: CF or ZF tells which; the saved registers still hold the guest's.
    "3:",
    "mov eax, {fail_valid}",
    "mov ecx, {fail_invalid}",
    "cmovc eax, ecx",
    "jmp 4f",
    // VM exit: the guest's registers are live, RFLAGS = 0x2 (interrupts off).
    "2:",
    "push rdi",
    save_guest_gprs!(),
    "mov [rdi], rax",
    "pop rax",
    "mov [rdi + 40], rax",
    "xor eax, eax",
    "4:",
    "pop rdx",
    "pop rcx",
    "fxsave64 [rdx]",
    "fxrstor64 [rcx]",
    "pop rdi",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
    "ret",
    host_rsp = const super::vmcs::HOST_RSP.0, host_rip = const super::vmcs::HOST_RIP.0,
    fail_valid = const FAIL_VALID, fail_invalid = const FAIL_INVALID,
);

extern "C" {
    fn vmx_world_switch(regs: *mut Regs, launched: u64, guest_fpu: *mut FpuState, host_fpu: *mut FpuState) -> u64;
}

/// Runs the guest of the current VMCS until the next VM exit; returns `EXITED`, or
/// `FAIL_INVALID` / `FAIL_VALID` if the entry instruction itself failed.
///
/// # Safety
/// The current VMCS must be fully initialised (host state included) with an EPT that only
/// grants the guest its own memory; `launched` must be the VMCS's launch state.
pub unsafe fn run(regs: &mut Regs, launched: bool, guest_fpu: &mut FpuState, host_fpu: &mut FpuState) -> u64 {
    // SAFETY: forwarded from the caller; both FPU areas are exclusive borrows.
    unsafe { vmx_world_switch(regs, launched as u64, guest_fpu, host_fpu) }
}
