//! Virtual interrupts and guest exceptions (issue 16): installs its own IDT, takes a #PF it
//! caused itself (CR2 and error code checked, then resumes after the load), gets a one-shot
//! timer interrupt only after it unmasks interrupts (STI), re-arms the timer from the handler
//! for periodic work, and sleeps: the wake-up comes no earlier than asked.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_lib::interrupts::{self, Frame};
use guest_lib::notify::{self, micros};
use guest_lib::{abi, info, println, BootInfo};

guest_lib::entry!(main);

/// Not in the guest's identity map (as in `oob`).
const UNMAPPED: u64 = 0x7000_0000_0000;
const TIMER: u8 = 0x41;
const PERIODS: u64 = 5;

static PF_CR2: AtomicU64 = AtomicU64::new(0);
static PF_ERROR: AtomicU64 = AtomicU64::new(u64::MAX);
static RESUME: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);
static PERIODIC: AtomicU64 = AtomicU64::new(0);

fn page_fault(f: &mut Frame) {
    PF_CR2.store(interrupts::cr2(), Ordering::Relaxed);
    PF_ERROR.store(f.error_code, Ordering::Relaxed);
    f.rip = RESUME.load(Ordering::Relaxed);
}

fn tick(_: &mut Frame) {
    let n = TICKS.fetch_add(1, Ordering::Relaxed) + 1;
    if PERIODIC.load(Ordering::Relaxed) != 0 && n < PERIODS {
        let _ = notify::timer(2_000, TIMER);
    }
}

fn main(_: &BootInfo) -> i32 {
    if let Err(e) = interrupts::set_handler(14, page_fault) {
        println!("irq: cannot handle #PF: {e}");
        return 1;
    }
    let value: u64;
    // SAFETY: the load faults (nothing maps UNMAPPED); the #PF handler resumes at label 2.
    unsafe {
        core::arch::asm!("lea {r}, [rip + 2f]", "mov [{slot}], {r}", "mov {v}, 0x1234", "mov {v}, [{a}]", "2:",
            r = out(reg) _, slot = in(reg) RESUME.as_ptr(), v = out(reg) value, a = in(reg) UNMAPPED);
    }
    let (cr2, error) = (PF_CR2.load(Ordering::Relaxed), PF_ERROR.load(Ordering::Relaxed));
    if cr2 != UNMAPPED || error != 0 || value != 0x1234 {
        println!("irq: #PF: CR2 {cr2:#x}, error code {error:#x}, value {value:#x}: WRONG");
        return 1;
    }
    println!("irq: #PF handled by the guest: CR2 {cr2:#x}, error code {error:#x}, resumed");

    if interrupts::set_handler(TIMER, tick).is_err() {
        return 1;
    }
    interrupts::disable();
    let _ = notify::timer(1_000, TIMER);
    let t0 = micros();
    while micros() < t0 + 30_000 {
        core::hint::spin_loop();
    }
    let masked = TICKS.load(Ordering::Relaxed);
    interrupts::enable();
    let t1 = micros();
    while TICKS.load(Ordering::Relaxed) == 0 && micros() < t1 + 200_000 {
        core::hint::spin_loop();
    }
    let taken = TICKS.load(Ordering::Relaxed);
    if masked != 0 || taken != 1 {
        println!("irq: timer: {masked} interrupts while IF = 0, {taken} after STI: WRONG");
        return 1;
    }
    println!("irq: timer interrupt held for 30 ms while IF = 0, taken after STI");

    PERIODIC.store(1, Ordering::Relaxed);
    TICKS.store(0, Ordering::Relaxed);
    let _ = notify::timer(2_000, TIMER);
    let t2 = micros();
    while TICKS.load(Ordering::Relaxed) < PERIODS && micros() < t2 + 2_000_000 {
        // Waiting with nothing pending but the timer: the interrupt ends the wait.
        let _ = notify::wait(notify::Event(1), notify::Timeout::Micros(100_000));
    }
    let n = TICKS.load(Ordering::Relaxed);
    if n != PERIODS {
        println!("irq: periodic timer: {n} of {PERIODS} ticks: WRONG");
        return 1;
    }
    println!("irq: periodic timer: {n} ticks of 2 ms, re-armed from the handler, in {} us", micros() - t2);

    let asked = 20_000;
    let slices = info(abi::INFO_SLICES).unwrap_or(0);
    let t3 = micros();
    if let Err(e) = notify::sleep(asked) {
        println!("irq: sleep: {e}");
        return 1;
    }
    let slept = micros() - t3;
    let used = info(abi::INFO_SLICES).unwrap_or(0) - slices;
    println!("irq: slept {asked} us: woke after {slept} us, {used} time slices used");
    if slept < asked {
        println!("irq: woke too early: WRONG");
        return 1;
    }
    println!("irq: {} virtual interrupts injected", info(abi::INFO_INTERRUPTS).unwrap_or(0));
    0
}
