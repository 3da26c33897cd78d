//! Local APIC (xAPIC, MMIO at its base MSR address): enable, EOI, a periodic timer, and
//! the INIT and STARTUP IPIs that start the other CPUs. The SVM backend intercepts this
//! timer's interrupt to preempt a running guest. Every CPU's APIC sits at the same address
//! and each CPU reaches its own there (SDM Vol. 3A 11.4.1), so one register window serves all.

/// Acknowledges a timer interrupt (its work, ending a guest's slice, is done by the exit)
/// and counts it for this CPU (`ticks`).
pub fn timer_interrupt() {
    crate::arch::percpu::this().mine.ticks.fetch_add(1, Ordering::Relaxed);
    eoi();
}

/// Timer interrupts CPU `me`, the one this runs on, took so far (`PerCpu::mine`): the
/// scheduler compares the count across a guest entry to tell a slice-timer exit from an
/// IPI's. The caller knows its index (no APIC ID read on the entry path).
pub fn ticks(me: usize) -> u64 {
    crate::arch::percpu::of(me).mine.ticks.load(Ordering::Relaxed)
}

use core::sync::atomic::{AtomicU32, Ordering};
use formats::mmio::Mmio;
use spin::Once;

const IA32_APIC_BASE: u32 = 0x1b;
const REG_ID: u64 = 0x20;
const REG_EOI: u64 = 0xb0;
const REG_SPURIOUS: u64 = 0xf0;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_TIMER_INIT: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;

fn base() -> u64 {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU; reading it has no side effects.
    unsafe { x86::msr::rdmsr(IA32_APIC_BASE) & 0xf_ffff_f000 }
}

static REGS: Once<Mmio> = Once::new();

/// The APIC's register page, read from IA32_APIC_BASE on first use.
fn regs() -> &'static Mmio {
    // SAFETY: the page IA32_APIC_BASE names holds the local APIC's registers (SDM 3A 11.4.1).
    REGS.call_once(|| unsafe { Mmio::new(base(), 4096) }.expect("the local APIC page lies above 4 GiB"))
}

fn read(reg: u64) -> u32 {
    regs().read32(reg)
}

fn write(reg: u64, value: u32) {
    regs().write32(reg, value)
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Software-enables the APIC with the spurious vector.
pub fn init() {
    write(REG_SPURIOUS, 0x100 | crate::arch::idt::SPURIOUS_VECTOR as u32);
}

/// This CPU's APIC ID (xAPIC ID register bits 31:24, SDM Vol. 3A 11.4.6).
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// ICR delivery modes and flags (SDM Vol. 3A 11.6.1, figure 11-12).
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_SEND_PENDING: u32 = 1 << 12;

/// Sends an IPI with ICR low word `low` to the CPU with APIC ID `apic_id` and waits until
/// the APIC has sent it (delivery status idle). Physical destination mode, no shorthand.
fn send_ipi(apic_id: u32, low: u32) {
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, low); // writing the low word sends it
    while read(REG_ICR_LOW) & ICR_SEND_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// A fixed-delivery IPI with `vector` to the CPU with APIC ID `apic_id` (edge).
pub fn send_fixed(apic_id: u32, vector: u8) {
    send_ipi(apic_id, vector as u32);
}

/// INIT IPI: the target CPU resets into wait-for-SIPI (SDM Vol. 3A 9.4.4).
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
}

/// STARTUP IPI: the target starts in real mode at `vector << 12` (SDM Vol. 3A 9.4.4.1).
pub fn send_startup(apic_id: u32, vector: u8) {
    send_ipi(apic_id, ICR_STARTUP | ICR_LEVEL_ASSERT | vector as u32);
}

/// LAPIC timer ticks per millisecond at divide 16, measured once (0: not yet).
static TICKS_PER_MS: AtomicU32 = AtomicU32::new(0);

/// Measures the LAPIC timer against the TSC over 1 ms, once: every CPU's timer runs at the
/// bus clock, and a second measurement on a loaded emulator host can be far off, so the
/// boot CPU measures and the others reuse the figure.
pub fn calibrate_timer() -> u32 {
    let known = TICKS_PER_MS.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    write(REG_LVT_TIMER, 1 << 16); // masked while measuring
    write(REG_TIMER_DIVIDE, 0b0011); // divide by 16
    write(REG_TIMER_INIT, u32::MAX);
    let t0 = crate::platform::time::micros();
    while crate::platform::time::micros() < t0 + 1000 {}
    let per_ms = (u32::MAX - read(REG_TIMER_CURRENT)).max(1);
    write(REG_TIMER_INIT, 0); // stopped
    TICKS_PER_MS.store(per_ms, Ordering::Relaxed);
    log::info!(target: "apic", "LAPIC timer: {per_ms} ticks/ms (divide 16)");
    per_ms
}

/// Starts a periodic timer interrupt every `period_us` microseconds on this CPU (with the
/// figure `calibrate_timer` measured).
pub fn start_periodic_timer_us(period_us: u64) {
    let per_ms = calibrate_timer();
    let count = (per_ms as u64 * period_us / 1000).clamp(1, u32::MAX as u64) as u32;
    log::info!(target: "apic", "LAPIC timer: period {period_us} us ({count} ticks)");
    start_periodic_timer(count);
}

/// One HLT with interrupts on, until the next interrupt (an IPI, the periodic timer) or at
/// the latest `deadline` (a one-shot timer where this CPU has no periodic one: the slice
/// timer of SVM, and of VMX without a preemption timer, is periodic; `PerCpu::mine`).
pub fn halt_once(deadline: u64) {
    // A CPU marked busy (it left a guest) gets no shootdown IPI: clear the mark (and answer)
    // first, so that a request from now on sends the IPI that ends this HLT.
    let me = crate::arch::ipi::me();
    crate::arch::ipi::ready_on(me);
    let periodic = crate::arch::percpu::of(me).mine.periodic.load(Ordering::Relaxed);
    let now = crate::platform::time::tsc();
    if now >= deadline {
        return;
    }
    if !periodic {
        let us = (deadline - now) / crate::platform::time::tsc_per_us().max(1) + 1;
        let count = (calibrate_timer() as u64 * us / 1000).clamp(1, u32::MAX as u64) as u32;
        write(REG_TIMER_DIVIDE, 0b0011); // divide by 16
        write(REG_LVT_TIMER, crate::arch::idt::TIMER_VECTOR as u32); // one-shot
        write(REG_TIMER_INIT, count);
    }
    // SAFETY: the host's IDT handles every vector (the timer's with an EOI); STI takes
    // effect after HLT, so no interrupt is lost between the two (SDM Vol. 2B STI).
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    if !periodic {
        // Woken earlier (an IPI): the one-shot must not fire later inside a guest's slice,
        // where its exit would count as the slice timer's.
        write(REG_TIMER_INIT, 0);
    }
}

/// Starts the periodic timer with `count` ticks (divide by 16) per interrupt.
fn start_periodic_timer(count: u32) {
    crate::arch::percpu::this().mine.periodic.store(true, Ordering::Relaxed);
    write(REG_TIMER_DIVIDE, 0b0011); // divide by 16
    write(REG_LVT_TIMER, (1 << 17) | crate::arch::idt::TIMER_VECTOR as u32); // periodic
    write(REG_TIMER_INIT, count);
}
