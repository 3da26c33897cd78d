//! `Morsel<F>`: a memory object that is a self-contained second-level subtree (root table,
//! tables below it, data frames). Mounting writes one entry into a target table that points at
//! the root; the entry's rights limit the whole subtree, whatever the object's size.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::addr::{index, table_span, HostPhysAddr, InputAddr, Level, PageSize};
use crate::error::Error;
use crate::format::{can_share, Decoded, Entry, Format, Perm};
use crate::mem::{FrameAlloc, PhysMem};
use crate::table::{
    check_aligned, free_tree, new_table, walk_create, walk_existing, SecondLevelTable, TableStats,
};

/// What `Morsel::edit_leaves` does with one page.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LeafEdit {
    /// Leave the entry as it is.
    Keep,
    /// Map this 4 KiB frame.
    Map(HostPhysAddr),
    /// Make the entry not present.
    Clear,
    /// Stop the walk before this page.
    Stop,
}

/// The slot of one 4 KiB leaf: its L1 table and index (from `Leaves::slot`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LeafSlot {
    table: HostPhysAddr,
    index: usize,
}

/// A cursor over the leaves of a sparse morsel (`Morsel::leaves`): `slot(page)` walks from
/// the root only when `page` lies in another L1 table than the page before; `get`, `map` and
/// `clear` read and write that slot. The morsel's tables never change shape (sparse), so a
/// remembered L1 table stays valid for the morsel's life.
pub struct Leaves<'a, F: Format, M: PhysMem> {
    morsel: &'a Morsel<F>,
    mem: &'a M,
    /// `page >> 9` of the L1 table in `table`; `u64::MAX` before the first walk.
    l1: u64,
    table: HostPhysAddr,
    /// A 4 KiB leaf with the morsel's ceiling, frame 0.
    leaf: u64,
}

impl<F: Format, M: PhysMem> Leaves<'_, F, M> {
    /// The slot of `page`'s leaf; `OutOfRange` past the morsel's end.
    #[inline]
    pub fn slot(&mut self, page: u64) -> Result<LeafSlot, Error> {
        if page >= self.morsel.pages() {
            return Err(Error::OutOfRange { addr: page.saturating_mul(4096), limit: self.morsel.len });
        }
        let l1 = page >> 9;
        if l1 != self.l1 {
            self.table = walk_existing::<F>(self.morsel.root, self.morsel.root_level, 1, page * 4096, self.mem)?.0;
            self.l1 = l1;
        }
        Ok(LeafSlot { table: self.table, index: (page & 511) as usize })
    }

    /// The frame the slot maps, if present.
    #[inline]
    pub fn get(&self, s: LeafSlot) -> Option<HostPhysAddr> {
        let raw = self.mem.read(s.table, s.index);
        // An L1 entry that is present is a 4 KiB leaf.
        F::is_present(raw).then(|| HostPhysAddr::new(raw & F::ADDR_MASK))
    }

    /// Maps `frame` (4 KiB aligned) at the slot with the morsel's ceiling.
    #[inline]
    pub fn map(&self, s: LeafSlot, frame: HostPhysAddr) {
        debug_assert!(frame.is_aligned(4096) && frame.as_u64() & !F::ADDR_MASK == 0);
        self.mem.write(s.table, s.index, (frame.as_u64() & F::ADDR_MASK) | self.leaf)
    }

    /// Makes the slot not present (the caller invalidates).
    #[inline]
    pub fn clear(&self, s: LeafSlot) {
        self.mem.write(s.table, s.index, Entry::<F>::EMPTY.raw())
    }

    /// Maps `frame` at the slot where it is not present, by one compare-and-swap from the
    /// empty entry (`PhysMem::compare_exchange`): other CPUs may edit the same leaf at once
    /// (ExMap batches sharing a region). A leaf that is not present is exactly the empty
    /// entry here (tables are zeroed when made, `clear` and `take` write it, and the hardware
    /// never writes an entry that is not present), so no read comes first. False where it is
    /// present, or became present before the swap: nothing written, `frame` stays the
    /// caller's.
    #[inline]
    pub fn try_map(&self, s: LeafSlot, frame: HostPhysAddr) -> bool {
        debug_assert!(frame.is_aligned(4096) && frame.as_u64() & !F::ADDR_MASK == 0);
        let new = (frame.as_u64() & F::ADDR_MASK) | self.leaf;
        self.mem.compare_exchange(s.table, s.index, Entry::<F>::EMPTY.raw(), new).is_ok()
    }

    /// Makes the slot not present and returns the frame it mapped, in one atomic exchange
    /// with the empty entry (`PhysMem::swap`): of several CPUs clearing the same leaf at once,
    /// only one gets the frame; None where it was not present (then it was the empty entry
    /// already, see `try_map`). The caller invalidates.
    #[inline]
    pub fn take(&self, s: LeafSlot) -> Option<HostPhysAddr> {
        let old = self.mem.swap(s.table, s.index, Entry::<F>::EMPTY.raw());
        F::is_present(old).then(|| HostPhysAddr::new(old & F::ADDR_MASK))
    }
}

/// Largest morsel: one L3 root (512 GiB).
pub const MAX_MORSEL: u64 = table_span(3);

/// What one mount or unmount wrote into the target table.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct MountStats {
    /// The mount entry itself: always exactly 1.
    pub entry_writes: u32,
    /// Mount: entries written to create missing intermediate tables on the way to the mount
    /// slot (only the first mount into an empty region of the target). Unmount: entries
    /// cleared to free the intermediate tables the unmount left empty (one per table freed).
    pub path_writes: u32,
}

impl MountStats {
    /// All entries written.
    pub fn pte_writes(&self) -> u32 {
        self.entry_writes + self.path_writes
    }
}

/// A morsel whose subtree is in format `F`. It can be mounted into tables of `F` and of every
/// format that `can_share` with `F` (EPT subtrees into VT-d domains and back).
pub struct Morsel<F: Format> {
    root: HostPhysAddr,
    root_level: Level,
    len: u64,
    page: PageSize,
    tables: u32,
    mounts: AtomicU32,
    /// False for a view (`Morsel::view`): the data frames belong to another morsel, and
    /// `destroy` frees only this subtree's tables.
    owns_data: bool,
    /// True for a sparse morsel (`create_sparse`): all tables, leaves only where populated.
    sparse: bool,
    /// The most any entry of the subtree grants: `RWX` for a morsel, the limit a view was
    /// built with (`view_limited`); `set_leaf` maps with it.
    ceiling: Perm,
    _format: PhantomData<fn() -> F>,
}

impl<F: Format> core::fmt::Debug for Morsel<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Morsel")
            .field("format", &F::NAME)
            .field("root", &self.root)
            .field("root_level", &self.root_level)
            .field("len", &self.len)
            .field("page", &self.page)
            .field("mounts", &self.mount_count())
            .field("view", &!self.owns_data)
            .field("ceiling", &self.ceiling)
            .finish()
    }
}

