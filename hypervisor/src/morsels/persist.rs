//! Persistent morsels: their frames come from the persistent region's allocator and each
//! has a record in its directory (written after its subtree is complete, `pmem::add_record`);
//! after a reboot or a crash `load_persistent` restores them and reclaims what nothing reaches.

use super::{Directory, Name, Named, RESTORED};
use vmcore::names::Ticket;
use crate::mm::frames::{Frames, IDENTITY};
use crate::mm::pmem;
use alloc::string::String;
use alloc::vec::Vec;
use formats::units::Bytes;
use morsel::{Format, GuestPhysAddr, Morsel, PageSize};

/// Frames of the run's RAM or of the persistent region.
#[derive(Clone, Copy)]
pub(crate) enum Source {
    Ram(Frames),
    Pmem(crate::mm::pmem::PmemFrames),
}

impl morsel::FrameAlloc for Source {
    fn alloc(&self, order: u32) -> Option<morsel::HostPhysAddr> {
        match self {
            Source::Ram(f) => morsel::FrameAlloc::alloc(f, order),
            Source::Pmem(p) => p.alloc(order),
        }
    }

    fn free(&self, frame: morsel::HostPhysAddr, order: u32) {
        match self {
            Source::Ram(f) => morsel::FrameAlloc::free(f, frame, order),
            Source::Pmem(p) => p.free(frame, order),
        }
    }
}

