//! Hypercall dispatch (ABI v1, `abi`): the raw call is decoded into a typed `abi::Call`
//! (numbers, flags, lengths, wrapping ranges checked, host-tested in the abi crate) before any
//! handler runs; handlers check the rest against the guest's memory (read through its own
//! second-level table) and the hypervisor's state. Anything wrong is an error code in rax,
//! never a fault in the hypervisor.

use super::guest::Guest;
use crate::morsels::{Directory, PendingCreate, ProxyIo, Removed, Started};
use crate::morsels::exmap::{Batch, ExmapIo, Step};
use super::{Backend, Regs};
use crate::mm::frames::Frames;
use crate::devices::pci::Bdf;
use abi::{self, Call, Error, GuestSlice};
use morsel::GuestPhysAddr;

/// The first refusals of each guest that are logged at INFO; later ones at DEBUG, so a
/// guest that loops on a bad call does not flood the log.
const LOUD_FAILURES: u32 = 8;

/// What the scheduler does after a hypercall.
#[allow(clippy::large_enum_variant)] // returned once per call, on the stack; no allocation
pub enum Action<F: morsel::Format> {
    Continue,
    Yield,
    /// The calling vCPU asked to exit, with this code.
    Exit(i32),
    /// The rest of the call is done by the vCPU loop with the world lock let go
    /// (`Unlocked::run`, on the calling CPU's allocator core), then `finish`ed under it.
    Unlocked(Unlocked<F>),
    /// The call cannot start now (an ExMap region's lock is held by another vCPU's batch, for
    /// an ExMap action or a mount of the region):
    /// the vCPU issues it again, the world lock let go in between (`rax` still holds it).
    Retry,
}

/// The lock-free part of a call (allocator work, zeroing, NVMe batches on pinned morsels;
/// no shared state but the lock-free allocator and the NVMe driver, which is made for it).
/// `run` does it with the world lock let go and gives the call back, ready for `finish`
/// (or `abandon`, its guest gone) under the lock.
pub enum Unlocked<F: morsel::Format> {
    /// `bench_frames` (enabled, arguments checked).
    Bench { order: allocator::Order, count: u64 },
    /// `morsel_create` of a RAM morsel: allocate its frames, build its tables, zero its data.
    Build(PendingCreate<F>),
    /// `morsel_destroy` of a RAM morsel out of the directory: free its frames.
    Free(crate::morsels::Name, Removed<F>),
    /// `nvme_read` / `nvme_write`: the NVMe batch on the caller's CPU's queue pair, its
    /// morsel mounted in the NVMe domain and pinned (`morsels::DiskBatch`).
    Proxy(ProxyIo),
    /// `exmap_action` READ / WRITE: likewise, on the pinned region.
    Exmap(ExmapIo),
    /// `exmap_action` ALLOC / FREE on a region no device sees: the whole batch, under the
    /// region's lock (`morsels::exmap::Batch`).
    Batch(Batch<F>),
    /// A call `run` answered in full (`Bench`, `Free`): its result, nothing held.
    Done(Result<u64, Error>),
}

impl<F: morsel::Format> Unlocked<F> {
    /// Runs the lock-free part through `frames`, this CPU's allocator handle; the call comes
    /// back as it goes to `finish` (a batch moved as before: Bochs counts every byte copied).
    pub fn run(self, frames: &Frames) -> Unlocked<F> {
        match self {
            Unlocked::Bench { order, count } => Unlocked::Done(frames.bench(order, count).ok_or(Error::NoMemory)),
            Unlocked::Build(mut p) => {
                p.build(frames);
                Unlocked::Build(p)
            }
            Unlocked::Free(name, r) => {
                r.free(&name, frames);
                Unlocked::Done(Ok(0))
            }
            Unlocked::Proxy(mut p) => {
                p.run();
                Unlocked::Proxy(p)
            }
            Unlocked::Exmap(mut x) => {
                x.batch.run();
                Unlocked::Exmap(x)
            }
            Unlocked::Batch(mut x) => {
                x.run(frames);
                Unlocked::Batch(x)
            }
            done @ Unlocked::Done(_) => done,
        }
    }
}

