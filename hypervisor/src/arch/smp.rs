//! Bringing every CPU online: the enabled processors of the MADT are started one after the
//! other with INIT, STARTUP, STARTUP (Intel SDM Vol. 3A 9.4.4.1, "typical AP initialization
//! sequence"; the second STARTUP only if the first did not start it) through a real-mode
//! trampoline copied to `TRAMPOLINE` (below 1 MiB, never handed to the frame allocator),
//! which enters long mode on the boot CPU's page tables and calls `ap_entry` on the CPU's
//! own stack. There each CPU loads its own GDT, TSS (IST stacks) and IDT, enables its local
//! APIC, checks and enables VMX or SVM itself (`Backend::enable`, the same code as on the
//! boot CPU: its own VMXON region or host save area, its own LAPIC timer where the backend
//! uses one), and waits (`hlt`) for the run of guests, in which it takes part with its own
//! backend instance and run queue (`vm::runqueue`).
//!
//! What a CPU is handed at its start is `Cpu` (its index, APIC ID, tables, start handshake and
//! `frames` handle, which carries the CPU's own allocator core index); its run-time state
//! (timer ticks, kicks, drain counters, shootdown record, allocator handle) is its
//! `arch::percpu::PerCpu`, which it registers, checks it finds and gives the handle
//! (`percpu::come_up`) before it allocates anything; from then on it reaches the handle there.

use crate::platform::acpi::Platform;
use crate::arch::gdt::CpuTables;
use crate::arch::idt::Idt;
use crate::platform::bootinfo::{BootInfo, RegionKind};
use crate::arch::cpu::{CpuFacts, Extension};
use allocator::Order;
use crate::mm::frames::Frames;
use crate::vm::{Backend, BackendError};
use crate::{apic, time};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use morsel::HostPhysAddr;

/// Physical address of the trampoline page: free under both loaders (PVH start info and
/// command line lie lower, GRUB's boot information above 16 MiB; checked at run time
/// against the memory map and the boot information anyway). Below 1 MiB, so never in the
/// frame allocator (`memory::for_each_free_range`), and 4 KiB aligned as a STARTUP vector
/// requires.
const TRAMPOLINE: u64 = 0x8000;
const _: () = assert!(TRAMPOLINE.is_multiple_of(4096) && TRAMPOLINE + 4096 <= 1 << 20);

/// Each AP's stack in long mode (`ap_entry` and everything it calls).
const AP_STACK_SIZE: usize = 64 * 1024;

/// An AP's stack; 16-byte aligned as the ABI wants it at a call.
#[repr(C, align(16))]
struct Stack([u8; AP_STACK_SIZE]);

/// How long a CPU may take from the STARTUP IPI to the trampoline's first store, and from
/// there to online (or failed). Emulated CPUs were seen at ~11 ms (QEMU) and ~17 ms (Bochs).
const START_TIMEOUT_US: u64 = 100_000;
const ONLINE_TIMEOUT_US: u64 = 2_000_000;

global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_trampoline
    .code16
ap_trampoline:
    /* Real mode at {base} (CS = {base} >> 4, IP = 0): data through DS = CS. */
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    movl $1, (ap_started - ap_trampoline)
    lgdtl (ap_gdt_ptr - ap_trampoline)
    mov %cr0, %eax
    or $1, %eax                           /* PE */
    mov %eax, %cr0
    ljmpl $0x08, ${base} + ap_pm32 - ap_trampoline

    .code32
ap_pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    /* As boot.rs: PAE, OSFXSR, OSXMMEXCPT; the BSP's CR3; EFER.LME, NXE; PG, MP, no EM. */
    mov %cr4, %eax
    or $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    mov %eax, %cr4
    mov ({base} + ap_cr3 - ap_trampoline), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $((1 << 8) | (1 << 11)), %eax
    wrmsr
    mov %cr0, %eax
    and $~(1 << 2), %eax
    or $((1 << 31) | (1 << 1)), %eax
    mov %eax, %cr0
    ljmp $0x18, ${base} + ap_lm64 - ap_trampoline

    .code64
ap_lm64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    mov ap_stack(%rip), %rsp
    mov ap_arg(%rip), %rdi
    mov ap_entry_addr(%rip), %rax
    call *%rax
1:  cli
    hlt
    jmp 1b

    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff              /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff              /* 0x10: data */
    .quad 0x00af9a000000ffff              /* 0x18: 64-bit code */
ap_gdt_end:
ap_gdt_ptr:
    .short ap_gdt_end - ap_gdt - 1
    .long {base} + ap_gdt - ap_trampoline
    /* Filled by `start_ap` in the copy (layout: `StartData`). */
    .balign 8
    .global ap_start_data
