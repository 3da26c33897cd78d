//! Morsels: large memory objects as second-level page-table subtrees (EPT, NPT, VT-d second
//! level), and the second-level tables they are mounted into.
//!
//! Host-testable and `no_std` without `alloc`: hardware is reached only through `PhysMem`
//! (table frames) and `FrameAlloc` (frames). The `std` feature adds `SimMem`, a simulated
//! machine for tests and the benchmark. See README.md.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

pub mod addr;
pub mod error;
pub mod format;
pub mod mem;
pub mod morsel;
#[cfg(any(test, feature = "std"))]
pub mod sim;
pub mod table;

pub use addr::{GuestPhysAddr, HostPhysAddr, InputAddr, IoVirtAddr, Level, PageSize};
pub use error::Error;
pub use format::{can_share, AmdV1, Decoded, Entry, Ept, Family, Format, FormatKind, Npt, Perm, VtdSl};
pub use mem::{FrameAlloc, PhysMem};
pub use morsel::{LeafEdit, LeafSlot, Leaves, Morsel, MountHandle, MountStats, MAX_MORSEL};
#[cfg(any(test, feature = "std"))]
pub use sim::SimMem;
pub use table::{SecondLevelTable, TableStats, Translation};
