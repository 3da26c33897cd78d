//! Doorbells on a shared morsel (issue 16), one role per `arg`:
//! - 0 ringer: creates "bell", spins through 20 time slices, then rings bits 0x5 until two
//!   subscribers got them;
//! - 1 listener: opens "bell", subscribes (bits only) and waits forever for bit 0x1; checks
//!   that it took at most 6 exits and 6 slices (host stalls under QEMU) while it waited;
//! - 2 bystander: opens "bell" without subscribing: a wait of 300 ms ends with nothing;
//! - 3 attacker: bad doorbell calls, each with the error the ABI defines;
//! - 4 deadlock: creates or opens "lock", subscribes and waits forever (two of them deadlock);
//! - 5 pair (`:vcpus=2`): vCPU 1 waits forever for bit 0x1 of the guest's own private morsel
//!   while vCPU 0 works through 5 time slices and then rings it: a wait parks only the vCPU
//!   that called it, and a notify reaches the caller's other vCPUs.
//! - 6 vector subscriber (`:vcpus=2`): creates "vbell" (others may only open it read-only),
//!   handles vector 0x50 and subscribes with it; both vCPUs unmask interrupts and wait until
//!   each took the interrupt once (issue 20 item 10: vCPU 1 had no IDT and died of #GP);
//! - 7 vector ringer: opens "vbell" read-only and rings it once its owner subscribed.
//! - 8 same CPU (`:vcpus=2:cpu=0`): vCPU 1 unmasks interrupts and spins, never calling the
//!   hypervisor, so its slices start without the world lock (`vmcore::gate`); vCPU 0, on the
//!   same CPU (no wake-up IPI), subscribes the guest's private "sbell" with vector 0x50,
//!   yields a few slices, rings it and counts its own yields until vCPU 1 took the vector:
//!   the ring bumps the guest's epoch, so vCPU 1's next slice starts under the lock and
//!   injects (1 yield); at most 3 are allowed (a start that missed the ring would wait up
//!   to 16 slices for the next start under the lock).
//! - 9 stopped on one CPU (`:vcpus=2:cpu=0`, with a 10 on CPU 0 too): vCPU 1 counts in word 0
//!   of "stopme" without calling the hypervisor (its slices start without the world lock);
//!   vCPU 0 lets it run a few slices, sets word 1 and reads outside its memory: the guest is
//!   stopped, and vCPU 1, on the same CPU (no kick IPI), must end at its next slice start;
//! - 10 stop watcher: opens "stopme", waits for word 1, then looks at word 0 once per yield
//!   for 30 yields: it may move in at most one of them (with the stop's epoch bump left out,
//!   vCPU 1 would count on until the next start under the lock, up to 16 slices).
#![no_std]
#![no_main]

use guest_lib::morsel::{self, PageSize};
use guest_lib::notify::{self, micros, Doorbell, Event, Timeout};
use guest_lib::hypercall::call;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guest_lib::{abi, info, println, yield_now, BootInfo, Error};

guest_lib::entry!(main, vcpu_main);

/// arg 5: the private morsel's mount (0: not yet), vCPU 1 about to wait, slices vCPU 0
/// worked before it rang, when it rang (guest micros), vCPU 1's verdict (1 ok, 2 wrong).
static PAIR: AtomicU64 = AtomicU64::new(0);
static WAITING: AtomicU64 = AtomicU64::new(0);
static WORKED: AtomicU64 = AtomicU64::new(0);
static RANG_AT: AtomicU64 = AtomicU64::new(0);
static VERDICT: AtomicU64 = AtomicU64::new(0);
/// arg 6: the vector, the subscription done, interrupts taken by vCPU 0 and vCPU 1.
const VECTOR: u8 = 0x50;
static SUBSCRIBED: AtomicU64 = AtomicU64::new(0);
static TAKEN: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// arg 8: vCPU 1 spins with interrupts unmasked.
static SPINNING: AtomicU64 = AtomicU64::new(0);
/// arg 9: where "stopme" is mounted (0: not yet), for vCPU 1.
static STOPME: AtomicU64 = AtomicU64::new(0);

/// `open()` until its name exists: the answer of the first call that is not `NotFound`.
fn retry<T>(open: impl Fn() -> Result<T, Error>) -> Result<T, Error> {
    loop {
        match open() {
            Err(Error::NotFound) => yield_now(),
            other => return other,
        }
    }
}

