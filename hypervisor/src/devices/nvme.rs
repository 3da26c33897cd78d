//! A minimal NVMe driver (NVMe base spec 1.4): the admin queue, one I/O queue pair per CPU,
//! identify, and batches of reads or writes (many commands in flight). Completions come by
//! MSI-X interrupt where the device offers it (one table entry per I/O completion queue, to
//! the CPU that owns the pair; that CPU halts while its batch is out and re-reads the queue
//! after every wake-up), else (or with `nvme=poll`) they are polled. Every address the controller sees is an I/O virtual
//! address of its VT-d domain: its queues and PRP list page are mapped there at their
//! host-physical address, and the proxy mounts the caller's morsel at `PROXY_IOVA`, so the
//! data pointers (PRPs) are IOVAs inside the morsel.
//!
//! Sharing: after `new` the driver is leaked (`Devices::nvme` is a `&'static Nvme`), so a
//! CPU runs its batch with the world lock let go (`morsels::DiskBatch`, a call's deferred part) while
//! other CPUs handle their exits. Everything a batch changes is its own CPU's or atomic:
//! each I/O queue pair (ring indices, slot owners, PRP list pages) sits behind its own spin
//! lock, held for the whole batch; a CPU uses the pair whose MSI-X entry targets it, so the
//! lock is uncontended unless the controller granted fewer pairs than there are CPUs (then the
//! CPUs without one share the first pair and take turns on it). The counters and the
//! `broken` flag are atomics; the admin queue is used only by `new`, before the driver is
//! shared. The doorbells of different pairs are different registers.

use allocator::Order;
use crate::mm::frames::Frames;
use crate::iommu::Unit;
use formats::mmio::Mmio;
use formats::units::Bytes;
use crate::devices::pci::{Bdf, Msix};
use crate::arch::idt::DEVICE_VECTOR;
use alloc::vec::Vec;
use morsel::{HostPhysAddr, Perm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Class code 01 08 02: mass storage, non-volatile memory, NVM Express (PCI code and ID spec).
pub const CLASS: u32 = 0x01_08_02;
/// Where the proxy mounts a morsel in the NVMe domain: above the driver's own pages, which are
/// mapped at their host-physical addresses (RAM below 64 GiB).
pub const PROXY_IOVA: u64 = 1 << 36;
const BLOCK: u64 = abi::NVME_BLOCK;
const PAGE: u64 = 4096;

/// Controller registers (NVMe 1.4, 3.1).
const CAP: u64 = 0x00;
const VS: u64 = 0x08;
const CC: u64 = 0x14;
const CSTS: u64 = 0x1c;
const AQA: u64 = 0x24;
const ASQ: u64 = 0x28;
const ACQ: u64 = 0x30;
const DOORBELLS: u64 = 0x1000;
/// CC: EN bit 0, IOSQES 19:16 = 6 (64-byte entries), IOCQES 23:20 = 4 (16-byte entries),
/// MPS 10:7 = 0 (4 KiB pages), CSS 6:4 = 0 (NVM command set) (NVMe 1.4, 3.1.5).
const CC_EN: u32 = 1;
const CC_QUEUE_SIZES: u32 = 6 << 16 | 4 << 20;
/// CSTS: RDY bit 0, CFS (fatal) bit 1 (NVMe 1.4, 3.1.6).
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 2;

/// Admin opcodes (NVMe 1.4, 5): create I/O SQ/CQ, identify; NVM opcodes (6): write, read.
const OP_CREATE_SQ: u8 = 0x01;
const OP_CREATE_CQ: u8 = 0x05;
const OP_IDENTIFY: u8 = 0x06;
const OP_SET_FEATURES: u8 = 0x09;
/// Set Features: feature 07h, Number of Queues (NVMe 1.4, 5.21.1.7).
const FID_QUEUES: u32 = 0x07;
const OP_WRITE: u8 = 0x01;
const OP_READ: u8 = 0x02;

const ADMIN_ENTRIES: u16 = 16;
/// I/O queue entries (one 4 KiB page of 64-byte entries: the allocator hands out 4 KiB or
/// 2 MiB frames, and QEMU wants queues physically contiguous): up to 63 commands in flight.
const IO_ENTRIES: u16 = 64;
/// At most this many I/O queue pairs (one per CPU).
const MAX_IO_QUEUES: usize = 64;
/// Longest transfer per command (also capped by MDTS): 512 KiB = 128 pages, one PRP list page.
const MAX_CHUNK: u64 = 512 << 10;
const TIMEOUT_US: u64 = 5_000_000;
/// The longest halt while interrupt-driven commands are out (where the CPU has no periodic
/// timer): a lost interrupt costs at most this before the queue is read again.
const HALT_BACKSTOP_US: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// The blocks lie beyond the namespace.
    Range,
    /// A bad argument (zero count, misaligned address).
    Invalid,
    /// The controller reported this status (SCT << 8 | SC), or 0xffff for a timeout.
    Device(u16),
}

