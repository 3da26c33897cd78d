//! loom models of an ExMap region's batch lock as the hypervisor runs it
//! (`morsels::exmap`: `Exmaps::action`, `Batch::run`, `Batch::finish_alone` (no world lock),
//! `Exmaps::finish_batch` (under it), `hypercall::abandon`), with `RUSTFLAGS="--cfg loom" cargo test --release -p vmcore --lib loom`. Each
//! thread is a CPU; the world lock is a loom `Mutex` around what it guards in the hypervisor;
//! the code under test is [`RegionLock`] and `shootdown`'s `Mailboxes`/`Owed` themselves.
//! The glue between them (`Cpu::action`, `Cpu::finish_batch`) is the hypervisor's, step for
//! step.
//!
//! One page of the region maps `FRAME` (its leaf, an atomic: guests walk it with no lock). A
//! TLB is a flag per CPU ("cached"), set when that CPU's guest walks the present leaf, cleared
//! only by a shootdown's flush (`Cpus::flush`, run by `Mailboxes::service` before every guest
//! entry and at every exit). `FRAME` is reused (handed to the allocator, or taken again by
//! an ALLOC) in `Cpu::reuse`, which checks that no CPU caches it; a guest read through a
//! cached translation checks that it was not reused. Exhaustive (no preemption bound): the
//! models (a)-(d) take about 4 s together in release; (e), branch `exmap-lockless`, well
//! under 1 s.
//!
//! Mutations tried by hand (each restored; docs/src/notes/region-lock.md#model-checked):
//!
//! | mutation | model that fails | loom's message |
//! | --- | --- | --- |
//! | R1: the mounter count read in `action` (before the leaf is cleared) and given to `end` | (a) | "frame 0x5000 reused while CPU 1 may still cache a translation to it" |
//! | R2: `Held::targets` ignores the mounters (`Targets::Caller` for a caller that stays) | (a), (d) | the same |
//! | R3: `admit(Destroy)` ignores the lock | (b) | "the region is gone at the end of its batch" |
//! | R4: `end` keeps the lock for a gone caller (abandon does not give it back) | (c) gone | "the next batch cannot take the region's lock" |
//! | R5: a gone caller's cache drained straight to the allocator (the hypervisor's `finish_batch` before this branch) | (c) gone | "frame 0x5000 reused while CPU 1 may still cache a translation to it" |
//! | R6: `Caller::Gone.cache()` is `Keep` (the gone vCPU's state kept) | (c) gone | "a frame was lost" |
//! | R7: a stopped caller's cache drained straight to the allocator in `finish_batch` | (c) stopped | "frame 0x5000 reused while CPU 1 may still cache a translation to it" |
//! | R8: the last vCPU's end does not drain the parked caches | (c) stopped, (c) gone | "a frame was lost" |
//! | R9: `end` gives the lock back `Relaxed` (not Release) | (d) | "frame 0x5000 reused while CPU 1 may still cache a translation to it" |
//! | R10: `admit(Mount)` ignores the lock (a mount made during a batch is not counted) | (a), (d) | the same |
//! | R11: `finish_alone` shoots down the caller's CPUs only (ignores the mounts counted at the take) | (d) | the same |
//!
//! | R12: `take_fast` ignores the generation (CAS on the held bit of whatever word is there) | (e) | "a fast take succeeded after the caller's unmount" |
//! | R13: `take_fast` checks the generation with a load, then takes the held bit by a CAS of its own (the mount / generation check before the CAS, not in it) | (e) | "the fast path's batch reached region 0 in its slot (its handle named region 1)" / loom's causality violation on the region |
//! | R14: a guest unmount does not bump the generation (`changed` left out) | (e) | "a fast take succeeded after the caller's unmount" |
//! | R15: `admit` reads the held bit, then bumps the generation (two operations, not one RMW) | (e) with the device mount | "the fast path's batch reached region 0 in its slot (its handle named region 1)" / causality violation |
//! | R16: `admit(Mount)` ignores the batch count | (f) | causality violation on a leaf cell |
//! | R17: `end` clears bit 0 instead of subtracting one batch | (f) | the mount never gets in (loom: maximum number of branches) |
//! | R18: `take_fast` checks the generation with a load, then adds its batch by `fetch_add` | (f) | causality violation on a leaf cell |
//! | R19: `Leaves::try_map` writes its entry (no CAS from the empty one) | (g) | "every frame in exactly one place": a frame lost |
//! | R20: `Leaves::take` reads, then writes the empty entry (no CAS) | (g) | the same: a frame in two caches |
//! | R21: `open` does not join the region's sharers (`RegionCell::sharers`, what `Targets::Everyone` shoots down) | (a) alone, (d) | "frame 0x5000 reused while CPU 1 may still cache a translation to it" |
//!
//! R1 was tried on the protocol before `exmap-call` (the count read at the end, under the
//! world lock, with mounts going on during batches). It is the protocol now: the count is
//! read at the take, which is sound only because mounts retry while the lock is held; R10
//! removes that, and fails.

use super::*;
use crate::shootdown::{Cpus, Kept, Mailboxes, Owed};
use crate::sync::{spin, AtomicU64, Ordering};
use alloc::vec::Vec;
use loom::sync::atomic::AtomicBool;
use loom::sync::{Arc, Mutex, MutexGuard};
use loom::thread;

