//! A device's DMA domain: one PCI function, a domain id, and the VT-d second-level table that
//! translates its I/O virtual addresses. Morsels are mounted into `table` like into a guest's
//! second-level table (one entry write), after which the unit's IOTLB is flushed for `id`.

use crate::devices::pci::Bdf;
use morsel::{SecondLevelTable, VtdSl};

pub struct Domain {
    /// Domain id in the context entry and in IOTLB invalidations (VT-d spec 9.3).
    pub id: u16,
    pub bdf: Bdf,
    pub table: SecondLevelTable<VtdSl>,
}
