//! Races and attacks on `morsel_open` and `morsel_unmount`, which the hypervisor answers
//! without its world lock for a plain morsel (`sched::mount_fast`: the directory's lock
//! around the look-up, the guest's own around its table). Two guests, one per `arg`:
//!
//! - 1 `owner` (1 vCPU): creates "mt-pub" (private: others mount it read-only), "mt-rw"
//!   (others may write), "mt-victim", each with a marker in its first word, unmounts them,
//!   waits for the racer to say it started ("mt-go"), then destroys "mt-victim" while the
//!   racer's two vCPUs mount and unmount it: each try is `Busy` (mounted somewhere, or between
//!   an open's steps) until one succeeds; after that, only `NotFound` may follow. Once the
//!   racer made "mt-end" it destroys the other two.
//! - 2 `racer` (2 vCPUs on 2 CPUs, vCPU 0 beside the owner): vCPU 0 first tries what it must not get: "mt-pub"
//!   read-write (`Denied`), unknown and bad names, unmounts of addresses that hold no mount
//!   (RAM, the window's start, an unaligned one: `NotFound`, nothing else); then both vCPUs,
//!   `ROUNDS` times each, open "mt-pub" read-only, check its marker and unmount it (the
//!   other's open meanwhile is `Busy`: a guest mounts a morsel once); then `ROUNDS` times
//!   each open and unmount it where an open that is `Busy` also unmounts the address the
//!   sibling mounted last (each mount is unmounted exactly once: the owner's unmount of a
//!   stolen mount is `NotFound`). Before those, vCPU 1 opens and unmounts "mt-victim" until the
//!   owner destroyed it (`NotFound`). Every open that succeeded read its morsel's marker; any
//!   other answer is WRONG. Every frame must come back (the run's end checks).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guest_lib::abi;
use guest_lib::hypercall::{call, call_mount};
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, yield_now, BootInfo, Error};

guest_lib::entry!(main, vcpu_main);

/// Rounds of each "mt-pub" race per vCPU, unless `arg` bits 8.. say.
const ROUNDS: u64 = 1000;
static ROUNDS_SET: AtomicU64 = AtomicU64::new(ROUNDS);
const MARK_PUB: u64 = 0x5eed_0b1b;
const MARK_RW: u64 = 0x5eed_0f0f;
const MARK_VICTIM: u64 = 0x5eed_dead;
/// Most opens of "mt-victim" per racer vCPU before the owner must have destroyed it.
const VICTIM_TRIES: u64 = 1_000_000;

/// Per racer vCPU: opens that mounted, `Busy` answers, own unmounts, unmounts of the
/// sibling's last address that took something, and WRONG answers.
static OPENED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static BUSY: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static UNMOUNTED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static STOLEN: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static WRONG: AtomicU64 = AtomicU64::new(0);
/// The address of the racer's last "mt-pub" mount (either vCPU's).
static LAST: AtomicU64 = AtomicU64::new(0);
/// The racer's vCPUs that finished (vCPU 0 waits for vCPU 1 before it reports).
static DONE: AtomicU64 = AtomicU64::new(0);
/// vCPUs past the first round of races (the stealing starts at 2).
static PHASE: AtomicU64 = AtomicU64::new(0);
/// vCPU 0's attacks are done: the races may start.
static ATTACKED: AtomicU64 = AtomicU64::new(0);

fn open(name: &str, writable: bool) -> Result<(u64, u64), Error> {
    call_mount(abi::HC_MORSEL_OPEN, [name.as_ptr() as u64, name.len() as u64, writable as u64, 0, 0, 0])
}

fn unmount(gpa: u64) -> Result<u64, Error> {
    call(abi::HC_MORSEL_UNMOUNT, [gpa, 0, 0, 0, 0, 0])
}

/// The first word of the morsel mounted at `gpa` (`size` bytes).
fn marker(gpa: u64, size: u64) -> Option<u64> {
    // SAFETY: the hypervisor just answered a mount of `size` bytes at `gpa` in this guest; one
    // atomic read of its first word. A sibling may unmount it meanwhile (the race this guest
    // makes): the read is then a second-level fault that stops the guest, which fails the run.
    (size >= 8).then(|| unsafe { (*(gpa as *const AtomicU64)).load(SeqCst) })
}

