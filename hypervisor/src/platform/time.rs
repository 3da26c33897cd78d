//! Time since boot from the TSC, calibrated once against the PIT (8254 channel 2).

use crate::arch::port::{inb, outb};
use core::arch::x86_64::_rdtsc;
use core::sync::atomic::{AtomicU64, Ordering};

static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static TSC_PER_US: AtomicU64 = AtomicU64::new(0);

/// Reads the time-stamp counter.
pub fn tsc() -> u64 {
    // SAFETY: RDTSC has no side effects; CR4.TSD is clear.
    unsafe { _rdtsc() }
}

/// How long `init` counts TSC ticks against the PIT, in PIT (machine) milliseconds.
pub const CALIBRATION_MS: u64 = 10;

/// Calibrates the TSC over `CALIBRATION_MS` of PIT time; call once, early. The PIT is the
/// machine's clock: under an emulator whose virtual time is not tied to the host's (Bochs
/// `clock: sync=none`), TSC and PIT both follow the emulator, and so do our time stamps.
pub fn init() {
    BOOT_TSC.store(tsc(), Ordering::Relaxed);
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = CALIBRATION_MS;
    let count = (PIT_HZ * MS / 1000) as u16;
    // Port 0x61 bit 0 gates channel 2, bit 1 would drive the speaker (keep it off).
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count)
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let start = tsc();
    // Bit 5 of port 0x61 is channel 2's OUT, which goes high at terminal count.
    while inb(0x61) & 0x20 == 0 {}
    let per_us = ((tsc() - start) / (MS * 1000)).max(1);
    TSC_PER_US.store(per_us, Ordering::Relaxed);
}

/// TSC ticks per microsecond (0 before `init`).
pub fn tsc_per_us() -> u64 {
    TSC_PER_US.load(Ordering::Relaxed)
}

/// Microseconds since `init` (0 before).
pub fn micros() -> u64 {
    match tsc_per_us() {
        0 => 0,
        per_us => (tsc() - BOOT_TSC.load(Ordering::Relaxed)) / per_us,
    }
}