ap_start_data:
ap_started:    .long 0, 0
ap_cr3:        .quad 0
ap_stack:      .quad 0
ap_entry_addr: .quad 0
ap_arg:        .quad 0
    .global ap_trampoline_end
ap_trampoline_end:
    .text
"#,
    base = const TRAMPOLINE,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline: u8;
    static ap_start_data: u8;
    static ap_trampoline_end: u8;
}

/// The data block at the end of the trampoline (`ap_start_data`).
#[repr(C)]
struct StartData {
    /// Set to 1 by the AP's first instructions in real mode.
    started: AtomicU32,
    _pad: u32,
    cr3: u64,
    stack: u64,
    entry: u64,
    arg: u64,
}

/// Where a CPU is in its start.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum State {
    Starting = 0,
    Online = 1,
    Failed = 2,
}

/// One CPU's own state, for the rest of the run. The boot CPU's is index 0.
pub struct Cpu {
    /// 0 for the boot CPU, then 1, 2, ... for the APs in MADT order; also the CPU's
    /// allocator core index.
    pub index: usize,
    pub apic_id: u32,
    /// The frame allocator through this CPU's core index, made by the boot CPU
    /// (`Frames::for_cpu`) and handed over at the start: the CPU puts it in its per-CPU entry
    /// (`percpu::come_up`), where all its later allocations reach it.
    pub frames: Frames,
    /// The AP's descriptor tables (null for the boot CPU, whose tables are static).
    tables: *mut CpuTables,
    idt: Option<&'static Idt>,
    state: AtomicU8,
    /// A 4 KiB and a 2 MiB frame the AP allocated with its own core index; the boot CPU
    /// frees them with its own (proves cross-CPU frees).
    probe: [AtomicU64; 2],
}

/// The CPUs that are online, and how many the MADT listed.
pub struct Cpus {
    pub online: Vec<&'static Cpu>,
    pub listed: usize,
}

/// How many CPUs to prepare for: the MADT's enabled processors, at most `limit`, at least 1.
pub fn planned(platform: &Platform, limit: Option<usize>) -> usize {
    platform.cpus.min(limit.unwrap_or(usize::MAX)).max(1)
}

/// Starts the MADT's other CPUs, at most `limit` CPUs in all (the boot CPU counts). Each
/// one that does not come online is reported and left out (parked again with INIT).
/// Runs on the boot CPU, which came up (`percpu::come_up`); the allocator has `planned(..)`
/// core indices, and each AP is handed its own (`Cpu::frames`).
pub fn start(bi: &BootInfo, platform: &Platform, limit: Option<usize>) -> Cpus {
    let frames = &Frames::here();
    let bsp_id = apic::id();
    let bsp = Box::leak(Box::new(Cpu {
        index: 0,
        apic_id: bsp_id,
        frames: *frames,
        tables: core::ptr::null_mut(),
        idt: None,
        state: AtomicU8::new(State::Online as u8),
        probe: [AtomicU64::new(0), AtomicU64::new(0)],
    }));
    // The boot CPU came up in `main` (`percpu::come_up`), before its first allocation.
    log::info!(target: "smp", "cpu 0 online (apic id {bsp_id})");
    let mut cpus = Cpus { online: alloc::vec![&*bsp], listed: platform.cpus.max(1) };
    let aps: Vec<u32> = platform.apic_ids.iter().copied().filter(|&id| id != bsp_id).collect();
    let wanted = planned(platform, limit).min(crate::arch::ipi::MAX_CPUS) - 1;
    if let (Some(limit), true) = (limit, aps.len() > wanted) {
        log::info!(target: "smp", "cpus={limit}: starting {wanted} of {} other CPUs", aps.len());
    }
    if wanted > 0 {
        if let Err(why) = trampoline_page_is_free(bi) {
            log::error!(target: "smp", "trampoline page {TRAMPOLINE:#x}: {why}; other CPUs left out");
            return cpus;
        }
        install_trampoline();
        apic::calibrate_timer(); // once, here: the APs reuse the figure
    }
    for (i, &apic_id) in aps.iter().take(wanted).enumerate() {
        let index = i + 1;
        let started = if apic_id > 0xfe {
            Err("its APIC ID needs x2APIC mode, which the hypervisor does not use")
        } else {
            start_ap(index, apic_id)
        };
        match started {
            Ok(cpu) => cpus.online.push(cpu),
            Err(why) => {
                log::error!(target: "smp", "cpu {index} (apic id {apic_id}) left out: {why}");
                if apic_id <= 0xfe {
                    apic::send_init(apic_id); // park it, whatever state it reached
                }
            }
        }
    }
    cpus
}

