//! IDT: one assembly stub per vector pushes a uniform frame and calls `interrupt_dispatch`.
//! Exceptions stop the hypervisor with a full report; the LAPIC timer, the IPI, the device
//! completion vector (counted per CPU) and spurious vectors return. Every gate uses an IST stack (see `gdt`).

use super::gdt::{self, KERNEL_CS};
use core::arch::{asm, global_asm};
use core::mem::size_of;
use core::sync::atomic::Ordering;
use static_assertions::const_assert_eq;

/// Vector of the LAPIC timer (host side; SVM exits on it to preempt guests).
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of device completion interrupts (NVMe MSI-X, one per I/O queue pair, each to the
/// CPU that owns the pair): the handler counts them per CPU and sends EOI; the waiting driver
/// re-reads its completion queue after every wake-up.
pub const DEVICE_VECTOR: u8 = 0x22;

/// How many `DEVICE_VECTOR` interrupts CPU `cpu` has taken so far (`PerCpu::mine`).
pub fn device_interrupts(cpu: usize) -> u64 {
    if cpu < super::ipi::MAX_CPUS {
        super::percpu::of(cpu).mine.device_interrupts.load(Ordering::Acquire)
    } else {
        0
    }
}

/// Vector of the LAPIC spurious interrupt.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// What the stubs push: general registers, vector, error code, then the CPU's frame.
#[repr(C)]
#[derive(Debug)]
pub struct InterruptFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}
const_assert_eq!(size_of::<InterruptFrame>(), 22 * 8);

// Exceptions that push an error code (Intel SDM Vol. 3A 6.15): 8, 10-14, 17, 21, 29, 30.
global_asm!(
    r#"
    .macro STUB n, err
    .balign 16
isr_stub_\n:
    .if \err == 0
    push $0
    .endif
    push $\n
    jmp isr_common
    .endm

    .section .text
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,32,33,34,255
    STUB \n, 0
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    STUB \n, 1
    .endr

isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call interrupt_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    .section .rodata
    .balign 8
    .global isr_stub_table
isr_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,255
    .quad isr_stub_\n
    .endr
"#,
    options(att_syntax)
);

extern "C" {
    static isr_stub_table: [u64; 36];
}

/// 16-byte interrupt gate (Intel SDM Vol. 3A 6.14.1).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    _reserved: u32,
}
const_assert_eq!(size_of::<Gate>(), 16);

impl Gate {
    const EMPTY: Gate =
        Gate { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, _reserved: 0 };

    fn interrupt(handler: u64, ist: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist,
            type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            _reserved: 0,
        }
    }
}

/// An interrupt descriptor table. Every CPU loads its own (the same gates: each IST slot
/// then means that CPU's own stack).
#[repr(C, align(16))]
pub struct Idt([Gate; 256]);

/// The boot CPU's IDT.
static mut BSP_IDT: Idt = Idt([Gate::EMPTY; 256]);

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Moves the legacy 8259 PICs to vectors 0xe0-0xef and masks every line: the BIOS leaves
/// IRQ 0 on vector 8, where a PIT tick would look like a double fault. The LAPIC is used
/// instead.
fn disable_pic() {
    use super::port::outb;
    // ICW1-ICW4 (8259A data sheet): init, vector base, cascade wiring, 8086 mode.
    for (cmd, data, base, cascade) in [(0x20, 0x21, 0xe0, 4), (0xa0, 0xa1, 0xe8, 2)] {
        outb(cmd, 0x11);
        outb(data, base);
        outb(data, cascade);
        outb(data, 0x01);
        outb(data, 0xff); // mask all lines
    }
}

impl Idt {
    /// A filled IDT on the heap, for an application processor.
    pub fn new() -> alloc::boxed::Box<Idt> {
        let mut idt = alloc::boxed::Box::new(Idt([Gate::EMPTY; 256]));
        idt.fill();
        idt
    }

