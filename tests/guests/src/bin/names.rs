//! Attacks on names, quotas and ExMap regions (issue 20 items 1-4 and 13), one per `arg`:
//!
//! - 1 `victim` / 2 `attacker` (two guests, one per CPU): the victim creates a large private
//!   morsel "nm-secret" (its data frames are zeroed with the world lock let go, the name only
//!   reserved meanwhile) in `ROUNDS` rounds; the attacker loops `exmap_create` of the same name
//!   during each create. Every try must be refused with `Busy` (a try while `morsel_open` says
//!   `NotFound` was inside the reservation window; at least one must be); a region taking the
//!   reserved name and the victim's create then succeeding too (the old directory replaced the
//!   region's entry by the victim's morsel, and the attacker's read-write region mount led to
//!   the victim's private morsel) fails the run.
//! - 3 `churn`: `CHURN` times an ExMap region (a new name each time) is created, a page
//!   allocated in it, unmounted and destroyed (the old per-region statistics were never removed: panic at ~3,585).
//! - 4 `regions-quota`: regions count in `MORSEL_QUOTA` like morsels: regions (each unmounted
//!   at once, so the mount quota never stops them) until the 65th is refused `NoMemory` (the
//!   old code took ~1,792 and then panicked on the heap); a morsel create is refused too; a
//!   destroy makes room; names are shared between morsels and regions (`Busy` both ways).
//! - 7 `flip` (one guest, 2 vCPUs on 2 CPUs): vCPU 1 rewrites a name in guest RAM without
//!   pause between `nm-flipA`, `nm-flipB` and `nm flipA` / `nm flipB` (a space: invalid),
//!   byte by byte, while vCPU 0 calls `morsel_create` and `morsel_open` with it (the
//!   hypervisor reads such a name before its world lock since branch `prename`). Every answer
//!   must be one snapshot of the name: a create that succeeded made exactly one of the two
//!   valid names (destroying each by a constant name finds exactly one), an open reached the
//!   morsel whose marker its name says, a destroy (`nm-flipA` mounted, so `Busy`, `nm-flipB`
//!   not) removed `nm-flipB` or nothing, as its snapshot names (the name read before the
//!   world lock since `morsel_destroy`, `device_mount` and `name_watch` joined it), a refusal
//!   is `Invalid` (the space) or that `Busy`, never another error; every frame comes back.
//! - 5 `fill` / 6 `late`: many guests each hold their whole quota (morsels and regions); then
//!   one more guest must still get its whole quota (the old directory held 1,792 names, so
//!   28 guests within their quotas denied everyone else).
#![no_std]
#![no_main]

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guest_lib::abi;
use guest_lib::exmap::{ExMap, Range};
use guest_lib::hypercall::call;
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, yield_now, BootInfo, Error};

guest_lib::entry!(main, vcpu_main);

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// A name built on the stack (guests have no heap).
struct Name {
    buf: [u8; abi::MORSEL_NAME_MAX],
    len: usize,
}

