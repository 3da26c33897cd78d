//! The directory's hypercalls: create, open (mount into the caller), unmount, size,
//! destroy, and what happens when a guest leaves and when the run ends. One mount = one entry
//! in the guest's second-level table; one unmount = one entry cleared, the intermediate
//! tables it left empty freed, and one invalidation of the guest's cached translations.
//! The decisions are `vmcore::directory`'s (host-tested); here: names read from guest memory,
//! the log lines, persistent records, device mounts, and the shootdown.

use super::persist::{self, Source};
use super::{read_hashed, Directory, Name, Named, PendingCreate, Removed, Started, RESTORED};
use crate::devices::Devices;
use crate::mm::frames::{Frames, Identity, IDENTITY};
use crate::vm::guest::{Guest, GuestSpace};
use crate::vm::hypercall::{Hv, Under};
use crate::vm::shootdown::{Flush, Hw};
use crate::vm::Backend;
use abi::{self, Error};
use formats::units::Bytes;
use morsel::{Format, FormatKind, GuestPhysAddr, Morsel, PageSize};
use vmcore::directory::{self, Entered, Mounted, Refusal, Unmounted};
use vmcore::hypercall::Deferred;
use vmcore::names::Ticket;
use vmcore::region_lock::Contender;

impl<F: Format<Input = GuestPhysAddr>> Directory<F> {
    /// `morsel_create(name_ptr, name_len, size, flags)`. The name is reserved first
    /// (`vmcore::names`: `Busy` if it exists or is reserved, `NoMemory` past the quota). A
    /// persistent morsel takes its frames from the persistent region and gets a directory
    /// record after its subtree is complete (all under the world lock: `Started::Done`). A
    /// RAM morsel is only checked here (its size against the free memory): the caller builds
    /// it with the lock let go (`PendingCreate::build`: frames, tables, zeroed data), and
    /// `create_finish` commits the name and mounts it (`Started::Build`, holding the
    /// reservation).
    pub fn create<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, name: abi::Name, size: u64, flags: abi::CreateFlags) -> Result<Started<F>, Error> {
        let frames = &Frames::here();
        let hashed = read_hashed(g, self.named.keys(), name)?;
        let name = *hashed.name();
        let page = if flags.huge_pages { PageSize::Size2M } else { PageSize::Size4K };
        if size == 0 || !size.is_multiple_of(page.bytes()) {
            return Err(g.refuse(Error::Invalid, format_args!("size {} is not a positive multiple of the {} page", Bytes(size), Bytes(page.bytes()))));
        }
        if size > morsel::MAX_MORSEL || size > abi::MORSEL_WINDOW_SIZE {
            return Err(g.refuse(Error::TooLarge, format_args!("size {} is above the largest morsel, {}", Bytes(size), Bytes(morsel::MAX_MORSEL.min(abi::MORSEL_WINDOW_SIZE)))));
        }
        // Each reservation (this one included) takes a mount slot when it is entered.
        let reserved = directory::reserve(&mut self.named, &g.space.lock().mounts, g.id, &hashed);
        let ticket = reserved.map_err(|e| match e {
            Refusal::Name(vmcore::names::Error::Taken) => g.refuse(Error::Busy, format_args!("the name {name:?} is taken")),
            e => e.error(),
        })?;
        let others_may_write = flags.share_writable;
        let pm = match (flags.persistent, self.pmem) {
            (false, _) => None,
            (true, Some(pm)) if pm.claim_format(F::KIND).is_ok() => Some(pm),
            (true, _) => return Err(self.give_up(ticket, Error::Invalid)),
        };
        // More than the free RAM fails at once, not after taking (and giving back) all of it.
        if pm.is_none() && size / 4096 > frames.free_frames() as u64 {
            let free = Bytes(frames.free_frames() as u64 * 4096);
            let e = g.refuse(Error::NoMemory, format_args!("size {} is more than the free memory, {free}", Bytes(size)));
            return Err(self.give_up(ticket, e));
        }
        let Some(pm) = pm else {
            return Ok(Started::Build(PendingCreate { ticket, size, page, others_may_write, built: None }));
        };
        let source = Source::Pmem(pm.frames());
        let no_memory = |e| match e {
            morsel::Error::OutOfMemory => Error::NoMemory,
            _ => Error::Invalid,
        };
        let morsel = match Morsel::<F>::create(size, page, &source, &IDENTITY) {
            Ok(m) => m,
            Err(e) => return Err(self.give_up(ticket, no_memory(e))),
        };
        let Some(slot) = persist::add_record(pm, ticket.name(), &morsel, page, others_may_write) else {
            let _ = morsel.destroy(&source, &IDENTITY);
            return Err(self.give_up(ticket, Error::NoMemory));
        };
        self.enter(g, ticket, Named::new(morsel, g.id, others_may_write, Some(slot))).map(Started::Done)
    }

    /// Aborts a reservation whose create failed with `e`.
    fn give_up(&mut self, ticket: Ticket, e: Error) -> Error {
        self.named.abort(ticket);
        e
    }

    /// The rest of a RAM morsel's `create` once it is built (`Started::Build`): its reserved
    /// name committed, mounted read-write in `g`; a build that failed (out of memory) gives
    /// the name back and answers its refusal.
    pub fn create_finish<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, p: PendingCreate<F>) -> Result<u64, Error> {
        let PendingCreate { ticket, size, others_may_write, built, .. } = p;
        match built {
            Some(Ok(morsel)) => self.enter(g, ticket, Named::new(morsel, g.id, others_may_write, None)),
            Some(Err(Error::NoMemory)) => {
                let e = g.refuse(Error::NoMemory, format_args!("size {}: out of frames while building it", Bytes(size)));
                Err(self.give_up(ticket, e))
            }
            Some(Err(e)) => Err(self.give_up(ticket, e)),
            // Never here (`run` builds it before the call finishes).
            None => Err(self.give_up(ticket, Error::Invalid)),
        }
    }

    /// A `PendingCreate` whose guest is gone: the reservation is aborted, the frames go back.
    pub fn abandon(&mut self, p: PendingCreate<F>) {
        let frames = &Frames::here();
        self.named.abort(p.ticket);
        if let Some(Ok(morsel)) = p.built {
            let _ = morsel.destroy(frames, &IDENTITY);
        }
    }

    /// Commits a complete new morsel or region `n` under its reservation `ticket` and mounts
    /// it read-write in `g`; a failed mount destroys it again.
    fn enter<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, ticket: Ticket, n: Named<F>) -> Result<u64, Error> {
        let frames = &Frames::here();
        let name = *ticket.name();
        let (page, region) = (n.morsel.page_size(), n.region.is_some());
        if !region {
            log::info!(target: "morsel", "guest {} created '{name}': {} of {} pages, root L{}, {} tables{}",
                g.id, Bytes(n.morsel.len()), if page == PageSize::Size2M { "2 MiB" } else { "4 KiB" },
                n.morsel.root_level(), n.morsel.table_count(),
                InPmem(n.slot));
        }
        let entered = directory::enter(&mut self.named, &mut g.space.lock().view(g.id), ticket, n, frames, &IDENTITY);
        match entered {
            Ok(m) => Ok(log_mount(g.id, &name, m)),
            Err(Entered::Refused(e, n)) => {
                // Unreachable (the ticket is this reservation's): refused, never replaced.
                log::error!(target: "morsel", "'{name}': the reservation does not match its entry ({e}): not entered");
                let _ = n.morsel.destroy(frames, &IDENTITY);
                Err(Error::Invalid)
            }
            Err(Entered::Unmounted(e)) => {
                // Nobody can have mounted it yet: give the frames back.
                self.remove(&name);
                Err(e.error())
            }
        }
    }

    /// Adds an ExMap region (a sparse morsel, see `morsels/exmap.rs`) under its reservation,
    /// owned by `g`, and mounts it read-write there; from then on it is shared like any morsel.
    pub(crate) fn add_region<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, ticket: Ticket, morsel: Morsel<F>, others_may_write: bool, stats: super::exmap::RegionStats) -> Result<u64, Error> {
        let mut n = Named::new(morsel, g.id, others_may_write, None);
        n.region = Some(stats);
        // The cell of the slot the name goes into: free (the slot's previous region, if any,
        // was destroyed only with its lock free), its counters from zero.
        let cell = self.cells.get(ticket.slot().index()).ok_or(Error::NoMemory)?;
        cell.reset();
        n.cell = Some(cell);
        self.enter(g, ticket, n)
    }

    /// `morsel_open(name_ptr, name_len, writable)`.
    /// None: an ExMap batch holds the region (`Contender::Mount`): the guest issues the call
    /// again (`hypercall::Action::Retry`), so that the batch's shootdown counts every mount.
    pub fn open<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, name: abi::Name, writable: bool) -> Result<Option<u64>, Error> {
        let frames = &Frames::here();
        let hashed = read_hashed(g, self.named.keys(), name)?;
        let name = *hashed.name();
        let turn = super::turn(g.id, u32::MAX);
        let admit = |n: &Named<F>| n.admit_in_turn(Contender::Mount, turn).is_ok();
        let opened = directory::open(&mut self.named, &mut g.space.lock().view(g.id), &hashed, writable, admit, frames, &IDENTITY);
        match opened {
            Ok(m) => Ok(m.map(|m| log_mount(g.id, &name, m))),
            Err(Refusal::AlreadyMounted) => Err(g.refuse(Error::Busy, format_args!("{name:?} is already mounted in this guest"))),
            Err(e) => Err(e.error()),
        }
    }

    /// `morsel_unmount(gpa)`. The intermediate tables the mount created go with it (else a
    /// later morsel with a larger window would find its slot taken). Returns the shootdown
    /// the caller commits (the guest's CPUs).
    pub fn unmount<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, gpa: u64) -> Result<Flush, Error> {
        let frames = &Frames::here();
        // The emptied tables stay with this CPU until the shootdown is acknowledged.
        let after = crate::vm::shootdown::After(frames);
        let u = directory::unmount(&mut self.named, &mut g.space.lock().view(g.id), gpa, &after, &IDENTITY).map_err(Refusal::error)?;
        log_unmount(g.id, &u);
        Ok(crate::vm::shootdown::of_guest(g))
    }

    /// `morsel_size(gpa)`.
    pub fn size<B: Backend<Format = F>>(&self, g: &Guest<B>, gpa: u64) -> Result<u64, Error> {
        g.space.lock().mounts.at(gpa).map(|m| m.size).ok_or(Error::NotFound)
    }

    /// `morsel_destroy(name_ptr, name_len)`: the owner only, and only while unmounted. A RAM
    /// morsel leaves the directory here and is returned with its name, for the caller to free
    /// its frames with the world lock let go (`Removed::free`); a persistent one is freed here.
    pub fn destroy<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, name: abi::Name) -> Result<Option<Removed<F>>, Error> {
        let hashed = read_hashed(g, self.named.keys(), name)?;
        let name = *hashed.name();
        // Persistent? Read here, not by a second look-up of the name.
        let mut persistent = false;
        let pinned = |n: &Named<F>| {
            persistent = n.slot.is_some();
            if n.in_io {
                Some("has NVMe I/O in flight")
            } else if n.admit(Contender::Destroy).is_err() {
                Some("has an ExMap batch in flight")
            } else {
                None
            }
        };
        match directory::check_destroy(&self.named, &self.devices, g.id, &hashed, pinned) {
            Ok(()) => {}
            Err(Refusal::Pinned(why)) => return Err(g.refuse(Error::Busy, format_args!("{name:?} {why}"))),
            Err(Refusal::Mounted { guests, devices }) => {
                return Err(g.refuse(Error::Busy, format_args!("{name:?} is still mounted ({guests} guest, {devices} device mounts)")))
            }
            Err(e) => return Err(e.error()),
        }
        if persistent {
            self.remove(&name);
            return Ok(None);
        }
        let Some((_, _, mut n)) = self.named.remove_hashed(&hashed) else { return Err(Error::NotFound) };
        self.drop_view(&name, &mut n);
        Ok(Some(Removed { name, morsel: Some(n.morsel) }))
    }

    /// Destroys a morsel that is mounted nowhere (the callers check). A persistent one loses
    /// its record first, then its frames.
    pub(crate) fn remove(&mut self, name: &str) {
        let frames = &Frames::here();
        if let Some((_, _, mut n)) = self.named.remove(name) {
            // Another CPU's unmount of it may still await its acknowledgments.
            crate::vm::shootdown::barrier();
            self.drop_view(name, &mut n);
            let source = match (n.slot, self.pmem) {
                (Some(slot), Some(pm)) => {
                    pm.remove_record(slot);
                    Source::Pmem(pm.frames())
                }
                _ => Source::Ram(*frames),
            };
            let len = n.morsel.len();
            let destroyed = n.morsel.destroy(&source, &IDENTITY);
            if let (Some(_), Some(pm)) = (n.slot, self.pmem) {
                // The frees reach the media before anything else changes there.
                pm.write_back_frees();
            }
            match destroyed {
                Ok(()) => log::info!(target: "morsel", "'{name}' destroyed, {} given back{}", Bytes(len),
                    if n.slot.is_some() { " to persistent memory" } else { "" }),
                Err((_, e)) => log::error!(target: "morsel", "'{name}' cannot be destroyed: {e}"),
            }
        }
    }

    /// Destroys a morsel's device views or EPT twin (their tables are RAM frames, also for a
    /// persistent morsel; data frames stay the morsel's).
    pub(crate) fn drop_view(&self, name: &str, n: &mut Named<F>) {
        if let Some((count, tables, format)) = n.views.destroy() {
            let what = if format == FormatKind::Ept { "twin" } else if count > 1 { "views" } else { "view" };
            log::info!(target: "morsel", "'{name}': {format} {what} destroyed, {tables} tables given back");
        }
    }

    /// Drops every mount of a guest that is leaving (device mounts too), with one commit for
    /// all of them: each device domain invalidated once (its guest mounts need no shootdown:
    /// it has no vCPU left, `shootdown::of_guest`).
    pub fn drop_mounts<B: Backend<Format = F>>(&mut self, g: &mut Guest<B>, mut devices: Option<&mut Devices>) {
        let frames = &Frames::here();
        let mut flush = Flush::none();
        // Emptied tables kept until the commit below is acknowledged.
        let after = crate::vm::shootdown::After(frames);
        self.drop_device_mounts(g.id, devices.as_deref_mut(), &after, &mut flush);
        // The guest's CPUs once for all of its mounts.
        let (id, guest_cpus) = (g.id, crate::vm::shootdown::of_guest(g));
        let dropped = directory::drop_mounts(&mut self.named, &mut g.space.lock().view(id), &after, &IDENTITY, |u| log_unmount(id, &u));
        if dropped > 0 {
            flush.merge(guest_cpus);
        }
        let done = flush.commit(&mut Hw(devices));
        if !done.ok() {
            log::error!(target: "iommu", "guest {} left: the IOTLB of {} device domain(s) could not be invalidated", g.id, done.failed);
        }
    }

    /// Prints the counters of every morsel.
    pub fn log_stats(&self) {
        for e in self.named.iter() {
            let (name, n) = (e.name, e.value);
            log::info!(target: "morsel",
                "stats '{name}': {}, owner {}, mounted now {}, mounts {} ({} PTE writes, {} per mount; +{} for intermediate tables), unmounts {} ({} PTE writes), invalidations {}",
                Bytes(n.morsel.len()),
                Owner(n.owner),
                n.morsel.mount_count(), n.mounts, n.mount_pte_writes,
                n.mount_pte_writes.checked_div(n.mounts).unwrap_or(0), n.path_pte_writes,
                n.unmounts, n.unmount_pte_writes, n.invalidations);
        }
        let alone = |i: usize| ALONE[i].load(core::sync::atomic::Ordering::Relaxed);
        log::info!(target: "morsel", "stats mounts without the world lock: {} opens, {} unmounts, {} sizes", alone(0), alone(1), alone(2));
    }

    /// Destroys every morsel left at the end of the run (all guests are gone).
    pub fn destroy_all(&mut self, devices: Option<&mut Devices>) {
        let frames = &Frames::here();
        if let Some(d) = devices {
            let mut flush = Flush::none();
            while let Some(guest) = self.devices.first().map(|m| m.guest) {
                // No device runs any more, and the run's report counts frames under the
                // lock: the emptied tables go back at once.
                self.drop_device_mounts(guest, Some(&mut *d), frames, &mut flush);
            }
            // Each domain once, before its emptied tables go back.
            let _ = flush.commit(&mut Hw(Some(&mut *d)));
            d.iommu.prune_domains();
            d.iommu.poll_faults();
            let (faults, invalidations) = d.iommu.counters();
            log::info!(target: "iommu", "end of run: {faults} DMA fault(s) reported, {invalidations} IOTLB invalidations ({})", d.iommu.name());
        } else {
            // No IOMMU: no device mount was made.
            let _ = self.devices.take_all();
        }
        while let Some(name) = self.named.first() {
            let persistent = self.named.get(&name).is_some_and(|n| n.value.slot.is_some());
            if !persistent {
                self.remove(&name);
            } else if let Some((_, _, mut n)) = self.named.remove(&name) {
                self.drop_view(&name, &mut n);
                log::info!(target: "pmem", "'{name}' stays in persistent memory ({})", Bytes(n.morsel.len()));
            }
        }
        if let Some(pm) = self.pmem {
            log::info!(target: "pmem", "end of run: {} allocated, {} free", Bytes(pm.allocated_frames() * 4096), Bytes(pm.free_bytes()));
        }
    }
}

