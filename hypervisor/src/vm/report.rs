//! What the vCPU loop tells the user: why a misbehaving guest was stopped (guest, exit,
//! address), and the end-of-run table of how every guest and vCPU ended, with exit counts.

use super::guest::{Guest, State, Summary};
use super::{Backend, Exit, ExitKind};
use core::sync::atomic::{AtomicU64, Ordering};
use morsel::{GuestPhysAddr, HostPhysAddr};

/// Guests a debugger can find (`PARPEROS_GUEST_ROOTS`); later guest ids are not recorded.
pub const DEBUG_GUESTS: usize = 256;

/// For a debugger (`qemu-configs/gdb/parperos.py`): by guest id, the host-physical root of
/// the guest's second-level table (nCR3 / EPTP address) and its RAM size in bytes (0 / 0:
/// none). QEMU's gdbstub does not walk nested paging, so the script walks this root to read
/// guest-physical memory. The hypervisor runs at its link address, so the symbol's address
/// is also where the table lies in physical memory (`monitor xp` reads it in any mode).
/// Written once per guest at load, never read here.
#[no_mangle]
pub static PARPEROS_GUEST_ROOTS: [[AtomicU64; 2]; DEBUG_GUESTS] = [const { [AtomicU64::new(0), AtomicU64::new(0)] }; DEBUG_GUESTS];

/// Records guest `id`'s second-level root and RAM size for a debugger and logs them (DEBUG).
pub(super) fn record_for_debugger(id: u32, name: &str, root: HostPhysAddr, ram: u64) {
    if let Some(slot) = PARPEROS_GUEST_ROOTS.get(id as usize) {
        slot[0].store(root.as_u64(), Ordering::Relaxed);
        slot[1].store(ram, Ordering::Relaxed);
    }
    log::debug!(target: "vm", "guest {id} ({name}): second-level table root at host-physical {:#x}, RAM {} MiB (gdb: `guest-x {id} GPA`, qemu-configs/gdb/parperos.py)",
        root.as_u64(), ram >> 20);
}

/// Reports why `vcpu::handle` stopped `guest` (its console flushed first); a fault through
/// `stop`.
pub(super) fn stopped<B: Backend>(guest: &mut Guest<B>, why: &vmcore::vcpu::Stop) {
    use vmcore::vcpu::Stop;
    if let Stop::Fault { exit, rip } = *why {
        return stop(guest, exit, rip);
    }
    guest.flush_console();
    let (id, name) = (guest.id, guest.spec.name);
    match *why {
        Stop::HaltWithInterruptsOff { rip } => log::error!(target: "vm",
            "guest {id} ({name}) stopped: HLT with interrupts disabled would never wake, RIP {rip:#x}"),
        Stop::Undecodable { rip, bytes, got } => log::error!(target: "vm",
            "guest {id} ({name}) stopped: the instruction at RIP {rip:#x} cannot be decoded ({got} bytes readable: {:02x?})", &bytes[..got]),
        Stop::Budget { slices, rip } => log::error!(target: "vm",
            "guest {id} ({name}) stopped: used its budget of {slices} time slices, RIP {rip:#x}"),
        Stop::Fault { .. } => {}
    }
}

/// After a stop's report: which vCPU stopped, on which CPU, and where its stack pointer was
/// against the vCPUs' stack reserves (`abi::VCPU_STACK_RESERVE`): one in another vCPU's
/// reserve means a stack ran over (as `guest-lib`'s once did, before the guard pages) or was
/// switched by hand. No "stopped:" in it, so scenarios that count stop lines count one.
pub(super) fn stopped_at<B: Backend>(guest: &Guest<B>, vcpu: u32, cpu: usize, rsp: u64) {
    let (id, name, memory) = (guest.id, guest.spec.name, guest.spec.memory);
    let own = vmcore::loader::stack_reserve(memory, vcpu);
    match vmcore::loader::stack_owner(memory, guest.spec.vcpus, rsp) {
        Some(v) if v == vcpu => log::error!(target: "vm",
            "guest {id} ({name}): vCPU {vcpu} on cpu {cpu} at the stop, RSP {rsp:#x} (in its stack reserve {:#x}-{:#x})", own.0, own.1),
        Some(v) => log::error!(target: "vm",
            "guest {id} ({name}): vCPU {vcpu} on cpu {cpu} at the stop, RSP {rsp:#x}: in vCPU {v}'s stack reserve, not in its own ({:#x}-{:#x})", own.0, own.1),
        None => log::error!(target: "vm",
            "guest {id} ({name}): vCPU {vcpu} on cpu {cpu} at the stop, RSP {rsp:#x} (outside the vCPUs' stack reserves; its own: {:#x}-{:#x})", own.0, own.1),
    }
}