/// Which vCPU makes the call, on which CPU.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub vcpu: u32,
    pub cpu: usize,
}

/// What hypercalls share across guests. Lives in the run's `World`, behind its one lock
/// (`runqueue`): every hypercall, on any CPU, runs with that lock held (but for the
/// `Unlocked` parts, which touch none of this but the NVMe driver through its leaked
/// `&'static`, `devices::nvme`), so the morsel directory, device mounts,
/// persistence records, ExMap state and the drivers are only ever changed by one CPU at a
/// time; no guest instruction runs on a CPU while it holds the lock.
pub struct Context<B: Backend> {
    pub guest_count: u64,
    pub morsels: Directory<B::Format>,
    pub exmaps: crate::morsels::exmap::Exmaps,
    /// Doorbells, wait states, timers and pending virtual interrupts (`vm/notify.rs`).
    pub notify: super::notify::Notify,
    /// The devices behind the IOMMU, reached only through here (None without an IOMMU).
    pub devices: Option<crate::devices::Devices>,
    /// The allocator (the boot CPU's handle; a call uses its caller's CPU's core, `for_cpu`).
    pub frames: Frames,
    /// `bench=on`: `bench_frames` is answered.
    pub bench: bool,
}

/// Handles the hypercall in `regs` (already past the instruction), writing status and value.
pub fn handle<B: Backend>(guest: &mut Guest<B>, caller: Caller, regs: &mut Regs, cx: &mut Context<B>) -> Action<B::Format> {
    let nr = regs.rax;
    // The calling CPU's allocator core: each core index is used by its own CPU only (inside
    // and outside the world lock alike), as the allocator's contract asks.
    let frames = cx.frames.for_cpu(caller.cpu).unwrap_or(cx.frames);
    let call = Call::decode(nr, [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9]);
    let result = match call {
        Err(e) => Err(e),
        Ok(Call::Exit { code }) => {
            guest.flush_console();
            match caller.vcpu {
                0 => log::info!(target: "vm", "guest {} ({}) exited with code {code}", guest.id, guest.spec.name),
                v => log::info!(target: "vm", "guest {} ({}) vcpu {v} exited with code {code}", guest.id, guest.spec.name),
            }
            return Action::Exit(code);
        }
        Ok(Call::Yield) => {
            set(regs, Ok(0));
            return Action::Yield;
        }
        // A parked vCPU gives up the CPU; `Notify::ready` writes its result when it wakes.
        Ok(Call::Wait { mask, timeout }) => match cx.notify.wait(guest, caller.vcpu, mask, timeout) {
            Ok(None) => return Action::Yield,
            other => other.map(|got| got.unwrap_or(0)),
        },
        Ok(Call::Sleep { us }) => match cx.notify.wait(guest, caller.vcpu, 0, abi::Timeout::Micros(us)) {
            Ok(None) => return Action::Yield,
            other => other.map(|got| got.unwrap_or(0)),
        },
        Ok(Call::BenchFrames { huge, count }) if cx.bench => {
            let order = if huge { allocator::Order::HUGE } else { allocator::Order::BASE };
            return Action::Unlocked(Unlocked::Bench { order, count });
        }
        Ok(Call::MorselCreate { name, size, flags }) => match cx.morsels.create(guest, &frames, name, size, flags) {
            Ok(Started::Build(p)) => return Action::Unlocked(Unlocked::Build(p)),
            Ok(Started::Done(gpa)) => {
                cx.notify.entered(guest, gpa, caller.cpu);
                Ok(gpa)
            }
            Err(e) => Err(e),
        },
        Ok(Call::MorselDestroy { name }) => match cx.morsels.destroy(guest, &frames, name) {
            Ok(Some((name, removed))) => return Action::Unlocked(Unlocked::Free(name, removed)),
            Ok(None) => Ok(0),
            Err(e) => Err(e),
        },
        Ok(Call::Nvme { write, gpa, offset, lba, count }) => match cx.morsels.nvme_io(guest, cx.devices.as_mut(), &frames, write, gpa, offset, lba, count) {
            Ok(p) => return Action::Unlocked(Unlocked::Proxy(p)),
            Err(e) => Err(e),
        },
        Ok(Call::ExmapAction { region, iov, count, op }) => match cx.exmaps.action(&mut cx.morsels, cx.devices.as_mut(), guest, caller.vcpu, &frames, region, iov, count, op) {
            Ok(Step::Disk(x)) => return Action::Unlocked(Unlocked::Exmap(x)),
            Ok(Step::Batch(x)) => return Action::Unlocked(Unlocked::Batch(x)),
            Ok(Step::Retry) => return Action::Retry,
            Ok(Step::Done(failed)) => Ok(failed),
            Err(e) => Err(e),
        },
        Ok(Call::MorselOpen { name, writable }) => match cx.morsels.open(guest, &frames, name, writable) {
            Ok(Some(gpa)) => Ok(gpa),
            // An ExMap batch holds the region: issued again, the world lock let go.
            Ok(None) => return Action::Retry,
            Err(e) => Err(e),
        },
        Ok(Call::BenchFrames { .. }) => Err(guest.refuse(Error::Denied, format_args!("the hypervisor runs without bench=on"))),
        Ok(call) => dispatch(call, guest, caller, cx, &frames),
    };
    conclude(guest, nr, regs, result);
    Action::Continue
}