impl Name {
    fn new(args: core::fmt::Arguments) -> Name {
        let mut n = Name { buf: [0; abi::MORSEL_NAME_MAX], len: 0 };
        let _ = n.write_fmt(args);
        n
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Name {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(core::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

macro_rules! name {
    ($($t:tt)*) => { Name::new(format_args!($($t)*)) };
}

fn main(info: &BootInfo) -> i32 {
    let r = match info.arg & 0xff {
        1 => victim(info),
        2 => attacker(),
        3 => churn(info),
        4 => regions_quota(),
        5 => fill(info),
        6 => late(info),
        7 => flip(),
        _ => Err("unknown arg"),
    };
    match r {
        Ok(()) => 0,
        Err(why) => {
            println!("names: FAILED: {why}");
            1
        }
    }
}

/// `exmap_create` without the guest-lib wrapper (no iovec page on the stack): the region's
/// guest-physical address.
fn exmap_create(name: &str, size: u64) -> Result<u64, Error> {
    call(abi::HC_EXMAP_CREATE, [name.as_ptr() as u64, name.len() as u64, size, 0, 0, 0])
}

fn unmount(gpa: u64) -> Result<u64, Error> {
    call(abi::HC_MORSEL_UNMOUNT, [gpa, 0, 0, 0, 0, 0])
}

/// Opens `name` read-write, waiting (yielding) until some guest created it.
fn wait_open(name: &str) -> Result<morsel::MorselMut, Error> {
    loop {
        match morsel::open_mut(name) {
            Err(Error::NotFound) => yield_now(),
            other => return other,
        }
    }
}

/// Waits (yielding) until `word` holds `value`.
fn wait_word(word: &AtomicU64, value: u64) {
    while word.load(SeqCst) != value {
        yield_now();
    }
}

const ROUNDS: u64 = 4;
const SECRET: &str = "nm-secret";
/// The words of "nm-sync": the round the victim is creating in, the round whose create
/// returned, the victim's result (1 ok, else the error's negated code), the attacker's ack.
const STARTED: usize = 0;
const RETURNED: usize = 1;
const RESULT: usize = 2;
const ACKED: usize = 3;
const READY: usize = 4;

fn victim(info: &BootInfo) -> Result<(), &'static str> {
    // Big enough that zeroing it takes a while (the reservation window); `arg` bits 8..
    // give MiB, default 128.
    let size = match info.arg >> 8 {
        0 => 128 * MIB,
        n => n * MIB,
    };
    let sync = morsel::create("nm-sync", 4 * KIB, PageSize::Size4K, true).map_err(|_| "victim: sync create")?;
    let w = sync.atomics();
    wait_word(&w[READY], 1);
    for k in 1..=ROUNDS {
        w[STARTED].store(k, SeqCst);
        let r = morsel::create(SECRET, size, PageSize::Size2M, false);
        w[RESULT].store(match &r { Ok(_) => 1, Err(e) => (-(*e as i64)) as u64 }, SeqCst);
        w[RETURNED].store(k, SeqCst);
        match r {
            Ok(mut m) => {
                let end = m.len() - 1;
                if m[0] != 0 || m[end] != 0 {
                    return Err("victim: a new morsel is not zeroed");
                }
                m[0] = 0x5e;
                m[end] = 0x5e;
                wait_word(&w[ACKED], k);
                drop(m);
                morsel::destroy(SECRET).map_err(|_| "victim: destroy")?;
                println!("names victim: round {k}: created '{SECRET}' ({} MiB, private), used, destroyed", size / MIB);
            }
            Err(e) => {
                // Only if the attacker's region had the name before the reservation (a
                // legitimate first-come region, which the attacker then reports and destroys).
                println!("names victim: round {k}: create refused: {e}");
                wait_word(&w[ACKED], k);
            }
        }
    }
    wait_word(&w[READY], 2);
    Ok(())
}

fn attacker() -> Result<(), &'static str> {
    let sync = wait_open("nm-sync").map_err(|_| "attacker: sync open")?;
    let w = sync.atomics();
    w[READY].store(1, SeqCst);
    let (mut busy, mut window, mut after, mut won, mut first) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut fail = None;
    for k in 1..=ROUNDS {
        wait_word(&w[STARTED], k);
        let mut region = None;
        while w[RETURNED].load(SeqCst) != k {
            match exmap_create(SECRET, 16 * MIB) {
                Ok(gpa) => {
                    region = Some(gpa);
                    break;
                }
                Err(Error::Busy) => {
                    busy += 1;
                    match morsel::open(SECRET) {
                        // Reserved, not yet entered: inside the victim's create.
                        Err(Error::NotFound) => window += 1,
                        Ok(m) => {
                            after += 1;
                            drop(m);
                        }
                        Err(_) => fail = Some("attacker: open of the name failed oddly"),
                    }
                }
                Err(_) => fail = Some("attacker: exmap_create failed with something else than Busy"),
            }
        }
        wait_word(&w[RETURNED], k);
        let victim_ok = w[RESULT].load(SeqCst) == 1;
        if let Some(gpa) = region {
            let victim_busy = w[RESULT].load(SeqCst) == (-(Error::Busy as i64)) as u64;
            if victim_ok {
                won += 1;
                println!("names attacker: round {k}: exmap_create of '{SECRET}' SUCCEEDED and the victim's create succeeded too");
                fail = Some("a region took a name another guest's create had reserved, and both creates succeeded");
            } else if victim_busy {
                // The attacker's region came before the victim's reservation (STARTED is
                // stored before the create is issued): first come, the victim refused. Legal.
                first += 1;
                println!("names attacker: round {k}: exmap_create of '{SECRET}' came first, the victim's create answered Busy (first come)");
            } else {
                fail = Some("the victim's create failed with something else than Busy");
            }
            let _ = unmount(gpa);
        }
        w[ACKED].store(k, SeqCst);
        if region.is_some() {
            // Ours (or, on the broken directory, whatever the name leads to now).
            let _ = morsel::destroy(SECRET);
        }
    }
    println!("names attacker: exmap_create of a pending name: {busy} refused Busy ({window} inside the reservation window, {after} after), {won} successes ({first} rounds where the region came first)");
    w[READY].store(2, SeqCst);
    if let Some(why) = fail {
        return Err(why);
    }
    if window == 0 {
        return Err("never tried inside the victim's reservation window");
    }
    Ok(())
}

/// Default cycles of `churn` (past the old panic at ~3,585).
const CHURN: u64 = 5000;

fn churn(info: &BootInfo) -> Result<(), &'static str> {
    let cycles = match info.arg >> 8 {
        0 => CHURN,
        n => n,
    };
    for i in 0..cycles {
        // A new name each time (as a guest would): per-name state must go with the region.
        let n = name!("nm-churn-{i}");
        let mut r = ExMap::create(n.as_str(), 16 * KIB, false).map_err(|e| {
            println!("names churn: create {i} refused: {e}");
            "a region create was refused during churn"
        })?;
        if r.alloc(&[Range { page: i % 4, count: 1 }]) != Ok(0) {
            return Err("an ALLOC failed during churn");
        }
        // SAFETY: page i % 4 < 4 pages was just populated and stays so until `r` is dropped.
        unsafe { r.page_mut(i % 4)[0] = 0xc4 };
        drop(r);
        morsel::destroy(n.as_str()).map_err(|_| "a region destroy failed during churn")?;
    }
    println!("names churn: {cycles} regions created, used, unmounted and destroyed");
    Ok(())
}

fn regions_quota() -> Result<(), &'static str> {
    let mut created = 0u64;
    for i in 0..4000u64 {
        let n = name!("rq-{i}");
        match exmap_create(n.as_str(), 4 * KIB) {
            Ok(gpa) => {
                created += 1;
                // Unmounted at once: only the morsel quota can stop this loop.
                unmount(gpa).map_err(|_| "unmount")?;
            }
            Err(e) => {
                println!("names quota: {created} regions created (each unmounted), the next refused: {e}");
                if e != Error::NoMemory || created != abi::MORSEL_QUOTA {
                    return Err("regions are not counted in the morsel quota");
                }
                break;
            }
        }
    }
    if created != abi::MORSEL_QUOTA {
        return Err("no quota on regions: every exmap_create succeeded");
    }
    match morsel::create("rq-morsel", 4 * KIB, PageSize::Size4K, false) {
        Err(Error::NoMemory) => println!("names quota: with {created} regions a morsel create is refused too: out of memory (-4)"),
        _ => return Err("a morsel create past the quota (held in regions) was not refused"),
    }
    morsel::destroy("rq-7").map_err(|_| "region destroy")?;
    let m = morsel::create("rq-morsel", 4 * KIB, PageSize::Size4K, false).map_err(|_| "a create after a region's destroy was refused")?;
    drop(m);
    // One namespace for morsels and regions.
    let busy_region = exmap_create("rq-morsel", 4 * KIB);
    let busy_morsel = morsel::create("rq-8", 4 * KIB, PageSize::Size4K, false).map(|_| ());
    println!("names quota: after a destroy a create succeeds; exmap_create of a morsel's name: {busy_region:?}, morsel_create of a region's name: {busy_morsel:?}");
    if busy_region != Err(Error::Busy) || busy_morsel != Err(Error::Busy) {
        return Err("morsels and regions do not share one namespace");
    }
    // Everything destroyed: the whole quota is back.
    morsel::destroy("rq-morsel").map_err(|_| "destroy")?;
    for i in (0..created).filter(|&i| i != 7) {
        morsel::destroy(name!("rq-{i}").as_str()).map_err(|_| "region destroy")?;
    }
    for i in 0..abi::MORSEL_QUOTA {
        let gpa = exmap_create(name!("rq2-{i}").as_str(), 4 * KIB).map_err(|_| "the quota did not come back after the destroys")?;
        unmount(gpa).map_err(|_| "unmount")?;
    }
    println!("names quota: after destroying them all, {} regions fit again", abi::MORSEL_QUOTA);
    Ok(())
}