fn open_retry(name: &str) -> Result<morsel::MorselMut, Error> {
    retry(|| morsel::open_mut(name))
}

fn main(info_: &BootInfo) -> i32 {
    let me = info_.guest_id;
    match info_.arg {
        0 => ringer(),
        1 => listener(me),
        2 => bystander(me),
        3 => attacker(info_),
        5 => pair_main(),
        6 => vector_subscriber(),
        7 => vector_ringer(),
        8 => same_cpu_ringer(),
        9 => stop_main(info_),
        10 => stop_watcher(),
        _ => deadlock(me),
    }
}

fn vcpu_main(info_: &BootInfo, vcpu: u32) -> i32 {
    match (info_.arg, vcpu) {
        (5, 1) => pair_waiter(),
        (6, 1) => vector_take(1),
        (8, 1) => same_cpu_spinner(),
        (9, 1) => stop_spinner(),
        _ => 0,
    }
}

fn pair_main() -> i32 {
    let Ok(m) = morsel::create("pair", 4096, PageSize::Size4K, false) else { return 1 };
    let bell = Doorbell::new(m.addr());
    if let Err(e) = bell.subscribe(None) {
        println!("bell pair: subscribe failed: {e}");
        return 1;
    }
    PAIR.store(m.addr(), SeqCst);
    while WAITING.load(SeqCst) == 0 {
        yield_now();
    }
    // vCPU 1 is parked (or about to be): this vCPU must still get its slices.
    let slices = info(abi::INFO_SLICES).unwrap_or(0);
    while info(abi::INFO_SLICES).unwrap_or(0) < slices + 5 {
        core::hint::spin_loop();
    }
    WORKED.store(5, SeqCst);
    RANG_AT.store(micros(), SeqCst);
    let rang = bell.ring(Event(0x1));
    println!("bell pair: vcpu 0 worked through 5 slices while vcpu 1 waited, then rang: {rang:?}");
    let t0 = micros();
    while VERDICT.load(SeqCst) == 0 && micros() - t0 < 5_000_000 {
        yield_now();
    }
    match (rang, VERDICT.load(SeqCst)) {
        (Ok(1), 1) => 0,
        _ => {
            println!("bell pair: WRONG");
            1
        }
    }
}

fn pair_waiter() -> i32 {
    while PAIR.load(SeqCst) == 0 {
        yield_now();
    }
    WAITING.store(1, SeqCst);
    let got = notify::wait(Event(0x1), Timeout::Forever);
    let (worked, after) = (WORKED.load(SeqCst), micros().saturating_sub(RANG_AT.load(SeqCst)));
    println!("bell pair: vcpu 1 woke with {got:?} after vcpu 0 worked {worked} slices, {after} us after the ring");
    let ok = got == Ok(Event(0x1)) && worked == 5;
    VERDICT.store(if ok { 1 } else { 2 }, SeqCst);
    if ok { 0 } else { 1 }
}

fn vector_handler(_: &mut guest_lib::interrupts::Frame) {
    let v = guest_lib::vcpu_index() as usize;
    if let Some(t) = TAKEN.get(v) {
        t.fetch_add(1, SeqCst);
    }
}

fn vector_subscriber() -> i32 {
    let Ok(m) = morsel::create("vbell", 4096, PageSize::Size4K, false) else { return 1 };
    if guest_lib::interrupts::set_handler(VECTOR, vector_handler).is_err() {
        return 1;
    }
    if let Err(e) = Doorbell::new(m.addr()).subscribe(Some(VECTOR)) {
        println!("bell vectors: subscribe failed: {e}");
        return 1;
    }
    SUBSCRIBED.store(1, SeqCst);
    let code = vector_take(0);
    // Keep "vbell" (and the subscription) until vCPU 1 is done too.
    let t0 = micros();
    while TAKEN[1].load(SeqCst) == 0 && micros() - t0 < 5_000_000 {
        let _ = notify::wait(Event(0), Timeout::Micros(50_000));
    }
    code
}

/// Unmasks interrupts on this vCPU and waits (at most 5 s) until it took the vector.
fn vector_take(vcpu: usize) -> i32 {
    while SUBSCRIBED.load(SeqCst) == 0 {
        yield_now();
    }
    guest_lib::interrupts::enable();
    let t0 = micros();
    while TAKEN[vcpu].load(SeqCst) == 0 && micros() - t0 < 5_000_000 {
        let _ = notify::wait(Event(0), Timeout::Micros(50_000));
    }
    let n = TAKEN[vcpu].load(SeqCst);
    println!("bell vectors: vcpu {vcpu} took vector {VECTOR:#x} {n} time(s) and runs on");
    if n == 0 {
        println!("bell vectors: vcpu {vcpu}: WRONG (no interrupt)");
        return 1;
    }
    0
}

