//! Morsels from the guest side: create a named morsel and get `&mut [u8]`, open one by name
//! read-only (`&[u8]`) or read-write (`&mut [u8]`). The hypervisor mounts it into this
//! guest's morsel window, which the guest's identity paging already covers, so the object
//! is plain memory; dropping the handle unmounts it.

use crate::abi::{self, Error};
use crate::hypercall::{call, call_mount};
use core::ops::{Deref, DerefMut};
use core::sync::atomic::AtomicU64;

/// Page size of a morsel's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB frames (any size that is a multiple of 4 KiB).
    Size4K,
    /// 2 MiB frames (`MORSEL_HUGE_PAGES`; sizes a multiple of 2 MiB).
    Size2M,
}

/// A mounted morsel (read-only unless obtained as `MorselMut`).
pub struct MorselRef {
    gpa: u64,
    len: usize,
}

/// A morsel mounted read-write.
pub struct MorselMut(MorselRef);

/// A mount from `call_mount`: its address and size come in one answer.
fn mounted((gpa, len): (u64, u64)) -> MorselRef {
    MorselRef { gpa, len: len as usize }
}

/// Creates the morsel `name` of `size` bytes and mounts it read-write. `share_writable`
/// lets other guests open it read-write too.
pub fn create(name: &str, size: u64, page: PageSize, share_writable: bool) -> Result<MorselMut, Error> {
    create_with(name, size, page, share_writable, 0)
}

/// The same in persistent memory: the morsel outlives this run (and a crash) until someone
/// destroys it; after a reboot any guest may open it (read-write if `share_writable`).
/// `Invalid` where the machine has no persistent memory.
pub fn create_persistent(name: &str, size: u64, page: PageSize, share_writable: bool) -> Result<MorselMut, Error> {
    create_with(name, size, page, share_writable, abi::MORSEL_PERSISTENT)
}

fn create_with(name: &str, size: u64, page: PageSize, share_writable: bool, mut flags: u64) -> Result<MorselMut, Error> {
    if page == PageSize::Size2M {
        flags |= abi::MORSEL_HUGE_PAGES;
    }
    if share_writable {
        flags |= abi::MORSEL_SHARE_WRITABLE;
    }
    let m = call_mount(abi::HC_MORSEL_CREATE, [name.as_ptr() as u64, name.len() as u64, size, flags, 0, 0])?;
    Ok(MorselMut(mounted(m)))
}

/// The pending bit `open_when_created` and `await_name` use for their name watch (keep it
/// out of your doorbells' bits).
pub const WATCH_BIT: crate::notify::Event = crate::notify::Event(1 << 63);

/// Blocks the calling vCPU until a morsel or ExMap region named `name` exists, or `timeout`
/// passed (`Ok(false)`): a rendezvous with a peer that has not created it yet, without
/// polling (`HC_NAME_WATCH` + `wait` on `WATCH_BIT`; a few hypercalls in all).
pub fn await_name(name: &str, timeout: crate::notify::Timeout) -> Result<bool, Error> {
    use crate::notify::{self, Timeout};
    let deadline = match timeout {
        Timeout::Micros(us) => Some(notify::micros().saturating_add(us)),
        _ => None,
    };
    loop {
        if crate::notify::watch_name(name, WATCH_BIT)? {
            // It is there; take the bit the watch set.
            let _ = notify::wait(WATCH_BIT, Timeout::Poll);
            return Ok(true);
        }
        let left = match deadline {
            Some(d) => match d.checked_sub(notify::micros()) {
                Some(us) if us > 0 => Timeout::Micros(us),
                _ => break,
            },
            None => timeout,
        };
        // A virtual interrupt also ends the wait (0 bits): watch again.
        if notify::wait(WATCH_BIT, left)? != crate::notify::Event(0) {
            return Ok(true);
        }
        if timeout == Timeout::Poll {
            break;
        }
    }
    let _ = crate::notify::watch_name(name, crate::notify::Event(0));
    Ok(false)
}

/// `open`, waiting (without polling) until the morsel exists: the consumer's side of a
/// rendezvous with a producer that may not have created it yet.
pub fn open_when_created(name: &str) -> Result<MorselRef, Error> {
    loop {
        match open(name) {
            Err(Error::NotFound) => {
                await_name(name, crate::notify::Timeout::Forever)?;
            }
            other => return other,
        }
    }
}

