//! A guest's life as far as it touches no hardware: what the command line asks of it
//! ([`GuestSpec`]), the checks before it is built ([`check_memory`], [`image_limit`]), where it
//! is in its life ([`State`]) and how its vCPUs' ends make its own ([`Ends`]: the exit code,
//! the last vCPU), what the end-of-run report needs ([`Summary`]), its address space
//! ([`GuestSpace`]: its memory and mounts, behind the guest's own lock in the hypervisor) and
//! its RAM's fixed frames, which its vCPUs read with no lock held ([`RamFrames`]).
//! Host-tested (`tests.rs`); the hypervisor's `vm/guest.rs` builds the guest from these with
//! its backend, allocator and console.

use crate::directory::{Mounts, Space};
use crate::memory::{DataMem, GuestMemory};
use crate::vcpu::ExitKind;
use alloc::vec::Vec;
use morsel::{Format, GuestPhysAddr, HostPhysAddr};

#[cfg(test)]
mod tests;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Guest RAM comes in frames of this size (`GuestMemory::map_ram`).
const FRAME: u64 = 2 * MIB;

/// What the command line asks of a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    pub name: &'static str,
    pub memory: u64,
    /// Stop the guest after this many preemptions (a CPU-time budget), if set.
    pub max_slices: Option<u64>,
    /// A number handed to the guest in its boot information (`:arg=N`).
    pub arg: u64,
    /// The run counts as a success only if the guest ends this way.
    pub expect: Expect,
    /// vCPUs (`:vcpus=N`, default 1).
    pub vcpus: u32,
    /// Every vCPU of the guest runs on this CPU (`:cpu=K`), else they are spread.
    pub cpu: Option<usize>,
}

/// How a guest is expected to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Code(i32),
    /// Stopped by the hypervisor for misbehaving.
    Stopped,
}

/// Where a guest is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Runnable,
    Exited(i32),
    /// Stopped by the hypervisor; the reason was reported when it happened.
    Stopped,
}

/// The guest RAM sizes a guest may ask for: a multiple of 2 MiB from 4 MiB to 512 GiB.
pub fn check_memory(memory: u64) -> Result<(), u64> {
    match memory.is_multiple_of(FRAME) && (4 * MIB..=512 * GIB).contains(&memory) {
        true => Ok(()),
        false => Err(memory),
    }
}

/// The end of the guest RAM its image may fill: below each vCPU's stack reserve
/// (`abi::VCPU_STACK_RESERVE`, vCPU v's stack starting `v` reserves below the top).
pub fn image_limit(spec: &GuestSpec) -> u64 {
    spec.memory.saturating_sub(abi::VCPU_STACK_RESERVE * spec.vcpus.max(1) as u64)
}

/// How one vCPU ended, on which CPU, with its own exit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuSummary {
    pub index: u32,
    pub cpu: usize,
    pub state: State,
    pub exits: [u64; ExitKind::COUNT],
}

/// A finished guest: what the final report needs.
#[derive(Clone, Debug)]
pub struct Summary {
    pub id: u32,
    pub spec: GuestSpec,
    pub state: State,
    pub exits: [u64; ExitKind::COUNT],
    /// Per vCPU, in the order they ended.
    pub vcpus: Vec<VcpuSummary>,
}

impl Summary {
    /// Whether the guest ended the way the command line expected.
    pub fn as_expected(&self) -> bool {
        match (self.spec.expect, self.state) {
            (Expect::Code(want), State::Exited(got)) => want == got,
            (Expect::Stopped, State::Stopped) => true,
            _ => false,
        }
    }
}

/// The heap had no room for a guest's bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoMemory;

/// A guest's vCPUs' ends: how many are left, the exit code the guest ends with, and each
/// one's summary (room for all of them taken at creation: recording an end never allocates).
#[derive(Debug)]
pub struct Ends {
    /// vCPUs not yet ended.
    pub live: u32,
    /// The exit code the guest ends with: vCPU 0's, unless another vCPU exited non-zero first.
    pub code: Option<i32>,
    /// Per vCPU, in the order they ended.
    pub ended: Vec<VcpuSummary>,
}

