//! One AMD IOMMU (AMD I/O Virtualization Technology (IOMMU) Specification 48882), found
//! through the ACPI IVRS: its device table (every device id blocked until it gets a domain),
//! one domain per device with the IOMMU's own page-table format (`morsel::AmdV1`), the
//! command buffer (INVALIDATE_DEVTAB_ENTRY, INVALIDATE_IOMMU_PAGES, each batch closed by a
//! COMPLETION_WAIT the driver polls), and the event log, read for blocked DMA.

use allocator::Order;
use super::{Error, Fault, Iommu, Views};
use crate::mm::frames::{Frames, IDENTITY};
use crate::devices::pci::Bdf;
use alloc::vec::Vec;
use formats::amdvi::{self as fmt, Command, Event};
use formats::mmio::Mmio;
use morsel::{AmdV1, HostPhysAddr, Morsel, Perm, PhysMem, SecondLevelTable};

/// MMIO register offsets (spec 3.4): device table, command buffer and event log bases,
/// control; command/event head and tail pointers; status.
const DEVTAB_BASE: u64 = 0x0000;
const CMD_BASE: u64 = 0x0008;
const EVENT_BASE: u64 = 0x0010;
const CONTROL: u64 = 0x0018;
const EXT_FEATURES: u64 = 0x0030;
const CMD_HEAD: u64 = 0x2000;
const CMD_TAIL: u64 = 0x2008;
const EVENT_HEAD: u64 = 0x2010;
const EVENT_TAIL: u64 = 0x2018;
const STATUS: u64 = 0x2020;
/// The register window is 16 KiB (spec 3.4).
const MMIO_SIZE: u64 = 0x4000;

/// Control register bits (spec 3.4.4): IommuEn 0, EventLogEn 2, CmdBufEn 12.
const CONTROL_IOMMU_EN: u64 = 1 << 0;
const CONTROL_EVENT_LOG_EN: u64 = 1 << 2;
const CONTROL_CMD_BUF_EN: u64 = 1 << 12;
/// Status bit 0: event log overflow (spec 3.4.13), write 1 to clear.
const STATUS_EVENT_OVERFLOW: u64 = 1 << 0;

/// 256 commands of 16 bytes: one 4 KiB page.
const CMD_LOG2: u8 = 8;
/// 32768 events of 16 bytes (512 KiB, in a 2 MiB frame: the allocator hands out 4 KiB and 2 MiB frames). Far more than the hypervisor reads between
/// two polls; QEMU 7.2 also compares its byte tail against the entry count, so the log must
/// be this long to hold more than a few events there.
const EVENT_LOG2: u8 = 15;
const EVENT_ORDER: Order = Order::HUGE;
/// INVALIDATE_DEVTAB_ENTRY commands per batch at start-up: with its COMPLETION_WAIT well
/// under the 256 slots of the command buffer (a full ring would read as empty).
const INVALIDATE_BATCH: usize = 128;
/// Page-table depth of every domain: 4 levels, 48-bit I/O virtual addresses (DTE Mode 4).
const LEVELS: u8 = 4;

/// One device's domain.
pub struct AmdDomain {
    /// DomainID in the DTE and in INVALIDATE_IOMMU_PAGES (spec 2.2.2.1).
    pub id: u16,
    pub bdf: Bdf,
    pub table: SecondLevelTable<AmdV1>,
}

/// The unit with its tables and domains.
pub struct AmdVi {
    regs: Mmio,
    devtab: HostPhysAddr,
    /// The root table, all entries not present, of every blocked device-table entry.
    empty_root: HostPhysAddr,
    cmd: HostPhysAddr,
    /// Next command slot.
    cmd_tail: u64,
    events: HostPhysAddr,
    /// Next event slot to read.
    event_head: u64,
    /// Where COMPLETION_WAIT stores its data, and the last value asked for.
    completion: HostPhysAddr,
    seq: u64,
    pub domains: Vec<AmdDomain>,
    faults_seen: u64,
    invalidations: u64,
}

