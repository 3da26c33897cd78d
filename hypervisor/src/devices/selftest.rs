//! Boot-time device self-tests (`test=dma-fault`, `test=dma-nodomain`, `test=sharept`): the
//! IOMMU blocks and reports a DMA outside a domain and one by a device without a domain, and an EPT-format morsel mounted into a VT-d domain as
//! its own subtree (no view) is walked by the unit exactly as the design relies on. They run
//! before any guest, on the devices `super::init` set up, and leave no mapping behind.

use super::{faults_of, Devices, SCRATCH_IOVA, TEST_LEN};
use crate::mm::frames::{Frames, IDENTITY};
use crate::iommu::{Unit, Views};
use crate::vm::shootdown::{Flush, Hw};
use crate::devices::pci::Bdf;
use alloc::vec::Vec;
use allocator::Order;
use morsel::{Ept, Morsel, PageSize, Perm};
use spin::Mutex;

/// A page in the hypervisor image (so below edu's 256 MiB DMA limit) that no device domain maps.
#[repr(C, align(4096))]
struct Page([u8; 4096]);
static CANARY: Mutex<Page> = Mutex::new(Page([0; 4096]));
const CANARY_BYTE: u8 = 0xc5;

/// `test=dma-fault`: edu DMAs 4 KiB of a known pattern to the I/O virtual address equal to a
/// canary page's host-physical address, which edu's domain does not map. Without the IOMMU
/// (or with pass-through) the canary would be overwritten. Expects a fault naming edu and
/// that address, and the canary unchanged. True if so.
pub fn dma_fault_test(devices: Option<&mut Devices>) -> bool {
    let frames = &Frames::here();
    let result = devices.map(|d| {
        let Some(edu) = d.edu.as_mut() else {
            log::error!(target: "iommu", "dma-fault test: no edu device");
            return false;
        };
        let bdf = edu.bdf;
        if !d.iommu.has_domain(bdf) {
            return false;
        }
        // Load edu's buffer with 0x5a from a scratch page mapped for this only.
        let Some(src) = frames.alloc_zeroed(Order::BASE) else { return false };
        // SAFETY: a frame we own, identity-mapped.
        unsafe { core::ptr::write_bytes(src.as_u64() as *mut u8, 0x5a, 4096) };
        let mapped = d.iommu.map_page(bdf, SCRATCH_IOVA, src, Perm::RO);
        let loaded = mapped.is_ok() && d.edu.as_mut().is_some_and(|e| e.dma(true, SCRATCH_IOVA, TEST_LEN).is_ok());
        // Leaves no empty tables that would take a guest's mount slot.
        let _ = d.iommu.unmap_page(bdf, SCRATCH_IOVA);
        morsel::FrameAlloc::free(frames, src, 0);
        if !loaded || faults_of(d, bdf) {
            log::error!(target: "iommu", "dma-fault test: could not load edu's buffer through a mapped page");
            return false;
        }
        let mut canary = CANARY.lock();
        canary.0.fill(CANARY_BYTE);
        let target = canary.0.as_ptr() as u64;
        log::info!(target: "iommu", "dma-fault test: canary of 4096 bytes at host-physical {target:#x}; edu DMAs {TEST_LEN} bytes to I/O virtual address {target:#x} (not mapped in its domain)");
        let dma = d.edu.as_mut().map(|e| e.dma(false, target, TEST_LEN));
        let faults = d.iommu.poll_faults();
        let blocked = faults.iter().any(|f| f.source == bdf && f.address == target);
        // SAFETY: reading our own static through a volatile pointer: the device may have
        // written it behind the compiler's back if the IOMMU failed.
        let intact = (0..4096).all(|i| unsafe { core::ptr::read_volatile(canary.0.as_ptr().add(i)) } == CANARY_BYTE);
        log::info!(target: "iommu", "dma-fault test: DMA {:?}, fault reported for device {bdf} at {target:#x}: {}, canary {}",
            dma, if blocked { "yes" } else { "NO" }, if intact { "unchanged" } else { "CHANGED" });
        blocked && intact
    });
    result.unwrap_or_else(|| {
        log::error!(target: "iommu", "dma-fault test: no IOMMU");
        false
    })
}

