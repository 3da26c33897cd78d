//! A guest's memory: its second-level table (EPT or NPT) over 2 MiB frames of RAM, with
//! typed, checked access for the hypervisor (vm-memory's `GuestMemory` + `Bytes` are the
//! model): every read or write of guest memory goes through [`GuestMemory::translate`], which
//! honours the guest's own rights, and fails with a [`MemError`] instead of stopping silently.
//! Bytes are copied through [`GuestBytes`] (raw pointers, never a `&[u8]` over guest memory:
//! the guest's other vCPUs and devices may write it meanwhile).
//!
//! Generic over the frame allocator (`morsel::FrameAlloc`) and over physical memory
//! ([`DataMem`]: the tables' `PhysMem` plus a way to reach data frames), so that it runs on
//! the host over a simulated machine (tests below); the hypervisor supplies its allocator
//! handle and its identity map (`vm/memory.rs`).

use crate::guestbytes::GuestBytes;
use core::fmt;
use morsel::{Format, FrameAlloc, GuestPhysAddr, HostPhysAddr, PageSize, Perm, PhysMem, SecondLevelTable};

#[cfg(test)]
pub(crate) mod tests;

/// Physical memory as guest memory needs it: the tables' entries (`PhysMem`) and the bytes of
/// data frames (guest RAM, morsels).
pub trait DataMem: PhysMem {
    /// The `n` bytes at host-physical `hpa`.
    ///
    /// # Safety
    /// `hpa..hpa + n` lies in data frames that a guest's second-level table translates to and
    /// that stay allocated while the value is used (`GuestBytes::new`'s contract).
    unsafe fn bytes(&self, hpa: HostPhysAddr, n: usize) -> GuestBytes;
}

impl<T: DataMem + ?Sized> DataMem for &T {
    unsafe fn bytes(&self, hpa: HostPhysAddr, n: usize) -> GuestBytes {
        // SAFETY: forwarded from the caller.
        unsafe { (**self).bytes(hpa, n) }
    }
}

/// Why guest memory could not be accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemError {
    /// Nothing is mapped there (outside guest RAM and its mounts).
    Unmapped(GuestPhysAddr),
    /// Mapped, but not with the rights the access needs (a write to a read-only mount).
    Denied(GuestPhysAddr),
    /// The range wraps around the end of the address space.
    Overflow,
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            MemError::Unmapped(at) => write!(f, "nothing mapped at guest-physical {at}"),
            MemError::Denied(at) => write!(f, "no access at guest-physical {at}"),
            MemError::Overflow => write!(f, "the range wraps around"),
        }
    }
}

impl From<MemError> for abi::Error {
    fn from(_: MemError) -> abi::Error {
        abi::Error::BadAddress
    }
}

/// Why guest RAM could not be mapped.
#[derive(Debug, PartialEq, Eq)]
pub enum MapError {
    NoMemory,
    Table(morsel::Error),
}

/// The guest-physical address space of one guest, over physical memory `M`.
pub struct GuestMemory<F: Format<Input = GuestPhysAddr>, M: DataMem> {
    table: SecondLevelTable<F>,
    /// Guest RAM is [0, ram): 2 MiB frames mapped read-write-execute.
    ram: u64,
    mem: M,
}

const MIB2: u64 = 2 << 20;
/// The allocator order of a 2 MiB frame.
const HUGE: u32 = 9;

impl<F: Format<Input = GuestPhysAddr>, M: DataMem> GuestMemory<F, M> {
    /// An empty table; `map_ram` fills it.
    pub fn new(alloc: &impl FrameAlloc, mem: M) -> Result<Self, morsel::Error> {
        Ok(GuestMemory { table: SecondLevelTable::new(alloc, &mem)?, ram: 0, mem })
    }

    /// Maps `size` bytes of zeroed RAM at guest-physical 0 in 2 MiB frames. On failure what
    /// was mapped stays mapped (and `release` frees it).
    pub fn map_ram(&mut self, size: u64, alloc: &impl FrameAlloc) -> Result<(), MapError> {
        while self.ram < size {
            let frame = alloc.alloc(HUGE).ok_or(MapError::NoMemory)?;
            self.mem.zero_data(frame, HUGE);
            if let Err(e) = self.table.map(GuestPhysAddr::new(self.ram), frame, PageSize::Size2M, Perm::RWX, alloc, &self.mem) {
                alloc.free(frame, HUGE);
                return Err(MapError::Table(e));
            }
            self.ram += MIB2;
        }
        Ok(())
    }

    /// The bytes of guest RAM mapped so far.
    pub fn ram(&self) -> u64 {
        self.ram
    }

    /// The table's root (the EPTP / nCR3 target).
    pub fn root(&self) -> HostPhysAddr {
        self.table.root()
    }