/// Stops a misbehaving guest with a report naming the guest, the exit and the address.
/// A RIP inside the hypervisor's image that is not in the guest's memory is printed as
/// `hypervisor RIP 0x...` (xtask names it from the hypervisor's ELF, not the guest's); an
/// exit that came back with the host's state is reported as the emulator's fault.
pub(super) fn stop<B: Backend>(guest: &mut Guest<B>, exit: Exit, rip: u64) {
    guest.flush_console();
    let (id, name) = (guest.id, guest.spec.name);
    if let Exit::HostStateLost { code, host_rip } = exit {
        log::error!(target: "vm",
            "guest {id} ({name}) stopped by an emulator or hypervisor fault, not its own: exit {code:#x} came back with the host's state in place of the guest's (hypervisor RIP {host_rip:#x}; the svm line above says whether the guest may have run or every re-entry failed); the guest was at RIP {rip:#x}");
        guest.stop();
        return;
    }
    let (start, end) = crate::platform::memory::kernel_range();
    if (start..end).contains(&rip) && !guest.space.lock().mem.is_mapped(GuestPhysAddr::new(rip)) {
        log::error!(target: "vm",
            "guest {id} ({name}): the RIP below lies in the hypervisor's image, outside the guest's memory: hypervisor RIP {rip:#x}");
    }
    match exit {
        Exit::SecondLevelFault { gpa, write, fetch, .. } => {
            let access = if fetch { "fetch" } else if write { "write" } else { "read" };
            let refilled = || crate::morsels::exmap::describe_refilled(guest, gpa, write);
            let mapped = guest.space.lock().mem.is_mapped(GuestPhysAddr::new(gpa));
            let what = match mapped {
                true => refilled().unwrap_or_else(|| if write { "violation of a read-only mapping".into() } else { "violation".into() }),
                false => crate::morsels::exmap::describe_fault(guest, gpa).unwrap_or_else(|| "outside its memory".into()),
            };
            log::error!(target: "vm", "guest {id} ({name}) stopped: {access} {what} at guest-physical {gpa:#x}, RIP {rip:#x}");
        }
        Exit::Exception { vector: 14, error_code, address } => match vmcore::loader::stack_guard(guest.spec.memory, guest.spec.vcpus, address) {
            Some(v) => log::error!(target: "vm",
                "guest {id} ({name}) stopped: stack overflow: vCPU {v}'s stack outgrew its {} KiB (a #PF at {address:#x}, the guard page below it; error code {error_code:#x}), RIP {rip:#x}",
                abi::VCPU_STACK_RESERVE / 1024),
            None => log::error!(target: "vm",
                "guest {id} ({name}) stopped: unhandled exception 14 #PF (error code {error_code:#x}), CR2 {address:#x}, RIP {rip:#x}"),
        },
        Exit::Exception { vector, error_code, .. } => log::error!(target: "vm",
            "guest {id} ({name}) stopped: unhandled exception {vector} (error code {error_code:#x}), RIP {rip:#x}"),
        Exit::TripleFault => log::error!(target: "vm", "guest {id} ({name}) stopped: triple fault, RIP {rip:#x}"),
        Exit::Io { port, write } => log::error!(target: "vm",
            "guest {id} ({name}) stopped: port I/O ({} port {port:#x}) is not allowed, RIP {rip:#x}",
            if write { "out" } else { "in" }),
        Exit::Msr { msr, write } => log::error!(target: "vm",
            "guest {id} ({name}) stopped: MSR {} {msr:#x} is not allowed, RIP {rip:#x}",
            if write { "write" } else { "read" }),
        Exit::Forbidden { code } => log::error!(target: "vm",
            "guest {id} ({name}) stopped: forbidden instruction (exit {code:#x}), RIP {rip:#x}"),
        Exit::EntryFailed { code, qualification } => log::error!(target: "vm",
            "guest {id} ({name}) stopped: VM entry failed (reason {code:#x}, qualification {qualification:#x}), RIP {rip:#x}"),
        other => log::error!(target: "vm", "guest {id} ({name}) stopped: unexpected exit {other:?}, RIP {rip:#x}"),
    }
    guest.stop();
}

/// Prints the end-of-run table; true if every guest ended as expected.
pub(super) fn report<B: Backend>(done: &[Summary], frames_delta: i64) -> bool {
    let mut ok = true;
    for s in done {
        let end = match s.state {
            State::Exited(code) => alloc::format!("exited with code {code}"),
            State::Stopped => "stopped by the hypervisor".into(),
            State::Runnable => "still runnable".into(),
        };
        let verdict = if s.as_expected() { "as expected" } else { "UNEXPECTED" };
        ok &= s.as_expected();
        // Why a run failed is a warning, so `log=warn` still shows it.
        match s.as_expected() {
            true => log::info!(target: B::NAME, "guest {} ({}): {end} ({verdict})", s.id, s.spec.name),
            false => log::warn!(target: B::NAME, "guest {} ({}): {end} ({verdict})", s.id, s.spec.name),
        }
        let mut line = alloc::string::String::new();
        for kind in ExitKind::ALL {
            let n = s.exits[kind as usize];
            if n > 0 {
                line.push_str(&alloc::format!(" {}={n}", kind.name()));
            }
        }
        log::info!(target: B::NAME, "guest {} ({}): exits:{line}", s.id, s.spec.name);
        if s.spec.vcpus > 1 {
            let mut vcpus = s.vcpus.clone();
            vcpus.sort_by_key(|v| v.index);
            for v in vcpus {
                let end = match v.state {
                    State::Exited(code) => alloc::format!("exited with code {code}"),
                    _ => "stopped".into(),
                };
                let mut line = alloc::string::String::new();
                for kind in ExitKind::ALL {
                    let n = v.exits[kind as usize];
                    if n > 0 {
                        line.push_str(&alloc::format!(" {}={n}", kind.name()));
                    }
                }
                log::info!(target: B::NAME, "guest {} ({}) vcpu {} on cpu {}: {end}; exits:{line}", s.id, s.spec.name, v.index, v.cpu);
            }
        }
    }
    let missing = -frames_delta.min(0);
    match missing {
        0 => log::info!(target: "alloc", "frames not returned after all guests ended: 0"),
        n => log::warn!(target: "alloc", "frames not returned after all guests ended: {n}"),
    }
    log::info!(target: "evt", "run.end frames_not_returned={missing}");
    ok && frames_delta >= 0
}
