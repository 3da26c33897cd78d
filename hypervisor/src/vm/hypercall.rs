//! The hypervisor's side of hypercall dispatch: the services a call reaches (`Serving`, the
//! `vmcore::hypercall::Services` of one call under the world lock) and the deferred part of a
//! call (`Unlocked`, which dispatches to the `vmcore::hypercall::Deferred` steps each kind of
//! work implements where it is made). The routing of a decoded `abi::Call`, the `Action` and
//! the refusal policy are `vmcore::hypercall`'s (host-tested there); the services check what
//! the abi crate could not against the guest's memory and the hypervisor's state. Anything
//! wrong is an error code in rax, never a fault in the hypervisor.

use super::guest::Guest;
use crate::morsels::{Directory, PendingCreate, ProxyIo, Removed, Started};
use crate::morsels::exmap::{Batch, ExmapIo};
use super::{Backend, Regs};
use crate::mm::frames::Frames;
use crate::devices::pci::Bdf;
use abi::{self, Error, GuestSlice};
use vmcore::hypercall::{Deferred, Outcome};
use morsel::GuestPhysAddr;

/// What the scheduler does after a hypercall (`vmcore::hypercall::Action`): its deferred part
/// is run by the vCPU loop with the world lock let go (`Deferred::run`, on the calling CPU's
/// allocator core), then `finish`ed under it. `Retry`: an ExMap region's lock is held by
/// another vCPU's batch (an ExMap action or a mount of the region).
pub type Action<F> = vmcore::hypercall::Action<Unlocked<F>>;

/// The hypervisor as a deferred part's steps see it (`vmcore::hypercall::Host`): `run`
/// through the calling CPU's allocator handle, `finish` and `abandon` on the world under its
/// lock (`Under`), `finish` with the calling guest.
pub struct Hv<B>(core::marker::PhantomData<B>);

impl<B: Backend> vmcore::hypercall::Host for Hv<B> {
    type Alone = Frames;
    type World<'a> = Under<'a, B> where Self: 'a;
    type Guest = Guest<B>;
}

/// The world under its lock as a deferred part ends in it: the hypercall context, and the
/// calling CPU's index. (What it allocates goes through this CPU's handle, `Frames::here`.)
pub struct Under<'a, B: Backend> {
    pub cx: &'a mut Context<B>,
    pub cpu: usize,
}

/// The lock-free part of a call (allocator work, zeroing, NVMe batches on pinned morsels;
/// no shared state but the lock-free allocator and the NVMe driver, which is made for it):
/// one variant per kind of work, each implementing its own steps (`Deferred`: `run` with the
/// world lock let go, then `finish` or, its guest gone, `abandon` under it) where it is made.
/// This enum only dispatches (`each!`): a new deferred call is a variant here and its
/// `Deferred` impl beside the work. Filled in place and never boxed: a batch is large, and
/// Bochs counts every byte a move copies.
pub enum Unlocked<F: morsel::Format> {
    /// `bench_frames` (enabled, arguments checked).
    Bench(Bench),
    /// `morsel_create` of a RAM morsel: allocate its frames, build its tables, zero its data.
    Build(PendingCreate<F>),
    /// `morsel_destroy` of a RAM morsel out of the directory: free its frames.
    Free(Removed<F>),
    /// `nvme_read` / `nvme_write`: the NVMe batch on the caller's CPU's queue pair, its
    /// morsel mounted in the NVMe domain and pinned (`morsels::DiskBatch`).
    Proxy(ProxyIo),
    /// `exmap_action` READ / WRITE: likewise, on the pinned region.
    Exmap(ExmapIo),
    /// `exmap_action` ALLOC / FREE on a region no device sees: the whole batch, under the
    /// region's lock (`vmcore::region::Batch`; it may also end with no world lock, `sched`).
    Batch(Batch<F>),
}

