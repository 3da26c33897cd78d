//! Ending the run: one routine for both emulators. QEMU's `isa-debug-exit` (port 0xf4)
//! exits with status `(value << 1) | 1`; Bochs ignores that port and shuts down when
//! "Shutdown" is written to port 0x8900. The last serial line says how the run ended,
//! because Bochs' own exit status does not.

use crate::arch::port::outb;

/// How the run ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Status {
    Success,
    Failure,
}

/// Prints the final line and stops the machine.
pub fn exit(status: Status) -> ! {
    let (word, code) = match status {
        Status::Success => ("success", 0x10), // QEMU exit status 33
        Status::Failure => ("failure", 0x11), // QEMU exit status 35
    };
    crate::platform::serial::print_unlocked(format_args!("parperos: exit {word}\n"));
    crate::platform::serial::drain();
    outb(0xf4, code);
    for b in b"Shutdown" {
        outb(0x8900, *b);
    }
    halt_forever()
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt only stops this CPU.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
