//! A guest's life: created from its spec (memory, loader, vCPU), run, and destroyed; what
//! happened to it (state, exit counts) and what the end-of-run report needs (`Summary`).
//! Its memory is `memory::GuestMemory`, its loading `loader`, its console `console`.

use super::console::Console;
use super::loader::{self, Load, STACK_RESERVE};
use super::memory::{GuestMemory, MapError};
use super::{Backend, BackendError, ExitKind};
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

/// Why a guest could not be created.
#[derive(Debug)]
pub enum CreateError {
    BadMemorySize(u64),
    NoMemory,
    Image(elf::Error),
    Table(morsel::Error),
    Backend(BackendError),
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            CreateError::BadMemorySize(m) => write!(f, "memory size {m:#x} must be a multiple of 2 MiB between 4 MiB and 512 GiB"),
            CreateError::NoMemory => write!(f, "out of host memory"),
            CreateError::Image(e) => write!(f, "bad image: {e}"),
            CreateError::Table(e) => write!(f, "second-level table: {e}"),
            CreateError::Backend(e) => write!(f, "vCPU: {e}"),
        }
    }
}

/// A finished guest: what the final report needs.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub id: u32,
    pub spec: GuestSpec,
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

/// A running guest.
pub struct Guest<B: Backend> {
    pub id: u32,
    pub spec: GuestSpec,
    pub mem: GuestMemory<B::Format>,
    pub vcpu: Option<B::Vcpu>,
    pub state: State,
    pub exits: [u64; ExitKind::COUNT],
    /// Morsels mounted in this guest's window.
    pub mounts: alloc::vec::Vec<crate::morsels::Mount>,
    console: Console,
    /// Why the hypercall being handled was refused, in words the guest's author can act on:
    /// set by the handler (`refuse`), logged and cleared by the dispatcher.
    pub refusal: Option<alloc::string::String>,
    /// Refused hypercalls so far (the first few are logged at INFO, the rest at DEBUG).
    pub refusals: u32,
    /// The exception vectors this guest takes through its own IDT (`guest_exceptions`).
    pub handled_exceptions: u32,
}

impl<B: Backend> Guest<B> {
    /// Builds the guest's memory, loads `image`, and creates its vCPU.
    pub fn create(
        id: u32,
        spec: GuestSpec,
        image: &[u8],
        backend: &mut B,
        frames: &Frames,
    ) -> Result<Self, CreateError> {
        if !spec.memory.is_multiple_of(2 * MIB) || !(4 * MIB..=512 * GIB).contains(&spec.memory) {
            return Err(CreateError::BadMemorySize(spec.memory));
        }
        let image = elf::Image::parse(image, abi::IMAGE_BASE_GPA, spec.memory - STACK_RESERVE)
            .map_err(CreateError::Image)?;
        let mem = GuestMemory::new(frames).map_err(CreateError::Table)?;
        let mut g = Guest {
            id,
            spec,
            mem,
            vcpu: None,
            state: State::Runnable,
            exits: [0; ExitKind::COUNT],
            mounts: alloc::vec::Vec::new(),
            console: Console::new(),
            refusal: None,
            refusals: 0,
            handled_exceptions: 0,
        };
        let load = Load { id, name: spec.name, memory: spec.memory, arg: spec.arg };
        let built = loader::load(&mut g.mem, &image, &load, frames)
            .map_err(|e| match e {
                MapError::NoMemory => CreateError::NoMemory,
                MapError::Table(e) => CreateError::Table(e),
            })
            .and_then(|setup| backend.create_vcpu(&setup, frames).map_err(CreateError::Backend));
        match built {
            Ok(vcpu) => g.vcpu = Some(vcpu),
            Err(e) => {
                let _ = g.destroy(backend, frames);
                return Err(e);
            }
        }
        Ok(g)
    }

    /// `e`, with the reason (`format_args!`) the dispatcher logs beside it.
    pub fn refuse(&mut self, e: abi::Error, why: core::fmt::Arguments) -> abi::Error {
        self.refusal = Some(alloc::format!("{why}"));
        e
    }

    /// Appends console bytes; complete lines are printed with the guest's prefix.
    pub fn console(&mut self, bytes: &[u8]) {
        self.console.write(bytes, self.id, self.spec.name);
    }

    /// Prints a pending partial line.
    pub fn flush_console(&mut self) {
        self.console.flush(self.id, self.spec.name);
    }

    /// What is left of the guest after `destroy`.
    pub fn summary(&self) -> Summary {
        Summary { id: self.id, spec: self.spec, state: self.state, exits: self.exits }
    }

    /// Gives everything back: vCPU, guest RAM, tables.
    pub fn destroy(mut self, backend: &mut B, frames: &Frames) -> Summary {
        if let Some(v) = self.vcpu.take() {
            backend.destroy_vcpu(v, frames);
        }
        let summary = self.summary();
        if let Err(e) = self.mem.release(frames) {
            log::error!(target: "vm", "guest {}: tables not freed: {e}", self.id);
        }
        summary
    }
}
