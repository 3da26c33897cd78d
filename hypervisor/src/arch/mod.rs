//! x86-64 host plumbing: ports, descriptor tables, interrupts, the local APIC, and the
//! vendor-neutral CPU facts.
pub mod apic;
pub mod cpu;
pub mod gdt;
pub mod idt;
pub mod ipi;
pub mod percpu;
pub mod port;
pub mod smp;
