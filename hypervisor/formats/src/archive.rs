//! Reader of the guest archive that xtask writes (`xtask/src/archive.rs` is the writer):
//! magic `PPOSGAR1`, u32 count, u32 zero, `count` entries of 64 bytes {name: [u8; 48]
//! NUL-padded, offset: u64, size: u64}, then the files at 4096-aligned offsets.

use core::fmt;

const MAGIC: &[u8; 8] = b"PPOSGAR1";
const HEADER: usize = 16;
const ENTRY: usize = 64;
const NAME: usize = 48;

/// Why the archive cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    BadMagic,
    Truncated,
    /// Entry `index` points outside the archive.
    BadEntry { index: usize },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Error::BadMagic => write!(f, "not a guest archive (bad magic)"),
            Error::Truncated => write!(f, "guest archive is truncated"),
            Error::BadEntry { index } => write!(f, "guest archive entry {index} points outside the archive"),
        }
    }
}

/// A checked view of an archive in memory.
#[derive(Clone, Copy)]
pub struct Archive<'a> {
    data: &'a [u8],
    count: usize,
}

fn u64_at(d: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(d[off..off + 8].try_into().unwrap())
}

impl<'a> Archive<'a> {
    /// Checks the header and every entry.
    pub fn parse(data: &'a [u8]) -> Result<Self, Error> {
        if data.len() < HEADER {
            return Err(Error::Truncated);
        }
        if &data[..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let count = u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize;
        if data.len() < HEADER + count * ENTRY {
            return Err(Error::Truncated);
        }
        let archive = Archive { data, count };
        for index in 0..count {
            let e = HEADER + index * ENTRY;
            let (off, size) = (u64_at(data, e + NAME), u64_at(data, e + NAME + 8));
            if off.checked_add(size).is_none_or(|end| end > data.len() as u64) {
                return Err(Error::BadEntry { index });
            }
        }
        Ok(archive)
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The files as (name, contents).
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        (0..self.count).map(|i| {
            let e = HEADER + i * ENTRY;
            let name = &self.data[e..e + NAME];
            let len = name.iter().position(|&b| b == 0).unwrap_or(NAME);
            let (off, size) = (u64_at(self.data, e + NAME) as usize, u64_at(self.data, e + NAME + 8) as usize);
            (core::str::from_utf8(&name[..len]).unwrap_or(""), &self.data[off..off + size])
        })
    }

    /// The file called `name`.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, d)| d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn build(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(files.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        let mut off = (HEADER + ENTRY * files.len()).next_multiple_of(4096);
        let mut offs = Vec::new();
        for (name, data) in files {
            let mut field = [0u8; NAME];
            field[..name.len()].copy_from_slice(name.as_bytes());
            out.extend_from_slice(&field);
            out.extend_from_slice(&(off as u64).to_le_bytes());
            out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            offs.push(off);
            off = (off + data.len()).next_multiple_of(4096);
        }
        for ((_, data), off) in files.iter().zip(offs) {
            out.resize(off, 0);
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn reads_what_was_written() {
        let a = build(&[("hello", b"abc"), ("spin", b"0123456789")]);
        let ar = Archive::parse(&a).unwrap();
        assert_eq!(ar.len(), 2);
        assert_eq!(ar.get("hello"), Some(&b"abc"[..]));
        assert_eq!(ar.get("spin"), Some(&b"0123456789"[..]));
        assert_eq!(ar.get("nope"), None);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(Archive::parse(b"short").err(), Some(Error::Truncated));
        let mut a = build(&[("hello", b"abc")]);
        assert!(Archive::parse(&a[..20]).is_err());
        a[0] = b'X';
        assert_eq!(Archive::parse(&a).err(), Some(Error::BadMagic));
        let mut b = build(&[("hello", b"abc")]);
        b[HEADER + NAME + 8] = 0xff; // size far beyond the end
        assert_eq!(Archive::parse(&b).err(), Some(Error::BadEntry { index: 0 }));
    }
}
