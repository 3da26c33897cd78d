//! ParPerOS hypervisor: boots on x86-64 (GRUB multiboot2 or QEMU PVH), sets up the host,
//! reports the machine, and runs guests.
#![no_std]
#![no_main]

extern crate alloc;
extern crate freestanding;

mod arch;
mod devices;
mod iommu;
mod mm;
mod morsels;
mod platform;
mod probe;
mod svm;
mod vm;
mod vmx;

use arch::{apic, cpu, percpu, smp};
use mm::{frames, pmem};
use platform::{acpi, bootinfo, cmdline, exit, heap, memory, serial, time};

use exit::Status;

/// Entered from `boot.rs` in long mode on the boot stack with SSE enabled.
#[no_mangle]
extern "C" fn kmain(magic: u32, info: u64) -> ! {
    serial::init();
    time::init();
    serial::init_logger(log::LevelFilter::Info);
    arch::gdt::init();
    arch::idt::init();
    // SAFETY: magic and info are the loader's eax and ebx, passed through by the entry.
    let bi = match unsafe { bootinfo::BootInfo::parse(magic, info) } {
        Ok(bi) => bi,
        Err(e) => {
            log::error!(target: "boot", "{e}");
            exit::exit(Status::Failure)
        }
    };
    let args = cmdline::Args::parse(bi.cmdline);
    // The command line's level holds from the first line on (`log=warn`: no INFO at all).
    log::set_max_level(args.log_level);
    log::info!(target: "boot",
        "ParPerOS hypervisor {} starting (TSC {} MHz, calibrated against the PIT over {} ms of machine time; \
         time stamps are machine time, which an emulator's virtual clock may run faster than the wall clock)",
        env!("CARGO_PKG_VERSION"), time::tsc_per_us(), time::CALIBRATION_MS);
    log::info!(target: "boot", "booted by {}, command line {:?}", bi.protocol, bi.cmdline);
    for (word, why) in &args.errors {
        log::error!(target: "boot", "command line: {word:?}: {why}");
    }
    if !args.errors.is_empty() {
        // A configuration error is fatal: stop before `ready`, so nothing runs half-configured.
        log::error!(target: "boot", "stopping: {} command-line error(s); valid words: {}", args.errors.len(), cmdline::VALID);
        exit::exit(Status::Failure)
    }
    let (k0, k1) = memory::kernel_range();
    log::info!(target: "boot", "image at {k0:#x}-{k1:#x} ({} KiB)", (k1 - k0) / 1024);

    memory::log_map(&bi);
    let facts = cpu::CpuFacts::detect();
    facts.log(&match facts.extension {
        cpu::Extension::Vmx => vmx::caps::summary(&vmx::caps::snapshot()),
        cpu::Extension::Svm => svm::caps::summary(&svm::caps::snapshot()),
        cpu::Extension::None => "vmx=no svm=no".into(),
    });
    let mapped = memory::identity_map_up_to(memory::top_of_ram(&bi), facts.gib_pages);
    // The MADT first: the allocator needs a core index per CPU.
    let platform = acpi::discover(bi.rsdp);
    let frames = match frames::init(&bi, mapped, smp::planned(&platform, args.cpus)) {
        Ok(f) => f,
        Err(e) => {
            log::error!(target: "alloc", "{e}");
            exit::exit(Status::Failure)
        }
    };
    // The boot CPU is CPU 0 and allocates through core 0 (`frames::init`'s handle); from here
    // on its handle is reached through its per-CPU entry.
    percpu::come_up(0, apic::id(), frames);
    platform.log();
    apic::init();
    let pmem = pmem::init(&platform, facts.gib_pages, &args.pmem);
    let (mut devices, devices_ok) = match devices::init(&platform, args.iommu, args.nvme_poll) {
        Ok(d) => (d, true),
        Err(devices::InitFailed) => (None, false),
    };

    match args.test {
        Some(cmdline::Test::SvmHostState) => {
            svm::INJECT_HOST_STATE.store(svm::INJECT_SOMETIMES, core::sync::atomic::Ordering::Relaxed);
            log::info!(target: "boot", "test=svm-host-state: every 64th VMRUN gets the host's state in its VMCB");
        }
        Some(cmdline::Test::SvmHostStateAlways) => {
            svm::INJECT_HOST_STATE.store(svm::INJECT_ALWAYS, core::sync::atomic::Ordering::Relaxed);
            log::info!(target: "boot", "test=svm-host-state:always: every VMRUN gets the host's state in its VMCB");
        }
        _ => {}
    }
    if args.test == Some(cmdline::Test::Fault) {
        log::info!(target: "boot", "test=fault: reading an unmapped address");
        // SAFETY: deliberately not safe: the fault path is what this test exercises.
        let value = unsafe { (0x0000_0040_dead_0000 as *const u64).read_volatile() };
        log::error!(target: "boot", "read of an unmapped address returned {value:#x}");
    }

    let devices_ok = devices_ok && match args.test {
        Some(cmdline::Test::DmaFault) => devices::selftest::dma_fault_test(devices.as_mut()),
        Some(cmdline::Test::DmaNoDomain) => devices::selftest::dma_nodomain_test(devices.as_mut()),
        Some(cmdline::Test::SharePt) => devices::selftest::sharept_test(devices.as_mut()),
        _ => true,
    };
    let cpus = smp::start(&bi, &platform, args.cpus);
    cpus.log();
    println!("parperos: ready ({} ms after start)", time::micros() / 1000);
    let ok = devices_ok && (args.guests.is_empty() || run_guests(&bi, &args, &facts, vm::Drivers { devices, pmem, bench: args.bench }, cpus.online.len()));
    log::info!(target: "mem", "heap high-water mark: {} KiB", heap::used() / 1024);
    exit::exit(if ok { Status::Success } else { Status::Failure })
}

