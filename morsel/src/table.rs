//! `SecondLevelTable<F>`: one guest's (or one device domain's) second-level page table, and the
//! walk helpers that `Morsel` shares with it. Written once over `Entry<F>` for all formats.
//!
//! Mount entries (marked with `Format::SW_MOUNT`) point into morsels: the table never edits,
//! unmaps or frees anything below them; only `Morsel::unmount` clears them.

use core::marker::PhantomData;

use crate::addr::{index, table_span, HostPhysAddr, InputAddr, Level, PageSize, ENTRIES};
use crate::error::Error;
use crate::format::{Decoded, Entry, Format, Perm};
use crate::mem::{FrameAlloc, PhysMem};

/// The result of a successful translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Translation {
    /// Host-physical address of the translated byte.
    pub addr: HostPhysAddr,
    /// Rights after ANDing every entry of the walk.
    pub perm: Perm,
    /// Size of the leaf that mapped it.
    pub size: PageSize,
}

/// Running counters of a table (the hypervisor adds its invalidations on top).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct TableStats {
    /// Entries written by `map`, `unmap`, mounts and unmounts, including new intermediate tables.
    pub pte_writes: u64,
    /// Table frames allocated (root included).
    pub tables: u64,
}

/// A second-level page table of format `F` with 3 or 4 levels.
///
/// `destroy` frees the table frames this table allocated, never the frames mapped by `map`
/// (they belong to the caller) and never anything below a mount entry (it belongs to a morsel);
/// it is refused while any morsel is mounted, so every `Morsel` mount count stays exact.
pub struct SecondLevelTable<F: Format> {
    pub(crate) root: HostPhysAddr,
    pub(crate) levels: Level,
    pub(crate) mounts: u32,
    pub(crate) stats: TableStats,
    _format: PhantomData<fn() -> F>,
}

impl<F: Format> core::fmt::Debug for SecondLevelTable<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SecondLevelTable")
            .field("format", &F::NAME)
            .field("root", &self.root)
            .field("levels", &self.levels)
            .field("mounts", &self.mounts)
            .finish()
    }
}

impl<F: Format> SecondLevelTable<F> {
    /// An empty table with `F::DEFAULT_LEVELS` levels.
    pub fn new(alloc: &impl FrameAlloc, mem: &impl PhysMem) -> Result<Self, Error> {
        Self::with_levels(F::DEFAULT_LEVELS, alloc, mem)
    }

