//! Checked reading of a guest's ELF64 image: the header, and its PT_LOAD segments, each
//! validated against the guest's memory (inside it, not below the image base, no overlap
//! with another segment, file range inside the image).

use core::fmt;

/// Why an image cannot be loaded.
#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    Truncated,
    BadMagic,
    /// Not ELF64, little endian, x86-64, executable.
    Unsupported(&'static str),
    /// A segment's file bytes lie outside the image.
    BadFileRange { index: usize },
    /// A segment lies (partly) outside [base, limit) of guest memory.
    OutOfRange { index: usize, start: u64, end: u64 },
    /// Two segments overlap in guest memory.
    Overlap { first: usize, second: usize },
    /// The entry point is not inside any segment.
    BadEntry(u64),
    NoSegments,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            Error::Truncated => write!(f, "ELF image is truncated"),
            Error::BadMagic => write!(f, "not an ELF image (bad magic)"),
            Error::Unsupported(what) => write!(f, "unsupported ELF image: {what}"),
            Error::BadFileRange { index } => write!(f, "segment {index} reads beyond the end of the image"),
            Error::OutOfRange { index, start, end } => {
                write!(f, "segment {index} at {start:#x}-{end:#x} lies outside guest memory")
            }
            Error::Overlap { first, second } => write!(f, "segments {first} and {second} overlap"),
            Error::BadEntry(e) => write!(f, "entry point {e:#x} is not inside a loaded segment"),
            Error::NoSegments => write!(f, "image has no loadable segment"),
        }
    }
}

/// A loadable segment: copy `file` to `addr`, then zero up to `addr + mem_size`.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub addr: u64,
    pub mem_size: u64,
    pub file: &'a [u8],
    pub writable: bool,
    pub executable: bool,
}

const MAX_SEGMENTS: usize = 16;

/// A checked image.
pub struct Image<'a> {
    pub entry: u64,
    segments: [Option<Segment<'a>>; MAX_SEGMENTS],
}

fn u16_at(d: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(d[o..o + 2].try_into().unwrap())
}
fn u32_at(d: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(d[o..o + 4].try_into().unwrap())
}
fn u64_at(d: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(d[o..o + 8].try_into().unwrap())
}

