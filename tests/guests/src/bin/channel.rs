//! Inter-guest communication with doorbells (issue 16), one role per `arg`:
//! - 0 / 1: producer / consumer of `guest_lib::channel` over a 64 KiB morsel: 1 MiB of a
//!   pattern, then its checksum; the consumer checks both;
//! - 2 / 3: ping / pong over a shared page, the other side woken by a doorbell (`wait`);
//! - 4 / 5: the same with `yield` polling. Ping prints round trips per second and its exits
//!   per round trip, pong its exits per round trip;
//! - 6 / 7: idle for `IDLE_US`, waiting (one `sleep`) or polling (`yield` until the time is
//!   up): what an idle system costs the host (`cargo xtask bench ipc`).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_lib::channel::Channel;
use guest_lib::morsel::{self, PageSize};
use guest_lib::notify::{self, micros, Doorbell, Event, Timeout};
use guest_lib::{abi, info, println, yield_now, BootInfo, Error};

guest_lib::entry!(main);

const TOTAL: usize = 1 << 20;
const ROUNDS: u64 = 2000;
/// How long the idle roles (6, 7) stay idle.
const IDLE_US: u64 = 3_000_000;

fn byte(i: usize) -> u8 {
    ((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

fn checksum(sum: u64, i: usize, b: u8) -> u64 {
    sum.wrapping_add((b as u64).wrapping_mul(2 * i as u64 + 1)).rotate_left(1)
}

fn main(info_: &BootInfo) -> i32 {
    match info_.arg {
        0 => producer(),
        1 => consumer(),
        6 => idle(true),
        7 => idle(false),
        a => pingpong(a % 2 == 0, a < 4),
    }
}

fn producer() -> i32 {
    let Ok(mut ch) = Channel::create("chan", 64 << 10) else { return 1 };
    let mut chunk = [0u8; 3000]; // not a divisor of the ring: transfers wrap mid-chunk
    let (mut sent, mut sum) = (0, 0u64);
    while sent < TOTAL {
        let n = chunk.len().min(TOTAL - sent);
        for (k, b) in chunk[..n].iter_mut().enumerate() {
            *b = byte(sent + k);
            sum = checksum(sum, sent + k, *b);
        }
        if ch.send(&chunk[..n]).is_err() {
            return 1;
        }
        sent += n;
    }
    if ch.send(&sum.to_le_bytes()).is_err() {
        return 1;
    }
    println!("channel producer: sent {sent} bytes, checksum {sum:#x}");
    // Stay until the consumer has read everything (it rings SPACE after each read).
    if ch.flush().is_err() {
        return 1;
    }
    0
}

fn consumer() -> i32 {
    let mut ch = loop {
        match Channel::open("chan") {
            Err(Error::NotFound) => yield_now(),
            Err(_) => return 1,
            Ok(c) => break c,
        }
    };
    let mut buf = [0u8; 4096];
    let (mut got, mut sum, mut bad) = (0usize, 0u64, 0u64);
    let mut trailer = [0u8; 8];
    let mut t = 0;
    let t0 = micros();
    while got < TOTAL + 8 {
        let want = (TOTAL + 8 - got).min(buf.len());
        let Ok(n) = ch.recv(&mut buf[..want]) else { return 1 };
        for &b in &buf[..n] {
            if got < TOTAL {
                bad += (b != byte(got)) as u64;
                sum = checksum(sum, got, b);
            } else {
                trailer[t] = b;
                t += 1;
            }
            got += 1;
        }
    }
    let sent = u64::from_le_bytes(trailer);
    let us = (micros() - t0).max(1);
    println!("channel consumer: received {TOTAL} bytes in {} ms ({} KiB/s), {bad} wrong, checksum {sum:#x}, sender's {sent:#x}{}",
        us / 1000, TOTAL as u64 * 1_000_000 / 1024 / us, if sum == sent && bad == 0 { " (match)" } else { ": WRONG" });
    if sum == sent && bad == 0 { 0 } else { 1 }
}

fn pingpong(ping: bool, doorbell: bool) -> i32 {
    let m = if ping {
        morsel::create("pingpong", 4096, PageSize::Size4K, true)
    } else {
        loop {
            match morsel::open_mut("pingpong") {
                Err(Error::NotFound) => yield_now(),
                other => break other,
            }
        }
    };
    let Ok(m) = m else { return 1 };
    let bell = Doorbell::new(m.addr());
    if doorbell && bell.subscribe(None).is_err() {
        return 1;
    }
    // SAFETY: the page is inside the mount, 8-aligned; both guests use it atomically.
    let word = |i: usize| unsafe { &*(m.as_ptr() as *const AtomicU64).add(i) };
    let (mine, theirs) = if ping { (word(0), word(1)) } else { (word(1), word(0)) };
    let mode = if doorbell { "doorbell+wait" } else { "yield polling" };
    // Start together: ping waits until pong is there (pong sets its word to u64::MAX).
    if ping {
        while theirs.load(Ordering::Acquire) != u64::MAX {
            yield_now();
        }
    } else {
        mine.store(u64::MAX, Ordering::Release);
    }
    let exits0 = info(abi::INFO_EXITS).unwrap_or(0);
    let t0 = micros();
    for round in 1..=ROUNDS {
        if ping {
            mine.store(round, Ordering::Release);
            if doorbell {
                while bell.ring(Event(1)) == Err(Error::NoReceiver) {
                    yield_now();
                }
            }
        }
        while theirs.load(Ordering::Acquire) != round {
            if doorbell {
                let _ = notify::wait(Event(1), Timeout::Forever);
            } else {
                yield_now();
            }
        }
        if !ping {
            mine.store(round, Ordering::Release);
            if doorbell {
                let _ = bell.ring(Event(1));
            }
        }
    }
    let us = (micros() - t0).max(1);
    let exits = info(abi::INFO_EXITS).unwrap_or(0) - exits0;
    if ping {
        println!("pingpong {mode}: {ROUNDS} round trips in {us} us: {} round trips/s, ping {}.{:02} exits per round trip",
            ROUNDS * 1_000_000 / us, exits / ROUNDS, exits * 100 / ROUNDS % 100);
    } else {
        println!("pingpong {mode}: pong {}.{:02} exits per round trip", exits / ROUNDS, exits * 100 / ROUNDS % 100);
    }
    0
}

/// Stays idle for `IDLE_US`: parked in one `sleep`, or polling with `yield` (the way guests
/// waited before doorbells). Prints how long it was idle and its exits.
fn idle(waiting: bool) -> i32 {
    let exits0 = info(abi::INFO_EXITS).unwrap_or(0);
    let t0 = micros();
    if waiting {
        if notify::sleep(IDLE_US).is_err() {
            return 1;
        }
    } else {
        while micros() - t0 < IDLE_US {
            yield_now();
        }
    }
    let us = micros() - t0;
    let exits = info(abi::INFO_EXITS).unwrap_or(0) - exits0;
    let mode = if waiting { "waiting" } else { "polling" };
    println!("idle {mode}: {us} us idle, {exits} exits");
    i32::from(us < IDLE_US)
}
