//! The vCPU loop, written once for both backends: guests run round-robin on this CPU, each
//! for a time slice or until it yields; a misbehaving guest is stopped and reported while
//! the others go on; at the end every guest's exit code and exit counts are printed.

use super::guest::{Guest, GuestSpec, State, Summary};
use super::hypercall::{self, Action, Context};
use crate::morsels::Directory;
use super::{Backend, Exit, ExitKind, Regs, Resume};
use formats::decode;
use morsel::GuestPhysAddr;
use crate::mm::frames::Frames;
use alloc::vec::Vec;
use formats::archive::Archive;

/// Length of a time slice.
pub const SLICE_US: u64 = 10_000;

/// The hypercall instruction whose length is decoded where the CPU does not report it
/// (only SVM lacks next-RIP save; VMCALL is `0f 01 c1`).
const VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

/// Runs the guests `specs` from `archive` to completion; true if every guest ended as expected.
pub fn run_guests<B: Backend>(backend: &mut B, frames: &Frames, archive: Archive, specs: &[GuestSpec], drivers: super::Drivers) -> bool {
    let free_before = frames.free_frames();
    let mut guests: Vec<Option<Guest<B>>> = Vec::new();
    let mut done: Vec<Summary> = Vec::new();
    let mut all_created = true;
    for (id, spec) in specs.iter().enumerate() {
        let Some(image) = archive.get(spec.name) else {
            log::error!(target: "vm", "guest {id} ({}): no such guest in the boot archive", spec.name);
            all_created = false;
            continue;
        };
        match Guest::create(id as u32, *spec, image, backend, frames) {
            Ok(g) => {
                log::info!(target: "vm", "guest {id} ({}): {} MiB, image {} KiB, started",
                    spec.name, spec.memory >> 20, image.len() / 1024);
                guests.push(Some(g));
            }
            Err(e) => {
                log::error!(target: "vm", "guest {id} ({}): cannot create: {e}", spec.name);
                all_created = false;
            }
        }
    }
    let mut cx = Context {
        guest_count: guests.len() as u64,
        morsels: Directory::new(drivers.pmem),
        exmaps: Default::default(),
        devices: drivers.devices,
        frames: *frames,
        notify: Default::default(),
    };
    cx.morsels.load_persistent();
    let mut live = guests.len();
    while live > 0 {
        let mut ran = false;
        for slot in guests.iter_mut() {
            let Some(guest) = slot else { continue };
            // notify hook: a waiting vCPU is not run (vm/notify.rs).
            if cx.notify.ready(guest) {
                run_slice(backend, guest, &mut cx);
                ran = true;
            }
            if guest.state != State::Runnable {
                cx.morsels.drop_mounts(guest, backend, cx.devices.as_mut(), frames);
                cx.exmaps.guest_ended(guest.id, frames);
                cx.notify.guest_ended(guest.id);
                if let Some(g) = slot.take() {
                    done.push(g.destroy(backend, frames));
                }
                live -= 1;
            }
        }
        // notify hook: every live vCPU waits: halt until a deadline or report a deadlock.
        if !ran && live > 0 {
            cx.notify.idle(&mut guests);
        }
    }
    cx.notify.log_stats();
    cx.morsels.log_stats();
    cx.exmaps.log_stats();
    cx.morsels.destroy_all(cx.devices.as_mut(), frames);
    report::<B>(&done, frames.free_frames() as i64 - free_before as i64) && all_created
}

