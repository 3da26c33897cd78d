//! SMP checks, one per `arg`:
//! * 0 / 1 (two guests, one per CPU): "race" shared read-write; each adds to its own counter
//!   without ever yielding and counts how often it sees the other's counter move between two
//!   of its own reads that lie close in time (no preemption between them). Only possible if
//!   both run at once; after 3 such sightings each it exits 0 (1 if it gets none in
//!   `LOOK_MS`, or in `ONE_CPU_LOOK_MS` where both run on one CPU: the control).
//! * 2 (one guest, N vCPUs): every vCPU adds 1 with `fetch_add` `ADDS` times into one counter
//!   of a private morsel; vCPU 0 checks the exact total N * ADDS.
//! * 3 (two vCPUs) + 4 (a second guest, the witness): vCPU 1 reads "victim" in a tight loop;
//!   vCPU 0 unmounts it, then sets FLAG in the shared "witness" morsel. vCPU 1 counts reads it
//!   started after it saw FLAG (into "witness"); a complete shootdown stops it at the first
//!   such read. Guest 4 waits until the unmount began and a while longer, then prints the
//!   count (must be 0).
//! * 5 (one guest, N vCPUs): all CPUs create, fill, check and destroy morsels of 4 KiB and
//!   2 MiB pages in a loop; every page of a new morsel reads zero, then carries a tag of its
//!   owner, checked before destroy.
//! * 6 (one guest, N vCPUs): vCPUs 1.. spin, vCPU 0 waits for them and then reads outside its
//!   memory: the whole guest is stopped.
//! * 7 (one guest, 2 vCPUs on 2 CPUs): vCPU 1 spins in guest mode while vCPU 0 unmounts a
//!   morsel `KICKS` times, each a shootdown IPI into vCPU 1's CPU, sleeping 1 ms between
//!   (a sleep parks only vCPU 0); an IPI exit inside a slice is no preemption: vCPU 1 goes
//!   on and its exit table counts `interrupt=N` (the scenario checks).
//! * 8 (two vCPUs) + 4 (the witness): as 3, but vCPU 1 reads page 0 of the ExMap region "xv"
//!   and vCPU 0 FREEs that page (right after an ALLOC of page 1 on the same region: the FREE
//!   takes no world lock, `exmap_fast`) instead of unmounting a morsel.
//! * 9 + 10 (two guests, each on its own CPU) + 4 (the witness): as 8 across guests: guest 9
//!   creates the region "xs", populates page 0 and FREEs it while guest 10, which mounted
//!   "xs" read-only, reads it on the other CPU; a FREE of a region another guest mounts shoots
//!   down that guest's CPUs (`RegionCell::sharers`), so guest 10 is stopped at its first read
//!   after the call returned. Guest 9 exits 0 once the flag is set.
//! * 11 (two vCPUs): vCPU 1 keeps a canary on its own stack and checks it in a loop; vCPU 0
//!   recurses (1 KiB of stack per call) until its stack outgrows its 64 KiB reserve: the guard
//!   page below it stops the guest before vCPU 0 writes vCPU 1's stack (the hypervisor names
//!   the overflow); vCPU 1 prints if its canary changed.
//! * 12 (two vCPUs): vCPU 0 moves its stack pointer into vCPU 1's stack reserve and executes
//!   UD2: the stop's report names the reserve its RSP is in.
#![no_std]
#![no_main]

use core::ptr::read_volatile;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guest_lib::exmap::{ExMap, Range};
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, yield_now, BootInfo, Error};

guest_lib::entry!(main, vcpu_main);

/// The mount other vCPUs of this guest use (0: not yet).
static SHARED: AtomicU64 = AtomicU64::new(0);
/// A second mount (the witness of arg 3).
static WITNESS: AtomicU64 = AtomicU64::new(0);
/// vCPUs that are done (or, for arg 6, spinning).
static READY: AtomicU64 = AtomicU64::new(0);

const ADDS: u64 = 20_000;