/// Opens, unmounts and sizes answered without the world lock (`open_alone`,
/// `unmount_alone`, `size_alone`).
static ALONE: [core::sync::atomic::AtomicU64; 3] = [const { core::sync::atomic::AtomicU64::new(0) }; 3];

/// `morsel_open(name, writable)` of a plain morsel by a vCPU of `guest` with no world lock
/// (`sched::mount_fast`): `dir`'s lock around the look-up and the count only, the guest's
/// own (`space`) around its table (`vmcore::directory::open_begin`). Some((address, size))
/// where it mounted; None where it did not, nothing changed (an ExMap region, or any
/// refusal: the world path takes the call and says why). `me`: the CPU this runs on (the
/// vCPU loop's index), whose allocator handle the tables come from (`percpu::of(me)`: no
/// APIC ID read on this path, which `Frames::here` would add, ~45 Bochs ticks each).
pub(crate) fn open_alone<F: Format<Input = GuestPhysAddr>>(dir: &spin::Mutex<Directory<F>>, space: &spin::Mutex<GuestSpace<F>>,
    guest: u32, name: &vmcore::names::Hashed, writable: bool, me: usize) -> Option<(u64, u64)> {
    let frames = &crate::arch::percpu::of(me).frames();
    let o = directory::open_begin(&mut dir.lock().named, guest, name, writable).ok()??;
    let placed = directory::open_place(&mut space.lock().view(guest), &o, frames, &IDENTITY);
    let size = o.size();
    directory::open_end(&mut dir.lock().named, guest, o, &placed);
    let m = placed.ok()?;
    ALONE[0].fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    Some((log_mount(guest, name.name(), m), size))
}