/// Writes the directory record of a persistent morsel whose subtree is complete (every line
/// of it reaches the media before the record's state word); its slot, or None if the
/// directory is full.
pub(crate) fn add_record<F: Format>(pm: &pmem::Pmem, name: &str, morsel: &Morsel<F>, page: PageSize, others_may_write: bool) -> Option<usize> {
    let record = pmem::Record { name: name.into(), root: morsel.root(), len: morsel.len(), page, others_may_write };
    pm.add_record(&record, |mark| morsel.for_each_frame(&IDENTITY, mark))
}

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    /// Restores the persistent region's morsels (after a reboot or a crash), drops the records
    /// the command line names (`pmem=drop:...`), quarantines the frames that each damaged
    /// record still reaches (kept, never handed out, until the record is dropped) and frees
    /// the region's frames that nothing reaches. Call once, before any guest runs.
    pub fn load_persistent(&mut self) {
        let Some(pm) = self.pmem else { return };
        if let Err(other) = pm.claim_format(F::KIND) {
            log::warn!(target: "pmem", "its morsels are {other} subtrees and this backend uses {}: left untouched", F::NAME);
            return;
        }
        // A damaged record: slot, name (if readable), what it says (root, length, page size).
        let mut damaged: Vec<(usize, String, morsel::HostPhysAddr, u64, Option<PageSize>)> = Vec::new();
        // A restored record holds its name's reservation (`RESTORED`'s budget is the record
        // count) until it is committed below, or aborted where it shares frames.
        let mut restored: Vec<(usize, pmem::Record, Morsel<F>, Ticket)> = Vec::new();
        for r in pm.records() {
            let slot = match &r {
                Ok((slot, _)) | Err(pmem::Unreadable { slot, .. }) => *slot,
            };
            if pm.drop.has(slot) {
                pm.remove_record(slot);
                log::warn!(target: "pmem", "record {slot}{} dropped (pmem=drop:{slot})",
                    r.as_ref().map_or(String::new(), |(_, r)| alloc::format!(" ('{}')", r.name)));
                continue;
            }
            let (slot, r) = match r {
                Ok(x) => x,
                Err(u) => {
                    log::error!(target: "pmem", "record {slot} is unreadable");
                    damaged.push((slot, String::new(), u.root, u.len, u.page));
                    continue;
                }
            };
            let name = match Name::new(r.name.as_bytes()) {
                Ok(n) => n,
                Err(_) => {
                    log::error!(target: "pmem", "record {slot}: its name is not a morsel name");
                    damaged.push((slot, r.name, r.root, r.len, Some(r.page)));
                    continue;
                }
            };
            match Morsel::<F>::restore(r.root, r.len, r.page, &IDENTITY, |f, o| pm.holds(f, o)) {
                Ok(morsel) => match self.named.reserve(name, RESTORED) {
                    Ok(ticket) => restored.push((slot, r, morsel, ticket)),
                    Err(e) => {
                        log::error!(target: "pmem", "record {slot}: the name '{}' cannot be restored: {e} (a second morsel of that name?)", r.name);
                        damaged.push((slot, r.name, r.root, r.len, Some(r.page)));
                    }
                },
                Err(e) => {
                    log::error!(target: "pmem", "record {slot} ('{}'): {e}", r.name);
                    damaged.push((slot, r.name, r.root, r.len, Some(r.page)));
                }
            }
        }
        // Records that share frames: destroying one would free frames the other maps.
        let (mut seen, mut twice) = (pm.frame_set(), pm.frame_set());
        for (_, _, m, _) in &restored {
            m.for_each_frame(&IDENTITY, |f, o| {
                if seen.mark(f, o) > 0 {
                    twice.mark(f, o);
                }
            });
        }
        if twice.count() > 0 {
            log::error!(target: "pmem", "records share {} frames (damaged directory): those records are not loaded", twice.count());
            for (slot, r, m, ticket) in core::mem::take(&mut restored) {
                let mut shares = false;
                m.for_each_frame(&IDENTITY, |f, o| shares |= twice.any(f, o));
                if shares {
                    log::error!(target: "pmem", "record {slot} ('{}'): shares frames with another record", r.name);
                    self.named.abort(ticket);
                    damaged.push((slot, r.name, r.root, r.len, Some(r.page)));
                } else {
                    restored.push((slot, r, m, ticket));
                }
            }
        }
        let mut held = pm.frame_set();
        for (slot, r, morsel, ticket) in restored {
            morsel.for_each_frame(&IDENTITY, |f, o| {
                held.mark(f, o);
            });
            log::info!(target: "pmem", "'{}' restored from record {slot}: {} of {} pages, root L{} at {:#x}, {} tables",
                r.name, Bytes(r.len), if r.page == PageSize::Size2M { "2 MiB" } else { "4 KiB" },
                morsel.root_level(), r.root.as_u64(), morsel.table_count());
            if let Err((e, _)) = self.named.commit(ticket, Named::new(morsel, RESTORED, r.others_may_write, Some(slot))) {
                // Unreachable (the ticket is this reservation's); its frames stay held.
                log::error!(target: "pmem", "record {slot} ('{}'): not entered: {e}", r.name);
            }
        }
        // Quarantine: what a damaged record still reaches (inside the region, allocated, not a
        // loaded record's) stays allocated, for the operator to repair or drop.
        let mut kept = pm.frame_set();
        let mut quarantined = 0;
        for (slot, name, root, len, page) in damaged {
            let what = if name.is_empty() { String::new() } else { alloc::format!(" ('{name}')") };
            if pm.drop.damaged {
                pm.remove_record(slot);
                log::warn!(target: "pmem", "record {slot}{what} dropped (pmem=drop:damaged)");
                continue;
            }
            let before = kept.count();
            Morsel::<F>::salvage(root, len, page, &IDENTITY, |f, o| {
                let take = pm.holds(f, o) && !held.any(f, o) && !kept.any(f, o);
                if take {
                    kept.mark(f, o);
                }
                take
            });
            quarantined += 1;
            log::error!(target: "pmem", "record {slot}{what}: {} frames it reaches quarantined; `pmem=drop:{slot}` drops the record and frees them",
                kept.count() - before);
        }
        let freed = pm.sweep(&held, &kept);
        let persistent: Vec<&Named<F>> = self.named.iter().map(|e| e.value).filter(|n| n.slot.is_some()).collect();
        let holding: u64 = persistent.iter().map(|n| n.morsel.table_count() as u64 + n.morsel.len() / 4096).sum();
        let allocated = pm.allocated_frames();
        log::info!(target: "pmem", "{} persistent morsel(s); {freed} frames freed that no record reached; {allocated} frames allocated, {holding} held by records{}: {}",
            persistent.len(),
            if quarantined > 0 { alloc::format!(", {} quarantined for {quarantined} damaged record(s)", kept.count()) } else { String::new() },
            if allocated == holding + kept.count() { "nothing lost, nothing shared" } else { "MISMATCH" });
    }

}