fn same_cpu_ringer() -> i32 {
    let Ok(m) = morsel::create("sbell", 4096, PageSize::Size4K, false) else { return 1 };
    if guest_lib::interrupts::set_handler(VECTOR, vector_handler).is_err() {
        return 1;
    }
    let bell = Doorbell::new(m.addr());
    if let Err(e) = bell.subscribe(Some(VECTOR)) {
        println!("bell same cpu: subscribe failed: {e}");
        return 1;
    }
    SUBSCRIBED.store(1, SeqCst);
    while SPINNING.load(SeqCst) == 0 {
        yield_now();
    }
    // A few of vCPU 1's slices: they start without the world lock by then.
    for _ in 0..4 {
        yield_now();
    }
    let rang = bell.ring(Event(0x1));
    let mut yields = 0u64;
    while TAKEN[1].load(SeqCst) == 0 && yields < 100 {
        yield_now();
        yields += 1;
    }
    let taken = TAKEN[1].load(SeqCst);
    println!("bell same cpu: rang {rang:?}; vcpu 1 (spinning on this CPU) took vector {VECTOR:#x} {taken} time(s), after {yields} of vcpu 0's yields");
    match (rang, taken, yields) {
        (Ok(1), 1.., ..=3) => 0,
        _ => {
            println!("bell same cpu: WRONG (vcpu 1's slices went on without the raised vector)");
            1
        }
    }
}

/// arg 8, vCPU 1: spins with interrupts unmasked until the vector came (at most 10 s).
fn same_cpu_spinner() -> i32 {
    while SUBSCRIBED.load(SeqCst) == 0 {
        yield_now();
    }
    guest_lib::interrupts::enable();
    let t0 = micros();
    SPINNING.store(1, SeqCst);
    while TAKEN[1].load(SeqCst) == 0 && micros() - t0 < 10_000_000 {
        core::hint::spin_loop();
    }
    0
}

/// arg 9, vCPU 0: see the module doc.
fn stop_main(info_: &BootInfo) -> i32 {
    let Ok(m) = morsel::create("stopme", 4096, PageSize::Size4K, false) else { return 1 };
    STOPME.store(m.addr(), SeqCst);
    let words = m.atomics();
    while words[0].load(SeqCst) == 0 {
        yield_now();
    }
    for _ in 0..4 {
        yield_now();
    }
    println!("bell stop: vcpu 1 counts on this CPU; vcpu 0 now reads outside its memory");
    words[1].store(1, SeqCst);
    // SAFETY: deliberately not safe: the second-level fault that stops this guest is the point.
    let v = unsafe { core::ptr::read_volatile((info_.memory_size + (64 << 20)) as *const u64) };
    println!("bell stop: the read returned {v:#x}: WRONG");
    1
}

/// arg 9, vCPU 1: counts in word 0 of "stopme" without calling the hypervisor until its
/// guest is stopped.
fn stop_spinner() -> i32 {
    let gpa = loop {
        match STOPME.load(SeqCst) {
            0 => yield_now(),
            at => break at,
        }
    };
    let Some(words) = morsel::atomics_at(gpa) else { return 1 };
    loop {
        words[0].fetch_add(1, SeqCst);
        core::hint::spin_loop();
    }
}

/// arg 10: see the module doc.
fn stop_watcher() -> i32 {
    let m = match retry(|| morsel::open("stopme")) {
        Ok(m) => m,
        Err(e) => {
            println!("bell stop watcher: open failed: {e}");
            return 1;
        }
    };
    let words = m.atomics();
    while words[1].load(SeqCst) == 0 {
        yield_now();
    }
    let (mut last, mut moved) = (words[0].load(SeqCst), 0);
    for _ in 0..30 {
        yield_now();
        let now = words[0].load(SeqCst);
        if now != last {
            (last, moved) = (now, moved + 1);
        }
    }
    println!("bell stop watcher: the stopped guest's spinning vcpu counted in {moved} of this guest's next 30 turns");
    if moved > 1 {
        println!("bell stop watcher: WRONG (a vcpu of a stopped guest went on running its slices)");
        return 1;
    }
    0
}