/// One request of a batch: `blocks` blocks between `lba` and I/O virtual address `iova`
/// (block aligned); split into commands of at most the controller's transfer size.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub iova: u64,
    pub lba: u64,
    pub blocks: u64,
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchStats {
    pub commands: u64,
    /// The most commands the controller held at once (the queue depth reached).
    pub max_depth: u64,
    pub us: u64,
    /// Completion interrupts this CPU took during the batch, and the halts it waited in
    /// (both 0 when the queue pair polls).
    pub interrupts: u64,
    pub halts: u64,
    /// The I/O queue pair it ran on (its id) and the CPU index that issued it.
    pub queue: u16,
    pub cpu: usize,
}

/// One submission/completion queue pair in identity-mapped frames.
struct Queue {
    id: u16,
    sq: HostPhysAddr,
    cq: HostPhysAddr,
    entries: u16,
    tail: u16,
    head: u16,
    phase: bool,
    next_cid: u16,
}

/// An I/O queue pair with its in-flight bookkeeping: command id = slot, each slot with its
/// own PRP list page, so up to `entries - 1` commands are outstanding at once.
struct IoQueue {
    q: Queue,
    /// The CPU (APIC ID) this pair belongs to.
    apic_id: u32,
    /// Its completion queue interrupts (MSI-X entry = queue id, to `apic_id`); else polled.
    irq: bool,
    prp: Vec<HostPhysAddr>,
    /// The request each busy slot serves.
    owner: Vec<Option<usize>>,
}

pub struct Nvme {
    pub bdf: Bdf,
    regs: Mmio,
    stride: u64,
    admin: Queue,
    /// One I/O queue pair per CPU (as many as the controller grants), each behind its lock.
    io: Vec<spin::Mutex<IoQueue>>,
    /// The APIC ID each pair of `io` belongs to (fixed after `new`).
    io_apic: Vec<u32>,
    /// A page for identify data.
    scratch: HostPhysAddr,
    pub blocks: u64,
    max_chunk: u64,
    pub commands: AtomicU64,
    /// Completion interrupts taken and halts waited in, over all batches.
    pub interrupts: AtomicU64,
    pub halts: AtomicU64,
    /// Set after a command timed out: the controller may still own pages, no more I/O.
    broken: AtomicBool,
}

/// How the I/O completion queues signal: MSI-X (the function's table, MSI-X not yet
/// enabled) or polling, with the reason (`nvme=poll`, no MSI-X capability).
pub enum Completions {
    Msix(Msix),
    Poll(&'static str),
}

/// DW3 of a completion entry: CID 15:0, phase tag bit 16, status 31:17 (NVMe 1.4, 4.6).
struct Completion {
    cid: u16,
    status: u16,
    dw0: u32,
}

impl Queue {
    /// Writes one entry at the tail (no doorbell yet); DW0 gets opcode 7:0, PRP data
    /// transfer (PSDT 0) and command id 31:16 (NVMe 1.4, 4.2).
    fn push(&mut self, op: u8, cid: u16, mut sqe: [u32; 16]) {
        sqe[0] = op as u32 | (cid as u32) << 16;
        let slot = self.sq.as_u64() + 64 * self.tail as u64;
        for (i, w) in sqe.iter().enumerate() {
            // SAFETY: entry `tail` (< entries) of the identity-mapped submission queue we own.
            unsafe { ((slot + 4 * i as u64) as *mut u32).write_volatile(*w) };
        }
        self.tail = (self.tail + 1) % self.entries;
    }

