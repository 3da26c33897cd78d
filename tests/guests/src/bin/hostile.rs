//! A hostile tenant: each `arg` is one attack on CPU state the hypervisor must switch,
//! forbid or bound (isolation issue). The scenario says how each must end; a line with
//! WRONG means the attack went through.
//!
//! 1 `ltr` of a TSS at an address of the guest's choosing, then run on (host interrupts
//!   must not use it); 2 / 3 set and then check KERNEL_GS_BASE across guests (SWAPGS);
//! 4 write DR0; 5 set CR4.OSXSAVE (for XSETBV); 6 write CR8 (the TPR); 7 hypercalls from
//! ring 3; 8 `cli; hlt`; 9 loop on a hypercall; 10 loop on CPUID; 11 a hypercall with an
//! operand-size prefix (`66 0f 01 d9`); 12 `hlt` with interrupts on, in a loop.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicI64, Ordering};
use guest_lib::abi::{self, Error};
use guest_lib::hypercall::call;
use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

const MIB: u64 = 1 << 20;
/// Where attack 2 points KERNEL_GS_BASE and attack 3 looks (inside 16 MiB of guest RAM).
const KGS_BASE: u64 = 4 * MIB;
const KGS_PROBE: u64 = 6 * MIB;
const CLEAN: u64 = 0xc1ea_0c1e_a0c1_ea00;

/// GDT: null, kernel code 0x08, kernel data 0x10, TSS 0x18 (16 bytes), user data 0x28 (DPL 3),
/// user code 0x30 (DPL 3), data with base KGS_BASE 0x38.
#[repr(C, align(16))]
struct Gdt([u64; 8]);
static mut GDT: Gdt = Gdt([0; 8]);

/// A 64-bit TSS: RSP0 at offset 4 (Intel SDM Vol. 3A 8.7).
#[repr(C, align(16))]
struct Tss([u8; 0x68]);
static mut TSS: Tss = Tss([0; 0x68]);

/// An IDT of 256 16-byte gates; only vector 0x80 (DPL 3) is filled.
#[repr(C, align(16))]
struct Idt([u64; 512]);
static mut IDT: Idt = Idt([0; 512]);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut RING0_STACK: Stack = Stack([0; 16384]);
static mut RING3_STACK: Stack = Stack([0; 16384]);

/// What the ring-3 code got back from its two hypercalls.
static RING3_CONSOLE: AtomicI64 = AtomicI64::new(1);
static RING3_EXIT: AtomicI64 = AtomicI64::new(1);

fn main(info: &BootInfo) -> i32 {
    match info.arg {
        1 => ltr_elsewhere(),
        2 => set_kernel_gs_base(),
        3 => check_kernel_gs_base(),
        4 => {
            // SAFETY: if the hypervisor lets it through, DR0 only arms a breakpoint (DR7 = 0).
            unsafe { asm!("mov dr0, {}", in(reg) 0x1234u64, options(nomem, nostack)) };
            println!("WRONG: DR0 written");
            0
        }
        5 => {
            // SAFETY: OSXSAVE only enables XSAVE/XSETBV for this guest.
            unsafe { asm!("mov rax, cr4", "bts rax, 18", "mov cr4, rax", out("rax") _, options(nomem, nostack)) };
            println!("WRONG: CR4.OSXSAVE set");
            0
        }
        6 => {
            // SAFETY: CR8 is the task priority; the guest takes no interrupts.
            unsafe { asm!("mov cr8, {}", in(reg) 15u64, options(nomem, nostack)) };
            println!("cr8 written (a virtual TPR is harmless)");
            // SAFETY: restores the priority the guest started with.
            unsafe { asm!("mov cr8, {}", in(reg) 0u64, options(nomem, nostack)) };
            0
        }
        7 => ring3_hypercalls(),
        8 => {
            println!("cli; hlt forever");
            loop {
                // SAFETY: halting with interrupts off is the attack.
                unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
            }
        }
        9 => {
            println!("looping on the info hypercall");
            loop {
                let _ = guest_lib::info(abi::INFO_GUEST_ID);
            }
        }
        10 => {
            println!("looping on CPUID");
            loop {
                core::hint::black_box(core::arch::x86_64::__cpuid(0));
            }
        }
        11 => prefixed_hypercall(),
        12 => {
            println!("hlt with interrupts on, forever");
            loop {
                // SAFETY: the guest has interrupts on; HLT just gives up the CPU.
                unsafe { asm!("hlt", options(nomem, nostack)) };
            }
        }
        other => {
            println!("unknown attack {other}");
            1
        }
    }
}