/// Creates `MORSEL_QUOTA - 1` names (every other one a region; morsels stay mounted,
/// regions are unmounted), then the marker `done` as the last one of the quota.
fn hold_quota(me: u64, prefix: &str, done: &str) -> Result<(), &'static str> {
    for i in 0..abi::MORSEL_QUOTA - 1 {
        let n = name!("{prefix}{me}-{i}");
        let r = match i % 2 {
            0 => morsel::create(n.as_str(), 4 * KIB, PageSize::Size4K, false).map(core::mem::forget),
            _ => exmap_create(n.as_str(), 4 * KIB).and_then(unmount).map(|_| ()),
        };
        if let Err(e) = r {
            println!("names {prefix}: guest {me} refused at its name {i} of {}: {e}", abi::MORSEL_QUOTA);
            return Err("a guest within its quota was refused");
        }
    }
    morsel::create(done, 4 * KIB, PageSize::Size4K, false).map(core::mem::forget).map_err(|e| {
        println!("names {prefix}: guest {me} refused at its last name: {e}");
        "a guest within its quota was refused"
    })
}

fn fill(info: &BootInfo) -> Result<(), &'static str> {
    let me = info.guest_id;
    hold_quota(me, "f", name!("f{me}-done").as_str())?;
    // Hold everything until the late guest got its quota too.
    loop {
        match morsel::open("late-done") {
            Ok(_) => return Ok(()),
            Err(Error::NotFound) => yield_now(),
            Err(_) => return Err("open of the late guest's marker failed"),
        }
    }
}