impl Ends {
    /// The ends of a guest with `vcpus` vCPUs.
    pub fn try_new(vcpus: u32) -> Result<Ends, NoMemory> {
        let mut ended = Vec::new();
        ended.try_reserve_exact(vcpus as usize).map_err(|_| NoMemory)?;
        Ok(Ends { live: vcpus, code: None, ended })
    }

    /// vCPU `v` ended: its code counts (vCPU 0's, or a non-zero one of another if none was
    /// recorded that is non-zero), and the last one's end makes a runnable guest `Exited` with
    /// that code (a stopped guest stays stopped). True if it was the last.
    pub fn vcpu_ended(&mut self, state: &mut State, v: VcpuSummary) -> bool {
        if let State::Exited(code) = v.state {
            if v.index == 0 || code != 0 {
                self.code = Some(match self.code {
                    Some(c) if c != 0 => c,
                    _ => code,
                });
            }
        }
        // Room for every vCPU was reserved at creation: this never allocates.
        if self.ended.len() < self.ended.capacity() {
            self.ended.push(v);
        }
        self.live = self.live.saturating_sub(1);
        if self.live == 0 && *state == State::Runnable {
            *state = State::Exited(self.code.unwrap_or(0));
        }
        self.live == 0
    }
}

/// A guest's second-level table (its RAM, mapped at creation and fixed, and the window
/// where morsels are mounted) and the list of those mounts: behind the guest's own lock
/// in the hypervisor (`Guest::space`), taken after the world lock and the directory's,
/// never held while a guest runs or while another lock is waited for. Reads of guest memory
/// through the table (names and buffers in mounted morsels) hold it too, so a mount cannot
/// go away under a copy.
pub struct GuestSpace<F: Format<Input = GuestPhysAddr>, M: DataMem> {
    pub mem: GuestMemory<F, M>,
    /// Morsels mounted in this guest's window.
    pub mounts: Mounts,
}

impl<F: Format<Input = GuestPhysAddr>, M: DataMem> GuestSpace<F, M> {
    /// The guest `guest` as the morsel directory sees it: its id, its second-level table,
    /// its mounts.
    pub fn view(&mut self, guest: u32) -> Space<'_, F> {
        Space { guest, table: self.mem.table_mut(), mounts: &mut self.mounts }
    }
}

/// The host frame of each 2 MiB of guest RAM ([0, memory)), recorded once the RAM is mapped
/// and fixed until the guest is destroyed: what its vCPUs read guest RAM through with no
/// lock held (console lines, names read ahead). Mounted morsels are not here: those change
/// under the guest's lock.
#[derive(Debug, Default)]
pub struct RamFrames {
    memory: u64,
    frames: Vec<HostPhysAddr>,
}

impl RamFrames {
    /// The frames of `memory` bytes of RAM mapped in `mem` (each 2 MiB translated once).
    pub fn record<F: Format<Input = GuestPhysAddr>, M: DataMem>(mem: &GuestMemory<F, M>, memory: u64) -> Result<RamFrames, NoMemory> {
        let mut frames = Vec::new();
        frames.try_reserve_exact(memory.div_ceil(FRAME) as usize).map_err(|_| NoMemory)?;
        let mut gpa = 0;
        while gpa < memory {
            let (hpa, _) = mem.translate(GuestPhysAddr::new(gpa), morsel::Perm::RW).map_err(|_| NoMemory)?;
            frames.push(hpa);
            gpa += FRAME;
        }
        Ok(RamFrames { memory, frames })
    }

    /// `len` bytes of guest RAM at `gpa` as host-contiguous pieces, `each(hpa, n, offset)`
    /// in order; None, and nothing done, unless the whole range lies in guest RAM.
    pub fn pieces(&self, gpa: u64, len: usize, mut each: impl FnMut(HostPhysAddr, usize, usize)) -> Option<()> {
        let end = gpa.checked_add(len as u64)?;
        if end > self.memory || end.div_ceil(FRAME) > self.frames.len() as u64 {
            return None;
        }
        let mut done = 0;
        while done < len {
            let at = gpa + done as u64;
            let frame = *self.frames.get((at / FRAME) as usize)?;
            let off = at % FRAME;
            let n = ((FRAME - off) as usize).min(len - done);
            each(HostPhysAddr::new(frame.as_u64() + off), n, done);
            done += n;
        }
        Some(())
    }
}