/// `test=dma-nodomain` (AMD-Vi): edu's device-table entry becomes the blocked one every
/// device without a domain has (`formats::amdvi::dte_blocked`), edu DMAs 4 KiB to the
/// canary page's host-physical address (where it lands if the entry lets it through
/// untranslated), and its entry is restored. Expects a fault from edu (any address: QEMU
/// writes 0 there, README "What is not done") and the canary unchanged. True if so.
pub fn dma_nodomain_test(devices: Option<&mut Devices>) -> bool {
    let Some(d) = devices else {
        log::error!(target: "iommu", "dma-nodomain test: no IOMMU");
        return false;
    };
    let Some(bdf) = d.edu.as_ref().map(|e| e.bdf) else {
        log::error!(target: "iommu", "dma-nodomain test: no edu device");
        return false;
    };
    let Unit::AmdVi(amd) = &mut d.iommu else {
        log::error!(target: "iommu", "dma-nodomain test: AMD-Vi only");
        return false;
    };
    let mut canary = CANARY.lock();
    canary.0.fill(CANARY_BYTE);
    let target = canary.0.as_ptr() as u64;
    if let Err(e) = amd.set_blocked(bdf, true) {
        log::error!(target: "iommu", "dma-nodomain test: cannot block device {bdf}: {e}");
        return false;
    }
    log::info!(target: "iommu", "dma-nodomain test: device {bdf} has the blocked device-table entry; edu DMAs {TEST_LEN} bytes to I/O virtual address {target:#x} (a canary's host-physical address)");
    let dma = d.edu.as_mut().map(|e| e.dma(false, target, TEST_LEN));
    let reported = faults_of(d, bdf);
    // SAFETY: as in `dma_fault_test`.
    let intact = (0..4096).all(|i| unsafe { core::ptr::read_volatile(canary.0.as_ptr().add(i)) } == CANARY_BYTE);
    let restored = match &mut d.iommu {
        Unit::AmdVi(amd) => amd.set_blocked(bdf, false).is_ok(),
        Unit::Vtd(_) => false,
    };
    log::info!(target: "iommu", "dma-nodomain test: DMA {:?}, fault reported for device {bdf}: {}, canary {}, domain restored: {}",
        dma, if reported { "yes" } else { "NO" }, if intact { "unchanged" } else { "CHANGED" }, if restored { "yes" } else { "NO" });
    reported && intact && restored
}

/// `test=sharept`: edu's buffer window. Two 2 MiB windows (the 16 KiB morsel's root is an L1
/// table) below edu's 256 MiB reach and clear of `SCRATCH_IOVA`.
const EDU_RW: u64 = 0x0800_0000;
const EDU_RO: u64 = 0x0820_0000;
const EDU_MORSEL: u64 = 16 << 10;
/// The NVMe part: a 4 MiB morsel of 2 MiB pages (root L2, large leaves), one 1 GiB window.
const NVME_MORSEL: u64 = 4 << 20;
const BLOCK: u64 = 512;

/// `test=sharept` (Xen's `iommu=sharept`, the design's Intel path): a morsel in the EPT
/// format, built as the directory builds a VMX guest's morsels, goes into edu's and the NVMe
/// controller's VT-d domains through `iommu::mount`, the function `device_mount` and the NVMe
/// proxy use: there `can_share::<Ept, VtdSl>()` mounts the EPT subtree itself with one VT-d
/// entry and builds no view. QEMU's VT-d walker then reads EPT entries as second-level
/// entries (VT-d spec 9.8, "Second-Level Paging Entries"; legacy translation, as our context
/// entries select): bits 0/1 are read/write in both formats; EPT's execute bit 2 and the
/// memory type bits 5:3 (6 = WB) and ignore-PAT bit 6 of its leaves are ignored by VT-d
/// without second-level execute and extended memory types; EPT never sets bit 11 (VT-d
/// SNP, reserved without snoop control: QEMU 7.2 faults on it) nor 62 (VT-d TM); our mount
/// marker bit 52 is ignored by both. DMA both ways through the subtree must move the right
/// bytes; DMA past the morsel's end and a write through a read-only mount must be blocked
/// and reported as VT-d faults, with the morsel unchanged. Needs VT-d (the AMD IOMMU walks
/// only its own format). True if every check holds.
pub fn sharept_test(devices: Option<&mut Devices>) -> bool {
    let result = devices.map(|d| {
        if !matches!(d.iommu, Unit::Vtd(_)) {
            log::error!(target: "iommu", "sharept test: needs VT-d (the EPT format is VT-d's second level); this IOMMU is {}", d.iommu.name());
            return false;
        }
        let edu_ok = sharept_edu(d);
        let nvme_ok = match d.nvme.is_some() {
            true => sharept_nvme(d),
            false => {
                log::info!(target: "iommu", "sharept test: no NVMe drive, edu only");
                true
            }
        };
        log::info!(target: "iommu", "sharept test: {}", if edu_ok && nvme_ok { "passed" } else { "FAILED" });
        edu_ok && nvme_ok
    });
    result.unwrap_or_else(|| {
        log::error!(target: "iommu", "sharept test: no IOMMU");
        false
    })
}

