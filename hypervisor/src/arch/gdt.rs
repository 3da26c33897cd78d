//! GDT with a 64-bit code and data segment and the TSS, whose interrupt stack table gives
//! every exception and interrupt a known-good stack (Intel SDM Vol. 3A 6.14.5). The
//! precompiled `core` uses the red zone, so nothing may be pushed onto an interrupted stack.

use core::arch::asm;
use core::mem::size_of;
use static_assertions::const_assert_eq;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const TSS_SEL: u16 = 0x18;

/// IST slots (1-based as in the IDT gate).
pub const IST_EXCEPTION: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_DOUBLE_FAULT: u8 = 3;
pub const IST_MACHINE_CHECK: u8 = 4;
pub const IST_INTERRUPT: u8 = 5;
const IST_COUNT: usize = 5;
const IST_STACK_SIZE: usize = 32 * 1024;

/// 64-bit TSS (Intel SDM Vol. 3A 8.7, figure 8-11).
#[repr(C, packed(4))]
pub struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}
const_assert_eq!(size_of::<Tss>(), 104);

#[repr(C, align(16))]
struct Stacks([[u8; IST_STACK_SIZE]; IST_COUNT]);

static mut IST_STACKS: Stacks = Stacks([[0; IST_STACK_SIZE]; IST_COUNT]);
static mut TSS: Tss = Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: size_of::<Tss>() as u16,
};
static mut GDT: [u64; 5] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff, 0, 0];

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Address of the TSS (the VMX host state needs it).
pub fn tss_base() -> u64 {
    (&raw const TSS) as u64
}

/// Address of the GDT (the VMX host state needs it).
pub fn gdt_base() -> u64 {
    (&raw const GDT) as u64
}

/// Loads the GDT, reloads the segment registers and the task register. Call once, on the
/// boot CPU, before interrupts or exceptions can happen.
pub fn init() {
    // SAFETY: runs once on one CPU before anything else reads these statics.
    unsafe {
        let stacks = &raw mut IST_STACKS;
        for i in 0..IST_COUNT {
            let top = (*stacks).0[i].as_ptr() as u64 + IST_STACK_SIZE as u64;
            TSS.ist[i] = top;
        }
        let base = tss_base();
        let limit = (size_of::<Tss>() - 1) as u64;
        // Available 64-bit TSS descriptor, 16 bytes (Intel SDM Vol. 3A 8.2.3).
        GDT[3] = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        GDT[4] = base >> 32;
        let ptr = Pointer { limit: (size_of::<[u64; 5]>() - 1) as u16, base: gdt_base() };
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            cs = in(reg) KERNEL_CS as u64,
            ds = in(reg) KERNEL_DS as u64,
            tss = in(reg) TSS_SEL as u64,
            tmp = out(reg) _,
        );
    }
}
