//! Scenario devices_nvme_io_lets_the_world_lock_go (one guest, 2 vCPUs on 2 CPUs; `arg` is
//! the checksum of the 64 MiB disk image):
//! 1. vCPU 0 reads the whole disk into a morsel (4 times) through the NVMe proxy while vCPU 1 makes
//!    `info` hypercalls in a loop: the batch runs with the world lock let go, so vCPU 1's
//!    calls go on during it (vCPU 0 counts those completed during its read).
//! 2. vCPU 0 reads the disk again (up to `ATTEMPTS` times); vCPU 1 probes with one-block
//!    reads into the same morsel until it gets `Busy` (the batch is in flight), then unmounts
//!    the morsel from the guest and tries to destroy it: `Busy` (pinned), and the data read
//!    stays whole (checksum). Where the read ended between the probe and the destroy (the
//!    destroy succeeds: legitimately), vCPU 1 makes a new "disk" and vCPU 0 reads into it:
//!    again, until a destroy meets a read in flight.
//! 3. vCPU 0 READs 16 MiB of the disk into an ExMap region (again, after a FREE, until vCPU 1
//!    caught one in flight); vCPU 1 FREEs and READs the same pages while it runs: `Busy`
//!    both, and the region holds the disk's bytes afterwards.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guest_lib::abi::{self, NVME_BLOCK};
use guest_lib::device;
use guest_lib::exmap::{ExMap, Range};
use guest_lib::hypercall::call;
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, BootInfo, Error};

guest_lib::entry!(main, vcpu_main);

const SIZE: u64 = 64 << 20;
const BLOCKS: u64 = SIZE / NVME_BLOCK;
/// The ExMap part: 16 MiB in entries of 512 pages.
const REGION: u64 = 16 << 20;
const ENTRY_PAGES: u64 = 512;

/// vCPU 0 sets the phase (1: count calls, 2: stop counting, 3: proxy pin, 5: ExMap pin);
/// vCPU 1 answers in ACK with the phase it finished.
static PHASE: AtomicU64 = AtomicU64::new(0);
static ACK: AtomicU64 = AtomicU64::new(0);
/// vCPU 1's completed `info` calls (phase 1).
static CALLS: AtomicU64 = AtomicU64::new(0);
/// The disk morsel's and the region's mounts.
static DISK: AtomicU64 = AtomicU64::new(0);
static XR: AtomicU64 = AtomicU64::new(0);
/// vCPU 1 probes in phase N (it set PROBING = N after its first probe); it saw the batch of
/// the phase in flight (SEEN = N) and attacked; vCPU 0 gave up the phase (STOP = N).
static PROBING: AtomicU64 = AtomicU64::new(0);
static SEEN: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicU64 = AtomicU64::new(0);
/// Attempts before vCPU 0 gives up a phase (vCPU 1 must catch one batch in flight).
const ATTEMPTS: u32 = 8;
/// vCPU 1's verdict on an attack of phase 2: its destroy was refused (or failed otherwise,
/// reported), or came too late (the read had ended; a new "disk" is in DISK).
static VERDICT: AtomicU64 = AtomicU64::new(0);
const REFUSED: u64 = 1;
const TOO_LATE: u64 = 2;

fn checksum(m: &[u8]) -> u64 {
    m.chunks_exact(8).enumerate().fold(0u64, |c, (i, w)| {
        let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        c.wrapping_add(w.wrapping_mul(2 * i as u64 + 1))
    })
}

fn wait_ack(phase: u64) {
    while ACK.load(SeqCst) < phase {
        core::hint::spin_loop();
    }
}

/// The read of the whole disk into the morsel at `gpa`, retried while a probe of vCPU 1
/// holds the morsel (`Busy`).
fn read_all(gpa: u64) -> Result<u64, Error> {
    loop {
        match device::nvme_read(gpa, 0, 0, BLOCKS) {
            Err(Error::Busy) => core::hint::spin_loop(),
            other => return other,
        }
    }
}

