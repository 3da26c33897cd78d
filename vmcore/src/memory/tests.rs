//! Guest memory over a simulated machine whose data frames hold bytes (`Backed`): RAM
//! mapping, reads and writes across frames, the guest's rights, wrap-around, and every frame
//! back at the end.

use super::*;
use morsel::{Npt, SimMem};
use std::boxed::Box;
use std::cell::RefCell;
use std::collections::HashMap;
use std::vec;
use std::vec::Vec;

const MIB: u64 = 1 << 20;

/// `SimMem` (tables, frame addresses) plus bytes for data frames, made on first touch, one
/// buffer per 2 MiB-aligned range (a 4 KiB frame lives in its range's buffer).
pub(crate) struct Backed {
    pub(crate) sim: SimMem,
    data: RefCell<HashMap<u64, Box<[u8]>>>,
}

impl Backed {
    pub(crate) fn new(bytes: u64) -> Backed {
        Backed { sim: SimMem::new(bytes), data: RefCell::new(HashMap::new()) }
    }

    /// The buffer of the 2 MiB range holding `hpa`, and `hpa`'s offset in it.
    fn range(&self, hpa: u64) -> (*mut u8, usize) {
        let base = hpa & !(MIB2 - 1);
        let mut data = self.data.borrow_mut();
        // Filled with a pattern: a frame the guest memory hands out must have been zeroed.
        let buf = data.entry(base).or_insert_with(|| vec![0xa5u8; MIB2 as usize].into_boxed_slice());
        (buf.as_mut_ptr(), (hpa - base) as usize)
    }
}

impl PhysMem for Backed {
    fn read(&self, table: HostPhysAddr, index: usize) -> u64 {
        self.sim.read(table, index)
    }
    fn write(&self, table: HostPhysAddr, index: usize, value: u64) {
        self.sim.write(table, index, value)
    }
    fn zero_table(&self, table: HostPhysAddr) {
        self.sim.zero_table(table)
    }
    fn zero_data(&self, frame: HostPhysAddr, order: u32) {
        let (ptr, off) = self.range(frame.as_u64());
        // SAFETY: the frame's `4 KiB << order` bytes lie inside its range's 2 MiB buffer
        // (order <= 9, frames aligned to their size), which lives as long as `self`.
        unsafe { core::ptr::write_bytes(ptr.add(off), 0, 4096 << order) }
    }
}

impl DataMem for Backed {
    unsafe fn bytes(&self, hpa: HostPhysAddr, n: usize) -> GuestBytes {
        let (ptr, off) = self.range(hpa.as_u64());
        assert!(off + n <= MIB2 as usize, "a piece crosses a 2 MiB range: {hpa:?} + {n}");
        // SAFETY: inside the range's buffer, which lives (never moved: boxed) as long as
        // `self`; the tests use each value before they drop the machine.
        unsafe { GuestBytes::new(ptr.add(off), n) }
    }
}

pub(crate) fn machine() -> &'static Backed {
    Box::leak(Box::new(Backed::new(1 << 30)))
}

fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(a)
}