fn vector_ringer() -> i32 {
    let m = match retry(|| morsel::open("vbell")) {
        Ok(m) => m,
        Err(e) => {
            println!("bell vector ringer: open failed: {e}");
            return 1;
        }
    };
    let bell = Doorbell::new(m.addr());
    loop {
        match bell.ring(Event(0x1)) {
            Ok(n) => {
                println!("bell vector ringer: rang the read-only mount, reached {n} guest(s)");
                return 0;
            }
            Err(Error::NoReceiver) => yield_now(),
            Err(e) => {
                println!("bell vector ringer: ring failed: {e}");
                return 1;
            }
        }
    }
}

fn ringer() -> i32 {
    let Ok(m) = morsel::create("bell", 4096, PageSize::Size4K, true) else { return 1 };
    let bell = Doorbell::new(m.addr());
    let slices = info(abi::INFO_SLICES).unwrap_or(0);
    while info(abi::INFO_SLICES).unwrap_or(0) < slices + 20 {
        core::hint::spin_loop();
    }
    let mut tries = 0u64;
    loop {
        match bell.ring(Event(0x5)) {
            Ok(2) => break,
            Ok(_) | Err(Error::NoReceiver) => {
                tries += 1;
                yield_now();
            }
            Err(e) => {
                println!("bell ringer: ring failed: {e}");
                return 1;
            }
        }
    }
    println!("bell ringer: rang 0x5 after 20 slices of work, reached 2 subscribers ({tries} early tries)");
    // Keep the morsel until the others are done with it.
    for _ in 0..200 {
        yield_now();
    }
    0
}

fn listener(me: u64) -> i32 {
    let Ok(m) = open_retry("bell") else { return 1 };
    let bell = Doorbell::new(m.addr());
    if let Err(e) = bell.subscribe(None) {
        println!("bell {me}: subscribe failed: {e}");
        return 1;
    }
    let (slices, exits) = (info(abi::INFO_SLICES).unwrap_or(0), info(abi::INFO_EXITS).unwrap_or(0));
    let got = notify::wait(Event(0x1), Timeout::Forever);
    let used = info(abi::INFO_SLICES).unwrap_or(0) - slices;
    let exited = info(abi::INFO_EXITS).unwrap_or(0) - exits;
    println!("bell {me}: woke with {got:?}, {used} time slices and {exited} exits while waiting");
    // The ring's other bit (0x4) stays pending until asked for.
    let rest = notify::wait(Event(0x4), Timeout::Poll);
    println!("bell {me}: bit 0x4 still pending: {rest:?}");
    // While the ringer works through 20 slices this guest must use none: the window around the
    // wait may still take an exit on each side (a timer tick, a preemption; or with 2 CPUs
    // another CPU's IPI, an interrupt exit), hence up to 6 exits. Slices: 2, and under QEMU on
    // a loaded host a few more, since a slice is charged when the TSC passes its end, which
    // a descheduled vCPU thread lets happen with no guest work (3-5 seen in loaded runs on
    // QEMU 7.2 and 11.1, never unloaded); a listener that ran while it waited would use
    // about as many as the ringer's 20, and hundreds of exits.
    // Each such slice brings its preemption exit (and maybe an interrupt exit) with it.
    let extra = used.saturating_sub(2);
    if got != Ok(Event(0x1)) || rest != Ok(Event(0x4)) || used > 6 || exited > 6 + 2 * extra {
        println!("bell {me}: WRONG");
        return 1;
    }
    0
}

fn bystander(me: u64) -> i32 {
    let Ok(_m) = open_retry("bell") else { return 1 };
    let t0 = micros();
    let got = notify::wait(Event(u64::MAX), Timeout::Micros(300_000));
    let waited = micros() - t0;
    println!("bell {me}: not subscribed: wait ended with {got:?} after {} ms", waited / 1000);
    if got != Ok(Event(0)) || waited < 300_000 {
        println!("bell {me}: WRONG");
        return 1;
    }
    0
}

