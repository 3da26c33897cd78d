//! The SVM world switch: load the guest's general registers and FPU state, VMRUN, and save
//! them again on #VMEXIT. RAX, RSP and RIP travel in the VMCB. Interrupts: CLGI, then STI,
//! so that a physical interrupt during the guest run causes an INTR intercept; after the
//! exit (GIF = 0) STGI lets the host take that interrupt (its handler acknowledges it on an
//! IST stack), then CLI.

use crate::vm::fpu::FpuState;
use crate::vm::Regs;
use core::arch::global_asm;
use core::mem::offset_of;

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
    "mov rbx, [rdi + {rbx}]", "mov rcx, [rdi + {rcx}]", "mov rdx, [rdi + {rdx}]",
    "mov rsi, [rdi + {rsi}]", "mov rbp, [rdi + {rbp}]",
    "mov r8, [rdi + {r8}]", "mov r9, [rdi + {r9}]", "mov r10, [rdi + {r10}]", "mov r11, [rdi + {r11}]",
    "mov r12, [rdi + {r12}]", "mov r13, [rdi + {r13}]", "mov r14, [rdi + {r14}]", "mov r15, [rdi + {r15}]",
    "mov rdi, [rdi + {rdi}]",
    "clgi",
    "sti",
    "vmrun rax",
    // #VMEXIT: GIF = 0, rax = VMCB address again; the guest's registers are live.
    "push rdi",
    "mov rdi, [rsp + 24]",
    "mov [rdi + {rbx}], rbx", "mov [rdi + {rcx}], rcx", "mov [rdi + {rdx}], rdx",
    "mov [rdi + {rsi}], rsi", "mov [rdi + {rbp}], rbp",
    "mov [rdi + {r8}], r8", "mov [rdi + {r9}], r9", "mov [rdi + {r10}], r10", "mov [rdi + {r11}], r11",
    "mov [rdi + {r12}], r12", "mov [rdi + {r13}], r13", "mov [rdi + {r14}], r14", "mov [rdi + {r15}], r15",
    "pop rax",
    "mov [rdi + {rdi}], rax",
    "pop rdx",
    "pop rcx",
    "fxsave64 [rdx]",
    "fxrstor64 [rcx]",
    "stgi",
    "cli",
    "pop rdi",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
    "ret",
    rbx = const offset_of!(Regs, rbx), rcx = const offset_of!(Regs, rcx), rdx = const offset_of!(Regs, rdx),
    rsi = const offset_of!(Regs, rsi), rdi = const offset_of!(Regs, rdi), rbp = const offset_of!(Regs, rbp),
    r8 = const offset_of!(Regs, r8), r9 = const offset_of!(Regs, r9), r10 = const offset_of!(Regs, r10),
    r11 = const offset_of!(Regs, r11), r12 = const offset_of!(Regs, r12), r13 = const offset_of!(Regs, r13),
    r14 = const offset_of!(Regs, r14), r15 = const offset_of!(Regs, r15),
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
