//! One Intel VT-d remapping unit: its registers, the root and context tables, turning
//! translation on, context-cache and IOTLB invalidation (queued where the unit offers it,
//! ECAP.QI, else register-based), and the fault recording registers. Devices without a
//! context entry are blocked once translation is on.

use allocator::Order;
use super::domain::Domain;
use super::{Error, Fault, Iommu, Views};
use crate::mm::frames::{Frames, IDENTITY};
use formats::mmio::Mmio;
use formats::vtd_qi::{self, Descriptor, Scope};
use crate::devices::pci::Bdf;
use alloc::vec::Vec;
use morsel::{HostPhysAddr, Morsel, Perm, PhysMem, SecondLevelTable, VtdSl};

/// Register offsets (VT-d spec 10.4).
const VER: u64 = 0x00;
const CAP: u64 = 0x08;
const ECAP: u64 = 0x10;
const GCMD: u64 = 0x18;
const GSTS: u64 = 0x1c;
const RTADDR: u64 = 0x20;
const CCMD: u64 = 0x28;
const FSTS: u64 = 0x34;
const FECTL: u64 = 0x38;
/// Invalidation queue head, tail and address registers (VT-d spec 10.4.23-25).
const IQH: u64 = 0x80;
const IQT: u64 = 0x88;
const IQA: u64 = 0x90;

/// GCMD/GSTS bits (VT-d spec 10.4.4, 10.4.5): translation enable, set root table pointer,
/// write buffer flush; the persistent ones a GCMD write must repeat.
const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;
const GCMD_WBF: u32 = 1 << 27;
/// Queued invalidation enable, GCMD/GSTS bit 26 (VT-d spec 10.4.4).
const GCMD_QIE: u32 = 1 << 26;
const GCMD_PERSISTENT: u32 = GCMD_TE | 1 << 26 | 1 << 25 | 1 << 23;

/// CCMD: ICC bit 63 (busy), CIRG 62:61 = 1 global (VT-d spec 10.4.7).
const CCMD_ICC: u64 = 1 << 63;
const CCMD_GLOBAL: u64 = 1 << 61;
/// IOTLB_REG: IVT bit 63 (busy), IIRG 61:60 = 1 global / 2 domain, DR 49, DW 48, DID 47:32
/// (VT-d spec 10.4.8.1).
const IOTLB_IVT: u64 = 1 << 63;
const IOTLB_GLOBAL: u64 = 1 << 60;
const IOTLB_DOMAIN: u64 = 2 << 60;
const IOTLB_DRAIN: u64 = 1 << 49 | 1 << 48;

/// FSTS: primary fault overflow bit 0, primary pending fault bit 1 (VT-d spec 10.4.9).
const FSTS_PFO: u32 = 1 << 0;
/// FSTS: invalidation queue error bit 4 (VT-d spec 10.4.9): a descriptor the unit rejected.
const FSTS_IQE: u32 = 1 << 4;
/// FECTL: interrupt mask bit 31 (VT-d spec 10.4.10): faults are polled, not signalled.
const FECTL_IM: u32 = 1 << 31;

/// Root and context entries: present bit 0 (VT-d spec 9.1, 9.3).
const PRESENT: u64 = 1;

/// Page-table stores as the remapping hardware must see them: with a cache-line flush where
/// its walks are not coherent with the CPU caches (ECAP.C = 0, VT-d spec 10.4.3).
#[derive(Clone, Copy)]
pub struct VtdMem {
    pub coherent: bool,
}

impl PhysMem for VtdMem {
    fn read(&self, table: HostPhysAddr, index: usize) -> u64 {
        IDENTITY.read(table, index)
    }
    fn write(&self, table: HostPhysAddr, index: usize, value: u64) {
        IDENTITY.write(table, index, value);
        if !self.coherent {
            // SAFETY: the entry's address is identity-mapped RAM; clflush has no other effect.
            unsafe { core::arch::x86_64::_mm_clflush((table.as_u64() + 8 * index as u64) as *const u8) };
        }
    }
    fn zero_table(&self, table: HostPhysAddr) {
        IDENTITY.zero_table(table);
        if !self.coherent {
            for line in (0..4096).step_by(64) {
                // SAFETY: as above, for each line of the table frame.
                unsafe { core::arch::x86_64::_mm_clflush((table.as_u64() + line) as *const u8) };
            }
        }
    }
    fn zero_data(&self, frame: HostPhysAddr, order: u32) {
        IDENTITY.zero_data(frame, order)
    }
}

