//! A guest's life: created from its spec (memory, loader, vCPU), run, and destroyed; what
//! happened to it (state, exit counts) and what the end-of-run report needs (`Summary`).
//! Its memory is `memory::GuestMemory`, its loading `loader`, its console `console`.

use super::console::Console;
use super::loader::{self, Load, STACK_RESERVE};
use super::memory::{GuestMemory, MapError};
use super::{Backend, ExitKind, VcpuSetup};
use crate::mm::frames::Frames;
use formats::elf;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// What the command line asks of a guest.
#[derive(Clone, Copy, Debug)]
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

/// The most vCPUs a guest may have.
pub const MAX_VCPUS: u32 = 16;

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

/// Why a guest could not be created.
#[derive(Debug)]
pub enum CreateError {
    BadMemorySize(u64),
    NoMemory,
    Image(elf::Error),
    Table(morsel::Error),
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            CreateError::BadMemorySize(m) => write!(f, "memory size {} must be a multiple of 2 MiB between 4 MiB and 512 GiB", formats::units::Bytes(*m)),
            CreateError::NoMemory => write!(f, "out of host memory"),
            CreateError::Image(e) => write!(f, "bad image: {e}"),
            CreateError::Table(e) => write!(f, "second-level table: {e}"),
        }
    }
}

/// A finished guest: what the final report needs.
#[derive(Clone, Debug)]
pub struct Summary {
    pub id: u32,
    pub spec: GuestSpec,
    pub state: State,
    pub exits: [u64; ExitKind::COUNT],
    /// Per vCPU, in the order they ended.
    pub vcpus: alloc::vec::Vec<VcpuSummary>,
}

