//! Calls that make a device move a guest's morsel: `edu_dma` (only inside the caller's own
//! edu mounts) and the NVMe proxy (`nvme_io`: ExMap's pread done by hardware: the caller's
//! morsel is mounted into the NVMe domain for one call, the device DMAs into its frames).
//! `DiskBatch` is the NVMe batch both the proxy and ExMap READ / WRITE run with the world lock
//! let go, on a pinned morsel.

use super::device_mounts::mount_error;
use super::{Directory, Name};
use crate::devices::nvme::{BatchStats, IoError, Nvme, Request};
use crate::devices::pci::Bdf;
use crate::devices::{self, Devices};
use alloc::vec::Vec;
use formats::units::Bytes;
use crate::mm::frames::Frames;
use crate::vm::guest::Guest;
use crate::vm::hypercall::{Hv, Under};
use crate::vm::shootdown::{Flush, Hw};
use crate::vm::Backend;
use abi::{self, Error};
use morsel::{Format, GuestPhysAddr, Perm};
use vmcore::hypercall::Deferred;
use vmcore::region_lock::Contender;

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    /// `edu_dma(direction, iova, len)`: a guest may only have edu move bytes inside the window
    /// of one of its own mounts in edu's domain (else it could read or overwrite morsels it
    /// did not mount there); only the guest edu is lent to has such mounts. Inside the window
    /// the IOMMU decides: past the end of the morsel, or a write through a read-only mount, is
    /// blocked and reported.
    pub fn edu_dma<B: Backend<Format = F>>(&self, g: &Guest<B>, devices: Option<&mut Devices>, to_device: bool, iova: u64, len: u64) -> Result<u64, Error> {
        let d = devices.ok_or(Error::NotFound)?;
        let edu = d.edu.as_ref().map(|e| e.bdf).ok_or(Error::NotFound)?;
        let end = iova.checked_add(len).ok_or(Error::TooLarge)?;
        if !self.devices.covers(g.id, edu, iova, end) {
            return Err(Error::Denied);
        }
        devices::edu_dma(d, to_device, iova, len)
    }

    /// `nvme_read` / `nvme_write(gpa, offset, lba, count)`, its half under the world lock:
    /// the caller's morsel mounted at `gpa` is mounted into the NVMe domain (`disk_begin`);
    /// the device moves the blocks with the lock let go (`ProxyIo`'s `Deferred::run`), then
    /// `nvme_finish` unmounts it under the lock again. No guest can mount anything into that
    /// domain (`device_mount` does not offer NVMe), and the unmount takes the tables its
    /// mount created, so every call finds the proxy's I/O virtual addresses free but for the
    /// spans of batches in flight on other CPUs.
    #[allow(clippy::too_many_arguments)] // the call's four arguments, the caller and the direction
    pub fn nvme_io<B: Backend<Format = F>>(&mut self, g: &Guest<B>, devices: Option<&mut Devices>, write: bool, gpa: u64, offset: u64, lba: u64, count: u64) -> Result<ProxyIo, Error> {
        let space = g.space.lock();
        let m = space.mounts.iter().find(|m| m.gpa == gpa).ok_or(Error::NotFound)?;
        let bytes = count.checked_mul(abi::NVME_BLOCK).ok_or(Error::TooLarge)?;
        if count == 0 || !offset.is_multiple_of(abi::NVME_BLOCK) {
            return Err(Error::Invalid);
        }
        if offset.checked_add(bytes).is_none_or(|end| end > m.size) {
            return Err(Error::TooLarge);
        }
        // The device writes the morsel on a read: the caller must hold it writable.
        if !write && space.mem.translate(GuestPhysAddr::new(gpa), Perm::RW).is_err() {
            return Err(Error::Denied);
        }
        let name = m.name;
        drop(space);
        let d = devices.ok_or(Error::NotFound)?;
        let mut batch = self.disk_begin(d, &name, write, true)?;
        batch.reqs.push(Request { iova: batch.iova + offset, lba, blocks: count });
        batch.done.push(Err(IoError::Invalid));
        Ok(ProxyIo { batch })
    }

    /// `nvme_io`'s half under the lock again: the unmount; the blocks moved or why not.
    pub fn nvme_finish(&mut self, devices: Option<&mut Devices>, p: ProxyIo) -> Result<u64, Error> {
        let ProxyIo { batch } = p;
        let faulted = self.disk_end(devices, &batch);
        let req = batch.reqs.first().copied().unwrap_or(Request { iova: 0, lba: 0, blocks: 0 });
        let (r, count, lba) = (batch.done.first().copied().unwrap_or(Err(IoError::Invalid)), req.blocks, req.lba);
        let s = batch.stats;
        if r.is_ok() {
            log::info!(target: "nvme", "{} {count} blocks ({}) {} LBA {lba} {} I/O virtual address {:#x} on queue {} (CPU {}): {} commands, {} completion interrupts ({} halts), {} ms, {} MiB/s",
                if batch.write { "wrote" } else { "read" }, Bytes(count * abi::NVME_BLOCK), if batch.write { "to" } else { "from" },
                if batch.write { "from" } else { "into" }, req.iova, s.queue, s.cpu, s.commands, s.interrupts, s.halts, s.us / 1000,
                (count * abi::NVME_BLOCK * 1_000_000 / s.us.max(1)) >> 20);
        }
        match (r, faulted) {
            (_, Err(e)) => Err(e),
            (Ok(_), Ok(true)) => Err(Error::DeviceFault),
            (Ok(blocks), Ok(false)) => Ok(blocks),
            (Err(IoError::Range), _) => Err(Error::TooLarge),
            (Err(IoError::Invalid), _) => Err(Error::Invalid),
            (Err(IoError::Device(status)), _) => {
                log::error!(target: "nvme", "device {}: command failed with status {status:#x} (0xffff: timeout)", batch.bdf);
                Err(Error::DeviceFault)
            }
        }
    }

    /// Mounts morsel `name` into the NVMe domain for a batch (read-write where the device
    /// writes it, `!write`) at a span no batch in flight uses, invalidates, and pins the
    /// morsel (`Named::in_io`; `Busy` if a batch is on it already). The requests are the
    /// caller's to add (IOVAs inside `iova .. iova + window`). `loud`: the mount is logged at
    /// INFO (the proxy), else at DEBUG (ExMap, whose batches are many).
    pub(crate) fn disk_begin(&mut self, d: &mut Devices, name: &Name, write: bool, loud: bool) -> Result<DiskBatch, Error> {
        let frames = &Frames::here();
        let nvme = d.nvme.ok_or(Error::NotFound)?;
        let n = self.named.get_mut(name).ok_or(Error::NotFound)?;
        if n.in_io || n.admit(Contender::DiskBatch).is_err() {
            return Err(Error::Busy);
        }
        let window = n.morsel.window_size();
        let bdf = nvme.bdf;
        let limit = d.iommu.limit(bdf).ok_or(Error::NotFound)?;
        let iova = proxy_slot(&d.proxy_spans, window, limit).ok_or(Error::TooLarge)?;
        d.proxy_spans.try_reserve(1).map_err(|_| Error::NoMemory)?;
        let mut reqs = Vec::new();
        let mut done = Vec::new();
        reqs.try_reserve(exmap::MAX_ENTRIES).map_err(|_| Error::NoMemory)?;
        done.try_reserve(exmap::MAX_ENTRIES).map_err(|_| Error::NoMemory)?;
        let perm = if write { Perm::RO } else { Perm::RW };
        let (stats, how, flush) = d.iommu.mount(bdf, &n.morsel, &mut n.views, iova, perm, frames).map_err(mount_error)?;
        if !flush.commit(&mut Hw(Some(&mut *d))).ok() {
            // The entry goes again; its invalidation is tried once more.
            if let Ok((_, flush)) = d.iommu.unmount(bdf, &n.morsel, &mut n.views, iova, frames) {
                let _ = flush.commit(&mut Hw(Some(d)));
            }
            return Err(Error::DeviceFault);
        }
        let level = if loud { log::Level::Info } else { log::Level::Debug };
        log::log!(target: "morsel", level, "'{name}' mounted {} into device {bdf} at I/O virtual address {iova:#x} for the NVMe proxy: {} PTE write (+{}), {how}",
            if write { "read-only" } else { "read-write" }, stats.entry_writes, stats.path_writes);
        n.in_io = true;
        d.proxy_spans.push((iova, window));
        Ok(DiskBatch { nvme, write, reqs, done, stats: BatchStats::default(), name: *name, bdf, iova, loud })
    }

    /// A batch's end under the lock: whether the IOMMU reported a DMA fault of the device,
    /// the unmount and invalidation, its span freed and the morsel unpinned. Runs for every
    /// `disk_begin`, also for a caller that is gone (`hypercall::abandon`).
    pub(crate) fn disk_end(&mut self, devices: Option<&mut Devices>, b: &DiskBatch) -> Result<bool, Error> {
        let frames = &Frames::here();
        let n = self.named.get_mut(&b.name);
        let (Some(d), Some(n)) = (devices, n) else {
            // Unreachable: the devices stay, and a pinned morsel is not destroyed. Were it
            // reached, the span stays taken: its entry may still be in the domain.
            log::error!(target: "morsel", "'{}': the NVMe batch's morsel or device is gone", b.name);
            return Err(Error::DeviceFault);
        };
        n.in_io = false;
        d.proxy_spans.retain(|&(at, _)| at != b.iova);
        let faulted = devices::faults_of(d, b.bdf);
        // Emptied tables kept until the world lock is let go, after the commit below.
        let (freed, flush) = match d.iommu.unmount(b.bdf, &n.morsel, &mut n.views, b.iova, &crate::vm::shootdown::After(frames)) {
            Ok((s, flush)) => (s.path_writes, flush),
            // Nothing cleared that the unit may cache, but its domain is invalidated as before.
            Err(_) => (0, Flush::domain(b.bdf)),
        };
        if !flush.commit(&mut Hw(Some(d))).ok() {
            return Err(Error::DeviceFault);
        }
        let level = if b.loud { log::Level::Info } else { log::Level::Debug };
        log::log!(target: "morsel", level, "'{}' unmounted from device {} at {:#x}: 1 PTE write, 1 IOTLB invalidation, {freed} empty intermediate tables freed", b.name, b.bdf, b.iova);
        Ok(faulted)
    }
}