fn main(info: &BootInfo) -> i32 {
    match info.arg {
        0 | 1 => at_once(info.arg as usize),
        2 => sum_main(info),
        3 => unmount_main(),
        4 => witness(),
        8 => free_main(),
        9 => free_shared_main(),
        10 => shared_reader(),
        5 => churn(info, 0),
        6 => fault_main(info),
        7 => kicks_main(),
        11 => overflow_main(),
        12 => foreign_stack_main(info),
        _ => 2,
    }
}

fn vcpu_main(info: &BootInfo, vcpu: u32) -> i32 {
    match info.arg {
        2 => sum_vcpu(),
        3 | 8 => reader(),
        5 => churn(info, vcpu),
        7 => kicks_spinner(),
        11 => canary_keeper(),
        6 => {
            READY.fetch_add(1, SeqCst);
            loop {
                core::hint::spin_loop();
            }
        }
        _ => 0,
    }
}

/// Waits (yielding) for the mount another vCPU of this guest publishes in `slot`.
fn wait_for(slot: &AtomicU64) -> &'static [AtomicU64] {
    loop {
        let gpa = slot.load(SeqCst);
        if gpa != 0 {
            if let Some(a) = morsel::atomics_at(gpa) {
                return a;
            }
        }
        yield_now();
    }
}

fn open_shared(name: &str, create: bool) -> Result<morsel::MorselMut, Error> {
    if create {
        return morsel::create(name, 1 << 20, PageSize::Size4K, true);
    }
    loop {
        match morsel::open_mut(name) {
            Err(Error::NotFound) => yield_now(),
            other => return other,
        }
    }
}

fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the time stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A gap this long between two of our own reads means we were not running in between.
const GAP: u64 = 200_000;

/// How long (TSC time since its first look) a guest of args 0 / 1 looks for the other's counter
/// to move before it gives up, where the two run on two CPUs: not a count of gaps, as the
/// emulator's two vCPU threads may share one host CPU for seconds on a busy host, and never
/// run at once meanwhile (200 gaps came in about a second then, and a pass took 8.8 s,
/// 2026-12-07).
const LOOK_MS: u64 = 30_000;
/// The same where both are on one CPU (the control: hundreds of slices of each other).
const ONE_CPU_LOOK_MS: u64 = 3_000;

/// One read of the other guest's counter, between two TSC reads: a preemption can fall between
/// any two instructions, and a counter read after one must not be paired with a TSC read from
/// before it. (QEMU 11.1's TCG ends a translation block after each RDTSC, 7.2's did so only
/// with -icount; interrupts are taken between blocks, so under 11.1 about every other slice
/// ended right between the RDTSC and the load, which with one TSC read per sample counted as
/// seeing the other guest move: smp_guests_on_one_cpu_take_turns failed, 2026-12-07.)
#[derive(Clone, Copy)]
struct Sample {
    before: u64,
    value: u64,
    after: u64,
}

fn sample(counter: &AtomicU64) -> Sample {
    let before = tsc();
    let value = counter.load(SeqCst);
    Sample { before, value, after: tsc() }
}

fn at_once(me: usize) -> i32 {
    let other = 1 - me;
    let m = match open_shared("race", me == 0) {
        Ok(m) => m,
        Err(e) => {
            println!("smp {me}: race: {e}");
            return 1;
        }
    };
    let a = m.atomics();
    a[8 + me].store(1, SeqCst); // present
    a[24 + me].store(guest_lib::cpu_index() as u64 + 1, SeqCst); // pinned: stays so
    let on_one_cpu = || a[24].load(SeqCst) == a[25].load(SeqCst);
    let (mut sightings, mut gaps) = (0u32, 0u32);
    let per_ms = guest_lib::info(guest_lib::abi::INFO_TSC_PER_US).unwrap_or(1).max(1) * 1000;
    let mut last = sample(&a[other]);
    let start = last.before;
    let mut spins: u64 = 0;
    // Never yields: runs until it saw the other move 3 times and the other is done too.
    loop {
        a[me].fetch_add(1, SeqCst);
        spins += 1;
        let now = sample(&a[other]);
        let ms = (now.after - start) / per_ms; // the machine time it has looked
        // Both reads of the pair lie between last.before and now.after: if that span is short,
        // no preemption (a slice of the other guest, milliseconds) came between them.
        if now.after - last.before > GAP {
            gaps += 1; // preempted (or the host stalled us): this pair does not count
        } else if now.value != last.value && a[8 + other].load(SeqCst) != 0 && sightings < 3 {
            sightings += 1;
            if sightings == 3 {
                println!("smp {me}: saw the other guest's counter move 3 times while running without a yield ({spins} spins, {gaps} gaps in {ms} ms)");
                a[16 + me].store(1, SeqCst);
            }
        }
        last = now;
        if sightings == 3 && a[16 + other].load(SeqCst) != 0 {
            return 0;
        }
        if sightings < 3 && ms > ONE_CPU_LOOK_MS && (ms > LOOK_MS || on_one_cpu()) {
            println!("smp {me}: never saw the other guest's counter move while running ({sightings} sightings, {gaps} gaps, {spins} spins in {ms} ms)");
            a[16 + me].store(1, SeqCst);
            return 1;
        }
        if sightings == 3 && ms > 2 * LOOK_MS {
            println!("smp {me}: the other guest never finished");
            return 1;
        }
    }
}

