//! Hypercall dispatch (ABI v1, `abi`). Every argument is checked here: guest
//! pointers are read through the guest's own second-level table, lengths are bounded, and
//! anything wrong is an error code in rax, never a fault in the hypervisor.

use super::guest::Guest;
use super::morsels::Directory;
use super::{Backend, Regs};
use crate::frames::Frames;
use abi::{self, Error};
use morsel::GuestPhysAddr;
use alloc::string::String;

/// Why the hypercall being handled was refused, in words the guest's author can act on; set
/// by the handler that refuses it (`refuse`), printed and cleared by `handle`. One slot per
/// CPU: a call runs on one CPU from start to end, so another CPU's refusal never mixes in.
#[allow(clippy::declare_interior_mutable_const)]
const NO_REASON: spin::Mutex<Option<String>> = spin::Mutex::new(None);
static REASON: [spin::Mutex<Option<String>>; crate::arch::ipi::MAX_CPUS] = [NO_REASON; crate::arch::ipi::MAX_CPUS];
/// Failed hypercalls per guest id (the first `LOUD_FAILURES` of each guest are logged at INFO,
/// later ones at DEBUG, so a guest that loops on a bad call does not flood the log).
static FAILURES: spin::Mutex<alloc::collections::BTreeMap<u32, u32>> = spin::Mutex::new(alloc::collections::BTreeMap::new());
const LOUD_FAILURES: u32 = 8;

/// `e`, with the reason (`format_args!`) that `handle` logs beside it.
pub fn refuse(e: Error, why: core::fmt::Arguments) -> Error {
    *REASON[crate::arch::ipi::me()].lock() = Some(alloc::format!("{why}"));
    e
}

/// The ABI name of hypercall `nr`.
fn call_name(nr: u64) -> &'static str {
    match nr {
        abi::HC_INFO => "info",
        abi::HC_CONSOLE_WRITE => "console_write",
        abi::HC_MORSEL_CREATE => "morsel_create",
        abi::HC_MORSEL_OPEN => "morsel_open",
        abi::HC_MORSEL_UNMOUNT => "morsel_unmount",
        abi::HC_MORSEL_DESTROY => "morsel_destroy",
        abi::HC_MORSEL_SIZE => "morsel_size",
        abi::HC_DEVICE_MOUNT => "device_mount",
        abi::HC_DEVICE_UNMOUNT => "device_unmount",
        abi::HC_EDU_DMA => "edu_dma",
        abi::HC_NVME_READ => "nvme_read",
        abi::HC_NVME_WRITE => "nvme_write",
        _ => "unknown call",
    }
}

/// What the scheduler does after a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Yield,
    /// The calling vCPU asked to exit, with this code.
    Exit(i32),
}

/// Which vCPU makes the call, on which CPU.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub vcpu: u32,
    pub cpu: usize,
}

/// What hypercalls share across guests. Lives in the run's `World`, behind its one lock
/// (`runqueue`): every hypercall, on any CPU, runs with that lock held, so the morsel
/// directory, device mounts, persistence records and ExMap state are only ever changed by
/// one CPU at a time; no guest instruction runs on a CPU while it holds the lock.
pub struct Context<B: Backend> {
    pub guest_count: u64,
    pub morsels: Directory<B::Format>,
    pub exmaps: super::exmap::Exmaps,
    pub frames: Frames,
}