impl AmdVi {
    /// Sets up the unit at `base` (from the IVRS): a device table with every entry blocked,
    /// command buffer and event log, then turns it on. From then on a device without a
    /// domain cannot reach memory.
    pub fn new(base: u64) -> Result<AmdVi, Error> {
        let frames = &Frames::here();
        // SAFETY: the IVRS names `base` as the IOMMU's 16 KiB register window (spec 3.4),
        // not RAM.
        let regs = unsafe { Mmio::new(base, MMIO_SIZE) }.ok_or(Error::BadBase(base))?;
        // 65536 entries of 32 bytes: one 2 MiB frame. Each points at one shared root table
        // whose entries are all not present (`fmt::dte_blocked`).
        let devtab = frames.alloc_zeroed(Order::HUGE).ok_or(Error::NoMemory)?;
        let empty_root = frames.alloc_zeroed(Order::BASE).ok_or(Error::NoMemory)?;
        AmdMem.zero_table(empty_root);
        for id in 0..=u16::MAX as u64 {
            write_dte(devtab, id as u16, fmt::dte_blocked(empty_root.as_u64(), LEVELS));
        }
        let cmd = frames.alloc_zeroed(Order::BASE).ok_or(Error::NoMemory)?;
        let events = frames.alloc_zeroed(EVENT_ORDER).ok_or(Error::NoMemory)?;
        let completion = frames.alloc_zeroed(Order::BASE).ok_or(Error::NoMemory)?;
        let mut a = AmdVi { regs, devtab, empty_root, cmd, cmd_tail: 0, events, event_head: 0, completion, seq: 0,
            domains: Vec::new(), faults_seen: 0, invalidations: 0 };
        let efr = a.regs.read64(EXT_FEATURES);
        a.regs.write64(CONTROL, 0);
        a.regs.write64(DEVTAB_BASE, fmt::devtab_register(devtab.as_u64()));
        a.regs.write64(CMD_BASE, fmt::ring_register(cmd.as_u64(), CMD_LOG2));
        a.regs.write64(EVENT_BASE, fmt::ring_register(events.as_u64(), EVENT_LOG2));
        a.regs.write64(CMD_HEAD, 0);
        a.regs.write64(CMD_TAIL, 0);
        a.regs.write64(EVENT_HEAD, 0);
        a.regs.write64(EVENT_TAIL, 0);
        a.regs.write64(STATUS, STATUS_EVENT_OVERFLOW);
        a.regs.write64(CONTROL, CONTROL_IOMMU_EN | CONTROL_EVENT_LOG_EN | CONTROL_CMD_BUF_EN);
        a.run(&[])?;
        // INVALIDATE_DEVTAB_ENTRY for every device id, as Linux does after enabling
        // (`iommu_flush_dte_all`). The spec needs none (nothing is cached yet), but QEMU 10.1
        // and later apply a device's entry only when this command names it: until then its DMA
        // passes through untranslated, whatever the table says.
        let mut batch = [Command([0, 0]); INVALIDATE_BATCH];
        for first in (0..=u16::MAX as usize).step_by(INVALIDATE_BATCH) {
            for (i, c) in batch.iter_mut().enumerate() {
                *c = fmt::invalidate_devtab_entry((first + i) as u16);
            }
            a.run(&batch)?;
        }
        log::info!(target: "iommu", "AMD-Vi unit at {base:#x}: extended features {efr:#x}, device table at {:#x} (65536 entries, all blocked: translated through an empty table, each invalidated), command buffer of {} entries, event log of {} entries",
            devtab.as_u64(), 1u32 << CMD_LOG2, 1u32 << EVENT_LOG2);
        log::info!(target: "iommu", "translation enabled: devices without a domain are blocked");
        Ok(a)
    }