/// `morsel_unmount(gpa)` of a plain morsel's mount by a vCPU of `guest` with no world lock
/// (`sched::mount_fast`): the entry cleared under the guest's own lock, the shootdown of the
/// CPUs `guest_cpus` names committed (awaited by the caller, `shootdown::complete`, before
/// the guest runs again; the emptied tables kept until then, `After`), and only then the
/// mount's count given back under `dir`'s lock, so a destroy that follows frees the frames
/// behind that shootdown (`shootdown::barrier`). None where it did not unmount, nothing
/// changed (no mount there, an ExMap region's, one with a notify subscription): the world
/// path takes the call. `me`: the CPU this runs on, as for `open_alone`.
pub(crate) fn unmount_alone<F: Format<Input = GuestPhysAddr>>(dir: &spin::Mutex<Directory<F>>, space: &spin::Mutex<GuestSpace<F>>,
    guest: u32, gpa: u64, guest_cpus: impl FnOnce() -> u64, me: usize) -> Option<()> {
    let frames = &crate::arch::percpu::of(me).frames();
    let after = crate::vm::shootdown::After(frames);
    let u = directory::unmount_begin(&mut space.lock().view(guest), gpa, &after, &IDENTITY).ok()??;
    log_unmount(guest, &u);
    // After the entry is cleared: a CPU not named here enters the guest only after it.
    let _ = Flush::cpus(guest_cpus()).commit(&mut Hw(None));
    directory::unmount_end(&mut dir.lock().named, guest, &u);
    ALONE[1].fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    Some(())
}