fn main(info: &BootInfo) -> i32 {
    let m = match morsel::create("disk", SIZE, PageSize::Size2M, false) {
        Ok(m) => m,
        Err(e) => {
            println!("nvme_busy: create failed: {e}");
            return 1;
        }
    };
    let gpa = m.addr();
    DISK.store(gpa, SeqCst);
    // 1. vCPU 1 counts calls while this one reads.
    PHASE.store(1, SeqCst);
    while CALLS.load(SeqCst) < 10 {
        core::hint::spin_loop();
    }
    // Four reads, each counted from just before its call to just after it returned.
    let (mut during, mut r) = (0, Ok(BLOCKS));
    for _ in 0..4 {
        let before = CALLS.load(SeqCst);
        r = read_all(gpa);
        during += CALLS.load(SeqCst) - before;
        if r != Ok(BLOCKS) {
            break;
        }
    }
    PHASE.store(2, SeqCst);
    wait_ack(2);
    if r != Ok(BLOCKS) {
        println!("nvme_busy: read failed: {r:?}");
        return 1;
    }
    let sum = checksum(&m);
    println!("nvme_busy: during four 64 MiB reads vCPU 1 completed {during} hypercalls; checksum {}",
        if sum == info.arg { "matches" } else { "does NOT match" });
    if during < 20 || sum != info.arg {
        println!("nvme_busy: the other vCPU was held up by the read (TOO FEW calls) or the data is wrong");
        return 1;
    }
    // 2. vCPU 1 tries to take the morsel away under the read (once it caught one in flight).
    PHASE.store(3, SeqCst);
    while PROBING.load(SeqCst) < 3 {
        core::hint::spin_loop();
    }
    let mut r = Err(Error::Invalid);
    for _ in 0..ATTEMPTS {
        r = read_all(DISK.load(SeqCst));
        // vCPU 1 attacks a read it saw in flight (NotFound: it unmounted before this call).
        if SEEN.load(SeqCst) >= 3 || r == Err(Error::NotFound) {
            let v = loop {
                match VERDICT.load(SeqCst) {
                    0 => core::hint::spin_loop(),
                    v => break v,
                }
            };
            if v == REFUSED {
                break;
            }
            // Too late: vCPU 1 made a new "disk" (DISK); read into it.
            VERDICT.store(0, SeqCst);
            r = Err(Error::NotFound);
        } else if r.is_err() {
            break;
        }
    }
    STOP.store(3, SeqCst);
    wait_ack(3);
    // vCPU 1 may have unmounted it: the handle's drop must not unmount another mount.
    core::mem::forget(m);
    if r != Ok(BLOCKS) {
        println!("nvme_busy: second read failed: {r:?}");
        return 1;
    }
    let m = match morsel::open_mut("disk") {
        Ok(m) => m,
        Err(e) => {
            println!("nvme_busy: the disk morsel is gone after the read: {e} (UNEXPECTED)");
            return 1;
        }
    };
    let sum = checksum(&m);
    println!("nvme_busy: after the attack the morsel's checksum {}", if sum == info.arg { "matches the image" } else { "does NOT match the image" });
    drop(m);
    if sum != info.arg || morsel::destroy("disk").is_err() {
        println!("nvme_busy: the disk morsel is damaged or cannot be destroyed after its read");
        return 1;
    }
    // 3. ExMap: vCPU 1 FREEs and READs the pages this one READs.
    let mut x = match ExMap::create("xr", REGION, false) {
        Ok(x) => x,
        Err(e) => {
            println!("nvme_busy: exmap create failed: {e}");
            return 1;
        }
    };
    XR.store(x.addr(), SeqCst);
    let ranges: [Range; (REGION / 4096 / ENTRY_PAGES) as usize] = core::array::from_fn(|k| Range::new(k as u64 * ENTRY_PAGES, ENTRY_PAGES));
    PHASE.store(5, SeqCst);
    while PROBING.load(SeqCst) < 5 {
        core::hint::spin_loop();
    }
    let mut r = Err(Error::Invalid);
    for _ in 0..ATTEMPTS {
        r = loop {
            match x.read(&ranges) {
                Err(Error::Busy) => core::hint::spin_loop(),
                other => break other,
            }
        };
        if r.is_err() || SEEN.load(SeqCst) >= 5 {
            break;
        }
        // Not caught in flight: empty the region and read it again.
        let _ = x.free(&ranges);
    }
    STOP.store(5, SeqCst);
    wait_ack(5);
    let all_ok = x.results().all(|e| e == Ok(ENTRY_PAGES));
    // The region against the proxy's read of the same 16 MiB.
    let check = match morsel::create("check", REGION, PageSize::Size2M, false) {
        Ok(c) => c,
        Err(e) => {
            println!("nvme_busy: check morsel: {e}");
            return 1;
        }
    };
    let proxied = device::nvme_read(check.addr(), 0, 0, REGION / NVME_BLOCK);
    // SAFETY: the region is mounted at x.addr() for REGION bytes, all pages populated by the
    // READ (checked through the results first).
    let region = unsafe { core::slice::from_raw_parts(x.addr() as *const u8, REGION as usize) };
    let same = all_ok && proxied.is_ok() && region == &check[..];
    println!("nvme_busy: exmap READ {r:?}, every entry read: {all_ok}, the region {} the disk",
        if same { "matches" } else { "does NOT match" });
    if r != Ok(0) || !same {
        return 1;
    }
    0
}