    /// An empty table with `levels` levels (VT-d: 3 for a 39-bit, 4 for a 48-bit domain).
    pub fn with_levels(
        levels: Level,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<Self, Error> {
        if levels < F::MIN_LEVELS || levels > F::MAX_LEVELS {
            return Err(Error::BadLevels { levels });
        }
        let root = new_table(alloc, mem)?;
        Ok(Self {
            root,
            levels,
            mounts: 0,
            stats: TableStats {
                pte_writes: 0,
                tables: 1,
            },
            _format: PhantomData,
        })
    }

    /// The root table (what goes into the EPTP, the VMCB's nCR3 or a VT-d context entry).
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }
    /// Number of levels.
    pub fn levels(&self) -> Level {
        self.levels
    }
    /// First input address the table cannot translate (2^39 or 2^48).
    pub fn limit(&self) -> u64 {
        table_span(self.levels)
    }
    /// Number of morsels mounted in this table.
    pub fn mounts(&self) -> u32 {
        self.mounts
    }
    /// Running counters.
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// Maps one page of `size` at `at` to `frame` with `perm`, creating intermediate tables.
    pub fn map(
        &mut self,
        at: F::Input,
        frame: HostPhysAddr,
        size: PageSize,
        perm: Perm,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<(), Error> {
        let gpa = at.to_u64();
        if !perm.is_encodable() {
            return Err(Error::BadPerm);
        }
        check_aligned(gpa, size.bytes())?;
        check_aligned(frame.as_u64(), size.bytes())?;
        if frame.as_u64() & !F::ADDR_MASK != 0 {
            return Err(Error::OutOfRange {
                addr: frame.as_u64(),
                limit: F::ADDR_MASK + 4096,
            });
        }
        self.check_range(gpa, size.bytes())?;
        let (table, i) = walk_create::<F>(
            self.root,
            self.levels,
            size.leaf_level(),
            gpa,
            alloc,
            mem,
            &mut self.stats,
        )?;
        if Entry::<F>::from_raw(mem.read(table, i)).is_present() {
            return Err(Error::Occupied { addr: gpa });
        }
        mem.write(table, i, Entry::<F>::leaf(size, frame, perm).raw());
        self.stats.pte_writes += 1;
        Ok(())
    }

    /// Maps `len` bytes at `at` to the contiguous frames at `frame`, using 2 MiB leaves wherever
    /// both sides are 2 MiB aligned and 4 KiB leaves elsewhere. On error nothing stays mapped.
    pub fn map_range(
        &mut self,
        at: F::Input,
        frame: HostPhysAddr,
        len: u64,
        perm: Perm,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<(), Error> {
        let gpa = at.to_u64();
        check_aligned(gpa, 4096)?;
        check_aligned(frame.as_u64(), 4096)?;
        check_aligned(len, 4096)?;
        self.check_range(gpa, len)?;
        match frame.as_u64().checked_add(len) {
            Some(end) if end <= F::ADDR_MASK + 4096 => {}
            _ => {
                return Err(Error::OutOfRange {
                    addr: frame.as_u64(),
                    limit: F::ADDR_MASK + 4096,
                })
            }
        }
        let mut done = 0;
        while done < len {
            let size = self.range_page(gpa + done, frame.as_u64() + done, len - done);
            let r = self.map(
                F::Input::from_u64(gpa + done),
                HostPhysAddr::new(frame.as_u64() + done),
                size,
                perm,
                alloc,
                mem,
            );
            if let Err(e) = r {
                self.unmap_range_mapped(gpa, frame.as_u64(), done, mem);
                return Err(e);
            }
            done += size.bytes();
        }
        Ok(())
    }

    fn range_page(&self, gpa: u64, hpa: u64, left: u64) -> PageSize {
        let big = PageSize::Size2M.bytes();
        if (gpa | hpa) & (big - 1) == 0 && left >= big {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        }
    }

    fn unmap_range_mapped(&mut self, gpa: u64, hpa: u64, len: u64, mem: &impl PhysMem) {
        let mut done = 0;
        while done < len {
            let size = self.range_page(gpa + done, hpa + done, len - done);
            // Mapped by `map_range` just before, so it is there.
            let _ = self.unmap(F::Input::from_u64(gpa + done), size, mem);
            done += size.bytes();
        }
    }

    /// Removes the page of `size` mapped at `at` and returns its frame. Intermediate tables stay
    /// until `destroy`. The caller invalidates TLBs.
    pub fn unmap(
        &mut self,
        at: F::Input,
        size: PageSize,
        mem: &impl PhysMem,
    ) -> Result<HostPhysAddr, Error> {
        let gpa = at.to_u64();
        check_aligned(gpa, size.bytes())?;
        self.check_range(gpa, size.bytes())?;
        let (table, i) = walk_existing::<F>(self.root, self.levels, size.leaf_level(), gpa, mem)?;
        match Entry::<F>::from_raw(mem.read(table, i)).decode(size.leaf_level()) {
            Decoded::Leaf { frame, .. } => {
                mem.write(table, i, Entry::<F>::EMPTY.raw());
                self.stats.pte_writes += 1;
                Ok(frame)
            }
            Decoded::Table { mount: true, .. } => Err(Error::InsideMount { addr: gpa }),
            _ => Err(Error::NotMapped { addr: gpa }),
        }
    }

    /// Walks the table like the hardware does, through mounted morsels: where `at` goes, with
    /// which rights and which leaf size. `None` if not mapped.
    pub fn translate(&self, at: F::Input, mem: &impl PhysMem) -> Option<Translation> {
        let gpa = at.to_u64();
        if gpa >= self.limit() {
            return None;
        }
        let mut table = self.root;
        let mut perm = Perm::RWX;
        for level in (1..=self.levels).rev() {
            match Entry::<F>::from_raw(mem.read(table, index(level, gpa))).decode(level) {
                Decoded::Empty => return None,
                Decoded::Table { next, perm: p, .. } => {
                    perm = perm.and(p);
                    table = next;
                }
                Decoded::Leaf {
                    frame,
                    perm: p,
                    size,
                } => {
                    let addr = HostPhysAddr::new(frame.as_u64() + (gpa & (size.bytes() - 1)));
                    return Some(Translation {
                        addr,
                        perm: perm.and(p),
                        size,
                    });
                }
            }
        }
        None
    }

    /// Whether all `len` bytes from `at` are mapped with at least `need` (guest pointer checks).
    pub fn accessible(&self, at: F::Input, len: u64, need: Perm, mem: &impl PhysMem) -> bool {
        let start = at.to_u64();
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let mut a = start;
        while a < end {
            match self.translate(F::Input::from_u64(a), mem) {
                Some(t) if t.perm.and(need) == need => a = (a | (t.size.bytes() - 1)) + 1,
                _ => return false,
            }
        }
        true
    }

    /// Frees the intermediate tables that map nothing any more (left behind by `unmap` and
    /// morsel unmounts); the root stays, and nothing at or below a mount entry is touched.
    /// Returns the number of tables freed. The caller invalidates cached translations
    /// (paging-structure caches may still hold the freed tables) before reusing the frames.
    pub fn prune(&mut self, alloc: &impl FrameAlloc, mem: &impl PhysMem) -> u32 {
        let mut freed = 0;
        prune_below::<F>(
            self.root,
            self.levels,
            alloc,
            mem,
            &mut self.stats,
            &mut freed,
        );
        freed
    }

    /// Frees the table frames; refused (the table is handed back) while morsels are mounted.
    pub fn destroy(self, alloc: &impl FrameAlloc, mem: &impl PhysMem) -> Result<(), (Self, Error)> {
        if self.mounts > 0 {
            let count = self.mounts;
            return Err((self, Error::StillMounted { count }));
        }
        free_tree::<F>(self.root, self.levels, false, alloc, mem);
        Ok(())
    }

    fn check_range(&self, gpa: u64, len: u64) -> Result<(), Error> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.limit() => Ok(()),
            _ => Err(Error::OutOfRange {
                addr: gpa,
                limit: self.limit(),
            }),
        }
    }
}

