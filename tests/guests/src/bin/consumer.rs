//! Opens the morsel "dataset" read-only once the producer published it (a rendezvous: it
//! waits for the name, then subscribes and waits for the producer's doorbell, without
//! polling; more than 200 exits while waiting is WRONG), checks the whole
//! object against the published checksum, and checks that it may not open it read-write.
//! With `arg=1` it then writes to it, which the hypervisor must stop.
#![no_std]
#![no_main]

use guest_lib::morsel;
use guest_lib::notify::Doorbell;
use guest_lib::{abi, println, BootInfo, Error};
use guests::dataset;

guest_lib::entry!(main);

fn main(info: &BootInfo) -> i32 {
    let id = info.guest_id;
    let exits = guest_lib::info(abi::INFO_EXITS).unwrap_or(0);
    let m = match morsel::open_when_created(dataset::NAME) {
        Ok(m) => m,
        Err(e) => {
            println!("consumer {id}: open failed: {e}");
            return 1;
        }
    };
    let wakeups = match Doorbell::new(m.addr()).wait_until(dataset::PUBLISHED, || dataset::published(&m)) {
        Ok(n) => n,
        Err(e) => {
            println!("consumer {id}: cannot wait for the producer: {e}");
            return 1;
        }
    };
    let waited = guest_lib::info(abi::INFO_EXITS).unwrap_or(0).saturating_sub(exits);
    println!("consumer {id}: met the producer with {waited} exits ({wakeups} doorbell wake-ups){}", if waited > 200 { ": WRONG, it polled" } else { "" });
    let (want, got) = (dataset::published_sum(&m), dataset::checksum(&m));
    if want != got {
        println!("consumer {id}: checksum {got:#018x} does NOT match {want:#018x}");
        return 1;
    }
    println!("consumer {id}: checksum {got:#018x} of {} MiB matches (read-only mount at {:#x})", m.len() >> 20, m.addr());
    match morsel::open_mut(dataset::NAME) {
        Err(Error::Denied) => println!("consumer {id}: read-write open refused: access denied"),
        other => {
            println!("consumer {id}: read-write open was not refused: {:?}", other.map(|m| m.addr()));
            return 1;
        }
    }
    if info.arg == 1 {
        println!("consumer {id}: writing to the read-only morsel");
        // SAFETY: deliberately writes through a read-only mount; the hypervisor stops us.
        unsafe { core::ptr::write_volatile((m.addr() + 4096) as *mut u64, 0xbad) };
        println!("consumer {id}: the write went through");
        return 1;
    }
    drop(m);
    0
}
