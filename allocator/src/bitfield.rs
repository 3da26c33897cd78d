//! Lower level, part 1: the bit field of one 2 MiB area, 512 bits (one per 4 KiB frame, set =
//! allocated) in eight 64-bit words, one cache line. Each frame changes state with one atomic
//! read-modify-write on its word (`lock bts` / `lock btr` on x86-64); this is the persistent
//! truth of which small frames are allocated.

use crate::sync::{AtomicU64, Ordering::*};

/// Words per area (512 frames / 64 bits).
pub const WORDS: usize = 8;

/// Sets one clear bit of the area, searching from word `hint`; returns the frame's index in the
/// area (0..512), or `None` when one pass saw every bit set. The caller has claimed a frame of
/// the area in its entry (see `child`), so a clear bit exists; a pass can still miss it when
/// bits are cleared behind the search, so callers retry.
#[inline]
pub fn take(words: &[AtomicU64], hint: usize) -> Option<usize> {
    debug_assert_eq!(words.len(), WORDS);
    for k in 0..WORDS {
        let w = (hint + k) % WORDS;
        let word = &words[w];
        let mut v = word.load(Relaxed);
        while v != u64::MAX {
            if let Some(bit) = take_seen(word, v) {
                return Some(w * 64 + bit);
            }
            v = word.load(Relaxed);
        }
    }
    None
}

/// Sets the lowest clear bit of `word` as seen in `v` (not all ones); returns its index in the
/// word, or `None` when someone set that bit after `v` was read (only the area's claim holder
/// sets bits, so in practice never; the caller reloads and retries).
#[inline(always)]
pub fn take_seen(word: &AtomicU64, v: u64) -> Option<usize> {
    debug_assert_ne!(v, u64::MAX);
    let bit = (!v).trailing_zeros() as usize;
    let mask = 1u64 << bit;
    // The one step that allocates the frame: it is ours iff we flipped the bit. Only that bit
    // of the old value is read, so x86-64 compiles it to one `lock bts` (no CAS loop).
    (word.fetch_or(mask, AcqRel) & mask == 0).then_some(bit)
}

/// Clears bit `i`; returns whether it was set (false: the frame was not allocated as a small
/// frame, and nothing changed).
#[inline]
pub fn clear(words: &[AtomicU64], i: usize) -> bool {
    let mask = 1u64 << (i % 64);
    words[i / 64].fetch_and(!mask, AcqRel) & mask != 0
}

/// Number of set bits (allocated frames) of the area.
pub fn count_set(words: &[AtomicU64]) -> usize {
    words
        .iter()
        .map(|w| w.load(Acquire).count_ones() as usize)
        .sum()
}

/// Whether fewer than `limit` bits are set, reading words only until `limit` set bits are
/// seen (a full word of a mostly used area answers early; `limit` 0 reads nothing).
pub fn fewer_set_than(words: &[AtomicU64], limit: usize) -> bool {
    let mut set = 0;
    for w in words {
        if set >= limit {
            return false;
        }
        set += w.load(Acquire).count_ones() as usize;
    }
    set < limit
}
