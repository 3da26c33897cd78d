//! A minimal NVMe driver (NVMe base spec 1.4): the admin queue, one I/O queue pair, identify,
//! read and write, all by polling. Every address the controller sees is an I/O virtual
//! address of its VT-d domain: its queues and PRP list page are mapped there at their
//! host-physical address, and the proxy mounts the caller's morsel at `PROXY_IOVA`, so the
//! data pointers (PRPs) are IOVAs inside the morsel.

use allocator::Order;
use crate::mm::frames::Frames;
use crate::iommu::Unit;
use formats::mmio::Mmio;
use formats::units::Bytes;
use crate::devices::pci::Bdf;
use morsel::{HostPhysAddr, Perm};

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
const OP_WRITE: u8 = 0x01;
const OP_READ: u8 = 0x02;

const ADMIN_ENTRIES: u16 = 16;
const IO_ENTRIES: u16 = 64;
/// Longest transfer per command (also capped by MDTS): 512 KiB = 128 pages, one PRP list page.
const MAX_CHUNK: u64 = 512 << 10;
const TIMEOUT_US: u64 = 5_000_000;

#[derive(Debug)]
pub enum IoError {
    /// The blocks lie beyond the namespace.
    Range,
    /// A bad argument (zero count, misaligned address).
    Invalid,
    /// The controller reported this status (SCT << 8 | SC), or 0xffff for a timeout.
    Device(u16),
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

pub struct Nvme {
    pub bdf: Bdf,
    regs: Mmio,
    stride: u64,
    admin: Queue,
    io: Queue,
    /// A page for identify data and PRP lists (one command at a time).
    scratch: HostPhysAddr,
    pub blocks: u64,
    max_chunk: u64,
    pub commands: u64,
}

impl Nvme {
    /// A 64-bit register written as two 32-bit halves.
    fn w64(&self, off: u64, v: u64) {
        self.regs.write32(off, v as u32);
        self.regs.write32(off + 4, (v >> 32) as u32);
    }

    /// Resets and enables the controller with BAR0 `regs`, maps its queues into its domain
    /// of `iommu`, creates the I/O queue pair and identifies namespace 1.
    pub fn new(bdf: Bdf, regs: Mmio, iommu: &mut Unit, frames: &Frames) -> Result<Nvme, &'static str> {
        let mut pages = [HostPhysAddr::new(0); 5];
        for p in pages.iter_mut() {
            *p = frames.alloc_zeroed(Order::BASE).ok_or("out of memory for queues")?;
            iommu.map_page(bdf, p.as_u64(), *p, Perm::RW, frames).map_err(|_| "cannot map queues in the domain")?;
        }
        let queue = |id, sq, cq, entries| Queue { id, sq, cq, entries, tail: 0, head: 0, phase: true, next_cid: 0 };
        let mut n = Nvme {
            bdf, regs, stride: 4, admin: queue(0, pages[0], pages[1], ADMIN_ENTRIES),
            io: queue(1, pages[2], pages[3], IO_ENTRIES), scratch: pages[4], blocks: 0, max_chunk: MAX_CHUNK, commands: 0,
        };
        // CAP is a 64-bit register; read as two halves.
        let cap = n.regs.read32(CAP) as u64 | (n.regs.read32(CAP + 4) as u64) << 32;
        // CAP: MQES 15:0, TO 31:24 (500 ms units), DSTRD 35:32 (NVMe 1.4, 3.1.1).
        n.stride = 4 << (cap >> 32 & 0xf);
        let max_entries = (cap & 0xffff) as u16 + 1;
        n.io.entries = n.io.entries.min(max_entries);
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
        // Create the I/O completion queue (PC = 1, no interrupts), then the submission queue.
        let qsize = (n.io.entries as u32 - 1) << 16;
        n.admin_cmd(OP_CREATE_CQ, 0, n.io.cq.as_u64(), [qsize | 1, 1]).map_err(|_| "create I/O completion queue failed")?;
        n.admin_cmd(OP_CREATE_SQ, 0, n.io.sq.as_u64(), [qsize | 1, 1 << 16 | 1]).map_err(|_| "create I/O submission queue failed")?;
        let model = core::str::from_utf8(&model).unwrap_or("?").trim_end();
        log::info!(target: "nvme", "device {bdf}: NVMe {}.{} '{model}', namespace 1: {} blocks of {BLOCK} bytes ({} MiB), max transfer {} KiB, queues {ADMIN_ENTRIES}+{} entries mapped in its domain",
            vs >> 16, vs >> 8 & 0xff, n.blocks, (n.blocks * BLOCK) >> 20, n.max_chunk >> 10, n.io.entries);
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

    fn admin_cmd(&mut self, op: u8, nsid: u32, prp1: u64, cdw: [u32; 2]) -> Result<(), u16> {
        let mut sqe = [0u32; 16];
        sqe[1] = nsid;
        (sqe[6], sqe[7]) = (prp1 as u32, (prp1 >> 32) as u32);
        (sqe[10], sqe[11]) = (cdw[0], cdw[1]);
        self.submit(true, op, sqe)
    }

