//! loom models of the shootdown and deferred-free protocol as the hypervisor runs it, with
//! `RUSTFLAGS="--cfg loom" cargo test --release -p vmcore --lib loom`. Each thread is a CPU;
//! the code under test is `Mailboxes`/`Owed` itself (the same functions the hypervisor calls,
//! over loom's atomics). A translation a CPU may still use is a flag per CPU ("cached"): set
//! when its guest reads the entry while it is present (a TLB fill), cleared by
//! [`Cpus::flush`]. The one property: no frame reaches the allocator (`free`) while any CPU's
//! flag is set. A wait that can never end fails too (loom reports it).

use super::*;
use loom::sync::atomic::AtomicBool;
use loom::sync::{Arc, Mutex};
use loom::thread;

fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(f);
}

/// What the CPUs of one model share: the mailboxes, the entry, who caches it, who is done.
struct World<const N: usize> {
    mb: Mailboxes<N>,
    /// The second-level entry every CPU's guest may read (cleared by the unmount/FREE).
    entry: AtomicBool,
    /// Per CPU: a translation of `entry` may still be cached there.
    cached: [AtomicBool; N],
    /// Frames given to the allocator.
    freed: AtomicU64,
    /// CPUs that finished their part (the idle ones answer until every other did).
    finished: AtomicU64,
    /// Per CPU: an IPI is pending (kept only by models that set `track_ipi`; the others
    /// treat an IPI as answered at the target's next `service`).
    ipi: [AtomicBool; N],
    track_ipi: bool,
}

impl<const N: usize> World<N> {
    fn new() -> Arc<Self> {
        Self::with_ipis(false)
    }

    fn with_ipis(track_ipi: bool) -> Arc<Self> {
        Arc::new(World {
            mb: Mailboxes::new(),
            entry: AtomicBool::new(true),
            cached: core::array::from_fn(|_| AtomicBool::new(false)),
            freed: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            ipi: core::array::from_fn(|_| AtomicBool::new(false)),
            track_ipi,
        })
    }

    /// The allocator: the frame must not be reachable through any CPU's TLB.
    fn free(&self, frame: u64) {
        for (cpu, c) in self.cached.iter().enumerate() {
            assert!(!c.load(Ordering::Relaxed), "frame {frame:#x} freed while CPU {cpu} may still cache a translation to it");
        }
        self.freed.fetch_add(1, Ordering::Relaxed);
    }
}

/// One CPU of the model.
struct Cpu<const N: usize> {
    me: usize,
    w: Arc<World<N>>,
}

impl<const N: usize> Cpus for Cpu<N> {
    fn me(&self) -> usize {
        self.me
    }
    fn send(&self, cpu: usize) {
        // The IPI: the target answers at its next `service` (every guest exit, the idle
        // loop; the interrupt handler runs the same). Model (e) also makes it end the
        // target's guest mode.
        if self.w.track_ipi {
            self.w.ipi[cpu].store(true, Ordering::Release);
        }
    }
    fn flush(&self, cpu: usize) {
        self.w.cached[cpu].store(false, Ordering::Relaxed);
    }
    fn answer(&self) {
        self.w.mb.service(self.me, self);
    }
}

impl<const N: usize> Cpu<N> {
    fn new(me: usize, w: &Arc<World<N>>) -> Self {
        Cpu { me, w: w.clone() }
    }

    /// Its guest runs for a moment (a TLB fill reads the entry), then exits and the CPU
    /// answers its requests (as before every entry).
    fn guest_step(&self) {
        if self.w.entry.load(Ordering::Relaxed) {
            self.w.cached[self.me].store(true, Ordering::Relaxed);
        }
        self.w.mb.service(self.me, self);
    }

    /// The idle loop (no vCPU to run): answers until `others` CPUs finished.
    fn idle(&self, others: u64) {
        while self.w.finished.load(Ordering::Acquire) < others {
            self.w.mb.service(self.me, self);
            spin();
        }
    }

    fn done(&self) {
        self.w.finished.fetch_add(1, Ordering::AcqRel);
    }

