//! The hypervisor's side of hypercall dispatch: the services a call reaches (`Serving`, the
//! `vmcore::hypercall::Services` of one call under the world lock) and the deferred part of a
//! call (`Unlocked`). The routing of a decoded `abi::Call`, the `Action` and the refusal policy
//! are `vmcore::hypercall`'s (host-tested there); the services check what the abi crate could
//! not against the guest's memory and the hypervisor's state. Anything wrong is an error code
//! in rax, never a fault in the hypervisor.

use super::guest::Guest;
use crate::morsels::{Directory, PendingCreate, ProxyIo, Removed, Started};
use crate::morsels::exmap::{Batch, ExmapIo, Step};
use super::{Backend, Regs};
use crate::mm::frames::Frames;
use crate::devices::pci::Bdf;
use abi::{self, Error, GuestSlice};
use vmcore::hypercall::Outcome;
use morsel::GuestPhysAddr;

/// What the scheduler does after a hypercall (`vmcore::hypercall::Action`): its deferred part
/// is run by the vCPU loop with the world lock let go (`Unlocked::run`, on the calling CPU's
/// allocator core), then `finish`ed under it. `Retry`: an ExMap region's lock is held by
/// another vCPU's batch (an ExMap action or a mount of the region).
pub type Action<F> = vmcore::hypercall::Action<Unlocked<F>>;

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
    /// The morsel directory, behind its own lock (taken after the world lock where both are
    /// held; alone by `sched::mount_fast`).
    pub morsels: &'static spin::Mutex<Directory<B::Format>>,
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

/// Handles the hypercall in `regs` (already past the instruction), writing status and value
/// (`vmcore::hypercall::handle` routes it to `Serving`).
pub fn handle<B: Backend>(guest: &mut Guest<B>, caller: Caller, regs: &mut Regs, cx: &mut Context<B>) -> Action<B::Format> {
    vmcore::hypercall::handle(&mut Serving::new(guest, caller, cx), regs)
}

/// Finishes a call whose `Unlocked` part ran (`regs.rax` still holds its number).
pub fn finish<B: Backend>(guest: &mut Guest<B>, caller: Caller, regs: &mut Regs, cx: &mut Context<B>, done: Unlocked<B::Format>) {
    vmcore::hypercall::finish(&mut Serving::new(guest, caller, cx), regs, done);
}

/// A call whose `Unlocked` part ran for a guest that is gone: what it holds goes back.
/// An NVMe batch is ended all the same (its morsel unmounted from the device and unpinned).
pub fn abandon<B: Backend>(caller: Caller, cx: &mut Context<B>, done: Unlocked<B::Format>) {
    let frames = cx.frames.for_cpu(caller.cpu).unwrap_or(cx.frames);
    vmcore::hypercall::abandon(&mut Orphaned { cx, frames }, done);
}

/// Writes a call's status and value (a lock-free call's too).
pub fn answer(regs: &mut Regs, result: Result<u64, Error>) {
    vmcore::vcpu::answer(regs, result);
}

/// One call of one guest vCPU, the world lock held: what `vmcore::hypercall` routes it to.
/// `frames`: the calling CPU's allocator core (each core index is used by its own CPU only,
/// inside and outside the world lock alike, as the allocator's contract asks).
pub struct Serving<'a, B: Backend> {
    guest: &'a mut Guest<B>,
    caller: Caller,
    cx: &'a mut Context<B>,
    frames: Frames,
}

impl<'a, B: Backend> Serving<'a, B> {
    fn new(guest: &'a mut Guest<B>, caller: Caller, cx: &'a mut Context<B>) -> Self {
        let frames = cx.frames.for_cpu(caller.cpu).unwrap_or(cx.frames);
        Serving { guest, caller, cx, frames }
    }
}

/// `info` of fixed state, answered without the world lock (`sched::lockless`).
struct Fixed<'a> {
    shared: &'a super::guest::Shared,
    caller: Caller,
    guest_count: u64,
}

