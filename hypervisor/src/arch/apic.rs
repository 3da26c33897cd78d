//! Local APIC (xAPIC, MMIO at its base MSR address): enable, EOI, and a periodic timer.
//! The SVM backend intercepts this timer's interrupt to preempt a running guest.

/// Acknowledges a timer interrupt (its work, ending a guest's slice, is done by the exit).
pub fn timer_interrupt() {
    eoi();
}

use formats::mmio::Mmio;
use spin::Once;

const IA32_APIC_BASE: u32 = 0x1b;
const REG_EOI: u64 = 0xb0;
const REG_SPURIOUS: u64 = 0xf0;
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

/// Starts a periodic timer interrupt every `period_us` microseconds (the timer's rate is
/// measured against the TSC first).
pub fn start_periodic_timer_us(period_us: u64) {
    write(REG_LVT_TIMER, 1 << 16); // masked while measuring
    write(REG_TIMER_DIVIDE, 0b0011); // divide by 16
    write(REG_TIMER_INIT, u32::MAX);
    let t0 = crate::time::micros();
    while crate::time::micros() < t0 + 1000 {}
    let per_ms = u32::MAX - read(REG_TIMER_CURRENT);
    let count = (per_ms as u64 * period_us / 1000).clamp(1, u32::MAX as u64) as u32;
    log::info!(target: "apic", "LAPIC timer: {per_ms} ticks/ms (divide 16), period {period_us} us");
    start_periodic_timer(count);
}

/// Starts the periodic timer with `count` ticks (divide by 16) per interrupt.
fn start_periodic_timer(count: u32) {
    write(REG_TIMER_DIVIDE, 0b0011); // divide by 16
    write(REG_LVT_TIMER, (1 << 17) | crate::arch::idt::TIMER_VECTOR as u32); // periodic
    write(REG_TIMER_INIT, count);
}