fn wrong(args: core::fmt::Arguments) {
    WRONG.fetch_add(1, SeqCst);
    println!("mounts: {args}: WRONG");
}

fn main(info: &BootInfo) -> i32 {
    if info.arg >> 8 != 0 {
        ROUNDS_SET.store(info.arg >> 8, SeqCst);
    }
    let r = match info.arg & 0xff {
        1 => owner(),
        2 => racer(info, 0),
        _ => Err("unknown arg"),
    };
    match r {
        Ok(()) => 0,
        Err(why) => {
            println!("mounts: {why}: FAILED");
            1
        }
    }
}

fn vcpu_main(info: &BootInfo, vcpu: u32) -> i32 {
    if info.arg & 0xff != 2 || vcpu != 1 {
        return 0;
    }
    while ATTACKED.load(SeqCst) == 0 {
        core::hint::spin_loop();
    }
    match race(1) {
        Ok(()) => 0,
        Err(why) => {
            println!("mounts: vCPU 1: {why}: FAILED");
            1
        }
    }
}

fn owner() -> Result<(), &'static str> {
    // Kept mounted: word 1 counts the racer's mounts of "mt-victim". Made first: the racer
    // starts when "mt-victim" exists, and finds the others marked.
    let rw = morsel::create("mt-rw", 4096, PageSize::Size4K, true).map_err(|_| "create mt-rw")?;
    rw.atomics()[0].store(MARK_RW, SeqCst);
    for (name, mark) in [("mt-pub", MARK_PUB), ("mt-victim", MARK_VICTIM)] {
        let m = morsel::create(name, 4096, PageSize::Size4K, false).map_err(|_| "create")?;
        m.atomics()[0].store(mark, SeqCst);
        // Dropped: unmounted, kept by name.
    }
    let go = loop {
        match morsel::open("mt-go") {
            Ok(m) => break m,
            Err(Error::NotFound) => yield_now(),
            Err(_) => return Err("open mt-go"),
        }
    };
    drop(go);
    // Until the racer mounted it a few times (bounded: the race is the point, not a must).
    for _ in 0..100_000 {
        if rw.atomics()[1].load(SeqCst) >= 3 {
            break;
        }
        yield_now();
    }
    let (mut busy, mut tries) = (0u64, 0u64);
    loop {
        tries += 1;
        match morsel::destroy("mt-victim") {
            Ok(()) => break,
            Err(Error::Busy) => busy += 1,
            Err(e) => {
                wrong(format_args!("destroy of mt-victim answered {e:?}"));
                break;
            }
        }
        if tries % 64 == 0 {
            yield_now();
        }
    }
    match morsel::destroy("mt-victim") {
        Err(Error::NotFound) => {}
        other => wrong(format_args!("a second destroy of mt-victim answered {other:?}")),
    }
    println!("mounts owner: mt-victim destroyed after {busy} Busy answers");
    // The racer is done with "mt-pub" when it made "mt-end".
    loop {
        match morsel::open("mt-end") {
            Ok(m) => break drop(m),
            Err(Error::NotFound) => yield_now(),
            Err(_) => return Err("open mt-end"),
        }
    }
    drop(rw);
    match (morsel::destroy("mt-pub"), morsel::destroy("mt-rw")) {
        (Ok(()), Ok(())) => {}
        other => wrong(format_args!("destroy of mt-pub, mt-rw at the end answered {other:?}")),
    }
    Ok(())
}