/// The bytes of the EPT morsel, read or written through the identity map.
fn bytes(m: &Morsel<Ept>, offset: u64) -> *mut u8 {
    m.translate(offset, &IDENTITY).map_or(core::ptr::null_mut(), |p| p.as_u64() as *mut u8)
}

fn fill(m: &Morsel<Ept>, f: impl Fn(u64) -> u8) {
    for o in 0..m.len() {
        // SAFETY: `o` is inside the morsel, whose data frames we own and identity-map.
        unsafe { bytes(m, o).write_volatile(f(o)) };
    }
}

/// Offsets where the morsel differs from `want`, and the first of them.
fn differs(m: &Morsel<Ept>, want: impl Fn(u64) -> u8) -> (u64, Option<u64>) {
    let (mut n, mut first) = (0, None);
    for o in 0..m.len() {
        // SAFETY: as in `fill`; volatile: a device may have written it.
        if unsafe { bytes(m, o).read_volatile() } != want(o) {
            n += 1;
            first.get_or_insert(o);
        }
    }
    (n, first)
}

/// Whether the faults since the last poll include one by `bdf` at the page of `iova`.
fn fault_at(d: &mut Devices, bdf: Bdf, iova: u64) -> bool {
    d.iommu.poll_faults().iter().any(|f| f.source == bdf && f.address == iova & !0xfff)
}

/// Mounts `m` at each `(iova, perm)` in `bdf`'s domain through `Unit::mount` and invalidates
/// once; true if each mount took the EPT subtree itself (no view built).
fn mount_all(d: &mut Devices, bdf: Bdf, m: &Morsel<Ept>, views: &mut Views, at: &[(u64, Perm)]) -> bool {
    let frames = &Frames::here();
    let mut flush = Flush::none();
    for &(iova, perm) in at {
        match d.iommu.mount(bdf, m, views, iova, perm, frames) {
            Ok((stats, how, f)) => {
                flush.merge(f);
                log::info!(target: "iommu",
                    "sharept test: EPT morsel of {} (root L{} table at {:#x}) mounted {perm} into device {bdf} at I/O virtual address {iova:#x}: {} PTE write (+{}), {how}",
                    formats::units::Bytes(m.len()), m.root_level(), m.root().as_u64(), stats.entry_writes, stats.path_writes)
            }
            Err(e) => {
                log::error!(target: "iommu", "sharept test: mount into device {bdf} at {iova:#x} failed: {e:?}");
                let _ = flush.commit(&mut Hw(Some(d)));
                return false;
            }
        }
    }
    let invalidated = flush.commit(&mut Hw(Some(&mut *d))).ok();
    // A view would mean the IOMMU walks copies, not the EPT subtree this test is about.
    let shared = views.vtd.is_none() && views.amd.is_none() && views.amd_ro.is_none() && views.ept.is_none();
    log::info!(target: "iommu", "sharept test: the EPT subtree itself was mounted (no VT-d view): {}", if shared { "yes" } else { "NO" });
    invalidated && shared
}

fn unmount_all(d: &mut Devices, bdf: Bdf, m: &Morsel<Ept>, views: &mut Views, at: &[(u64, Perm)]) -> bool {
    let frames = &Frames::here();
    let mut flush = Flush::none();
    let mut ok = true;
    for &(iova, _) in at {
        match d.iommu.unmount(bdf, m, views, iova, frames) {
            Ok((_, f)) => flush.merge(f),
            Err(_) => ok = false,
        }
    }
    // One invalidation for all of them (none owed if every unmount failed).
    flush.commit(&mut Hw(Some(d))).ok() && ok
}

