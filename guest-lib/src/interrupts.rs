//! The guest's own IDT: a GDT with a 64-bit TSS (interrupt stacks), 256 entry stubs that
//! save the scratch registers and the SSE state, and a handler table. `set_handler` installs
//! a handler for a vector; for an exception vector it also tells the hypervisor that this
//! guest takes that exception itself (`HC_GUEST_EXCEPTIONS`; the others stay fatal).
//!
//! Interrupts run on their own stack (IST1; exceptions on IST2), because code compiled for
//! the usual ABI keeps data in the 128-byte red zone below RSP, which a frame pushed on the
//! interrupted stack would overwrite. A handler must not take locks the interrupted code may
//! hold (the console's): record what happened and return. Handlers do not nest (interrupt
//! gates clear IF; an exception inside an exception handler reuses IST2 and is not supported).

use crate::abi::{self, Error};
use crate::hypercall::call;
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// What a handler sees of the interrupted code, and may change (`rip` to resume elsewhere):
/// the scratch registers by name, then the CPU's frame.
#[allow(missing_docs)]
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    /// The vector (pushed by the stub).
    pub vector: u64,
    /// The exception's error code (0 where the CPU pushes none).
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// A handler for one vector.
pub type Handler = fn(&mut Frame);

static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];
static INSTALLED: AtomicBool = AtomicBool::new(false);
static EXCEPTIONS: AtomicU32 = AtomicU32::new(0);

const STACK: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack([u8; STACK]);

/// 64-bit TSS (SDM Vol. 3A 8.7, figure 8-11): only the IST pointers are used.
#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 5],
    tss: Tss,
    idt: [[u64; 2]; 256],
    stacks: [Stack; 2],
}

/// Written once by `install` before the tables are loaded, then read by the CPU only.
struct Shared(UnsafeCell<Tables>);
// SAFETY: written only by `install`, once (guarded by INSTALLED), before any interrupt.
unsafe impl Sync for Shared {}

static TABLES: Shared = Shared(UnsafeCell::new(Tables {
    gdt: [0; 5],
    tss: Tss { _reserved0: 0, rsp: [0; 3], _reserved1: 0, ist: [0; 7], _reserved2: 0, _reserved3: 0, iomap_base: 104 },
    idt: [[0; 2]; 256],
    stacks: [const { Stack([0; STACK]) }; 2],
}));

/// Selectors: the hypervisor starts the guest with CS 0x08, SS/DS 0x10, TR 0x18.
const CODE_SEL: u64 = 0x08;
const TSS_SEL: u16 = 0x18;

// Stub i sits at isr_stubs + 16 * i: pushes 0 where the CPU pushes no error code, the vector,
// and jumps to the common part, which saves the scratch registers and the SSE state
// (FXSAVE, 512 bytes, 16-aligned: the CPU aligns RSP to 16 on delivery, 5 + 2 + 9 words
// keep it so) and calls `dispatch` with the frame.
global_asm!(
    ".section .text.isr, \"ax\"",
    ".balign 16",
    ".global isr_stubs",
    "isr_stubs:",
    ".set i, 0",
    ".rept 256",
    ".balign 16",
    ".if (i - 8) && (i - 10) && (i - 11) && (i - 12) && (i - 13) && (i - 14) && (i - 17) && (i - 21) && (i - 29) && (i - 30)",
    ".byte 0x6a, 0x00", // push 0
    ".endif",
    ".byte 0x68", // push imm32
    ".long i",
    "jmp isr_common",
    ".set i, i + 1",
    ".endr",
    "isr_common:",
    "push rax", "push rcx", "push rdx", "push rsi", "push rdi", "push r8", "push r9", "push r10", "push r11",
    "mov rdi, rsp",
    "sub rsp, 512",
    "fxsave64 [rsp]",
    "call {dispatch}",
    "fxrstor64 [rsp]",
    "add rsp, 512",
    "pop r11", "pop r10", "pop r9", "pop r8", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rax",
    "add rsp, 16",
    "iretq",
    dispatch = sym dispatch,
);

extern "C" {
    static isr_stubs: u8;
}