impl Cpus {
    pub fn log(&self) {
        log::info!(target: "smp", "{} of {} CPUs online", self.online.len(), self.listed);
    }
}

/// Why the trampoline page cannot be used.
fn trampoline_page_is_free(bi: &BootInfo) -> Result<(), &'static str> {
    let (s, e) = (TRAMPOLINE, TRAMPOLINE + 4096);
    let overlaps = |a: u64, b: u64| a < e && b > s;
    let in_ram = bi.regions().iter().any(|r| r.kind == RegionKind::Usable && r.start <= s && r.start + r.len >= e);
    if !in_ram {
        return Err("not usable RAM in the memory map");
    }
    let cmdline = bi.cmdline.as_ptr() as u64;
    if overlaps(bi.info_range.0, bi.info_range.1)
        || overlaps(cmdline, cmdline + bi.cmdline.len() as u64)
        || bi.module.as_ref().is_some_and(|m| overlaps(m.start, m.start + m.len))
        || bi.rsdp.is_some_and(|r| overlaps(r, r + 36))
    {
        return Err("holds the loader's boot information");
    }
    Ok(())
}

/// Copies the trampoline to its page.
fn install_trampoline() {
    let from = &raw const ap_trampoline;
    let len = (&raw const ap_trampoline_end) as usize - from as usize;
    assert!(len <= 4096, "the AP trampoline exceeds its page");
    // SAFETY: the page at TRAMPOLINE is usable RAM that nothing else uses (checked by
    // trampoline_page_is_free; the allocator manages nothing below 1 MiB), identity-mapped.
    unsafe { core::ptr::copy_nonoverlapping(from, TRAMPOLINE as *mut u8, len) };
}

/// The data block in the installed trampoline.
fn start_data() -> &'static StartData {
    let offset = (&raw const ap_start_data) as u64 - (&raw const ap_trampoline) as u64;
    // SAFETY: the installed copy holds a StartData at this offset (8-byte aligned, inside
    // the page), used only by the start protocol, one AP at a time.
    unsafe { &*((TRAMPOLINE + offset) as *const StartData) }
}

fn wait_us(us: u64) {
    let t0 = time::micros();
    while time::micros() < t0 + us {
        core::hint::spin_loop();
    }
}

/// Waits up to `us` for `done`; true if it happened.
fn wait_for(us: u64, done: impl Fn() -> bool) -> bool {
    let t0 = time::micros();
    while !done() {
        if time::micros() > t0 + us {
            return done();
        }
        core::hint::spin_loop();
    }
    true
}

/// Starts one AP and waits until it is online or has failed.
fn start_ap(index: usize, apic_id: u32) -> Result<&'static Cpu, &'static str> {
    let frames = &Frames::here();
    let cpu_frames = frames.for_cpu(index).ok_or("no allocator core index for it")?;
    // SAFETY: an all-zero byte array is a valid stack.
    let stack: &'static mut Stack = Box::leak(unsafe { Box::<Stack>::new_zeroed().assume_init() });
    let cpu: &'static Cpu = Box::leak(Box::new(Cpu {
        index,
        apic_id,
        frames: cpu_frames,
        tables: Box::into_raw(CpuTables::new()),
        idt: Some(Box::leak(Idt::new())),
        state: AtomicU8::new(State::Starting as u8),
        probe: [AtomicU64::new(0), AtomicU64::new(0)],
    }));
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    if cr3 >= 1 << 32 {
        return Err("the page tables lie above 4 GiB (the trampoline loads CR3 in 32-bit mode)");
    }
    let data = start_data();
    let data_ptr = data as *const StartData as *mut StartData;
    // SAFETY: no AP runs the trampoline now (the previous one is online, failed or parked by
    // INIT); plain stores before the IPIs, which order them for the target CPU.
    unsafe {
        (*data_ptr).cr3 = cr3;
        (*data_ptr).stack = stack.0.as_ptr() as u64 + AP_STACK_SIZE as u64;
        (*data_ptr).entry = ap_entry as extern "C" fn(&'static Cpu) -> ! as usize as u64;
        (*data_ptr).arg = cpu as *const Cpu as u64;
    }
    data.started.store(0, Ordering::SeqCst);
    let vector = (TRAMPOLINE >> 12) as u8;
    let t0 = time::micros();
    apic::send_init(apic_id);
    wait_us(10_000);
    apic::send_startup(apic_id, vector);
    if !wait_for(200, || data.started.load(Ordering::Acquire) != 0) {
        apic::send_startup(apic_id, vector);
    }
    if !wait_for(START_TIMEOUT_US, || data.started.load(Ordering::Acquire) != 0) {
        return Err("it did not start (no answer to INIT, STARTUP, STARTUP)");
    }
    let settled = || cpu.state.load(Ordering::Acquire) != State::Starting as u8;
    if !wait_for(ONLINE_TIMEOUT_US, settled) {
        return Err("it started but did not come online in time");
    }
    if cpu.state.load(Ordering::Acquire) == State::Failed as u8 {
        return Err("it could not enable its virtualization backend");
    }
    log::debug!(target: "smp", "cpu {index} up {} us after INIT", time::micros() - t0);
    take_back_probe(cpu);
    Ok(cpu)
}