fn late(info: &BootInfo) -> Result<(), &'static str> {
    let me = info.guest_id;
    let guests = guest_lib::info(abi::INFO_GUEST_COUNT).map_err(|_| "info")?;
    // Every other guest holds its whole quota first.
    for j in (0..guests).filter(|&j| j != me) {
        loop {
            match morsel::open(name!("f{j}-done").as_str()) {
                Ok(_) => break,
                Err(Error::NotFound) => yield_now(),
                Err(_) => return Err("open of a filler's marker failed"),
            }
        }
    }
    let held = (guests - 1) * abi::MORSEL_QUOTA;
    hold_quota(me, "l", "late-done")?;
    println!("names late: {} other guests hold {held} names; this guest still got its {} (directory holds {} names now)",
        guests - 1, abi::MORSEL_QUOTA, held + abi::MORSEL_QUOTA);
    Ok(())
}

/// The name vCPU 1 rewrites (`flip`): 8 bytes in guest RAM, byte by byte.
static FLIP: [core::sync::atomic::AtomicU8; 8] = [const { core::sync::atomic::AtomicU8::new(0) }; 8];
/// vCPU 1 runs (1) until vCPU 0 is done (2).
static FLIPPING: AtomicU64 = AtomicU64::new(0);
const FLIP_CALLS: u64 = 1000;
/// Destroys through the flipping name (each after two creates).
const DESTROY_CALLS: u64 = 250;

fn vcpu_main(info: &BootInfo, _vcpu: u32) -> i32 {
    if info.arg & 0xff != 7 {
        return 0;
    }
    let variants: [&[u8; 8]; 4] = [b"nm-flipA", b"nm flipB", b"nm-flipB", b"nm flipA"];
    FLIPPING.store(1, SeqCst);
    let mut i = 0usize;
    while FLIPPING.load(SeqCst) == 1 {
        for (b, &v) in FLIP.iter().zip(variants[i % 4]) {
            b.store(v, SeqCst);
        }
        i += 1;
    }
    0
}