/// Enables the backend this CPU offers and runs the command line's guests.
fn run_guests(bi: &bootinfo::BootInfo, args: &cmdline::Args, facts: &cpu::CpuFacts, drivers: vm::Drivers, cpus: usize) -> bool {
    let Some(module) = bi.module else {
        log::error!(target: "vm", "guests requested but no boot module (guest archive) was loaded");
        return false;
    };
    // SAFETY: the loader placed the module in RAM that the allocator does not manage.
    let bytes = unsafe { core::slice::from_raw_parts(module.start as *const u8, module.len as usize) };
    let archive = match formats::archive::Archive::parse(bytes) {
        Ok(a) => a,
        Err(e) => {
            log::error!(target: "vm", "boot module: {e}");
            return false;
        }
    };
    log::info!(target: "vm", "guest archive: {} images", archive.len());
    match facts.extension {
        cpu::Extension::Svm => run_backend::<svm::Svm>(facts, archive, &args.guests, drivers, cpus),
        cpu::Extension::Vmx => run_backend::<vmx::Vmx>(facts, archive, &args.guests, drivers, cpus),
        cpu::Extension::None => {
            log::error!(target: "vm",
                "cannot run guests: the CPU ({}) has neither VMX (CPUID.1:ECX bit 5) nor SVM (CPUID.8000_0001:ECX bit 2)",
                facts.vendor());
            false
        }
    }
}

fn run_backend<B: vm::Backend>(
    facts: &cpu::CpuFacts,
    archive: formats::archive::Archive,
    specs: &[vm::guest::GuestSpec],
    drivers: vm::Drivers,
    cpus: usize,
) -> bool {
    match B::probe(facts).and_then(|caps| B::enable(&caps)) {
        Ok(mut backend) => vm::sched::run_guests(&mut backend, archive, specs, drivers, cpus),
        Err(e) => {
            log::error!(target: B::NAME, "cannot run guests: {e}");
            false
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::print_unlocked(format_args!("\nPANIC in the hypervisor: {info}\n"));
    exit::exit(Status::Failure)
}