/// `morsel_size(gpa)` from the guest's own mount list, with no world lock
/// (`sched::mount_fast`); None (the world path answers `NotFound`) where nothing is mounted
/// at `gpa`.
pub(crate) fn size_alone<F: Format<Input = GuestPhysAddr>>(space: &spin::Mutex<GuestSpace<F>>, gpa: u64) -> Option<u64> {
    let size = space.lock().mounts.at(gpa)?.size;
    ALONE[2].fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    Some(size)
}

/// The identity map for building a new RAM morsel, without zeroing its data frames
/// (`PendingCreate::build` zeroes them after, 2 MiB at a time, answering shootdowns);
/// tables are zeroed.
pub(super) struct TablesOnly;

impl morsel::PhysMem for TablesOnly {
    fn read(&self, table: morsel::HostPhysAddr, index: usize) -> u64 {
        Identity.read(table, index)
    }
    fn write(&self, table: morsel::HostPhysAddr, index: usize, value: u64) {
        Identity.write(table, index, value)
    }
    fn zero_table(&self, table: morsel::HostPhysAddr) {
        Identity.zero_table(table)
    }
    fn zero_data(&self, _: morsel::HostPhysAddr, _: u32) {}
}

/// Logs a guest mount (the text scenarios match) and returns its address.
fn log_mount(guest: u32, name: &Name, m: Mounted) -> u64 {
    let (gpa, stats) = (m.addr, m.stats);
    log::info!(target: "morsel", "'{name}' mounted {} into guest {guest} at {gpa:#x}: {} PTE write (+{} for new intermediate tables)",
        if m.writable { "read-write" } else { "read-only" }, stats.entry_writes, stats.path_writes);
    log::info!(target: "evt", "morsel.mount guest={guest} name={name} writable={} gpa={gpa:#x} pte_writes={} path_writes={}",
        u8::from(m.writable), stats.entry_writes, stats.path_writes);
    gpa
}