    /// Writes `cmds` and a COMPLETION_WAIT into the command buffer, moves the tail, and polls
    /// until the unit has stored the wait's data (every command before it has completed).
    fn run(&mut self, cmds: &[Command]) -> Result<(), Error> {
        self.seq += 1;
        let done = self.completion.as_u64() as *mut u64;
        // SAFETY: the completion frame is ours and identity-mapped; the unit writes it.
        unsafe { core::ptr::write_volatile(done, 0) };
        let n = 1u64 << CMD_LOG2;
        for c in cmds.iter().chain(core::iter::once(&fmt::completion_wait(self.completion.as_u64(), self.seq))) {
            let at = self.cmd.as_u64() + 16 * self.cmd_tail;
            // SAFETY: slot `cmd_tail` lies in the command page we own; the unit reads it only
            // once the tail register moves past it.
            unsafe {
                core::ptr::write_volatile(at as *mut u64, c.0[0]);
                core::ptr::write_volatile((at + 8) as *mut u64, c.0[1]);
            }
            self.cmd_tail = (self.cmd_tail + 1) % n;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.regs.write64(CMD_TAIL, 16 * self.cmd_tail);
        for _ in 0..1_000_000 {
            // SAFETY: as above.
            if unsafe { core::ptr::read_volatile(done) } == self.seq {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(Error::Timeout("COMPLETION_WAIT"))
    }

    /// Gives `bdf` its own domain with an empty 4-level table and points its DTE at it.
    pub fn attach(&mut self, bdf: Bdf) -> Result<(), Error> {
        let frames = &Frames::here();
        if self.domains.iter().any(|d| d.bdf == bdf) {
            return Ok(());
        }
        // DomainID 0 stays unused.
        let id = u16::try_from(self.domains.len() + 1).map_err(|_| Error::TooManyDomains)?;
        let table = SecondLevelTable::<AmdV1>::with_levels(LEVELS, frames, &AmdMem).map_err(|_| Error::NoMemory)?;
        write_dte(self.devtab, bdf.source_id(), fmt::dte_translated(table.root().as_u64(), LEVELS, id));
        self.run(&[fmt::invalidate_devtab_entry(bdf.source_id()), fmt::invalidate_domain(id)])?;
        log::info!(target: "iommu", "device {bdf}: domain {id}, {LEVELS}-level AMD-Vi page table at {:#x}", table.root().as_u64());
        self.domains.push(AmdDomain { id, bdf, table });
        Ok(())
    }

    /// Points `bdf`'s device-table entry at the blocked entry every device without a domain
    /// has (`blocked`), or back at its domain, and invalidates it (`test=dma-nodomain`).
    pub fn set_blocked(&mut self, bdf: Bdf, blocked: bool) -> Result<(), Error> {
        let dte = if blocked {
            fmt::dte_blocked(self.empty_root.as_u64(), LEVELS)
        } else {
            let d = self.domains.iter().find(|d| d.bdf == bdf).ok_or(Error::NoDomain)?;
            fmt::dte_translated(d.table.root().as_u64(), LEVELS, d.id)
        };
        write_dte(self.devtab, bdf.source_id(), dte);
        self.run(&[fmt::invalidate_devtab_entry(bdf.source_id())])
    }

    /// Reads, logs and clears every event since the last call (spec 2.5); the page faults
    /// among them are returned, one per run of equal consecutive events (`fmt::coalesce`).
    pub fn poll_faults(&mut self) -> Vec<Fault> {
        let mut events = Vec::new();
        let n = 1u64 << EVENT_LOG2;
        // At most one pass over the log: a unit that kept writing could not hold us here.
        for _ in 0..n {
            let at = self.events.as_u64() + 16 * self.event_head;
            // SAFETY: slot `event_head` lies in the event log we own; the unit writes it.
            let raw = unsafe { [core::ptr::read_volatile(at as *const u64), core::ptr::read_volatile((at + 8) as *const u64)] };
            let Some(e) = Event::decode(raw) else { break };
            // SAFETY: as above; a read slot is zeroed so the next pass sees it empty.
            unsafe {
                core::ptr::write_volatile(at as *mut u64, 0);
                core::ptr::write_volatile((at + 8) as *mut u64, 0);
            }
            self.event_head = (self.event_head + 1) % n;
            events.push(e);
        }
        let mut out = Vec::new();
        for (e, count) in fmt::coalesce(events) {
            let source = Bdf::from_source_id(e.device_id);
            let times = Times(count);
            // RW flag, bit 5 of the flags (spec 2.5.3, IO_PAGE_FAULT).
            let write = e.flags & 1 << 5 != 0;
            if e.is_page_fault() {
                log::error!(target: "iommu", "DMA fault: device {source}, address {:#x}, reason {} (event log flags {:#05x}{times})",
                    e.address, e.name(), e.flags);
                out.push(Fault { source, address: e.address, write });
            } else {
                log::error!(target: "iommu", "IOMMU event {}: device {source}, address {:#x}, flags {:#05x}{times}", e.name(), e.address, e.flags);
            }
        }
        self.regs.write64(EVENT_HEAD, 16 * self.event_head);
        if self.regs.read64(STATUS) & STATUS_EVENT_OVERFLOW != 0 {
            log::error!(target: "iommu", "event log overflowed: some faults were not recorded");
            self.regs.write64(STATUS, STATUS_EVENT_OVERFLOW);
        }
        self.faults_seen += out.len() as u64;
        out
    }
}

/// How an empty entry of an AMD-Vi table is stored: not present (PR = 0), Next Level 1.
/// To the spec this is the same as 0: a walk stops at an entry with PR = 0 and reports an
/// IO_PAGE_FAULT (spec 2.2.3, 2.5.3), whatever else it holds. QEMU 7.2's walker, though,
/// ends the walk silently (the DMA fails, no event is logged) at an all-zero entry, and
/// reports only a PR = 0 entry that names a next level; with this marker a blocked DMA is
/// reported on both.
const EMPTY_MARKER: u64 = 1 << 9;

/// Table stores as the AMD IOMMU sees them: an empty entry (0 to the table code) is written
/// as `EMPTY_MARKER` and read back as 0. The IOMMU's walks snoop the CPU caches, so stores
/// need no flush.
#[derive(Clone, Copy)]
pub struct AmdMem;

impl PhysMem for AmdMem {
    fn read(&self, table: HostPhysAddr, index: usize) -> u64 {
        match IDENTITY.read(table, index) {
            EMPTY_MARKER => 0,
            raw => raw,
        }
    }
    fn write(&self, table: HostPhysAddr, index: usize, value: u64) {
        IDENTITY.write(table, index, if value == 0 { EMPTY_MARKER } else { value });
    }
    fn zero_table(&self, table: HostPhysAddr) {
        for i in 0..512 {
            IDENTITY.write(table, i, EMPTY_MARKER);
        }
    }
    fn zero_data(&self, frame: HostPhysAddr, order: u32) {
        IDENTITY.zero_data(frame, order)
    }
}

/// Writes DTE `id`: quadwords 3..1 first, quadword 0 (with V and TV) last.
fn write_dte(devtab: HostPhysAddr, id: u16, dte: fmt::Dte) {
    let at = devtab.as_u64() + 32 * id as u64;
    for q in (0..4).rev() {
        // SAFETY: the device table is a 2 MiB frame we own, identity-mapped; entry `id` lies
        // inside it.
        unsafe { core::ptr::write_volatile((at + 8 * q) as *mut u64, dte[q as usize]) };
    }
}

impl Iommu for AmdVi {
    type Format = AmdV1;
    type Mem = AmdMem;
    const NAME: &'static str = "AMD-Vi";

    fn mem(&self) -> AmdMem {
        AmdMem
    }
    fn attach(&mut self, bdf: Bdf) -> Result<(), Error> {
        AmdVi::attach(self, bdf)
    }
    fn table(&mut self, bdf: Bdf) -> Option<&mut SecondLevelTable<AmdV1>> {
        self.domains.iter_mut().find(|d| d.bdf == bdf).map(|d| &mut d.table)
    }
    fn invalidate(&mut self, bdf: Bdf) -> Result<(), Error> {
        let id = self.domains.iter().find(|d| d.bdf == bdf).ok_or(Error::NoDomain)?.id;
        self.invalidations += 1;
        self.run(&[fmt::invalidate_domain(id)])
    }
    fn poll_faults(&mut self) -> Vec<Fault> {
        AmdVi::poll_faults(self)
    }
    fn prune_domains(&mut self) {
        let frames = &Frames::here();
        let mut ids = Vec::new();
        for d in &mut self.domains {
            let n = d.table.prune(frames, &AmdMem);
            if n > 0 {
                log::info!(target: "iommu", "domain {} (device {}): {n} empty tables given back", d.id, d.bdf);
                ids.push(d.id);
            }
        }
        for id in ids {
            self.invalidations += 1;
            let _ = self.run(&[fmt::invalidate_domain(id)]);
        }
    }
    fn counters(&self) -> (u64, u64) {
        (self.faults_seen, self.invalidations)
    }
    fn view_slot(views: &mut Views, perm: Perm) -> (&mut Option<Morsel<AmdV1>>, Perm) {
        if perm.write {
            (&mut views.amd, Perm::RWX)
        } else {
            (&mut views.amd_ro, Perm::RO)
        }
    }
}

/// ", N events" for a run of N > 1 equal events in a fault line; nothing for one (no
/// allocation per fault: a guest can cause DMA faults).
struct Times(u32);

impl core::fmt::Display for Times {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            0 | 1 => Ok(()),
            n => write!(f, ", {n} events"),
        }
    }
}