/// A remapping unit with its tables and domains.
pub struct Vtd {
    /// The unit's 4 KiB register page.
    regs: Mmio,
    cap: u64,
    ecap: u64,
    /// Second-level table depth of every domain (3 or 4).
    pub levels: u8,
    root: HostPhysAddr,
    /// Context tables by bus.
    context: Vec<(u8, HostPhysAddr)>,
    pub domains: Vec<Domain>,
    gcmd: u32,
    pub mem: VtdMem,
    /// Faults seen so far.
    pub faults_seen: u64,
    pub invalidations: u64,
    /// The invalidation queue, once queued invalidation is on.
    queue: Option<Queue>,
    /// `iommu=sharept`: an NPT morsel reaches a domain through its EPT twin's own subtree
    /// (`iommu::mount`), not through a VT-d view.
    pub share_ept: bool,
}

/// The invalidation queue (VT-d spec 6.5.2): one 4 KiB page of 256 descriptors, and a status
/// word the unit writes when a wait descriptor completes.
struct Queue {
    base: HostPhysAddr,
    /// Next free slot (the software tail).
    tail: u64,
    status: HostPhysAddr,
    /// Status data of the last wait descriptor.
    seq: u32,
}

/// Queue size: 2^0 pages.
const QUEUE_QS: u8 = 0;

impl Vtd {
    /// Reads the capabilities of the unit at `base` and builds an empty root table.
    pub fn new(base: u64) -> Result<Vtd, Error> {
        let frames = &Frames::here();
        // SAFETY: the DMAR names `base` as the unit's 4 KiB register page (VT-d spec 8.3),
        // not RAM.
        let regs = unsafe { Mmio::new(base, 4096) }.ok_or(Error::BadBase(base))?;
        let mut v = Vtd { regs, cap: 0, ecap: 0, levels: 0, root: HostPhysAddr::new(0), context: Vec::new(),
            domains: Vec::new(), gcmd: 0, mem: VtdMem { coherent: true }, faults_seen: 0, invalidations: 0, queue: None, share_ept: false };
        v.cap = v.regs.read64(CAP);
        v.ecap = v.regs.read64(ECAP);
        // SAGAW bits 12:8: bit 1 = 39-bit 3-level, bit 2 = 48-bit 4-level (VT-d spec 10.4.2).
        let sagaw = v.cap >> 8 & 0x1f;
        v.levels = if sagaw & 4 != 0 { 4 } else if sagaw & 2 != 0 { 3 } else { return Err(Error::NoLevels(sagaw)) };
        // ECAP.C bit 0: page walks snoop the CPU caches (VT-d spec 10.4.3).
        v.mem.coherent = v.ecap & 1 != 0;
        v.gcmd = v.regs.read32(GSTS) & GCMD_PERSISTENT;
        v.root = frames.alloc_zeroed(Order::BASE).ok_or(Error::NoMemory)?;
        let ver = v.regs.read32(VER);
        log::info!(target: "iommu", "VT-d unit at {base:#x}: version {}.{}, {} domains, MGAW {} bits, SAGAW {sagaw:#x} -> {}-level tables, {} fault records, coherent walks {}, caching mode {}",
            ver >> 4 & 0xf, ver & 0xf, self::domains(v.cap), (v.cap >> 16 & 0x3f) + 1, v.levels,
            (v.cap >> 40 & 0xff) + 1, v.mem.coherent, v.cap >> 7 & 1 == 1);
        Ok(v)
    }

    /// Points the unit at the root table, turns queued invalidation on where the unit offers
    /// it (ECAP.QI bit 1, VT-d spec 10.4.3) unless `register_only`, invalidates everything,
    /// and turns translation on: from now on a device without a context entry cannot reach
    /// memory.
    pub fn enable(&mut self, register_only: bool) -> Result<(), Error> {
        self.regs.write32(FECTL, FECTL_IM);
        self.regs.write64(RTADDR, self.root.as_u64());
        self.command(GCMD_SRTP, true, "set root table pointer")?;
        if self.ecap >> 1 & 1 == 0 {
            log::info!(target: "iommu", "invalidation: register-based (the unit has no queued invalidation)");
        } else if register_only {
            log::info!(target: "iommu", "invalidation: register-based (iommu=register)");
        } else {
            self.enable_queue()?;
        }
        self.invalidate_all()?;
        self.write_buffer_flush()?;
        self.gcmd |= GCMD_TE;
        self.command(GCMD_TE, true, "translation enable")?;
        log::info!(target: "iommu", "translation enabled: root table at {:#x}, devices without a domain are blocked", self.root.as_u64());
        Ok(())
    }