    /// The table itself, for mounting and unmounting morsels.
    pub fn table_mut(&mut self) -> &mut SecondLevelTable<F> {
        &mut self.table
    }

    /// The host-physical address of `gpa` if the guest may access it with `need` rights, and
    /// how many bytes from there on are contiguous (to the end of that page).
    pub fn translate(&self, gpa: GuestPhysAddr, need: Perm) -> Result<(HostPhysAddr, u64), MemError> {
        let t = self.table.translate(gpa, &self.mem).ok_or(MemError::Unmapped(gpa))?;
        if (need.read && !t.perm.read) || (need.write && !t.perm.write) {
            return Err(MemError::Denied(gpa));
        }
        let page_left = t.size.bytes() - (gpa.as_u64() & (t.size.bytes() - 1));
        Ok((t.addr, page_left))
    }

    /// Whether anything is mapped at `gpa` (with any rights).
    pub fn is_mapped(&self, gpa: GuestPhysAddr) -> bool {
        self.translate(gpa, Perm::NONE).is_ok()
    }

    /// Copies guest memory at `gpa` into `out`; fails, having copied part, if any byte is not
    /// readable by the guest. This is how hypercall pointers are read.
    pub fn read(&self, gpa: GuestPhysAddr, out: &mut [u8]) -> Result<(), MemError> {
        self.walk(gpa, out.len(), Perm::RO, |piece, done| {
            let n = piece.len();
            // Cannot fail: `walk` hands out pieces of exactly the asked length.
            let _ = piece.copy_to(0, &mut out[done..done + n]);
        })
    }

    /// Copies `bytes` into guest memory at `gpa`; fails, having copied part, if any byte is
    /// not writable by the guest.
    pub fn write(&mut self, gpa: GuestPhysAddr, bytes: &[u8]) -> Result<(), MemError> {
        self.walk(gpa, bytes.len(), Perm::RW, |piece, done| {
            let _ = piece.copy_from(0, &bytes[done..done + piece.len()]);
        })
    }

    /// A little-endian u64 at `gpa`: one read where it lies in one page (a volatile load
    /// where aligned), byte copies where it straddles two.
    pub fn read_u64(&self, gpa: GuestPhysAddr) -> Result<u64, MemError> {
        let (hpa, left) = self.translate(gpa, Perm::RO)?;
        if left >= 8 {
            // SAFETY: 8 bytes the guest may read, translated through its table (`bytes_at`).
            let piece = unsafe { self.bytes_at(hpa, 8) };
            return piece.read_u64_volatile(0).or_else(|_| piece.read_u64(0)).map_err(|_| MemError::Overflow);
        }
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Calls `each(piece, offset)` for the host-contiguous pieces of `gpa..gpa+len` (each
    /// exactly as long as its part of the range), checking `need` on each.
    fn walk(&self, gpa: GuestPhysAddr, len: usize, need: Perm, mut each: impl FnMut(GuestBytes, usize)) -> Result<(), MemError> {
        gpa.as_u64().checked_add(len as u64).ok_or(MemError::Overflow)?;
        let mut done = 0;
        while done < len {
            let at = GuestPhysAddr::new(gpa.as_u64() + done as u64);
            let (hpa, left) = self.translate(at, need)?;
            let n = (left as usize).min(len - done);
            // SAFETY: translated through the guest's own table with `need` rights, and n
            // bytes to the end of that page at most (`bytes_at`).
            each(unsafe { self.bytes_at(hpa, n) }, done);
            done += n;
        }
        Ok(())
    }

    /// `n` bytes of guest memory at `hpa` as `GuestBytes`.
    ///
    /// # Safety
    /// `hpa..hpa+n` was translated through this guest's second-level table (guest RAM, freed
    /// only by `release`, or a mounted morsel's frames, freed only after every mount is gone
    /// and the shootdown acknowledged): it stays allocated while the caller, which holds the
    /// guest's memory, uses the value.
    unsafe fn bytes_at(&self, hpa: HostPhysAddr, n: usize) -> GuestBytes {
        // SAFETY: forwarded from the caller (`DataMem::bytes`' contract).
        unsafe { self.mem.bytes(hpa, n) }
    }

    /// Gives guest RAM and the tables back (mounts must be gone: their subtrees are the
    /// morsels', not this table's).
    pub fn release(mut self, alloc: &impl FrameAlloc) -> Result<(), morsel::Error> {
        let mut gpa = 0;
        while gpa < self.ram {
            if let Ok(frame) = self.table.unmap(GuestPhysAddr::new(gpa), PageSize::Size2M, &self.mem) {
                alloc.free(frame, HUGE);
            }
            gpa += MIB2;
        }
        self.table.destroy(alloc, &self.mem).map_err(|(_, e)| e)
    }
}
