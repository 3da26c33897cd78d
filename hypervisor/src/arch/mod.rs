//! x86-64 host plumbing: ports, descriptor tables, interrupts.
pub mod gdt;
pub mod idt;
pub mod port;