    /// Writes GCMD with `bit` (plus the persistent bits) and waits until GSTS shows it `set`.
    fn command(&mut self, bit: u32, set: bool, what: &'static str) -> Result<(), Error> {
        self.regs.write32(GCMD, self.gcmd | bit);
        for _ in 0..1_000_000 {
            if (self.regs.read32(GSTS) & bit != 0) == set {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(Error::Timeout(what))
    }

    /// CAP.RWBF bit 4: the unit needs a write-buffer flush after table updates (VT-d spec 6.8).
    fn write_buffer_flush(&mut self) -> Result<(), Error> {
        if self.cap >> 4 & 1 == 0 {
            return Ok(());
        }
        self.regs.write32(GCMD, self.gcmd | GCMD_WBF);
        for _ in 0..1_000_000 {
            if self.regs.read32(GSTS) & GCMD_WBF == 0 {
                return Ok(());
            }
        }
        Err(Error::Timeout("write buffer flush"))
    }

    /// Sets up the invalidation queue (VT-d spec 6.5.2: IQT = 0, IQA, then GCMD.QIE and wait
    /// for GSTS.QIES). From then on the register-based interface must not be used.
    fn enable_queue(&mut self) -> Result<(), Error> {
        let frames = &Frames::here();
        let base = frames.alloc_zeroed(Order::BASE).ok_or(Error::NoMemory)?;
        let status = frames.alloc_zeroed(Order::BASE).ok_or(Error::NoMemory)?;
        self.regs.write64(IQT, 0);
        self.regs.write64(IQA, vtd_qi::iqa(base.as_u64(), QUEUE_QS));
        self.gcmd |= GCMD_QIE;
        self.command(GCMD_QIE, true, "queued invalidation enable")?;
        self.queue = Some(Queue { base, tail: 0, status, seq: 0 });
        log::info!(target: "iommu", "invalidation: queued (queue of {} descriptors at {:#x}, completion by invalidation wait descriptor with status write)",
            vtd_qi::entries(QUEUE_QS), base.as_u64());
        Ok(())
    }

    /// Queues `descs` followed by an invalidation wait descriptor, moves the tail, and polls
    /// until the unit has written the wait's status (every descriptor before it is done).
    fn submit(&mut self, descs: &[Descriptor]) -> Result<(), Error> {
        let regs = &self.regs;
        let Some(q) = self.queue.as_mut() else { return Err(Error::Timeout("invalidation queue (not on)")) };
        let n = vtd_qi::entries(QUEUE_QS);
        q.seq = q.seq.wrapping_add(1);
        let status = q.status.as_u64() as *mut u32;
        // SAFETY: the status frame is ours and identity-mapped; the unit writes it by DMA.
        unsafe { core::ptr::write_volatile(status, 0) };
        for d in descs.iter().chain(core::iter::once(&vtd_qi::wait(q.status.as_u64(), q.seq))) {
            let at = q.base.as_u64() + vtd_qi::slot_offset(q.tail);
            // SAFETY: slot `tail` lies inside the queue page we own; the unit reads it only
            // once the tail register moves past it.
            unsafe {
                core::ptr::write_volatile(at as *mut u64, d.lo);
                core::ptr::write_volatile((at + 8) as *mut u64, d.hi);
            }
            if !self.mem.coherent {
                // SAFETY: as above; clflush of our own line.
                unsafe { core::arch::x86_64::_mm_clflush(at as *const u8) };
            }
            q.tail = (q.tail + 1) % n;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        regs.write64(IQT, vtd_qi::slot_offset(q.tail));
        for _ in 0..1_000_000 {
            // SAFETY: as above.
            if unsafe { core::ptr::read_volatile(status) } == q.seq {
                return Ok(());
            }
            if regs.read32(FSTS) & FSTS_IQE != 0 {
                let head = regs.read64(IQH);
                regs.write32(FSTS, FSTS_IQE);
                return Err(Error::QueueRejected(head));
            }
            core::hint::spin_loop();
        }
        Err(Error::Timeout("invalidation wait"))
    }

    /// Global context-cache and IOTLB invalidation.
    fn invalidate_all(&mut self) -> Result<(), Error> {
        if self.queue.is_some() {
            self.invalidations += 1;
            return self.submit(&[vtd_qi::context(Scope::Global), vtd_qi::iotlb(Scope::Global)]);
        }
        self.regs.write64(CCMD, CCMD_ICC | CCMD_GLOBAL);
        self.wait64(CCMD, CCMD_ICC, "context-cache invalidation")?;
        self.iotlb(IOTLB_GLOBAL)
    }

    /// IOTLB invalidation with `granularity` (and domain id); ECAP.IRO bits 17:8 locate the
    /// IOTLB registers in units of 16 bytes (VT-d spec 10.4.3).
    fn iotlb(&mut self, granularity: u64) -> Result<(), Error> {
        let reg = ((self.ecap >> 8) & 0x3ff) * 16 + 8;
        self.regs.write64(reg, IOTLB_IVT | IOTLB_DRAIN | granularity);
        self.invalidations += 1;
        self.wait64(reg, IOTLB_IVT, "IOTLB invalidation")
    }

    fn wait64(&self, reg: u64, busy: u64, what: &'static str) -> Result<(), Error> {
        for _ in 0..1_000_000 {
            if self.regs.read64(reg) & busy == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(Error::Timeout(what))
    }

    /// Drops the cached translations of one domain (after a mount or unmount in its table).
    pub fn flush_domain(&mut self, id: u16) -> Result<(), Error> {
        self.write_buffer_flush()?;
        if self.queue.is_some() {
            self.invalidations += 1;
            return self.submit(&[vtd_qi::iotlb(Scope::Domain(id))]);
        }
        self.iotlb(IOTLB_DOMAIN | (id as u64) << 32)
    }

    /// Gives `bdf` its own domain with an empty second-level table and writes its context
    /// entry (translated requests through the domain's table); returns the domain's index.
    pub fn attach(&mut self, bdf: Bdf) -> Result<usize, Error> {
        let frames = &Frames::here();
        if let Some(i) = self.domains.iter().position(|d| d.bdf == bdf) {
            return Ok(i);
        }
        // DID 0 stays unused (reserved in caching mode, VT-d spec 6.2.2).
        let id = self.domains.len() as u64 + 1;
        if id >= domains(self.cap) {
            return Err(Error::TooManyDomains);
        }
        let table = SecondLevelTable::<VtdSl>::with_levels(self.levels, frames, &self.mem).map_err(|_| Error::NoMemory)?;
        let ctx = match self.context.iter().find(|(b, _)| *b == bdf.bus) {
            Some(&(_, t)) => t,
            None => {
                let t = frames.alloc_zeroed(Order::BASE).ok_or(Error::NoMemory)?;
                // Root entry: 16 bytes per bus, context table pointer 63:12 | P (VT-d spec 9.1).
                self.mem.write(self.root, 2 * bdf.bus as usize + 1, 0);
                self.mem.write(self.root, 2 * bdf.bus as usize, t.as_u64() | PRESENT);
                self.context.push((bdf.bus, t));
                t
            }
        };
        // Context entry, 16 bytes per devfn (VT-d spec 9.3): high: AW 2:0 (1 = 3-level,
        // 2 = 4-level), DID 23:8; low: SLPTPTR 63:12, TT 3:2 = 0 (untranslated requests
        // through the second-level table), P. The high half first, then P.
        let aw = if self.levels == 4 { 2 } else { 1 };
        let i = 2 * bdf.devfn() as usize;
        self.mem.write(ctx, i + 1, aw | id << 8);
        self.mem.write(ctx, i, table.root().as_u64() | PRESENT);
        self.invalidate_all()?;
        log::info!(target: "iommu", "device {bdf}: domain {id}, {}-level second-level table at {:#x}",
            self.levels, table.root().as_u64());
        self.domains.push(Domain { id: id as u16, bdf, table });
        Ok(self.domains.len() - 1)
    }

    /// Gives back the tables that unmounts left empty in every domain (end of run), then
    /// flushes the IOTLB so no cached walk refers to them.
    pub fn prune_domains(&mut self) {
        let frames = &Frames::here();
        let mem = self.mem;
        let mut ids = Vec::new();
        for d in &mut self.domains {
            let n = d.table.prune(frames, &mem);
            if n > 0 {
                log::info!(target: "iommu", "domain {} (device {}): {n} empty tables given back", d.id, d.bdf);
                ids.push(d.id);
            }
        }
        for id in ids {
            let _ = self.flush_domain(id);
        }
    }

    pub fn domain_of(&mut self, bdf: Bdf) -> Option<&mut Domain> {
        self.domains.iter_mut().find(|d| d.bdf == bdf)
    }

    /// Reads, logs and clears every recorded fault (VT-d spec 7.1.3, 10.4.14).
    pub fn poll_faults(&mut self) -> Vec<Fault> {
        let mut out = Vec::new();
        let fsts = self.regs.read32(FSTS);
        let first = (self.cap >> 24 & 0x3ff) * 16;
        let count = (self.cap >> 40 & 0xff) + 1;
        for n in 0..count {
            let at = first + 16 * n;
            let high = self.regs.read64(at + 8);
            // High half: F bit 63, T bit 62 (0 = write), FR 39:32, SID 15:0.
            if high >> 63 == 0 {
                continue;
            }
            let low = self.regs.read64(at);
            let f = Fault { source: Bdf::from_source_id(high as u16), address: low & !0xfff, write: high >> 62 & 1 == 0 };
            let reason = (high >> 32) as u8;
            log::error!(target: "iommu", "DMA fault: device {}, address {:#x}, reason {reason} ({}), {}",
                f.source, f.address, reason_text(reason), if f.write { "write" } else { "read" });
            // F is write-1-to-clear.
            self.regs.write64(at + 8, 1 << 63);
            out.push(f);
        }
        if fsts & FSTS_PFO != 0 {
            log::error!(target: "iommu", "fault records overflowed: some faults were not recorded");
            self.regs.write32(FSTS, FSTS_PFO);
        }
        self.faults_seen += out.len() as u64;
        out
    }
}

/// CAP.ND bits 2:0: 2^(4 + 2 ND) domain ids (VT-d spec 10.4.2).
fn domains(cap: u64) -> u64 {
    1 << (4 + 2 * (cap & 7))
}

/// A fault reason's meaning (VT-d spec 7.1.3, table of non-recoverable fault reasons).
fn reason_text(reason: u8) -> &'static str {
    match reason {
        1 => "root entry not present",
        2 => "context entry not present",
        3 => "invalid context entry",
        4 => "address beyond the domain's address width",
        5 => "write to a page without write permission",
        6 => "page not present or not readable",
        7 => "error reading a second-level table",
        8 => "error reading the root table",
        9 => "error reading the context table",
        0xa..=0xc => "reserved bit set in a table entry",
        0xd => "blocked by the context entry's translation type",
        _ => "other",
    }
}

impl Iommu for Vtd {
    type Format = VtdSl;
    type Mem = VtdMem;
    const NAME: &'static str = "VT-d";

    fn mem(&self) -> VtdMem {
        self.mem
    }
    fn attach(&mut self, bdf: Bdf) -> Result<(), Error> {
        Vtd::attach(self, bdf).map(|_| ())
    }
    fn table(&mut self, bdf: Bdf) -> Option<&mut SecondLevelTable<VtdSl>> {
        self.domain_of(bdf).map(|d| &mut d.table)
    }
    fn invalidate(&mut self, bdf: Bdf) -> Result<(), Error> {
        let id = self.domain_of(bdf).ok_or(Error::NoDomain)?.id;
        self.flush_domain(id)
    }
    fn poll_faults(&mut self) -> Vec<Fault> {
        Vtd::poll_faults(self)
    }
    fn prune_domains(&mut self) {
        Vtd::prune_domains(self)
    }
    fn counters(&self) -> (u64, u64) {
        (self.faults_seen, self.invalidations)
    }
    /// One view for every mount: a VT-d walk grants only what every level's entry grants
    /// (VT-d spec 3.7, 9.8), and QEMU's VT-d walker ANDs them too, so the mount entry's
    /// limit holds.
    fn view_slot(views: &mut Views, _perm: Perm) -> (&mut Option<Morsel<VtdSl>>, Perm) {
        (&mut views.vtd, Perm::RWX)
    }
    fn shares_ept(&self) -> bool {
        self.share_ept
    }
}