/// A TSS descriptor (16 bytes) for `base` with `limit` (SDM Vol. 3A 8.2.3).
fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let low = (limit as u64 & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40 // present, 64-bit TSS (available)
        | ((limit as u64 >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// Loads GDT with `tss` as descriptor 0x18 and the data segment at 0x38 based at KGS_BASE.
fn load_gdt(tss: [u64; 2]) {
    let data_with_base = 0x00cf_9300_0000_ffff | (KGS_BASE & 0xff_ffff) << 16 | ((KGS_BASE >> 24) & 0xff) << 56;
    // SAFETY: the guest is single-threaded and nothing else uses GDT.
    unsafe {
        let g = &mut *(&raw mut GDT);
        g.0 = [
            0,
            0x00af_9b00_0000_ffff, // kernel code: 64-bit, DPL 0
            0x00cf_9300_0000_ffff, // kernel data
            tss[0],
            tss[1],
            0x00cf_f300_0000_ffff, // user data, DPL 3
            0x00af_fb00_0000_ffff, // user code: 64-bit, DPL 3
            data_with_base,
        ];
        let pointer: [u16; 5] = {
            let base = (&raw const GDT) as u64;
            [63, base as u16, (base >> 16) as u16, (base >> 32) as u16, (base >> 48) as u16]
        };
        asm!("lgdt [{}]", in(reg) pointer.as_ptr(), options(nostack));
    }
}

fn ltr_elsewhere() -> i32 {
    load_gdt(tss_descriptor(0x7f00_0000_0000, 0x67));
    // SAFETY: the guest's own TR; the hypervisor must not inherit it.
    unsafe { asm!("ltr {0:x}", in(reg) 0x18u16, options(nostack)) };
    println!("TR loaded with a TSS at 0x7f0000000000; running on through host interrupts");
    busy_rounds(30);
    println!("survived 30 rounds with a foreign TR");
    0
}

/// Spins in rounds of busy work and yields; host timer interrupts hit during the busy work.
fn busy_rounds(rounds: u32) {
    for _ in 0..rounds {
        let mut n = 0u64;
        for _ in 0..200_000 {
            n = core::hint::black_box(n + 1);
        }
        guest_lib::yield_now();
    }
}

fn set_kernel_gs_base() -> i32 {
    load_gdt(tss_descriptor(0, 0x67));
    // SAFETY: GS = 0x38 gives GS.base = KGS_BASE; SWAPGS moves it into KERNEL_GS_BASE.
    unsafe { asm!("mov gs, {0:x}", "swapgs", in(reg) 0x38u16, options(nostack)) };
    println!("KERNEL_GS_BASE set to {KGS_BASE:#x}");
    // Tells attack 3 (another guest) that the value is in place.
    match guest_lib::morsel::create("kgs-set", 4096, guest_lib::morsel::PageSize::Size4K, false) {
        Ok(_) => 0,
        Err(e) => {
            println!("cannot signal: {e:?}");
            1
        }
    }
}

fn check_kernel_gs_base() -> i32 {
    // Wait until attack 2 has set its KERNEL_GS_BASE and left the CPU.
    while guest_lib::morsel::open("kgs-set").is_err() {
        guest_lib::yield_now();
    }
    // With KERNEL_GS_BASE = 0 (a fresh guest), after SWAPGS gs:[KGS_PROBE] reads KGS_PROBE.
    // SAFETY: KGS_PROBE is guest RAM; SWAPGS only swaps this guest's GS bases.
    let got: u64 = unsafe {
        core::ptr::write_volatile(KGS_PROBE as *mut u64, CLEAN);
        core::ptr::write_volatile((KGS_BASE + KGS_PROBE) as *mut u64, !CLEAN);
        let v;
        asm!("swapgs", "mov {v}, qword ptr gs:[{p}]", "swapgs", v = out(reg) v, p = in(reg) KGS_PROBE, options(nostack));
        v
    };
    if got == CLEAN {
        println!("KERNEL_GS_BASE starts clean");
    } else {
        println!("WRONG: KERNEL_GS_BASE leaked from another guest (read {got:#x})");
    }
    0
}

fn prefixed_hypercall() -> i32 {
    let amd = core::arch::x86_64::__cpuid(0).ebx == u32::from_le_bytes(*b"Auth");
    let (status, value): (i64, u64);
    let mut marker: u64 = 0;
    // SAFETY: an INFO hypercall with an operand-size prefix; the instruction after it must
    // be the next one executed (it sets the marker).
    unsafe {
        if amd {
            asm!(".byte 0x66, 0x0f, 0x01, 0xd9", "mov {m}, 1", m = inout(reg) marker,
                inout("rax") abi::HC_INFO as i64 => status, inout("rdi") abi::INFO_ABI_VERSION => _,
                out("rdx") value, options(nostack));
        } else {
            asm!(".byte 0x66, 0x0f, 0x01, 0xc1", "mov {m}, 1", m = inout(reg) marker,
                inout("rax") abi::HC_INFO as i64 => status, inout("rdi") abi::INFO_ABI_VERSION => _,
                out("rdx") value, options(nostack));
        }
    }
    if status == 0 && value == abi::ABI_VERSION && marker == 1 {
        println!("prefixed hypercall: ABI version {value}, resumed after the whole instruction");
    } else {
        println!("WRONG: prefixed hypercall got status {status}, value {value}, marker {marker}");
    }
    0
}

// Ring 3: iretq into `ring3_entry` on RING3_STACK; it makes two hypercalls, stores what
// they returned and comes back to ring 0 through `int 0x80`, whose handler (on RSP0) jumps
// to `ring3_done` in ring 0.
global_asm!(
    ".global hostile_ring3_entry",
    "hostile_ring3_entry:",
    // console_write(msg, 5): must be refused
    "lea rdi, [rip + hostile_ring3_msg]",
    "mov rsi, 5",
    "mov rax, 1",
    "call hostile_hypercall",
    "mov [rip + {console}], rax",
    // exit(7): must be refused
    "mov rdi, 7",
    "mov rax, 2",
    "call hostile_hypercall",
    "mov [rip + {exit}], rax",
    "int 0x80",
    "ud2",
    "hostile_hypercall:",
    "cmp byte ptr [rip + {amd}], 0",
    "je 2f",
    "vmmcall",
    "ret",
    "2:",
    "vmcall",
    "ret",
    "hostile_ring3_msg:",
    ".ascii \"ring3\"",
    ".global hostile_int80",
    "hostile_int80:",
    "jmp {done}",
    console = sym RING3_CONSOLE,
    exit = sym RING3_EXIT,
    amd = sym IS_AMD,
    done = sym ring3_done,
);

static mut IS_AMD: u8 = 0;

extern "C" {
    fn hostile_ring3_entry();
    fn hostile_int80();
}

fn ring3_hypercalls() -> i32 {
    // SAFETY: setup of this guest's own descriptor tables, single-threaded.
    unsafe {
        IS_AMD = (core::arch::x86_64::__cpuid(0).ebx == u32::from_le_bytes(*b"Auth")) as u8;
        let rsp0 = (&raw mut RING0_STACK) as u64 + 16384;
        let tss = &mut *(&raw mut TSS);
        tss.0[4..12].copy_from_slice(&rsp0.to_le_bytes());
        load_gdt(tss_descriptor((&raw const TSS) as u64, 0x67));
        asm!("ltr {0:x}", in(reg) 0x18u16, options(nostack));
        // Gate 0x80: present, DPL 3, 64-bit interrupt gate, kernel code (SDM Vol. 3A 7.14.1).
        let handler = hostile_int80 as *const () as u64;
        let idt = &mut *(&raw mut IDT);
        idt.0[0x80 * 2] = (handler & 0xffff) | (0x08 << 16) | (0xee00u64 << 32) | ((handler >> 16) & 0xffff) << 48;
        idt.0[0x80 * 2 + 1] = handler >> 32;
        let base = (&raw const IDT) as u64;
        let pointer: [u16; 5] = [4095, base as u16, (base >> 16) as u16, (base >> 32) as u16, (base >> 48) as u16];
        asm!("lidt [{}]", in(reg) pointer.as_ptr(), options(nostack));
        // User access to guest RAM: the U bit in PML4[0] and in every entry under it (1 GiB
        // pages, and the 2 MiB and 4 KiB tables the loader makes for the top of RAM).
        let pml4 = abi::PAGE_TABLES_GPA as *mut u64;
        pml4.write_volatile(pml4.read_volatile() | 4);
        allow_user((abi::PAGE_TABLES_GPA + 0x1000) as *mut u64, 3);
        asm!("mov rax, cr3", "mov cr3, rax", out("rax") _, options(nostack));
        let user_rsp = (&raw mut RING3_STACK) as u64 + 16384 - 8;
        println!("entering ring 3");
        asm!(
            "push 0x2b",  // SS: user data | RPL 3
            "push {rsp}",
            "push 0x202", // RFLAGS: IF
            "push 0x33",  // CS: user code | RPL 3
            "push {rip}",
            "iretq",
            rsp = in(reg) user_rsp,
            rip = in(reg) hostile_ring3_entry as *const () as u64,
            options(noreturn),
        );
    }
}

/// Back in ring 0 (from `int 0x80`, on RSP0): report what ring 3 got and exit.
extern "C" fn ring3_done() -> ! {
    let console = RING3_CONSOLE.load(Ordering::Relaxed);
    let exit = RING3_EXIT.load(Ordering::Relaxed);
    let denied = Error::Denied as i64;
    let verdict = |s: i64| if s == denied { "refused (Denied)" } else { "WRONG: accepted" };
    println!("ring 3 console_write: {}", verdict(console));
    println!("ring 3 exit: {}", verdict(exit));
    println!("back in ring 0");
    let _ = call(abi::HC_EXIT, [0; 6]);
    loop {}
}

/// Sets the U bit in each present entry of the identity-mapped page table at `table` (level
/// 3: a PDPT) and, below entries that point to a table, in that table's entries.
///
/// # Safety
/// `table` is one of this guest's page tables, identity-mapped, and nothing else uses them.
unsafe fn allow_user(table: *mut u64, level: u32) {
    for i in 0..512 {
        // SAFETY: forwarded from the caller; an entry is inside its 4 KiB table.
        let e = unsafe { table.add(i).read_volatile() };
        if e & 1 == 0 {
            continue;
        }
        // SAFETY: as above.
        unsafe { table.add(i).write_volatile(e | 4) };
        if level > 1 && e & 0x80 == 0 {
            // SAFETY: a present non-leaf entry points to a page table of this guest's.
            unsafe { allow_user((e & 0x000f_ffff_ffff_f000) as *mut u64, level - 1) };
        }
    }
}
