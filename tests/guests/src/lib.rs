//! Code shared by several test guests.
#![no_std]

/// The producer/consumer object: a 64-byte header (magic, size, checksum), then a pattern.
pub mod dataset {
    use core::ptr::{read_volatile, write_volatile};

    pub const NAME: &str = "dataset";
    /// The doorbell bit the producer rings once it published.
    pub const PUBLISHED: guest_lib::notify::Event = guest_lib::notify::Event(0x1);
    const MAGIC: u64 = u64::from_le_bytes(*b"DATASET1");
    const HEADER_WORDS: usize = 8;

    fn words(m: &[u8]) -> &[u64] {
        // SAFETY: a morsel is page aligned and a whole number of pages long.
        unsafe { core::slice::from_raw_parts(m.as_ptr() as *const u64, m.len() / 8) }
    }

    fn pattern(i: usize) -> u64 {
        (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed
    }

    /// Fills everything after the header; returns the checksum.
    pub fn fill(m: &mut [u8]) -> u64 {
        // SAFETY: as in `words`, for a mutable morsel.
        let w = unsafe { core::slice::from_raw_parts_mut(m.as_mut_ptr() as *mut u64, m.len() / 8) };
        for (i, word) in w.iter_mut().enumerate().skip(HEADER_WORDS) {
            *word = pattern(i);
        }
        checksum(m)
    }

    /// A position-dependent checksum of everything after the header (a swapped or
    /// misplaced page changes it).
    pub fn checksum(m: &[u8]) -> u64 {
        words(m).iter().enumerate().skip(HEADER_WORDS).fold(0u64, |c, (i, &w)| {
            c.wrapping_add(w.wrapping_mul(2 * i as u64 + 1))
        })
    }

    /// Writes the header, the magic last.
    pub fn publish(m: &mut [u8], sum: u64) {
        let p = m.as_mut_ptr() as *mut u64;
        // SAFETY: the header lies inside the morsel; volatile because other guests poll it.
        unsafe {
            write_volatile(p.add(1), m.len() as u64);
            write_volatile(p.add(2), sum);
            write_volatile(p, MAGIC);
        }
    }

    pub fn published(m: &[u8]) -> bool {
        // SAFETY: inside the morsel; another guest writes it.
        unsafe { read_volatile(m.as_ptr() as *const u64) == MAGIC }
    }

    pub fn published_sum(m: &[u8]) -> u64 {
        // SAFETY: as for `published`.
        unsafe { read_volatile((m.as_ptr() as *const u64).add(2)) }
    }
}