/// Logs a guest unmount (the text scenarios match); the caller commits its shootdown.
fn log_unmount(guest: u32, u: &Unmounted) {
    let (m, stats) = (&u.mount, u.stats);
    log::info!(target: "morsel", "'{}' unmounted from guest {guest} at {:#x}: {} PTE write, 1 invalidation, {} empty intermediate tables freed",
        m.name, m.gpa, stats.entry_writes, stats.path_writes);
    log::info!(target: "evt", "morsel.unmount guest={guest} name={} gpa={:#x} pte_writes={} invalidations=1 tables_freed={}",
        m.name, m.gpa, stats.entry_writes, stats.path_writes);
}

/// `, in persistent memory (record N)` for a persistent morsel, nothing otherwise: written
/// into the log line, no allocation on the guest's `morsel_create` path.
struct InPmem(Option<usize>);

impl core::fmt::Display for InPmem {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(i) => write!(f, ", in persistent memory (record {i})"),
            None => Ok(()),
        }
    }
}

/// A morsel's owner in `log_stats` (which a guest's `morsel_stats` triggers): no allocation.
struct Owner(u32);

impl core::fmt::Display for Owner {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            RESTORED => f.write_str("none (restored from persistent memory)"),
            id => write!(f, "guest {id}"),
        }
    }
}

