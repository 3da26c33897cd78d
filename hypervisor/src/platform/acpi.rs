//! ACPI through the `acpi` crate: processors and the APIC from the MADT, the PCIe ECAM
//! window from the MCFG, and whether a DMAR table (an Intel IOMMU) or an NFIT (persistent
//! memory) is present.

use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::sdt::{SdtHeader, Signature};
use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};
use core::ptr::NonNull;

/// Physical memory is identity-mapped, so mapping a table is taking its address.
#[derive(Clone, Copy)]
struct IdentityMap;

impl AcpiHandler for IdentityMap {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        // SAFETY: ACPI tables lie in identity-mapped memory below 4 GiB.
        unsafe { PhysicalMapping::new(phys, NonNull::new_unchecked(phys as *mut T), size, size, *self) }
    }

    fn unmap_physical_region<T>(_: &PhysicalMapping<Self, T>) {}
}

/// A PCIe enhanced configuration window.
#[derive(Clone, Copy, Debug)]
pub struct Ecam {
    pub base: u64,
    pub segment: u16,
    pub bus_start: u8,
    pub bus_end: u8,
}

/// What the hypervisor uses from ACPI.
#[derive(Debug, Default)]
pub struct Platform {
    /// Enabled processors in the MADT (local APIC and local x2APIC entries with flag bit 0).
    pub cpus: usize,
    /// Their APIC IDs, in MADT order (the boot CPU among them).
    pub apic_ids: alloc::vec::Vec<u32>,
    pub local_apic: u64,
    pub io_apics: usize,
    pub ecam: Option<Ecam>,
    /// Physical address of the DMAR table, if there is one.
    pub dmar: Option<u64>,
    /// Physical address of the IVRS table (AMD IOMMU), if there is one.
    pub ivrs: Option<u64>,
    /// Physical address of the NFIT (persistent memory), if there is one.
    pub nfit: Option<u64>,
}

/// Reads the tables behind `rsdp`; errors are logged and leave the fields empty.
pub fn discover(rsdp: Option<u64>) -> Platform {
    let mut p = Platform::default();
    let Some(rsdp) = rsdp else {
        log::warn!(target: "acpi", "no RSDP from the loader: no ACPI");
        return p;
    };
    // SAFETY: the loader gave us the RSDP address, identity-mapped.
    let tables = match unsafe { AcpiTables::from_rsdp(IdentityMap, rsdp as usize) } {
        Ok(t) => t,
        Err(e) => {
            log::warn!(target: "acpi", "RSDP at {rsdp:#x} unusable: {e:?}");
            return p;
        }
    };
    log::info!(target: "acpi", "RSDP at {rsdp:#x}, revision {}", tables.revision());
    if let Ok(madt) = tables.find_table::<Madt>() {
        p.local_apic = madt.get().local_apic_address as u64;
        for entry in madt.get().entries() {
            match entry {
                MadtEntry::LocalApic(e) if e.flags & 1 != 0 => p.apic_ids.push(e.apic_id as u32),
                MadtEntry::LocalX2Apic(e) if e.flags & 1 != 0 => p.apic_ids.push(e.x2apic_id),
                MadtEntry::IoApic(_) => p.io_apics += 1,
                _ => {}
            }
        }
        p.cpus = p.apic_ids.len();
    }
    if let Ok(mcfg) = tables.find_table::<Mcfg>() {
        p.ecam = mcfg.entries().first().map(|e| Ecam {
            base: e.base_address,
            segment: e.pci_segment_group,
            bus_start: e.bus_number_start,
            bus_end: e.bus_number_end,
        });
    }
    p.dmar = tables.find_table::<Dmar>().ok().map(|m| m.physical_start() as u64);
    p.ivrs = tables.find_table::<Ivrs>().ok().map(|m| m.physical_start() as u64);
    p.nfit = tables.find_table::<Nfit>().ok().map(|m| m.physical_start() as u64);
    p
}

/// The DMA Remapping table's header (VT-d spec 8.1); the `acpi` crate has no DMAR type,
/// and the IOMMU driver reads the rest itself.
#[repr(C, packed)]
pub struct Dmar {
    header: SdtHeader,
}

// SAFETY: `Dmar` starts with the SDT header and claims no more than that.
unsafe impl AcpiTable for Dmar {
    const SIGNATURE: Signature = Signature::DMAR;

    fn header(&self) -> &SdtHeader {
        &self.header
    }
}

/// The I/O Virtualization Reporting Structure's header (AMD IOMMU spec 5.2); the `acpi`
/// crate has no IVRS type, and the AMD-Vi driver reads the rest itself.
#[repr(C, packed)]
pub struct Ivrs {
    header: SdtHeader,
}

// SAFETY: `Ivrs` starts with the SDT header and claims no more than that.
unsafe impl AcpiTable for Ivrs {
    const SIGNATURE: Signature = Signature::IVRS;

    fn header(&self) -> &SdtHeader {
        &self.header
    }
}

/// The NVDIMM Firmware Interface Table's header (ACPI 6.4 5.2.25); `pmem` reads the rest.
#[repr(C, packed)]
pub struct Nfit {
    header: SdtHeader,
}

// SAFETY: `Nfit` starts with the SDT header and claims no more than that.
unsafe impl AcpiTable for Nfit {
    const SIGNATURE: Signature = Signature::NFIT;

    fn header(&self) -> &SdtHeader {
        &self.header
    }
}

impl Platform {
    pub fn log(&self) {
        log::info!(target: "acpi", "MADT: {} CPU(s), local APIC at {:#x}, {} I/O APIC(s)",
            self.cpus, self.local_apic, self.io_apics);
        match self.ecam {
            Some(e) => log::info!(target: "acpi", "MCFG: PCIe ECAM at {:#x}, segment {}, buses {}-{}",
                e.base, e.segment, e.bus_start, e.bus_end),
            None => log::info!(target: "acpi", "MCFG: none (no PCIe ECAM)"),
        }
        match self.dmar {
            Some(a) => log::info!(target: "acpi", "DMAR: present at {a:#x} (IOMMU)"),
            None => log::info!(target: "acpi", "DMAR: none (no IOMMU)"),
        }
        if let Some(a) = self.ivrs {
            log::info!(target: "acpi", "IVRS: present at {a:#x} (AMD IOMMU)");
        }
        if let Some(a) = self.nfit {
            log::info!(target: "acpi", "NFIT: present at {a:#x} (persistent memory)");
        }
    }
}