fn sum_main(info: &BootInfo) -> i32 {
    let m = match morsel::create("sum", 4096, PageSize::Size4K, false) {
        Ok(m) => m,
        Err(e) => {
            println!("smp: sum: {e}");
            return 1;
        }
    };
    SHARED.store(m.addr(), SeqCst);
    let a = m.atomics();
    for _ in 0..ADDS {
        a[0].fetch_add(1, SeqCst);
    }
    let others = info.vcpu_count - 1;
    while READY.load(SeqCst) < others {
        yield_now();
    }
    let want = info.vcpu_count * ADDS;
    let got = a[0].load(SeqCst);
    println!("smp: {} vCPUs added {ADDS} each: total {got}, expected {want}: {}", info.vcpu_count,
        if got == want { "exact" } else { "WRONG" });
    (got != want) as i32
}

fn sum_vcpu() -> i32 {
    let a = wait_for(&SHARED);
    println!("smp: vcpu {} adding on cpu {}", guest_lib::vcpu_index(), guest_lib::cpu_index());
    for _ in 0..ADDS {
        a[0].fetch_add(1, SeqCst);
    }
    READY.fetch_add(1, SeqCst);
    0
}

fn unmount_main() -> i32 {
    let victim = match morsel::create("victim", 4096, PageSize::Size4K, false) {
        Ok(v) => v,
        Err(e) => {
            println!("smp: victim: {e}");
            return 1;
        }
    };
    // morsel_unmount: returns after the shootdown.
    remove_while_read(victim.addr(), "unmounting 'victim'", move || {
        drop(victim);
        true
    })
}

/// The ExMap region `name` (64 pages; others may mount it read-only) with its page 0
/// populated, for a reader to read while `free_page_0` FREEs it.
fn region_with_page_0(name: &str) -> Option<ExMap> {
    let Ok(mut x) = ExMap::create(name, 64 * 4096, false) else {
        println!("smp: region '{name}' FAILED");
        return None;
    };
    if x.alloc(&[Range::new(0, 1)]) != Ok(0) {
        println!("smp: ALLOC of page 0 of '{name}' FAILED");
        return None;
    }
    Some(x)
}

/// FREEs page 0 of `x`. ALLOC / FREE pairs on page 1 first leave this vCPU a handle to the
/// region (its state stays in its slot): the FREE of page 0 right after them takes no world
/// lock, and returns after every CPU it shoots down acknowledged. False: a call failed.
fn free_page_0(x: &mut ExMap) -> bool {
    for _ in 0..3 {
        let _ = x.alloc(&[Range::new(1, 1)]);
        let _ = x.free(&[Range::new(1, 1)]);
    }
    let alloc = x.alloc(&[Range::new(1, 1)]);
    x.free(&[Range::new(0, 1)]) == Ok(0) && alloc == Ok(0)
}

/// Arg 8: `unmount_main` with an ExMap FREE of the page the reader reads. `x` is never
/// dropped (no unmount): the call below does not return.
fn free_main() -> i32 {
    let Some(mut x) = region_with_page_0("xv") else { return 1 };
    let at = x.addr();
    remove_while_read(at, "freeing page 0 of 'xv'", || free_page_0(&mut x))
}