    /// The next completion if the controller has posted one (phase tag matches).
    fn pop(&mut self) -> Option<Completion> {
        let cqe = self.cq.as_u64() + 16 * self.head as u64;
        // SAFETY: entry `head` (< entries) of the identity-mapped completion queue we own.
        let (dw0, dw3) = unsafe { ((cqe as *const u32).read_volatile(), ((cqe + 12) as *const u32).read_volatile()) };
        if (dw3 >> 16 & 1 != 0) != self.phase {
            return None;
        }
        self.head = (self.head + 1) % self.entries;
        if self.head == 0 {
            self.phase = !self.phase;
        }
        // Status: SC 7:0, SCT 10:8 of the 15-bit field.
        Some(Completion { cid: dw3 as u16, status: (dw3 >> 17) as u16 & 0x7ff, dw0 })
    }
}

impl Nvme {
    /// A 64-bit register written as two 32-bit halves.
    fn w64(&self, off: u64, v: u64) {
        self.regs.write32(off, v as u32);
        self.regs.write32(off + 4, (v >> 32) as u32);
    }

    /// SQ y tail doorbell at 0x1000 + 2y * stride, CQ y head at + (2y + 1) * stride
    /// (NVMe 1.4, 3.1.24-25).
    fn ring(&self, qid: u16, cq: bool, value: u16) {
        self.regs.write32(DOORBELLS + (2 * qid as u64 + cq as u64) * self.stride, value as u32);
    }

