//! Scenario devices_edu_dma_into_shared_morsel. `arg=0` creates the morsel "edu-dma" (16 KiB),
//! shares it with the edu device (one entry in the device's VT-d domain), has the device DMA a
//! known buffer into page 1, checks it, then has the device read page 1 back out (into its
//! buffer, and from there into page 2) and checks it is unchanged. `arg=1` opens the morsel
//! read-only, checks pages 1 and 2 as the owner publishes them, is refused a writable
//! device mount and is refused DMA into the owner's device mount.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};
use guest_lib::device::{self, EDU};
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, yield_now, BootInfo, Error};

guest_lib::entry!(main);

const NAME: &str = "edu-dma";
const IOVA: u64 = 2 << 20;
const LEN: usize = guest_lib::abi::EDU_MAX_TRANSFER as usize;
const PAGE: usize = 4096;
/// Flags in page 3: page 1 filled by the device, page 2 filled after the round trip.
const IN_DONE: usize = 3 * PAGE;
const OUT_DONE: usize = 3 * PAGE + 8;
const MAGIC: u64 = 0xed0_da7a;

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(7) + 3) as u8
}

fn sum(bytes: &[u8]) -> u64 {
    bytes.iter().enumerate().fold(0u64, |c, (i, &b)| c.wrapping_mul(31).wrapping_add(b as u64 ^ i as u64))
}

fn matches(m: &[u8], page: usize) -> bool {
    (0..LEN).all(|i| m[page * PAGE + i] == pattern(i))
}

fn main(info: &BootInfo) -> i32 {
    if info.arg == 0 { owner() } else { reader() }
}

fn owner() -> i32 {
    let mut m = match morsel::create(NAME, 4 * PAGE as u64, PageSize::Size4K, false) {
        Ok(m) => m,
        Err(e) => {
            println!("edu owner: create failed: {e}");
            return 1;
        }
    };
    if let Err(e) = device::mount(NAME, EDU, IOVA, true) {
        println!("edu owner: device mount failed: {e}");
        return 1;
    }
    // The known buffer: loaded into the device from page 0 of the morsel.
    for i in 0..LEN {
        m[i] = pattern(i);
    }
    let want = sum(&m[..LEN]);
    let steps = [
        ("into the device from page 0", device::edu_to_device(IOVA, LEN as u64)),
        ("out of the device into page 1", device::edu_to_memory(IOVA + PAGE as u64, LEN as u64)),
    ];
    for (what, r) in steps {
        if let Err(e) = r {
            println!("edu owner: DMA {what} failed: {e}");
            return 1;
        }
    }
    if !matches(&m, 1) {
        println!("edu owner: page 1 does NOT hold the device's buffer");
        return 1;
    }
    println!("edu owner: the device wrote {LEN} bytes into the morsel at I/O virtual address {:#x}, checksum {want:#018x} matches", IOVA + PAGE as u64);
    // SAFETY: inside the morsel; the reader polls it.
    unsafe { write_volatile(m.as_mut_ptr().add(IN_DONE) as *mut u64, MAGIC) };
    // The device reads page 1 back out (the reader may be checking it meanwhile).
    for (what, r) in [
        ("into the device from page 1", device::edu_to_device(IOVA + PAGE as u64, LEN as u64)),
        ("out of the device into page 2", device::edu_to_memory(IOVA + 2 * PAGE as u64, LEN as u64)),
    ] {
        if let Err(e) = r {
            println!("edu owner: DMA {what} failed: {e}");
            return 1;
        }
    }
    if !matches(&m, 2) || sum(&m[2 * PAGE..2 * PAGE + LEN]) != want {
        println!("edu owner: the data the device read back out CHANGED");
        return 1;
    }
    println!("edu owner: the device read the morsel back out unchanged, checksum {want:#018x}");
    // SAFETY: as above.
    unsafe { write_volatile(m.as_mut_ptr().add(OUT_DONE) as *mut u64, MAGIC) };
    if let Err(e) = device::unmount(EDU, IOVA) {
        println!("edu owner: device unmount failed: {e}");
        return 1;
    }
    0
}

fn reader() -> i32 {
    let m = loop {
        match morsel::open(NAME) {
            Ok(m) => break m,
            Err(Error::NotFound) => yield_now(),
            Err(e) => {
                println!("edu reader: open failed: {e}");
                return 1;
            }
        }
    };
    match device::mount(NAME, EDU, 4 << 20, true) {
        Err(Error::Denied) => println!("edu reader: writable device mount refused: access denied"),
        other => {
            println!("edu reader: writable device mount was not refused: {other:?}");
            return 1;
        }
    }
    for (flag, page) in [(IN_DONE, 1), (OUT_DONE, 2)] {
        // SAFETY: inside the read-only mount; the owner writes it.
        while unsafe { read_volatile(m.as_ptr().add(flag) as *const u64) } != MAGIC {
            yield_now();
        }
        if page == 1 {
            // The owner's device mount is in place until it sets OUT_DONE.
            match device::edu_to_memory(IOVA, LEN as u64) {
                Err(Error::Denied) => println!("edu reader: DMA into the owner's device mount refused: access denied"),
                other => {
                    println!("edu reader: DMA into the owner's device mount was NOT refused: {other:?}");
                    return 1;
                }
            }
        }
        if !matches(&m, page) {
            println!("edu reader: page {page} does NOT hold the device's data");
            return 1;
        }
        println!("edu reader: page {page} holds the device's data, checksum {:#018x} (read-only mount at {:#x})",
            sum(&m[page * PAGE..page * PAGE + LEN]), m.addr());
    }
    0
}