impl<F: Format> Morsel<F> {
    /// A morsel of `len` bytes (rounded up to `page`) backed by zeroed frames of `page` size.
    /// Its root level is the lowest that spans `len` and can hold `page` leaves: L1 up to
    /// 2 MiB of 4 KiB pages, L2 up to 1 GiB, L3 up to 512 GiB. On error nothing is kept.
    pub fn create(
        len: u64,
        page: PageSize,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<Self, Error> {
        let (len, root_level) = Self::create_shape(len, page)?;
        let root = new_table(alloc, mem)?;
        let mut stats = TableStats::default();
        let mut offset = 0;
        while offset < len {
            let filled = walk_create::<F>(
                root,
                root_level,
                page.leaf_level(),
                offset,
                alloc,
                mem,
                &mut stats,
            )
            .and_then(|slot| {
                alloc
                    .alloc(page.order())
                    .map(|f| (slot, f))
                    .ok_or(Error::OutOfMemory)
            });
            let ((table, i), frame) = match filled {
                Ok(x) => x,
                Err(e) => {
                    free_tree::<F>(root, root_level, true, alloc, mem);
                    return Err(e);
                }
            };
            mem.zero_data(frame, page.order());
            mem.write(table, i, Entry::<F>::leaf(page, frame, Perm::RWX).raw());
            offset += page.bytes();
        }
        Ok(Self::owning(root, root_level, len, page, 1 + stats.tables as u32, false))
    }

    /// A sparse morsel of `len` bytes (rounded up to 4 KiB) for ExMap: every table down to
    /// the L1 tables, but no data frame; pages are populated and evicted one by one with
    /// `edit_leaves` / `set_leaf`, so the tables never change shape after creation. An
    /// unpopulated page is not present: a guest that touches it gets a second-level fault.
    /// `destroy` frees the tables and whatever is populated then. On error nothing is kept.
    pub fn create_sparse(len: u64, alloc: &impl FrameAlloc, mem: &impl PhysMem) -> Result<Self, Error> {
        let page = PageSize::Size4K;
        let (len, root_level) = Self::create_shape(len, page)?;
        let root = new_table(alloc, mem)?;
        let mut stats = TableStats::default();
        let mut offset = 0;
        while offset < len {
            if let Err(e) = walk_create::<F>(root, root_level, 1, offset, alloc, mem, &mut stats) {
                free_tree::<F>(root, root_level, true, alloc, mem);
                return Err(e);
            }
            offset += table_span(1);
        }
        Ok(Self::owning(root, root_level, len, page, 1 + stats.tables as u32, true))
    }

    /// A morsel that owns its tables and data frames, not mounted anywhere yet.
    fn owning(root: HostPhysAddr, root_level: Level, len: u64, page: PageSize, tables: u32, sparse: bool) -> Self {
        Self { root, root_level, len, page, tables, mounts: AtomicU32::new(0), owns_data: true, sparse, ceiling: Perm::RWX, _format: PhantomData }
    }

    /// A second descriptor of the same subtree, for editing its leaves where the owner's
    /// entry cannot be borrowed (ExMap batches with the world lock let go, issue 21): same
    /// root, length, page size and ceiling; no mounts, owns nothing. It must be neither
    /// mounted nor destroyed, and must not outlive the morsel (the caller pins the morsel
    /// meanwhile); dropping it does nothing (`Morsel` has no `Drop`).
    pub fn alias(&self) -> Self {
        Self {
            root: self.root,
            root_level: self.root_level,
            len: self.len,
            page: self.page,
            tables: self.tables,
            mounts: AtomicU32::new(0),
            owns_data: false,
            sparse: self.sparse,
            ceiling: self.ceiling,
            _format: PhantomData,
        }
    }

    /// Whether this is a sparse (ExMap) morsel, or a view of one.
    pub fn is_sparse(&self) -> bool {
        self.sparse
    }

    /// Number of 4 KiB pages a sparse morsel spans.
    pub fn pages(&self) -> u64 {
        self.len / PageSize::Size4K.bytes()
    }

    /// Walks the 4 KiB leaves of pages `first .. first + count` of a sparse morsel, one table
    /// walk per L1 table, and lets `f(page, current)` decide each one: keep it, map a frame
    /// (with the subtree's ceiling: read-write-execute for a morsel, the mount entry limits
    /// the rights; a view's limit for a view), clear it, or stop (the pages
    /// after it stay untouched). Returns how many pages `f` saw. `NotSparse` on a morsel
    /// with data pages of another size, `OutOfRange` past its end. The caller invalidates
    /// after clearing. A batch of ranges walks with one `leaves` cursor instead.
    pub fn edit_leaves(
        &self,
        first: u64,
        count: u64,
        mem: &impl PhysMem,
        mut f: impl FnMut(u64, Option<HostPhysAddr>) -> LeafEdit,
    ) -> Result<u64, Error> {
        let mut leaves = self.leaves(mem)?;
        match first.checked_add(count) {
            Some(end) if end <= self.pages() => {}
            _ => return Err(Error::OutOfRange { addr: first.saturating_mul(4096), limit: self.len }),
        }
        for page in first..first + count {
            let slot = leaves.slot(page)?;
            match f(page, leaves.get(slot)) {
                LeafEdit::Keep => {}
                LeafEdit::Map(frame) => leaves.map(slot, frame),
                LeafEdit::Clear => leaves.clear(slot),
                LeafEdit::Stop => return Ok(page - first),
            }
        }
        Ok(count)
    }

    /// A cursor over the 4 KiB leaves of this sparse morsel (`NotSparse` otherwise) that
    /// remembers the L1 table it last walked to: pages in the same 2 MiB as the page before
    /// cost no walk, so a batch of ranges in page order walks once per L1 table.
    #[inline]
    pub fn leaves<'a, M: PhysMem>(&'a self, mem: &'a M) -> Result<Leaves<'a, F, M>, Error> {
        if !self.sparse {
            return Err(Error::NotSparse);
        }
        let leaf = Entry::<F>::leaf(PageSize::Size4K, HostPhysAddr::new(0), self.ceiling).raw();
        Ok(Leaves { morsel: self, mem, l1: u64::MAX, table: HostPhysAddr::new(0), leaf })
    }
    /// Maps (`Some`) or clears (`None`) the leaf of one page of a sparse morsel (a view kept
    /// in step with the morsel it mirrors). Returns what was there.
    pub fn set_leaf(&self, page: u64, frame: Option<HostPhysAddr>, mem: &impl PhysMem) -> Result<Option<HostPhysAddr>, Error> {
        let mut was = None;
        self.edit_leaves(page, 1, mem, |_, cur| {
            was = cur;
            frame.map_or(LeafEdit::Clear, LeafEdit::Map)
        })?;
        Ok(was)
    }

    /// A view of this morsel in format `G`: a new subtree of the same shape (root level, page
    /// size) whose leaves point at this morsel's data frames with the same rights. Used where
    /// the formats cannot share one subtree (an NPT morsel seen by a VT-d domain). The view
    /// owns only its tables: its `destroy` frees them and never a data frame. The caller keeps
    /// the view no longer than this morsel and destroys it first (unmounted, like any morsel).
    /// On error nothing is kept.
    pub fn view<G: Format>(
        &self,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<Morsel<G>, Error> {
        self.view_limited(self.ceiling, alloc, mem)
    }

    /// `view` whose every entry, tables and leaves alike, grants at most `limit` (and what
    /// this morsel's entry grants); `set_leaf` on it maps with `limit` too. A read-only view
    /// (`Perm::RO`) is read-only at every level, for walkers that look at the leaf's rights
    /// alone instead of ANDing the levels' (the AMD IOMMU spec 2.2.3 ANDs them; QEMU 11.1's
    /// AMD IOMMU checks only the leaf).
    pub fn view_limited<G: Format>(
        &self,
        limit: Perm,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<Morsel<G>, Error> {
        let ceiling = self.ceiling.and(limit);
        let root = new_table(alloc, mem)?;
        let mut tables = 1;
        if let Err(e) = copy_tree::<F, G>(self.root, root, self.root_level, ceiling, alloc, mem, &mut tables)
        {
            free_tree::<G>(root, self.root_level, false, alloc, mem);
            return Err(e);
        }
        Ok(Morsel {
            root,
            root_level: self.root_level,
            len: self.len,
            page: self.page,
            tables,
            mounts: AtomicU32::new(0),
            owns_data: false,
            sparse: self.sparse,
            ceiling,
            _format: PhantomData,
        })
    }

    /// The handle of a morsel whose subtree outlived the handle (persistent memory): `root`,
    /// `len` and `page` as they were recorded when it was created. Nothing is written; the
    /// subtree is checked to have exactly the shape `create` builds: every entry covering
    /// `len` present and read-write-execute, leaves of `page` size at the leaf level, nothing
    /// past `len`, and every frame (tables order 0, data `page.order()`) accepted by `valid`
    /// (the caller checks that each lies in its region and is allocated). Not mounted.
    pub fn restore(
        root: HostPhysAddr,
        len: u64,
        page: PageSize,
        mem: &impl PhysMem,
        mut valid: impl FnMut(HostPhysAddr, u32) -> bool,
    ) -> Result<Self, Error> {
        let shape = Self::create_shape(len, page)?;
        if shape.0 != len || !valid(root, 0) {
            return Err(Error::Corrupt { addr: root.as_u64() });
        }
        let mut tables = 1;
        check_tree::<F>(root, shape.1, 0, len, page, mem, &mut valid, &mut tables)?;
        Ok(Self::owning(root, shape.1, len, page, tables, false))
    }

    /// Calls `f` for every frame of the subtree: tables (order 0), then, unless this is a
    /// view, data frames (their page order).
    pub fn for_each_frame(&self, mem: &impl PhysMem, f: impl FnMut(HostPhysAddr, u32)) {
        self.walk_frames(true, mem, f)
    }

    /// Calls `f` for every data frame (with its page order), none for a view: e.g. to zero
    /// them after a `create` with a `PhysMem` whose `zero_data` did nothing.
    pub fn for_each_data_frame(&self, mem: &impl PhysMem, f: impl FnMut(HostPhysAddr, u32)) {
        if self.owns_data {
            self.walk_frames(false, mem, f)
        }
    }

    fn walk_frames(&self, tables: bool, mem: &impl PhysMem, mut f: impl FnMut(HostPhysAddr, u32)) {
        fn walk<F: Format>(t: HostPhysAddr, level: Level, data: bool, tables: bool, mem: &impl PhysMem, f: &mut impl FnMut(HostPhysAddr, u32)) {
            if tables {
                f(t, 0);
            }
            for i in 0..crate::addr::ENTRIES {
                match Entry::<F>::from_raw(mem.read(t, i)).decode(level) {
                    Decoded::Empty => {}
                    Decoded::Leaf { frame, size, .. } => {
                        if data {
                            f(frame, size.order())
                        }
                    }
                    Decoded::Table { next, .. } => walk::<F>(next, level - 1, data, tables, mem, f),
                }
            }
        }
        walk::<F>(self.root, self.root_level, self.owns_data, tables, mem, &mut f);
    }

    /// Offers `take` every frame that a subtree `restore` refused still reaches: the root
    /// table (order 0), then every entry as the format decodes it at its level, the root's
    /// level taken from `len` and `page` where they describe a morsel, else the largest
    /// morsel's. A table is read only if `take` takes it; `take` must refuse frames outside
    /// the caller's region and frames it took before, which bounds the walk on a cyclic or
    /// shared tree. Nothing is written.
    pub fn salvage(root: HostPhysAddr, len: u64, page: Option<PageSize>, mem: &impl PhysMem, mut take: impl FnMut(HostPhysAddr, u32) -> bool) {
        fn walk<F: Format>(t: HostPhysAddr, level: Level, mem: &impl PhysMem, take: &mut impl FnMut(HostPhysAddr, u32) -> bool) {
            for i in 0..crate::addr::ENTRIES {
                match Entry::<F>::from_raw(mem.read(t, i)).decode(level) {
                    Decoded::Empty => {}
                    Decoded::Leaf { frame, size, .. } => {
                        take(frame, size.order());
                    }
                    Decoded::Table { next, .. } if level > 1 && take(next, 0) => walk::<F>(next, level - 1, mem, take),
                    Decoded::Table { .. } => {}
                }
            }
        }
        let level = page
            .and_then(|p| Self::create_shape(len, p).ok())
            .or_else(|| Self::create_shape(MAX_MORSEL, PageSize::Size4K).ok())
            .map_or(3, |s| s.1);
        if take(root, 0) {
            walk::<F>(root, level, mem, &mut take);
        }
    }

    /// The size `create` rounds `len` to, and the root level it picks.
    fn create_shape(len: u64, page: PageSize) -> Result<(u64, Level), Error> {
        if len == 0 || len > MAX_MORSEL {
            return Err(Error::BadSize { size: len, max: MAX_MORSEL });
        }
        let len = (len + page.bytes() - 1) & !(page.bytes() - 1);
        let mut root_level = page.leaf_level();
        while table_span(root_level) < len {
            root_level += 1;
        }
        Ok((len, root_level))
    }

    /// Whether this is a view over another morsel's data frames (see `view`).
    pub fn is_view(&self) -> bool {
        !self.owns_data
    }

    /// The most any entry of the subtree grants (`RWX` but for a `view_limited`).
    pub fn ceiling(&self) -> Perm {
        self.ceiling
    }

    /// Bytes in the object (a multiple of the page size).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Never true (a morsel has at least one page); for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Size of its data frames.
    pub fn page_size(&self) -> PageSize {
        self.page
    }
    /// The root table.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }
    /// Level of the root table (1..=3).
    pub fn root_level(&self) -> Level {
        self.root_level
    }
    /// Size and alignment of a mount window: what the root table spans (2 MiB, 1 GiB, 512 GiB).
    /// Bytes of the window past `len` are not mapped.
    pub fn window_size(&self) -> u64 {
        table_span(self.root_level)
    }
    /// Table frames of the subtree (root included).
    pub fn table_count(&self) -> u32 {
        self.tables
    }
    /// In how many tables it is mounted now.
    pub fn mount_count(&self) -> u32 {
        self.mounts.load(Ordering::Acquire)
    }

    /// Host-physical address of byte `offset` of the object.
    pub fn translate(&self, offset: u64, mem: &impl PhysMem) -> Option<HostPhysAddr> {
        if offset >= self.len {
            return None;
        }
        let (table, i) = walk_existing::<F>(
            self.root,
            self.root_level,
            self.page.leaf_level(),
            offset,
            mem,
        )
        .ok()?;
        match Entry::<F>::from_raw(mem.read(table, i)).decode(self.page.leaf_level()) {
            Decoded::Leaf { frame, size, .. } => Some(HostPhysAddr::new(
                frame.as_u64() + (offset & (size.bytes() - 1)),
            )),
            _ => None,
        }
    }

    /// The data frame that holds byte `offset`.
    pub fn data_frame(&self, offset: u64, mem: &impl PhysMem) -> Option<HostPhysAddr> {
        self.translate(offset & !(self.page.bytes() - 1), mem)
    }

    /// Mounts the morsel into `target` at `window` with rights `perm`: writes ONE entry at level
    /// `root_level() + 1` of the target (plus, the first time a region of the target is used,
    /// the intermediate tables leading to it; see `MountStats`). `window` must be aligned to
    /// `window_size()`, inside the target, and free. The caller needs no invalidation.
    pub fn mount<G: Format>(
        &self,
        target: &mut SecondLevelTable<G>,
        window: G::Input,
        perm: Perm,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<MountStats, Error> {
        let stats = self.handle().mount::<F, G>(target, window, perm, alloc, mem)?;
        self.pin();
        Ok(stats)
    }

    /// Clears this morsel's mount entry at `window` in `target` (one entry write), then frees
    /// the intermediate tables on the way to it that are left empty (bottom up, never the
    /// root, never a table that still maps anything): what a mount created, an unmount takes
    /// away, so a later mount of a larger window finds its slot free. The caller then
    /// invalidates (INVEPT, ASID flush or IOTLB) everywhere `target` may be cached, before the
    /// freed table frames can be reused (paging-structure caches may still hold them).
    pub fn unmount<G: Format>(
        &self,
        target: &mut SecondLevelTable<G>,
        window: G::Input,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<MountStats, Error> {
        let stats = self.handle().unmount::<F, G>(target, window, alloc, mem)?;
        self.unpin();
        Ok(stats)
    }

    /// What mounting and unmounting this morsel needs (its root and root level, fixed for
    /// its life), to use without the morsel at hand (`MountHandle`).
    pub fn handle(&self) -> MountHandle {
        MountHandle { root: self.root, root_level: self.root_level }
    }

    /// Counts one more mount (`mount_count`) without writing one: a caller that mounts through
    /// a `MountHandle` with the morsel out of reach pins it first, so `destroy` refuses it
    /// from then on, and keeps the count as the mount's (or `unpin`s it if the mount failed).
    pub fn pin(&self) {
        self.mounts.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes back one count of `pin` or of a mount (`MountHandle::unmount` does not).
    pub fn unpin(&self) {
        let _ = self.mounts.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Gives every data frame and table back to `alloc`. Refused (the morsel is handed back)
    /// while it is mounted anywhere.
    pub fn destroy(self, alloc: &impl FrameAlloc, mem: &impl PhysMem) -> Result<(), (Self, Error)> {
        let count = self.mount_count();
        if count > 0 {
            return Err((self, Error::StillMounted { count }));
        }
        free_tree::<F>(self.root, self.root_level, self.owns_data, alloc, mem);
        Ok(())
    }
}

/// A morsel's root and root level, copied out of it (`Morsel::handle`): enough to write and
/// clear its mount entry in a table while the morsel itself is out of reach (behind a lock
/// the caller let go). It does not keep the morsel alive: the caller pins it
/// (`Morsel::pin`, a mount counted) before it lets the morsel out of reach, and the morsel's
/// `destroy` refuses while any mount is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MountHandle {
    root: HostPhysAddr,
    root_level: Level,
}

impl MountHandle {
    /// Bytes of input address space the morsel's root table spans (`Morsel::window_size`).
    pub fn window_size(&self) -> u64 {
        table_span(self.root_level)
    }

    /// `Morsel::mount` of a morsel of format `F` (one entry written, and the intermediate
    /// tables on the way where they are missing), but the morsel's mount count is the
    /// caller's (`Morsel::pin`).
    pub fn mount<F: Format, G: Format>(
        &self,
        target: &mut SecondLevelTable<G>,
        window: G::Input,
        perm: Perm,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<MountStats, Error> {
        let at = window.to_u64();
        let slot_level = self.check_window::<F, G>(target, at)?;
        if !perm.is_encodable() {
            return Err(Error::BadPerm);
        }
        let before = target.stats.pte_writes;
        let (table, i) = walk_create::<G>(
            target.root,
            target.levels,
            slot_level,
            at,
            alloc,
            mem,
            &mut target.stats,
        )?;
        let path_writes = (target.stats.pte_writes - before) as u32;
        if Entry::<G>::from_raw(mem.read(table, i)).is_present() {
            return Err(Error::Occupied { addr: at });
        }
        mem.write(table, i, Entry::<G>::mount_to(self.root, self.root_level, perm).raw());
        target.stats.pte_writes += 1;
        target.mounts += 1;
        Ok(MountStats {
            entry_writes: 1,
            path_writes,
        })
    }

    /// `Morsel::unmount` of a morsel of format `F` (the entry cleared, the emptied
    /// intermediate tables freed; the caller invalidates), but the morsel's mount count is
    /// the caller's (`Morsel::unpin`, after that invalidation started).
    pub fn unmount<F: Format, G: Format>(
        &self,
        target: &mut SecondLevelTable<G>,
        window: G::Input,
        alloc: &impl FrameAlloc,
        mem: &impl PhysMem,
    ) -> Result<MountStats, Error> {
        let at = window.to_u64();
        let slot_level = self.check_window::<F, G>(target, at)?;
        let not_mounted = Error::NotMounted { addr: at };
        // The tables on the walk, root first: path[k] is the table of level `levels - k`.
        let mut path = [HostPhysAddr::new(0); 4];
        let mut table = target.root;
        for (k, level) in (slot_level + 1..=target.levels).rev().enumerate() {
            path[k] = table;
            table = match Entry::<G>::from_raw(mem.read(table, index(level, at))).decode(level) {
                Decoded::Table {
                    next, mount: false, ..
                } => next,
                _ => return Err(not_mounted),
            };
        }
        let depth = (target.levels - slot_level) as usize;
        path[depth] = table;
        let i = index(slot_level, at);
        match Entry::<G>::from_raw(mem.read(table, i)).decode(slot_level) {
            Decoded::Table {
                next, mount: true, ..
            } if next == self.root => {}
            _ => return Err(not_mounted),
        }
        mem.write(table, i, Entry::<G>::EMPTY.raw());
        target.stats.pte_writes += 1;
        target.mounts -= 1;
        let mut path_writes = 0;
        for k in (1..=depth).rev() {
            let t = path[k];
            if !table_empty(t, index(target.levels - k as Level, at), mem) {
                break;
            }
            let level = target.levels - (k as Level - 1);
            mem.write(path[k - 1], index(level, at), Entry::<G>::EMPTY.raw());
            alloc.free(t, 0);
            target.stats.pte_writes += 1;
            target.stats.tables -= 1;
            path_writes += 1;
        }
        Ok(MountStats {
            entry_writes: 1,
            path_writes,
        })
    }

    /// Checks a mount window and returns the level of the mount slot in the target.
    fn check_window<F: Format, G: Format>(
        &self,
        target: &SecondLevelTable<G>,
        at: u64,
    ) -> Result<Level, Error> {
        if !can_share::<F, G>() {
            return Err(Error::IncompatibleFormats {
                morsel: F::NAME,
                table: G::NAME,
            });
        }
        let slot_level = self.root_level + 1;
        if slot_level > target.levels {
            return Err(Error::RootTooHigh {
                root: self.root_level,
                levels: target.levels,
            });
        }
        check_aligned(at, self.window_size())?;
        match at.checked_add(self.window_size()) {
            Some(end) if end <= target.limit() => {}
            _ => {
                return Err(Error::OutOfRange {
                    addr: at,
                    limit: target.limit(),
                })
            }
        }
        debug_assert_eq!(
            index(slot_level, at) as u64,
            (at / self.window_size()) % 512
        );
        Ok(slot_level)
    }
}

/// Whether every entry of `table` is zero. Looks outward from `near` (the entry just
/// cleared): mounts sit side by side (the hypervisor takes the lowest free slot), so a table
/// still in use usually shows it within a few reads.
fn table_empty(table: HostPhysAddr, near: usize, mem: &impl PhysMem) -> bool {
    let n = crate::addr::ENTRIES;
    (1..=n / 2).all(|d| mem.read(table, (near + d) % n) == 0 && mem.read(table, (near + n - d) % n) == 0)
}

/// Rebuilds the format-`F` table `from` (of `level`) as the format-`G` table `to` (zeroed):
/// same leaves (frame, size, rights), new tables below. Counts new tables in `tables`; on
/// error the caller frees `to`'s subtree (never the leaves).
/// Checks the subtree below `t` (level `level`, covering object offsets from `base`) against
/// the shape `Morsel::create` builds for `len` bytes of `page` pages (see `Morsel::restore`).
#[allow(clippy::too_many_arguments)]
fn check_tree<F: Format>(
    t: HostPhysAddr,
    level: Level,
    base: u64,
    len: u64,
    page: PageSize,
    mem: &impl PhysMem,
    valid: &mut impl FnMut(HostPhysAddr, u32) -> bool,
    tables: &mut u32,
) -> Result<(), Error> {
    let span = table_span(level) / crate::addr::ENTRIES as u64;
    for i in 0..crate::addr::ENTRIES {
        let at = base + i as u64 * span;
        let bad = Error::Corrupt { addr: t.as_u64() + 8 * i as u64 };
        match Entry::<F>::from_raw(mem.read(t, i)).decode(level) {
            Decoded::Empty if at >= len => {}
            Decoded::Leaf { frame, perm, size }
                if at < len && level == page.leaf_level() && size == page && perm == Perm::RWX =>
            {
                if !valid(frame, size.order()) {
                    return Err(bad);
                }
            }
            Decoded::Table { next, perm, mount: false }
                if at < len && level > page.leaf_level() && perm == Perm::RWX =>
            {
                if !valid(next, 0) {
                    return Err(bad);
                }
                *tables += 1;
                check_tree::<F>(next, level - 1, at, len, page, mem, valid, tables)?;
            }
            _ => return Err(bad),
        }
    }
    Ok(())
}

fn copy_tree<F: Format, G: Format>(
    from: HostPhysAddr,
    to: HostPhysAddr,
    level: Level,
    limit: Perm,
    alloc: &impl FrameAlloc,
    mem: &impl PhysMem,
    tables: &mut u32,
) -> Result<(), Error> {
    for i in 0..crate::addr::ENTRIES {
        match Entry::<F>::from_raw(mem.read(from, i)).decode(level) {
            Decoded::Empty => {}
            Decoded::Leaf { frame, perm, size } => {
                mem.write(to, i, Entry::<G>::leaf(size, frame, perm.and(limit)).raw())
            }
            Decoded::Table { next, perm, .. } => {
                let t = new_table(alloc, mem)?;
                mem.write(to, i, Entry::<G>::table_to(t, level - 1, perm.and(limit)).raw());
                *tables += 1;
                copy_tree::<F, G>(next, t, level - 1, limit, alloc, mem, tables)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Ept, Npt, VtdSl};
    use crate::sim::SimMem;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::vec::Vec;

    const GIB: u64 = 1 << 30;

    fn input<F: Format>(a: u64) -> F::Input {
        F::Input::from_u64(a)
    }

    /// One guest's mount: window slot number (in units of the window size) and rights.
    type Guest = (u64, bool);

    /// Creates a morsel, mounts it into every guest, checks every page of every window,
    /// unmounts, destroys, and checks the allocator is back where it started.
    fn mount_everywhere<F: Format>(pages: u64, page: PageSize, guests: &[Guest], levels: Level) {
        let mem = SimMem::new(2048 * GIB);
        let free0 = mem.free_pages();
        let m = Morsel::<F>::create(pages * page.bytes(), page, &mem, &mem).unwrap();
        assert_eq!(m.len(), pages * page.bytes());
        assert!(
            m.window_size() >= m.len()
                && (m.root_level() == page.leaf_level() || m.window_size() / 512 < m.len())
        );

        // Every page has its own data frame.
        let frames: HashSet<u64> = (0..pages)
            .map(|p| m.data_frame(p * page.bytes(), &mem).unwrap().as_u64())
            .collect();
        assert_eq!(frames.len() as u64, pages);
        assert_eq!(m.translate(m.len(), &mem), None);

        let mut tables: Vec<SecondLevelTable<F>> = Vec::new();
        let mut windows = Vec::new();
        for &(slot, ro) in guests {
            let mut t = SecondLevelTable::<F>::with_levels(levels, &mem, &mem).unwrap();
            let window = (slot * m.window_size()) % t.limit();
            let perm = if ro { Perm::RO } else { Perm::RWX };
            let writes0 = mem.writes();
            match m.mount(&mut t, input::<F>(window), perm, &mem, &mem) {
                Ok(stats) => {
                    assert_eq!(stats.entry_writes, 1);
                    assert_eq!(mem.writes() - writes0, u64::from(stats.pte_writes()));
                    // Unmount frees the path tables the mount created (the table holds
                    // nothing else), so the table is as before and mounting again costs
                    // the same.
                    let (w, tables0) = (mem.writes(), t.stats().tables);
                    assert_eq!(
                        m.unmount(&mut t, input::<F>(window), &mem, &mem),
                        Ok(stats)
                    );
                    assert_eq!(t.stats().tables, tables0 - u64::from(stats.path_writes));
                    assert_eq!(t.stats().tables, 1, "only the root is left");
                    assert_eq!(
                        m.mount(&mut t, input::<F>(window), perm, &mem, &mem),
                        Ok(stats)
                    );
                    assert_eq!(mem.writes() - w, 2 * u64::from(stats.pte_writes()));
                    windows.push((window, perm, stats.path_writes));
                }
                Err(Error::RootTooHigh { .. }) => {
                    assert!(m.root_level() + 1 > levels);
                    t.destroy(&mem, &mem).unwrap();
                    continue;
                }
                Err(e) => panic!("{e}"),
            }
            // A second mount of the same window is refused.
            assert_eq!(
                m.mount(&mut t, input::<F>(window), perm, &mem, &mem),
                Err(Error::Occupied { addr: window })
            );
            tables.push(t);
        }
        assert_eq!(m.mount_count() as usize, tables.len());

        for (t, &(window, perm, _)) in tables.iter().zip(&windows) {
            for p in 0..pages {
                for off in [0, 8 * p % page.bytes(), page.bytes() - 1] {
                    let o = p * page.bytes() + off;
                    let tr = t.translate(input::<F>(window + o), &mem).unwrap();
                    assert_eq!(tr.addr, m.translate(o, &mem).unwrap());
                    assert_eq!(tr.size, page);
                    assert_eq!(tr.perm, perm, "read-only mounts have no write anywhere");
                }
            }
            // The rest of the window is empty.
            if m.len() < m.window_size() {
                assert_eq!(t.translate(input::<F>(window + m.len()), &mem), None);
                assert_eq!(
                    t.translate(input::<F>(window + m.window_size() - 1), &mem),
                    None
                );
            }
        }

        // Destroy is refused while mounted anywhere; the table refuses too.
        let m = match m.destroy(&mem, &mem) {
            Err((m, e)) if !tables.is_empty() => {
                assert_eq!(
                    e,
                    Error::StillMounted {
                        count: tables.len() as u32
                    }
                );
                m
            }
            Ok(()) if tables.is_empty() => {
                assert_eq!(mem.free_pages(), free0);
                return;
            }
            r => panic!("destroy: {:?}", r.map_err(|(_, e)| e)),
        };
        let mut tables: Vec<_> = tables
            .into_iter()
            .map(|t| {
                t.destroy(&mem, &mem)
                    .map(|_| panic!("table destroyed while mounted"))
                    .unwrap_err()
                    .0
            })
            .collect();

        for (t, &(window, _, path)) in tables.iter_mut().zip(&windows) {
            let w = mem.writes();
            assert_eq!(
                m.unmount(t, input::<F>(window), &mem, &mem),
                Ok(MountStats {
                    entry_writes: 1,
                    path_writes: path
                })
            );
            assert_eq!(mem.writes() - w, 1 + u64::from(path));
            assert_eq!(t.stats().tables, 1, "the path tables are freed");
            for p in 0..pages {
                assert_eq!(
                    t.translate(input::<F>(window + p * page.bytes()), &mem),
                    None
                );
            }
            assert_eq!(
                m.unmount(t, input::<F>(window), &mem, &mem),
                Err(Error::NotMounted { addr: window })
            );
        }
        assert_eq!(m.mount_count(), 0);
        m.destroy(&mem, &mem).unwrap();
        for t in tables {
            t.destroy(&mem, &mem).unwrap();
        }
        assert_eq!(mem.free_pages(), free0);
        assert_eq!(mem.allocated_frames(), 0);
    }

    fn guests() -> impl Strategy<Value = Vec<Guest>> {
        prop::collection::vec((0u64..1024, any::<bool>()), 1..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn small_pages(pages in 1u64..1100, g in guests()) {
            mount_everywhere::<Ept>(pages, PageSize::Size4K, &g, 4);
            mount_everywhere::<Npt>(pages, PageSize::Size4K, &g, 4);
            mount_everywhere::<VtdSl>(pages, PageSize::Size4K, &g, 3);
        }

        #[test]
        fn large_pages(pages in 1u64..1100, g in guests()) {
            mount_everywhere::<Ept>(pages, PageSize::Size2M, &g, 4);
            mount_everywhere::<Npt>(pages, PageSize::Size2M, &g, 4);
            mount_everywhere::<VtdSl>(pages, PageSize::Size2M, &g, 3);
            mount_everywhere::<VtdSl>(pages, PageSize::Size2M, &g, 4);
        }

        #[test]
        fn failed_create_keeps_nothing(pages in 1u64..1100, big in any::<bool>(), budget in 0u64..1200) {
            let page = if big { PageSize::Size2M } else { PageSize::Size4K };
            let mem = SimMem::new(4096 * GIB);
            mem.limit_free(budget << page.order());
            match Morsel::<Npt>::create(pages * page.bytes(), page, &mem, &mem) {
                Ok(m) => m.destroy(&mem, &mem).unwrap(),
                Err(e) => prop_assert_eq!(e, Error::OutOfMemory),
            }
            prop_assert_eq!(mem.allocated_frames(), 0);
        }
    }

    #[test]
    fn data_frames_are_the_leaves_only() {
        let mem = SimMem::new(64 * GIB);
        for (len, page) in [(64 << 10, PageSize::Size4K), (4 << 20, PageSize::Size4K), (6 << 20, PageSize::Size2M)] {
            let m = Morsel::<Ept>::create(len, page, &mem, &mem).unwrap();
            let (mut data, mut all) = (0u64, 0u64);
            m.for_each_data_frame(&mem, |_, order| {
                assert_eq!(order, page.order());
                data += 1;
            });
            m.for_each_frame(&mem, |_, _| all += 1);
            assert_eq!(data, len / page.bytes(), "{len:#x} of {page}");
            assert_eq!(all, data + m.table_count() as u64);
            m.destroy(&mem, &mem).unwrap();
        }
    }

    #[test]
    fn root_level_by_size() {
        let mem = SimMem::new(1024 * GIB);
        let cases = [
            (4096, PageSize::Size4K, 1),
            (2 << 20, PageSize::Size4K, 1),
            ((2 << 20) + 1, PageSize::Size4K, 2),
            (1, PageSize::Size2M, 2),
            (GIB, PageSize::Size2M, 2),
            (GIB + 1, PageSize::Size2M, 3),
            (64 * GIB, PageSize::Size2M, 3),
            (GIB, PageSize::Size1G, 3),
        ];
        for (len, page, level) in cases {
            let m = Morsel::<Ept>::create(len, page, &mem, &mem).unwrap();
            assert_eq!(m.root_level(), level, "{len:#x} of {page}");
            m.destroy(&mem, &mem).unwrap();
        }
        assert_eq!(
            Morsel::<Ept>::create(0, PageSize::Size4K, &mem, &mem).unwrap_err(),
            Error::BadSize {
                size: 0,
                max: MAX_MORSEL
            }
        );
        assert!(Morsel::<Ept>::create(MAX_MORSEL + 1, PageSize::Size2M, &mem, &mem).is_err());
        // 64 GiB of 2 MiB pages: 1 L3 root and 64 L2 tables.
        let m = Morsel::<Ept>::create(64 * GIB, PageSize::Size2M, &mem, &mem).unwrap();
        assert_eq!((m.table_count(), mem.table_frames()), (65, 65));
        m.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }

    #[test]
    fn refuses_bad_mounts() {
        let mem = SimMem::new(64 * GIB);
        let m = Morsel::<Ept>::create(4 << 20, PageSize::Size2M, &mem, &mem).unwrap(); // L2 root, 1 GiB window
        let other = Morsel::<Ept>::create(4 << 20, PageSize::Size2M, &mem, &mem).unwrap();
        let mut t = SecondLevelTable::<Ept>::new(&mem, &mem).unwrap();
        let g = crate::GuestPhysAddr::new;
        assert_eq!(
            m.mount(&mut t, g(GIB / 2), Perm::RW, &mem, &mem),
            Err(Error::Misaligned {
                addr: GIB / 2,
                align: GIB
            })
        );
        assert_eq!(
            m.mount(&mut t, g(1 << 48), Perm::RW, &mem, &mem),
            Err(Error::OutOfRange {
                addr: 1 << 48,
                limit: 1 << 48
            })
        );
        assert_eq!(
            m.mount(&mut t, g(!(GIB - 1)), Perm::RW, &mem, &mem)
                .unwrap_err(),
            Error::OutOfRange {
                addr: !(GIB - 1),
                limit: 1 << 48
            }
        );
        assert_eq!(
            m.mount(&mut t, g(GIB), Perm::NONE, &mem, &mem),
            Err(Error::BadPerm)
        );
        // Ordinary memory in the window: occupied.
        t.map(
            g(0x1000),
            HostPhysAddr::new(0x1000),
            PageSize::Size4K,
            Perm::RW,
            &mem,
            &mem,
        )
        .unwrap();
        assert_eq!(
            m.mount(&mut t, g(0), Perm::RW, &mem, &mem),
            Err(Error::Occupied { addr: 0 })
        );
        // Mounted window: table edits refused, the other morsel cannot unmount or overmount it.
        m.mount(&mut t, g(GIB), Perm::RO, &mem, &mem).unwrap();
        assert_eq!(
            t.map(
                g(GIB),
                HostPhysAddr::new(0),
                PageSize::Size4K,
                Perm::RW,
                &mem,
                &mem
            ),
            Err(Error::InsideMount { addr: GIB })
        );
        assert_eq!(
            t.unmap(g(GIB), PageSize::Size2M, &mem),
            Err(Error::InsideMount { addr: GIB })
        );
        assert_eq!(
            t.unmap(g(GIB + 4096), PageSize::Size4K, &mem),
            Err(Error::InsideMount { addr: GIB + 4096 })
        );
        assert_eq!(
            other.unmount(&mut t, g(GIB), &mem, &mem),
            Err(Error::NotMounted { addr: GIB })
        );
        assert_eq!(
            other.mount(&mut t, g(GIB), Perm::RW, &mem, &mem),
            Err(Error::Occupied { addr: GIB })
        );
        assert_eq!(
            m.unmount(&mut t, g(2 * GIB), &mem, &mem),
            Err(Error::NotMounted { addr: 2 * GIB })
        );
        assert_eq!(
            m.unmount(&mut t, g(0), &mem, &mem),
            Err(Error::NotMounted { addr: 0 })
        );
        // A morsel cannot be mounted inside another morsel's window.
        let small = Morsel::<Ept>::create(4096, PageSize::Size4K, &mem, &mem).unwrap(); // 2 MiB window
        assert_eq!(
            small.mount(&mut t, g(GIB + (2 << 20)), Perm::RW, &mem, &mem),
            Err(Error::InsideMount {
                addr: GIB + (2 << 20)
            })
        );
        // Formats: NPT cannot read an EPT subtree; a 512 GiB root does not fit a 3-level VT-d table.
        let mut npt = SecondLevelTable::<Npt>::new(&mem, &mem).unwrap();
        assert_eq!(
            m.mount(&mut npt, g(0), Perm::RW, &mem, &mem)
                .unwrap_err()
                .to_string(),
            "a subtree in EPT format cannot be mounted into a NPT table"
        );
        let big = Morsel::<Ept>::create(2 * GIB, PageSize::Size2M, &mem, &mem).unwrap();
        let mut vtd3 = SecondLevelTable::<VtdSl>::with_levels(3, &mem, &mem).unwrap();
        assert_eq!(
            big.mount(&mut vtd3, crate::IoVirtAddr::new(0), Perm::RW, &mem, &mem),
            Err(Error::RootTooHigh { root: 3, levels: 3 })
        );

        m.unmount(&mut t, g(GIB), &mem, &mem).unwrap();
        for x in [m, other, small, big] {
            x.destroy(&mem, &mem).unwrap();
        }
        t.destroy(&mem, &mem).unwrap();
        npt.destroy(&mem, &mem).unwrap();
        vtd3.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }

    #[test]
    fn ept_subtree_shared_with_iommu() {
        let mem = SimMem::new(64 * GIB);
        let m = Morsel::<Ept>::create(3 * GIB, PageSize::Size2M, &mem, &mem).unwrap();
        let mut guest = SecondLevelTable::<Ept>::new(&mem, &mem).unwrap();
        let mut dev = SecondLevelTable::<VtdSl>::new(&mem, &mem).unwrap();
        let w = 512 * GIB;
        m.mount(
            &mut guest,
            crate::GuestPhysAddr::new(w),
            Perm::RO,
            &mem,
            &mem,
        )
        .unwrap();
        m.mount(&mut dev, crate::IoVirtAddr::new(w), Perm::RW, &mem, &mem)
            .unwrap();
        for off in [0, GIB + 12345, 3 * GIB - 1] {
            let g = guest
                .translate(crate::GuestPhysAddr::new(w + off), &mem)
                .unwrap();
            let d = dev
                .translate(crate::IoVirtAddr::new(w + off), &mem)
                .unwrap();
            assert_eq!(g.addr, d.addr);
            assert_eq!((g.perm, d.perm), (Perm::RO, Perm::RW));
        }
        assert_eq!(m.mount_count(), 2);
        // What the VT-d walker reads in the shared subtree (VT-d spec 9.8, legacy mode):
        // every entry decodes the same as VT-d SL; none sets bit 11 (SNP, reserved without
        // snoop control: QEMU 7.2 faults on it) or 62 (TM); EPT's leaf-only bits (memory
        // type 5:3, ignore-PAT 6, execute 2) are ones VT-d ignores without extended memory
        // types and second-level execute. Checked over the whole 3 GiB subtree (L3 root,
        // 2 MiB leaves) and a 4 KiB-page one (L1 root), and on the mount entry itself.
        const VTD_RESERVED: u64 = 1 << 11 | 1 << 62;
        const VTD_IGNORED_EPT_BITS: u64 = 1 << 2 | 7 << 3 | 1 << 6;
        let small = Morsel::<Ept>::create(16 << 10, PageSize::Size4K, &mem, &mem).unwrap();
        fn walk(table: HostPhysAddr, level: Level, mem: &SimMem, leaves: &mut u32) {
            for i in 0..512 {
                let raw = mem.read(table, i);
                let (e, v) = (Entry::<Ept>::from_raw(raw), Entry::<VtdSl>::from_raw(raw));
                assert_eq!(e.decode(level), v.decode(level), "entry {raw:#x} at L{level}");
                assert_eq!(raw & VTD_RESERVED, 0, "VT-d reserved bit in {raw:#x}");
                match e.decode(level) {
                    Decoded::Leaf { .. } => {
                        // R, W and X set, memory type WB, no ignore-PAT: all ignored by VT-d.
                        assert_eq!(raw & VTD_IGNORED_EPT_BITS, 1 << 2 | 6 << 3);
                        *leaves += 1;
                    }
                    Decoded::Table { next, .. } => {
                        assert_eq!(raw & VTD_IGNORED_EPT_BITS & !(1 << 2), 0, "EPT non-leaf bits 7:3 are reserved");
                        walk(next, level - 1, mem, leaves);
                    }
                    Decoded::Empty => assert_eq!(raw, 0),
                }
            }
        }
        let mut leaves = 0;
        walk(m.root(), m.root_level(), &mem, &mut leaves);
        assert_eq!(leaves, 3 * 512);
        let mut leaves = 0;
        walk(small.root(), small.root_level(), &mem, &mut leaves);
        assert_eq!(leaves, 4);
        let mount = dev.translate(crate::IoVirtAddr::new(w), &mem).unwrap();
        assert_eq!(mount.perm, Perm::RW);
        small.destroy(&mem, &mem).unwrap();
        m.unmount(&mut guest, crate::GuestPhysAddr::new(w), &mem, &mem)
            .unwrap();
        m.unmount(&mut dev, crate::IoVirtAddr::new(w), &mem, &mem)
            .unwrap();
        m.destroy(&mem, &mem).unwrap();
        guest.destroy(&mem, &mem).unwrap();
        dev.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }

    /// `iommu=sharept` on an SVM CPU: an NPT morsel's EPT twin (`view::<Ept>`) holds, entry by
    /// entry, what `Morsel::<Ept>::create` writes for a VMX guest's morsel of the same shape
    /// (addresses aside), its leaves are the NPT morsel's data frames, a sparse twin follows
    /// `set_leaf`, and destroying the twin gives back only its tables.
    #[test]
    fn npt_morsel_ept_twin_is_what_create_builds() {
        const ADDR: u64 = ((1 << 52) - 1) & !0xfff;
        fn same(a: HostPhysAddr, b: HostPhysAddr, level: Level, mem: &SimMem) {
            for i in 0..512 {
                let (x, y) = (mem.read(a, i), mem.read(b, i));
                assert_eq!(x & !ADDR, y & !ADDR, "L{level} entry {i}: {x:#x} vs {y:#x}");
                if let Decoded::Table { next, .. } = Entry::<Ept>::from_raw(x).decode(level) {
                    let Decoded::Table { next: other, .. } = Entry::<Ept>::from_raw(y).decode(level) else { panic!() };
                    same(next, other, level - 1, mem);
                }
            }
        }
        let mem = SimMem::new(8 * GIB);
        for (len, page) in [(16 << 10, PageSize::Size4K), (5 << 20, PageSize::Size4K), (3 * GIB, PageSize::Size2M)] {
            let npt = Morsel::<Npt>::create(len, page, &mem, &mem).unwrap();
            let before = mem.allocated_frames();
            let twin = npt.view::<Ept>(&mem, &mem).unwrap();
            assert_eq!((twin.root_level(), twin.len(), twin.table_count()), (npt.root_level(), npt.len(), npt.table_count()));
            let ept = Morsel::<Ept>::create(len, page, &mem, &mem).unwrap();
            same(twin.root(), ept.root(), twin.root_level(), &mem);
            for off in [0, len / 2 + 123, len - 1] {
                assert_eq!(twin.translate(off, &mem), npt.translate(off, &mem));
            }
            ept.destroy(&mem, &mem).unwrap();
            twin.destroy(&mem, &mem).unwrap();
            assert_eq!(mem.allocated_frames(), before);
            npt.destroy(&mem, &mem).unwrap();
        }
        let sparse = Morsel::<Npt>::create_sparse(64 << 10, &mem, &mem).unwrap();
        let frame = mem.alloc(0).unwrap();
        sparse.set_leaf(3, Some(frame), &mem).unwrap();
        let twin = sparse.view::<Ept>(&mem, &mem).unwrap();
        assert!(twin.is_sparse() && twin.is_view());
        assert_eq!(twin.translate(3 * 4096, &mem), Some(frame));
        assert_eq!(twin.translate(0, &mem), None);
        assert_eq!(twin.set_leaf(3, None, &mem).unwrap(), Some(frame));
        assert_eq!(twin.translate(3 * 4096, &mem), None);
        twin.destroy(&mem, &mem).unwrap();
        sparse.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }

    /// The read-only AMD-Vi view of an NPT morsel (`view_limited(Perm::RO)`) is read-only at
    /// every level: every present entry, PDE and PTE, has PR and IR (bits 0, 61) and not IW
    /// (bit 62, IOMMU spec 2.2.3), also after `set_leaf`; the read-write view's entries all
    /// have IW. Both point at the same frames, and a read-only mount of either translates
    /// read-only.
    #[test]
    fn read_only_amd_view_has_no_iw_at_any_level() {
        use crate::format::AmdV1;
        const IR: u64 = 1 << 61;
        const IW: u64 = 1 << 62;
        /// Present entries seen and whether each had IW, by walking the whole subtree.
        fn walk(t: HostPhysAddr, level: Level, mem: &SimMem, iw: bool, seen: &mut u32) {
            for i in 0..512 {
                let raw = mem.read(t, i);
                if raw & 1 == 0 {
                    continue;
                }
                *seen += 1;
                assert_eq!(raw & IR, IR, "L{level} entry {i}: {raw:#x} lacks IR");
                assert_eq!(raw & IW != 0, iw, "L{level} entry {i}: {raw:#x}");
                if let Decoded::Table { next, .. } = Entry::<AmdV1>::from_raw(raw).decode(level) {
                    walk(next, level - 1, mem, iw, seen);
                }
            }
        }
        let mem = SimMem::new(8 * GIB);
        for (len, page) in [(16 << 10, PageSize::Size4K), (5 << 20, PageSize::Size4K), (3 * GIB, PageSize::Size2M)] {
            let npt = Morsel::<Npt>::create(len, page, &mem, &mem).unwrap();
            let rw = npt.view::<AmdV1>(&mem, &mem).unwrap();
            let ro = npt.view_limited::<AmdV1>(Perm::RO, &mem, &mem).unwrap();
            assert_eq!((rw.ceiling(), ro.ceiling()), (Perm::RWX, Perm::RO));
            assert_eq!(ro.table_count(), rw.table_count());
            let (mut a, mut b) = (0, 0);
            walk(rw.root(), rw.root_level(), &mem, true, &mut a);
            walk(ro.root(), ro.root_level(), &mem, false, &mut b);
            assert!(a == b && a >= 4, "{a} vs {b} present entries");
            for off in [0, len / 2 + 123, len - 1] {
                assert_eq!(ro.translate(off, &mem), npt.translate(off, &mem));
            }
            let mut t = SecondLevelTable::<AmdV1>::new(&mem, &mem).unwrap();
            let w = crate::IoVirtAddr::new(ro.window_size());
            ro.mount(&mut t, w, Perm::RO, &mem, &mem).unwrap();
            let tr = t.translate(crate::IoVirtAddr::new(w.to_u64() + len - 1), &mem).unwrap();
            assert_eq!((tr.addr, tr.perm.write), (npt.translate(len - 1, &mem).unwrap(), false));
            ro.unmount(&mut t, w, &mem, &mem).unwrap();
            t.destroy(&mem, &mem).unwrap();
            for v in [rw, ro] {
                v.destroy(&mem, &mem).unwrap();
            }
            npt.destroy(&mem, &mem).unwrap();
        }
        // A sparse morsel's read-only view maps with IR alone when it follows `set_leaf`.
        let sparse = Morsel::<Npt>::create_sparse(64 << 10, &mem, &mem).unwrap();
        let ro = sparse.view_limited::<AmdV1>(Perm::RO, &mem, &mem).unwrap();
        let rw = sparse.view::<AmdV1>(&mem, &mem).unwrap();
        let frame = mem.alloc(0).unwrap();
        for v in [&ro, &rw] {
            assert_eq!(v.set_leaf(3, Some(frame), &mem).unwrap(), None);
            assert_eq!(v.translate(3 * 4096, &mem), Some(frame));
        }
        let (mut a, mut b) = (0, 0);
        walk(ro.root(), ro.root_level(), &mem, false, &mut a);
        walk(rw.root(), rw.root_level(), &mem, true, &mut b);
        assert!(a == b && a >= 1, "{a} vs {b} present entries");
        for v in [ro, rw] {
            assert_eq!(v.set_leaf(3, None, &mem).unwrap(), Some(frame));
            v.destroy(&mem, &mem).unwrap();
        }
        sparse.destroy(&mem, &mem).unwrap();
        mem.free(frame, 0);
        assert_eq!(mem.allocated_frames(), 0);
    }

    /// An unmount frees the path tables its mount created once nothing else uses them, so a
    /// morsel with a larger window can take the slot afterwards (the window's first 2 MiB
    /// mounted, unmounted, then a 1 GiB window and a 512 GiB window at the same address);
    /// a path table that still holds a neighbour's mount stays.
    #[test]
    fn unmount_frees_the_path_it_created() {
        let mem = SimMem::new(2048 * GIB);
        let g = crate::GuestPhysAddr::new;
        let mut t = SecondLevelTable::<Npt>::new(&mem, &mem).unwrap();
        let base = 512 * GIB;
        let a = Morsel::<Npt>::create(4096, PageSize::Size4K, &mem, &mem).unwrap();
        let b = Morsel::<Npt>::create(4096, PageSize::Size4K, &mem, &mem).unwrap();
        let mid = Morsel::<Npt>::create(4 << 20, PageSize::Size2M, &mem, &mem).unwrap();
        let big = Morsel::<Npt>::create(GIB + (2 << 20), PageSize::Size2M, &mem, &mem).unwrap();
        assert_eq!((mid.window_size(), big.window_size()), (GIB, 512 * GIB));
        let s = a.mount(&mut t, g(base), Perm::RW, &mem, &mem).unwrap();
        assert_eq!(s.path_writes, 2, "the L3 and L2 tables");
        b.mount(&mut t, g(base + (2 << 20)), Perm::RW, &mem, &mem).unwrap();
        // b still uses the L2 table: nothing is freed, and the 1 GiB slot stays taken.
        assert_eq!(a.unmount(&mut t, g(base), &mem, &mem).unwrap().path_writes, 0);
        assert_eq!(
            mid.mount(&mut t, g(base), Perm::RW, &mem, &mem),
            Err(Error::Occupied { addr: base })
        );
        assert!(t.translate(g(base + (2 << 20)), &mem).is_some());
        assert_eq!(b.unmount(&mut t, g(base + (2 << 20)), &mem, &mem).unwrap().path_writes, 2);
        assert_eq!(t.stats().tables, 1);
        // Now both larger windows fit where the small ones were.
        assert_eq!(mid.mount(&mut t, g(base), Perm::RW, &mem, &mem).unwrap().path_writes, 1);
        assert_eq!(mid.unmount(&mut t, g(base), &mem, &mem).unwrap().path_writes, 1);
        assert_eq!(big.mount(&mut t, g(base), Perm::RW, &mem, &mem).unwrap().path_writes, 0);
        assert_eq!(big.unmount(&mut t, g(base), &mem, &mem).unwrap().path_writes, 0);
        for x in [a, b, mid, big] {
            x.destroy(&mem, &mem).unwrap();
        }
        t.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }

    /// A VT-d view of an NPT morsel maps every page to the same frame, mounts like a morsel,
    /// and its destroy frees only its own tables.
    fn view_matches<F: Format, G: Format>(pages: u64, page: PageSize, levels: Level) {
        let mem = SimMem::new(2048 * GIB);
        let m = Morsel::<F>::create(pages * page.bytes(), page, &mem, &mem).unwrap();
        let before = mem.allocated_frames();
        let v = m.view::<G>(&mem, &mem).unwrap();
        assert!(v.is_view() && !m.is_view());
        assert_eq!(
            (v.len(), v.page_size(), v.root_level()),
            (m.len(), m.page_size(), m.root_level())
        );
        assert_eq!(v.table_count(), m.table_count());
        assert_eq!(mem.allocated_frames() - before, v.table_count() as usize);
        assert_ne!(v.root(), m.root());
        for p in 0..pages {
            let o = p * page.bytes() + 8 * p % page.bytes();
            assert_eq!(v.translate(o, &mem), m.translate(o, &mem));
        }
        let mut t = SecondLevelTable::<G>::with_levels(levels, &mem, &mem).unwrap();
        let w = input::<G>(v.window_size() % t.limit());
        match v.mount(&mut t, w, Perm::RW, &mem, &mem) {
            Ok(_) => {
                let tr = t
                    .translate(input::<G>(w.to_u64() + m.len() - 1), &mem)
                    .unwrap();
                assert_eq!(tr.addr, m.translate(m.len() - 1, &mem).unwrap());
                assert_eq!(tr.perm, Perm::RW);
                assert_eq!(
                    m.mount_count(),
                    0,
                    "mounting the view does not count on the morsel"
                );
                let v = match v.destroy(&mem, &mem) {
                    Err((v, Error::StillMounted { count: 1 })) => v,
                    r => panic!("destroy of a mounted view: {:?}", r.map_err(|(_, e)| e)),
                };
                v.unmount(&mut t, w, &mem, &mem).unwrap();
                v.destroy(&mem, &mem).unwrap();
            }
            Err(Error::RootTooHigh { .. }) => {
                assert!(v.root_level() + 1 > levels);
                v.destroy(&mem, &mem).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
        t.destroy(&mem, &mem).unwrap();
        let v = m.view::<G>(&mem, &mem).unwrap();
        v.destroy(&mem, &mem).unwrap();
        assert_eq!(
            mem.allocated_frames(),
            before,
            "the view gave back exactly its tables"
        );
        m.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn views_match(pages in 1u64..1100, big in any::<bool>()) {
            let page = if big { PageSize::Size2M } else { PageSize::Size4K };
            view_matches::<Npt, VtdSl>(pages, page, 3);
            view_matches::<Npt, VtdSl>(pages, page, 4);
            view_matches::<Ept, Npt>(pages, page, 4);
        }

        #[test]
        fn failed_view_keeps_nothing(pages in 1u64..1100, big in any::<bool>(), budget in 0u64..8) {
            let page = if big { PageSize::Size2M } else { PageSize::Size4K };
            let mem = SimMem::new(4096 * GIB);
            let m = Morsel::<Npt>::create(pages * page.bytes(), page, &mem, &mem).unwrap();
            let before = mem.allocated_frames();
            mem.limit_free(budget);
            match m.view::<VtdSl>(&mem, &mem) {
                Ok(v) => v.destroy(&mem, &mem).unwrap(),
                Err(e) => prop_assert_eq!(e, Error::OutOfMemory),
            }
            prop_assert_eq!(mem.allocated_frames(), before);
            m.destroy(&mem, &mem).unwrap();
            prop_assert_eq!(mem.allocated_frames(), 0);
        }
    }

    /// Restores `m`'s subtree from its record and checks it is the same object.
    fn restore_same<F: Format>(m: &Morsel<F>, mem: &SimMem) {
        let mut seen = Vec::new();
        m.for_each_frame(mem, |f, o| seen.push((f, o)));
        let r = Morsel::<F>::restore(m.root(), m.len(), m.page_size(), mem, |f, o| seen.contains(&(f, o)))
            .unwrap();
        assert_eq!((r.root_level(), r.table_count(), r.len()), (m.root_level(), m.table_count(), m.len()));
        // Every table and data frame once.
        let data = m.len().div_ceil(m.page_size().bytes()) as usize;
        assert_eq!(seen.len(), m.table_count() as usize + data);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), m.table_count() as usize + data);
        for off in (0..m.len()).step_by(4096) {
            assert_eq!(r.translate(off, mem), m.translate(off, mem));
        }
        // `r` names the same frames as `m`; they are destroyed once, through `m`.
    }

    proptest! {
        #[test]
        fn restore_finds_what_create_built(pages in 1u64..1100, big in any::<bool>()) {
            let mem = SimMem::new(8 * GIB);
            let page = if big { PageSize::Size2M } else { PageSize::Size4K };
            let m = Morsel::<Npt>::create(pages * page.bytes(), page, &mem, &mem).unwrap();
            restore_same(&m, &mem);
            let e = Morsel::<Ept>::create(pages * page.bytes(), page, &mem, &mem).unwrap();
            restore_same(&e, &mem);
            m.destroy(&mem, &mem).unwrap();
            e.destroy(&mem, &mem).unwrap();
            prop_assert_eq!(mem.allocated_frames(), 0);
        }
    }

    #[test]
    fn restore_refuses_a_subtree_that_does_not_match_its_record() {
        let mem = SimMem::new(8 * GIB);
        let m = Morsel::<Npt>::create(16 << 12, PageSize::Size4K, &mem, &mem).unwrap();
        let ok = |_: HostPhysAddr, _: u32| true;
        let (root, len, page) = (m.root(), m.len(), m.page_size());
        assert!(Morsel::<Npt>::restore(root, len, page, &mem, ok).is_ok());
        // A record with another size, page size, or a frame the caller does not vouch for.
        assert!(matches!(Morsel::<Npt>::restore(root, len + 4096, page, &mem, ok), Err(Error::Corrupt { .. })));
        assert!(matches!(Morsel::<Npt>::restore(root, len - 4096, page, &mem, ok), Err(Error::Corrupt { .. })));
        assert!(Morsel::<Npt>::restore(root, len, PageSize::Size2M, &mem, ok).is_err());
        let data = m.translate(5 * 4096, &mem).unwrap();
        assert!(matches!(Morsel::<Npt>::restore(root, len, page, &mem, |f, _| f != data), Err(Error::Corrupt { .. })));
        assert!(matches!(Morsel::<Npt>::restore(root, len, page, &mem, |f, _| f != root), Err(Error::Corrupt { .. })));
        // An entry changed behind its back: cleared, made read-only, or pointing past the end.
        let saved = mem.read(root, 3);
        mem.write(root, 3, 0);
        assert!(matches!(Morsel::<Npt>::restore(root, len, page, &mem, ok), Err(Error::Corrupt { .. })));
        mem.write(root, 3, Entry::<Npt>::leaf(PageSize::Size4K, data, Perm::RO).raw());
        assert!(matches!(Morsel::<Npt>::restore(root, len, page, &mem, ok), Err(Error::Corrupt { .. })));
        mem.write(root, 3, saved);
        mem.write(root, 100, saved);
        assert!(matches!(Morsel::<Npt>::restore(root, len, page, &mem, ok), Err(Error::Corrupt { .. })));
        mem.write(root, 100, 0);
        assert!(Morsel::<Npt>::restore(root, len, page, &mem, ok).is_ok());
        m.destroy(&mem, &mem).unwrap();
    }

    #[test]
    fn salvage_reaches_what_a_damaged_subtree_still_names() {
        let mem = SimMem::new(8 * GIB);
        // 3 MiB of 4 KiB pages: an L2 root, two L1 tables, 768 data pages.
        let m = Morsel::<Ept>::create(3 << 20, PageSize::Size4K, &mem, &mem).unwrap();
        let mut all = Vec::new();
        m.for_each_frame(&mem, |f, o| all.push((f, o)));
        let salvage = |len: u64, page: Option<PageSize>, refuse: &[HostPhysAddr]| {
            let mut got: Vec<(HostPhysAddr, u32)> = Vec::new();
            Morsel::<Ept>::salvage(m.root(), len, page, &mem, |f, o| {
                let take = all.contains(&(f, o)) && !refuse.contains(&f) && !got.contains(&(f, o));
                if take {
                    got.push((f, o));
                }
                take
            });
            got.sort();
            got
        };
        let mut want = all.clone();
        want.sort();
        // A record with a wrong length still reaches every frame.
        assert_eq!(salvage(5 << 20, Some(PageSize::Size4K), &[]), want);
        // A table the caller refuses (outside its region) is not read: its 256 pages are not offered.
        let second = HostPhysAddr::new(Entry::<Ept>::from_raw(mem.read(m.root(), 1)).raw() & 0x000f_ffff_ffff_f000);
        let got = salvage(m.len(), Some(PageSize::Size4K), &[second]);
        assert_eq!(got.len(), all.len() - 1 - 256);
        // A cycle (an L1 entry turned into a pointer to the root) ends: the root is taken once.
        let saved = mem.read(second, 7);
        mem.write(second, 7, Entry::<Ept>::table(m.root(), Perm::RWX).raw());
        assert_eq!(salvage(m.len(), Some(PageSize::Size2M), &[]).len(), all.len() - 1);
        mem.write(second, 7, saved);
        assert!(Morsel::<Ept>::restore(m.root(), m.len(), PageSize::Size4K, &mem, |_, _| true).is_ok());
        m.destroy(&mem, &mem).unwrap();
        // With an unknown page size the root is read at the largest morsel's level (L3).
        let big = Morsel::<Ept>::create(2 * GIB, PageSize::Size2M, &mem, &mem).unwrap();
        let mut n = 0;
        Morsel::<Ept>::salvage(big.root(), 7, None, &mem, |_, _| {
            n += 1;
            true
        });
        assert_eq!(n, big.table_count() as usize + 1024);
        big.destroy(&mem, &mem).unwrap();
    }

    #[test]
    fn alias_edits_the_same_leaves_and_owns_nothing() {
        let mem = SimMem::new(64 * GIB);
        let m = Morsel::<Npt>::create_sparse(6 << 20, &mem, &mem).unwrap();
        let a = m.alias();
        assert_eq!((a.pages(), a.root_level(), a.mount_count()), (m.pages(), m.root_level(), 0));
        let f = mem.alloc(0).unwrap();
        a.edit_leaves(700, 1, &mem, |_, _| LeafEdit::Map(f)).unwrap();
        assert_eq!(m.translate(700 * 4096, &mem), Some(f));
        a.edit_leaves(700, 1, &mem, |_, _| LeafEdit::Clear).unwrap();
        assert_eq!(m.translate(700 * 4096, &mem), None);
        // Dropping the alias frees nothing: the morsel's tables are all still there.
        let before = mem.allocated_frames();
        #[allow(clippy::drop_non_drop)] // the point: an alias has no Drop that frees tables
        drop(a);
        assert_eq!(mem.allocated_frames(), before);
    }

    #[test]
    fn sparse_morsel_populates_and_evicts_page_by_page() {
        let mem = SimMem::new(64 * GIB);
        let m = Morsel::<Npt>::create_sparse(6 << 20, &mem, &mem).unwrap();
        assert!(m.is_sparse() && m.pages() == 1536);
        // Root L2 plus three L1 tables, no data frame.
        assert_eq!((m.root_level(), m.table_count()), (2, 4));
        assert_eq!(mem.allocated_frames(), 4);
        assert_eq!(m.translate(0, &mem), None);
        let frames: Vec<HostPhysAddr> = (0..600).map(|_| mem.alloc(0).unwrap()).collect();
        // Pages 400..1000 cross an L1 table boundary at 512.
        let mut next = frames.iter();
        let seen = m
            .edit_leaves(400, 600, &mem, |_, cur| {
                assert_eq!(cur, None);
                LeafEdit::Map(*next.next().unwrap())
            })
            .unwrap();
        assert_eq!(seen, 600);
        for (k, f) in frames.iter().enumerate() {
            assert_eq!(m.translate((400 + k as u64) * 4096 + 8, &mem), Some(HostPhysAddr::new(f.as_u64() + 8)));
        }
        assert_eq!(m.translate(399 * 4096, &mem), None);
        // Stop leaves the rest alone; Clear evicts.
        let seen = m.edit_leaves(500, 100, &mem, |p, _| if p == 520 { LeafEdit::Stop } else { LeafEdit::Clear }).unwrap();
        assert_eq!(seen, 20);
        assert_eq!(m.translate(519 * 4096, &mem), None);
        assert!(m.translate(520 * 4096, &mem).is_some());
        assert_eq!(m.set_leaf(520, None, &mem), Ok(Some(frames[120])));
        assert_eq!(m.edit_leaves(1500, 37, &mem, |_, _| LeafEdit::Keep), Err(Error::OutOfRange { addr: 1500 * 4096, limit: 6 << 20 }));
        assert_eq!(m.edit_leaves(u64::MAX, 2, &mem, |_, _| LeafEdit::Keep).unwrap_err(), Error::OutOfRange { addr: u64::MAX, limit: 6 << 20 });
        let dense = Morsel::<Npt>::create(4096, PageSize::Size4K, &mem, &mem).unwrap();
        assert_eq!(dense.edit_leaves(0, 1, &mem, |_, _| LeafEdit::Keep), Err(Error::NotSparse));
        // A VT-d view mirrors what is populated and stays sparse.
        let view = m.view::<VtdSl>(&mem, &mem).unwrap();
        assert!(view.is_sparse() && view.translate(400 * 4096, &mem).is_some());
        view.destroy(&mem, &mem).unwrap();
        // Destroy frees the tables and the 579 pages still populated; we free the evicted 21.
        for f in &frames[100..121] {
            mem.free(*f, 0);
        }
        m.destroy(&mem, &mem).unwrap();
        dense.destroy(&mem, &mem).unwrap();
        assert_eq!(mem.allocated_frames(), 0);
    }
}
