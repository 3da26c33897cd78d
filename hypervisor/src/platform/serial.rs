//! COM1 (16550 UART at 0x3f8): the console, and the `log` backend with level and time stamp.

use crate::arch::port::{inb, outb};
use crate::platform::time;
use core::fmt::{self, Write};
use spin::Mutex;

const COM1: u16 = 0x3f8;

/// The UART; `Mutex` keeps lines from interleaving.
static PORT: Mutex<Serial> = Mutex::new(Serial);

/// Writes to COM1 once `init` has run.
pub struct Serial;

impl Serial {
    fn put(&mut self, byte: u8) {
        // Line status register bit 5: transmit holding register empty (16550 data sheet).
        while inb(COM1 + 5) & 0x20 == 0 {}
        outb(COM1, byte);
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

/// Programs COM1 for 115200 baud, 8N1, FIFOs on, no interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB on
    outb(COM1, 0x01); // divisor 1 = 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8 bits, no parity, one stop bit
    outb(COM1 + 2, 0xc7); // FIFO on, cleared, 14-byte threshold
    outb(COM1 + 4, 0x03); // DTR, RTS
}

/// Waits until the UART has sent every byte (LSR bit 6: transmitter empty), so that a
/// shutdown right after loses nothing.
pub fn drain() {
    while inb(COM1 + 5) & 0x40 == 0 {}
}

/// Prints without a prefix (used for guest console output and the final lines).
pub fn print(args: fmt::Arguments) {
    let _ = PORT.lock().write_fmt(args);
}

/// Prints on the fault path, where the lock may be held by the code that faulted.
pub fn print_unlocked(args: fmt::Arguments) {
    let _ = Serial.write_fmt(args);
}

struct Logger;

/// The log target of structured events: one line each, `NAME key=value ...` (no spaces in
/// values), at INFO, printed as `@evt NAME key=value ...`.
pub const EVENT_TARGET: &str = "evt";

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let us = time::micros();
        // Events (target `evt`) are for machines: `@evt NAME key=value ...`, which scenarios
        // match with `event =` (xtask/src/scenario.rs), whatever words the prose uses.
        if record.target() == EVENT_TARGET {
            let _ = writeln!(PORT.lock(), "[{:5}.{:06}] @evt {}", us / 1_000_000, us % 1_000_000, record.args());
            return;
        }
        let _ = writeln!(
            PORT.lock(),
            "[{:5}.{:06}] {:5} {}: {}",
            us / 1_000_000,
            us % 1_000_000,
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs COM1 as the `log` backend at the given level.
pub fn init_logger(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// `print!` to the console without a log prefix.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::platform::serial::print(format_args!($($arg)*)) };
}

/// `println!` to the console without a log prefix.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::platform::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}
