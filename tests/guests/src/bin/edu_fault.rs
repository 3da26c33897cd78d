//! Scenario devices_dma_outside_domain_is_blocked. Shares a 16 KiB morsel filled with a canary
//! byte with the edu device and loads edu's buffer from it with other bytes. Then: a DMA to
//! an I/O virtual address outside its mounts is refused by the hypervisor (the device is
//! shared: another guest's mount could be there); a DMA just past the end of the morsel,
//! inside its mount window (not mapped), and one into a read-only device mount of the same
//! morsel (no write permission) reach the device and are blocked by the IOMMU. The morsel
//! must be unchanged after all three. Exit code 0 if the IOMMU reported both blocked DMAs,
//! 2 if it blocked them (the morsel is unchanged) without reporting them, 1 otherwise.
#![no_std]
#![no_main]

use guest_lib::device::{self, EDU};
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, BootInfo, Error};

guest_lib::entry!(main);

const NAME: &str = "fence";
const IOVA: u64 = 2 << 20;
const RO_IOVA: u64 = 6 << 20;
const OUTSIDE: u64 = 4 << 20;
const SIZE: usize = 16 * 1024;
const PAST_END: u64 = IOVA + SIZE as u64;
const LEN: u64 = guest_lib::abi::EDU_MAX_TRANSFER;
const CANARY: u8 = 0xc5;

fn main(_: &BootInfo) -> i32 {
    let mut m = match morsel::create(NAME, SIZE as u64, PageSize::Size4K, false) {
        Ok(m) => m,
        Err(e) => {
            println!("edu fault: create failed: {e}");
            return 1;
        }
    };
    if let Err(e) = device::mount(NAME, EDU, IOVA, true).and_then(|_| device::mount(NAME, EDU, RO_IOVA, false)) {
        println!("edu fault: device mount failed: {e}");
        return 1;
    }
    m[..4096].fill(0x77);
    if let Err(e) = device::edu_to_device(IOVA, LEN) {
        println!("edu fault: loading the device failed: {e}");
        return 1;
    }
    m.fill(CANARY);
    match device::edu_to_memory(OUTSIDE, LEN) {
        Err(Error::Denied) => println!("edu fault: DMA outside its device mounts ({OUTSIDE:#x}) was refused: access denied"),
        other => {
            println!("edu fault: DMA outside its device mounts ({OUTSIDE:#x}) was NOT refused: {other:?}");
            return 1;
        }
    }
    // Whether the IOMMU reported each blocked DMA (QEMU 7.2's AMD IOMMU never does: README);
    // blocked or not, the morsel must be unchanged.
    let mut unreported = false;
    for (what, iova) in [("past the end of the morsel", PAST_END), ("a read-only device mount", RO_IOVA)] {
        match device::edu_to_memory(iova, LEN) {
            Err(Error::DeviceFault) => println!("edu fault: DMA to {what} ({iova:#x}) was blocked: device fault"),
            Ok(us) => {
                println!("edu fault: DMA to {what} ({iova:#x}) was not reported by the IOMMU ({us} us); the morsel decides");
                unreported = true;
            }
            other => {
                println!("edu fault: DMA to {what} ({iova:#x}) failed UNEXPECTED: {other:?}");
                return 1;
            }
        }
    }
    if !m.iter().all(|&b| b == CANARY) {
        println!("edu fault: canary morsel CHANGED");
        return 1;
    }
    println!("edu fault: canary morsel of {SIZE} bytes unchanged");
    // 2: blocked (memory unchanged) but not reported.
    if unreported { 2 } else { 0 }
}