/// Handles the hypercall in `regs` (already past the instruction), writing status and value.
pub fn handle<B: Backend>(guest: &mut Guest<B>, caller: Caller, backend: &mut B, regs: &mut Regs, cx: &mut Context<B>) -> Action {
    REASON[caller.cpu % crate::arch::ipi::MAX_CPUS].lock().take();
    let (nr, a0, a1, a2, a3, a4) = (regs.rax, regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8);
    let frames = cx.frames;
    let result = match nr {
        abi::HC_MORSEL_CREATE => cx.morsels.create(guest, &frames, [a0, a1, a2, a3]),
        abi::HC_MORSEL_OPEN => cx.morsels.open(guest, &frames, [a0, a1, a2]),
        abi::HC_MORSEL_UNMOUNT => cx.morsels.unmount(guest, backend, &frames, a0),
        abi::HC_MORSEL_DESTROY => cx.morsels.destroy(guest, &frames, [a0, a1]),
        abi::HC_MORSEL_SIZE => cx.morsels.size(guest, a0),
        abi::HC_MORSEL_STATS => {
            cx.morsels.log_stats();
            cx.exmaps.log_stats();
            super::shootdown::log_stats();
            Ok(0)
        }
        abi::HC_EXMAP_CREATE => cx.exmaps.create(&mut cx.morsels, guest, &frames, [a0, a1, a2, a3]),
        abi::HC_EXMAP_ACTION => cx.exmaps.action(&mut cx.morsels, guest, backend, &frames, [a0, a1, a2, a3]),
        abi::HC_EXMAP_INFO => cx.exmaps.info(&cx.morsels, guest, [a0, a1]),
        abi::HC_DEVICE_MOUNT => cx.morsels.device_mount(guest, &frames, [a0, a1, a2, a3, a4]),
        abi::HC_DEVICE_UNMOUNT => cx.morsels.device_unmount(guest, &frames, [a0, a1]),
        abi::HC_EDU_DMA => cx.morsels.edu_dma(guest, [a0, a1, a2]),
        abi::HC_NVME_READ => cx.morsels.nvme_io(guest, &frames, false, [a0, a1, a2, a3]),
        abi::HC_NVME_WRITE => cx.morsels.nvme_io(guest, &frames, true, [a0, a1, a2, a3]),
        abi::HC_INFO => info(guest, caller, cx, a0),
        abi::HC_CONSOLE_WRITE => console_write(guest, caller, a0, a1),
        abi::HC_EXIT => {
            let code = a0 as u32 as i32;
            guest.flush_console();
            match caller.vcpu {
                0 => log::info!(target: "vm", "guest {} ({}) exited with code {code}", guest.id, guest.spec.name),
                v => log::info!(target: "vm", "guest {} ({}) vcpu {v} exited with code {code}", guest.id, guest.spec.name),
            }
            return Action::Exit(code);
        }
        abi::HC_YIELD => {
            set(regs, Ok(0));
            return Action::Yield;
        }
        _ => Err(Error::NoSuchCall),
    };
    let reason = REASON[caller.cpu % crate::arch::ipi::MAX_CPUS].lock().take();
    if let Err(e) = result {
        let n = {
            let mut f = FAILURES.lock();
            let n = f.entry(guest.id).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let level = if n <= LOUD_FAILURES { log::Level::Info } else { log::Level::Debug };
        let why = reason.as_deref().unwrap_or("");
        let sep = if why.is_empty() { "" } else { ": " };
        log::log!(target: "vm", level, "guest {} ({}): {} ({nr:#x}) refused ({e}){sep}{why}{}",
            guest.id, guest.spec.name, call_name(nr), if n == LOUD_FAILURES { " (later refusals of this guest at log=debug)" } else { "" });
    }
    set(regs, result);
    Action::Continue
}

/// Answers a hypercall from guest user mode (CPL > 0) with `Denied` without handling it: the
/// guest kernel decides what its user mode may do.
pub fn deny_user_mode(regs: &mut Regs) {
    set(regs, Err(Error::Denied));
}

fn set(regs: &mut Regs, result: Result<u64, Error>) {
    match result {
        Ok(v) => {
            regs.rax = 0;
            regs.rdx = v;
        }
        Err(e) => {
            regs.rax = e as i64 as u64;
            regs.rdx = 0;
        }
    }
}

fn info<B: Backend>(guest: &Guest<B>, caller: Caller, cx: &Context<B>, what: u64) -> Result<u64, Error> {
    match what {
        abi::INFO_ABI_VERSION => Ok(abi::ABI_VERSION),
        abi::INFO_GUEST_ID => Ok(guest.id as u64),
        abi::INFO_MEMORY_SIZE => Ok(guest.spec.memory),
        abi::INFO_GUEST_COUNT => Ok(cx.guest_count),
        abi::INFO_LOG_LEVEL => Ok(log::max_level() as u64),
        abi::INFO_VCPU_INDEX => Ok(caller.vcpu as u64),
        abi::INFO_VCPU_COUNT => Ok(guest.spec.vcpus as u64),
        abi::INFO_CPU_INDEX => Ok(caller.cpu as u64),
        _ => Err(Error::NoSuchCall),
    }
}

fn console_write<B: Backend>(guest: &mut Guest<B>, caller: Caller, ptr: u64, len: u64) -> Result<u64, Error> {
    if len > abi::CONSOLE_MAX {
        return Err(Error::TooLarge);
    }
    let mut buf = [0u8; abi::CONSOLE_MAX as usize];
    let buf = &mut buf[..len as usize];
    guest.mem.read(GuestPhysAddr::new(ptr), buf)?;
    guest.console(caller.vcpu, buf);
    Ok(len)
}