const N: usize = 2;
/// The frame the region's page maps at the start.
const FRAME: u64 = 0x5000;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = None;
    b.check(f);
}

/// What the world lock guards in these models.
struct Locked {
    /// The region's entry in the directory (`Named`): whether it exists, its guest mounts
    /// (`Morsel::mount_count`).
    exists: bool,
    mounters: u32,
    /// Guest 1, the batch's caller: its mount of the region, its state, its live vCPUs, the
    /// CPUs that ran them (`Guest::ran_on`); `gone`: out of the guest table.
    mounted: bool,
    stopped: bool,
    gone: bool,
    live_vcpus: u32,
    ran_on: u64,
    /// Every CPU that ran any guest (`shootdown::any_ran_on`, written under the lock).
    any_ran_on: u64,
    /// Guest 1 vCPU 0's frame cache while it is not in a batch (`Exmaps::vcpus`).
    parked: Option<Vec<u64>>,
}

/// What the CPUs of one model share.
struct World {
    world: Mutex<Locked>,
    /// The region's lock (`RegionCell::lock`: reached with or without the world lock).
    lock: RegionLock,
    /// Guest 1 was stopped or taken out of the table: the IPI's `attention` flag its
    /// stopper raises (after the change, under the world lock) for guest 1's CPU 0.
    attention: AtomicBool,
    /// `Guest::ran_on` (its lock-free copy, `guest::Shared::ran_on`) and `any_ran_on`: fixed
    /// in these models.
    ran_on: u64,
    any_ran_on: u64,
    mb: Mailboxes<N>,
    /// The region's leaf for the page: present (maps `FRAME`) or cleared.
    leaf: AtomicBool,
    /// Per CPU: a translation to `FRAME` may be cached there.
    cached: [AtomicBool; N],
    /// The CPUs of every guest that mounted the region (`crate::region::RegionCell::sharers`): guest
    /// 1's CPU 0 from the start (its creator's mount), OR-ed in by each `open` under the
    /// world lock; what a shootdown beyond the caller reaches (`Targets::Everyone`).
    sharers: AtomicU64,
    /// How many times `FRAME` was reused.
    reused: AtomicU64,
    /// The region's frames went back to the allocator (`morsel_destroy`'s `Removed::free`).
    destroyed: AtomicBool,
    /// CPUs that finished their part (the idle ones answer until every other did).
    finished: AtomicU64,
}

impl World {
    fn new(l: Locked) -> Arc<Self> {
        let (ran_on, any_ran_on) = (l.ran_on, l.any_ran_on);
        Arc::new(World {
            world: Mutex::new(l),
            lock: RegionLock::new(),
            attention: AtomicBool::new(false),
            ran_on,
            any_ran_on,
            mb: Mailboxes::new(),
            leaf: AtomicBool::new(true),
            cached: core::array::from_fn(|_| AtomicBool::new(false)),
            sharers: AtomicU64::new(0b01),
            reused: AtomicU64::new(0),
            destroyed: AtomicBool::new(false),
            finished: AtomicU64::new(0),
        })
    }
}

/// The region mounted by guest 1 only, its vCPU 0 on CPU 0; CPU 1 ran a guest.
fn start() -> Locked {
    Locked {
        exists: true,
        mounters: 1,
        mounted: true,
        stopped: false,
        gone: false,
        live_vcpus: 1,
        ran_on: 0b01,
        any_ran_on: 0b11,
        parked: Some(Vec::new()),
    }
}

/// One CPU of the model.
struct Cpu {
    me: usize,
    w: Arc<World>,
}

impl Cpus for Cpu {
    fn me(&self) -> usize {
        self.me
    }
    fn send(&self, _cpu: usize) {
        // The IPI: the target answers at its next `service` (every guest entry and exit, the
        // idle loop; the interrupt handler runs the same).
    }
    fn flush(&self, cpu: usize) {
        self.w.cached[cpu].store(false, Ordering::Relaxed);
    }
    fn answer(&self) {
        self.w.mb.service(self.me, self);
    }
}

/// Why guest 1 vCPU 0's `exmap_action` did not start a batch.
#[derive(Debug, PartialEq)]
enum NoBatch {
    /// Its guest is stopped: the vCPU ends instead of calling.
    Stopped,
    /// The region is not mounted (or gone): `NotFound`.
    NotFound,
}

impl Cpu {
    fn new(me: usize, w: &Arc<World>) -> Self {
        Cpu { me, w: w.clone() }
    }