    /// CPU 0's part of (a) and (e): under the world lock it clears the entry, keeps the frame
    /// behind it (`After::free`) and requests the shootdown of `mask` (as
    /// `vm::shootdown::cpus` does: the acknowledgments go straight into the record); the lock
    /// let go (`complete`), it waits and frees. Returns the IPIs it sent.
    fn free_behind_shootdown(&self, mask: u64) -> u32 {
        let w = &self.w;
        let mut owed = Owed::<N>::new();
        owed.reserve(1);
        w.entry.store(false, Ordering::Relaxed);
        assert_eq!(owed.keep(FRAME, &w.mb, self, mask, |f| w.free(f)), Kept::Deferred);
        let sent = owed.request(&w.mb, self, mask);
        owed.settle(&w.mb, self, |f| w.free(f));
        sent
    }
}

const FRAME: u64 = 0x5000;

/// (a) CPU 0 clears the entry (an unmount or ExMap FREE under the world lock), keeps the frame
/// behind it in its `Owed`, requests the shootdown, lets go of the lock and settles; CPU 1,
/// which ran the guest and caches the translation, keeps running it and answering.
#[test]
fn loom_deferred_free_waits_for_flush() {
    model(3, || {
        let w = World::<2>::new();
        w.cached[1].store(true, Ordering::Relaxed);
        let t = {
            let w = w.clone();
            thread::spawn(move || {
                let cpu = Cpu::new(1, &w);
                cpu.guest_step();
                cpu.guest_step();
                cpu.idle(1);
            })
        };
        let cpu = Cpu::new(0, &w);
        assert_eq!(cpu.free_behind_shootdown(0b11), 1, "one IPI, to CPU 1");
        cpu.done();
        t.join().unwrap();
        assert_eq!(w.freed.load(Ordering::Relaxed), 1);
        assert!(w.mb.outstanding().is_empty());
    });
}

/// (b) CPU 0 unmounts a morsel CPU 2's guest caches (request under the world lock, wait after
/// it); CPU 1 then destroys the morsel and frees its frame behind `barrier`, while CPU 0 may
/// still be waiting. The frame must not be freed before CPU 2 flushed.
#[test]
fn loom_barrier_covers_other_cpus_unmount() {
    model(3, || {
        let w = World::<3>::new();
        w.cached[2].store(true, Ordering::Relaxed);
        // The world lock, and what it protects: is the morsel mounted.
        let world = Arc::new(Mutex::new(true));
        let target = {
            let w = w.clone();
            thread::spawn(move || {
                let cpu = Cpu::new(2, &w);
                // Idle (halted between interrupts): answers until the others are done.
                cpu.idle(2);
            })
        };
        let destroyer = {
            let w = w.clone();
            let world = world.clone();
            thread::spawn(move || {
                let cpu = Cpu::new(1, &w);
                // `morsel_destroy`: refused while mounted; else the frames go, behind the barrier.
                let unmounted = !*world.lock().unwrap();
                if unmounted {
                    cpu.w.mb.barrier(&cpu);
                    w.free(FRAME);
                }
                cpu.done();
            })
        };
        let cpu = Cpu::new(0, &w);
        {
            let mut mounted = world.lock().unwrap();
            w.entry.store(false, Ordering::Relaxed);
            let (_acks, _) = w.mb.request(0b100, &cpu);
            *mounted = false;
        }
        // CPU 0 would wait for its acknowledgment now (model (a)); it is slow here: the
        // destroy above may run before.
        cpu.done();
        destroyer.join().unwrap();
        target.join().unwrap();
    });
}

/// (c) Two CPUs shoot at each other at once: CPU 0 in an ExMap FREE, CPU 1 in a call of its
/// own whose guest is then stopped (it runs no vCPU afterwards: it settles what it owes and
/// goes idle). Both requests arrive while their target waits or idles; each must be answered,
/// no wait may hang, and each frame is freed only after the other CPU flushed.
#[test]
fn loom_stopped_guest_still_answers() {
    model(3, || {
        let w = World::<2>::new();
        w.cached[0].store(true, Ordering::Relaxed);
        w.cached[1].store(true, Ordering::Relaxed);
        let t = {
            let w = w.clone();
            thread::spawn(move || {
                let cpu = Cpu::new(1, &w);
                let mut owed = Owed::<2>::new();
                owed.reserve(1);
                w.entry.store(false, Ordering::Relaxed);
                owed.keep(FRAME + 0x1000, &w.mb, &cpu, 0b11, |f| w.free(f));
                owed.request(&w.mb, &cpu, 0b01);
                // The guest is stopped here (`abandon`): no vCPU enters again on this CPU, the
                // lock's release still settles.
                owed.settle(&w.mb, &cpu, |f| w.free(f));
                cpu.done();
                cpu.idle(2);
            })
        };
        let cpu = Cpu::new(0, &w);
        let mut owed = Owed::<2>::new();
        owed.reserve(1);
        w.entry.store(false, Ordering::Relaxed);
        owed.keep(FRAME, &w.mb, &cpu, 0b11, |f| w.free(f));
        let (acks, _) = w.mb.request(0b10, &cpu);
        owed.owe(&acks);
        owed.settle(&w.mb, &cpu, |f| w.free(f));
        cpu.done();
        cpu.idle(2);
        t.join().unwrap();
        assert_eq!(w.freed.load(Ordering::Relaxed), 2);
        assert!(w.mb.outstanding().is_empty());
    });
}