/// Arg 9: `free_main` across guests. Creates "xs" (others may mount it read-only), populates
/// page 0, then the witness (guest 10 opens "xs" once the witness exists), and FREEs page 0
/// while guest 10 reads it; sets FLAG right after the call returned, then exits.
fn free_shared_main() -> i32 {
    let Some(mut x) = region_with_page_0("xs") else { return 1 };
    let w = match open_shared("witness", true) {
        Ok(w) => w,
        Err(e) => {
            println!("smp: witness: {e}");
            return 1;
        }
    };
    let wa = w.atomics();
    // Guest 10 is reading page 0 (its count of reads before FLAG moves).
    while wa[2].load(SeqCst) < 1000 {
        yield_now();
    }
    println!("smp: freeing page 0 of 'xs' while guest 10 reads it on another CPU");
    wa[3].store(1, SeqCst);
    let ok = free_page_0(&mut x);
    wa[0].store(1, SeqCst); // FLAG, only after the call returned
    println!("smp: the call returned{}, flag set", if ok { "" } else { " FAILED" });
    // `x` (the region's mount here) is dropped, so unmounted, only as this returns.
    if ok { 0 } else { 1 }
}

/// Arg 10: mounts "xs" read-only once the witness exists (page 0 is populated by then) and
/// reads its page 0 as `reader` does, until a fault stops this guest.
fn shared_reader() -> i32 {
    let w = match open_shared("witness", false) {
        Ok(w) => w,
        Err(e) => {
            println!("smp: witness: {e}");
            return 1;
        }
    };
    let x = match morsel::open("xs") {
        Ok(x) => x,
        Err(e) => {
            println!("smp: open of 'xs' read-only FAILED: {e}");
            return 1;
        }
    };
    WITNESS.store(w.addr(), SeqCst);
    SHARED.store(x.addr(), SeqCst);
    core::mem::forget((w, x));
    reader()
}

/// Args 3 and 8: publishes `victim` (the reader's page) and the witness, waits until vCPU 1
/// reads it, then `remove`s it (`what` says how; false: a call failed) and sets FLAG right
/// after, with no exit in between (an exit of the reader's CPU meanwhile would drop its
/// cached translations and hide a missing shootdown); the reader's fault stops this guest,
/// so this never returns but with an error.
fn remove_while_read(victim: u64, what: &str, remove: impl FnOnce() -> bool) -> i32 {
    let w = match open_shared("witness", true) {
        Ok(w) => w,
        Err(e) => {
            println!("smp: witness: {e}");
            return 1;
        }
    };
    WITNESS.store(w.addr(), SeqCst);
    SHARED.store(victim, SeqCst);
    let wa = w.atomics();
    // The reader is reading (its count of reads before FLAG moves).
    while wa[2].load(SeqCst) < 1000 {
        yield_now();
    }
    println!("smp: {what} while vcpu 1 reads it on another CPU");
    wa[3].store(1, SeqCst);
    let ok = remove();
    wa[0].store(1, SeqCst); // FLAG, only after the call returned
    println!("smp: the call returned{}, flag set", if ok { "" } else { " FAILED" });
    loop {
        core::hint::spin_loop(); // the reader's fault stops this guest
    }
}

fn reader() -> i32 {
    let wa = wait_for(&WITNESS);
    let gpa = loop {
        let g = SHARED.load(SeqCst);
        if g != 0 {
            break g;
        }
        yield_now();
    };
    println!("smp: vcpu 1 reading 'victim' at {gpa:#x} on cpu {}", guest_lib::cpu_index());
    loop {
        let after = wa[0].load(SeqCst) != 0;
        // SAFETY: the victim (arg 8: page 0 of the region) is mounted (populated) at gpa until
        // vCPU 0 unmounts (FREEs) it; after that the read is a second-level fault (what this
        // checks), never other memory.
        let _ = unsafe { read_volatile(gpa as *const u64) };
        if after {
            wa[1].fetch_add(1, SeqCst);
        } else {
            wa[2].fetch_add(1, SeqCst);
        }
    }
}

