//! Hypercall dispatch (ABI v1, `guest_lib::abi`). Every argument is checked here: guest
//! pointers are read through the guest's own second-level table, lengths are bounded, and
//! anything wrong is an error code in rax, never a fault in the hypervisor.

use super::guest::{Guest, State};
use super::morsels::Directory;
use super::{Backend, Regs};
use crate::frames::Frames;
use guest_lib::abi::{self, Error};

/// What the scheduler does after a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Yield,
    /// The guest asked to exit.
    Exit,
}

/// What hypercalls share across guests.
pub struct Context<B: Backend> {
    pub guest_count: u64,
    pub morsels: Directory<B::Format>,
    pub exmaps: super::exmap::Exmaps,
    pub frames: Frames,
}

/// Handles the hypercall in `regs` (already past the instruction), writing status and value.
pub fn handle<B: Backend>(guest: &mut Guest<B>, backend: &mut B, regs: &mut Regs, cx: &mut Context<B>) -> Action {
    let (nr, a0, a1, a2, a3, a4) = (regs.rax, regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8);
    let frames = cx.frames;
    let result = match nr {
        abi::HC_MORSEL_CREATE => cx.morsels.create(guest, &frames, [a0, a1, a2, a3]),
        abi::HC_MORSEL_OPEN => cx.morsels.open(guest, &frames, [a0, a1, a2]),
        abi::HC_MORSEL_UNMOUNT => cx.morsels.unmount(guest, backend, a0),
        abi::HC_MORSEL_DESTROY => cx.morsels.destroy(guest, &frames, [a0, a1]),
        abi::HC_MORSEL_SIZE => cx.morsels.size(guest, a0),
        abi::HC_MORSEL_STATS => {
            cx.morsels.log_stats();
            cx.exmaps.log_stats();
            Ok(0)
        }
        abi::HC_EXMAP_CREATE => cx.exmaps.create(&mut cx.morsels, guest, &frames, [a0, a1, a2, a3]),
        abi::HC_EXMAP_ACTION => cx.exmaps.action(&mut cx.morsels, guest, backend, &frames, [a0, a1, a2, a3]),
        abi::HC_EXMAP_INFO => cx.exmaps.info(&cx.morsels, guest, [a0, a1]),
        abi::HC_DEVICE_MOUNT => cx.morsels.device_mount(guest, &frames, [a0, a1, a2, a3, a4]),
        abi::HC_DEVICE_UNMOUNT => cx.morsels.device_unmount(guest, [a0, a1]),
        abi::HC_EDU_DMA => cx.morsels.edu_dma(guest, [a0, a1, a2]),
        abi::HC_NVME_READ => cx.morsels.nvme_io(guest, &frames, false, [a0, a1, a2, a3]),
        abi::HC_NVME_WRITE => cx.morsels.nvme_io(guest, &frames, true, [a0, a1, a2, a3]),
        abi::HC_INFO => info(guest, cx, a0),
        abi::HC_CONSOLE_WRITE => console_write(guest, a0, a1),
        abi::HC_EXIT => {
            let code = a0 as u32 as i32;
            guest.flush_console();
            log::info!(target: "vm", "guest {} ({}) exited with code {code}", guest.id, guest.spec.name);
            guest.state = State::Exited(code);
            return Action::Exit;
        }
        abi::HC_YIELD => {
            set(regs, Ok(0));
            return Action::Yield;
        }
        _ => Err(Error::NoSuchCall),
    };
    if let Err(e) = result {
        log::debug!(target: "vm", "guest {}: hypercall {nr:#x} failed: {e}", guest.id);
    }
    set(regs, result);
    Action::Continue
}

/// Answers a hypercall that is not handled at all (e.g. one from user mode) with `error`.
pub fn refuse(regs: &mut Regs, error: Error) {
    set(regs, Err(error));
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

fn info<B: Backend>(guest: &Guest<B>, cx: &Context<B>, what: u64) -> Result<u64, Error> {
    match what {
        abi::INFO_ABI_VERSION => Ok(abi::ABI_VERSION),
        abi::INFO_GUEST_ID => Ok(guest.id as u64),
        abi::INFO_MEMORY_SIZE => Ok(guest.spec.memory),
        abi::INFO_GUEST_COUNT => Ok(cx.guest_count),
        _ => Err(Error::NoSuchCall),
    }
}

fn console_write<B: Backend>(guest: &mut Guest<B>, ptr: u64, len: u64) -> Result<u64, Error> {
    if len > abi::CONSOLE_MAX {
        return Err(Error::TooLarge);
    }
    let mut buf = [0u8; abi::CONSOLE_MAX as usize];
    let buf = &mut buf[..len as usize];
    if ptr.checked_add(len).is_none() || !guest.read(ptr, buf) {
        return Err(Error::BadAddress);
    }
    guest.console(buf);
    Ok(len)
}
