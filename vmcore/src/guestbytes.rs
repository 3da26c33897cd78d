//! Guest memory as the hypervisor touches it: `GuestBytes`, a host range that a guest (or a
//! sibling vCPU of it, or a device) may change at any moment, copied in and out through raw
//! pointers and never lent out as a Rust reference (vm-memory's `VolatileSlice` is the
//! model). Every offset and length is checked here; the one unsafe assumption is the one
//! `GuestBytes::new` states.

use core::fmt;
use core::ptr;

/// A range of guest memory, already translated to a host pointer (one host-contiguous piece).
///
/// It never hands out `&[u8]` or `&mut [u8]` over the range: another CPU may write it at
/// any time, which a Rust reference forbids (undefined behaviour, and the compiler may read
/// twice what it read once). Bytes cross with `copy_nonoverlapping`, single words with
/// `read_volatile` / `write_volatile`; a torn or changing value is the guest's own problem,
/// never the hypervisor's.
#[derive(Clone, Copy)]
pub struct GuestBytes {
    ptr: *mut u8,
    len: usize,
}

/// An access outside a `GuestBytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub offset: usize,
    pub len: usize,
    pub size: usize,
}

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} bytes at offset {} of a {}-byte guest range", self.len, self.offset, self.size)
    }
}

/// `offset..offset + len` if it lies inside `0..size` (no wrap-around).
pub fn check(offset: usize, len: usize, size: usize) -> Result<(), OutOfRange> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(OutOfRange { offset, len, size }),
    }
}

