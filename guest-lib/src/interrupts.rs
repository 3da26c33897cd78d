//! The guest's own IDT: per vCPU a GDT with a 64-bit TSS (interrupt stacks), 256 entry stubs
//! that save the scratch registers and the SSE state, and a handler table. Every vCPU loads
//! the tables as it starts (`entry!`), so a vector reaches any of them. `set_handler` installs
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
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

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
static EXCEPTIONS: AtomicU32 = AtomicU32::new(0);

/// Each interrupt stack (the exception one and the interrupt one).
const STACK: usize = 8 * 1024;

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

/// The guest's vCPUs at most (the hypervisor's `vcpus=` limit).
const MAX_VCPUS: usize = 16;

/// The IDT, shared by every vCPU, and one GDT and TSS per vCPU (a TSS descriptor is marked
/// busy by LTR, so vCPUs cannot share one; each TSS points at that vCPU's own stacks).
#[repr(C, align(16))]
struct Tables {
    idt: [[u64; 2]; 256],
    gdt: [[u64; 5]; MAX_VCPUS],
    tss: [Tss; MAX_VCPUS],
}

/// The IDT is written once by the first vCPU that starts (`IDT_STATE`), before any vCPU
/// loads it; a vCPU's GDT and TSS are written only by that vCPU, before it loads them.
struct Shared(UnsafeCell<Tables>);
// SAFETY: see above: every part has one writer, and no reader runs before its write ended.
unsafe impl Sync for Shared {}

static TABLES: Shared = Shared(UnsafeCell::new(Tables {
    idt: [[0; 2]; 256],
    gdt: [[0; 5]; MAX_VCPUS],
    tss: [const { Tss { _reserved0: 0, rsp: [0; 3], _reserved1: 0, ist: [0; 7], _reserved2: 0, _reserved3: 0, iomap_base: 104 } }; MAX_VCPUS],
}));

/// 0: the IDT is not built, 1: a vCPU builds it, 2: built.
static IDT_STATE: AtomicU32 = AtomicU32::new(0);

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

/// The bytes `entry!`'s `_start` keeps at the top of each vCPU's stack for its interrupt
/// stacks (IST1 for interrupts, IST2 for exceptions), below which the vCPU's code runs.
pub const IST_RESERVE: u64 = 2 * STACK as u64;

/// Builds the IDT once (the first vCPU to come here), then loads this vCPU's own GDT (with a
/// TSS whose interrupt stacks are the `IST_RESERVE` bytes below `ist_top`) and the IDT. Every
/// vCPU does this as it starts (`entry!`), so a vector raised in any of them finds a handler
/// or the "without a handler" report, never a missing IDT.
#[doc(hidden)]
pub fn load_on_this_vcpu(vcpu: u64, ist_top: u64) {
    let t = TABLES.0.get();
    match IDT_STATE.compare_exchange(0, 1, Ordering::Acquire, Ordering::Acquire) {
        Ok(_) => {
            // SAFETY: IDT_STATE makes this the only writer, and no vCPU loads the IDT before
            // it reads 2 below.
            unsafe {
                let stubs = &raw const isr_stubs as u64;
                for (i, gate) in (*t).idt.iter_mut().enumerate() {
                    let at = stubs + 16 * i as u64;
                    let ist = if i < 32 { 2 } else { 1 };
                    // Interrupt gate, present, DPL 0 (SDM Vol. 3A 6.14.1, figure 6-8).
                    gate[0] = (at & 0xffff) | CODE_SEL << 16 | ist << 32 | 0x8e << 40 | (at >> 16 & 0xffff) << 48;
                    gate[1] = at >> 32;
                }
            }
            IDT_STATE.store(2, Ordering::Release);
        }
        Err(_) => {
            while IDT_STATE.load(Ordering::Acquire) != 2 {
                core::hint::spin_loop();
            }
        }
    }
    let v = vcpu as usize;
    if v >= MAX_VCPUS {
        return;
    }
    // SAFETY: vCPU v is the only writer of its GDT and TSS (the hypervisor runs each vCPU
    // index once); the CPU reads them only after the loads below.
    unsafe {
        let tss = &raw mut (*t).tss[v];
        (*tss).ist[0] = ist_top;
        (*tss).ist[1] = ist_top - STACK as u64;
        let tss = tss as u64;
        // Null, 64-bit code, data, 64-bit available TSS (16 bytes) (SDM Vol. 3A 3.4.5, 8.2.3).
        (*t).gdt[v] = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            (core::mem::size_of::<Tss>() as u64 - 1) | (tss & 0xff_ffff) << 16 | 0x89 << 40 | (tss >> 24 & 0xff) << 56,
            tss >> 32,
        ];
        let gdtr = pseudo((5 * 8 - 1, &raw const (*t).gdt[v] as u64));
        let idtr = pseudo((256 * 16 - 1, &raw const (*t).idt as u64));
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

/// Installs `handler` for `vector`, for every vCPU of the guest (they share the IDT). For an exception vector
/// (below 32) the hypervisor is told that this guest handles it (`Invalid` for one it may
/// not, see `abi::GUEST_EXCEPTIONS`).
pub fn set_handler(vector: u8, handler: Handler) -> Result<(), Error> {
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