/// The lowest `window`-aligned span from `PROXY_IOVA` below `limit` that overlaps none of
/// `spans` (the batches in flight).
fn proxy_slot(spans: &[(u64, u64)], window: u64, limit: u64) -> Option<u64> {
    let mut at = devices::nvme::PROXY_IOVA.next_multiple_of(window);
    loop {
        let end = at.checked_add(window)?;
        if end > limit {
            return None;
        }
        match spans.iter().find(|&&(s, w)| s < end && at < s + w) {
            None => return Some(at),
            Some(&(s, w)) => at = (s + w).next_multiple_of(window),
        }
    }
}

/// An NVMe batch on a pinned morsel (`Directory::disk_begin`): mounted into the NVMe domain
/// at `iova`, its requests to run on the calling CPU's queue pair with the world lock let go
/// (`run`), then `Directory::disk_end` under the lock. Between the two nobody frees, moves
/// or unmounts what the requests reach: the morsel is pinned, and its span in the domain is
/// in `Devices::proxy_spans`, so no other batch mounts there.
pub struct DiskBatch {
    nvme: &'static Nvme,
    pub(crate) write: bool,
    pub(crate) reqs: Vec<Request>,
    pub(crate) done: Vec<Result<u64, IoError>>,
    pub(crate) stats: BatchStats,
    pub(crate) name: Name,
    pub(crate) bdf: Bdf,
    pub(crate) iova: u64,
    loud: bool,
}

impl DiskBatch {
    /// The device I/O, on this CPU's queue pair, without the world lock (the driver is
    /// shared safely: `devices::nvme`).
    pub fn run(&mut self) {
        self.stats = self.nvme.batch(self.write, &self.reqs, &mut self.done);
    }
}

/// A prepared `nvme_read` / `nvme_write` (one request).
pub struct ProxyIo {
    pub(crate) batch: DiskBatch,
}

/// `nvme_io`'s batch, deferred: the device I/O with the world lock let go, then the unmount
/// under it (`nvme_finish`), whether its guest is there or gone.
impl<B: Backend> Deferred<Hv<B>> for ProxyIo {
    fn run(&mut self, _: &Frames) {
        self.batch.run();
    }

    fn finish(self, w: Under<'_, B>, _: &mut Guest<B>) -> Result<u64, Error> {
        w.cx.morsels.lock().nvme_finish(w.cx.devices.as_mut(), self)
    }

    fn abandon(self, w: Under<'_, B>) {
        let _ = w.cx.morsels.lock().nvme_finish(w.cx.devices.as_mut(), self);
    }
}
