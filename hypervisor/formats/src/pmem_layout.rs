//! The persistent region's layout (superblock, directory records) and the order in which the
//! hypervisor's writes to it must reach the media: on an NVDIMM without eADR a store sits in
//! the cache until its line is written back (CLWB / CLFLUSHOPT / CLFLUSH) and a fence (SFENCE)
//! orders the write-backs before later stores (Intel SDM Vol. 1 §11.4.4.3, Vol. 2A CLWB).
//! The writes go through `Media`, so host tests record every store, flush and fence and
//! check that nothing a commit word covers can be lost after the commit reached the media.

use morsel::HostPhysAddr;

/// A cache line.
pub const LINE: u64 = 64;

/// Superblock words (at the region's base).
pub const SB_MAGIC: usize = 0;
pub const SB_VERSION: usize = 1;
pub const SB_LEN: usize = 2;
/// The second-level format the directory's morsels are built in (`Format::NAME`, 8 bytes).
pub const SB_FORMAT: usize = 3;
pub const SB_BOOTS: usize = 4;
pub const MAGIC: u64 = u64::from_le_bytes(*b"PPOSPMEM");
/// In the magic word while a format is under way: a boot that finds it finishes the format
/// (the operator asked for it, or the region was fresh), whatever the other words hold.
pub const FORMATTING: u64 = u64::from_le_bytes(*b"PPOSWIPE");
pub const VERSION: u64 = 1;

/// The directory page: `SLOTS` records of `SLOT` bytes (one cache line each).
pub const DIRECTORY: u64 = 0x1000;
pub const SLOTS: usize = 64;
pub const SLOT: u64 = 64;
/// A record: state (0 free, `VALID`), root, length, page size and flags, name length, name.
pub const R_STATE: u64 = 0;
pub const R_ROOT: u64 = 8;
pub const R_LEN: u64 = 16;
pub const R_PAGE: u64 = 24;
pub const R_WRITABLE: u64 = 25;
pub const R_NAME_LEN: u64 = 26;
pub const R_NAME: u64 = 32;
pub const VALID: u64 = u64::from_le_bytes(*b"MORSEL01");
/// Allocator metadata from here on; superblock and directory before.
pub const META: u64 = 0x2000;

/// Persistent memory as the ordering logic sees it (physical addresses).
pub trait Media {
    /// One 8-byte store.
    fn store(&mut self, pa: u64, value: u64);
    /// Starts writing back the cache line holding `pa` (unordered until `fence`).
    fn flush(&mut self, pa: u64);
    /// Orders every earlier write-back before every later store.
    fn fence(&mut self);
}

/// Writes back every line of `len` bytes at `pa` (no fence).
pub fn flush_range(m: &mut impl Media, pa: u64, len: u64) {
    let mut line = pa & !(LINE - 1);
    while line < pa + len {
        m.flush(line);
        line += LINE;
    }
}

/// Writes back `len` bytes at `pa` and fences.
pub fn persist(m: &mut impl Media, pa: u64, len: u64) {
    flush_range(m, pa, len);
    m.fence();
}

/// A record's words after the state word (offsets `R_ROOT` to the end of the slot).
pub fn record_words(root: HostPhysAddr, len: u64, huge: bool, others_may_write: bool, name: &[u8]) -> [u64; 7] {
    let mut w = [0u64; 7];
    w[0] = root.as_u64();
    w[1] = len;
    w[2] = huge as u64 | (others_may_write as u64) << ((R_WRITABLE - R_PAGE) * 8) | (name.len() as u64) << ((R_NAME_LEN - R_PAGE) * 8);
    let mut bytes = [0u8; 32];
    let n = name.len().min(32);
    bytes[..n].copy_from_slice(&name[..n]);
    for (k, chunk) in bytes.chunks(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        w[3 + k] = u64::from_le_bytes(b);
    }
    w
}

/// Commits a record at physical address `slot`: first every line of the morsel's subtree
/// (`subtree` calls its argument for every table and data frame: the zeroed tables and data
/// are plain stores) and of the allocator metadata `meta` (`(pa, len)`: the frames' allocated
/// bits), then the record's fields, fence, and only then the state word, itself written back
/// and fenced. A power loss at any point leaves either no record or a record whose subtree
/// and allocation are on the media.
pub fn commit_record<M: Media>(m: &mut M, slot: u64, words: &[u64; 7], meta: (u64, u64), subtree: impl FnOnce(&mut dyn FnMut(HostPhysAddr, u32))) {
    subtree(&mut |f, order| flush_range(m, f.as_u64(), 4096 << order));
    flush_range(m, meta.0, meta.1);
    for (k, &w) in words.iter().enumerate() {
        m.store(slot + R_ROOT + 8 * k as u64, w);
    }
    persist(m, slot, SLOT);
    m.store(slot + R_STATE, VALID);
    persist(m, slot + R_STATE, 8);
}