fn attacker(info_: &BootInfo) -> i32 {
    let window = info_.morsel_window;
    let mut bad = 0;
    let mut check = |what: &str, nr: u64, args: [u64; 6], want: Result<u64, Error>| {
        let got = call(nr, args);
        let verdict = if got == want { "ok" } else { bad += 1; "WRONG" };
        println!("bell attack: {what}: {got:?} ({verdict})");
    };
    // The ringer's morsel sits at the start of *its* window; nothing is mounted there here.
    check("notify at another guest's mount address", abi::HC_NOTIFY, [window, 1, 0, 0, 0, 0], Err(Error::NotFound));
    check("notify at a RAM address", abi::HC_NOTIFY, [0x20_0000, 1, 0, 0, 0, 0], Err(Error::NotFound));
    check("subscribe at an unmounted address", abi::HC_NOTIFY_SUBSCRIBE, [u64::MAX, 0, 0, 0, 0, 0], Err(Error::NotFound));
    let Ok(m) = morsel::create("atk", 4096, PageSize::Size4K, false) else { return 1 };
    let gpa = m.addr();
    check("notify with no bits", abi::HC_NOTIFY, [gpa, 0, 0, 0, 0, 0], Err(Error::Invalid));
    check("notify nobody listens to", abi::HC_NOTIFY, [gpa, 1, 0, 0, 0, 0], Err(Error::NoReceiver));
    check("notify inside the mount, not at it", abi::HC_NOTIFY, [gpa + 8, 1, 0, 0, 0, 0], Err(Error::NotFound));
    check("subscribe with exception vector 14", abi::HC_NOTIFY_SUBSCRIBE, [gpa, 14, 0, 0, 0, 0], Err(Error::Invalid));
    check("subscribe with vector 256", abi::HC_NOTIFY_SUBSCRIBE, [gpa, 256, 0, 0, 0, 0], Err(Error::Invalid));
    check("subscribe to own morsel", abi::HC_NOTIFY_SUBSCRIBE, [gpa, 0, 0, 0, 0, 0], Ok(0));
    check("notify self only", abi::HC_NOTIFY, [gpa, 1, 0, 0, 0, 0], Err(Error::NoReceiver));
    check("wait with an empty mask", abi::HC_WAIT, [0, 10, 0, 0, 0, 0], Err(Error::Invalid));
    check("wait with a huge timeout", abi::HC_WAIT, [1, abi::WAIT_MAX_US + 1, 0, 0, 0, 0], Err(Error::TooLarge));
    check("wait polling", abi::HC_WAIT, [1, 0, 0, 0, 0, 0], Ok(0));
    check("sleep 0", abi::HC_SLEEP, [0, 0, 0, 0, 0, 0], Err(Error::Invalid));
    check("sleep forever", abi::HC_SLEEP, [u64::MAX, 0, 0, 0, 0, 0], Err(Error::TooLarge));
    check("timer with vector 2 (NMI)", abi::HC_TIMER, [100, 2, 0, 0, 0, 0], Err(Error::Invalid));
    check("timer of 2^63 us", abi::HC_TIMER, [1 << 63, 0x40, 0, 0, 0, 0], Err(Error::TooLarge));
    check("timer cancel", abi::HC_TIMER, [0, 0, 0, 0, 0, 0], Ok(0));
    check("take #DF", abi::HC_GUEST_EXCEPTIONS, [1 << 8, 0, 0, 0, 0, 0], Err(Error::Invalid));
    check("take #MC", abi::HC_GUEST_EXCEPTIONS, [1 << 18, 0, 0, 0, 0, 0], Err(Error::Invalid));
    check("take vector 40 as an exception", abi::HC_GUEST_EXCEPTIONS, [1 << 40, 0, 0, 0, 0, 0], Err(Error::Invalid));
    drop(m);
    check("notify after unmount", abi::HC_NOTIFY, [gpa, 1, 0, 0, 0, 0], Err(Error::NotFound));
    let _ = morsel::destroy("atk");
    // A wait for a timer interrupt that nobody handles would stop us: none is armed.
    if bad == 0 { 0 } else { 1 }
}

fn deadlock(me: u64) -> i32 {
    let m = match morsel::create("lock", 4096, PageSize::Size4K, true) {
        Ok(m) => m,
        Err(Error::Busy) => match open_retry("lock") {
            Ok(m) => m,
            Err(_) => return 1,
        },
        Err(_) => return 1,
    };
    let _ = Doorbell::new(m.addr()).subscribe(None);
    println!("bell {me}: waiting forever for the other to ring");
    let got = notify::wait(Event(1), Timeout::Forever);
    println!("bell {me}: woke with {got:?}: WRONG");
    1
}