fn witness() -> i32 {
    let w = match open_shared("witness", false) {
        Ok(w) => w,
        Err(e) => {
            println!("witness: {e}");
            return 1;
        }
    };
    let wa = w.atomics();
    // The unmount began; the reader may be stopped before vCPU 0 gets to set the flag.
    while wa[3].load(SeqCst) == 0 {
        yield_now();
    }
    for _ in 0..200 {
        yield_now();
    }
    let after = wa[1].load(SeqCst);
    println!("witness: reads started after the call returned: {after} ({} before; flag {})", wa[2].load(SeqCst),
        if wa[0].load(SeqCst) != 0 { "set" } else { "not set yet: the reader was stopped first" });
    (after != 0) as i32
}

fn churn(info: &BootInfo, vcpu: u32) -> i32 {
    let mut name = [0u8; 16];
    for i in 0..16u64 {
        for (page, size) in [(PageSize::Size4K, 64u64 << 10), (PageSize::Size2M, 4 << 20)] {
            let n = fmt_name(&mut name, vcpu, i, page == PageSize::Size2M);
            let m = loop {
                match morsel::create(n, size, page, false) {
                    Ok(m) => break m,
                    Err(Error::NoMemory) => yield_now(),
                    Err(e) => {
                        println!("smp: vcpu {vcpu}: create {n}: {e}");
                        return 1;
                    }
                }
            };
            let a = m.atomics();
            let tag = ((vcpu as u64) << 48) | (i << 8) | 0xa5;
            let step = if page == PageSize::Size2M { 2 << 20 } else { 4096 } / 8;
            // A new morsel is zeroed (its frames carried earlier morsels' tags).
            if let Some(k) = (0..a.len()).step_by(step).find(|&k| a[k].load(SeqCst) != 0) {
                println!("smp: vcpu {vcpu}: {n} word {k} of a new morsel holds {:#x}, not zero UNEXPECTED", a[k].load(SeqCst));
                return 1;
            }
            for k in (0..a.len()).step_by(step) {
                a[k].store(tag ^ k as u64, SeqCst);
            }
            yield_now(); // let the others allocate in between
            for k in (0..a.len()).step_by(step) {
                let got = a[k].load(SeqCst);
                if got != tag ^ k as u64 {
                    println!("smp: vcpu {vcpu}: {n} word {k} holds {got:#x}, not its own tag: a frame handed out twice");
                    return 1;
                }
            }
            drop(m);
            if let Err(e) = morsel::destroy(n) {
                println!("smp: vcpu {vcpu}: destroy {n}: {e}");
                return 1;
            }
        }
    }
    println!("smp: vcpu {vcpu} on cpu {}: 32 morsels created, checked, destroyed", guest_lib::cpu_index());
    if vcpu == 0 {
        while READY.load(SeqCst) < info.vcpu_count - 1 {
            yield_now();
        }
    } else {
        READY.fetch_add(1, SeqCst);
    }
    0
}

/// "cV-I-s" / "cV-I-h" in `buf`.
fn fmt_name(buf: &mut [u8; 16], vcpu: u32, i: u64, huge: bool) -> &str {
    let mut n = 0;
    let mut put = |b: u8| {
        buf[n] = b;
        n += 1;
    };
    put(b'c');
    put(b'0' + (vcpu % 10) as u8);
    put(b'-');
    put(b'0' + (i / 10 % 10) as u8);
    put(b'0' + (i % 10) as u8);
    put(b'-');
    put(if huge { b'h' } else { b's' });
    core::str::from_utf8(&buf[..n]).unwrap_or("c")
}

fn fault_main(info: &BootInfo) -> i32 {
    while READY.load(SeqCst) < info.vcpu_count - 1 {
        yield_now();
    }
    println!("smp: {} other vCPUs spin; vcpu 0 now reads outside its memory", info.vcpu_count - 1);
    // SAFETY: deliberately not safe: the second-level fault is what this checks.
    let v = unsafe { read_volatile((info.memory_size + (64 << 20)) as *const u64) };
    println!("smp: the read returned {v:#x}");
    1
}