    fn lock(&self) -> MutexGuard<'_, Locked> {
        self.w.world.lock().unwrap()
    }

    /// Its guest runs for a moment and reads the page: the CPU answers before the entry (the
    /// flush before every entry), the guest reads through its TLB or walks the leaf (a TLB
    /// fill), exits, and the CPU answers again.
    fn read(&self) {
        self.w.mb.service(self.me, self);
        let w = &self.w;
        let hit = w.cached[self.me].load(Ordering::Relaxed) || {
            let present = w.leaf.load(Ordering::Relaxed);
            if present {
                w.cached[self.me].store(true, Ordering::Relaxed);
            }
            present
        };
        if hit {
            assert_eq!(w.reused.load(Ordering::Relaxed), 0, "CPU {}'s guest read frame {FRAME:#x} after it was reused", self.me);
        }
        self.w.mb.service(self.me, self);
    }

    /// `frame` is reused (the allocator has it, or an ALLOC took it from the vCPU cache to
    /// fill with other data): no CPU may cache a translation to it.
    fn reuse(&self, frame: u64) {
        for (cpu, c) in self.w.cached.iter().enumerate() {
            assert!(!c.load(Ordering::Relaxed), "frame {frame:#x} reused while CPU {cpu} may still cache a translation to it");
        }
        self.w.reused.fetch_add(1, Ordering::Relaxed);
    }

    /// `Exmaps::action` of an ALLOC / FREE on the region by guest 1 vCPU 0 (the world lock
    /// held): the batch takes the region's lock and the vCPU's cache. Retries while another
    /// batch holds it.
    fn action(&self) -> Result<(Held, Vec<u64>), NoBatch> {
        loop {
            let mut l = self.lock();
            if l.stopped {
                return Err(NoBatch::Stopped);
            }
            if !l.mounted || !l.exists {
                return Err(NoBatch::NotFound);
            }
            let mounters = l.mounters;
            match self.w.lock.take(mounters) {
                Ok(held) => {
                    let cache = l.parked.take().unwrap_or_default();
                    return Ok((held, cache));
                }
                Err(Refusal::Retry) => {
                    drop(l);
                    thread::yield_now();
                }
                Err(Refusal::Busy) => unreachable!("an action is never refused Busy by the lock"),
            }
        }
    }

    /// `Exmaps::finish_batch` (the world lock held, `owed`: this CPU's `Owed`): the
    /// shootdown requested, the vCPU's cache put back or kept until the acknowledgments, the
    /// lock given back. The caller then lets go of the lock and settles
    /// (`shootdown::complete`).
    fn finish_batch(&self, held: Held, cleared: bool, cache: Vec<u64>, owed: &mut Owed<N>) {
        let mut l = self.lock();
        assert!(l.exists, "the region is gone at the end of its batch");
        let caller = if l.gone { Caller::Gone } else { Caller::Stays };
        let mask = match held.targets(cleared, caller) {
            // `shootdown::guest`: the CPUs that ran its vCPUs, while it has live ones.
            Some(Targets::Caller) if l.live_vcpus > 0 => l.ran_on,
            Some(Targets::Everyone) => self.w.sharers.load(Ordering::SeqCst),
            _ => 0,
        };
        if mask != 0 {
            owed.request(&self.w.mb, self, mask);
        }
        match caller.cache() {
            Cache::Keep => l.parked = Some(cache),
            // `shootdown::After`: into this CPU's `Owed`.
            Cache::AfterAcks => {
                for f in cache {
                    let all = l.any_ran_on;
                    assert_eq!(owed.keep(f, &self.w.mb, self, all, |f| self.reuse(f)), Kept::Deferred);
                }
            }
        }
        self.w.lock.end(held);
    }

    /// `Batch::finish_alone` (no world lock), taken where no stop reached this CPU
    /// (`attention`): the caller stays, the shootdown is requested from the mounts counted
    /// at the take and the guest's CPUs, then the lock given back; the vCPU keeps its cache
    /// (its slot), then settles (`shootdown::complete`) before it enters its guest again.
    /// Returns the cache, or gives it back if a stop was seen (the locked `finish_batch`).
    fn finish_alone(&self, held: Held, cleared: bool, cache: Vec<u64>, owed: &mut Owed<N>) -> Result<Vec<u64>, (Held, Vec<u64>)> {
        if self.w.attention.load(Ordering::Acquire) {
            return Err((held, cache));
        }
        let mask = match held.targets(cleared, Caller::Stays) {
            Some(Targets::Caller) => self.w.ran_on,
            Some(Targets::Everyone) => self.w.sharers.load(Ordering::SeqCst),
            None => 0,
        };
        if mask != 0 {
            owed.request(&self.w.mb, self, mask);
        }
        self.w.lock.end(held);
        self.complete(owed);
        Ok(cache)
    }

    /// The batch's end either way (`sched::run_slice`): alone, or under the world lock and
    /// settled at its release. Returns the cache where the vCPU keeps it in its slot.
    fn end_batch(&self, held: Held, cleared: bool, cache: Vec<u64>, owed: &mut Owed<N>) -> Option<Vec<u64>> {
        match self.finish_alone(held, cleared, cache, owed) {
            Ok(cache) => Some(cache),
            Err((held, cache)) => {
                self.finish_batch(held, cleared, cache, owed);
                self.complete(owed);
                None
            }
        }
    }

    /// The vCPU's state kept in its slot goes back to `Exmaps::vcpus` under the world lock
    /// (`sched::unpark`, at the vCPU's next world-path exit or its end); a gone guest's
    /// through this CPU's `Owed`.
    fn unpark(&self, l: &mut Locked, slot: &mut Option<Vec<u64>>, owed: &mut Owed<N>) {
        if let Some(cache) = slot.take() {
            if l.gone {
                for f in cache {
                    let all = l.any_ran_on;
                    assert_eq!(owed.keep(f, &self.w.mb, self, all, |f| self.reuse(f)), Kept::Deferred);
                }
            } else {
                l.parked = Some(cache);
            }
        }
    }

    /// `shootdown::complete` at the release of the world lock.
    fn complete(&self, owed: &mut Owed<N>) {
        owed.settle(&self.w.mb, self, |f| self.reuse(f));
    }

    /// A vCPU of guest 1 ends (`vcpu_done`): the last one drains every parked cache straight
    /// to the allocator (`Exmaps::guest_ended`: their FREEs' acknowledgments came in before
    /// their vCPUs entered the guest again, or ended).
    fn vcpu_done(&self, l: &mut Locked) {
        if l.gone {
            return;
        }
        l.live_vcpus -= 1;
        if l.live_vcpus == 0 {
            for f in l.parked.take().unwrap_or_default() {
                self.reuse(f);
            }
        }
    }

    /// The idle loop (no vCPU to run): answers until `all` CPUs finished.
    fn idle(&self, all: u64) {
        while self.w.finished.load(Ordering::Acquire) < all {
            self.w.mb.service(self.me, self);
            spin();
        }
    }

    fn done(&self) {
        self.w.finished.fetch_add(1, Ordering::AcqRel);
    }
}