impl GuestBytes {
    /// The `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay valid for reads and writes (mapped in the host, not freed)
    /// for as long as this value or a copy of it is used, and must not overlap memory the
    /// hypervisor holds a Rust reference to (its own heap, stacks, statics): guest RAM and
    /// morsel frames translated through the guest's own table, while the guest exists.
    /// Others (the guest's vCPUs, devices) may read and write it concurrently.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> GuestBytes {
        GuestBytes { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The part `offset..offset + len`.
    pub fn sub(&self, offset: usize, len: usize) -> Result<GuestBytes, OutOfRange> {
        check(offset, len, self.len)?;
        // SAFETY: inside the range `new` was promised (checked above).
        Ok(GuestBytes { ptr: unsafe { self.ptr.add(offset) }, len })
    }

    /// Copies `out.len()` bytes from `offset` into `out`.
    pub fn copy_to(&self, offset: usize, out: &mut [u8]) -> Result<(), OutOfRange> {
        check(offset, out.len(), self.len)?;
        // SAFETY: the source is inside the promised range (checked above), valid for reads;
        // `out` is hypervisor memory, which the range does not overlap (`new`'s contract).
        unsafe { ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `bytes` to `offset`.
    pub fn copy_from(&self, offset: usize, bytes: &[u8]) -> Result<(), OutOfRange> {
        check(offset, bytes.len(), self.len)?;
        // SAFETY: as in `copy_to`, the other way round (the range is valid for writes).
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) };
        Ok(())
    }

    /// The little-endian u64 at `offset` (any alignment), read once.
    pub fn read_u64(&self, offset: usize) -> Result<u64, OutOfRange> {
        check(offset, 8, self.len)?;
        // SAFETY: 8 bytes inside the promised range (checked above); unaligned is allowed.
        Ok(u64::from_le(unsafe { ptr::read_unaligned(self.ptr.add(offset).cast::<u64>()) }))
    }

    /// Writes the little-endian u64 `v` at `offset` (any alignment), once.
    pub fn write_u64(&self, offset: usize, v: u64) -> Result<(), OutOfRange> {
        check(offset, 8, self.len)?;
        let at = self.ptr.wrapping_add(offset);
        if at.align_offset(8) == 0 {
            // SAFETY: 8 aligned bytes inside the promised range (checked above).
            unsafe { ptr::write_volatile(at.cast::<u64>(), v.to_le()) };
        } else {
            // SAFETY: 8 bytes inside the promised range (checked above).
            unsafe { ptr::write_unaligned(at.cast::<u64>(), v.to_le()) };
        }
        Ok(())
    }

    /// The aligned little-endian u64 at `offset`, read with one volatile load (a value the
    /// guest changes meanwhile is either the old or the new one).
    pub fn read_u64_volatile(&self, offset: usize) -> Result<u64, OutOfRange> {
        check(offset, 8, self.len)?;
        let at = self.ptr.wrapping_add(offset);
        if at.align_offset(8) != 0 {
            return Err(OutOfRange { offset, len: 8, size: self.len });
        }
        // SAFETY: 8 aligned bytes inside the promised range (checked above).
        Ok(u64::from_le(unsafe { ptr::read_volatile(at.cast::<u64>()) }))
    }

    /// The `n` aligned little-endian u64 words from `offset`, each read with one volatile load
    /// as the iterator reaches it: the range and its alignment checked once, not per word (an
    /// ExMap iovec page is read this way on every call).
    #[inline]
    pub fn words_volatile(&self, offset: usize, n: usize) -> Result<impl ExactSizeIterator<Item = u64>, OutOfRange> {
        let bytes = n.checked_mul(8).ok_or(OutOfRange { offset, len: usize::MAX, size: self.len })?;
        let at = self.aligned(offset, bytes)?;
        // SAFETY: `n` aligned words inside the promised range (checked by `aligned`).
        Ok((0..n).map(move |k| u64::from_le(unsafe { ptr::read_volatile(at.add(k)) })))
    }

    /// Writes `words` as aligned little-endian u64s from `offset`, one volatile store each,
    /// the range and its alignment checked once.
    #[inline]
    pub fn write_words(&self, offset: usize, words: &[u64]) -> Result<(), OutOfRange> {
        let at = self.aligned(offset, words.len() * 8)?;
        for (k, &w) in words.iter().enumerate() {
            // SAFETY: inside the promised range, aligned (checked by `aligned`).
            unsafe { ptr::write_volatile(at.add(k), w.to_le()) };
        }
        Ok(())
    }

    /// The u64 pointer at `offset`, where `offset..offset + len` lies inside and is 8-byte
    /// aligned.
    #[inline]
    fn aligned(&self, offset: usize, len: usize) -> Result<*mut u64, OutOfRange> {
        check(offset, len, self.len)?;
        let at = self.ptr.wrapping_add(offset);
        if !(at as usize).is_multiple_of(8) {
            return Err(OutOfRange { offset, len, size: self.len });
        }
        Ok(at.cast::<u64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn over(buf: &mut [u64]) -> GuestBytes {
        // SAFETY: the test's buffer outlives the value, and the test holds no reference to it
        // while the value is used (it reads `buf` only after).
        unsafe { GuestBytes::new(buf.as_mut_ptr().cast(), buf.len() * 8) }
    }

    #[test]
    fn copies_both_ways_inside_the_range() {
        let mut buf = [0u64; 5];
        let g = over(&mut buf);
        g.copy_from(3, b"hello").unwrap();
        let mut out = [0u8; 5];
        g.copy_to(3, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        g.write_u64(16, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(g.read_u64(16), Ok(0x1122_3344_5566_7788));
        assert_eq!(g.read_u64_volatile(16), Ok(0x1122_3344_5566_7788));
        g.write_u64(25, 7).unwrap();
        assert_eq!(g.read_u64(25), Ok(7));
        assert!(g.read_u64_volatile(25).is_err(), "unaligned volatile read");
        assert_eq!(buf[2], 0x1122_3344_5566_7788);
    }

    #[test]
    fn refuses_the_last_byte_past_the_end() {
        let mut buf = [0u64; 2];
        let g = over(&mut buf);
        assert_eq!(g.read_u64(8), Ok(0));
        assert_eq!(g.read_u64(9), Err(OutOfRange { offset: 9, len: 8, size: 16 }));
        assert!(g.copy_from(16, &[1]).is_err());
        assert!(g.copy_from(16, &[]).is_ok());
        let mut out = [0u8; 17];
        assert!(g.copy_to(0, &mut out).is_err());
        assert!(g.write_u64(usize::MAX - 3, 1).is_err(), "wraps around");
        assert!(g.sub(8, 9).is_err());
        assert_eq!(g.sub(8, 8).map(|s| s.len()), Ok(8));
        assert_eq!(buf, [0, 0]);
    }

    #[test]
    fn words_cross_in_one_checked_range() {
        let mut buf = [0u64; 4];
        let g = over(&mut buf);
        g.write_words(8, &[5, 6, 7]).unwrap();
        assert_eq!(g.words_volatile(0, 4).map(|w| w.collect::<alloc::vec::Vec<_>>()), Ok(alloc::vec![0, 5, 6, 7]));
        assert_eq!(g.words_volatile(8, 2).map(|w| w.len()), Ok(2));
        assert!(g.words_volatile(8, 4).is_err(), "past the end");
        assert!(g.write_words(16, &[1, 2, 3]).is_err(), "past the end");
        assert!(g.words_volatile(4, 1).is_err(), "unaligned");
        assert!(g.write_words(12, &[1]).is_err(), "unaligned");
        assert!(g.words_volatile(0, usize::MAX / 4).is_err(), "the length overflows");
        assert_eq!(buf, [0, 5, 6, 7], "nothing written by a refused call");
    }

    proptest! {
        #[test]
        fn check_is_exactly_inside(offset in 0usize..64, len in 0usize..64, size in 0usize..64) {
            prop_assert_eq!(check(offset, len, size).is_ok(), offset + len <= size);
        }

        #[test]
        fn check_never_wraps(offset in any::<usize>(), len in any::<usize>(), size in any::<usize>()) {
            if check(offset, len, size).is_ok() {
                prop_assert!(offset.checked_add(len).is_some_and(|e| e <= size));
            }
        }

        #[test]
        fn a_sub_range_copies_only_its_bytes(offset in 0usize..32, len in 0usize..32) {
            let mut buf = [0u64; 4];
            let g = over(&mut buf);
            let ok = g.sub(offset, len).and_then(|s| s.copy_from(0, &[0xff; 32][..len]));
            prop_assert_eq!(ok.is_ok(), offset + len <= 32);
            let bytes: alloc::vec::Vec<u8> = buf.iter().flat_map(|w| w.to_le_bytes()).collect();
            for (i, b) in bytes.iter().enumerate() {
                let inside = ok.is_ok() && (offset..offset + len).contains(&i);
                prop_assert_eq!(*b == 0xff, inside);
            }
        }
    }
}