    /// Submits one command on the admin or I/O queue and polls for its completion.
    fn submit(&mut self, admin: bool, op: u8, mut sqe: [u32; 16]) -> Result<(), u16> {
        let stride = self.stride;
        let q = if admin { &mut self.admin } else { &mut self.io };
        let cid = q.next_cid;
        q.next_cid = q.next_cid.wrapping_add(1);
        // DW0: opcode 7:0, PRP data transfer (PSDT 0), command id 31:16 (NVMe 1.4, 4.2).
        sqe[0] = op as u32 | (cid as u32) << 16;
        let slot = q.sq.as_u64() + 64 * q.tail as u64;
        for (i, w) in sqe.iter().enumerate() {
            // SAFETY: entry `tail` of the identity-mapped submission queue page we own.
            unsafe { ((slot + 4 * i as u64) as *mut u32).write_volatile(*w) };
        }
        q.tail = (q.tail + 1) % q.entries;
        let (qid, tail) = (q.id as u64, q.tail);
        // SQ y tail doorbell at 0x1000 + 2y * stride (NVMe 1.4, 3.1.24).
        self.regs.write32(DOORBELLS + 2 * qid * stride, tail as u32);
        let q = if admin { &mut self.admin } else { &mut self.io };
        let cqe = q.cq.as_u64() + 16 * q.head as u64;
        let start = crate::platform::time::micros();
        let dw3 = loop {
            // SAFETY: entry `head` of the identity-mapped completion queue page we own.
            let dw3 = unsafe { ((cqe + 12) as *const u32).read_volatile() };
            // DW3: CID 15:0, phase tag bit 16, status 31:17 (NVMe 1.4, 4.6).
            if (dw3 >> 16 & 1 != 0) == q.phase {
                break dw3;
            }
            if crate::platform::time::micros() - start > TIMEOUT_US {
                return Err(0xffff);
            }
            core::hint::spin_loop();
        };
        q.head = (q.head + 1) % q.entries;
        if q.head == 0 {
            q.phase = !q.phase;
        }
        let head = q.head;
        // CQ y head doorbell at 0x1000 + (2y + 1) * stride.
        self.regs.write32(DOORBELLS + (2 * qid + 1) * stride, head as u32);
        self.commands += 1;
        match (dw3 >> 17) as u16 & 0x7ff {
            0 => Ok(()),
            // Status: SC 7:0, SCT 10:8 of the 15-bit field.
            status => Err(status),
        }
    }

    /// Moves `count` blocks between `lba` and I/O virtual address `iova` (block aligned;
    /// a read writes memory). Splits into commands of at most `max_chunk` bytes, each with
    /// PRP1 and a PRP2 entry or PRP list built from IOVAs. Returns `count`.
    pub fn io(&mut self, write: bool, iova: u64, lba: u64, count: u64) -> Result<u64, IoError> {
        if count == 0 || !iova.is_multiple_of(BLOCK) {
            return Err(IoError::Invalid);
        }
        if lba.checked_add(count).is_none_or(|end| end > self.blocks) {
            return Err(IoError::Range);
        }
        let start = crate::platform::time::micros();
        let commands0 = self.commands;
        let per_cmd = self.max_chunk / BLOCK;
        let mut done = 0;
        while done < count {
            let n = (count - done).min(per_cmd);
            let addr = iova + done * BLOCK;
            let bytes = n * BLOCK;
            // PRP entries: PRP1 = the first byte; then every page boundary (NVMe 1.4, 4.3).
            let first_page = addr & !(PAGE - 1);
            let pages = (addr + bytes - first_page).div_ceil(PAGE);
            let prp2 = match pages {
                1 => 0,
                2 => first_page + PAGE,
                _ => {
                    for i in 1..pages {
                        // SAFETY: entry i - 1 (< 128) of the scratch page, ours and identity-mapped.
                        unsafe { (self.scratch.as_u64() as *mut u64).add(i as usize - 1).write_volatile(first_page + i * PAGE) };
                    }
                    self.scratch.as_u64()
                }
            };
            let mut sqe = [0u32; 16];
            sqe[1] = 1;
            (sqe[6], sqe[7]) = (addr as u32, (addr >> 32) as u32);
            (sqe[8], sqe[9]) = (prp2 as u32, (prp2 >> 32) as u32);
            let slba = lba + done;
            // CDW10-11: starting LBA; CDW12: number of blocks, 0-based (NVMe 1.4, 6.9).
            (sqe[10], sqe[11], sqe[12]) = (slba as u32, (slba >> 32) as u32, n as u32 - 1);
            self.submit(false, if write { OP_WRITE } else { OP_READ }, sqe).map_err(IoError::Device)?;
            done += n;
        }
        let us = (crate::platform::time::micros() - start).max(1);
        log::info!(target: "nvme", "{} {count} blocks ({}) {} LBA {lba} {} I/O virtual address {iova:#x}: {} commands, {} ms, {} MiB/s",
            if write { "wrote" } else { "read" }, Bytes(count * BLOCK), if write { "to" } else { "from" },
            if write { "from" } else { "into" }, self.commands - commands0, us / 1000, (count * BLOCK * 1_000_000 / us) >> 20);
        Ok(count)
    }
}