/// Finishes a call whose `Unlocked` part ran (`regs.rax` still holds its number).
pub fn finish<B: Backend>(guest: &mut Guest<B>, caller: Caller, regs: &mut Regs, cx: &mut Context<B>, done: Unlocked<B::Format>) {
    let frames = cx.frames.for_cpu(caller.cpu).unwrap_or(cx.frames);
    let result = match done {
        Unlocked::Done(result) => result,
        Unlocked::Build(p) => cx.morsels.create_finish(guest, &frames, p).inspect(|&gpa| cx.notify.entered(guest, gpa, caller.cpu)),
        Unlocked::Proxy(p) => cx.morsels.nvme_finish(cx.devices.as_mut(), &frames, p),
        Unlocked::Exmap(x) => cx.exmaps.finish(&mut cx.morsels, cx.devices.as_mut(), Some(guest), &frames, x),
        Unlocked::Batch(x) => cx.exmaps.finish_batch(Some(guest), &frames, x),
        // Not run (never here: `run` answers them as `Done`).
        Unlocked::Bench { .. } | Unlocked::Free(..) => Err(Error::Invalid),
    };
    conclude(guest, regs.rax, regs, result);
}

/// A call whose `Unlocked` part ran for a guest that is gone: what it holds goes back.
/// An NVMe batch is ended all the same (its morsel unmounted from the device and unpinned).
pub fn abandon<B: Backend>(caller: Caller, cx: &mut Context<B>, done: Unlocked<B::Format>) {
    let frames = cx.frames.for_cpu(caller.cpu).unwrap_or(cx.frames);
    match done {
        Unlocked::Build(p) => cx.morsels.abandon(&frames, p),
        Unlocked::Proxy(p) => {
            let _ = cx.morsels.nvme_finish(cx.devices.as_mut(), &frames, p);
        }
        Unlocked::Exmap(x) => {
            let _ = cx.exmaps.finish::<B>(&mut cx.morsels, cx.devices.as_mut(), None, &frames, x);
        }
        Unlocked::Batch(x) => {
            let _ = cx.exmaps.finish_batch::<B>(None, &frames, x);
        }
        Unlocked::Bench { .. } | Unlocked::Free(..) | Unlocked::Done(_) => {}
    }
}