pub(crate) fn check_aligned(addr: u64, align: u64) -> Result<(), Error> {
    if addr & (align - 1) == 0 {
        Ok(())
    } else {
        Err(Error::Misaligned { addr, align })
    }
}

/// A zeroed table frame.
pub(crate) fn new_table(
    alloc: &impl FrameAlloc,
    mem: &impl PhysMem,
) -> Result<HostPhysAddr, Error> {
    let t = alloc.alloc(0).ok_or(Error::OutOfMemory)?;
    mem.zero_table(t);
    Ok(t)
}

/// Walks from `table` (of `level`) down to the table of `slot_level` that covers `addr`,
/// creating missing tables, and returns that table and the index of `addr` in it. Fails on a
/// leaf (`Occupied`) or a mount entry (`InsideMount`) on the way.
pub(crate) fn walk_create<F: Format>(
    mut table: HostPhysAddr,
    mut level: Level,
    slot_level: Level,
    addr: u64,
    alloc: &impl FrameAlloc,
    mem: &impl PhysMem,
    stats: &mut TableStats,
) -> Result<(HostPhysAddr, usize), Error> {
    while level > slot_level {
        let i = index(level, addr);
        table = match Entry::<F>::from_raw(mem.read(table, i)).decode(level) {
            Decoded::Table {
                mount: false, next, ..
            } => next,
            Decoded::Empty => {
                let next = new_table(alloc, mem)?;
                mem.write(table, i, Entry::<F>::table_to(next, level - 1, Perm::RWX).raw());
                stats.pte_writes += 1;
                stats.tables += 1;
                next
            }
            Decoded::Table { mount: true, .. } => return Err(Error::InsideMount { addr }),
            Decoded::Leaf { .. } => return Err(Error::Occupied { addr }),
        };
        level -= 1;
    }
    Ok((table, index(level, addr)))
}

