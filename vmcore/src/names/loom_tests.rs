//! loom models of the name reservation protocol as the hypervisor runs it, with
//! `RUSTFLAGS="--cfg loom" cargo test --release -p vmcore --lib loom`. The table sits behind
//! one lock (the hypervisor's world lock); a RAM `morsel_create` reserves in one critical
//! section, zeroes with the lock let go and commits in a later one; an ExMap create reserves
//! and commits in one; opens mount what they find; a call through a mount later finds its
//! object again by the mount's name (ExMap actions and the NVMe proxy do). The checks: a name
//! leads to the object its mount was made of (never another guest's), commits never fail,
//! destroy needs the owner and no mounts, and every quota unit comes back.

use super::*;
use loom::sync::{Arc, Mutex};
use loom::thread;

/// Exhaustive: small enough to explore every interleaving of the lock.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = None;
    b.check(f);
}

/// What a name leads to: which creator built it (unique per model), its owner, its mounts.
struct Obj {
    id: u32,
    owner: Owner,
    mounts: u32,
}

type Dir = Arc<Mutex<Names<Obj>>>;

/// A mount: the name it was made through and the object it holds.
#[derive(Clone, Copy)]
struct Mount {
    name: Name,
    id: u32,
}

fn dir() -> Dir {
    Arc::new(Mutex::new(Names::try_new(Limits { owners: 2, quota: 2, system: 0 }, [1, 2]).unwrap()))
}

fn x() -> Name {
    Name::new(b"x").unwrap()
}

/// `morsel_create` of a RAM morsel: reserve, zero with the lock let go, commit and mount.
/// `stopped`: the guest is stopped while zeroing (`hypercall::abandon`): the create aborts.
fn create_ram(d: &Dir, name: Name, owner: Owner, id: u32, stopped: bool) -> Option<Mount> {
    let t = d.lock().unwrap().reserve(name, owner).ok()?;
    // Zeroing: nobody else can reach the frames; the lock is free for everyone.
    thread::yield_now();
    let mut g = d.lock().unwrap();
    if stopped {
        g.abort(t);
        return None;
    }
    assert!(g.commit(t, Obj { id, owner, mounts: 1 }).is_ok(), "a commit failed");
    Some(Mount { name, id })
}

/// `exmap_create`: reserve, build and commit the sparse morsel under one lock, mount it.
fn exmap_create(d: &Dir, name: Name, owner: Owner, id: u32) -> Option<Mount> {
    let mut g = d.lock().unwrap();
    let t = g.reserve(name, owner).ok()?;
    assert!(g.commit(t, Obj { id, owner, mounts: 1 }).is_ok(), "a commit failed");
    Some(Mount { name, id })
}

/// `morsel_open`: mounts what the name leads to now.
fn open(d: &Dir, name: Name) -> Option<Mount> {
    let mut g = d.lock().unwrap();
    let o = g.get_mut(&name)?;
    o.mounts += 1;
    Some(Mount { name, id: o.id })
}

/// A call through the mount (by its name, as `exmap_action` and `nvme_io` look it up): must
/// reach the object that was mounted.
fn use_mount(d: &Dir, m: Mount) {
    let g = d.lock().unwrap();
    let got = g.get(&m.name).map(|e| e.value.id);
    assert_eq!(got, Some(m.id), "a mount of '{}' leads to another object", m.name);
}

fn unmount(d: &Dir, m: Mount) {
    let mut g = d.lock().unwrap();
    let o = g.get_mut(&m.name).expect("a mounted object is gone");
    assert_eq!(o.id, m.id, "the object under a mount changed");
    o.mounts -= 1;
}

/// `morsel_destroy`: the owner only, and only while mounted nowhere.
fn destroy(d: &Dir, name: Name, owner: Owner) -> bool {
    let mut g = d.lock().unwrap();
    match g.get(&name) {
        Some(e) if e.owner == owner && e.value.mounts == 0 => {}
        _ => return false,
    }
    g.remove(&name).is_some()
}

/// Every quota unit is back once everything is destroyed; nothing is left reserved.
fn check_end(d: &Dir) {
    let mut g = d.lock().unwrap();
    assert_eq!(g.reserved(), 0, "a reservation was left behind");
    while let Some(n) = g.first() {
        let (_, owner, o) = g.remove(&n).unwrap();
        assert_eq!(o.mounts, 0, "an object left with mounts");
        assert_eq!(o.owner, owner);
    }
    for owner in 0..2 {
        assert_eq!(g.count(owner), Count::default(), "owner {owner}'s quota did not come back");
    }
}

/// Issue 20 item 1: a victim's RAM create (lock let go while zeroing) against an attacker's
/// ExMap create of the same name and an open of it by the attacker, in every order.
#[test]
fn loom_names_create_vs_exmap_create_vs_open() {
    model(|| {
        let d = dir();
        let (d1, d2) = (d.clone(), d.clone());
        let victim = thread::spawn(move || {
            if let Some(m) = create_ram(&d1, x(), 0, 1, false) {
                use_mount(&d1, m);
                unmount(&d1, m);
                while !destroy(&d1, x(), 0) {
                    thread::yield_now();
                }
            }
        });
        let attacker = thread::spawn(move || {
            if let Some(m) = exmap_create(&d2, x(), 1, 2) {
                use_mount(&d2, m);
                unmount(&d2, m);
                while !destroy(&d2, x(), 1) {
                    thread::yield_now();
                }
            }
        });
        // The attacker's other vCPU opens whatever "x" is.
        if let Some(m) = open(&d, x()) {
            use_mount(&d, m);
            unmount(&d, m);
        }
        victim.join().unwrap();
        attacker.join().unwrap();
        check_end(&d);
    });
}

/// A create whose guest is stopped while zeroing gives the name and its quota back; a
/// destroy and a new create of the name race an ExMap create and a destroy by a non-owner.
#[test]
fn loom_names_abandoned_create_and_destroy_vs_recreate() {
    model(|| {
        let d = dir();
        let (d1, d2) = (d.clone(), d.clone());
        let victim = thread::spawn(move || {
            assert!(create_ram(&d1, x(), 0, 1, true).is_none());
            if let Some(m) = create_ram(&d1, x(), 0, 3, false) {
                unmount(&d1, m);
                assert!(destroy(&d1, x(), 0));
            }
        });
        let attacker = thread::spawn(move || {
            for id in [2, 4] {
                if let Some(m) = exmap_create(&d2, x(), 1, id) {
                    use_mount(&d2, m);
                    unmount(&d2, m);
                    assert!(destroy(&d2, x(), 1));
                }
            }
        });
        victim.join().unwrap();
        attacker.join().unwrap();
        check_end(&d);
    });
}