/// `morsel_open` of the region by guest 2 (it runs on CPU 1 already: `any_ran_on`):
/// issued again while a batch holds the region (`Contender::Mount`); its CPU joins the
/// region's sharers (`Named::mounted`, under the lock) before the call returns.
fn open(cpu: &Cpu) {
    loop {
        let mut l = cpu.lock();
        match cpu.w.lock.admit(Contender::Mount) {
            Ok(()) => {
                l.mounters += 1;
                cpu.w.sharers.fetch_or(1 << cpu.me, Ordering::SeqCst);
                return;
            }
            Err(_) => {
                drop(l);
                thread::yield_now();
            }
        }
    }
}

/// (a) Guest 1 FREEs the page in a batch on CPU 0 while guest 2 opens the region (a mount)
/// and reads the page on CPU 1; guest 1's next call (an ALLOC) takes the freed frame from its
/// vCPU cache. The batch ends alone (no world lock, `finish_alone`) or under it
/// (`finish_batch`), by `alone`. Proves: a mount is made before the take (counted) or after
/// the end (it walks the cleared leaf), so the reader never reads the frame after its
/// reuse. Mutation R10 fails here ("frame 0x5000 reused while CPU 1 may still cache a
/// translation to it").
fn free_batch_vs_mount(alone: bool) {
    model(move || {
        let w = World::new(start());
        if !alone {
            w.attention.store(true, Ordering::Relaxed);
        }
        let reader = {
            let w = w.clone();
            thread::spawn(move || {
                let cpu = Cpu::new(1, &w);
                open(&cpu);
                cpu.read();
                cpu.read();
                cpu.done();
                cpu.idle(2);
            })
        };
        let cpu = Cpu::new(0, &w);
        let mut owed = Owed::<N>::new();
        owed.reserve(1);
        let (held, mut cache) = cpu.action().unwrap();
        // `Batch::run`, no world lock: the leaf cleared, its frame into the vCPU's cache.
        w.leaf.store(false, Ordering::Relaxed);
        cache.push(FRAME);
        let mut slot = cpu.end_batch(held, true, cache, &mut owed);
        // The vCPU enters its guest again, whose next call ALLOCs another page: the frame
        // leaves the cache for new data.
        let cache = {
            let mut l = cpu.lock();
            cpu.unpark(&mut l, &mut slot, &mut owed);
            l.parked.take().unwrap()
        };
        for f in cache {
            cpu.reuse(f);
        }
        cpu.done();
        cpu.idle(2);
        reader.join().unwrap();
        assert_eq!(w.reused.load(Ordering::Relaxed), 1);
        assert!(!w.lock.is_held());
    });
}

#[test]
fn loom_free_batch_shoots_down_mounts_made_during_it() {
    free_batch_vs_mount(false);
}

/// (d) (a) with the batch ended alone, no world lock. Mutations R9, R10, R11 fail here
/// (R9 only here: in (a) the world lock orders the release).
#[test]
fn loom_free_batch_ended_alone_vs_mount() {
    free_batch_vs_mount(true);
}