/// A refusal that is part of a normal protocol, not a mistake: opening a name that does not
/// exist yet (a rendezvous), ringing a doorbell nobody subscribed to yet. Logged at DEBUG and
/// not counted among the guest's loud refusals.
fn expected(nr: u64, e: Error) -> bool {
    matches!((nr, e), (abi::HC_MORSEL_OPEN, Error::NotFound) | (abi::HC_NOTIFY, Error::NoReceiver))
}

/// Logs a refusal (the first few of a guest at INFO) and writes status and value.
fn conclude<B: Backend>(guest: &mut Guest<B>, nr: u64, regs: &mut Regs, result: Result<u64, Error>) {
    let reason = guest.refusal.take();
    if let Err(e) = result {
        if expected(nr, e) {
            log::debug!(target: "vm", "guest {} ({}): {} ({nr:#x}) refused ({e}), as guests expect it to be",
                guest.id, guest.spec.name, Call::name_of(nr));
            set(regs, result);
            return;
        }
        guest.refusals = guest.refusals.saturating_add(1);
        let n = guest.refusals;
        let level = if n <= LOUD_FAILURES { log::Level::Info } else { log::Level::Debug };
        let why = reason.as_ref().map_or("", |r| r.as_str());
        let sep = if why.is_empty() { "" } else { ": " };
        log::log!(target: "vm", level, "guest {} ({}): {} ({nr:#x}) refused ({e}){sep}{why}{}",
            guest.id, guest.spec.name, Call::name_of(nr), if n == LOUD_FAILURES { " (later refusals of this guest at log=debug)" } else { "" });
    }
    set(regs, result);
}

/// Runs a decoded call that returns to the guest.
fn dispatch<B: Backend>(call: Call, guest: &mut Guest<B>, caller: Caller, cx: &mut Context<B>, frames: &Frames) -> Result<u64, Error> {
    let morsels = &mut cx.morsels;
    let devices = cx.devices.as_mut();
    match call {
        Call::Info { what } => info(guest, caller, cx.guest_count, what, cx.notify.injected(guest.id)),
        Call::ConsoleWrite { text } => console_write(guest, caller, text),
        Call::MorselUnmount { gpa } => {
            let name = guest.mounts.iter().find(|m| m.gpa == gpa).map(|m| m.name);
            // One shootdown, committed before the world lock is let go.
            let done = morsels.unmount(guest, frames, gpa).map(|flush| {
                flush.commit(&mut super::shootdown::Hw(devices));
                0
            });
            if let (Ok(_), Some(name)) = (&done, name) {
                cx.notify.unmounted(guest.id, &name);
            }
            done
        }
        Call::MorselSize { gpa } => morsels.size(guest, gpa),
        Call::MorselStats => {
            morsels.log_stats();
            crate::morsels::exmap::Exmaps::log_stats(morsels);
            super::shootdown::log_stats();
            Ok(0)
        }
        Call::ExmapCreate { name, size, share_writable } => {
            cx.exmaps.create(morsels, guest, frames, name, size, share_writable).inspect(|&gpa| cx.notify.entered(guest, gpa, caller.cpu))
        }
        Call::NameWatch { name, bits } => {
            let name = crate::morsels::read_name(guest, name)?;
            let there = morsels.exists(&name);
            cx.notify.watch(guest, caller.vcpu, &name, bits, there)
        }
        Call::ExmapInfo { region, what } => cx.exmaps.info(morsels, guest, region, what),
        Call::DeviceMount { name, bdf, iova, writable } => morsels.device_mount(guest, devices, frames, name, Bdf::from_source_id(bdf), iova, writable),
        Call::DeviceUnmount { bdf, iova } => morsels.device_unmount(guest, devices, frames, Bdf::from_source_id(bdf), iova),
        Call::EduDma { to_device, iova, len } => morsels.edu_dma(guest, devices, to_device, iova, len),
        Call::GuestExceptions { mask } => {
            // Every vCPU of the guest takes the new bitmap before its next entry (`sched`).
            Ok(core::mem::replace(&mut guest.handled_exceptions, mask) as u64)
        }
        Call::NotifySubscribe { gpa, vector } => cx.notify.subscribe(guest, gpa, vector),
        Call::Notify { gpa, bits } => cx.notify.notify(guest, caller.vcpu, caller.cpu, gpa, bits),
        Call::Timer { us, vector } => cx.notify.timer(guest, caller.vcpu, us, vector),
        // Handled by `handle`.
        Call::Exit { .. } | Call::Yield | Call::Wait { .. } | Call::Sleep { .. } | Call::BenchFrames { .. }
        | Call::MorselCreate { .. } | Call::MorselDestroy { .. } | Call::Nvme { .. } | Call::ExmapAction { .. }
        | Call::MorselOpen { .. } => Err(Error::Invalid),
    }
}

