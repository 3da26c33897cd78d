//! The machine under the hypervisor: boot entry and boot information, command line, memory
//! map, serial console and logger, time, exit, kernel heap, ACPI.
pub mod acpi;
pub mod boot;
pub mod bootinfo;
pub mod cmdline;
pub mod exit;
pub mod heap;
pub mod memory;
pub mod serial;
pub mod time;