impl<'a> Image<'a> {
    /// Parses `data` and checks that every segment fits in guest memory [base, limit).
    pub fn parse(data: &'a [u8], base: u64, limit: u64) -> Result<Self, Error> {
        if data.len() < 64 {
            return Err(Error::Truncated);
        }
        if &data[..4] != b"\x7fELF" {
            return Err(Error::BadMagic);
        }
        // ELF header fields (System V ABI gABI, "ELF Header").
        if data[4] != 2 {
            return Err(Error::Unsupported("not 64-bit"));
        }
        if data[5] != 1 {
            return Err(Error::Unsupported("not little endian"));
        }
        if u16_at(data, 16) != 2 {
            return Err(Error::Unsupported("not an executable (ET_EXEC)"));
        }
        if u16_at(data, 18) != 62 {
            return Err(Error::Unsupported("not x86-64"));
        }
        let entry = u64_at(data, 24);
        let phoff = u64_at(data, 32) as usize;
        let phentsize = u16_at(data, 54) as usize;
        let phnum = u16_at(data, 56) as usize;
        if phentsize < 56 || phoff.checked_add(phentsize * phnum).is_none_or(|e| e > data.len()) {
            return Err(Error::Truncated);
        }
        let mut image = Image { entry, segments: [None; MAX_SEGMENTS] };
        let mut n = 0;
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            if u32_at(data, ph) != 1 {
                continue; // not PT_LOAD
            }
            let flags = u32_at(data, ph + 4);
            let (offset, vaddr) = (u64_at(data, ph + 8), u64_at(data, ph + 16));
            let (filesz, memsz) = (u64_at(data, ph + 32), u64_at(data, ph + 40));
            if memsz == 0 {
                continue;
            }
            if filesz > memsz
                || offset.checked_add(filesz).is_none_or(|e| e > data.len() as u64)
            {
                return Err(Error::BadFileRange { index: n });
            }
            let end = vaddr.checked_add(memsz).ok_or(Error::OutOfRange { index: n, start: vaddr, end: u64::MAX })?;
            if vaddr < base || end > limit {
                return Err(Error::OutOfRange { index: n, start: vaddr, end });
            }
            if n == MAX_SEGMENTS {
                return Err(Error::Unsupported("more than 16 loadable segments"));
            }
            let seg = Segment {
                addr: vaddr,
                mem_size: memsz,
                file: &data[offset as usize..(offset + filesz) as usize],
                writable: flags & 2 != 0,
                executable: flags & 1 != 0,
            };
            for (j, other) in image.segments().enumerate() {
                if seg.addr < other.addr + other.mem_size && other.addr < end {
                    return Err(Error::Overlap { first: j, second: n });
                }
            }
            image.segments[n] = Some(seg);
            n += 1;
        }
        if n == 0 {
            return Err(Error::NoSegments);
        }
        if !image.segments().any(|s| s.executable && (s.addr..s.addr + s.mem_size).contains(&entry)) {
            return Err(Error::BadEntry(entry));
        }
        Ok(image)
    }

    /// The loadable segments in file order.
    pub fn segments(&self) -> impl Iterator<Item = &Segment<'a>> {
        self.segments.iter().map_while(|s| s.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// A minimal ELF64 executable with the given (vaddr, filesz, memsz, flags) segments.
    fn elf(entry: u64, segs: &[(u64, u64, u64, u32)]) -> Vec<u8> {
        let mut d = std::vec![0u8; 64 + 56 * segs.len()];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[16..18].copy_from_slice(&2u16.to_le_bytes());
        d[18..20].copy_from_slice(&62u16.to_le_bytes());
        d[24..32].copy_from_slice(&entry.to_le_bytes());
        d[32..40].copy_from_slice(&64u64.to_le_bytes());
        d[54..56].copy_from_slice(&56u16.to_le_bytes());
        d[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let data_off = d.len() as u64;
        for (i, &(vaddr, filesz, memsz, flags)) in segs.iter().enumerate() {
            let ph = 64 + 56 * i;
            d[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
            d[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
            d[ph + 8..ph + 16].copy_from_slice(&data_off.to_le_bytes());
            d[ph + 16..ph + 24].copy_from_slice(&vaddr.to_le_bytes());
            d[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
            d[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        let max = segs.iter().map(|s| s.1).max().unwrap_or(0);
        d.resize(d.len() + max as usize, 0xab);
        d
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn accepts_a_good_image() {
        let d = elf(2 * MIB, &[(2 * MIB, 16, 4096, 5), (2 * MIB + 4096, 8, 8192, 6)]);
        let img = Image::parse(&d, 2 * MIB, 16 * MIB).unwrap();
        assert_eq!(img.entry, 2 * MIB);
        let segs: Vec<_> = img.segments().collect();
        assert_eq!(segs.len(), 2);
        assert!(segs[0].executable && !segs[0].writable);
        assert_eq!(segs[1].file.len(), 8);
        assert_eq!(segs[1].mem_size, 8192);
    }

    #[test]
    fn rejects_bad_magic_and_truncation() {
        let mut d = elf(2 * MIB, &[(2 * MIB, 16, 16, 5)]);
        assert_eq!(Image::parse(&d[..40], 0, u64::MAX).err(), Some(Error::Truncated));
        d[1] = b'X';
        assert_eq!(Image::parse(&d, 0, u64::MAX).err(), Some(Error::BadMagic));
    }

    #[test]
    fn rejects_out_of_range_segments() {
        let d = elf(2 * MIB, &[(2 * MIB, 16, 15 * MIB, 5)]);
        assert!(matches!(Image::parse(&d, 2 * MIB, 16 * MIB), Err(Error::OutOfRange { .. })));
        let d = elf(MIB, &[(MIB, 16, 16, 5)]);
        assert!(matches!(Image::parse(&d, 2 * MIB, 16 * MIB), Err(Error::OutOfRange { .. })));
        let d = elf(2 * MIB, &[(u64::MAX - 8, 16, 16, 5)]);
        assert!(matches!(Image::parse(&d, 2 * MIB, u64::MAX), Err(Error::OutOfRange { .. })));
    }

    #[test]
    fn rejects_overlap_file_range_and_entry() {
        let d = elf(2 * MIB, &[(2 * MIB, 16, 8192, 5), (2 * MIB + 4096, 16, 16, 6)]);
        assert_eq!(Image::parse(&d, 0, u64::MAX).err(), Some(Error::Overlap { first: 0, second: 1 }));
        let mut d = elf(2 * MIB, &[(2 * MIB, 16, 16, 5)]);
        d[64 + 32..64 + 40].copy_from_slice(&1_000_000u64.to_le_bytes());
        d[64 + 40..64 + 48].copy_from_slice(&1_000_000u64.to_le_bytes());
        assert_eq!(Image::parse(&d, 0, u64::MAX).err(), Some(Error::BadFileRange { index: 0 }));
        let d = elf(3 * MIB, &[(2 * MIB, 16, 16, 5)]);
        assert_eq!(Image::parse(&d, 0, u64::MAX).err(), Some(Error::BadEntry(3 * MIB)));
    }
}
