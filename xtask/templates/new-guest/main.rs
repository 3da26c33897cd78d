//! @NAME@: a ParPerOS guest made by `cargo xtask new-guest`. Build it with `cargo build`
//! (flags in .cargo/config.toml), boot two copies of it with
//!   cargo xtask run --guest target/x86_64-unknown-linux-gnu/debug/@NAME@ \
//!       --guest target/x86_64-unknown-linux-gnu/debug/@NAME@:arg=1
//! (from the ParPerOS checkout, or `--manifest-path`): the first (arg 0) fills a shared
//! morsel, rings its doorbell and tries ExMap; the second (arg 1) waits for the morsel and
//! the doorbell without polling, then checks the data. Both use the heap (`alloc`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use guest_lib::exmap::{ExMap, Range};
use guest_lib::morsel::{self, PageSize};
use guest_lib::notify::{Doorbell, Event};
use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

const SHARED: &str = "@NAME@-data";
const READY: Event = Event(1);

fn main(info: &BootInfo) -> i32 {
    let r = if info.arg == 0 { owner() } else { peer() };
    match r {
        Ok(()) => 0,
        Err(e) => {
            println!("@NAME@: {e}");
            1
        }
    }
}

/// Creates the shared morsel (other guests may read it), fills it from a heap vector,
/// publishes it (word 0 last) and rings; then populates, uses and frees ExMap pages.
fn owner() -> Result<(), &'static str> {
    let squares: Vec<u64> = (0..512).map(|i| i * i).collect();
    let m = morsel::create(SHARED, 4096, PageSize::Size4K, false).map_err(|_| "cannot create the morsel")?;
    let words = m.atomics();
    for (i, v) in squares.iter().enumerate().skip(1) {
        words[i].store(*v, core::sync::atomic::Ordering::Relaxed);
    }
    words[0].store(1, core::sync::atomic::Ordering::Release);
    let reached = Doorbell::new(m.addr()).announce(READY).map_err(|_| "cannot ring")?;
    // ExMap: a region with no pages until we ask; the iovec page lives on the heap.
    let mut region = Box::new(ExMap::create("@NAME@-map", 1 << 20, false).map_err(|_| "cannot create the ExMap region")?);
    region.alloc(&[Range::new(0, 4)]).map_err(|_| "ExMap alloc failed")?;
    let page = region.addr() as *mut u64;
    // SAFETY: page 0 of the region was just populated; only this guest maps it writable.
    let back = unsafe {
        page.write_volatile(0x5eed);
        page.read_volatile()
    };
    region.free(&[Range::new(0, 4)]).map_err(|_| "ExMap free failed")?;
    println!("@NAME@ owner: published {} squares ({reached} subscriber(s) rung), ExMap page read back {back:#x}", squares.len());
    // Stay until the peer has read the morsel (it exits; then our mount is the last).
    for _ in 0..50 {
        let _ = guest_lib::notify::sleep(10_000);
    }
    Ok(())
}

/// Waits (blocked, not polling) until the owner created the morsel and rang, then checks it.
fn peer() -> Result<(), &'static str> {
    let m = morsel::open_when_created(SHARED).map_err(|_| "cannot open the morsel")?;
    let words = m.atomics();
    Doorbell::new(m.addr())
        .wait_until(READY, || words[0].load(core::sync::atomic::Ordering::Acquire) == 1)
        .map_err(|_| "cannot wait for the doorbell")?;
    let ok = (1..512).all(|i| words[i].load(core::sync::atomic::Ordering::Relaxed) == (i * i) as u64);
    println!("@NAME@ peer: the shared squares are {}", if ok { "right" } else { "WRONG" });
    if ok { Ok(()) } else { Err("wrong data") }
}