/// Like `walk_create` but never creates: a missing table is `NotMapped`.
pub(crate) fn walk_existing<F: Format>(
    mut table: HostPhysAddr,
    mut level: Level,
    slot_level: Level,
    addr: u64,
    mem: &impl PhysMem,
) -> Result<(HostPhysAddr, usize), Error> {
    while level > slot_level {
        table = match Entry::<F>::from_raw(mem.read(table, index(level, addr))).decode(level) {
            Decoded::Table {
                mount: false, next, ..
            } => next,
            Decoded::Table { mount: true, .. } => return Err(Error::InsideMount { addr }),
            Decoded::Empty | Decoded::Leaf { .. } => return Err(Error::NotMapped { addr }),
        };
        level -= 1;
    }
    Ok((table, index(level, addr)))
}

/// Frees the empty tables below `table` (of `level`); true if `table` is empty afterwards.
fn prune_below<F: Format>(
    table: HostPhysAddr,
    level: Level,
    alloc: &impl FrameAlloc,
    mem: &impl PhysMem,
    stats: &mut TableStats,
    freed: &mut u32,
) -> bool {
    let mut empty = true;
    for i in 0..ENTRIES {
        match Entry::<F>::from_raw(mem.read(table, i)).decode(level) {
            Decoded::Empty => {}
            Decoded::Table {
                next, mount: false, ..
            } if level > 1 => {
                if prune_below::<F>(next, level - 1, alloc, mem, stats, freed) {
                    mem.write(table, i, Entry::<F>::EMPTY.raw());
                    alloc.free(next, 0);
                    stats.pte_writes += 1;
                    stats.tables -= 1;
                    *freed += 1;
                } else {
                    empty = false;
                }
            }
            _ => empty = false,
        }
    }
    empty
}