impl vmcore::hypercall::Facts for Fixed<'_> {
    fn guest_id(&self) -> u64 {
        self.shared.id as u64
    }
    fn memory(&self) -> u64 {
        self.shared.memory
    }
    fn guest_count(&self) -> u64 {
        self.guest_count
    }
    fn vcpu_index(&self) -> u64 {
        self.caller.vcpu as u64
    }
    fn vcpu_count(&self) -> u64 {
        self.shared.vcpus as u64
    }
    fn cpu_index(&self) -> u64 {
        self.caller.cpu as u64
    }
    fn tsc_per_us(&self) -> u64 {
        crate::platform::time::tsc_per_us()
    }
    fn slice_us(&self) -> u64 {
        super::sched::SLICE_US
    }
}

impl<B: Backend> Serving<'_, B> {
    fn fixed(&self) -> Fixed<'_> {
        Fixed { shared: &self.guest.shared, caller: self.caller, guest_count: self.cx.guest_count }
    }
}

impl<B: Backend> vmcore::hypercall::Services for Serving<'_, B> {
    type Deferred = Unlocked<B::Format>;

    fn facts(&self) -> impl vmcore::hypercall::Facts + '_ {
        self.fixed()
    }

    fn refusals(&mut self) -> (vmcore::hypercall::Who<'_>, &mut vmcore::hypercall::Refusals) {
        let g = &mut *self.guest;
        (vmcore::hypercall::Who { guest: g.id, name: g.spec.name, vcpu: self.caller.vcpu }, &mut g.refusals)
    }

    fn bench(&self) -> bool {
        self.cx.bench
    }

    fn flush_console(&mut self) {
        self.guest.flush_console();
    }

    fn console_write(&mut self, text: GuestSlice) -> Result<u64, Error> {
        let mut buf = [0u8; abi::CONSOLE_MAX as usize];
        let buf = &mut buf[..text.len as usize];
        self.guest.space.lock().mem.read(GuestPhysAddr::new(text.ptr), buf)?;
        self.guest.console(self.caller.vcpu, buf);
        Ok(text.len)
    }

    fn wait(&mut self, mask: u64, timeout: abi::Timeout) -> Result<Option<u64>, Error> {
        self.cx.notify.wait(self.guest, self.caller.vcpu, mask, timeout)
    }

    fn bench_frames(&mut self, huge: bool, count: u64) -> Unlocked<B::Format> {
        let order = if huge { allocator::Order::HUGE } else { allocator::Order::BASE };
        Unlocked::Bench { order, count }
    }

    fn exits(&self) -> u64 {
        self.guest.exits.iter().sum()
    }

    fn slices(&self) -> u64 {
        self.guest.exits[super::ExitKind::Preempted as usize]
    }

    fn interrupts(&self) -> u64 {
        self.cx.notify.injected(self.guest.id)
    }

    fn morsel_create(&mut self, name: abi::Name, size: u64, flags: abi::CreateFlags) -> Outcome<Unlocked<B::Format>> {
        match self.cx.morsels.lock().create(self.guest, &self.frames, name, size, flags) {
            Ok(Started::Build(p)) => Outcome::Defer(Unlocked::Build(p)),
            Ok(Started::Done(gpa)) => {
                self.cx.notify.entered(self.guest, gpa, self.caller.cpu);
                Outcome::Answer(Ok(gpa))
            }
            Err(e) => Outcome::Answer(Err(e)),
        }
    }

    fn morsel_open(&mut self, name: abi::Name, writable: bool) -> Outcome<Unlocked<B::Format>> {
        match self.cx.morsels.lock().open(self.guest, &self.frames, name, writable) {
            Ok(Some(gpa)) => Outcome::Answer(Ok(gpa)),
            // An ExMap batch holds the region: issued again, the world lock let go.
            Ok(None) => Outcome::Retry,
            Err(e) => Outcome::Answer(Err(e)),
        }
    }

    fn morsel_unmount(&mut self, gpa: u64) -> Result<u64, Error> {
        let name = self.guest.space.lock().mounts.iter().find(|m| m.gpa == gpa).map(|m| m.name);
        let devices = self.cx.devices.as_mut();
        // One shootdown, committed before the world lock is let go.
        let done = self.cx.morsels.lock().unmount(self.guest, &self.frames, gpa).map(|flush| {
            flush.commit(&mut super::shootdown::Hw(devices));
            0
        });
        if let (Ok(_), Some(name)) = (&done, name) {
            self.cx.notify.unmounted(self.guest.id, &name);
        }
        done
    }

    fn morsel_destroy(&mut self, name: abi::Name) -> Outcome<Unlocked<B::Format>> {
        match self.cx.morsels.lock().destroy(self.guest, &self.frames, name) {
            Ok(Some((name, removed))) => Outcome::Defer(Unlocked::Free(name, removed)),
            Ok(None) => Outcome::Answer(Ok(0)),
            Err(e) => Outcome::Answer(Err(e)),
        }
    }

    fn morsel_size(&mut self, gpa: u64) -> Result<u64, Error> {
        self.cx.morsels.lock().size(self.guest, gpa)
    }

    fn morsel_stats(&mut self) {
        self.cx.morsels.lock().log_stats();
        crate::morsels::exmap::Exmaps::log_stats(&self.cx.morsels.lock());
        super::shootdown::log_stats();
    }

    fn device_mount(&mut self, name: abi::Name, bdf: u16, iova: u64, writable: bool) -> Result<u64, Error> {
        self.cx.morsels.lock().device_mount(self.guest, self.cx.devices.as_mut(), &self.frames, name, Bdf::from_source_id(bdf), iova, writable)
    }

    fn device_unmount(&mut self, bdf: u16, iova: u64) -> Result<u64, Error> {
        self.cx.morsels.lock().device_unmount(self.guest, self.cx.devices.as_mut(), &self.frames, Bdf::from_source_id(bdf), iova)
    }

    fn edu_dma(&mut self, to_device: bool, iova: u64, len: u64) -> Result<u64, Error> {
        self.cx.morsels.lock().edu_dma(self.guest, self.cx.devices.as_mut(), to_device, iova, len)
    }

    fn nvme(&mut self, write: bool, gpa: u64, offset: u64, lba: u64, count: u64) -> Outcome<Unlocked<B::Format>> {
        match self.cx.morsels.lock().nvme_io(self.guest, self.cx.devices.as_mut(), &self.frames, write, gpa, offset, lba, count) {
            Ok(p) => Outcome::Defer(Unlocked::Proxy(p)),
            Err(e) => Outcome::Answer(Err(e)),
        }
    }

    fn exmap_create(&mut self, name: abi::Name, size: u64, share_writable: bool) -> Result<u64, Error> {
        let cx = &mut *self.cx;
        cx.exmaps.create(&mut cx.morsels.lock(), self.guest, &self.frames, name, size, share_writable)
            .inspect(|&gpa| cx.notify.entered(self.guest, gpa, self.caller.cpu))
    }

    fn exmap_action(&mut self, region: u64, iov: u64, count: u64, op: abi::ExmapOp) -> Outcome<Unlocked<B::Format>> {
        let cx = &mut *self.cx;
        match cx.exmaps.action(&mut cx.morsels.lock(), cx.devices.as_mut(), self.guest, self.caller.vcpu, &self.frames, region, iov, count, op) {
            Ok(Step::Disk(x)) => Outcome::Defer(Unlocked::Exmap(x)),
            Ok(Step::Batch(x)) => Outcome::Defer(Unlocked::Batch(x)),
            Ok(Step::Retry) => Outcome::Retry,
            Ok(Step::Done(failed)) => Outcome::Answer(Ok(failed)),
            Err(e) => Outcome::Answer(Err(e)),
        }
    }

    fn exmap_info(&mut self, region: u64, what: u64) -> Result<u64, Error> {
        self.cx.exmaps.info(&mut self.cx.morsels.lock(), self.guest, region, what)
    }

    fn guest_exceptions(&mut self, mask: u32) -> u32 {
        // Every vCPU of the guest takes the new bitmap before its next entry (`sched`): the
        // epoch moves before the kick (`sched::call`), so no slice starts without the lock
        // with the old one.
        self.guest.shared.epoch.bump();
        core::mem::replace(&mut self.guest.handled_exceptions, mask)
    }

    fn notify_subscribe(&mut self, gpa: u64, vector: Option<u8>) -> Result<u64, Error> {
        self.cx.notify.subscribe(self.guest, gpa, vector)
    }

    fn notify(&mut self, gpa: u64, bits: u64) -> Result<u64, Error> {
        self.cx.notify.notify(self.guest, self.caller.vcpu, self.caller.cpu, gpa, bits)
    }

    fn timer(&mut self, us: u64, vector: u8) -> Result<u64, Error> {
        self.cx.notify.timer(self.guest, self.caller.vcpu, us, vector)
    }

    fn name_watch(&mut self, name: abi::Name, bits: u64) -> Result<u64, Error> {
        let name = crate::morsels::read_name(self.guest, name)?;
        let there = self.cx.morsels.lock().exists(&name);
        self.cx.notify.watch(self.guest, self.caller.vcpu, &name, bits, there)
    }

    fn finish(&mut self, done: Unlocked<B::Format>) -> Result<u64, Error> {
        let (cx, guest, frames) = (&mut *self.cx, &mut *self.guest, &self.frames);
        match done {
            Unlocked::Done(result) => result,
            Unlocked::Build(p) => cx.morsels.lock().create_finish(guest, frames, p).inspect(|&gpa| cx.notify.entered(guest, gpa, self.caller.cpu)),
            Unlocked::Proxy(p) => cx.morsels.lock().nvme_finish(cx.devices.as_mut(), frames, p),
            Unlocked::Exmap(x) => cx.exmaps.finish(&mut cx.morsels.lock(), cx.devices.as_mut(), Some(guest), frames, x),
            Unlocked::Batch(x) => cx.exmaps.finish_batch(Some(guest), frames, x),
            // Not run (never here: `run` answers them as `Done`).
            Unlocked::Bench { .. } | Unlocked::Free(..) => Err(Error::Invalid),
        }
    }
}