/// (b) Guest 1 vCPU 0 runs an ALLOC batch on CPU 0 (it maps a frame into the leaf) while its
/// vCPU 1 on CPU 1 destroys the region (refused: mounted), unmounts it and destroys it again
/// until that goes. Proves: destroy never frees the region's frames while a batch holds the
/// region's lock, and the batch always finds its region at its end. Mutation R3 fails here
/// ("the region is gone at the end of its batch").
#[test]
fn loom_destroy_waits_for_the_batch() {
    model(|| {
        let w = World::new(start());
        // The page is not populated: the ALLOC maps it.
        w.leaf.store(false, Ordering::Relaxed);
        let destroyer = {
            let w = w.clone();
            thread::spawn(move || {
                let cpu = Cpu::new(1, &w);
                // `Directory::destroy`: the lock's verdict, then the mounts.
                let destroy = || -> Result<(), Refusal> {
                    let mut l = cpu.lock();
                    w.lock.admit(Contender::Destroy)?;
                    if l.mounters > 0 {
                        return Err(Refusal::Busy);
                    }
                    l.exists = false;
                    drop(l);
                    // `Removed::free`, no lock.
                    w.destroyed.store(true, Ordering::Relaxed);
                    Ok(())
                };
                assert_eq!(destroy(), Err(Refusal::Busy), "destroyed while mounted");
                {
                    let mut l = cpu.lock();
                    l.mounted = false;
                    l.mounters -= 1;
                }
                while destroy().is_err() {
                    thread::yield_now();
                }
            })
        };
        let cpu = Cpu::new(0, &w);
        let mut owed = Owed::<N>::new();
        if let Ok((held, cache)) = cpu.action() {
            // `Batch::run`: an ALLOC maps a frame into the leaf.
            assert!(!w.destroyed.load(Ordering::Relaxed), "destroy freed the region's frames while a batch edits its leaves");
            w.leaf.store(true, Ordering::Relaxed);
            assert!(!w.destroyed.load(Ordering::Relaxed), "destroy freed the region's frames while a batch edits its leaves");
            // Ended alone (no world lock): the lock's release orders the leaf's edit
            // before the destroy it admits.
            let mut slot = cpu.end_batch(held, false, cache, &mut owed);
            let mut l = cpu.lock();
            cpu.unpark(&mut l, &mut slot, &mut owed);
        }
        destroyer.join().unwrap();
        let l = cpu.lock();
        assert!(!l.exists && w.destroyed.load(Ordering::Relaxed));
        assert!(!w.lock.is_held());
    });
}

/// How guest 1 is stopped in model (c).
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// Stopped by its other vCPU (a fault): the batch's vCPU finishes its call and ends at
    /// its next entry.
    Stopped,
    /// Out of the guest table while its batch runs (`hypercall::abandon`'s case).
    Gone,
}

/// (c) Guest 1 FREEs the page in a batch on CPU 0; the region is mounted by guest 2 as well,
/// which reads the page on CPU 1, where guest 1's vCPU 1 faults and stops guest 1 (at any
/// point: before the call, between its two world-lock sections, after it).
fn stopped_in_a_call(stop: Stop) {
    model(move || {
        let mut l = start();
        l.mounters = 2;
        l.live_vcpus = 2;
        l.ran_on = 0b11;
        let w = World::new(l);
        // Guest 2 mounted it on CPU 1 (and guest 1 runs there too).
        w.sharers.store(0b11, Ordering::SeqCst);
        let other = {
            let w = w.clone();
            thread::spawn(move || {
                let cpu = Cpu::new(1, &w);
                cpu.read();
                {
                    // Guest 1's vCPU 1 faults: the guest is stopped, that vCPU ends.
                    let mut l = cpu.lock();
                    l.stopped = true;
                    cpu.vcpu_done(&mut l);
                    if stop == Stop::Gone && w.lock.is_held() {
                        // Out of the table while the batch runs (its vCPU's cache is in the
                        // batch, not parked: `guest_ended` finds nothing of it).
                        l.gone = true;
                    }
                    // `kick_siblings`: CPU 0 takes the world lock before its next entry.
                    w.attention.store(true, Ordering::Release);
                }
                cpu.read();
                cpu.done();
                cpu.idle(2);
            })
        };
        let cpu = Cpu::new(0, &w);
        let mut owed = Owed::<N>::new();
        owed.reserve(1);
        let mut slot = None;
        if let Ok((held, mut cache)) = cpu.action() {
            w.leaf.store(false, Ordering::Relaxed);
            cache.push(FRAME);
            slot = cpu.end_batch(held, true, cache, &mut owed);
        }
        // The vCPU's next entry: its guest is stopped (or gone), it ends.
        loop {
            let mut l = cpu.lock();
            cpu.unpark(&mut l, &mut slot, &mut owed);
            if l.stopped {
                cpu.vcpu_done(&mut l);
                break;
            }
            drop(l);
            thread::yield_now();
        }
        cpu.done();
        cpu.idle(2);
        other.join().unwrap();
        // A gone guest's parked cache went through `Owed` at the unpark.
        cpu.complete(&mut owed);
        let l = cpu.lock();
        // The frame: still mapped, or reused exactly once.
        let mapped = w.leaf.load(Ordering::Relaxed);
        let reused = w.reused.load(Ordering::Relaxed);
        assert!(mapped || reused > 0, "a frame was lost");
        assert_eq!(reused, !mapped as u64, "a frame was freed twice, or freed while mapped");
        assert!(owed.is_empty());
        // The next batch on the region (guest 2's) takes the lock.
        let next = w.lock.take(l.mounters);
        assert!(next.is_ok(), "the next batch cannot take the region's lock");
        w.lock.end(next.unwrap());
    });
}