/// Frees the table at `table` (of `level`) and the tables below it, and with `free_leaves`
/// the leaf frames too. Never descends into mount entries. Recursion depth is at most 4.
pub(crate) fn free_tree<F: Format>(
    table: HostPhysAddr,
    level: Level,
    free_leaves: bool,
    alloc: &impl FrameAlloc,
    mem: &impl PhysMem,
) {
    for i in 0..ENTRIES {
        let raw = mem.read(table, i);
        if raw == 0 {
            continue;
        }
        match Entry::<F>::from_raw(raw).decode(level) {
            Decoded::Empty | Decoded::Table { mount: true, .. } => {}
            Decoded::Table { next, .. } => free_tree::<F>(next, level - 1, free_leaves, alloc, mem),
            Decoded::Leaf { frame, size, .. } => {
                if free_leaves {
                    alloc.free(frame, size.order());
                }
            }
        }
    }
    alloc.free(table, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Ept, Npt, VtdSl};
    use crate::sim::SimMem;
    use crate::GuestPhysAddr;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn gpa<F: Format>(a: u64) -> F::Input {
        F::Input::from_u64(a)
    }

    /// Maps pages (slot `i` of size `s` lands at `i * 1 GiB + off`), checks every translation,
    /// unmaps half, and destroys: all frames come back.
    fn map_unmap_destroy<F: Format>(pages: &[(u64, bool, bool)]) {
        let mem = SimMem::new(64 * GIB);
        let free0 = mem.free_pages();
        let mut t = SecondLevelTable::<F>::new(&mem, &mem).unwrap();
        let mut expect = std::vec::Vec::new();
        for (n, &(slot, big, ro)) in pages.iter().enumerate() {
            let size = if big {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            let at = slot * GIB + (n as u64 % 512) * size.bytes();
            let frame = HostPhysAddr::new((n as u64 + 1) * size.bytes());
            let perm = if ro { Perm::RO } else { Perm::RW };
            match t.map(gpa::<F>(at), frame, size, perm, &mem, &mem) {
                Ok(()) => expect.push((at, frame, size, perm)),
                Err(Error::Occupied { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        for &(at, frame, size, perm) in &expect {
            for off in [0, 8, size.bytes() - 1] {
                let tr = t.translate(gpa::<F>(at + off), &mem).unwrap();
                assert_eq!(
                    tr,
                    Translation {
                        addr: HostPhysAddr::new(frame.as_u64() + off),
                        perm,
                        size
                    }
                );
            }
            assert_eq!(
                t.accessible(gpa::<F>(at), size.bytes(), Perm::RW, &mem),
                perm == Perm::RW
            );
        }
        for &(at, frame, size, _) in expect.iter().step_by(2) {
            assert_eq!(t.unmap(gpa::<F>(at), size, &mem), Ok(frame));
            assert_eq!(t.translate(gpa::<F>(at), &mem), None);
            assert_eq!(
                t.unmap(gpa::<F>(at), size, &mem),
                Err(Error::NotMapped { addr: at })
            );
        }
        t.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.free_pages(), free0);
        assert_eq!(mem.allocated_frames(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn map_translate_unmap(pages in prop::collection::vec((0u64..4, any::<bool>(), any::<bool>()), 1..200)) {
            map_unmap_destroy::<Ept>(&pages);
            map_unmap_destroy::<Npt>(&pages);
            map_unmap_destroy::<VtdSl>(&pages);
        }

        #[test]
        fn map_range_uses_big_pages_where_aligned(
            gpa_pages in 0u64..2048, hpa_pages in 0u64..2048, len_pages in 1u64..2048,
        ) {
            let mem = SimMem::new(64 * GIB);
            let mut t = SecondLevelTable::<Ept>::new(&mem, &mem).unwrap();
            let (g, h, len) = (GIB + gpa_pages * 4096, 8 * GIB + hpa_pages * 4096, len_pages * 4096);
            t.map_range(GuestPhysAddr::new(g), HostPhysAddr::new(h), len, Perm::RWX, &mem, &mem).unwrap();
            let mut off = 0;
            while off < len {
                let tr = t.translate(GuestPhysAddr::new(g + off), &mem).unwrap();
                prop_assert_eq!(tr.addr.as_u64(), h + off);
                if (g + off) % (2 << 20) == 0 {
                    // A 2 MiB leaf exactly where both sides are aligned and 2 MiB remain.
                    let aligned = (h + off) % (2 << 20) == 0 && len - off >= 2 << 20;
                    prop_assert_eq!(tr.size == PageSize::Size2M, aligned);
                }
                off += 4096;
            }
            prop_assert_eq!(t.translate(GuestPhysAddr::new(g + len), &mem), None);
            prop_assert!(t.accessible(GuestPhysAddr::new(g), len, Perm::RWX, &mem));
            prop_assert!(!t.accessible(GuestPhysAddr::new(g), len + 1, Perm::RO, &mem));
            t.destroy(&mem, &mem).unwrap();
            prop_assert_eq!(mem.allocated_frames(), 0);
        }
    }

    #[test]
    fn refuses_bad_input() {
        let mem = SimMem::new(4 * GIB);
        let mut t = SecondLevelTable::<VtdSl>::with_levels(3, &mem, &mem).unwrap();
        let f = HostPhysAddr::new(0x20_0000);
        let io = crate::IoVirtAddr::new;
        assert_eq!(t.limit(), 1 << 39);
        assert_eq!(
            t.map(io(1 << 39), f, PageSize::Size4K, Perm::RW, &mem, &mem),
            Err(Error::OutOfRange {
                addr: 1 << 39,
                limit: 1 << 39
            })
        );
        assert_eq!(
            t.map(io(0x1000), f, PageSize::Size2M, Perm::RW, &mem, &mem),
            Err(Error::Misaligned {
                addr: 0x1000,
                align: 2 << 20
            })
        );
        assert_eq!(
            t.map(
                io(0),
                HostPhysAddr::new(0x1000),
                PageSize::Size2M,
                Perm::RW,
                &mem,
                &mem
            ),
            Err(Error::Misaligned {
                addr: 0x1000,
                align: 2 << 20
            })
        );
        assert_eq!(
            t.map(io(0), f, PageSize::Size4K, Perm::NONE, &mem, &mem),
            Err(Error::BadPerm)
        );
        assert_eq!(
            t.map(
                io(0),
                HostPhysAddr::new(1 << 52),
                PageSize::Size4K,
                Perm::RW,
                &mem,
                &mem
            )
            .unwrap_err()
            .to_string(),
            "address 0x10000000000000 is beyond the table's limit 0x10000000000000"
        );
        t.map(io(0), f, PageSize::Size2M, Perm::RW, &mem, &mem)
            .unwrap();
        // A 4 KiB page under a 2 MiB leaf, or the same leaf twice.
        assert_eq!(
            t.map(io(0x1000), f, PageSize::Size4K, Perm::RW, &mem, &mem),
            Err(Error::Occupied { addr: 0x1000 })
        );
        assert_eq!(
            t.map(io(0), f, PageSize::Size2M, Perm::RW, &mem, &mem),
            Err(Error::Occupied { addr: 0 })
        );
        assert_eq!(
            t.unmap(io(0), PageSize::Size4K, &mem),
            Err(Error::NotMapped { addr: 0 })
        );
        assert_eq!(
            t.unmap(io(!4095u64), PageSize::Size4K, &mem).unwrap_err(),
            Error::OutOfRange {
                addr: !4095u64,
                limit: 1 << 39
            }
        );
        assert!(!t.accessible(io(u64::MAX), 2, Perm::RO, &mem));
        assert!(SecondLevelTable::<Ept>::with_levels(3, &mem, &mem).is_err());
        let huge = HostPhysAddr::new(!4095);
        assert!(t
            .map_range(io(0), huge, 8192, Perm::RW, &mem, &mem)
            .is_err());
        t.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }

    #[test]
    fn map_range_rolls_back_when_out_of_memory() {
        let mem = SimMem::new(4 * GIB);
        let mut t = SecondLevelTable::<Npt>::new(&mem, &mem).unwrap();
        mem.limit_free(2); // PDPT, PD, then no PT for the 4 KiB tail
        let r = t.map_range(
            GuestPhysAddr::new(0),
            HostPhysAddr::new(0),
            (4 << 20) + 4096,
            Perm::RW,
            &mem,
            &mem,
        );
        assert_eq!(r, Err(Error::OutOfMemory));
        assert_eq!(t.translate(GuestPhysAddr::new(0), &mem), None);
        t.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }

    #[test]
    fn prune_frees_only_empty_tables() {
        let mem = SimMem::new(64 * GIB);
        let mut t = SecondLevelTable::<VtdSl>::with_levels(3, &mem, &mem).unwrap();
        let io = crate::IoVirtAddr::new;
        let f = HostPhysAddr::new(0x1000);
        t.map(io(0x1000), f, PageSize::Size4K, Perm::RW, &mem, &mem)
            .unwrap();
        t.map(io(GIB + 0x1000), f, PageSize::Size4K, Perm::RW, &mem, &mem)
            .unwrap();
        let m = crate::Morsel::<VtdSl>::create(4096, PageSize::Size4K, &mem, &mem).unwrap();
        m.mount(&mut t, io(2 * GIB + (2 << 20)), Perm::RW, &mem, &mem)
            .unwrap();
        let tables = mem.table_frames();
        assert_eq!(t.prune(&mem, &mem), 0, "everything still maps something");
        t.unmap(io(GIB + 0x1000), PageSize::Size4K, &mem).unwrap();
        assert_eq!(t.prune(&mem, &mem), 2, "the L2 and L1 tables under 1 GiB");
        assert_eq!(mem.table_frames(), tables - 2);
        assert_eq!(t.translate(io(0x1000), &mem).unwrap().addr, f);
        let tables = mem.table_frames();
        assert_eq!(
            m.unmount(&mut t, io(2 * GIB + (2 << 20)), &mem, &mem)
                .unwrap()
                .path_writes,
            1,
            "the unmount frees the L2 table that held the mount; never the morsel"
        );
        assert_eq!(mem.table_frames(), tables - 1);
        assert_eq!(t.prune(&mem, &mem), 0, "nothing left for prune");
        assert!(m.translate(0, &mem).is_some());
        t.unmap(io(0x1000), PageSize::Size4K, &mem).unwrap();
        assert_eq!(t.prune(&mem, &mem), 2);
        assert_eq!(t.stats().tables, 1);
        m.destroy(&mem, &mem).unwrap();
        t.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }
}
