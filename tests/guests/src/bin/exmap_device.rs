//! Scenario exmap_free_invalidates_each_device_domain_once: an ExMap region mounted twice
//! into edu's domain (two windows, read-write and read-only) is populated and evicted in one
//! FREE batch of 8 pages; the hypervisor must invalidate edu's IOTLB once for the batch, not
//! once per mount or page. edu reads a page through the read-write window while it is
//! populated, and is blocked after the FREE (the device view or EPT twin follows the region,
//! and its stale translation is gone).
#![no_std]
#![no_main]

use guest_lib::device::{self, EDU};
use guest_lib::exmap::{ExMap, Range};
use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

const NAME: &str = "devpool";
const RW_IOVA: u64 = 2 << 20;
const RO_IOVA: u64 = 4 << 20;

fn main(_: &BootInfo) -> i32 {
    let mut x = match ExMap::create(NAME, 64 << 10, false) {
        Ok(x) => x,
        Err(e) => {
            println!("exmap device: create failed: {e}");
            return 1;
        }
    };
    if let Err(e) = device::mount(NAME, EDU, RW_IOVA, true).and_then(|_| device::mount(NAME, EDU, RO_IOVA, false)) {
        println!("exmap device: device mount failed: {e}");
        return 1;
    }
    let pages = [Range::new(0, 8)];
    match x.alloc(&pages) {
        Ok(0) => {}
        other => {
            println!("exmap device: alloc UNEXPECTED: {other:?}");
            return 1;
        }
    }
    if let Err(e) = device::edu_to_device(RW_IOVA, 4095) {
        println!("exmap device: edu read of a populated page failed UNEXPECTED: {e}");
        return 1;
    }
    let before = x.info(guest_lib::abi::EXMAP_INFO_INVALIDATIONS).unwrap_or(u64::MAX);
    match x.free(&pages) {
        Ok(0) => {}
        other => {
            println!("exmap device: free UNEXPECTED: {other:?}");
            return 1;
        }
    }
    let after = x.info(guest_lib::abi::EXMAP_INFO_INVALIDATIONS).unwrap_or(u64::MAX);
    // One second-level flush for the guest plus one IOTLB invalidation for edu's domain.
    println!("exmap device: one FREE of 8 pages with 2 device mounts cost {} invalidations", after.wrapping_sub(before));
    match device::edu_to_device(RW_IOVA, 4095) {
        Err(guest_lib::abi::Error::DeviceFault) => println!("exmap device: edu read of the freed page 0 blocked: device fault"),
        other => {
            println!("exmap device: edu read of the freed page 0 UNEXPECTED: {other:?}");
            return 1;
        }
    }
    0
}