/// One snapshot or the other: see the module doc (`flip`).
fn flip() -> Result<(), &'static str> {
    for (b, &v) in FLIP.iter().zip(b"nm-flipA") {
        b.store(v, SeqCst);
    }
    wait_word(&FLIPPING, 1);
    let name = [FLIP.as_ptr() as u64, 8];
    let (mut made, mut invalid, mut wrong) = ([0u64; 2], 0u64, 0u64);
    for _ in 0..FLIP_CALLS {
        match guest_lib::hypercall::call_mount(abi::HC_MORSEL_CREATE, [name[0], name[1], 4096, 0, 0, 0]) {
            Ok((gpa, size)) => {
                let _ = unmount(gpa);
                let gone = [morsel::destroy("nm-flipA"), morsel::destroy("nm-flipB")];
                match gone {
                    [Ok(()), Err(Error::NotFound)] if size == 4096 => made[0] += 1,
                    [Err(Error::NotFound), Ok(())] if size == 4096 => made[1] += 1,
                    _ => {
                        wrong += 1;
                        println!("names flip: create answered {gpa:#x} size {size}, then destroy A / B: {gone:?}: WRONG");
                    }
                }
            }
            Err(Error::Invalid) => invalid += 1,
            Err(e) => {
                wrong += 1;
                println!("names flip: create refused {e:?}: WRONG");
            }
        }
    }
    // Both names exist, each with its marker, unmounted; an open through the flipping name
    // reaches the one its snapshot names.
    let a = morsel::create("nm-flipA", 4096, PageSize::Size4K, false).map_err(|_| "create nm-flipA")?;
    let b = morsel::create("nm-flipB", 4096, PageSize::Size4K, false).map_err(|_| "create nm-flipB")?;
    a.atomics()[0].store(0xA, SeqCst);
    b.atomics()[0].store(0xB, SeqCst);
    // Unmounted (a guest mounts a morsel once at a time), kept by name.
    drop((a, b));
    let (mut opened, mut open_invalid) = ([0u64; 2], 0u64);
    for _ in 0..FLIP_CALLS {
        match guest_lib::hypercall::call_mount(abi::HC_MORSEL_OPEN, [name[0], name[1], 0, 0, 0, 0]) {
            Ok((gpa, size)) => {
                // SAFETY: the hypervisor just mounted a morsel of `size` bytes at `gpa` in this
                // guest; one atomic read of its first word, then it is unmounted.
                let marker = (size >= 8).then(|| unsafe { (*(gpa as *const AtomicU64)).load(SeqCst) });
                let _ = unmount(gpa);
                match marker {
                    Some(0xA) => opened[0] += 1,
                    Some(0xB) => opened[1] += 1,
                    other => {
                        wrong += 1;
                        println!("names flip: open answered {gpa:#x} size {size} marker {other:?}: WRONG");
                    }
                }
            }
            Err(Error::Invalid) => open_invalid += 1,
            Err(e) => {
                wrong += 1;
                println!("names flip: open refused {e:?}: WRONG");
            }
        }
    }
    // Destroys through the flipping name (read before the world lock too), with nm-flipA
    // mounted here (so `Busy`) and nm-flipB not: an answer from one snapshot either removed
    // nm-flipB alone (Ok) or nothing (Busy: A; Invalid: the space); a check of one name and a
    // removal of the other would take the mounted A away.
    let held = morsel::open("nm-flipA").map_err(|_| "open nm-flipA to hold it")?;
    let (mut destroyed, mut busy, mut destroy_invalid) = (0u64, 0u64, 0u64);
    for _ in 0..DESTROY_CALLS {
        match morsel::create("nm-flipB", 4096, PageSize::Size4K, false) {
            Ok(m) => drop(m),
            Err(Error::Busy) => {}
            Err(_) => return Err("create nm-flipB before a destroy through the flipping name"),
        }
        let r = guest_lib::hypercall::call(abi::HC_MORSEL_DESTROY, [name[0], name[1], 0, 0, 0, 0]);
        let left = morsel::destroy("nm-flipB");
        match (r, left) {
            (Ok(_), Err(Error::NotFound)) => destroyed += 1,
            (Err(Error::Busy), Ok(())) => busy += 1,
            (Err(Error::Invalid), Ok(())) => destroy_invalid += 1,
            (r, left) => {
                wrong += 1;
                println!("names flip: destroy answered {r:?}, then destroy B: {left:?}: WRONG");
            }
        }
    }
    let marker = held.atomics()[0].load(SeqCst);
    drop(held);
    if marker != 0xA || morsel::destroy("nm-flipA").is_err() {
        wrong += 1;
        println!("names flip: the mounted nm-flipA (marker {marker:#x}) did not outlive the destroys: WRONG");
    }
    FLIPPING.store(2, SeqCst);
    let _ = (morsel::destroy("nm-flipA"), morsel::destroy("nm-flipB"));
    println!("names flip: {FLIP_CALLS} creates through a name another vCPU rewrites: {} nm-flipA, {} nm-flipB, {invalid} Invalid; {FLIP_CALLS} opens: {} A, {} B, {open_invalid} Invalid; {DESTROY_CALLS} destroys: {destroyed} B, {busy} A (Busy), {destroy_invalid} Invalid; {wrong} wrong",
        made[0], made[1], opened[0], opened[1]);
    if wrong > 0 || made[0] + made[1] + invalid != FLIP_CALLS || opened[0] + opened[1] + open_invalid != FLIP_CALLS
        || destroyed + busy + destroy_invalid != DESTROY_CALLS {
        return Err("an answer that is not one snapshot of the name");
    }
    Ok(())
}