/// The raw EPT leaf the unit reads for the morsel's first page (root L1 or L2 table, entry 0).
fn first_leaf(m: &Morsel<Ept>) -> u64 {
    morsel::PhysMem::read(&IDENTITY, m.root(), 0)
}

/// edu through a 16 KiB EPT morsel of 4 KiB pages.
fn sharept_edu(d: &mut Devices) -> bool {
    let frames = &Frames::here();
    let Some(bdf) = d.edu.as_ref().map(|e| e.bdf) else {
        log::error!(target: "iommu", "sharept test: no edu device");
        return false;
    };
    let m = match Morsel::<Ept>::create(EDU_MORSEL, PageSize::Size4K, frames, &IDENTITY) {
        Ok(m) => m,
        Err(e) => {
            log::error!(target: "iommu", "sharept test: EPT morsel: {e}");
            return false;
        }
    };
    let pattern = |o: u64| (o * 7 + (o >> 12) * 13 + 1) as u8;
    fill(&m, pattern);
    let leaf = first_leaf(&m);
    log::info!(target: "iommu", "sharept test: EPT leaf of page 0: {leaf:#x} (R {}, W {}, X {}, memory type {} in bits 5:3, ignore-PAT {})",
        leaf & 1, leaf >> 1 & 1, leaf >> 2 & 1, leaf >> 3 & 7, leaf >> 6 & 1);
    let mut views = Views::default();
    let at = [(EDU_RW, Perm::RW), (EDU_RO, Perm::RO)];
    let mut ok = mount_all(d, bdf, &m, &mut views, &at);
    // What the morsel must hold: the pattern, then the two allowed copies.
    let mut want: Vec<u8> = (0..EDU_MORSEL).map(pattern).collect();
    let dma = |d: &mut Devices, to_device: bool, iova: u64| d.edu.as_mut().map(|e| e.dma(to_device, iova, TEST_LEN).is_ok()) == Some(true);
    if ok {
        // Page 1 into the device through the read-write mount, out to page 2.
        let copied = dma(d, true, EDU_RW + 0x1000) && dma(d, false, EDU_RW + 0x2000);
        want.copy_within(0x1000..0x1000 + TEST_LEN as usize, 0x2000);
        // Page 3 into the device through the read-only mount (reads are allowed), out to page 0.
        let copied = copied && dma(d, true, EDU_RO + 0x3000) && dma(d, false, EDU_RW);
        want.copy_within(0x3000..0x3000 + TEST_LEN as usize, 0);
        let faulted = faults_of(d, bdf);
        let (n, first) = differs(&m, |o| want[o as usize]);
        log::info!(target: "iommu", "sharept test: edu DMA through the EPT subtree both ways ({TEST_LEN} bytes page 1 -> device -> page 2, page 3 via the read-only mount -> page 0): {}, faults: {}",
            if copied && n == 0 { "bytes match".into() } else { alloc::format!("MISMATCH at {n} bytes (first at offset {first:?})") },
            if faulted { "UNEXPECTED" } else { "none" });
        ok = copied && n == 0 && !faulted;
        // Past the morsel's end (inside the window: the EPT L1 entry 4 is not present).
        let _ = dma(d, false, EDU_RW + EDU_MORSEL);
        let past_end = fault_at(d, bdf, EDU_RW + EDU_MORSEL);
        // A write through the read-only mount.
        let _ = dma(d, false, EDU_RO + 0x1000);
        let read_only = fault_at(d, bdf, EDU_RO + 0x1000);
        let (n, _) = differs(&m, |o| want[o as usize]);
        log::info!(target: "iommu", "sharept test: edu DMA past the EPT morsel's end ({:#x}) blocked and reported: {}; write through the read-only mount ({:#x}) blocked and reported: {}; morsel {}",
            EDU_RW + EDU_MORSEL, yes(past_end), EDU_RO + 0x1000, yes(read_only), if n == 0 { "unchanged" } else { "CHANGED" });
        ok &= past_end && read_only && n == 0;
    }
    ok &= unmount_all(d, bdf, &m, &mut views, &at);
    // After the unmount and its one invalidation, the window is gone for the device too.
    let _ = dma(d, false, EDU_RW);
    let gone = fault_at(d, bdf, EDU_RW);
    let (n, _) = differs(&m, |o| want[o as usize]);
    log::info!(target: "iommu", "sharept test: edu DMA to {EDU_RW:#x} after the unmount blocked and reported: {}; morsel {}", yes(gone), if n == 0 { "unchanged" } else { "CHANGED" });
    ok &= gone && n == 0;
    destroy(m);
    ok
}

