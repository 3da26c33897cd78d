//! Morsels: large memory objects as second-level page-table subtrees.
#![cfg_attr(not(feature = "std"), no_std)]
