//! Host memory: the frame allocator as the hypervisor uses it (`frames`) and persistent
//! memory (`pmem`).
pub mod frames;
pub mod pmem;
