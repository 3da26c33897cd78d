//! Scenario guest_hypercall_fuzz: thousands of hypercalls with random numbers and arguments
//! drawn from values that sit on the edges (zero, the end of guest memory, the morsel window,
//! wrapping pointers, huge sizes, valid names and device ids). Every call must come back with
//! a status the ABI defines; the guest's own memory outside what it named must not change;
//! afterwards the hypervisor must still answer normally. The scenario checks that the
//! hypervisor survives, another guest finishes, and every frame comes back. Devices: only edu
//! takes a `device_mount` (the host bridge, LPC and NVMe are among the targets and must be
//! refused), and the NVMe proxy's I/O virtual address (64 GiB) is among the addresses.
//! `arg` is the seed and (upper 32 bits) the number of calls; 0 means seed 1, 3000 calls.
#![no_std]
#![no_main]

use guest_lib::abi;
use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

/// xorshift64* (Vigna): small and good enough to pick cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// Calls worth fuzzing: all of ABI v1 except exit, console write (it would print garbage)
/// and stats (it prints), the morsel and device calls twice as often, and numbers beside them.
const NUMBERS: [u64; 30] = [
    abi::HC_INFO, abi::HC_YIELD, 0x04, 0x0f, 0x16, 0x25, u64::MAX,
    abi::HC_MORSEL_CREATE, abi::HC_MORSEL_OPEN, abi::HC_MORSEL_UNMOUNT, abi::HC_MORSEL_DESTROY, abi::HC_MORSEL_SIZE,
    abi::HC_MORSEL_CREATE, abi::HC_MORSEL_OPEN, abi::HC_MORSEL_UNMOUNT, abi::HC_MORSEL_DESTROY, abi::HC_MORSEL_SIZE,
    abi::HC_DEVICE_MOUNT, abi::HC_DEVICE_UNMOUNT, abi::HC_EDU_DMA, abi::HC_NVME_READ, abi::HC_NVME_WRITE,
    abi::HC_DEVICE_MOUNT, abi::HC_EDU_DMA,
    abi::HC_EXMAP_CREATE, abi::HC_EXMAP_ACTION, abi::HC_EXMAP_ACTION, abi::HC_EXMAP_INFO,
    abi::HC_NAME_WATCH, 0x47,
];

/// The iovec page of the ExMap calls: refilled with random entries before each.
#[repr(C, align(4096))]
struct Iov([u64; 512]);
static mut IOV: Iov = Iov([0; 512]);

/// Names the calls may use: three real ones, stored in this static so their address is valid.
static NAMES: [u8; 16] = *b"fz-afz-bfz-c\0\0\0\0";
/// A page the guest never names to the hypervisor: it must keep its pattern.
static mut UNTOUCHED: [u8; 4096] = [0x5a; 4096];