/// (c) with guest 1 stopped by its other vCPU. Proves: the batch ends normally, its vCPU
/// ends after its acknowledgments, the frame comes back once, the lock is free. Mutations R7
/// ("frame 0x5000 reused while CPU 1 may still cache a translation to it") and R8 ("a frame
/// was lost") fail here.
#[test]
fn loom_guest_stopped_in_a_batch() {
    stopped_in_a_call(Stop::Stopped);
}

/// (c) with guest 1 gone while its batch runs (`hypercall::abandon`). Proves: the lock is
/// given back, the frame comes back once and only after every CPU that may cache it flushed.
/// Mutations R4 ("the next batch cannot take the region's lock"), R5 ("frame 0x5000 reused
/// while CPU 1 may still cache a translation to it"), R6 and R8 ("a frame was lost") fail
/// here.
#[test]
fn loom_guest_gone_during_a_batch() {
    stopped_in_a_call(Stop::Gone);
}

/// (e) Branch `exmap-lockless`: guest 1's vCPU on CPU 0 holds a handle to region 1 (made by
/// a world-path take) and takes the region's lock twice with it, no world lock, running a
/// "batch" (an edit of the slot's region, a loom `UnsafeCell`, checked to be region 1)
/// each time it got it. CPU 1, under the world lock, meanwhile unmounts guest 1's mount of
/// it (a bump), destroys it (admitted once no batch holds it: the slot's region freed,
/// written 0), makes region 2 in the same slot (slot reuse: a bump) and mounts it into
/// guest 1 at the same address (a bump), then runs a world-path batch on region 2. The fast
/// take never succeeds once the unmount is done, never reaches a destroyed or reused slot,
/// and never overlaps a destroy or the new region's batch (loom's causality check on the
/// cell).
#[test]
fn loom_fast_take_vs_unmount_destroy_reuse() {
    fast_take_model(false);
}

/// (e) with a device mount of the region first (`Directory::device_mount`, while guest 1
/// still has it mounted): admitted, it builds a view from the region's leaves (a read of
/// the cell) that no fast batch may overlap; refused `Busy` while a fast take holds the lock.
#[test]
fn loom_fast_take_vs_device_mount_unmount_destroy_reuse() {
    fast_take_model(true);
}

fn fast_take_model(device_mount: bool) {
    model(move || {
        struct Slot {
            lock: RegionLock,
            /// Which region the slot holds (0: none): written by destroy and create under the
            /// world lock, read and written by a batch under the region's lock.
            region: loom::cell::UnsafeCell<u32>,
            /// Guest 1's unmount of region 1 is done (set after it, under the world lock).
            unmounted: AtomicBool,
            world: Mutex<()>,
        }
        // SAFETY (model): `region` is only reached under the region's lock (batches) or
        // under the world lock with the lock seen free (destroy, create): loom checks it.
        unsafe impl Sync for Slot {}
        let slot = Arc::new(Slot {
            lock: RegionLock::new(),
            region: loom::cell::UnsafeCell::new(1),
            unmounted: AtomicBool::new(false),
            world: Mutex::new(()),
        });
        // Guest 1's first call, under the world lock: the handle it keeps.
        let first = slot.lock.take(1).unwrap();
        let handle = first.handle();
        slot.lock.end(first);
        let s = slot.clone();
        let vcpu = thread::spawn(move || {
            for _ in 0..2 {
                let after_unmount = s.unmounted.load(Ordering::Acquire);
                if let Some(held) = s.lock.take_fast(&handle) {
                    assert!(!after_unmount, "a fast take succeeded after the caller's unmount");
                    s.region.with_mut(|r| {
                        // SAFETY (model): under the region's lock.
                        let r = unsafe { &mut *r };
                        assert_eq!(*r, 1, "the fast path's batch reached region {r} in its slot (its handle named region 1)");
                        *r = 1;
                    });
                    s.lock.end(held);
                }
                thread::yield_now();
            }
        });
        if device_mount {
            let _w = slot.world.lock().unwrap();
            if slot.lock.admit(Contender::DeviceMount).is_ok() {
                // SAFETY (model): the world lock held and the lock seen free in the admit.
                slot.region.with(|r| assert_eq!(unsafe { *r }, 1));
            }
        }
        {
            let _w = slot.world.lock().unwrap();
            // morsel_unmount (Directory::unmount).
            slot.lock.changed();
            slot.unmounted.store(true, Ordering::Release);
        }
        loop {
            let _w = slot.world.lock().unwrap();
            // morsel_destroy: Busy while a batch holds it; the guest issues it again.
            if slot.lock.admit(Contender::Destroy).is_ok() {
                // SAFETY (model): the world lock held and the lock seen free in the admit.
                slot.region.with_mut(|r| unsafe { *r = 0 });
                break;
            }
            drop(_w);
            spin();
        }
        {
            let _w = slot.world.lock().unwrap();
            // exmap_create into the same slot (`RegionCell::reset`), then its mount into
            // guest 1 at the same address (`Directory::open`).
            slot.lock.changed();
            // SAFETY (model): as for the destroy: no batch can hold a freed slot's lock.
            slot.region.with_mut(|r| unsafe { *r = 2 });
            assert_eq!(slot.lock.admit(Contender::Mount), Ok(()));
        }
        loop {
            let w = slot.world.lock().unwrap();
            // A world-path batch on region 2 (retried while a stale fast take holds the bit).
            match slot.lock.take(1) {
                Ok(held) => {
                    drop(w);
                    slot.region.with_mut(|r| {
                        // SAFETY (model): under the region's lock.
                        let r = unsafe { &mut *r };
                        assert_eq!(*r, 2);
                    });
                    slot.lock.end(held);
                    break;
                }
                Err(_) => {
                    drop(w);
                    spin();
                }
            }
        }
        vcpu.join().unwrap();
        assert!(!slot.lock.is_held());
    });
}

