//! Attacks on the hypervisor's isolation from inside a guest (issue 10), one per `arg`:
//!
//! - 1 `quota`: creates 4 KiB morsels (every other one left mounted) until refused: the
//!   `MORSEL_QUOTA + 1`th must get `NoMemory` (without a quota the directory outgrew the
//!   heap at ~3585 and the hypervisor panicked); then opens the morsels of the other `quota`
//!   guests until `MOUNT_QUOTA` mounts are held: the next open gets `NoMemory`.
//! - 2 `prune`: 4 KiB morsels mounted and unmounted must leave no tables that take a larger
//!   morsel's window slot (1 GiB and 512 GiB windows).
//! - 4 `devices`: `device_mount` into functions the hypervisor does not offer (host bridge,
//!   LPC, SATA, the NVMe controller) is `Denied`, into nobody `NotFound`.
//! - 5 `nvme-small` / 6 `nvme-big`: 5 has the NVMe proxy read into a 4 KiB morsel (2 MiB
//!   window) and tries to mount its own morsels at the proxy's I/O virtual addresses in the
//!   NVMe domain; then 6 (another guest) has the proxy read into a 4 MiB morsel (1 GiB window).
//! - 7 `edu-a` / 8 `edu-b`: A loads edu's buffer from a private morsel; B must not get edu
//!   while A holds it, and when it gets it, must read zeros, not A's bytes; A must not see B's.
#![no_std]
#![no_main]

use core::fmt::Write;
use guest_lib::abi::{self, NVME_BLOCK};
use guest_lib::device::{self, EDU};
use guest_lib::morsel::{self, MorselMut, PageSize};
use guest_lib::{println, yield_now, BootInfo, Error};

guest_lib::entry!(main);

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A morsel name built on the stack (guests have no heap).
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

/// Waits until some guest has created the morsel `name`.
fn wait_for(name: &str) -> Result<(), Error> {
    loop {
        match morsel::open(name) {
            Ok(_) => return Ok(()),
            Err(Error::NotFound) => yield_now(),
            Err(e) => return Err(e),
        }
    }
}

/// Creates a morsel that stays mounted for the rest of the run (a signal to other guests).
fn signal(name: &str) -> Result<(), Error> {
    morsel::create(name, 4 * KIB, PageSize::Size4K, false).map(core::mem::forget)
}

fn main(info: &BootInfo) -> i32 {
    let r = match info.arg {
        1 => quota(info),
        2 => prune(),
        4 => devices(),
        5 => nvme_small(),
        6 => nvme_big(),
        7 => edu_a(),
        8 => edu_b(),
        _ => Err("unknown arg"),
    };
    match r {
        Ok(()) => 0,
        Err(why) => {
            println!("attack: FAILED: {why}");
            1
        }
    }
}

fn quota(info: &BootInfo) -> Result<(), &'static str> {
    let me = info.guest_id;
    let mut mounts = 0u64;
    let mut created = 0u64;
    // Far past the quota, and past where the old directory outgrew the heap.
    for i in 0..4000u64 {
        let n = name!("q{me}-{i}");
        match morsel::create(n.as_str(), 4 * KIB, PageSize::Size4K, false) {
            Ok(m) if i % 2 == 0 => {
                core::mem::forget(m);
                mounts += 1;
                created += 1;
            }
            Ok(_) => created += 1,
            Err(e) => {
                println!("attack quota: {created} morsels created ({mounts} left mounted), the next refused: {e}");
                if e != Error::NoMemory || created != abi::MORSEL_QUOTA {
                    return Err("the morsel quota did not hold");
                }
                break;
            }
        }
    }
    if created != abi::MORSEL_QUOTA {
        return Err("no quota: every create succeeded");
    }
    // Destroying one makes room for one more (held morsels count, not calls).
    let last = name!("q{me}-{}", abi::MORSEL_QUOTA - 1);
    morsel::destroy(last.as_str()).map_err(|_| "destroy failed")?;
    signal(name!("q{me}-ready").as_str()).map_err(|_| "a create after a destroy was refused")?;
    mounts += 1;
    println!("attack quota: after a destroy a create succeeds again");
    // Mount the other guests' morsels until the mount quota stops it.
    let guests = guest_lib::info(abi::INFO_GUEST_COUNT).map_err(|_| "info")?;
    for j in (0..guests).filter(|&j| j != me) {
        wait_for(name!("q{j}-ready").as_str()).map_err(|_| "a peer's morsel did not appear")?;
    }
    for i in 0..abi::MORSEL_QUOTA - 1 {
        for j in (0..guests).filter(|&j| j != me) {
            match morsel::open(name!("q{j}-{i}").as_str()) {
                Ok(m) => {
                    core::mem::forget(m);
                    mounts += 1;
                }
                Err(e) => {
                    println!("attack quota: {mounts} mounts held, the next open refused: {e}");
                    if e != Error::NoMemory || mounts != abi::MOUNT_QUOTA {
                        return Err("the mount quota did not hold");
                    }
                    println!("attack quota: both quotas held");
                    return Ok(());
                }
            }
        }
    }
    Err("no mount quota: every open succeeded")
}