    /// Resets and enables the controller with BAR0 `regs`, maps its queues into its domain
    /// of `iommu`, creates one I/O queue pair per CPU of `apic_ids` (as many as the
    /// controller grants; the others share them) and identifies namespace 1. With
    /// `Completions::Msix` each I/O completion queue y gets MSI-X entry y, `DEVICE_VECTOR` on
    /// its CPU (entry 0, the admin queue's, stays masked: admin commands are polled).
    pub fn new(bdf: Bdf, regs: Mmio, iommu: &mut Unit, apic_ids: &[u32], completions: Completions) -> Result<Nvme, &'static str> {
        let frames = &Frames::here();
        let mut page = || -> Result<HostPhysAddr, &'static str> {
            let p = frames.alloc_zeroed(Order::BASE).ok_or("out of memory for queues")?;
            iommu.map_page(bdf, p.as_u64(), p, Perm::RW).map_err(|_| "cannot map queues in the domain")?;
            Ok(p)
        };
        let queue = |id, sq, cq, entries| Queue { id, sq, cq, entries, tail: 0, head: 0, phase: true, next_cid: 0 };
        let (asq, acq, scratch) = (page()?, page()?, page()?);
        let mut n = Nvme {
            bdf, regs, stride: 4, admin: queue(0, asq, acq, ADMIN_ENTRIES),
            io: Vec::new(), io_apic: Vec::new(), scratch, blocks: 0, max_chunk: MAX_CHUNK,
            commands: AtomicU64::new(0), interrupts: AtomicU64::new(0), halts: AtomicU64::new(0), broken: AtomicBool::new(false),
        };
        // CAP is a 64-bit register; read as two halves.
        let cap = n.regs.read32(CAP) as u64 | (n.regs.read32(CAP + 4) as u64) << 32;
        // CAP: MQES 15:0, TO 31:24 (500 ms units), DSTRD 35:32 (NVMe 1.4, 3.1.1).
        n.stride = 4 << (cap >> 32 & 0xf);
        let io_entries = IO_ENTRIES.min((cap & 0xffff) as u16 + 1);
        let ready_us = ((cap >> 24 & 0xff) + 1) * 500_000;
        // Disable, program the admin queue, enable (NVMe 1.4, 7.6.1).
        n.regs.write32(CC, 0);
        n.wait_ready(false, ready_us)?;
        n.regs.write32(AQA, (ADMIN_ENTRIES as u32 - 1) << 16 | (ADMIN_ENTRIES as u32 - 1));
        n.w64(ASQ, n.admin.sq.as_u64());
        n.w64(ACQ, n.admin.cq.as_u64());
        n.regs.write32(CC, CC_QUEUE_SIZES | CC_EN);
        n.wait_ready(true, ready_us)?;
        let vs = n.regs.read32(VS);
        // Identify controller (CNS 1): MDTS at byte 77, in units of the 4 KiB minimum page.
        n.admin_cmd(OP_IDENTIFY, 0, n.scratch.as_u64(), [1, 0]).map_err(|_| "identify controller failed")?;
        let ident = n.scratch.as_u64() as *const u8;
        // SAFETY: the identify data page is ours and identity-mapped; byte 77 of 4096.
        let mdts = unsafe { ident.add(77).read_volatile() };
        if mdts != 0 {
            n.max_chunk = n.max_chunk.min(PAGE << mdts);
        }
        let mut model = [0u8; 40];
        for (i, b) in model.iter_mut().enumerate() {
            // SAFETY: model number at bytes 24..64 of the identify page.
            *b = unsafe { ident.add(24 + i).read_volatile() };
        }
        // Identify namespace 1 (CNS 0): NSZE at 0, FLBAS at 26, LBA formats at 128 (LBADS 23:16).
        n.admin_cmd(OP_IDENTIFY, 1, n.scratch.as_u64(), [0, 0]).map_err(|_| "identify namespace failed")?;
        // SAFETY: as above, within the 4 KiB identify page.
        let (nsze, flbas) = unsafe { ((ident as *const u64).read_volatile(), ident.add(26).read_volatile()) };
        // SAFETY: as above.
        let lbaf = unsafe { (ident.add(128 + 4 * (flbas & 0xf) as usize) as *const u32).read_volatile() };
        if 1u64 << (lbaf >> 16 & 0xff) != BLOCK {
            return Err("namespace 1 does not use 512-byte blocks");
        }
        n.blocks = nsze;
        // Number of Queues (Set Features, FID 07h): NSQR 15:0 and NCQR 31:16, 0-based;
        // completion DW0 holds what was allocated, same layout (NVMe 1.4, 5.21.1.7).
        let want = apic_ids.len().clamp(1, MAX_IO_QUEUES) as u32;
        let granted = match n.admin_cmd(OP_SET_FEATURES, 0, 0, [FID_QUEUES, (want - 1) << 16 | (want - 1)]) {
            Ok(dw0) => ((dw0 & 0xffff).min(dw0 >> 16) + 1).min(want),
            Err(_) => 1,
        };
        let (msix, why) = match completions {
            Completions::Msix(m) => {
                m.mask(0);
                m.enable();
                (Some(m), "the MSI-X table has no entry for any I/O queue")
            }
            Completions::Poll(why) => (None, why),
        };
        for k in 0..granted as u16 {
            let id = k + 1;
            let apic_id = apic_ids.get(k as usize).copied().unwrap_or(0);
            let irq = msix.as_ref().is_some_and(|m| m.route(id, apic_id, DEVICE_VECTOR));
            let (sq, cq) = (page()?, page()?);
            let mut prp = Vec::with_capacity(io_entries as usize);
            for _ in 1..io_entries {
                prp.push(page()?);
            }
            // Create the completion queue (CDW11: PC bit 0; IEN bit 1 and IV 31:16, the MSI-X
            // entry, where it interrupts), then its submission queue (CQID 31:16, PC)
            // (NVMe 1.4, 5.3 and 5.4).
            let qsize = (io_entries as u32 - 1) << 16;
            let cdw11 = if irq { (id as u32) << 16 | 1 << 1 | 1 } else { 1 };
            n.admin_cmd(OP_CREATE_CQ, 0, cq.as_u64(), [qsize | id as u32, cdw11]).map_err(|_| "create I/O completion queue failed")?;
            n.admin_cmd(OP_CREATE_SQ, 0, sq.as_u64(), [qsize | id as u32, (id as u32) << 16 | 1]).map_err(|_| "create I/O submission queue failed")?;
            n.io.push(spin::Mutex::new(IoQueue { q: queue(id, sq, cq, io_entries), apic_id, irq, prp, owner: alloc::vec![None; io_entries as usize - 1] }));
            n.io_apic.push(apic_id);
        }
        let model = core::str::from_utf8(&model).unwrap_or("?").trim_end();
        log::info!(target: "nvme", "device {bdf}: NVMe {}.{} '{model}', namespace 1: {} blocks of {BLOCK} bytes ({} MiB), max transfer {} KiB, admin queue {ADMIN_ENTRIES} entries, {} I/O queue pair(s) of {io_entries} entries (one per CPU, {} CPUs), mapped in its domain",
            vs >> 16, vs >> 8 & 0xff, n.blocks, (n.blocks * BLOCK) >> 20, n.max_chunk >> 10, n.io.len(), apic_ids.len());
        let pairs: Vec<(u16, u32, bool)> = n.io.iter().map(|q| q.lock()).map(|q| (q.q.id, q.apic_id, q.irq)).collect();
        match &msix {
            Some(m) if pairs.iter().any(|q| q.2) => {
                let mut routes = alloc::string::String::new();
                for &(id, apic_id, _) in pairs.iter().filter(|q| q.2) {
                    let cpu = apic_ids.iter().position(|&a| a == apic_id).unwrap_or(0);
                    routes.push_str(&alloc::format!("{}queue {id} on CPU {cpu} (APIC {apic_id})", if routes.is_empty() { "" } else { ", " }));
                }
                let polled = pairs.iter().filter(|q| !q.2).count();
                log::info!(target: "nvme", "device {bdf}: completions by MSI-X interrupt (vector {DEVICE_VECTOR:#x}: {routes}; table of {} entries in BAR{} at {:#x}; {polled} queue pair(s) polled)",
                    m.entries, m.bar, m.offset);
            }
            _ => {
                if let Some(m) = &msix {
                    m.disable();
                }
                log::info!(target: "nvme", "device {bdf}: completions by polling ({why})");
            }
        }
        Ok(n)
    }

    fn wait_ready(&self, ready: bool, us: u64) -> Result<(), &'static str> {
        let start = crate::platform::time::micros();
        while (self.regs.read32(CSTS) & CSTS_RDY != 0) != ready {
            if self.regs.read32(CSTS) & CSTS_CFS != 0 {
                return Err("controller fatal status");
            }
            if crate::platform::time::micros() - start > us {
                return Err("controller did not become ready");
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// One admin command, polled to completion; returns completion DW0.
    fn admin_cmd(&mut self, op: u8, nsid: u32, prp1: u64, cdw: [u32; 2]) -> Result<u32, u16> {
        let mut sqe = [0u32; 16];
        sqe[1] = nsid;
        (sqe[6], sqe[7]) = (prp1 as u32, (prp1 >> 32) as u32);
        (sqe[10], sqe[11]) = (cdw[0], cdw[1]);
        let cid = self.admin.next_cid;
        self.admin.next_cid = cid.wrapping_add(1);
        self.admin.push(op, cid, sqe);
        self.ring(0, false, self.admin.tail);
        let start = crate::platform::time::micros();
        let c = loop {
            if let Some(c) = self.admin.pop() {
                break c;
            }
            if crate::platform::time::micros() - start > TIMEOUT_US {
                return Err(0xffff);
            }
            core::hint::spin_loop();
        };
        self.ring(0, true, self.admin.head);
        *self.commands.get_mut() += 1;
        match c.status {
            0 => Ok(c.dw0),
            status => Err(status),
        }
    }

    /// The I/O queue pair of the CPU this runs on (by APIC ID; the first pair if the CPU
    /// has none of its own).
    fn my_queue(&self) -> usize {
        if self.io.len() <= 1 {
            return 0;
        }
        let me = crate::arch::apic::id();
        self.io_apic.iter().position(|&a| a == me).unwrap_or(0)
    }

    /// Moves `count` blocks between `lba` and I/O virtual address `iova` (block aligned;
    /// a read writes memory): a batch of one request. Returns `count`.
    pub fn io(&self, write: bool, iova: u64, lba: u64, count: u64) -> Result<u64, IoError> {
        let mut out = [Ok(0)];
        let s = self.batch(write, &[Request { iova, lba, blocks: count }], &mut out);
        log::info!(target: "nvme", "{} {count} blocks ({}) {} LBA {lba} {} I/O virtual address {iova:#x} on queue {} (CPU {}): {} commands, {} completion interrupts ({} halts), {} ms, {} MiB/s",
            if write { "wrote" } else { "read" }, Bytes(count * BLOCK), if write { "to" } else { "from" },
            if write { "from" } else { "into" }, s.queue, s.cpu, s.commands, s.interrupts, s.halts, s.us / 1000, (count * BLOCK * 1_000_000 / s.us.max(1)) >> 20);
        out[0]
    }

    /// Runs every request of `reqs` on this CPU's I/O queue pair; `out[i]` gets request i's
    /// blocks or why it failed (a failed request fails alone). Commands are submitted as
    /// long as the queue has a free slot (one doorbell write for all that fit), then every
    /// posted completion is taken and its slot refilled, until all are done: the device
    /// works on up to `entries - 1` commands at once. While commands are out and nothing is
    /// posted, a pair with an interrupt halts this CPU (HLT with interrupts on) until the next
    /// interrupt (its completion, a timer, an IPI; at the latest `HALT_BACKSTOP_US`) and
    /// reads the queue again, so a lost interrupt costs time, never the batch; a polled pair
    /// spins. Runs on the CPU the caller runs on, with host interrupts off, with or without
    /// the world lock (its queue pair's lock is held throughout). While it waits it
    /// acknowledges shootdown and drain requests (`ipi::service`, as a CPU spinning for the
    /// world lock does), so a CPU that shoots down under the world lock is not held up by
    /// this batch; nothing of this CPU's allocator core or TLB is in use meanwhile.
    ///
    /// The caller keeps every page the requests' IOVAs reach mapped in the device domain
    /// (and not freed) until this returns: after it returns, no command of the batch is
    /// outstanding (or the driver is `broken` and issues no more I/O).
    pub fn batch(&self, write: bool, reqs: &[Request], out: &mut [Result<u64, IoError>]) -> BatchStats {
        let start = crate::platform::time::micros();
        let cpu = crate::arch::ipi::me();
        let interrupts_before = crate::arch::idt::device_interrupts(cpu);
        let mut stats = BatchStats { cpu, ..BatchStats::default() };
        for (r, o) in reqs.iter().zip(out.iter_mut()) {
            *o = if self.broken.load(Ordering::Acquire) {
                Err(IoError::Device(0xffff))
            } else if r.blocks == 0 || !r.iova.is_multiple_of(BLOCK) {
                Err(IoError::Invalid)
            } else if r.lba.checked_add(r.blocks).is_none_or(|end| end > self.blocks) {
                Err(IoError::Range)
            } else {
                Ok(0)
            };
        }
        let qi = self.my_queue();
        let Some(pair) = self.io.get(qi) else {
            out.iter_mut().for_each(|o| *o = Err(IoError::Device(0xffff)));
            return stats;
        };
        // Uncontended but where CPUs share a pair; a CPU waiting for it acknowledges shootdowns.
        let mut ioq = loop {
            if let Some(q) = pair.try_lock() {
                break q;
            }
            crate::arch::ipi::service();
            core::hint::spin_loop();
        };
        stats.queue = ioq.q.id;
        let per_cmd = self.max_chunk / BLOCK;
        let op = if write { OP_WRITE } else { OP_READ };
        // The next chunk to submit: request `next`, `done` blocks into it.
        let (mut next, mut done) = (0usize, 0u64);
        let mut in_flight = 0u64;
        let mut last_progress = crate::platform::time::micros();
        loop {
            let mut pushed = false;
            while next < reqs.len() {
                if out[next].is_err() || done >= reqs[next].blocks {
                    (next, done) = (next + 1, 0);
                    continue;
                }
                let Some(slot) = ioq.owner.iter().position(|o| o.is_none()) else { break };
                let r = reqs[next];
                let n = (r.blocks - done).min(per_cmd);
                let addr = r.iova + done * BLOCK;
                let bytes = n * BLOCK;
                // PRP entries: PRP1 = the first byte; then every page boundary (NVMe 1.4, 4.3).
                let first_page = addr & !(PAGE - 1);
                let pages = (addr + bytes - first_page).div_ceil(PAGE);
                let list = ioq.prp[slot];
                let prp2 = match pages {
                    1 => 0,
                    2 => first_page + PAGE,
                    _ => {
                        for i in 1..pages {
                            // SAFETY: entry i - 1 (< 128, max_chunk is 512 KiB) of this slot's
                            // PRP list page, ours and identity-mapped; no command uses it now.
                            unsafe { (list.as_u64() as *mut u64).add(i as usize - 1).write_volatile(first_page + i * PAGE) };
                        }
                        list.as_u64()
                    }
                };
                let mut sqe = [0u32; 16];
                sqe[1] = 1;
                (sqe[6], sqe[7]) = (addr as u32, (addr >> 32) as u32);
                (sqe[8], sqe[9]) = (prp2 as u32, (prp2 >> 32) as u32);
                let slba = r.lba + done;
                // CDW10-11: starting LBA; CDW12: number of blocks, 0-based (NVMe 1.4, 6.9).
                (sqe[10], sqe[11], sqe[12]) = (slba as u32, (slba >> 32) as u32, n as u32 - 1);
                ioq.q.push(op, slot as u16, sqe);
                ioq.owner[slot] = Some(next);
                done += n;
                in_flight += 1;
                stats.commands += 1;
                pushed = true;
            }
            if pushed {
                stats.max_depth = stats.max_depth.max(in_flight);
                self.regs.write32(DOORBELLS + 2 * ioq.q.id as u64 * self.stride, ioq.q.tail as u32);
            }
            if in_flight == 0 {
                break;
            }
            let mut reaped = false;
            while let Some(c) = ioq.q.pop() {
                reaped = true;
                in_flight -= 1;
                let Some(r) = ioq.owner.get_mut(c.cid as usize).and_then(|o| o.take()) else {
                    log::error!(target: "nvme", "device {}: completion for unknown command id {}", self.bdf, c.cid);
                    continue;
                };
                match (c.status, &mut out[r]) {
                    (0, Ok(b)) => *b += (reqs[r].blocks - *b).min(per_cmd),
                    (0, Err(_)) => {}
                    (status, o) => *o = Err(IoError::Device(status)),
                }
            }
            if reaped {
                self.regs.write32(DOORBELLS + (2 * ioq.q.id as u64 + 1) * self.stride, ioq.q.head as u32);
                last_progress = crate::platform::time::micros();
            } else if crate::platform::time::micros() - last_progress > TIMEOUT_US {
                // The controller still owns the outstanding commands' pages: no more I/O.
                for r in ioq.owner.iter_mut().filter_map(|o| o.take()) {
                    out[r] = Err(IoError::Device(0xffff));
                }
                self.broken.store(true, Ordering::Release);
                log::error!(target: "nvme", "device {}: {in_flight} commands timed out; no more I/O on it", self.bdf);
                break;
            } else if ioq.irq {
                // The queue was read with interrupts off: a completion posted since then has
                // its message pending in the local APIC, which ends this HLT at once.
                let per_us = crate::platform::time::tsc_per_us().max(1);
                crate::arch::apic::halt_once(crate::platform::time::tsc() + HALT_BACKSTOP_US * per_us);
                stats.halts += 1;
                crate::arch::ipi::service();
            } else {
                crate::arch::ipi::service();
                core::hint::spin_loop();
            }
        }
        stats.interrupts = crate::arch::idt::device_interrupts(cpu) - interrupts_before;
        drop(ioq);
        self.interrupts.fetch_add(stats.interrupts, Ordering::Relaxed);
        self.halts.fetch_add(stats.halts, Ordering::Relaxed);
        self.commands.fetch_add(stats.commands, Ordering::Relaxed);
        stats.us = (crate::platform::time::micros() - start).max(1);
        stats
    }
}
