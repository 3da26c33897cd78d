//! Scenarios persistent_*: morsels in persistent memory across reboots and crashes. `arg`
//! picks what this boot does:
//! 1 fill: create the persistent morsels "blob" (4 MiB of 2 MiB pages, a pattern) and
//!   "ledger" (64 KiB of 4 KiB pages, three entries);
//! 2 check: after a reboot, open both read-only and verify them;
//! 3 clean up: verify, destroy both, and check that they are gone;
//! 4 churn: create "ledger" (or open it after an earlier crash, and destroy a "churn" that
//!   crash left), then create, fill and destroy persistent morsels of changing sizes
//!   forever, appending one ledger entry per round (entry, then count), some so large that
//!   areas switch between 4 KiB and 2 MiB frames: the scenario kills the machine at a random
//!   moment;
//! 5 after the crash: verify every counted ledger entry, destroy what is left.
//! 6 fill as 1, then "private" (64 KiB, not share-writable) and "scratch" (64 KiB);
//! 7 after a reboot: 'blob' intact, and 'private' (restored: no owner) can be neither
//!   destroyed nor opened writable by any guest;
//! 8 after `pmem=drop:...` removed 'private' and 'ledger': both gone; destroy 'blob'.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};
use guest_lib::morsel::{self, MorselMut, MorselRef, PageSize};
use guest_lib::{println, BootInfo, Error};

guest_lib::entry!(main);

const BLOB: &str = "blob";
const LEDGER: &str = "ledger";
const CHURN: &str = "churn";
const BLOB_SIZE: u64 = 4 << 20;
const LEDGER_SIZE: u64 = 64 << 10;
const ENTRIES: usize = (LEDGER_SIZE / 8) as usize - 1;
/// The churn's morsels that switch areas between page sizes (see `churn`).
const SWITCH_SIZE: u64 = 40 << 20;

fn blob_byte(i: usize) -> u8 {
    (i.wrapping_mul(131) ^ (i >> 12)) as u8
}

/// Ledger entry `i`: a value no other entry has.
fn entry(i: u64) -> u64 {
    (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn count(l: &[u8]) -> u64 {
    // SAFETY: word 0 of the mounted ledger.
    unsafe { read_volatile(l.as_ptr() as *const u64) }
}

fn word(l: &[u8], i: usize) -> u64 {
    // SAFETY: word 1 + i of the ledger, i < ENTRIES.
    unsafe { read_volatile((l.as_ptr() as *const u64).add(1 + i)) }
}

fn append(l: &mut MorselMut, n: u64) {
    let p = l.as_mut_ptr() as *mut u64;
    // SAFETY: words of the mounted ledger; the entry is durable (written back and fenced)
    // before the count that covers it is written, and the count before the next entry.
    unsafe {
        let e = p.add(1 + n as usize);
        write_volatile(e, entry(n));
        guest_lib::persist(e as u64..e as u64 + 8);
        write_volatile(p, n + 1);
        guest_lib::persist(p as u64..p as u64 + 8);
    }
}

fn main(info: &BootInfo) -> i32 {
    let r = match info.arg {
        1 => fill(),
        2 => check().map(|_| ()),
        3 => check().and_then(|_| clean_up()),
        4 => churn(),
        5 => after_crash(),
        6 => fill().and_then(|_| fill_private()),
        7 => private_is_stuck(),
        8 => dropped(),
        _ => Err("unknown mode"),
    };
    match r {
        Ok(()) => 0,
        Err(why) => {
            println!("pm: FAILED: {why}");
            1
        }
    }
}

fn create(name: &str, size: u64, page: PageSize) -> Result<MorselMut, &'static str> {
    morsel::create_persistent(name, size, page, true).map_err(|e| {
        println!("pm: creating '{name}' failed: {e}");
        "create"
    })
}

fn open(name: &str) -> Result<MorselRef, &'static str> {
    morsel::open(name).map_err(|e| {
        println!("pm: opening '{name}' failed: {e}");
        "open"
    })
}

fn fill() -> Result<(), &'static str> {
    let mut blob = create(BLOB, BLOB_SIZE, PageSize::Size2M)?;
    for (i, b) in blob.iter_mut().enumerate() {
        *b = blob_byte(i);
    }
    let mut ledger = create(LEDGER, LEDGER_SIZE, PageSize::Size4K)?;
    for n in 0..3 {
        append(&mut ledger, n);
    }
    println!("pm: created '{BLOB}' ({} MiB, pattern written) and '{LEDGER}' (3 entries) in persistent memory", BLOB_SIZE >> 20);
    Ok(())
}

fn check() -> Result<(), &'static str> {
    let blob = open(BLOB)?;
    if blob.len() as u64 != BLOB_SIZE || !blob.iter().enumerate().all(|(i, &b)| b == blob_byte(i)) {
        return Err("the blob's pattern did not survive");
    }
    let ledger = open(LEDGER)?;
    if count(&ledger) != 3 || !(0..3).all(|i| word(&ledger, i) == entry(i as u64)) {
        return Err("the ledger did not survive");
    }
    println!("pm: after the reboot '{BLOB}' holds its pattern ({} MiB) and '{LEDGER}' its 3 entries", BLOB_SIZE >> 20);
    Ok(())
}