/// Creates `name`, checks where it lands and that it is zeroed memory, writes a byte.
fn create_at(name: &str, size: u64, page: PageSize, want: u64) -> Result<MorselMut, &'static str> {
    match morsel::create(name, size, page, false) {
        Ok(mut m) => {
            println!("attack prune: '{name}' ({} KiB) mounted at {:#x}", size / KIB, m.addr());
            if m.addr() != want || m[m.len() - 1] != 0 {
                return Err("a morsel landed elsewhere or is not zeroed");
            }
            let end = m.len() - 1;
            m[end] = 0x5c;
            Ok(m)
        }
        Err(e) => {
            println!("attack prune: '{name}' ({} KiB) refused: {e}", size / KIB);
            Err("a morsel that fits the window was refused")
        }
    }
}

fn prune() -> Result<(), &'static str> {
    let win = abi::MORSEL_WINDOW_GPA;
    let a = create_at("p-a", 4 * KIB, PageSize::Size4K, win)?;
    let b = create_at("p-b", 4 * KIB, PageSize::Size4K, win + 2 * MIB)?;
    drop(a);
    // b still holds the first GiB's table: a 1 GiB window goes to the next GiB.
    let mid = create_at("p-mid", 4 * MIB, PageSize::Size2M, win + GIB)?;
    if b[b.len() - 1] != 0x5c {
        return Err("a neighbour's mount lost its data");
    }
    drop(b);
    // Now the first GiB is empty again, tables and all.
    let mid2 = create_at("p-mid2", 4 * MIB, PageSize::Size2M, win)?;
    drop((mid, mid2));
    for n in ["p-a", "p-b", "p-mid", "p-mid2"] {
        morsel::destroy(n).map_err(|_| "destroy failed")?;
    }
    // A 512 GiB window: the whole first slot of the window, where all of the above were.
    let m = create_at("p-big", GIB + 2 * MIB, PageSize::Size2M, win)?;
    drop(m);
    morsel::destroy("p-big").map_err(|_| "destroy failed")?;
    println!("attack prune: every morsel found its window slot free");
    Ok(())
}

fn devices() -> Result<(), &'static str> {
    morsel::create("dev", 4 * KIB, PageSize::Size4K, false).map(core::mem::forget).map_err(|_| "create")?;
    let cases = [
        ("the host bridge 00:00.0", abi::device_bdf(0, 0, 0), Error::Denied),
        ("the LPC bridge 00:1f.0", abi::device_bdf(0, 31, 0), Error::Denied),
        ("the SATA controller 00:1f.2", abi::device_bdf(0, 31, 2), Error::Denied),
        ("nobody at 00:1e.0", abi::device_bdf(0, 30, 0), Error::NotFound),
        ("nobody at 01:00.0", abi::device_bdf(1, 0, 0), Error::NotFound),
    ];
    for (what, bdf, want) in cases {
        for iova in [0, 2 * MIB] {
            let r = device::mount("dev", bdf, iova, false);
            if r != Err(want) {
                println!("attack devices: a mount into {what} at {iova:#x} got {r:?}, not {want}");
                return Err("a device the hypervisor does not offer took a mount");
            }
        }
        println!("attack devices: a mount into {what} is refused: {want}");
    }
    // edu, which is offered, still works.
    device::mount("dev", EDU, 2 * MIB, false).map_err(|_| "an edu mount was refused")?;
    device::unmount(EDU, 2 * MIB).map_err(|_| "edu unmount")?;
    println!("attack devices: edu takes a mount");
    Ok(())
}

/// The NVMe controller on the `disk` scenarios; the proxy's I/O virtual addresses.
const NVME: u64 = abi::device_bdf(0, 4, 0);
const PROXY_IOVA: u64 = 1 << 36;

fn nvme_small() -> Result<(), &'static str> {
    let m = morsel::create("nv-small", 4 * KIB, PageSize::Size4K, false).map_err(|_| "create")?;
    let got = device::nvme_read(m.addr(), 0, 0, 1);
    println!("attack nvme: proxy read into a 4 KiB morsel: {got:?}");
    if got != Ok(1) {
        return Err("the proxy refused a small morsel");
    }
    morsel::create("nv-mid", 4 * MIB, PageSize::Size2M, false).map(core::mem::forget).map_err(|_| "create")?;
    // Occupy the proxy's addresses in the NVMe domain: must be refused.
    for (name, iova) in [("nv-small", PROXY_IOVA), ("nv-mid", PROXY_IOVA), ("nv-small", 0)] {
        let r = device::mount(name, NVME, iova, true);
        println!("attack nvme: mounting '{name}' into the NVMe domain at {iova:#x}: {r:?}");
        if r != Err(Error::Denied) {
            return Err("a guest mounted into the NVMe proxy's domain");
        }
    }
    signal("nv-small-done").map_err(|_| "signal")
}