extern "C" fn dispatch(frame: &mut Frame) {
    let h = HANDLERS[frame.vector as usize & 255].load(Ordering::Acquire);
    if h == 0 {
        crate::println!("guest: interrupt {} without a handler at RIP {:#x}", frame.vector, frame.rip);
        crate::exit(102);
    }
    // SAFETY: only `set_handler` stores non-zero values, and those are `Handler`s.
    let h: Handler = unsafe { core::mem::transmute::<usize, Handler>(h) };
    h(frame)
}

/// Builds and loads the GDT (with a TSS for the interrupt stacks) and the IDT, once.
fn install() {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    let t = TABLES.0.get();
    // SAFETY: the first and only writer (INSTALLED); no interrupt can arrive before LIDT.
    unsafe {
        let stubs = &raw const isr_stubs as u64;
        let tss = &raw const (*t).tss as u64;
        let stacks = &raw const (*t).stacks as u64;
        (*t).tss.ist[0] = stacks + STACK as u64;
        (*t).tss.ist[1] = stacks + 2 * STACK as u64;
        // Null, 64-bit code, data, 64-bit available TSS (16 bytes) (SDM Vol. 3A 3.4.5, 8.2.3).
        (*t).gdt = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            (core::mem::size_of::<Tss>() as u64 - 1) | (tss & 0xff_ffff) << 16 | 0x89 << 40 | (tss >> 24 & 0xff) << 56,
            tss >> 32,
        ];
        for (i, gate) in (*t).idt.iter_mut().enumerate() {
            let at = stubs + 16 * i as u64;
            let ist = if i < 32 { 2 } else { 1 };
            // Interrupt gate, present, DPL 0 (SDM Vol. 3A 6.14.1, figure 6-8).
            gate[0] = (at & 0xffff) | CODE_SEL << 16 | ist << 32 | 0x8e << 40 | (at >> 16 & 0xffff) << 48;
            gate[1] = at >> 32;
        }
        let gdtr: (u16, u64) = (5 * 8 - 1, &raw const (*t).gdt as u64);
        let idtr: (u16, u64) = (256 * 16 - 1, &raw const (*t).idt as u64);
        let gdtr = pseudo(gdtr);
        let idtr = pseudo(idtr);
        asm!("lgdt [{}]", in(reg) gdtr.as_ptr(), options(nostack));
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack));
        asm!("lidt [{}]", in(reg) idtr.as_ptr(), options(nostack));
    }
}

/// A 10-byte pseudo-descriptor (limit, base) for LGDT / LIDT.
fn pseudo((limit, base): (u16, u64)) -> [u8; 10] {
    let mut d = [0u8; 10];
    d[..2].copy_from_slice(&limit.to_le_bytes());
    d[2..].copy_from_slice(&base.to_le_bytes());
    d
}

/// Installs `handler` for `vector` (the tables on first use). For an exception vector
/// (below 32) the hypervisor is told that this guest handles it (`Invalid` for one it may
/// not, see `abi::GUEST_EXCEPTIONS`).
pub fn set_handler(vector: u8, handler: Handler) -> Result<(), Error> {
    install();
    HANDLERS[vector as usize].store(handler as usize, Ordering::Release);
    if vector < 32 {
        let mask = EXCEPTIONS.load(Ordering::Relaxed) | 1 << vector;
        call(abi::HC_GUEST_EXCEPTIONS, [mask as u64, 0, 0, 0, 0, 0])?;
        EXCEPTIONS.store(mask, Ordering::Relaxed);
    }
    Ok(())
}

/// The faulting address of the last #PF (CR2), for a #PF handler.
pub fn cr2() -> u64 {
    let v;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack)) };
    v
}

/// Masks interrupts (CLI); they stay pending in the hypervisor until `enable`.
pub fn disable() {
    // SAFETY: only changes RFLAGS.IF.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Unmasks interrupts (STI).
pub fn enable() {
    // SAFETY: only changes RFLAGS.IF; handlers are installed before interrupts are asked for.
    unsafe { asm!("sti", options(nomem, nostack)) };
}
