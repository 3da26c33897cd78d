//! The atomics the protocols here are built from: `core`'s normally, loom's under `cfg(loom)`
//! (the allocator's `sync.rs` pattern), so the loom models explore exactly the code that runs
//! in the hypervisor.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

/// One round of a spin-wait: a pause on the CPU; under loom a yield, so that the model
/// checker runs the thread being waited for (and reports a wait that can never end).
#[inline]
pub fn spin() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}