/// Shootdown IPIs arg 7 sends into the spinning vCPU.
const KICKS: u64 = 100;

fn kicks_main() -> i32 {
    while READY.load(SeqCst) == 0 {
        yield_now();
    }
    let per_us = guest_lib::info(guest_lib::abi::INFO_TSC_PER_US).unwrap_or(1).max(1);
    let slices = || guest_lib::info(guest_lib::abi::INFO_SLICES).unwrap_or(0);
    let (t0, s0) = (tsc(), slices());
    for _ in 0..KICKS {
        // The unmount (drop) shoots down on every CPU this guest ran on: vCPU 1's too.
        match morsel::create("kick", 4096, PageSize::Size4K, false) {
            Ok(m) => drop(m),
            Err(e) => {
                println!("smp kicks: create failed: {e}: WRONG");
                return 1;
            }
        }
        let _ = morsel::destroy("kick");
        let _ = guest_lib::notify::sleep(1000);
    }
    let (used, ms) = (slices() - s0, (tsc() - t0) / per_us / 1000);
    READY.store(2, SeqCst);
    // With a host that deschedules the emulator's CPU threads for longer than a slice, an
    // IPI often lands together with a slice timer tick (one exit, a preemption): the figures
    // are printed, and the exit table shows the IPI exits that came inside a slice.
    println!("smp kicks: {KICKS} unmounts (shootdown IPIs into the spinning vCPU) in {ms} ms: {used} slices used");
    0
}

fn kicks_spinner() -> i32 {
    READY.store(1, SeqCst);
    while READY.load(SeqCst) != 2 {
        core::hint::spin_loop();
    }
    0
}

/// Arg 11, vCPU 0: once vCPU 1 keeps its canary, recurses until the stack guard page stops
/// this guest; never returns.
fn overflow_main() -> i32 {
    while READY.load(SeqCst) == 0 {
        yield_now();
    }
    println!("smp: vcpu 0 recurses until its stack overflows");
    let depth = deep(core::hint::black_box(0));
    println!("smp: the recursion returned {depth} (UNEXPECTED)");
    1
}

/// 1 KiB of stack per call, for ever (a black-boxed limit the caller never reaches).
#[inline(never)]
fn deep(n: u64) -> u64 {
    let mut buf = [0u8; 1024];
    buf[(n % 1024) as usize] = n as u8;
    let buf = core::hint::black_box(buf);
    if n == core::hint::black_box(u64::MAX) {
        return 0;
    }
    deep(n + 1).wrapping_add(u64::from(buf[(n % 7) as usize]))
}

/// Arg 11, vCPU 1: a canary on this vCPU's stack, checked until the guest is stopped; a
/// change means another vCPU wrote this stack.
fn canary_keeper() -> i32 {
    const CANARY: u64 = 0x5a5a_c0de_5a5a_c0de;
    let canary = core::hint::black_box([CANARY; 256]);
    READY.fetch_add(1, SeqCst);
    loop {
        for (i, word) in canary.iter().enumerate() {
            // SAFETY: a word of this vCPU's own live stack array, read as it is now.
            let now = unsafe { read_volatile(word) };
            if now != CANARY {
                println!("smp: vcpu 1's stack was written by another vCPU: word {i} is {now:#x} (UNEXPECTED)");
                return 1;
            }
        }
    }
}

/// Arg 12, vCPU 0: RSP into the middle of vCPU 1's stack reserve, then UD2 (an exception the
/// guest does not handle: the hypervisor stops it); never returns.
fn foreign_stack_main(info: &BootInfo) -> i32 {
    let sibling = info.memory_size - guest_lib::abi::VCPU_STACK_RESERVE - guest_lib::abi::VCPU_STACK_RESERVE / 2;
    println!("smp: vcpu 0 moves its stack to {sibling:#x}, in vcpu 1's reserve, and faults");
    // SAFETY: nothing runs on the new stack: UD2 stops the guest (no handler is installed).
    unsafe { core::arch::asm!("mov rsp, {0}", "ud2", in(reg) sibling, options(noreturn)) }
}
