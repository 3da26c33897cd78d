//! Assembly shared by both world switches (`svm/switch.rs`, `vmx/switch.rs`): moving the
//! guest's general registers between `Regs` (pointed to by rdi) and the CPU. The offsets
//! are `Regs`' `#[repr(C)]` layout, checked below.

use super::Regs;
use core::mem::offset_of;
use static_assertions::const_assert_eq;

const_assert_eq!(offset_of!(Regs, rax), 0);
const_assert_eq!(offset_of!(Regs, rbx), 8);
const_assert_eq!(offset_of!(Regs, rcx), 16);
const_assert_eq!(offset_of!(Regs, rdx), 24);
const_assert_eq!(offset_of!(Regs, rsi), 32);
const_assert_eq!(offset_of!(Regs, rdi), 40);
const_assert_eq!(offset_of!(Regs, rbp), 48);
const_assert_eq!(offset_of!(Regs, r8), 56);
const_assert_eq!(offset_of!(Regs, r15), 112);

/// Loads rbx..r15 and finally rdi from the `Regs` at rdi (rax is the caller's business:
/// SVM keeps it in the VMCB, VMX loads it before this).
macro_rules! load_guest_gprs {
    () => {
        concat!(
            "mov rbx, [rdi + 8]\n", "mov rcx, [rdi + 16]\n", "mov rdx, [rdi + 24]\n",
            "mov rsi, [rdi + 32]\n", "mov rbp, [rdi + 48]\n",
            "mov r8, [rdi + 56]\n", "mov r9, [rdi + 64]\n", "mov r10, [rdi + 72]\n", "mov r11, [rdi + 80]\n",
            "mov r12, [rdi + 88]\n", "mov r13, [rdi + 96]\n", "mov r14, [rdi + 104]\n", "mov r15, [rdi + 112]\n",
            "mov rdi, [rdi + 40]\n",
        )
    };
}

/// After an exit, with the guest's rdi pushed and `[rsp + 24]` holding the `Regs` pointer:
/// stores rbx..r15 and the guest's rdi (popped) there; leaves rdi = the `Regs` pointer and
/// rax clobbered.
macro_rules! save_guest_gprs {
    () => {
        concat!(
            "mov rdi, [rsp + 24]\n",
            "mov [rdi + 8], rbx\n", "mov [rdi + 16], rcx\n", "mov [rdi + 24], rdx\n",
            "mov [rdi + 32], rsi\n", "mov [rdi + 48], rbp\n",
            "mov [rdi + 56], r8\n", "mov [rdi + 64], r9\n", "mov [rdi + 72], r10\n", "mov [rdi + 80], r11\n",
            "mov [rdi + 88], r12\n", "mov [rdi + 96], r13\n", "mov [rdi + 104], r14\n", "mov [rdi + 112], r15\n",
        )
    };
}

pub(crate) use {load_guest_gprs, save_guest_gprs};
