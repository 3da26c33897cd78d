//! The name-watch rendezvous (`HC_NAME_WATCH`, guest-lib `morsel::await_name`) attacked and
//! raced, one role per `arg`:
//! - 1 watcher (`:vcpus=4`): vCPU 0 first makes bad watch calls (each must get the error the
//!   ABI defines), then creates "w-ready" and checks that a watch on an existing name is
//!   answered at once; every vCPU then waits for "w-private" (created by another guest
//!   without sharing: the watch must grant nothing, a read-write open stays `Denied`) and
//!   then counts how often it saw "w-race" appear while the creator creates and destroys it
//!   in a loop;
//! - 0 creator: waits for "w-ready", creates "w-private" (64 MiB: the name is pending while
//!   its frames are zeroed), then creates and destroys "w-race" `CYCLES` times.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guest_lib::hypercall::call;
use guest_lib::morsel::{self, PageSize};
use guest_lib::notify::{self, Event, Timeout};
use guest_lib::{abi, println, BootInfo, Error};

guest_lib::entry!(main, vcpu_main);

const CYCLES: u64 = 30;
static ATTACKS_DONE: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);
/// A guest mounts a morsel once: the vCPUs take turns with "w-private" (1: one has it).
static TURN: AtomicU64 = AtomicU64::new(0);

fn main(info: &BootInfo) -> i32 {
    match info.arg {
        0 => creator(),
        _ => {
            let code = attacks();
            ATTACKS_DONE.store(1, SeqCst);
            let c = watcher(0);
            if code != 0 || c != 0 || FAILED.load(SeqCst) != 0 { 1 } else { 0 }
        }
    }
}

fn vcpu_main(_: &BootInfo, vcpu: u32) -> i32 {
    watcher(vcpu)
}

fn creator() -> i32 {
    match morsel::await_name("w-ready", Timeout::Forever) {
        Ok(true) => {}
        other => {
            println!("watch creator: await w-ready: {other:?}: WRONG");
            return 1;
        }
    }
    let Ok(_private) = morsel::create("w-private", 64 << 20, PageSize::Size2M, false) else { return 1 };
    println!("watch creator: created w-private (64 MiB, not shared writable)");
    let mut made = 0;
    for _ in 0..CYCLES {
        match morsel::create("w-race", 4096, PageSize::Size4K, false) {
            Ok(m) => {
                made += 1;
                let _ = notify::sleep(3_000);
                drop(m);
                let _ = morsel::destroy("w-race");
            }
            Err(e) => println!("watch creator: create w-race: {e}"),
        }
        let _ = notify::sleep(3_000);
    }
    println!("watch creator: w-race created and destroyed {made} times");
    // Keep w-private until the watchers are done with it.
    let _ = notify::sleep(1_500_000);
    0
}

fn attacks() -> i32 {
    let mut ok = true;
    let mut check = |what: &str, args: [u64; 3], want: Result<u64, Error>| {
        let got = call(abi::HC_NAME_WATCH, [args[0], args[1], args[2], 0, 0, 0]);
        if got != want {
            println!("watch attack {what}: {got:?}, expected {want:?}: WRONG");
            ok = false;
        }
    };
    let name = "w-private";
    let p = name.as_ptr() as u64;
    check("unmapped name", [0x7000_0000_0000, 4, 1], Err(Error::BadAddress));
    check("name in the morsel window", [abi::MORSEL_WINDOW_GPA + 0x10_0000, 4, 1], Err(Error::BadAddress));
    check("wrapping name", [u64::MAX - 1, 4, 1], Err(Error::BadAddress));
    check("empty name", [p, 0, 1], Err(Error::Invalid));
    check("name too long", [p, abi::MORSEL_NAME_MAX as u64 + 1, 1], Err(Error::Invalid));
    let blank = "a b";
    check("name with a blank", [blank.as_ptr() as u64, 3, 1], Err(Error::Invalid));
    check("cancel without a watch", [p, name.len() as u64, 0], Ok(0));
    check("watch, then replace it", [p, name.len() as u64, 2], Ok(0));
    check("cancel", [p, name.len() as u64, 0], Ok(0));
    // Nothing may be pending from the cancelled watch.
    let stale = notify::wait(Event(2), Timeout::Poll);
    if stale != Ok(Event(0)) {
        println!("watch attack: a cancelled watch left {stale:?}: WRONG");
        ok = false;
    }
    let Ok(ready) = morsel::create("w-ready", 4096, PageSize::Size4K, false) else { return 1 };
    let at_once = notify::watch_name("w-ready", Event(4));
    let bit = notify::wait(Event(4), Timeout::Poll);
    if at_once != Ok(true) || bit != Ok(Event(4)) {
        println!("watch attack: an existing name: {at_once:?}, pending {bit:?}: WRONG");
        ok = false;
    }
    core::mem::forget(ready);
    println!("watch attacks: bad names refused, cancel and replace work, an existing name answers at once{}", if ok { "" } else { ": WRONG" });
    if ok { 0 } else { 1 }
}

fn watcher(vcpu: u32) -> i32 {
    while ATTACKS_DONE.load(SeqCst) == 0 {
        guest_lib::yield_now();
    }
    // The name is pending (Busy to creates, NotFound to opens) while its frames are zeroed.
    if morsel::await_name("w-private", Timeout::Forever) != Ok(true) {
        println!("watch {vcpu}: await w-private: WRONG");
        return 1;
    }
    // One mount per guest: one vCPU at a time opens, checks and unmounts.
    while TURN.compare_exchange(0, 1, SeqCst, SeqCst).is_err() {
        guest_lib::yield_now();
    }
    let rw = morsel::open_mut("w-private");
    let granted = matches!(rw, Ok(_));
    drop(rw);
    let m = morsel::open("w-private");
    println!("watch {vcpu}: woke for w-private: read-only open {}, read-write open {}",
        if m.is_ok() { "ok" } else { "failed" }, if granted { "GRANTED: WRONG" } else { "denied" });
    drop(m);
    TURN.store(0, SeqCst);
    let mut seen = 0;
    loop {
        match morsel::await_name("w-race", Timeout::Micros(1_000_000)) {
            Ok(true) => seen += 1,
            Ok(false) => break,
            Err(e) => {
                println!("watch {vcpu}: await w-race: {e}: WRONG");
                FAILED.store(1, SeqCst);
                return 1;
            }
        }
        // Until it is gone again: then watch for the next create.
        while morsel::await_name("w-race", Timeout::Poll) == Ok(true) {
            let _ = notify::sleep(1_000);
        }
    }
    println!("watch {vcpu}: saw w-race appear {seen} times{}", if seen == 0 || granted { ": WRONG" } else { "" });
    if seen == 0 || granted {
        FAILED.store(1, SeqCst);
        return 1;
    }
    0
}
