//! The devices the hypervisor drives and the IOMMU in front of them: found at boot (PCI bus 0
//! through ECAM, the VT-d unit through the DMAR or the AMD IOMMU through the IVRS) into one
//! `Devices` value that `main` owns and hands to the vCPU loop's context: hypercalls reach
//! the drivers only through that context, never through a global. The boot-time
//! self-tests are in `selftest`.

pub mod edu;
pub mod nvme;
pub mod pci;
pub mod selftest;

use allocator::Order;
use crate::platform::acpi::Platform;
use crate::mm::frames::Frames;
use crate::iommu::{self, AmdVi, Unit, Vtd};
use formats::mmio::Mmio;
use crate::devices::pci::{Bdf, Function, Pci};
use alloc::vec::Vec;
use abi::Error;
use morsel::Perm;

/// Everything found at boot.
pub struct Devices {
    pub functions: Vec<Function>,
    pub iommu: Unit,
    pub edu: Option<edu::Edu>,
    /// The NVMe driver, leaked at boot so that a CPU reaches it with the world lock let go
    /// (its batches run outside the lock; what it shares is locked or atomic, `nvme`).
    pub nvme: Option<&'static nvme::Nvme>,
    /// The I/O virtual spans of the NVMe domain that proxy batches (`nvme_io`, ExMap READ and
    /// WRITE) have mounted now: a batch whose I/O runs outside the world lock keeps its span
    /// here, so a batch of another CPU mounts elsewhere (`proxy_slot`).
    pub proxy_spans: Vec<(u64, u64)>,
}

/// An IOMMU is there but could not be set up (the reason was logged).
#[derive(Debug)]
pub struct InitFailed;

/// Enumerates PCI bus 0, brings up the IOMMU the ACPI tables name (VT-d through the DMAR,
/// the AMD IOMMU through the IVRS: the tables decide, not the CPU vendor) with translation
/// on (every device blocked until it gets a domain), and the edu and NVMe drivers. Without
/// an IOMMU or ECAM there is nothing (None). NVMe completes by MSI-X interrupt where the
/// device has the capability, unless `nvme_poll` (`nvme=poll`).
pub fn init(platform: &Platform, options: crate::platform::cmdline::IommuOptions, nvme_poll: bool) -> Result<Option<Devices>, InitFailed> {
    let Some(ecam) = platform.ecam else { return Ok(None) };
    if platform.dmar.is_none() && platform.ivrs.is_none() {
        return Ok(None);
    }
    let Some(pci) = Pci::new(ecam) else {
        log::error!(target: "pci", "ECAM window at {:#x} (buses {}-{}) is not below 4 GiB", ecam.base, ecam.bus_start, ecam.bus_end);
        return Err(InitFailed);
    };
    let functions = pci.enumerate();
    let unit = match (platform.dmar, platform.ivrs) {
        (Some(dmar_at), _) => init_vtd(dmar_at, options),
        (None, Some(ivrs_at)) => {
            if options.share_ept {
                log::warn!(target: "iommu", "iommu=sharept ignored: the AMD IOMMU cannot walk EPT tables (AMD-Vi views are used)");
            }
            init_amdvi(ivrs_at)
        }
        (None, None) => None,
    };
    let Some(mut iommu) = unit else { return Err(InitFailed) };
    let mut edu = None;
    let mut nvme = None;
    for f in &functions {
        // SAFETY: a memory BAR as `Pci::enumerate` sized and placed it: device registers.
        let bar0 = f.bars.iter().find(|b| b.index == 0).and_then(|b| unsafe { Mmio::new(b.addr, b.size) });
        match (f.vendor, f.device, f.class, bar0) {
            (edu::VENDOR, edu::DEVICE, _, Some(bar)) if edu.is_none() => {
                pci.enable(f.bdf);
                if iommu.attach(f.bdf).is_ok() {
                    edu = Some(edu::Edu::new(f.bdf, bar));
                }
            }
            (_, _, nvme::CLASS, Some(bar)) if nvme.is_none() => {
                pci.enable(f.bdf);
                // MSIs pass the IOMMU untranslated, so the DMA domain needs no mapping for
                // 0xFEEx_xxxx: writes there are interrupt requests, not DMA (VT-d spec,
                // "Handling Requests to Interrupt Address Range"), and no interrupt remapping
                // is enabled (VT-d: GSTS.IRES = 0, compatibility format passes through, spec
                // chapter 5; AMD-Vi: DTE.IV = 0, interrupts pass unremapped, AMD IOMMU spec
                // 48882 2.2.2 "Device Table Entry Format"). Seen working under QEMU with both.
                let completions = match (nvme_poll, pci.msix(f)) {
                    (true, _) => nvme::Completions::Poll("nvme=poll"),
                    (false, Some(m)) => nvme::Completions::Msix(m),
                    (false, None) => nvme::Completions::Poll("the device has no usable MSI-X capability"),
                };
                match iommu.attach(f.bdf) {
                    Ok(()) => match nvme::Nvme::new(f.bdf, bar, &mut iommu, &platform.apic_ids, completions) {
                        Ok(n) => nvme = Some(&*alloc::boxed::Box::leak(alloc::boxed::Box::new(n))),
                        Err(e) => log::error!(target: "nvme", "device {}: {e}", f.bdf),
                    },
                    Err(e) => log::error!(target: "iommu", "device {}: no domain: {e}", f.bdf),
                }
            }
            _ => {}
        }
    }
    iommu.poll_faults();
    Ok(Some(Devices { functions, iommu, edu, nvme, proxy_spans: Vec::new() }))
}