/// Frees a record: its state word, written back and fenced before the caller frees frames.
pub fn clear_record(m: &mut impl Media, slot: u64) {
    m.store(slot + R_STATE, 0);
    persist(m, slot + R_STATE, 8);
}

/// Begins a format of the region at `base`: the `FORMATTING` marker in the magic word, on the
/// media before anything else is written, so that a crash from here on leaves a region the
/// next boot recognises as a format to finish.
pub fn begin_format(m: &mut impl Media, base: u64) {
    m.store(base + 8 * SB_MAGIC as u64, FORMATTING);
    persist(m, base, 8);
}

/// Finishes a format (after `begin_format`) of a region of `len` bytes at `base` whose
/// allocator metadata is `meta` (`(pa, len)`): the superblock and directory pages zeroed, the
/// allocator set up (`init`, which writes the metadata), version, length and boot count 1;
/// all of it written back and fenced before the magic, which comes last.
pub fn finish_format<M: Media, E>(m: &mut M, base: u64, len: u64, meta: (u64, u64), init: impl FnOnce(&mut M) -> Result<(), E>) -> Result<(), E> {
    for off in (8..META).step_by(8) {
        m.store(base + off, 0);
    }
    init(m)?;
    m.store(base + 8 * SB_VERSION as u64, VERSION);
    m.store(base + 8 * SB_LEN as u64, len);
    m.store(base + 8 * SB_BOOTS as u64, 1);
    flush_range(m, base, META);
    persist(m, meta.0, meta.1);
    m.store(base + 8 * SB_MAGIC as u64, MAGIC);
    persist(m, base, 8);
    Ok(())
}

