//! A guest's life: created from its spec (memory, loader, vCPU), run, and destroyed; what
//! happened to it (state, exit counts) and what the end-of-run report needs (`Summary`).
//! What of this touches no hardware is `vmcore::guest` (host-tested: the spec's checks, the
//! vCPUs' ends and the exit code, the report's verdict, the address space, RAM's fixed
//! frames); this file builds a guest from those with the backend, the allocator and the
//! console. Its memory is `memory::GuestMemory`, its loading `loader`, its console `console`.

use super::console::Console;
use super::loader::{self, Load, STACK_RESERVE};
use super::memory::{GuestMemory, MapError};
use super::{Backend, ExitKind, VcpuSetup};
use crate::mm::frames::Frames;
use alloc::sync::Arc;
use alloc::vec::Vec;
use formats::elf;
use vmcore::guestbytes::GuestBytes;


pub use vmcore::guest::{Expect, GuestSpec, State, Summary, VcpuSummary};

/// The most vCPUs a guest may have.
pub const MAX_VCPUS: u32 = 16;
/// Guests in one run (the command line refuses more): the morsel directory is sized for every
/// guest's whole `abi::MORSEL_QUOTA` (`morsels::Directory::new`), and what each guest may make
/// the hypervisor keep (mounts, device mounts, ExMap state) times this fits the heap
/// (`platform/heap.rs`).
pub const MAX_GUESTS: usize = 64;

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

/// What a guest's vCPUs read with no world lock held (`sched::lockless`): values fixed at
/// creation (identity, RAM size and frames) and the console line buffers, each behind its
/// own small lock (`Console` lock, taken after the world lock where both are held, before
/// the serial lock: `docs/src/smp.md`).
pub struct Shared {
    pub id: u32,
    pub name: &'static str,
    /// Guest RAM in bytes ([0, memory), all read-write).
    pub memory: u64,
    pub vcpus: u32,
    /// The host frame of each 2 MiB of guest RAM: mapped at creation, freed at destroy
    /// (after the last vCPU ended), never remapped in between.
    ram: vmcore::guest::RamFrames,
    /// One line buffer per vCPU: lines of different vCPUs never mix, and a line is printed
    /// whole under the serial lock.
    consoles: Vec<spin::Mutex<Console>>,
    /// `Guest::ran_on` as the lock-free path reads it (`note_ran`, `ran_on`).
    ran_on: core::sync::atomic::AtomicU64,
    /// Bumped under the world lock by every change to what its vCPUs' slice starts decide
    /// (`Guest::stop`, a new exception bitmap, notify's raised vectors, waits and timers),
    /// before the IPIs that tell their CPUs: a slice starts without the world lock only
    /// while it did not move (`vmcore::gate`, `sched::start_alone`).
    pub epoch: &'static vmcore::gate::Epoch,
    /// The guest has a budget of slices (`GuestSpec::max_slices`): its slices always start
    /// under the world lock, which counts them.
    pub budgeted: bool,
}

