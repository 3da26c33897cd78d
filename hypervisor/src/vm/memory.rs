//! A guest's memory: `vmcore::memory::GuestMemory` (its second-level table over 2 MiB frames
//! of RAM, with typed, checked access; host-tested there) over the hypervisor's identity map,
//! whose data frames are reached at their physical address (`DataMem for Identity`).

use crate::mm::frames::Identity;
use morsel::HostPhysAddr;
use vmcore::guestbytes::GuestBytes;

pub use vmcore::memory::MapError;

/// The guest-physical address space of one guest, over the identity map.
pub type GuestMemory<F> = vmcore::memory::GuestMemory<F, Identity>;

impl vmcore::memory::DataMem for Identity {
    unsafe fn bytes(&self, hpa: HostPhysAddr, n: usize) -> GuestBytes {
        // SAFETY: forwarded from the caller (frames a live guest's table translates to, kept
        // allocated meanwhile); the host maps all RAM at its physical address.
        unsafe { crate::mm::frames::guest_bytes(hpa.as_u64(), n) }
    }
}
