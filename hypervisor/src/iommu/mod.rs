//! The Intel IOMMU (VT-d): the DMAR table that names the remapping units, one unit's driver,
//! and per-device domains whose second-level tables hold mounted morsels.

pub mod dmar;
pub mod domain;
pub mod vtd;

pub use vtd::Vtd;
