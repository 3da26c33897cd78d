//! What the vCPU loop tells the user: why a misbehaving guest was stopped (guest, exit,
//! address), and the end-of-run table of how every guest and vCPU ended, with exit counts.

use super::guest::{Guest, State, Summary};
use super::{Backend, Exit, ExitKind};
use morsel::GuestPhysAddr;

/// Stops a misbehaving guest with a report naming the guest, the exit and the address.
pub(super) fn stop<B: Backend>(guest: &mut Guest<B>, exit: Exit, rip: u64) {
    guest.flush_console();
    let (id, name) = (guest.id, guest.spec.name);
    match exit {
        Exit::SecondLevelFault { gpa, write, fetch, .. } => {
            let access = if fetch { "fetch" } else if write { "write" } else { "read" };
            let what = match guest.mem.is_mapped(GuestPhysAddr::new(gpa)) {
                true if write => "violation of a read-only mapping".into(),
                true => "violation".into(),
                false => crate::morsels::exmap::describe_fault(guest, gpa).unwrap_or_else(|| "outside its memory".into()),
            };
            log::error!(target: "vm", "guest {id} ({name}) stopped: {access} {what} at guest-physical {gpa:#x}, RIP {rip:#x}");
        }
        Exit::Exception { vector: 14, error_code, address } => log::error!(target: "vm",
            "guest {id} ({name}) stopped: unhandled exception 14 #PF (error code {error_code:#x}), CR2 {address:#x}, RIP {rip:#x}"),
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
    guest.state = State::Stopped;
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