/// A call's status and value into `regs` (`vmcore::vcpu::answer`). A call from guest user
/// mode (CPL > 0) is answered `Denied` there without reaching `handle`: the guest kernel
/// decides what its user mode may do.
fn set(regs: &mut Regs, result: Result<u64, Error>) {
    vmcore::vcpu::answer(regs, result);
}

/// `info(what)` for the selectors `vmcore::exits::info_is_local` names: answered from the
/// guest's fixed state, no world lock needed (`sched::lockless` calls it without).
pub fn info_local(shared: &super::guest::Shared, caller: Caller, guest_count: u64, what: u64) -> Option<u64> {
    Some(match what {
        abi::INFO_ABI_VERSION => abi::ABI_VERSION,
        abi::INFO_GUEST_ID => shared.id as u64,
        abi::INFO_MEMORY_SIZE => shared.memory,
        abi::INFO_GUEST_COUNT => guest_count,
        abi::INFO_LOG_LEVEL => log::max_level() as u64,
        abi::INFO_VCPU_INDEX => caller.vcpu as u64,
        abi::INFO_VCPU_COUNT => shared.vcpus as u64,
        abi::INFO_CPU_INDEX => caller.cpu as u64,
        abi::INFO_TSC_PER_US => crate::platform::time::tsc_per_us(),
        abi::INFO_SLICE_US => super::sched::SLICE_US,
        _ => return None,
    })
}

/// `console_write` of a text in guest RAM, no world lock needed (`sched::lockless`); None
/// (nothing done) where the text is not all in guest RAM: the world answers that call.
pub fn console_local(shared: &super::guest::Shared, caller: Caller, text: GuestSlice) -> Option<u64> {
    let mut buf = [0u8; abi::CONSOLE_MAX as usize];
    let buf = buf.get_mut(..text.len as usize)?;
    shared.ram_pieces(text.ptr, buf.len(), |piece, done| {
        let n = piece.len();
        let _ = piece.copy_to(0, &mut buf[done..done + n]);
    })?;
    shared.console(caller.vcpu, buf);
    Some(text.len)
}

/// Writes a call's status and value (a lock-free call's too).
pub fn answer(regs: &mut Regs, result: Result<u64, Error>) {
    set(regs, result);
}

fn info<B: Backend>(guest: &Guest<B>, caller: Caller, guest_count: u64, what: u64, injected: u64) -> Result<u64, Error> {
    if let Some(v) = info_local(&guest.shared, caller, guest_count, what) {
        return Ok(v);
    }
    match what {
        abi::INFO_EXITS => Ok(guest.exits.iter().sum()),
        abi::INFO_SLICES => Ok(guest.exits[super::ExitKind::Preempted as usize]),
        abi::INFO_INTERRUPTS => Ok(injected),
        _ => Err(Error::NoSuchCall),
    }
}

fn console_write<B: Backend>(guest: &mut Guest<B>, caller: Caller, text: GuestSlice) -> Result<u64, Error> {
    let mut buf = [0u8; abi::CONSOLE_MAX as usize];
    let buf = &mut buf[..text.len as usize];
    guest.mem.read(GuestPhysAddr::new(text.ptr), buf)?;
    guest.console(caller.vcpu, buf);
    Ok(text.len)
}