/// The NVMe controller reads the disk into a 4 MiB EPT morsel of 2 MiB pages.
fn sharept_nvme(d: &mut Devices) -> bool {
    let frames = &Frames::here();
    let Some(bdf) = d.nvme.as_ref().map(|n| n.bdf) else { return false };
    let m = match Morsel::<Ept>::create(NVME_MORSEL, PageSize::Size2M, frames, &IDENTITY) {
        Ok(m) => m,
        Err(e) => {
            log::error!(target: "iommu", "sharept test: EPT morsel: {e}");
            return false;
        }
    };
    fill(&m, |_| 0x77);
    let leaf = first_leaf(&m);
    log::info!(target: "iommu", "sharept test: EPT 2 MiB leaf of page 0: {leaf:#x} (R {}, W {}, X {}, memory type {}, large page {})",
        leaf & 1, leaf >> 1 & 1, leaf >> 2 & 1, leaf >> 3 & 7, leaf >> 7 & 1);
    let iova = super::nvme::PROXY_IOVA.next_multiple_of(m.window_size());
    let mut views = Views::default();
    let io = |d: &mut Devices, at: u64, blocks: u64| d.nvme.map(|n| n.io(false, at, 0, blocks));
    let rw = [(iova, Perm::RW)];
    let mut ok = mount_all(d, bdf, &m, &mut views, &rw);
    if ok {
        let read = matches!(io(d, iova, NVME_MORSEL / BLOCK), Some(Ok(_)));
        let faulted = faults_of(d, bdf);
        let (n, first) = differs(&m, disk_byte);
        log::info!(target: "iommu", "sharept test: NVMe read {} from LBA 0 through the EPT subtree: {}, faults: {}",
            formats::units::Bytes(NVME_MORSEL),
            if read && n == 0 { "matches the disk pattern".into() } else { alloc::format!("MISMATCH at {n} bytes (first at offset {first:?}), read {read}") },
            if faulted { "UNEXPECTED" } else { "none" });
        ok = read && n == 0 && !faulted;
        // 8 blocks from 2 KiB before the end: the last 2 KiB land past it (EPT L2 entry 2).
        let r = io(d, iova + NVME_MORSEL - 4 * BLOCK, 8);
        let past_end = fault_at(d, bdf, iova + NVME_MORSEL);
        log::info!(target: "iommu", "sharept test: NVMe read past the EPT morsel's end ({:#x}) blocked and reported: {} (command {})",
            iova + NVME_MORSEL, yes(past_end), if matches!(r, Some(Ok(_))) { "completed" } else { "failed" });
        ok &= past_end;
    }
    ok &= unmount_all(d, bdf, &m, &mut views, &rw);
    let ro = [(iova, Perm::RO)];
    fill(&m, |_| 0x77);
    if ok && mount_all(d, bdf, &m, &mut views, &ro) {
        let r = io(d, iova, 8);
        let read_only = fault_at(d, bdf, iova);
        let (n, _) = differs(&m, |_| 0x77);
        log::info!(target: "iommu", "sharept test: NVMe read into the read-only mount ({iova:#x}) blocked and reported: {} (command {}); morsel {}",
            yes(read_only), if matches!(r, Some(Ok(_))) { "completed" } else { "failed" }, if n == 0 { "unchanged" } else { "CHANGED" });
        ok &= read_only && n == 0;
        ok &= unmount_all(d, bdf, &m, &mut views, &ro);
    } else {
        ok = false;
    }
    destroy(m);
    ok
}

/// Byte `o` of a fresh scenario disk image: little-endian word i is
/// `i * 0x9e3779b97f4a7c15 ^ 0xd15c0de5eed` (xtask/src/disk.rs).
fn disk_byte(o: u64) -> u8 {
    let word = (o / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd15_c0de_5eed;
    (word >> (8 * (o % 8))) as u8
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

fn destroy(m: Morsel<Ept>) {
    let frames = &Frames::here();
    if let Err((_, e)) = m.destroy(frames, &IDENTITY) {
        log::error!(target: "iommu", "sharept test: EPT morsel cannot be destroyed: {e}");
    }
}