/// How one vCPU ended, on which CPU, with its own exit counts.
#[derive(Clone, Copy, Debug)]
pub struct VcpuSummary {
    pub index: u32,
    pub cpu: usize,
    pub state: State,
    pub exits: [u64; ExitKind::COUNT],
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

/// A running guest: what its vCPUs share (all of it behind the run's world lock,
/// `sched::World`). The vCPUs themselves (VMCS/VMCB) live in the run queue of the CPU that
/// created them.
pub struct Guest<B: Backend> {
    pub id: u32,
    pub spec: GuestSpec,
    pub mem: GuestMemory<B::Format>,
    /// Runnable while any vCPU may run; Exited when the last vCPU exited; Stopped as soon as
    /// one vCPU misbehaved (the others are kicked and stop at their next exit).
    pub state: State,
    /// All vCPUs together (the slice budget counts these).
    pub exits: [u64; ExitKind::COUNT],
    /// Morsels mounted in this guest's window.
    pub mounts: alloc::vec::Vec<crate::morsels::Mount>,
    /// vCPUs not yet ended.
    pub live_vcpus: u32,
    /// CPUs (bit per index) that ran a vCPU of this guest: the shootdown's targets. Sticky:
    /// a superset of those that may cache its translations.
    pub ran_on: u64,
    /// The exit code the guest ends with: vCPU 0's, unless another vCPU exited non-zero first.
    pub code: Option<i32>,
    pub ended: alloc::vec::Vec<VcpuSummary>,
    /// One console line buffer per vCPU: lines of different vCPUs never mix.
    consoles: alloc::vec::Vec<Console>,
    /// Why the hypercall being handled was refused, in words the guest's author can act on:
    /// set by the handler (`refuse`), logged and cleared by the dispatcher (under the world
    /// lock, so one call at a time).
    pub refusal: Option<alloc::string::String>,
    /// Refused hypercalls so far (the first few are logged at INFO, the rest at DEBUG).
    pub refusals: u32,
    /// The exception vectors this guest takes through its own IDT (`guest_exceptions`).
    pub handled_exceptions: u32,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend> Guest<B> {
    /// Builds the guest's memory and loads `image`; returns it with the initial state of each
    /// of its vCPUs (which the CPUs they are placed on create).
    pub fn create(
        id: u32,
        spec: GuestSpec,
        image: &[u8],
        frames: &Frames,
    ) -> Result<(Self, alloc::vec::Vec<VcpuSetup>), CreateError> {
        if !spec.memory.is_multiple_of(2 * MIB) || !(4 * MIB..=512 * GIB).contains(&spec.memory) {
            return Err(CreateError::BadMemorySize(spec.memory));
        }
        let stacks = STACK_RESERVE * spec.vcpus.max(1) as u64;
        let image = elf::Image::parse(image, abi::IMAGE_BASE_GPA, spec.memory.saturating_sub(stacks))
            .map_err(CreateError::Image)?;
        let mem = GuestMemory::new(frames).map_err(CreateError::Table)?;
        let mut consoles = alloc::vec::Vec::new();
        consoles.resize_with(spec.vcpus.max(1) as usize, Console::new);
        let mut g = Guest {
            id,
            spec,
            mem,
            state: State::Runnable,
            exits: [0; ExitKind::COUNT],
            mounts: alloc::vec::Vec::new(),
            live_vcpus: spec.vcpus.max(1),
            ran_on: 0,
            code: None,
            ended: alloc::vec::Vec::new(),
            consoles,
            refusal: None,
            refusals: 0,
            handled_exceptions: 0,
            _backend: core::marker::PhantomData,
        };
        let load = Load { id, name: spec.name, memory: spec.memory, arg: spec.arg, vcpus: spec.vcpus.max(1) };
        match loader::load(&mut g.mem, &image, &load, frames) {
            Ok(first) => {
                let setups = (0..spec.vcpus.max(1) as u64)
                    .map(|v| VcpuSetup { rsp: first.rsp - v * STACK_RESERVE, rsi: v, ..first })
                    .collect();
                Ok((g, setups))
            }
            Err(e) => {
                let _ = g.destroy(frames);
                Err(match e {
                    MapError::NoMemory => CreateError::NoMemory,
                    MapError::Table(e) => CreateError::Table(e),
                })
            }
        }
    }

    /// A vCPU of this guest ended (its control structures are gone); true if it was the last.
    pub fn vcpu_ended(&mut self, v: VcpuSummary) -> bool {
        if let State::Exited(code) = v.state {
            if v.index == 0 || code != 0 {
                self.code = Some(match self.code {
                    Some(c) if c != 0 => c,
                    _ => code,
                });
            }
        }
        self.ended.push(v);
        self.live_vcpus = self.live_vcpus.saturating_sub(1);
        if self.live_vcpus == 0 && self.state == State::Runnable {
            self.state = State::Exited(self.code.unwrap_or(0));
        }
        self.live_vcpus == 0
    }

    /// `e`, with the reason (`format_args!`) the dispatcher logs beside it.
    pub fn refuse(&mut self, e: abi::Error, why: core::fmt::Arguments) -> abi::Error {
        self.refusal = Some(alloc::format!("{why}"));
        e
    }

    /// Appends console bytes of vCPU `vcpu`; complete lines are printed with the guest's prefix.
    pub fn console(&mut self, vcpu: u32, bytes: &[u8]) {
        let (id, name) = (self.id, self.spec.name);
        if let Some(c) = self.consoles.get_mut(vcpu as usize) {
            c.write(bytes, id, name, vcpu);
        }
    }

    /// Prints the pending partial lines.
    pub fn flush_console(&mut self) {
        let (id, name) = (self.id, self.spec.name);
        for (v, c) in self.consoles.iter_mut().enumerate() {
            c.flush(id, name, v as u32);
        }
    }

    /// What is left of the guest after `destroy`.
    pub fn summary(&self) -> Summary {
        Summary { id: self.id, spec: self.spec, state: self.state, exits: self.exits, vcpus: self.ended.clone() }
    }

    /// Gives guest RAM and tables back (every vCPU is gone).
    pub fn destroy(self, frames: &Frames) -> Summary {
        let summary = self.summary();
        if let Err(e) = self.mem.release(frames) {
            log::error!(target: "vm", "guest {}: tables not freed: {e}", self.id);
        }
        summary
    }
}