/// Counts a boot of a recovered region (after the magic was found).
pub fn count_boot(m: &mut impl Media, base: u64, boots: u64) {
    m.store(base + 8 * SB_BOOTS as u64, boots);
    persist(m, base + 8 * SB_BOOTS as u64, 8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;
    use alloc::vec::Vec;
    use morsel::{Morsel, Npt, PageSize, SimMem};

    /// Records what a `Media` caller does; at the store of `commit` (address, value) it
    /// takes a snapshot of the lines that were on the media by then.
    #[derive(Default)]
    struct Recorder {
        /// Stored to, not yet written back.
        dirty: BTreeSet<u64>,
        /// Written back, not yet fenced.
        unfenced: BTreeSet<u64>,
        /// Written back and fenced since their last store.
        durable: BTreeSet<u64>,
        commit: Option<(u64, u64)>,
        /// At the commit: the durable lines and the dirty or unfenced ones.
        at_commit: Option<(BTreeSet<u64>, BTreeSet<u64>)>,
        stores: Vec<(u64, u64)>,
    }

    impl Media for Recorder {
        fn store(&mut self, pa: u64, value: u64) {
            if self.commit == Some((pa, value)) {
                let open = self.dirty.union(&self.unfenced).copied().collect();
                self.at_commit = Some((self.durable.clone(), open));
            }
            let line = pa & !(LINE - 1);
            self.durable.remove(&line);
            self.unfenced.remove(&line);
            self.dirty.insert(line);
            self.stores.push((pa, value));
        }
        fn flush(&mut self, pa: u64) {
            assert_eq!(pa % LINE, 0);
            self.dirty.remove(&pa);
            self.unfenced.insert(pa);
        }
        fn fence(&mut self) {
            self.durable.extend(core::mem::take(&mut self.unfenced));
        }
    }

    fn lines(pa: u64, len: u64) -> impl Iterator<Item = u64> {
        (pa & !(LINE - 1)..pa + len).step_by(LINE as usize)
    }

    const BASE: u64 = 0x1_0000_0000;

    #[test]
    fn a_record_commits_after_its_whole_subtree_and_allocation() {
        let mem = SimMem::new(1 << 30);
        for (len, page) in [(64 << 10, PageSize::Size4K), (4 << 20, PageSize::Size2M), (3 << 20, PageSize::Size4K)] {
            let m = Morsel::<Npt>::create(len, page, &mem, &mem).unwrap();
            let slot = BASE + DIRECTORY + 3 * SLOT;
            let meta = (BASE + META, 1000);
            let words = record_words(m.root(), m.len(), page == PageSize::Size2M, false, b"blob");
            let mut r = Recorder { commit: Some((slot, VALID)), ..Default::default() };
            commit_record(&mut r, slot, &words, meta, |mark| m.for_each_frame(&mem, mark));
            let (durable, open) = r.at_commit.take().expect("the state word was written");
            assert!(open.is_empty(), "{} lines stored or written back without a fence before the state word, the first {:#x}", open.len(), open.first().unwrap_or(&0));
            let mut frames = Vec::new();
            m.for_each_frame(&mem, |f, o| frames.push((f.as_u64(), 4096u64 << o)));
            assert_eq!(frames.len() as u64, m.table_count() as u64 + len / page.bytes());
            for (pa, bytes) in frames.into_iter().chain([meta, (slot, SLOT)]) {
                for line in lines(pa, bytes) {
                    assert!(durable.contains(&line), "line {line:#x} of {pa:#x}+{bytes:#x} not on the media before the state word");
                }
            }
            // The state word is the last store, and it is written back and fenced.
            assert_eq!(r.stores.last(), Some(&(slot, VALID)));
            assert!(r.dirty.is_empty() && r.unfenced.is_empty());
            m.destroy(&mem, &mem).unwrap();
        }
    }

    #[test]
    fn record_words_are_read_back_as_written() {
        let w = record_words(HostPhysAddr::new(0x1_0020_0000), 4 << 20, true, true, b"ledger");
        assert_eq!(w[0], 0x1_0020_0000);
        assert_eq!(w[1], 4 << 20);
        assert_eq!(w[2] as u8, 1);
        assert_eq!((w[2] >> 8) as u8, 1);
        assert_eq!((w[2] >> 16) as u8, 6);
        assert_eq!(&w[3].to_le_bytes()[..6], b"ledger");
        assert_eq!(w[4..], [0, 0, 0]);
    }

    #[test]
    fn clearing_a_record_reaches_the_media_before_anything_else() {
        let slot = BASE + DIRECTORY;
        let mut r = Recorder::default();
        clear_record(&mut r, slot);
        assert_eq!(r.stores, [(slot, 0)]);
        assert!(r.durable.contains(&slot) && r.dirty.is_empty() && r.unfenced.is_empty());
    }

    #[test]
    fn format_writes_the_magic_after_all_it_zeroed() {
        let len = 64 << 20;
        let meta = (BASE + META, 2200);
        let mut r = Recorder { commit: Some((BASE, MAGIC)), ..Default::default() };
        // The allocator's set-up writes its metadata (here: through the recorder).
        begin_format(&mut r, BASE);
        finish_format(&mut r, BASE, len, meta, |m| {
            for off in (0..meta.1).step_by(8) {
                m.store(meta.0 + off, 0xffff);
            }
            Ok::<(), ()>(())
        })
        .unwrap();
        let (durable, open) = r.at_commit.take().expect("the magic was written");
        assert!(open.is_empty(), "{} lines stored or written back without a fence before the magic, the first {:#x}", open.len(), open.first().unwrap_or(&0));
        for line in lines(BASE, META).chain(lines(meta.0, meta.1)) {
            assert!(durable.contains(&line), "line {line:#x} not on the media before the magic");
        }
        // The marker is the first store, on the media before the zeroing begins.
        assert_eq!(r.stores[0], (BASE, FORMATTING));
        let w = |i: usize| r.stores.iter().rev().find(|s| s.0 == BASE + 8 * i as u64).map(|s| s.1);
        assert_eq!((w(SB_MAGIC), w(SB_VERSION), w(SB_LEN), w(SB_BOOTS), w(SB_FORMAT)), (Some(MAGIC), Some(VERSION), Some(len), Some(1), Some(0)));
        assert!(r.dirty.is_empty() && r.unfenced.is_empty());
    }

    #[test]
    fn a_failed_format_leaves_the_marker() {
        let mut r = Recorder::default();
        begin_format(&mut r, BASE);
        assert_eq!(finish_format(&mut r, BASE, 4 << 20, (BASE + META, 64), |_| Err(7)), Err(7));
        // The magic word still holds the marker: the next boot finishes the format.
        assert_eq!(r.stores.iter().filter(|s| s.0 == BASE).collect::<Vec<_>>(), [&(BASE, FORMATTING)]);
    }
}