fn vcpu_main(_: &BootInfo, _: u32) -> i32 {
    // 1. Count calls until vCPU 0 says stop.
    while PHASE.load(SeqCst) < 1 {
        core::hint::spin_loop();
    }
    while PHASE.load(SeqCst) < 2 {
        if guest_lib::info(abi::INFO_VCPU_INDEX).is_ok() {
            CALLS.fetch_add(1, SeqCst);
        }
    }
    ACK.store(2, SeqCst);
    // 2. Probe until the read is in flight, then unmount and try to destroy.
    while PHASE.load(SeqCst) < 3 {
        core::hint::spin_loop();
    }
    let mut seen = false;
    let (mut probes, mut late) = (0u64, 0u32);
    while STOP.load(SeqCst) < 3 {
        probes += 1;
        let gpa = DISK.load(SeqCst);
        // The morsel's last block from the disk's last block: the data stays the image's.
        let p = device::nvme_read(gpa, SIZE - NVME_BLOCK, BLOCKS - 1, 1);
        PROBING.store(3, SeqCst);
        if p != Err(Error::Busy) {
            continue;
        }
        SEEN.store(3, SeqCst);
        let u = call(abi::HC_MORSEL_UNMOUNT, [gpa, 0, 0, 0, 0, 0]);
        let d = morsel::destroy("disk");
        match d {
            Err(Error::Busy) => {
                seen = true;
                println!("nvme_busy: vCPU 1 saw the read in flight after {probes} probes: unmount {u:?}, destroy refused with Busy ({late} times too late before)");
                VERDICT.store(REFUSED, SeqCst);
                break;
            }
            Ok(()) => {
                // The read ended between the probe and the destroy (the hypervisor's log
                // shows the order): again, on a new morsel.
                late += 1;
                match morsel::create("disk", SIZE, PageSize::Size2M, false) {
                    Ok(m) => {
                        DISK.store(m.addr(), SeqCst);
                        core::mem::forget(m);
                    }
                    Err(e) => println!("nvme_busy: vCPU 1 cannot make a new disk morsel: {e} (UNEXPECTED)"),
                }
                SEEN.store(0, SeqCst);
                VERDICT.store(TOO_LATE, SeqCst);
            }
            Err(e) => {
                println!("nvme_busy: vCPU 1's destroy under the read: {e}, not Busy (UNEXPECTED)");
                VERDICT.store(REFUSED, SeqCst);
                break;
            }
        }
    }
    if !seen {
        println!("nvme_busy: vCPU 1 never saw the read in flight when destroying ({probes} probes, {late} too late)");
    }
    ACK.store(3, SeqCst);
    // 3. FREE and READ the region's first pages while vCPU 0's READ runs.
    while PHASE.load(SeqCst) < 5 {
        core::hint::spin_loop();
    }
    let xr = XR.load(SeqCst);
    IOV.0[0].store(abi::exmap_entry(0, 16), SeqCst);
    let iov = IOV.0.as_ptr();
    let (mut free, mut read) = (None, None);
    while STOP.load(SeqCst) < 5 {
        let f = call(abi::HC_EXMAP_ACTION, [xr, iov as u64, 1, abi::EXMAP_FREE, 0, 0]);
        PROBING.store(5, SeqCst);
        if f == Err(Error::Busy) {
            SEEN.store(5, SeqCst);
            free = Some(f);
            read = Some(call(abi::HC_EXMAP_ACTION, [xr, iov as u64, 1, abi::EXMAP_READ, 0, 0]));
            break;
        }
    }
    match (free, read) {
        (Some(f), Some(r)) => println!("nvme_busy: vCPU 1 during the region's READ: FREE {}, READ {}",
            if f == Err(Error::Busy) { "refused with Busy" } else { "NOT refused" },
            match r {
                Err(Error::Busy) => "refused with Busy",
                // The READ ended between the FREE and this READ: its pages are there (Present).
                Ok(_) => "after the batch (entries Busy: present)",
                Err(_) => "failed otherwise (UNEXPECTED)",
            }),
        _ => println!("nvme_busy: vCPU 1 never saw the region's READ in flight"),
    }
    ACK.store(5, SeqCst);
    0
}


/// vCPU 1's iovec page (vCPU 0's is inside its `ExMap`); the hypervisor writes the results.
#[repr(C, align(4096))]
struct Iov([AtomicU64; 512]);
static IOV: Iov = Iov([const { AtomicU64::new(0) }; 512]);