/// (f) branch `sharedcas`: ALLOC / FREE batches share the region's lock; an exclusive
/// contender (a guest mount, `Directory::open` with `admit_in_turn`) is admitted only when
/// none holds it. vCPU A (CPU 0) runs two batches back to back by fast takes (each given up
/// where its handle is refused: the world path is B's); vCPU B (CPU 1) runs one world-path
/// batch (`admit_in_turn(Action)`, `take`; given up where refused: the guest would retry);
/// CPU 2 mounts the region (retried until admitted), reading every leaf the batches write
/// (one loom `UnsafeCell` per vCPU: its own pages). Loom's causality check fails where the
/// mount overlaps a batch or does not see its edits; at the end the lock is free (no lost
/// release) and a destroy is admitted.
#[test]
fn loom_shared_batches_vs_an_exclusive_contender() {
    model(|| {
        struct R {
            lock: RegionLock,
            /// Pages of vCPU A and of vCPU B: edited by their batches with the lock held
            /// shared, read by the mount with it excluded.
            leaves: [loom::cell::UnsafeCell<u32>; 2],
            /// The region's guest mounts, under the world lock.
            world: Mutex<u32>,
        }
        // SAFETY (model): each leaf cell is written by its own vCPU's batches only, and read by
        // the mount only once admitted: loom checks that.
        unsafe impl Sync for R {}
        const A: u64 = 1;
        const B: u64 = 2;
        const C: u64 = 3;
        let turn = |who| Turn { who, now: 0, patience: u64::MAX / 2 };
        let r = Arc::new(R { lock: RegionLock::new(), leaves: [loom::cell::UnsafeCell::new(0), loom::cell::UnsafeCell::new(0)], world: Mutex::new(1) });
        // vCPU A's first call, under the world lock: the handle it keeps.
        let first = r.lock.take(1).unwrap();
        let handle = first.handle();
        r.lock.end(first);
        // A batch of vCPU `k`: a fast take with `handle` if any, else the world path.
        fn batch(r: &R, k: usize, who: u64, handle: Option<&Handle>, turn: impl Fn(u64) -> Turn) -> bool {
            let held = match handle.map(|h| r.lock.take_fast(h)) {
                Some(Some(held)) => held,
                Some(None) => return false,
                None => {
                    let mounters = r.world.lock().unwrap();
                    if r.lock.admit_in_turn(Contender::Action, turn(who)).is_err() {
                        return false;
                    }
                    r.lock.take(*mounters).unwrap()
                }
            };
            // SAFETY (model): this vCPU's own pages, under the region's lock (shared).
            r.leaves[k].with_mut(|l| unsafe { *l += 1 });
            r.lock.end(held);
            true
        }
        let ra = r.clone();
        let a = thread::spawn(move || (0..2).filter(|_| batch(&ra, 0, A, Some(&handle), turn)).count());
        let rb = r.clone();
        let b = thread::spawn(move || batch(&rb, 1, B, None, turn) as usize);
        loop {
            let mut mounters = r.world.lock().unwrap();
            if r.lock.admit_in_turn(Contender::Mount, turn(C)).is_ok() {
                // SAFETY (model): admitted: no batch holds the lock (loom checks it).
                let seen: u32 = r.leaves.iter().map(|l| l.with(|v| unsafe { *v })).sum();
                assert!(seen <= 3);
                *mounters += 1;
                break;
            }
            drop(mounters);
            spin();
        }
        let done = a.join().unwrap() + b.join().unwrap();
        assert!(!r.lock.is_held(), "a batch's release was lost");
        assert_eq!(r.lock.admit(Contender::Destroy), Ok(()), "the region is free after {done} batches");
    });
}

