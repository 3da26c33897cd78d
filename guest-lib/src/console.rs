//! Console output over the console-write hypercall: `print!`/`println!` and a `log` backend.
//! Output is buffered per line so that one guest line is one hypercall.

use crate::abi::{CONSOLE_MAX, HC_CONSOLE_WRITE};
use crate::hypercall::call;
use core::fmt::{self, Write};

/// Writes raw bytes to the console (in pieces of at most `CONSOLE_MAX`).
pub fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(CONSOLE_MAX as usize) {
        let _ = call(HC_CONSOLE_WRITE, [chunk.as_ptr() as u64, chunk.len() as u64, 0, 0, 0, 0]);
    }
}

/// A line buffer that flushes on newline and when full.
struct LineWriter {
    buf: [u8; 256],
    len: usize,
}

impl LineWriter {
    fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

/// Formats `args` to the console.
pub fn print(args: fmt::Arguments) {
    let mut w = LineWriter { buf: [0; 256], len: 0 };
    let _ = w.write_fmt(args);
    w.flush();
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        print(format_args!("{:5} {}: {}\n", record.level(), record.target(), record.args()));
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the console as the `log` backend (the entry does this), at the level of the
/// hypervisor's command line (`log=`, from the boot information; no hypercall).
pub fn init_logger(info: &crate::BootInfo) {
    let _ = log::set_logger(&LOGGER);
    let level = match info.log_level {
        0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        4 => log::LevelFilter::Debug,
        5 => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    };
    log::set_max_level(level);
}

/// Prints to the guest console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// Prints a line to the guest console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
