//! ParPerOS hypervisor: boots on x86-64 (GRUB multiboot2 or QEMU PVH), sets up the host,
//! reports the machine, and runs guests.
#![no_std]
#![no_main]

extern crate alloc;
extern crate freestanding;

mod acpi;
mod apic;
mod arch;
mod boot;
mod bootinfo;
mod cmdline;
mod cpu;
mod exit;
mod heap;
mod memory;
mod serial;
mod time;
mod vmx_caps;

use exit::Status;

/// Entered from `boot.rs` in long mode on the boot stack with SSE enabled.
#[no_mangle]
extern "C" fn kmain(magic: u32, info: u64) -> ! {
    serial::init();
    time::init();
    serial::init_logger(log::LevelFilter::Info);
    arch::gdt::init();
    arch::idt::init();
    log::info!(target: "boot", "ParPerOS hypervisor {} starting (TSC {} MHz)",
        env!("CARGO_PKG_VERSION"), time::tsc_per_us());

    // SAFETY: magic and info are the loader's eax and ebx, passed through by the entry.
    let bi = match unsafe { bootinfo::BootInfo::parse(magic, info) } {
        Ok(bi) => bi,
        Err(e) => {
            log::error!(target: "boot", "{e}");
            exit::exit(Status::Failure)
        }
    };
    let args = cmdline::Args::parse(bi.cmdline);
    log::set_max_level(args.log_level);
    log::info!(target: "boot", "booted by {}, command line {:?}", bi.protocol, bi.cmdline);
    for warning in args.warnings() {
        log::warn!(target: "boot", "command line: {warning}");
    }
    let (k0, k1) = memory::kernel_range();
    log::info!(target: "boot", "image at {k0:#x}-{k1:#x} ({} KiB)", (k1 - k0) / 1024);

    memory::log_map(&bi);
    let mut free = 0;
    memory::for_each_free_range(&bi, |s, e| free += e - s);
    log::info!(target: "mem", "free for the frame allocator: {} MiB", free >> 20);

    let facts = cpu::CpuFacts::detect();
    facts.log();
    let platform = acpi::discover(bi.rsdp);
    platform.log();
    apic::init();

    if args.test == Some(cmdline::Test::Fault) {
        log::info!(target: "boot", "test=fault: reading an unmapped address");
        // SAFETY: deliberately not safe: the fault path is what this test exercises.
        let value = unsafe { (0x0000_0040_dead_0000 as *const u64).read_volatile() };
        log::error!(target: "boot", "read of an unmapped address returned {value:#x}");
    }

    println!("parperos: ready ({} ms after start)", time::micros() / 1000);
    exit::exit(Status::Success)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::print_unlocked(format_args!("\nPANIC in the hypervisor: {info}\n"));
    exit::exit(Status::Failure)
}
