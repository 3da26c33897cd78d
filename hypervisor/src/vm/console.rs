//! A guest's console: bytes from `console_write` collect into a line, and each complete line
//! is printed once, whole, with the guest's prefix (`[guest 0 hello] ...`); bytes that are not
//! printable ASCII show as `?`.

/// The longest line printed in one piece; longer ones are cut into several.
const LINE_MAX: usize = 160;

/// A guest's partial console line.
pub struct Console {
    line: [u8; LINE_MAX],
    len: usize,
}

impl Console {
    pub const fn new() -> Console {
        Console { line: [0; LINE_MAX], len: 0 }
    }

    /// Appends `bytes`; complete lines are printed with `prefix` (guest id and name).
    pub fn write(&mut self, bytes: &[u8], id: u32, name: &str, vcpu: u32) {
        for &b in bytes {
            if b == b'\n' || self.len == LINE_MAX {
                self.print(id, name, vcpu);
            }
            if b != b'\n' {
                self.line[self.len] = if b.is_ascii_graphic() || b == b' ' { b } else { b'?' };
                self.len += 1;
            }
        }
    }

    /// Prints a pending partial line (before a report about the guest).
    pub fn flush(&mut self, id: u32, name: &str, vcpu: u32) {
        if self.len > 0 {
            self.print(id, name, vcpu);
        }
    }

    /// One line, printed whole under the serial lock (lines of different CPUs never mix);
    /// a secondary vCPU's lines say which vCPU wrote them.
    fn print(&mut self, id: u32, name: &str, vcpu: u32) {
        let text = core::str::from_utf8(&self.line[..self.len]).unwrap_or("");
        match vcpu {
            0 => crate::println!("[guest {id} {name}] {text}"),
            v => crate::println!("[guest {id} {name} vcpu {v}] {text}"),
        }
        self.len = 0;
    }
}