fn destroy(name: &str) -> Result<(), &'static str> {
    morsel::destroy(name).map_err(|e| {
        println!("pm: destroying '{name}' failed: {e}");
        "destroy"
    })
}

fn clean_up() -> Result<(), &'static str> {
    // `check` dropped its mounts; restored morsels have no owner, and these were created
    // share-writable, so any guest may destroy them.
    destroy(BLOB)?;
    destroy(LEDGER)?;
    match morsel::open(BLOB) {
        Err(Error::NotFound) => println!("pm: '{BLOB}' and '{LEDGER}' destroyed; '{BLOB}' is gone"),
        _ => return Err("the blob is still there"),
    }
    Ok(())
}

fn churn() -> Result<(), &'static str> {
    let mut ledger = match morsel::open_mut(LEDGER) {
        Ok(l) => l,
        Err(Error::NotFound) => create(LEDGER, LEDGER_SIZE, PageSize::Size4K)?,
        Err(e) => {
            println!("pm: opening '{LEDGER}' failed: {e}");
            return Err("open");
        }
    };
    let _ = morsel::destroy(CHURN);
    let mut round = count(&ledger);
    if round as usize > ENTRIES || !(0..round as usize).all(|i| word(&ledger, i) == entry(i as u64)) {
        return Err("a counted ledger entry is wrong");
    }
    println!("pm: churning from round {round} (ledger entries persisted with {:?})", guest_lib::persist::write_back().0);
    loop {
        // Rounds 4 and 5 switch areas between 4 KiB and 2 MiB frames: in the 64 MiB region
        // (31 areas beside the ledger) 40 MiB of 4 KiB pages and 40 MiB of 2 MiB pages cannot
        // both avoid the areas the other used, so about ten areas change order each time.
        let (size, page) = match round % 6 {
            0 => (4096 * (1 + round % 5), PageSize::Size4K),
            1 => (2 << 20, PageSize::Size2M),
            2 => (300 << 10, PageSize::Size4K),
            3 => (6 << 20, PageSize::Size2M),
            4 => (SWITCH_SIZE, PageSize::Size4K),
            _ => (SWITCH_SIZE, PageSize::Size2M),
        };
        let mut m = create(CHURN, size, page)?;
        m[0] = round as u8;
        drop(m);
        destroy(CHURN)?;
        if (round as usize) < ENTRIES {
            append(&mut ledger, round);
        }
        round += 1;
        if round.is_multiple_of(100) {
            println!("pm: round {round}");
        }
    }
}

fn after_crash() -> Result<(), &'static str> {
    let ledger = open(LEDGER)?;
    let n = count(&ledger);
    if n as usize > ENTRIES || !(0..n as usize).all(|i| word(&ledger, i) == entry(i as u64)) {
        return Err("a counted ledger entry is wrong");
    }
    println!("pm: after the crash the ledger holds {n} entries, all intact");
    drop(ledger);
    match morsel::destroy(CHURN) {
        Ok(()) => println!("pm: the crash left '{CHURN}' behind (its record was complete): destroyed"),
        Err(Error::NotFound) => println!("pm: no '{CHURN}' left behind"),
        Err(e) => {
            println!("pm: destroying '{CHURN}' failed: {e}");
            return Err("destroy");
        }
    }
    destroy(LEDGER)
}

const PRIVATE: &str = "private";
const SCRATCH: &str = "scratch";

fn fill_private() -> Result<(), &'static str> {
    let mut p = morsel::create_persistent(PRIVATE, LEDGER_SIZE, PageSize::Size4K, false).map_err(|e| {
        println!("pm: creating '{PRIVATE}' failed: {e}");
        "create"
    })?;
    p[0] = 0x5a;
    create(SCRATCH, LEDGER_SIZE, PageSize::Size4K)?;
    println!("pm: created '{PRIVATE}' (not share-writable) and '{SCRATCH}' in persistent memory");
    Ok(())
}

fn private_is_stuck() -> Result<(), &'static str> {
    let blob = open(BLOB)?;
    if !blob.iter().enumerate().all(|(i, &b)| b == blob_byte(i)) {
        return Err("the blob's pattern did not survive");
    }
    drop(blob);
    let p = open(PRIVATE)?;
    if p[0] != 0x5a {
        return Err("'private' lost its byte");
    }
    drop(p);
    match (morsel::destroy(PRIVATE), morsel::open_mut(PRIVATE).map(|_| ())) {
        (Err(Error::Denied), Err(Error::Denied)) => {}
        (d, o) => {
            println!("pm: destroying '{PRIVATE}': {d:?}, opening it writable: {o:?}");
            return Err("a restored private morsel was not protected");
        }
    }
    println!("pm: after the reboot '{BLOB}' is intact; '{PRIVATE}' can be neither destroyed nor written (denied)");
    Ok(())
}

fn dropped() -> Result<(), &'static str> {
    for name in [PRIVATE, LEDGER] {
        if !matches!(morsel::open(name), Err(Error::NotFound)) {
            println!("pm: '{name}' is still there");
            return Err("a dropped record's morsel is still there");
        }
    }
    destroy(BLOB)?;
    println!("pm: '{PRIVATE}' and '{LEDGER}' are gone; '{BLOB}' destroyed");
    Ok(())
}