/// `$step` on the work `$w` that `Unlocked` `$work` holds, whichever it is.
macro_rules! each {
    ($work:expr, $w:ident => $step:expr) => {
        match $work {
            Unlocked::Bench($w) => $step,
            Unlocked::Build($w) => $step,
            Unlocked::Free($w) => $step,
            Unlocked::Proxy($w) => $step,
            Unlocked::Exmap($w) => $step,
            Unlocked::Batch($w) => $step,
        }
    };
}

impl<B: Backend> Deferred<Hv<B>> for Unlocked<B::Format> {
    fn run(&mut self, frames: &Frames) {
        each!(self, w => Deferred::<Hv<B>>::run(w, frames))
    }

    fn finish(self, world: Under<'_, B>, guest: &mut Guest<B>) -> Result<u64, Error> {
        each!(self, w => Deferred::<Hv<B>>::finish(w, world, guest))
    }

    fn abandon(self, world: Under<'_, B>) {
        each!(self, w => Deferred::<Hv<B>>::abandon(w, world))
    }
}

/// `bench_frames` (enabled, arguments checked): `count` blocks of `order` taken and given
/// back through the calling CPU's allocator core, with the world lock let go.
pub struct Bench {
    order: allocator::Order,
    count: u64,
    /// `run`'s result (None: out of memory, or not run).
    took: Option<u64>,
}

impl<B: Backend> Deferred<Hv<B>> for Bench {
    fn run(&mut self, frames: &Frames) {
        self.took = frames.bench(self.order, self.count);
    }

    fn finish(self, _: Under<'_, B>, _: &mut Guest<B>) -> Result<u64, Error> {
        self.took.ok_or(Error::NoMemory)
    }

    fn abandon(self, _: Under<'_, B>) {}
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
    /// `bench=on`: `bench_frames` is answered.
    pub bench: bool,
}

/// Handles the hypercall in `regs` (already past the instruction), writing status and value
/// (`vmcore::hypercall::handle` routes it to `Serving`).
pub fn handle<B: Backend>(guest: &mut Guest<B>, caller: Caller, regs: &mut Regs, cx: &mut Context<B>) -> Action<B::Format> {
    vmcore::hypercall::handle(&mut Serving::new(guest, caller, cx), regs)
}

/// Finishes a call whose deferred part ran (`regs.rax` still holds its number): its
/// `Unlocked`, or the work it held (an ExMap `Batch` that could not end alone, `sched`).
pub fn finish<B: Backend, D: Deferred<Hv<B>>>(guest: &mut Guest<B>, caller: Caller, regs: &mut Regs, cx: &mut Context<B>, done: D) {
    vmcore::hypercall::finish(&mut Serving::new(guest, caller, cx), regs, done);
}

/// A call whose deferred part ran for a guest that is gone: what it holds goes back
/// (`Deferred::abandon`). An NVMe batch is ended all the same (its morsel unmounted from the
/// device and unpinned).
pub fn abandon<B: Backend, D: Deferred<Hv<B>>>(caller: Caller, cx: &mut Context<B>, done: D) {
    vmcore::hypercall::abandon::<Hv<B>, D>(Under { cx, cpu: caller.cpu }, done);
}

/// Writes a call's status and value (a lock-free call's too).
pub fn answer(regs: &mut Regs, result: Result<u64, Error>) {
    vmcore::vcpu::answer(regs, result);
}

/// One call of one guest vCPU, the world lock held: what `vmcore::hypercall` routes it to.
/// What it allocates or frees goes through the calling CPU's own allocator core, which each
/// service below reaches itself (`Frames::here`: the call runs on its caller's CPU; each core
/// index is used by its own CPU only, inside and outside the world lock alike, as the
/// allocator's contract asks).
pub struct Serving<'a, B: Backend> {
    guest: &'a mut Guest<B>,
    caller: Caller,
    cx: &'a mut Context<B>,
}

