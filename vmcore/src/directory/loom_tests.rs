//! loom model of `morsel_open` and `morsel_unmount` made in steps with the directory's lock
//! let go in between (`open_begin` / `open_place` / `open_end`, `unmount_begin` /
//! `unmount_end`), as the hypervisor's `sched::mount_fast` makes them: the directory behind
//! one lock, each guest's table and mounts behind its own, against the owner's destroy
//! (`check_destroy`, then the morsel's frames freed). Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release -p vmcore --lib loom`.
//!
//! The checks: no destroy while a step holds the morsel out of the directory (an opening
//! between its steps, or a mount whose invalidation has not started), so no table entry ever
//! leads to freed frames; every pin is taken back or kept as a mount (the count matches the
//! mounts at the end). Memory is `SimMem` behind a plain mutex (its operations are not
//! interleaving points: they are not what the model is about; it panics on a touch of a
//! freed table).
//!
//! Mutations seen to fail (each made by hand in `directory/mod.rs`, then undone):
//! - `open_begin` without `m.pin()`: "destroyed while an opening held it";
//! - `unmount_end` without its `unpin`: "counted mounts: Some(2)";
//! - `open_end` keeping the pin of a refused step 2: "counted mounts: Some(1)";
//! - and in the caller's order here (the hypervisor's `mount_fast`): `unmount_end` before the
//!   invalidation is started: "destroyed before the unmount's invalidation started".
//! (Step 1 of the unmount cannot unpin: the morsel is reached only through the directory.)

use super::*;
use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use morsel::{Ept, HostPhysAddr, PageSize, SimMem};

/// SimMem for several threads: each operation under a plain (non-loom) mutex.
struct Mem(std::sync::Mutex<SimMem>);

impl PhysMem for Mem {
    fn read(&self, table: HostPhysAddr, index: usize) -> u64 {
        self.0.lock().unwrap().read(table, index)
    }
    fn write(&self, table: HostPhysAddr, index: usize, value: u64) {
        self.0.lock().unwrap().write(table, index, value)
    }
    fn zero_table(&self, table: HostPhysAddr) {
        self.0.lock().unwrap().zero_table(table)
    }
    fn zero_data(&self, frame: HostPhysAddr, order: u32) {
        self.0.lock().unwrap().zero_data(frame, order)
    }
}

impl FrameAlloc for Mem {
    fn alloc(&self, order: u32) -> Option<HostPhysAddr> {
        self.0.lock().unwrap().alloc(order)
    }
    fn free(&self, frame: HostPhysAddr, order: u32) {
        self.0.lock().unwrap().free(frame, order)
    }
}

/// The directory's entry: the morsel and its owner (guest 0), nothing shared.
struct Obj {
    morsel: Morsel<Ept>,
}

impl Entry<Ept> for Obj {
    fn morsel(&self) -> &Morsel<Ept> {
        &self.morsel
    }
    fn owner(&self) -> Owner {
        0
    }
    fn others_may_write(&self) -> bool {
        false
    }
}

struct Run {
    mem: Mem,
    names: Mutex<Names<Obj>>,
    /// Guest 1's table and mounts (its own lock).
    guest: Mutex<(SecondLevelTable<Ept>, Mounts)>,
    /// Mounts made / unmounts whose invalidation started, by guest 1's vCPUs.
    mounted: AtomicU32,
    flushed: AtomicU32,
    destroyed: AtomicU32,
}

fn name() -> Name {
    Name::new(b"a").unwrap()
}

fn hashed() -> names::Hashed {
    names::Keys::of([1, 2]).hash(name())
}

/// A vCPU of guest 1: opens "a" read-only in steps and, where that mounted it, unmounts it
/// in steps, the invalidation started in between.
fn vcpu(r: &Run) {
    let o = match open_begin(&mut r.names.lock().unwrap(), 1, &hashed(), false) {
        Ok(Some(o)) => o,
        Ok(None) => panic!("a plain morsel answered as a region"),
        Err(_) => return, // destroyed first: NotFound
    };
    assert_eq!(r.destroyed.load(Ordering::SeqCst), 0, "destroyed while an opening held it");
    thread::yield_now();
    let placed = {
        let mut g = r.guest.lock().unwrap();
        let (table, mounts) = &mut *g;
        assert_eq!(r.destroyed.load(Ordering::SeqCst), 0, "destroyed while an opening held it");
        open_place(&mut Space { guest: 1, table, mounts }, &o, &r.mem, &r.mem)
    };
    if placed.is_ok() {
        r.mounted.fetch_add(1, Ordering::SeqCst);
    }
    open_end(&mut r.names.lock().unwrap(), 1, o, &placed);
    let Ok(m) = placed else { return };
    let u = {
        let mut g = r.guest.lock().unwrap();
        let (table, mounts) = &mut *g;
        unmount_begin(&mut Space { guest: 1, table, mounts }, m.addr, &r.mem, &r.mem).unwrap().unwrap()
    };
    // The shootdown is committed here, before the count is given back.
    r.flushed.fetch_add(1, Ordering::SeqCst);
    unmount_end(&mut r.names.lock().unwrap(), 1, &u);
}

/// The owner's `morsel_destroy`: checked and taken out under the directory's lock, its
/// frames freed after.
fn destroy(r: &Run) {
    let removed = {
        let mut d = r.names.lock().unwrap();
        let a = d.keys().hash(Name::new(b"a").unwrap());
        if check_destroy::<Ept, Obj>(&d, &DeviceMounts::new(), 0, &a, |_| None).is_err() {
            return;
        }
        assert_eq!(r.mounted.load(Ordering::SeqCst), r.flushed.load(Ordering::SeqCst), "destroyed before the unmount's invalidation started");
        r.destroyed.store(1, Ordering::SeqCst);
        d.remove("a").unwrap().2
    };
    removed.morsel.destroy(&r.mem, &r.mem).map_err(|(_, e)| e).unwrap();
}

#[test]
fn loom_mount_steps_against_destroy() {
    // Exhaustive: every interleaving of the locks and yields.
    let mut b = loom::model::Builder::new();
    b.preemption_bound = None;
    b.check(|| {
        let sim = SimMem::new(1 << 34);
        let table = SecondLevelTable::<Ept>::new(&sim, &sim).unwrap();
        let morsel = Morsel::<Ept>::create(4096, PageSize::Size4K, &sim, &sim).unwrap();
        let mut names = Names::try_new(names::Limits { owners: 2, quota: 2, system: 0 }, [1, 2]).unwrap();
        let t = names.reserve(name(), 0).unwrap();
        assert!(names.commit(t, Obj { morsel }).is_ok());
        let r = Arc::new(Run {
            mem: Mem(std::sync::Mutex::new(sim)),
            names: Mutex::new(names),
            guest: Mutex::new((table, Mounts::new())),
            mounted: AtomicU32::new(0),
            flushed: AtomicU32::new(0),
            destroyed: AtomicU32::new(0),
        });
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let r = r.clone();
                thread::spawn(move || vcpu(&r))
            })
            .collect();
        destroy(&r);
        for t in threads {
            t.join().unwrap();
        }
        // Every pin came back: the count is the mounts left (none: each vCPU unmounted).
        let g = r.guest.lock().unwrap();
        assert!(g.1.is_empty());
        let count = r.names.lock().unwrap().get("a").map(|e| e.value.morsel.mount_count());
        assert!(count.is_none_or(|c| c == 0), "counted mounts: {count:?}");
    });
}