/// (g) branch `sharedcas`: two vCPUs' ALLOC and FREE batches on one page of one region at
/// once, the `exmap` crate's own code (`exmap::alloc`, `exmap::free`, their leaf
/// compare-and-swaps `Leaves::try_map` / `Leaves::take`) over tables of loom atomics. The
/// page maps frame `F0` at the start; vCPU 0's cache holds `F1`, vCPU 1's `F2`; vCPU 0 FREEs
/// then ALLOCs the page, vCPU 1 ALLOCs then FREEs it. At the end every frame is in exactly one
/// place (the leaf or one cache): none lost, none mapped twice, none in two caches; and each
/// entry's result says what its vCPU did (an ALLOC's 1: its frame left its cache; a FREE's 1:
/// a frame came in).
#[test]
fn loom_two_vcpus_alloc_and_free_one_leaf() {
    use exmap::{encode, FrameCache, Region, Validator};
    use morsel::{FrameAlloc, HostPhysAddr, Morsel, Npt, PhysMem};
    use std::sync::{Arc as StdArc, Mutex as StdMutex};

    /// Table frames of loom atomics (data frames are not backed): made before the threads
    /// start, looked up under a std mutex (never held across a loom operation).
    struct LoomMem {
        tables: StdMutex<Vec<(u64, StdArc<[AtomicU64; 512]>)>>,
        next: StdMutex<u64>,
    }
    impl LoomMem {
        fn table(&self, t: HostPhysAddr) -> StdArc<[AtomicU64; 512]> {
            let tables = self.tables.lock().unwrap();
            tables.iter().find(|(a, _)| *a == t.as_u64()).expect("a table").1.clone()
        }
    }
    impl PhysMem for LoomMem {
        fn read(&self, t: HostPhysAddr, i: usize) -> u64 {
            self.table(t)[i].load(Ordering::Acquire)
        }
        fn write(&self, t: HostPhysAddr, i: usize, v: u64) {
            self.table(t)[i].store(v, Ordering::Release)
        }
        fn zero_table(&self, t: HostPhysAddr) {
            self.tables.lock().unwrap().push((t.as_u64(), StdArc::new(core::array::from_fn(|_| AtomicU64::new(0)))));
        }
        fn zero_data(&self, _: HostPhysAddr, _: u32) {}
        fn compare_exchange(&self, t: HostPhysAddr, i: usize, current: u64, new: u64) -> Result<u64, u64> {
            self.table(t)[i].compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
        }
        fn swap(&self, t: HostPhysAddr, i: usize, new: u64) -> u64 {
            self.table(t)[i].swap(new, Ordering::AcqRel)
        }
    }
    impl FrameAlloc for LoomMem {
        fn alloc(&self, _: u32) -> Option<HostPhysAddr> {
            let mut n = self.next.lock().unwrap();
            *n += 4096;
            Some(HostPhysAddr::new(*n))
        }
        fn free(&self, _: HostPhysAddr, _: u32) {}
    }
    /// No frame from the allocator during the batches: each vCPU's cache holds its one.
    struct NoFrames;
    impl FrameAlloc for NoFrames {
        fn alloc(&self, _: u32) -> Option<HostPhysAddr> {
            None
        }
        fn free(&self, _: HostPhysAddr, _: u32) {}
    }
    fn code(_: exmap::EntryError) -> u64 {
        u64::MAX
    }
    const ORIGIN: exmap::Origin = 7;
    const F: [u64; 3] = [0x10_0000, 0x20_0000, 0x30_0000];

    model(|| {
        let mem = Arc::new(LoomMem { tables: StdMutex::new(Vec::new()), next: StdMutex::new(0) });
        let m = Arc::new(Morsel::<Npt>::create_sparse(4096, &*mem, &*mem).unwrap());
        let page = [encode(0, 1)];
        {
            // The page maps F0 at the start.
            let mut cache = FrameCache::new();
            cache.give(HostPhysAddr::new(F[0]), ORIGIN);
            let r = Region { morsel: &*m, origin: ORIGIN, mem: &*mem };
            let mut iov = page;
            exmap::alloc(&r, &mut iov, &mut Validator::new(), &mut cache, &NoFrames, &mut |_, _| {}, code);
            assert_eq!(iov, [1]);
        }
        let vcpu = |k: usize| {
            let (mem, m) = (mem.clone(), m.clone());
            thread::spawn(move || {
                let r = Region { morsel: &*m, origin: ORIGIN, mem: &*mem };
                let (mut cache, mut v) = (FrameCache::new(), Validator::new());
                cache.give(HostPhysAddr::new(F[k + 1]), ORIGIN);
                cache.reserve(4).unwrap();
                for free in [k == 0, k != 0] {
                    let before = cache.len();
                    let mut iov = page;
                    match free {
                        true => exmap::free(&r, &mut iov, &mut v, &mut cache, &mut |_, _| {}, code),
                        false => exmap::alloc(&r, &mut iov, &mut v, &mut cache, &NoFrames, &mut |_, _| {}, code),
                    };
                    let moved = if free { cache.len() - before } else { before - cache.len() };
                    assert_eq!(iov[0], moved as u64, "vCPU {k}'s {} answered {} but moved {moved} frames", ["ALLOC", "FREE"][free as usize], iov[0]);
                }
                let held = Collect(core::cell::RefCell::new(Vec::new()));
                cache.drain(&held);
                held.0.into_inner()
            })
        };
        /// Where a drained cache's frames go: a list.
        struct Collect(core::cell::RefCell<Vec<u64>>);
        impl FrameAlloc for Collect {
            fn alloc(&self, _: u32) -> Option<HostPhysAddr> {
                None
            }
            fn free(&self, f: HostPhysAddr, _: u32) {
                self.0.borrow_mut().push(f.as_u64());
            }
        }
        let (t0, t1) = (vcpu(0), vcpu(1));
        let mut all = t0.join().unwrap();
        all.extend(t1.join().unwrap());
        all.extend(m.translate(0, &*mem).map(|f| f.as_u64()));
        all.sort_unstable();
        assert_eq!(all, F, "every frame in exactly one place (the leaf or one vCPU's cache)");
    });
}