impl Shared {
    /// CPU `cpu` is about to run a vCPU of this guest (`sched::prepare`, beside
    /// `Guest::ran_on`). SeqCst: ordered before that vCPU's first guest instruction (the
    /// entry is serializing), against `ran_on` after a batch's cleared leaves.
    pub fn note_ran(&self, cpu: usize) {
        let bit = 1u64 << (cpu % 64);
        if self.ran_on.load(core::sync::atomic::Ordering::Relaxed) & bit == 0 {
            self.ran_on.fetch_or(bit, core::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The CPUs that ran a vCPU of this guest, read after everything this CPU wrote before
    /// (a SeqCst fence): a CPU whose bit is not seen here enters the guest only after that,
    /// so its walks see those writes (a batch's cleared leaves).
    pub fn ran_on(&self) -> u64 {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.ran_on.load(core::sync::atomic::Ordering::SeqCst)
    }

    /// `len` bytes of guest RAM at `gpa` as host pieces, `each(piece, offset)`; None (nothing
    /// done) unless the whole range lies in guest RAM. Morsel mounts are not looked at:
    /// those change under the world lock.
    pub fn ram_pieces(&self, gpa: u64, len: usize, mut each: impl FnMut(GuestBytes, usize)) -> Option<()> {
        self.ram.pieces(gpa, len, |hpa, n, done| {
            // SAFETY: inside a 2 MiB RAM frame that this guest owns until it is destroyed
            // after its last vCPU ended (the caller runs one of its vCPUs).
            each(unsafe { crate::mm::frames::guest_bytes(hpa.as_u64(), n) }, done)
        })
    }

    /// Appends console bytes of vCPU `vcpu` under its line buffer's lock; complete lines
    /// are printed with the guest's prefix.
    pub fn console(&self, vcpu: u32, bytes: &[u8]) {
        if let Some(c) = self.consoles.get(vcpu as usize) {
            c.lock().write(bytes, self.id, self.name, vcpu);
        }
    }
}

/// A guest's second-level table and its mounts (`vmcore::guest::GuestSpace`) over the
/// identity map: behind the guest's own lock (`Guest::space`), taken after the world lock and
/// the directory's (`morsels::Directory`), never held while a guest runs or while another
/// lock is waited for.
pub type GuestSpace<F> = vmcore::guest::GuestSpace<F, crate::mm::frames::Identity>;

/// A running guest: what its vCPUs share (all of it behind the run's world lock,
/// `sched::World`). The vCPUs themselves (VMCS/VMCB) live in the run queue of the CPU that
/// created them.
pub struct Guest<B: Backend> {
    pub id: u32,
    pub spec: GuestSpec,
    /// Its second-level table and the morsels mounted in it, behind the guest's own lock
    /// (`GuestSpace`): reached under the world lock here, and without it by its vCPUs
    /// (`sched::Slot::space`: `morsel_open` / `morsel_unmount` of plain morsels).
    pub space: Arc<spin::Mutex<GuestSpace<B::Format>>>,
    /// Runnable while any vCPU may run; Exited when the last vCPU exited; Stopped as soon as
    /// one vCPU misbehaved (the others are kicked and stop at their next exit).
    pub state: State,
    /// All vCPUs together (the slice budget counts these).
    pub exits: [u64; ExitKind::COUNT],
    /// Its vCPUs' ends: how many are left, the exit code, each one's summary.
    pub ends: vmcore::guest::Ends,
    /// CPUs (bit per index) that ran a vCPU of this guest: the shootdown's targets. Sticky:
    /// a superset of those that may cache its translations.
    pub ran_on: u64,
    /// What the guest's vCPUs read without the world lock (fixed at creation, and the
    /// console line buffers behind their own lock).
    pub shared: Arc<Shared>,
    /// Why the hypercall being handled was refused, in words the guest's author can act on
    /// (set by the handler, `refuse`; logged and cleared by the dispatcher under the world
    /// lock, so one call at a time; a fixed buffer), and how many loud refusals it had
    /// (`vmcore::hypercall::Refusals`: the first few at INFO, the rest at DEBUG).
    pub refusals: vmcore::hypercall::Refusals,
    /// The exception vectors this guest takes through its own IDT (`guest_exceptions`).
    pub handled_exceptions: u32,
    /// The name of the hypercall being handled, read from guest RAM and hashed before the
    /// world lock (`sched::world`, `morsels::read_hashed`): set and cleared around the one
    /// call, under the lock.
    pub name_ahead: Option<vmcore::hypercall::NameAhead>,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend> Guest<B> {
    /// Builds the guest's memory and loads `image`; returns it with the initial state of each
    /// of its vCPUs (which the CPUs they are placed on create).
    /// `epoch`: the guest's slice-start epoch (`Shared::epoch`).
    pub fn create(
        id: u32,
        spec: GuestSpec,
        image: &[u8],
        epoch: &'static vmcore::gate::Epoch,
    ) -> Result<(Self, alloc::vec::Vec<VcpuSetup>), CreateError> {
        let frames = &Frames::here();
        vmcore::guest::check_memory(spec.memory).map_err(CreateError::BadMemorySize)?;
        let image = elf::Image::parse(image, abi::IMAGE_BASE_GPA, vmcore::guest::image_limit(&spec)).map_err(CreateError::Image)?;
        let mem = GuestMemory::new(frames, crate::mm::frames::IDENTITY).map_err(CreateError::Table)?;
        let vcpus = spec.vcpus.max(1) as usize;
        let mut consoles = Vec::new();
        consoles.try_reserve_exact(vcpus).map_err(|_| CreateError::NoMemory)?;
        consoles.resize_with(vcpus, || spin::Mutex::new(Console::new()));
        // A vCPU's end is recorded without allocating (`vcpu_ended`).
        let ends = vmcore::guest::Ends::try_new(vcpus as u32).map_err(|_| CreateError::NoMemory)?;
        let shared = Shared { id, name: spec.name, memory: spec.memory, vcpus: vcpus as u32, ram: Default::default(), consoles, ran_on: core::sync::atomic::AtomicU64::new(0),
            epoch, budgeted: spec.max_slices.is_some() };
        let mut g = Guest {
            id,
            spec,
            space: Arc::new(spin::Mutex::new(GuestSpace { mem, mounts: vmcore::directory::Mounts::new() })),
            state: State::Runnable,
            exits: [0; ExitKind::COUNT],
            ends,
            ran_on: 0,
            shared: Arc::new(shared),
            refusals: vmcore::hypercall::Refusals::new(),
            handled_exceptions: 0,
            name_ahead: None,
            _backend: core::marker::PhantomData,
        };
        let load = Load { id, name: spec.name, memory: spec.memory, arg: spec.arg, vcpus: spec.vcpus.max(1), log_level: log::max_level() as u64 };
        let loaded = loader::load(&mut g.space.lock().mem, &image, &load);
        match loaded {
            Ok(first) => {
                if let Err(e) = g.fix_ram() {
                    let _ = g.destroy();
                    return Err(e);
                }
                let setups = (0..spec.vcpus.max(1) as u64)
                    .map(|v| VcpuSetup { rsp: first.rsp - v * STACK_RESERVE, rsi: v, ..first })
                    .collect();
                Ok((g, setups))
            }
            Err(e) => {
                let _ = g.destroy();
                Err(match e {
                    MapError::NoMemory => CreateError::NoMemory,
                    MapError::Table(e) => CreateError::Table(e),
                })
            }
        }
    }

    /// A vCPU of this guest ended (its control structures are gone); true if it was the last.
    pub fn vcpu_ended(&mut self, v: VcpuSummary) -> bool {
        self.ends.vcpu_ended(&mut self.state, v)
    }

    /// Stops the guest (the world lock held): its vCPUs end at their next start or exit. The
    /// epoch moves before the caller kicks their CPUs (`sched::kick_siblings`), so a slice
    /// start without the lock that misses the stop is ended by that IPI (`vmcore::gate`).
    pub fn stop(&mut self) {
        self.state = State::Stopped;
        self.shared.epoch.bump();
    }

    /// `e`, with the reason (`format_args!`, formatted into a fixed buffer, cut at
    /// `vmcore::reason::REASON_MAX` bytes) the dispatcher logs beside it.
    pub fn refuse(&mut self, e: abi::Error, why: core::fmt::Arguments) -> abi::Error {
        self.refusals.refuse(e, why)
    }

    /// Appends console bytes of vCPU `vcpu`; complete lines are printed with the guest's prefix.
    pub fn console(&mut self, vcpu: u32, bytes: &[u8]) {
        self.shared.console(vcpu, bytes);
    }

    /// Prints the pending partial lines.
    pub fn flush_console(&mut self) {
        let sh = &self.shared;
        for (v, c) in sh.consoles.iter().enumerate() {
            c.lock().flush(sh.id, sh.name, v as u32);
        }
    }

    /// Records the host frame of each 2 MiB of guest RAM in `shared` (the guest is not
    /// running yet: this is the only time `shared` is changed).
    fn fix_ram(&mut self) -> Result<(), CreateError> {
        let ram = vmcore::guest::RamFrames::record(&self.space.lock().mem, self.spec.memory).map_err(|_| CreateError::NoMemory)?;
        let shared = Arc::get_mut(&mut self.shared).ok_or(CreateError::NoMemory)?;
        shared.ram = ram;
        Ok(())
    }

    /// What is left of the guest after `destroy`.
    pub fn summary(&self) -> Summary {
        Summary { id: self.id, spec: self.spec, state: self.state, exits: self.exits, vcpus: self.ends.ended.clone() }
    }

    /// Gives guest RAM and tables back (every vCPU is gone, and with it every other holder
    /// of `space`: the vCPU loop drops a slot's before its end is recorded).
    pub fn destroy(self) -> Summary {
        let frames = &Frames::here();
        let summary = self.summary();
        match Arc::try_unwrap(self.space) {
            Ok(space) => {
                if let Err(e) = space.into_inner().mem.release(frames) {
                    log::error!(target: "vm", "guest {}: tables not freed: {e}", self.id);
                }
            }
            Err(_) => log::error!(target: "vm", "guest {}: its address space is still shared: RAM and tables not freed", self.id),
        }
        summary
    }
}