/// `open_mut`, waiting (without polling) until the morsel exists.
pub fn open_mut_when_created(name: &str) -> Result<MorselMut, Error> {
    loop {
        match open_mut(name) {
            Err(Error::NotFound) => {
                await_name(name, crate::notify::Timeout::Forever)?;
            }
            other => return other,
        }
    }
}

/// Mounts the morsel `name` read-only.
pub fn open(name: &str) -> Result<MorselRef, Error> {
    call_mount(abi::HC_MORSEL_OPEN, [name.as_ptr() as u64, name.len() as u64, 0, 0, 0, 0]).map(mounted)
}

/// Mounts the morsel `name` read-write (if its owner allows).
pub fn open_mut(name: &str) -> Result<MorselMut, Error> {
    let m = call_mount(abi::HC_MORSEL_OPEN, [name.as_ptr() as u64, name.len() as u64, 1, 0, 0, 0])?;
    Ok(MorselMut(mounted(m)))
}

/// Destroys the morsel `name` (the owner's, mounted nowhere).
pub fn destroy(name: &str) -> Result<(), Error> {
    call(abi::HC_MORSEL_DESTROY, [name.as_ptr() as u64, name.len() as u64, 0, 0, 0, 0]).map(|_| ())
}

/// Asks the hypervisor to print its morsel counters.
pub fn print_stats() {
    let _ = call(abi::HC_MORSEL_STATS, [0; 6]);
}

impl MorselRef {
    /// Guest-physical address of the mount.
    pub fn addr(&self) -> u64 {
        self.gpa
    }

    /// The morsel as 64-bit atomics: the sound view of memory that other vCPUs or guests
    /// change while this one reads (a `&[u8]` promises that nobody writes it). On a
    /// read-only mount a store through it is a second-level fault that stops the guest.
    pub fn atomics(&self) -> &[AtomicU64] {
        // SAFETY: the mount is `len` bytes at `gpa` (4 KiB aligned, so 8-byte aligned),
        // mounted until this handle drops; AtomicU64 has the layout of u64 and allows
        // concurrent access from anywhere.
        unsafe { core::slice::from_raw_parts(self.gpa as *const AtomicU64, self.len / 8) }
    }
}

impl Deref for MorselRef {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the hypervisor mounted `len` bytes at `gpa`, identity-mapped in this
        // guest, and keeps them mounted until this handle is dropped.
        unsafe { core::slice::from_raw_parts(self.gpa as *const u8, self.len) }
    }
}

impl Drop for MorselRef {
    fn drop(&mut self) {
        let _ = call(abi::HC_MORSEL_UNMOUNT, [self.gpa, 0, 0, 0, 0, 0]);
    }
}

impl MorselMut {
    /// Guest-physical address of the mount.
    pub fn addr(&self) -> u64 {
        self.0.gpa
    }

    /// The morsel as 64-bit atomics (see `MorselRef::atomics`), for a morsel that others
    /// write at the same time; stores through it reach every party.
    pub fn atomics(&self) -> &[AtomicU64] {
        self.0.atomics()
    }
}

/// The morsel mounted at `gpa` in this guest, as atomics, for a vCPU that did not mount it
/// itself (another vCPU of the same guest holds the handle, and must keep it until this
/// vCPU is done with the view): `None` if nothing is mounted there.
pub fn atomics_at(gpa: u64) -> Option<&'static [AtomicU64]> {
    let len = call(abi::HC_MORSEL_SIZE, [gpa, 0, 0, 0, 0, 0]).ok()? as usize;
    // SAFETY: the hypervisor says a morsel of `len` bytes is mounted at `gpa` in this guest;
    // atomics allow concurrent access; the caller keeps the mount (documented above) —
    // after an unmount an access is a second-level fault, never another object's memory.
    Some(unsafe { core::slice::from_raw_parts(gpa as *const AtomicU64, len / 8) })
}

impl Deref for MorselMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for MorselMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for MorselRef::deref; the mount is writable and this handle is the
        // only one of this guest for this mount.
        unsafe { core::slice::from_raw_parts_mut(self.0.gpa as *mut u8, self.0.len) }
    }
}