impl<'a, B: Backend> Serving<'a, B> {
    fn new(guest: &'a mut Guest<B>, caller: Caller, cx: &'a mut Context<B>) -> Self {
        Serving { guest, caller, cx }
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
    type Host = Hv<B>;
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
        Unlocked::Bench(Bench { order, count, took: None })
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
        match self.cx.morsels.lock().create(self.guest, name, size, flags) {
            Ok(Started::Build(p)) => Outcome::Defer(Unlocked::Build(p)),
            Ok(Started::Done(gpa)) => {
                self.cx.notify.entered(self.guest, gpa, self.caller.cpu);
                Outcome::Answer(Ok(gpa))
            }
            Err(e) => Outcome::Answer(Err(e)),
        }
    }

    fn morsel_open(&mut self, name: abi::Name, writable: bool) -> Outcome<Unlocked<B::Format>> {
        match self.cx.morsels.lock().open(self.guest, name, writable) {
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
        let done = self.cx.morsels.lock().unmount(self.guest, gpa).map(|flush| {
            flush.commit(&mut super::shootdown::Hw(devices));
            0
        });
        if let (Ok(_), Some(name)) = (&done, name) {
            self.cx.notify.unmounted(self.guest.id, &name);
        }
        done
    }

    fn morsel_destroy(&mut self, name: abi::Name) -> Outcome<Unlocked<B::Format>> {
        match self.cx.morsels.lock().destroy(self.guest, name) {
            Ok(Some(removed)) => Outcome::Defer(Unlocked::Free(removed)),
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
        self.cx.morsels.lock().device_mount(self.guest, self.cx.devices.as_mut(), name, Bdf::from_source_id(bdf), iova, writable)
    }

    fn device_unmount(&mut self, bdf: u16, iova: u64) -> Result<u64, Error> {
        self.cx.morsels.lock().device_unmount(self.guest, self.cx.devices.as_mut(), Bdf::from_source_id(bdf), iova)
    }

    fn edu_dma(&mut self, to_device: bool, iova: u64, len: u64) -> Result<u64, Error> {
        self.cx.morsels.lock().edu_dma(self.guest, self.cx.devices.as_mut(), to_device, iova, len)
    }

    fn nvme(&mut self, write: bool, gpa: u64, offset: u64, lba: u64, count: u64) -> Outcome<Unlocked<B::Format>> {
        match self.cx.morsels.lock().nvme_io(self.guest, self.cx.devices.as_mut(), write, gpa, offset, lba, count) {
            Ok(p) => Outcome::Defer(Unlocked::Proxy(p)),
            Err(e) => Outcome::Answer(Err(e)),
        }
    }

    fn exmap_create(&mut self, name: abi::Name, size: u64, share_writable: bool) -> Result<u64, Error> {
        let cx = &mut *self.cx;
        cx.exmaps.create(&mut cx.morsels.lock(), self.guest, name, size, share_writable)
            .inspect(|&gpa| cx.notify.entered(self.guest, gpa, self.caller.cpu))
    }

    fn exmap_action(&mut self, region: u64, iov: u64, count: u64, op: abi::ExmapOp) -> Outcome<Unlocked<B::Format>> {
        let cx = &mut *self.cx;
        cx.exmaps.action(&mut cx.morsels.lock(), cx.devices.as_mut(), self.guest, self.caller.vcpu, region, iov, count, op)
            .unwrap_or_else(|e| Outcome::Answer(Err(e)))
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
        let (name, there) = {
            let dir = self.cx.morsels.lock();
            let hashed = crate::morsels::read_hashed(self.guest, dir.named.keys(), name)?;
            (*hashed.name(), dir.exists(&hashed))
        };
        self.cx.notify.watch(self.guest, self.caller.vcpu, &name, bits, there)
    }

    fn world(&mut self) -> (Under<'_, B>, &mut Guest<B>) {
        (Under { cx: &mut *self.cx, cpu: self.caller.cpu }, &mut *self.guest)
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
