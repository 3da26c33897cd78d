//! The SVM world switch: load the guest's general registers and FPU state, VMRUN, and save
//! them again on #VMEXIT. RAX, RSP and RIP travel in the VMCB. VMRUN and #VMEXIT do not
//! switch FS, GS, TR, LDTR (with their hidden bases and limits), KERNEL_GS_BASE,
//! STAR/LSTAR/CSTAR/SFMASK and SYSENTER_* (AMD APM Vol. 2 15.5.2, 15.5.3): VMSAVE stores
//! the host's into its own area and VMLOAD loads the guest's from its VMCB before VMRUN;
//! after the exit VMSAVE keeps the guest's and VMLOAD brings the host's back, all with
//! GIF = 0, so no interrupt or NMI ever runs on a guest's TR (whose IST stacks it names).
//! Interrupts: CLGI, then STI, so that a physical interrupt during the guest run causes an
//! INTR intercept; after the exit STGI lets the host take that interrupt (its handler
//! acknowledges it on an IST stack), then CLI.

use crate::vm::fpu::FpuState;
use crate::vm::Regs;
use crate::vm::switch::{load_guest_gprs, save_guest_gprs};
use core::arch::global_asm;

global_asm!(
    ".global svm_world_switch",
    "svm_world_switch:",
    // rdi = &mut Regs, rsi = VMCB physical address, rdx = guest FPU, rcx = host FPU,
    // r8 = host VMSAVE area physical address
    "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
    "push r8",
    "push rdi",
    "push rcx",
    "fxsave64 [rcx]",
    "fxrstor64 [rdx]",
    "push rdx",
    // The host's RSP from here to the exit, beside the VMSAVE fields (`HOST_RSP_SLOT`):
    // `leaked_host_state` compares a guest's saved RSP with it.
    "mov [r8 + 0xff8], rsp",
    "clgi",
    "mov rax, r8",
    "vmsave rax",
    "mov rax, rsi",
    "vmload rax",
    load_guest_gprs!(),
    "sti",
    "vmrun rax",
    ".global svm_vmrun_return",
    "svm_vmrun_return:",
    // #VMEXIT: GIF = 0, rax = VMCB address again; the guest's registers are live.
    "vmsave rax",
    "push rdi",
    save_guest_gprs!(),
    "pop rax",
    "mov [rdi + 40], rax",
    "pop rdx",
    "pop rcx",
    "fxsave64 [rdx]",
    "fxrstor64 [rcx]",
    "pop rdi",
    "pop rax",
    "vmload rax",
    "stgi",
    "cli",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
    "ret",
);

extern "C" {
    /// The instruction after VMRUN: the host's RIP as #VMEXIT reloads it.
    static svm_vmrun_return: u8;
    fn svm_world_switch(regs: *mut Regs, vmcb: u64, guest_fpu: *mut FpuState, host_fpu: *mut FpuState, host_state: u64);
}

/// Runs the guest until the next #VMEXIT.
///
/// # Safety
/// `vmcb` must be a valid, fully initialised VMCB whose guest state and nested page table
/// only grant the guest its own memory; SVM must be enabled with a host save area;
/// `host_state` must be a 4 KiB-aligned page that nothing else uses.
pub unsafe fn run(regs: &mut Regs, vmcb: u64, host_state: u64, guest_fpu: &mut FpuState, host_fpu: &mut FpuState) {
    // SAFETY: forwarded from the caller; both FPU areas are exclusive borrows.
    unsafe { svm_world_switch(regs, vmcb, guest_fpu, host_fpu, host_state) }
}

/// Offset in the host's VMSAVE page where the world switch leaves its RSP at VMRUN (past
/// every field VMSAVE writes, APM Vol. 2 table B-2).
pub const HOST_RSP_SLOT: u64 = 0xff8;

/// Address of the instruction after VMRUN, where the host resumes after #VMEXIT.
pub fn vmrun_return() -> u64 {
    // Only the label's address is taken, never its contents.
    &raw const svm_vmrun_return as u64
}