/// The VT-d unit of the DMAR, translation on.
fn init_vtd(dmar_at: u64, options: crate::platform::cmdline::IommuOptions) -> Option<Unit> {
    // SAFETY: the address comes from the RSDT and points at the DMAR's header.
    let dmar = match unsafe { iommu::dmar::read(dmar_at) } {
        Ok(d) => d,
        Err(e) => {
            log::error!(target: "iommu", "DMAR at {dmar_at:#x}: {e}");
            return None;
        }
    };
    for u in &dmar.units {
        let scope: Vec<alloc::string::String> = u.devices.iter().map(|b| alloc::format!("{b}")).collect();
        log::info!(target: "iommu", "DMAR: host address width {} bits, unit at {:#x}, segment {}, {}",
            dmar.host_address_width, u.register_base, u.segment,
            if u.include_all { "all devices".into() } else { alloc::format!("devices {}", scope.join(" ")) });
    }
    // One unit on q35; with several, the first (every device we drive sits behind it there).
    let Some(unit) = dmar.units.first() else {
        log::error!(target: "iommu", "DMAR lists no remapping unit");
        return None;
    };
    let mut vtd = match Vtd::new(unit.register_base) {
        Ok(v) => v,
        Err(e) => {
            log::error!(target: "iommu", "VT-d unit at {:#x}: {e}", unit.register_base);
            return None;
        }
    };
    if let Err(e) = vtd.enable(options.register_invalidation) {
        log::error!(target: "iommu", "cannot enable translation: {e}");
        return None;
    }
    vtd.share_ept = options.share_ept;
    if options.share_ept {
        log::info!(target: "iommu", "iommu=sharept: an NPT morsel's device mounts go through its EPT twin (the morsel in the EPT format over the same data frames), whose own subtree is mounted with one entry, as a VMX guest's EPT morsel is; no VT-d views");
    }
    Some(Unit::Vtd(vtd))
}