/// Runs `guest` until its slice ends, it yields, exits or is stopped. The slice is a budget
/// of time across exits: every exit the hypervisor handles in place (hypercall, CPUID) is
/// charged to it, so a guest that loops on them is preempted like one that spins.
fn run_slice<B: Backend>(backend: &mut B, guest: &mut Guest<B>, cx: &mut Context<B>) {
    let per_us = crate::platform::time::tsc_per_us().max(1);
    let deadline = crate::platform::time::tsc() + SLICE_US * per_us;
    loop {
        let Some(vcpu) = guest.vcpu.as_mut() else { return };
        let now = crate::platform::time::tsc();
        if now >= deadline {
            let rip = B::regs(vcpu).rip;
            end_slice(guest, rip);
            return;
        }
        cx.exmaps.before_run(guest, backend);
        // notify hook: inject a pending virtual interrupt or ask for a window (vm/notify.rs).
        cx.notify.before_run(guest);
        let Some(vcpu) = guest.vcpu.as_mut() else { return };
        let exit = backend.run(vcpu, (deadline - now).div_ceil(per_us));
        let cr3 = B::guest_cr3(vcpu);
        let mut regs = *B::regs(vcpu);
        guest.exits[exit.kind() as usize] += 1;
        let go_on = match exit {
            Exit::Hypercall { resume, cpl } => match resume_at(guest, &regs, cr3, resume, &VMMCALL) {
                None => false,
                Some(next_rip) => {
                    regs.rip = next_rip;
                    if cpl == 0 {
                        hypercall::handle(guest, backend, &mut regs, cx) == Action::Continue
                    } else {
                        hypercall::deny_user_mode(&mut regs);
                        true
                    }
                }
            },
            Exit::Cpuid { resume } => match resume_at(guest, &regs, cr3, resume, &[0x0f, 0xa2]) {
                None => false,
                Some(next_rip) => {
                    // CPUID has no side effects; the guest sees the host's leaves.
                    let r = core::arch::x86_64::__cpuid_count(regs.rax as u32, regs.rcx as u32);
                    (regs.rax, regs.rbx, regs.rcx, regs.rdx) = (r.eax as u64, r.ebx as u64, r.ecx as u64, r.edx as u64);
                    regs.rip = next_rip;
                    true
                }
            },
            Exit::Halt { interrupts: false, .. } => {
                // No interrupt is ever delivered to it: on hardware it would halt forever.
                guest.flush_console();
                log::error!(target: "vm", "guest {} ({}) stopped: HLT with interrupts disabled would never wake, RIP {:#x}",
                    guest.id, guest.spec.name, regs.rip);
                guest.state = State::Stopped;
                false
            }
            Exit::Halt { resume, interrupts: true } => {
                // A yield that still pays for its slice: halting in a loop uses the budget.
                if let Some(next_rip) = resume_at(guest, &regs, cr3, resume, &[0xf4]) {
                    regs.rip = next_rip;
                    end_slice(guest, regs.rip);
                }
                false
            }
            Exit::Preempted => {
                check_budget(guest, regs.rip);
                false
            }
            // notify hook: the guest can take its interrupt now; the next entry injects it.
            Exit::InterruptWindow => true,
            other => {
                stop(guest, other, regs.rip);
                false
            }
        };
        if let Some(vcpu) = guest.vcpu.as_mut() {
            *B::regs(vcpu) = regs;
        }
        if !go_on || guest.state != State::Runnable {
            return;
        }
    }
}

/// Ends the slice of a guest that used it up without a timer exit (hypercall or CPUID loops,
/// HLT): counted as a preemption, so `slices=N` sees it.
fn end_slice<B: Backend>(guest: &mut Guest<B>, rip: u64) {
    guest.exits[ExitKind::Preempted as usize] += 1;
    check_budget(guest, rip);
}

/// Stops the guest once it has used its budget of slices.
fn check_budget<B: Backend>(guest: &mut Guest<B>, rip: u64) {
    let slices = guest.exits[ExitKind::Preempted as usize];
    if guest.spec.max_slices.is_some_and(|max| slices >= max) {
        guest.flush_console();
        log::error!(target: "vm", "guest {} ({}) stopped: used its budget of {slices} time slices, RIP {rip:#x}",
            guest.id, guest.spec.name);
        guest.state = State::Stopped;
    }
}

/// Where the guest continues after the instruction `opcode` at its RIP: what the CPU said,
/// or the length decoded from guest memory. A guest whose instruction cannot be read or is
/// not the one that exited is stopped (None).
fn resume_at<B: Backend>(guest: &mut Guest<B>, regs: &Regs, cr3: Option<u64>, resume: Resume, opcode: &[u8]) -> Option<u64> {
    if let Resume::At(rip) = resume {
        return Some(rip);
    }
    let mut bytes = [0u8; decode::MAX_INSTRUCTION];
    let mut got = 0;
    if let Some(cr3) = cr3 {
        let entry = |gpa: u64| guest.mem.read_u64(GuestPhysAddr::new(gpa)).ok();
        while got < bytes.len() {
            let va = regs.rip.wrapping_add(got as u64);
            let Some(gpa) = decode::translate(cr3, va, entry) else { break };
            if guest.mem.read(GuestPhysAddr::new(gpa), &mut bytes[got..got + 1]).is_err() {
                break;
            }
            got += 1;
        }
    }
    if let Some(len) = decode::length_of(&bytes[..got], opcode) {
        return Some(regs.rip.wrapping_add(len as u64));
    }
    guest.flush_console();
    log::error!(target: "vm", "guest {} ({}) stopped: the instruction at RIP {:#x} cannot be decoded ({} bytes readable: {:02x?})",
        guest.id, guest.spec.name, regs.rip, got, &bytes[..got]);
    guest.state = State::Stopped;
    None
}

/// Stops a misbehaving guest with a report naming the guest, the exit and the address.
fn stop<B: Backend>(guest: &mut Guest<B>, exit: Exit, rip: u64) {
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
fn report<B: Backend>(done: &[Summary], frames_delta: i64) -> bool {
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
    }
    match -frames_delta.min(0) {
        0 => log::info!(target: "alloc", "frames not returned after all guests ended: 0"),
        n => log::warn!(target: "alloc", "frames not returned after all guests ended: {n}"),
    }
    ok && frames_delta >= 0
}