/// `morsel_create` of a RAM morsel, deferred (`Started::Build`): built with the world lock
/// let go, then entered and mounted under it (`create_finish`), or, its guest gone, its
/// reservation aborted and its frames given back (`Directory::abandon`).
impl<B: Backend> Deferred<Hv<B>> for PendingCreate<B::Format> {
    fn run(&mut self, frames: &Frames) {
        self.build(frames);
    }

    fn finish(self, w: Under<'_, B>, g: &mut Guest<B>) -> Result<u64, Error> {
        let cx = w.cx;
        cx.morsels.lock().create_finish(g, self).inspect(|&gpa| cx.notify.entered(g, gpa, w.cpu))
    }

    fn abandon(self, w: Under<'_, B>) {
        w.cx.morsels.lock().abandon(self);
    }
}

/// `morsel_destroy` of a RAM morsel, deferred (`destroy`): out of the directory under the
/// world lock, its frames freed with the lock let go (`Removed::free`); nothing is left to
/// end under it.
impl<B: Backend> Deferred<Hv<B>> for Removed<B::Format> {
    fn run(&mut self, frames: &Frames) {
        self.free(frames);
    }

    fn finish(self, _: Under<'_, B>, _: &mut Guest<B>) -> Result<u64, Error> {
        Ok(0)
    }

    fn abandon(self, _: Under<'_, B>) {}
}