/// vCPU 0 of the racer: the attacks, then the race, then the report.
fn racer(info: &BootInfo, me: usize) -> Result<(), &'static str> {
    // Until "mt-victim" exists with its marker (the owner made and marked the others first).
    loop {
        match open("mt-victim", false) {
            Err(Error::NotFound) => yield_now(),
            Ok((gpa, size)) => {
                let marked = marker(gpa, size) == Some(MARK_VICTIM);
                let _ = unmount(gpa);
                if marked {
                    break;
                }
                yield_now();
            }
            Err(_) => return Err("open mt-victim"),
        }
    }
    attacks(info);
    ATTACKED.store(1, SeqCst);
    let r = race(me);
    while DONE.load(SeqCst) < 2 {
        yield_now();
    }
    match morsel::create("mt-end", 4096, PageSize::Size4K, false) {
        Ok(m) => core::mem::forget(m),
        Err(e) => wrong(format_args!("create mt-end: {e:?}")),
    }
    let sum = |a: &[AtomicU64; 2]| a[0].load(SeqCst) + a[1].load(SeqCst);
    let (opened, unmounted, stolen) = (sum(&OPENED), sum(&UNMOUNTED), sum(&STOLEN));
    println!("mounts race: {opened} opens of mt-pub mounted ({} and {} per vCPU), {} Busy, {unmounted} unmounted by their vCPU, {stolen} by the sibling; {} wrong",
        OPENED[0].load(SeqCst), OPENED[1].load(SeqCst), sum(&BUSY), WRONG.load(SeqCst));
    r?;
    if opened != unmounted + stolen {
        return Err("a mount was unmounted twice or never");
    }
    if WRONG.load(SeqCst) > 0 {
        return Err("wrong answers");
    }
    Ok(())
}

fn attacks(info: &BootInfo) {
    let window = info.morsel_window;
    for (name, writable, want) in [("mt-pub", true, Error::Denied), ("mt-none", false, Error::NotFound), ("mt pub", false, Error::Invalid)] {
        match open(name, writable) {
            Err(e) if e == want => {}
            other => wrong(format_args!("open {name:?} writable={writable} answered {other:?}, not {want:?}")),
        }
    }
    // A name outside guest RAM, one crossing its end, one too long.
    let ram = info.memory_size;
    for (ptr, len) in [(u64::MAX - 3, 8), (ram - 4, 8), (0x1000, 4096)] {
        match call_mount(abi::HC_MORSEL_OPEN, [ptr, len, 0, 0, 0, 0]) {
            Err(_) => {}
            Ok(m) => wrong(format_args!("open of a name at {ptr:#x} len {len} answered {m:?}")),
        }
    }
    // Shared read-write: mounted writable, its marker seen and bumped.
    match open("mt-rw", true) {
        Ok((gpa, size)) if marker(gpa, size) == Some(MARK_RW) => {
            // SAFETY: mounted read-write, `size` >= 8 (checked by `marker`).
            unsafe { (*(gpa as *const AtomicU64)).store(MARK_RW, SeqCst) };
            // `morsel_size` agrees, at the mount and nowhere else.
            let sizes = [call(abi::HC_MORSEL_SIZE, [gpa, 0, 0, 0, 0, 0]), call(abi::HC_MORSEL_SIZE, [gpa + 4096, 0, 0, 0, 0, 0])];
            if sizes != [Ok(size), Err(Error::NotFound)] {
                wrong(format_args!("morsel_size of mt-rw's mount and past it answered {sizes:?}"));
            }
            if unmount(gpa).is_err() {
                wrong(format_args!("unmount of mt-rw failed"));
            }
        }
        other => {
            wrong(format_args!("open of mt-rw read-write answered {other:?}"));
            if let Ok((gpa, _)) = other {
                let _ = unmount(gpa);
            }
        }
    }
    // Addresses that hold no mount: guest RAM, the window's start (nothing mounted now), an
    // unaligned one, the last page of the window.
    for gpa in [0x1000, window, window + 1, window + info.morsel_window_size - 4096, u64::MAX] {
        match unmount(gpa) {
            Err(Error::NotFound) => {}
            other => wrong(format_args!("unmount of {gpa:#x} (no mount) answered {other:?}")),
        }
        match call(abi::HC_MORSEL_SIZE, [gpa, 0, 0, 0, 0, 0]) {
            Err(Error::NotFound) => {}
            other => wrong(format_args!("morsel_size of {gpa:#x} (no mount) answered {other:?}")),
        }
    }
    // Tell the owner the race starts.
    match morsel::create("mt-go", 4096, PageSize::Size4K, false) {
        Ok(m) => core::mem::forget(m),
        Err(e) => wrong(format_args!("create mt-go: {e:?}")),
    }
}