fn ram(m: &'static Backed, size: u64) -> GuestMemory<Npt, &'static Backed> {
    let mut g = GuestMemory::new(&m.sim, m).unwrap();
    g.map_ram(size, &m.sim).unwrap();
    g
}

#[test]
fn ram_is_mapped_zeroed_and_read_write_execute() {
    let m = machine();
    let g = ram(m, 5 * MIB);
    assert_eq!(g.ram(), 6 * MIB, "rounded up to whole 2 MiB frames");
    for a in [0, 4095, 2 * MIB, 6 * MIB - 1] {
        let (_, left) = g.translate(gpa(a), Perm::RW).unwrap();
        assert_eq!(left, MIB2 - a % MIB2, "{a:#x}: bytes to the end of its 2 MiB page");
        assert!(g.is_mapped(gpa(a)));
    }
    assert_eq!(g.translate(gpa(6 * MIB), Perm::RO), Err(MemError::Unmapped(gpa(6 * MIB))));
    assert!(!g.is_mapped(gpa(6 * MIB)));
    let mut b = vec![0xffu8; 64];
    g.read(gpa(2 * MIB - 32), &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "fresh RAM reads as zeros: {b:x?}");
    g.release(&m.sim).unwrap();
    assert_eq!(m.sim.allocated_frames(), 0, "every frame and table back");
}

#[test]
fn bytes_cross_frames_and_come_back() {
    let m = machine();
    let mut g = ram(m, 8 * MIB);
    let bytes: Vec<u8> = (0..3 * MIB as usize + 17).map(|i| (i * 7 + i / 4096) as u8).collect();
    // Starts 5 bytes before a frame's end and spans two boundaries.
    let at = 2 * MIB - 5;
    g.write(gpa(at), &bytes).unwrap();
    let mut back = vec![0u8; bytes.len()];
    g.read(gpa(at), &mut back).unwrap();
    assert!(back == bytes, "read back what was written across 2 MiB frames");
    // The same bytes through each piece: one frame's last bytes and the next one's first.
    let mut edge = [0u8; 10];
    g.read(gpa(4 * MIB - 5), &mut edge).unwrap();
    let from = (4 * MIB - 5 - at) as usize;
    assert_eq!(&edge[..], &bytes[from..from + 10]);
    // u64s: aligned, unaligned inside a page, straddling two frames.
    for a in [at + 3, 4 * MIB - 8, 4 * MIB - 3] {
        let i = (a - at) as usize;
        let want = u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        assert_eq!(g.read_u64(gpa(a)), Ok(want), "u64 at {a:#x}");
    }
    assert_eq!(g.read_u64(gpa(8 * MIB - 4)), Err(MemError::Unmapped(gpa(8 * MIB))), "its last 4 bytes are past RAM");
    g.release(&m.sim).unwrap();
    assert_eq!(m.sim.allocated_frames(), 0);
}

#[test]
fn the_guests_rights_and_its_edges_are_kept() {
    let m = machine();
    let mut g = ram(m, 2 * MIB);
    // A read-only page above RAM, as a read-only mount leaves one.
    let ro = m.sim.alloc(0).unwrap();
    m.zero_data(ro, 0);
    let at = 16 * MIB;
    g.table_mut().map(gpa(at), ro, PageSize::Size4K, Perm::RO, &m.sim, m).unwrap();
    let mut b = [0u8; 16];
    g.read(gpa(at + 8), &mut b).unwrap();
    assert_eq!(g.write(gpa(at + 8), &[1; 16]), Err(MemError::Denied(gpa(at + 8))), "read-only for the guest");
    g.read(gpa(at + 8), &mut b).unwrap();
    assert_eq!(b, [0; 16], "a refused write changed nothing");
    // A read that runs off the page's end fails at the first byte past it.
    let mut long = [0u8; 32];
    assert_eq!(g.read(gpa(at + 4096 - 8), &mut long), Err(MemError::Unmapped(gpa(at + 4096))));
    // A write that runs from RAM into nothing fails where RAM ends.
    assert_eq!(g.write(gpa(2 * MIB - 4), &[7; 8]), Err(MemError::Unmapped(gpa(2 * MIB))));
    // Wrap-around is refused before anything is touched.
    assert_eq!(g.read(gpa(u64::MAX - 3), &mut [0; 8]), Err(MemError::Overflow));
    assert_eq!(g.write(gpa(u64::MAX), &[0; 2]), Err(MemError::Overflow));
    assert_eq!(g.read(gpa(0), &mut []), Ok(()), "an empty read of mapped memory");
    assert_eq!(abi::Error::from(MemError::Denied(gpa(0))), abi::Error::BadAddress);
    assert_eq!(g.table_mut().unmap(gpa(at), PageSize::Size4K, m), Ok(ro));
    m.sim.free(ro, 0);
    g.release(&m.sim).unwrap();
    assert_eq!(m.sim.allocated_frames(), 0);
}

#[test]
fn ram_that_does_not_fit_is_refused_and_given_back() {
    let m = machine();
    // Room for the tables and two 2 MiB frames, not three.
    m.sim.limit_free(2 * 512 + 8);
    let mut g = GuestMemory::<Npt, _>::new(&m.sim, m).unwrap();
    assert_eq!(g.map_ram(6 * MIB, &m.sim), Err(MapError::NoMemory));
    assert_eq!(g.ram(), 4 * MIB, "what fitted stays mapped, for release");
    g.release(&m.sim).unwrap();
    assert_eq!(m.sim.allocated_frames(), 0, "every frame back after a failed map");
}
