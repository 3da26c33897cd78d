//! ExMap (Leis et al., SIGMOD'23, "Virtual-Memory Assisted Buffer Management") as the
//! hypervisor's host-testable core: a region is a sparse morsel (tables, no data frames)
//! whose 4 KiB pages a guest populates and evicts explicitly, in batches of up to 512
//! `{page, count}` entries in one guest page.
//!
//! - `iov`: the entry encoding and the per-entry validation (range, overflow, duplicates);
//! - `cache`: a per-vCPU cache of free frames, refilled from and returned to the frame
//!   allocator in bundles, that knows which region each frame came from (zeroing rule);
//! - `batch`: ALLOC / FREE / "collect the populated frames" over a sparse `Morsel`, with a
//!   result per entry, a bad entry failing alone.
//!
//! `no_std` without `alloc`'s types in the API beyond `Vec` buffers the caller keeps; the
//! hypervisor (`hypervisor/src/vm/exmap.rs`) adds the hypercalls, the invalidation and the
//! NVMe I/O. See README.md.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod batch;
pub mod cache;
pub mod iov;

pub use batch::{alloc, alloc_fresh, collect, free, BatchStats, Outcome, Region};
pub use cache::{CacheStats, FrameCache, Origin, BUNDLE, FRESH};
pub use iov::{check, decode, encode, EntryError, Order, Range, Validator, MAX_COUNT, MAX_ENTRIES};