fn main(info: &BootInfo) -> i32 {
    let seed = if info.arg as u32 == 0 { 1 } else { info.arg as u32 as u64 };
    let calls = match info.arg >> 32 { 0 => 3000, n => n };
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mem = info.memory_size;
    let win = info.morsel_window;
    let names = NAMES.as_ptr() as u64;
    const MIB: u64 = 1 << 20;
    let edge = [0, 1, 4095, 4096, mem - 8, mem, mem + 4096, u64::MAX, u64::MAX - 4095, 1 << 40, win - 1];
    let sizes = [4096, 8192, 2 * MIB, 4 * MIB, 64 * MIB, 0, 1, 4097, 1 << 40, u64::MAX];
    let gpas = [win, win + 2 * MIB, win + 4 * MIB, win + 6 * MIB, win + (1 << 30), win + (2 << 30), win + 4096, 0, mem];
    let edu = abi::device_bdf(0, 3, 0);
    let bdfs = [edu, edu, abi::device_bdf(0, 4, 0), abi::device_bdf(0, 31, 7), 1 << 16, abi::device_bdf(0, 0, 0), abi::device_bdf(0, 31, 0)];
    let iovas = [0, 2 * MIB, 4 * MIB, 6 * MIB, 2 * MIB + 4096, 2 * MIB + 16384, 1 << 30, 0x0ff0_0000, 1 << 28, 1 << 47, 4096, 1 << 36];
    let amd = core::arch::x86_64::__cpuid(0).ebx == u32::from_le_bytes(*b"Auth");
    let mut ok = 0u32;
    let mut errors = [0u32; 9];
    let mut undefined = 0u32;
    for _ in 0..calls {
        let nr = rng.pick(&NUMBERS);
        // Mostly plausible arguments so that calls get deep, sometimes edges or noise.
        let name = if !rng.next().is_multiple_of(4) { names + 4 * (rng.next() % 3) } else { rng.pick(&edge) };
        let len = if !rng.next().is_multiple_of(4) { 4 } else { rng.pick(&[0, 3, 32, 33, 4096, u64::MAX]) };
        let mut args = match nr {
            abi::HC_MORSEL_CREATE => [name, len, rng.pick(&sizes), rng.pick(&[0, 1, 2, 3, 4, 5, 7, 8, u64::MAX]), 0, 0],
            abi::HC_MORSEL_OPEN => [name, len, rng.pick(&[0, 1, 1, 2]), 0, 0, 0],
            abi::HC_MORSEL_UNMOUNT | abi::HC_MORSEL_SIZE => [rng.pick(&gpas), 0, 0, 0, 0, 0],
            abi::HC_MORSEL_DESTROY => [name, len, 0, 0, 0, 0],
            abi::HC_NAME_WATCH => [name, len, rng.pick(&[0, 1, 1 << 63, u64::MAX]), 0, 0, 0],
            abi::HC_DEVICE_MOUNT => [name, len, rng.pick(&bdfs), rng.pick(&iovas), rng.pick(&[0, 1, 1, 2]), 0],
            abi::HC_DEVICE_UNMOUNT => [rng.pick(&bdfs), rng.pick(&iovas), 0, 0, 0, 0],
            abi::HC_EDU_DMA => [rng.pick(&[0, 1, 2]), rng.pick(&iovas), rng.pick(&[1, 64, 4095, 4096, 0, u64::MAX]), 0, 0, 0],
            abi::HC_EXMAP_CREATE => [name, len, rng.pick(&sizes), rng.pick(&[0, 0, 2, 1, 4, u64::MAX]), 0, 0],
            abi::HC_EXMAP_ACTION => {
                let iov = core::ptr::addr_of_mut!(IOV);
                for k in 0..8 {
                    let page = rng.pick(&[0, 1, 511, 512, 1023, 4095, 4096, 16383, 16384, 1 << 40, (1 << 52) - 1]);
                    let count = rng.pick(&[0, 1, 2, 512, 4095]);
                    // SAFETY: a static only this loop and the hypervisor (during the call) touch.
                    unsafe { (*iov).0[k] = abi::exmap_entry(page, count) };
                }
                let ptr = rng.pick(&[iov as u64, iov as u64, iov as u64 + 8, mem, win, 0]);
                [rng.pick(&gpas), ptr, rng.pick(&[1, 8, 8, 0, 512, 513]), rng.pick(&[0, 1, 0, 1, 2, 3, 4, u64::MAX]), 0, 0]
            }
            abi::HC_EXMAP_INFO => [rng.pick(&gpas), rng.pick(&[0, 1, 2, 5, 6, 7, 8, 9, 10, 11, u64::MAX]), 0, 0, 0, 0],
            abi::HC_NVME_READ | abi::HC_NVME_WRITE => {
                [rng.pick(&gpas), rng.pick(&[0, 512, 1, 1 << 40]), rng.pick(&[0, 1, 1 << 40]), rng.pick(&[0, 1, 8, 1 << 20]), 0, 0]
            }
            _ => [rng.pick(&edge), rng.pick(&edge), rng.pick(&edge), 0, 0, 0],
        };
        if rng.next().is_multiple_of(8) {
            let i = (rng.next() % 6) as usize;
            args[i] = rng.next();
        }
        // On AMD, one call in eight uses a prefixed VMMCALL (`66 0f 01 d9`, 4 bytes), whose
        // length QEMU's SVM does not report: the hypervisor decodes it from guest memory.
        let raw = if amd && rng.next().is_multiple_of(8) { prefixed_call(nr, args) } else { guest_lib::hypercall::call_raw(nr, args) };
        match raw {
            (0.., _) if nr == abi::HC_DEVICE_MOUNT && args[2] != edu => {
                undefined += 1;
                println!("fuzz: device_mount {args:#x?} succeeded, but only edu ({edu:#x}) is offered");
            }
            (0.., _) => ok += 1,
            (status, _) => match abi::Error::from_status(status) {
                Some(e) => errors[(-(e as i64) - 1) as usize] += 1,
                None => {
                    undefined += 1;
                    println!("fuzz: call {nr:#x} {args:#x?} returned status {status}, which the ABI does not define");
                }
            },
        }
    }
    // SAFETY: a static only read here. No value above points into it, so no call may have
    // written it.
    let untouched = unsafe { (*core::ptr::addr_of!(UNTOUCHED)).iter().all(|&b| b == 0x5a) };
    println!("fuzz: {calls} calls (seed {seed}): {ok} ok, errors by code -1..-9: {errors:?}, {undefined} undefined statuses or forbidden successes");
    let still = guest_lib::info(abi::INFO_ABI_VERSION);
    println!("fuzz: afterwards info(ABI version) = {still:?}, untouched page {}", if untouched { "intact" } else { "CHANGED" });
    if still != Ok(abi::ABI_VERSION) || !untouched || undefined > 0 {
        return 1;
    }
    0
}

/// `call_raw` with an operand-size prefix on VMMCALL.
fn prefixed_call(nr: u64, args: [u64; 6]) -> (i64, u64) {
    let (status, value): (i64, u64);
    // SAFETY: as guest_lib::hypercall::call_raw: the hypervisor reads the argument registers
    // and writes rax and rdx only.
    unsafe {
        core::arch::asm!(".byte 0x66, 0x0f, 0x01, 0xd9", inout("rax") nr as i64 => status, inout("rdi") args[0] => _,
            inout("rsi") args[1] => _, inout("rdx") args[2] => value, inout("r10") args[3] => _,
            inout("r8") args[4] => _, inout("r9") args[5] => _, options(nostack));
    }
    (status, value)
}