    /// Points every gate at its stub: exceptions 0-31, the timer (32), the IPI vector (33)
    /// and the device vector (34) each have one, every other vector (the masked 8259's, stray
    /// ones) is ignored.
    fn fill(&mut self) {
        // SAFETY: the stub table is defined above with 36 entries: vectors 0-34 and 255;
        // reading an immutable extern static.
        let stubs = unsafe { &isr_stub_table };
        for gate in self.0.iter_mut() {
            *gate = Gate::interrupt(stubs[35], gdt::IST_INTERRUPT);
        }
        for (vector, &stub) in stubs.iter().enumerate().take(35) {
            let ist = match vector {
                2 => gdt::IST_NMI,
                8 => gdt::IST_DOUBLE_FAULT,
                18 => gdt::IST_MACHINE_CHECK,
                32..=34 => gdt::IST_INTERRUPT,
                _ => gdt::IST_EXCEPTION,
            };
            self.0[vector] = Gate::interrupt(stub, ist);
        }
    }

    /// Loads this table on the calling CPU (LIDT); it must live for the rest of the run.
    pub fn load(&'static self) {
        let ptr = Pointer { limit: (size_of::<[Gate; 256]>() - 1) as u16, base: self.0.as_ptr() as u64 };
        // SAFETY: the table is filled with gates to our stubs and lives forever.
        unsafe { asm!("lidt [{}]", in(reg) &ptr, options(nostack)) };
    }
}

/// Fills and loads the boot CPU's IDT and silences the legacy PICs. Call once after `gdt::init`.
pub fn init() {
    disable_pic();
    // SAFETY: runs once on the boot CPU before any interrupt is enabled; nothing else
    // touches BSP_IDT, which is only read (by the CPU) from now on.
    // `&*(&raw ...)` instead of `&STATIC`: a plain reference to a `static mut` is what the
    // static_mut_refs lint forbids; these are taken once, before interrupts are on.
    #[allow(clippy::deref_addrof)]
    unsafe {
        (*(&raw mut BSP_IDT)).fill();
        (&*(&raw const BSP_IDT)).load();
    }
}

const NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP",
    "#PF", "RES", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "RES", "RES", "RES", "RES", "RES", "RES",
    "#HV", "#VC", "#SX", "RES",
];

#[no_mangle]
extern "C" fn interrupt_dispatch(frame: &mut InterruptFrame) {
    match frame.vector {
        v if v < 32 => exception(frame),
        v if v == TIMER_VECTOR as u64 => crate::arch::apic::timer_interrupt(),
        v if v == super::ipi::IPI_VECTOR as u64 => super::ipi::interrupt(),
        v if v == DEVICE_VECTOR as u64 => {
            super::percpu::this().mine.device_interrupts.fetch_add(1, Ordering::AcqRel);
            crate::arch::apic::eoi();
        }
        _ => {} // spurious: no EOI (Intel SDM Vol. 3A 11.9)
    }
}

fn exception(f: &InterruptFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    let p = crate::platform::serial::print_unlocked;
    p(format_args!(
        "\nEXCEPTION {} (vector {}) error code {:#x} at RIP {:#018x} CR2 {:#018x}\n",
        NAMES[f.vector as usize], f.vector, f.error_code, f.rip, cr2
    ));
    p(format_args!("  CS {:#x} RFLAGS {:#x} RSP {:#018x} SS {:#x}\n", f.cs, f.rflags, f.rsp, f.ss));
    p(format_args!("  RAX {:#018x} RBX {:#018x} RCX {:#018x} RDX {:#018x}\n", f.rax, f.rbx, f.rcx, f.rdx));
    p(format_args!("  RSI {:#018x} RDI {:#018x} RBP {:#018x} R8  {:#018x}\n", f.rsi, f.rdi, f.rbp, f.r8));
    p(format_args!("  R9  {:#018x} R10 {:#018x} R11 {:#018x} R12 {:#018x}\n", f.r9, f.r10, f.r11, f.r12));
    p(format_args!("  R13 {:#018x} R14 {:#018x} R15 {:#018x}\n", f.r13, f.r14, f.r15));
    p(format_args!("hypervisor stopped by an exception\n"));
    crate::platform::exit::exit(crate::platform::exit::Status::Failure)
}