/// The world under its lock with the call's guest gone (`abandon`).
struct Orphaned<'a, B: Backend> {
    cx: &'a mut Context<B>,
    frames: Frames,
}

impl<B: Backend> vmcore::hypercall::GiveBack<Unlocked<B::Format>> for Orphaned<'_, B> {
    fn give_back(&mut self, done: Unlocked<B::Format>) {
        let (cx, frames) = (&mut *self.cx, &self.frames);
        match done {
            Unlocked::Build(p) => cx.morsels.lock().abandon(frames, p),
            Unlocked::Proxy(p) => {
                let _ = cx.morsels.lock().nvme_finish(cx.devices.as_mut(), frames, p);
            }
            Unlocked::Exmap(x) => {
                let _ = cx.exmaps.finish::<B>(&mut cx.morsels.lock(), cx.devices.as_mut(), None, frames, x);
            }
            Unlocked::Batch(x) => {
                let _ = cx.exmaps.finish_batch::<B>(None, frames, x);
            }
            Unlocked::Bench { .. } | Unlocked::Free(..) | Unlocked::Done(_) => {}
        }
    }
}

/// `info(what)` for the selectors `vmcore::exits::info_is_local` names: answered from the
/// guest's fixed state, no world lock needed (`sched::lockless` calls it without).
#[inline]
pub fn info_local(shared: &super::guest::Shared, caller: Caller, guest_count: u64, what: u64) -> Option<u64> {
    vmcore::hypercall::info_local(&Fixed { shared, caller, guest_count }, what)
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
