//! Scenario devices_nvme_proxy_reads_into_morsel. Creates a 64 MiB morsel, asks the NVMe proxy
//! to read the first 64 MiB of the disk into it (the device DMAs straight into the morsel's
//! frames), checks the image checksum that xtask computed (`arg`), then writes block 5 back
//! filled with 0xab and reads it again into the morsel's last block to see the disk has it.
#![no_std]
#![no_main]

use guest_lib::abi::NVME_BLOCK;
use guest_lib::device;
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, BootInfo, Error};

guest_lib::entry!(main);

const SIZE: u64 = 64 << 20;
const BLOCKS: u64 = SIZE / NVME_BLOCK;
const MODIFIED_LBA: u64 = 5;
const MARK: u8 = 0xab;

/// The disk checksum of `tests/scenarios/README.md`: little-endian words w_i, sum of
/// w_i * (2i + 1) modulo 2^64.
fn checksum(m: &[u8]) -> u64 {
    m.chunks_exact(8).enumerate().fold(0u64, |c, (i, w)| {
        let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        c.wrapping_add(w.wrapping_mul(2 * i as u64 + 1))
    })
}

fn main(info: &BootInfo) -> i32 {
    let mut m = match morsel::create("disk", SIZE, PageSize::Size2M, false) {
        Ok(m) => m,
        Err(e) => {
            println!("nvme guest: create failed: {e}");
            return 1;
        }
    };
    let gpa = m.addr();
    match device::nvme_read(gpa, 0, 0, BLOCKS) {
        Ok(n) => println!("nvme guest: the proxy read {n} blocks ({} MiB) into the morsel", (n * NVME_BLOCK) >> 20),
        Err(e) => {
            println!("nvme guest: read failed: {e}");
            return 1;
        }
    }
    let sum = checksum(&m);
    if sum != info.arg {
        println!("nvme guest: checksum {sum} of 64 MiB does NOT match the image's {}", info.arg);
        return 1;
    }
    println!("nvme guest: checksum {sum} of 64 MiB matches the image");
    // Arguments the proxy must refuse: past the morsel, misaligned, no blocks.
    for (what, r, want) in [
        ("past the morsel", device::nvme_read(gpa, SIZE - NVME_BLOCK, 0, 2), Error::TooLarge),
        ("misaligned", device::nvme_read(gpa, 100, 0, 1), Error::Invalid),
        ("of zero blocks", device::nvme_read(gpa, 0, 0, 0), Error::Invalid),
        ("into an unmounted address", device::nvme_read(gpa + SIZE, 0, 0, 1), Error::NotFound),
    ] {
        if r != Err(want) {
            println!("nvme guest: a read {what} was not refused with {want}: {r:?}");
            return 1;
        }
    }
    println!("nvme guest: bad requests refused");
    let off = (MODIFIED_LBA * NVME_BLOCK) as usize;
    m[off..off + NVME_BLOCK as usize].fill(MARK);
    if let Err(e) = device::nvme_write(gpa, off as u64, MODIFIED_LBA, 1) {
        println!("nvme guest: write failed: {e}");
        return 1;
    }
    let last = SIZE - NVME_BLOCK;
    if let Err(e) = device::nvme_read(gpa, last, MODIFIED_LBA, 1) {
        println!("nvme guest: read back failed: {e}");
        return 1;
    }
    if m[last as usize..].iter().all(|&b| b == MARK) {
        println!("nvme guest: block {MODIFIED_LBA} written with {MARK:#x} and read back from the disk");
        0
    } else {
        println!("nvme guest: block {MODIFIED_LBA} read back does NOT hold what was written");
        1
    }
}
