//! Lock-free, log-free page-frame allocator (LLFree design). See the crate docs.
#![cfg_attr(not(feature = "std"), no_std)]
