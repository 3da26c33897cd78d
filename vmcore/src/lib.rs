//! The hypervisor's VM core that touches no hardware, as a `no_std` crate tested on the host
//! (`cargo test -p vmcore`, debug and `--release`; loom models with
//! `RUSTFLAGS="--cfg loom" cargo test --release -p vmcore --lib loom`).
//! One module per concern; this file only lists them.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

extern crate alloc;

pub mod directory;
pub mod exits;
pub mod flush;
pub mod gate;
pub mod guest;
pub mod guestbytes;
pub mod heap;
pub mod hypercall;
pub mod loader;
pub mod memory;
pub mod names;
pub mod notify;
pub mod reason;
pub mod region;
pub mod region_lock;
pub mod shootdown;
pub mod vcpu;
mod sync;