/// The AMD IOMMU of the IVRS, translation on.
fn init_amdvi(ivrs_at: u64) -> Option<Unit> {
    // SAFETY: the address comes from the RSDT and points at the IVRS's header.
    let ivrs = match unsafe { iommu::dmar::read_table(ivrs_at, formats::ivrs::parse) } {
        Ok(i) => i,
        Err(e) => {
            log::error!(target: "iommu", "IVRS at {ivrs_at:#x}: {e}");
            return None;
        }
    };
    for u in &ivrs.units {
        let devices: Vec<alloc::string::String> = u.devices.iter()
            .map(|&(a, b)| if a == b { alloc::format!("{}", Bdf::from_source_id(a)) } else { alloc::format!("{}-{}", Bdf::from_source_id(a), Bdf::from_source_id(b)) })
            .collect();
        log::info!(target: "iommu", "IVRS: IVHD type {:#x}, IOMMU {} (capability at {:#x}), registers at {:#x}, segment {}, devices {}",
            u.kind, u.device, u.capability_offset, u.register_base, u.segment, devices.join(" "));
    }
    let Some(unit) = ivrs.units.first() else {
        log::error!(target: "iommu", "IVRS lists no IOMMU");
        return None;
    };
    match AmdVi::new(unit.register_base) {
        Ok(a) => Some(Unit::AmdVi(a)),
        Err(e) => {
            log::error!(target: "iommu", "AMD IOMMU at {:#x}: {e}", unit.register_base);
            None
        }
    }
}

/// Checks for DMA faults (after a DMA and at the end of the run); true if `bdf` caused one.
pub fn faults_of(d: &mut Devices, bdf: Bdf) -> bool {
    d.iommu.poll_faults().iter().any(|f| f.source == bdf)
}

/// `edu_dma(direction, iova, len)`: runs edu's DMA engine; `DeviceFault` if the IOMMU blocked it.
pub fn edu_dma(d: &mut Devices, to_device: bool, iova: u64, len: u64) -> Result<u64, Error> {
    let edu = d.edu.as_mut().ok_or(Error::NotFound)?;
    let bdf = edu.bdf;
    let us = edu.dma(to_device, iova, len).map_err(|e| match e {
        edu::Error::BadLength => Error::TooLarge,
        edu::Error::BadAddress => Error::Invalid,
        edu::Error::Timeout => Error::DeviceFault,
    })?;
    if faults_of(d, bdf) {
        return Err(Error::DeviceFault);
    }
    Ok(us)
}

/// Zeroes edu's buffer if it may hold someone's bytes, before the device goes to another
/// guest (the caller checks that no guest has a mount in edu's domain, so `SCRATCH_IOVA` is
/// free): a zeroed frame is mapped read-only there for the one transfer, then unmapped, the
/// tables that leaves empty are freed and the IOTLB flushed.
pub fn edu_scrub(d: &mut Devices) -> Result<(), Error> {
    let frames = &Frames::here();
    let Some(edu) = d.edu.as_ref().filter(|e| e.holds_data) else { return Ok(()) };
    let bdf = edu.bdf;
    if !d.iommu.has_domain(bdf) {
        return Err(Error::NotFound);
    }
    let zeros = frames.alloc_zeroed(Order::BASE).ok_or(Error::NoMemory)?;
    let mapped = d.iommu.map_page(bdf, SCRATCH_IOVA, zeros, Perm::RO);
    let scrubbed = match (&mapped, d.edu.as_mut()) {
        (Ok(()), Some(e)) => e.scrub(SCRATCH_IOVA).ok(),
        _ => None,
    };
    let _ = d.iommu.unmap_page(bdf, SCRATCH_IOVA);
    morsel::FrameAlloc::free(frames, zeros, 0);
    let faulted = faults_of(d, bdf);
    match scrubbed {
        Some(us) if !faulted => {
            log::info!(target: "edu", "device {bdf}: buffer scrubbed ({TEST_LEN} bytes zeroed in {us} us) before it goes to the next guest");
            Ok(())
        }
        _ => {
            log::error!(target: "edu", "device {bdf}: buffer could not be scrubbed; the device is not lent out");
            Err(Error::DeviceFault)
        }
    }
}

/// Where `test=dma-fault` and `edu_scrub` map their source page for edu (inside edu's 28-bit
/// reach; only while no guest has a mount in edu's domain).
pub(crate) const SCRATCH_IOVA: u64 = 0x0ff0_0000;
/// Bytes the self-tests and the scrub DMA (the most edu takes, `edu::MAX_TRANSFER`).
pub(crate) const TEST_LEN: u64 = edu::MAX_TRANSFER;