/// (d) The self-only fast path: CPU 0's guest ran only there, so its FREE names CPU 0 alone
/// (`Owed::request` touches no mailbox and owes nothing: `settle` frees at once); CPU 1
/// meanwhile shoots down both CPUs for a call of its own and must still be answered by CPU 0.
/// Each frame is freed only after every CPU that cached it flushed.
#[test]
fn loom_self_only_shootdown_flushes_here_and_still_answers() {
    model(3, || {
        let w = World::<2>::new();
        w.cached[0].store(true, Ordering::Relaxed);
        let t = {
            let w = w.clone();
            thread::spawn(move || {
                let cpu = Cpu::new(1, &w);
                let mut owed = Owed::<2>::new();
                owed.reserve(1);
                owed.keep(FRAME + 0x1000, &w.mb, &cpu, 0b11, |f| w.free(f));
                assert_eq!(owed.request(&w.mb, &cpu, 0b11), 1);
                owed.settle(&w.mb, &cpu, |f| w.free(f));
                cpu.done();
                cpu.idle(2);
            })
        };
        let cpu = Cpu::new(0, &w);
        let mut owed = Owed::<2>::new();
        owed.reserve(1);
        w.entry.store(false, Ordering::Relaxed);
        owed.keep(FRAME, &w.mb, &cpu, 0b01, |f| w.free(f));
        assert_eq!(owed.request(&w.mb, &cpu, 0b01), 0, "no IPI: only this CPU is named");
        assert!(owed.acks().is_empty(), "nothing owed");
        owed.settle(&w.mb, &cpu, |f| w.free(f));
        cpu.done();
        cpu.idle(2);
        t.join().unwrap();
        assert_eq!(w.freed.load(Ordering::Relaxed), 2);
        assert!(w.mb.outstanding().is_empty());
    });
}

/// (e) No IPI to a busy CPU (`Mailboxes::busy` / `ready`): CPU 1 runs its guest twice; its
/// guest mode reads the entry until an IPI ends it (or CPU 0 finished: nothing else would);
/// between the two runs it is busy in the hypervisor and gets ready (`ready`: clear the mark,
/// answer) before it enters again. CPU 0 clears the entry, keeps the frame, requests (no IPI
/// where it sees CPU 1 busy), waits and frees. A request that skipped the IPI while CPU 1 was
/// in guest mode would never be answered: CPU 0's wait would not end.
#[test]
fn loom_busy_target_gets_no_ipi_but_answers_before_its_entry() {
    model(3, || {
        let w = World::<2>::with_ipis(true);
        w.cached[1].store(true, Ordering::Relaxed);
        let t = {
            let w = w.clone();
            thread::spawn(move || {
                let cpu = Cpu::new(1, &w);
                for _ in 0..2 {
                    // The exit: hypervisor code until the next entry.
                    w.mb.busy(1);
                    w.mb.ready(1, &cpu);
                    // Guest mode: TLB fills from the entry while it is present.
                    loop {
                        if w.entry.load(Ordering::Relaxed) {
                            w.cached[1].store(true, Ordering::Relaxed);
                        }
                        // (compare_exchange, not swap: loom 0.7's swap was seen reading a
                        // stale value in another model.)
                        let ipi = w.ipi[1].compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire).is_ok();
                        if ipi || w.finished.load(Ordering::Acquire) >= 1 {
                            break;
                        }
                        spin();
                    }
                }
                w.mb.busy(1);
                cpu.idle(1);
            })
        };
        let cpu = Cpu::new(0, &w);
        cpu.free_behind_shootdown(0b11);
        cpu.done();
        t.join().unwrap();
        assert_eq!(w.freed.load(Ordering::Relaxed), 1);
    });
}