/// Frees, through the boot CPU's core index, the frames the AP allocated through its own,
/// and checks that they all came back.
fn take_back_probe(cpu: &Cpu) {
    let frames = &Frames::here();
    let before = frames.free_frames();
    let mut pages = 0;
    for (slot, order) in cpu.probe.iter().zip([Order::BASE, Order::HUGE]) {
        let pa = slot.swap(0, Ordering::AcqRel);
        if pa != 0 {
            frames.free(HostPhysAddr::new(pa), order);
            pages += order.frames();
        }
    }
    let back = frames.free_frames() - before;
    if pages == 0 || back != pages {
        log::error!(target: "alloc", "frames cpu {} allocated and cpu 0 freed: {back} of {pages} came back", cpu.index);
    } else {
        log::info!(target: "alloc", "frames cpu {} allocated and cpu 0 freed: {back} of {pages} came back", cpu.index);
    }
}

/// Where every AP arrives from the trampoline, on its own stack, interrupts off.
extern "C" fn ap_entry(cpu: &'static Cpu) -> ! {
    // SAFETY: `tables` was made for this CPU alone by start_ap and lives for the rest of the
    // run; interrupts are off.
    unsafe { CpuTables::load(cpu.tables) };
    if let Some(idt) = cpu.idt {
        idt.load();
    }
    apic::init();
    if apic::id() != cpu.apic_id {
        log::warn!(target: "smp", "cpu {} reports apic id {}, the MADT said {}", cpu.index, apic::id(), cpu.apic_id);
    }
    crate::arch::percpu::come_up(cpu.index, cpu.apic_id, cpu.frames);
    // The probe: one small and one huge frame through this CPU's own core index, reached
    // the way all later allocations on this CPU reach it.
    let frames = Frames::here();
    for (slot, order) in cpu.probe.iter().zip([Order::BASE, Order::HUGE]) {
        if let Some(pa) = frames.alloc_zeroed(order) {
            slot.store(pa.as_u64(), Ordering::Release);
        }
    }
    let facts = CpuFacts::detect();
    match facts.extension {
        Extension::Svm => enable_and_serve::<crate::svm::Svm>(cpu, &facts),
        Extension::Vmx => enable_and_serve::<crate::vmx::Vmx>(cpu, &facts),
        Extension::None => {
            log::warn!(target: "smp", "cpu {}: vmx=no svm=no, no backend", cpu.index);
            online(cpu);
            idle()
        }
    }
}

fn online(cpu: &Cpu) {
    log::info!(target: "smp", "cpu {} online (apic id {})", cpu.index, cpu.apic_id);
    cpu.state.store(State::Online as u8, Ordering::Release);
}

/// Checks and enables the backend on this AP (the code the boot CPU runs for its own); the
/// CPU keeps its backend instance and takes part in the run of guests (`runqueue::serve`).
fn enable_and_serve<B: Backend>(cpu: &'static Cpu, facts: &CpuFacts) -> ! {
    match B::probe(facts).and_then(|caps| B::enable(&caps)) {
        Ok(backend) => {
            online(cpu);
            crate::vm::runqueue::serve(cpu.index, backend)
        }
        Err(e) => {
            let e: BackendError = e;
            log::error!(target: B::NAME, "cpu {}: cannot enable: {e}", cpu.index);
            cpu.state.store(State::Failed as u8, Ordering::Release);
            crate::platform::exit::halt_forever()
        }
    }
}

/// An online AP with nothing to do: halt until an interrupt, forever.
fn idle() -> ! {
    loop {
        // SAFETY: STI takes effect after HLT starts (one-instruction shadow), so no interrupt
        // is lost between them; every vector has a handler.
        unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
    }
}