/// vCPU 1: "mt-victim" until the owner destroyed it; then both vCPUs: "mt-pub" `ROUNDS` times
/// reading its marker, then `ROUNDS` times stealing the sibling's mounts (no marker read
/// then: a stolen mount is gone).
fn race(me: usize) -> Result<(), &'static str> {
    let rounds = ROUNDS_SET.load(SeqCst);
    // vCPU 1 alone (on the CPU the owner does not use): vCPU 0 shares the owner's CPU, and
    // one preempted while it holds a mount would keep every destroy of the owner's slice
    // `Busy`.
    let mut tries = if me == 0 { VICTIM_TRIES } else { 0 };
    let rw = if me == 1 { morsel::open_mut("mt-rw").ok() } else { None };
    while tries < VICTIM_TRIES {
        tries += 1;
        if tries == VICTIM_TRIES {
            DONE.fetch_add(1, SeqCst);
            return Err("mt-victim never went away");
        }
        match open("mt-victim", false) {
            Ok((gpa, size)) => {
                if marker(gpa, size) != Some(MARK_VICTIM) {
                    wrong(format_args!("mt-victim at {gpa:#x}: wrong marker"));
                }
                if let Some(rw) = &rw {
                    rw.atomics()[1].fetch_add(1, SeqCst);
                }
                match unmount(gpa) {
                    Ok(_) | Err(Error::NotFound) => {}
                    Err(e) => wrong(format_args!("unmount of mt-victim answered {e:?}")),
                }
            }
            Err(Error::Busy) => {}
            Err(Error::NotFound) => break,
            Err(e) => wrong(format_args!("open of mt-victim answered {e:?}")),
        }
    }
    for _ in 0..rounds {
        match open("mt-pub", false) {
            Ok((gpa, size)) => {
                OPENED[me].fetch_add(1, SeqCst);
                match marker(gpa, size) {
                    Some(MARK_PUB) => {}
                    other => wrong(format_args!("mt-pub at {gpa:#x} size {size}: marker {other:x?}")),
                }
                if call(abi::HC_MORSEL_SIZE, [gpa, 0, 0, 0, 0, 0]) != Ok(size) {
                    wrong(format_args!("morsel_size of mt-pub at {gpa:#x}"));
                }
                match unmount(gpa) {
                    Ok(_) => {
                        UNMOUNTED[me].fetch_add(1, SeqCst);
                    }
                    Err(e) => wrong(format_args!("unmount of own mt-pub answered {e:?}")),
                }
            }
            Err(Error::Busy) => {
                BUSY[me].fetch_add(1, SeqCst);
            }
            Err(e) => wrong(format_args!("open of mt-pub answered {e:?}")),
        }
    }
    // Both vCPUs are past their marker reads before either steals.
    PHASE.fetch_add(1, SeqCst);
    while PHASE.load(SeqCst) < 2 {
        core::hint::spin_loop();
    }
    for _ in 0..rounds {
        match open("mt-pub", false) {
            Ok((gpa, _)) => {
                OPENED[me].fetch_add(1, SeqCst);
                LAST.store(gpa, SeqCst);
                match unmount(gpa) {
                    Ok(_) => {
                        UNMOUNTED[me].fetch_add(1, SeqCst);
                    }
                    // The sibling took it first.
                    Err(Error::NotFound) => {}
                    Err(e) => wrong(format_args!("unmount of own mt-pub answered {e:?}")),
                }
            }
            // The sibling has it mounted (a guest mounts a morsel once).
            Err(Error::Busy) => {
                BUSY[me].fetch_add(1, SeqCst);
                // Unmount what the sibling mounted last, if it is still there.
                match unmount(LAST.load(SeqCst)) {
                    Ok(_) => {
                        STOLEN[me].fetch_add(1, SeqCst);
                    }
                    Err(Error::NotFound) => {}
                    Err(e) => wrong(format_args!("unmount of the sibling's mt-pub answered {e:?}")),
                }
            }
            Err(e) => wrong(format_args!("open of mt-pub answered {e:?}")),
        }
    }
    DONE.fetch_add(1, SeqCst);
    Ok(())
}
