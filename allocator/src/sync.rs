//! The atomics the allocator is built from: `core`'s normally, loom's under `cfg(loom)`, so the
//! loom models explore exactly the code that runs in the hypervisor.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};