fn nvme_big() -> Result<(), &'static str> {
    let m = morsel::create("nv-big", 4 * MIB, PageSize::Size2M, false).map_err(|_| "create")?;
    wait_for("nv-small-done").map_err(|_| "wait")?;
    let blocks = 4 * MIB / NVME_BLOCK;
    let got = device::nvme_read(m.addr(), 0, 0, blocks);
    println!("attack nvme: proxy read into a 4 MiB morsel (1 GiB window) after another guest's calls: {got:?}");
    if got != Ok(blocks) {
        return Err("the proxy refused another guest's 1 GiB window");
    }
    Ok(())
}

const EDU_LEN: u64 = abi::EDU_MAX_TRANSFER;
const SECRET: u8 = 0xa5;
const B_BYTE: u8 = 0x3c;

/// How many of the first `EDU_LEN` bytes of page `page` of `m` are `b`.
fn count(m: &[u8], page: usize, b: u8) -> usize {
    m[page * 4096..page * 4096 + EDU_LEN as usize].iter().filter(|&&x| x == b).count()
}

fn edu_a() -> Result<(), &'static str> {
    let mut m = morsel::create("leak-a", 16 * KIB, PageSize::Size4K, false).map_err(|_| "create")?;
    m[..4096].fill(SECRET);
    device::mount("leak-a", EDU, 2 * MIB, true).map_err(|_| "A: edu mount refused")?;
    device::edu_to_device(2 * MIB, EDU_LEN).map_err(|_| "A: DMA into edu failed")?;
    println!("attack edu A: edu's buffer holds {EDU_LEN} private bytes");
    signal("leak-a-holding").map_err(|_| "signal")?;
    wait_for("leak-b-tried").map_err(|_| "wait")?;
    device::unmount(EDU, 2 * MIB).map_err(|_| "A: edu unmount")?;
    signal("leak-a-released").map_err(|_| "signal")?;
    wait_for("leak-b-done").map_err(|_| "wait")?;
    // B used edu after A: A gets it back and must not see B's bytes.
    m[4096..8192].fill(0xee);
    device::mount("leak-a", EDU, 2 * MIB, true).map_err(|_| "A: second edu mount refused")?;
    device::edu_to_memory(2 * MIB + 4096, EDU_LEN).map_err(|_| "A: DMA out of edu failed")?;
    let (theirs, zero) = (count(&m, 1, B_BYTE), count(&m, 1, 0));
    println!("attack edu A: after B, edu's buffer gave {zero} zero bytes and {theirs} of B's");
    if theirs > 0 || zero != EDU_LEN as usize {
        return Err("B's data LEAKED to A through edu");
    }
    Ok(())
}

fn edu_b() -> Result<(), &'static str> {
    let mut m = morsel::create("leak-b", 16 * KIB, PageSize::Size4K, false).map_err(|_| "create")?;
    m.fill(0xee);
    wait_for("leak-a-holding").map_err(|_| "wait")?;
    let r = device::mount("leak-b", EDU, 4 * MIB, true);
    println!("attack edu B: edu mount while A holds edu: {r:?}");
    if r != Err(Error::Busy) {
        return Err("edu was lent to two guests at once");
    }
    signal("leak-b-tried").map_err(|_| "signal")?;
    wait_for("leak-a-released").map_err(|_| "wait")?;
    device::mount("leak-b", EDU, 4 * MIB, true).map_err(|_| "B: edu mount refused after A let go")?;
    device::edu_to_memory(4 * MIB, EDU_LEN).map_err(|_| "B: DMA out of edu failed")?;
    let (secret, zero) = (count(&m, 0, SECRET), count(&m, 0, 0));
    println!("attack edu B: edu's buffer gave {zero} zero bytes and {secret} of A's");
    if secret > 0 || zero != EDU_LEN as usize {
        return Err("A's data LEAKED to B through edu");
    }
    // B's own round trip still works (no scrub while B holds edu).
    m[4096..8192].fill(B_BYTE);
    device::edu_to_device(4 * MIB + 4096, EDU_LEN).map_err(|_| "B: DMA into edu failed")?;
    device::edu_to_memory(4 * MIB + 8192, EDU_LEN).map_err(|_| "B: DMA out of edu failed")?;
    if count(&m, 2, B_BYTE) != EDU_LEN as usize {
        return Err("B's own round trip through edu CHANGED its data");
    }
    println!("attack edu B: its own round trip through edu is intact");
    device::unmount(EDU, 4 * MIB).map_err(|_| "B: edu unmount")?;
    signal("leak-b-done").map_err(|_| "signal")
}
