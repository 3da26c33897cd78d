//! Writer for the guest archive `build/guests.ar` that the hypervisor receives as its initrd
//! (QEMU `-initrd`) or multiboot2 module (GRUB). The hypervisor has its own reader; this file
//! and that reader are the two ends of the format below, so change both together.
//!
//! Layout, little endian: magic `PPOSGAR1` (8 bytes), u32 count, u32 zero, then `count`
//! entries of 64 bytes {name: [u8; 48] NUL-padded, offset: u64 from archive start, size: u64},
//! then the files, each starting at a 4096-aligned offset.

use crate::{bail, Result};

pub const MAGIC: &[u8; 8] = b"PPOSGAR1";
pub const HEADER_SIZE: usize = 16;
pub const ENTRY_SIZE: usize = 64;
/// Bytes for the name field; names are at most `NAME_SIZE - 1` bytes so one NUL always ends them.
pub const NAME_SIZE: usize = 48;
pub const FILE_ALIGN: usize = 4096;

fn align_up(x: usize, align: usize) -> usize {
    x.div_ceil(align) * align
}

/// Build an archive from `(name, contents)` pairs, in the given order.
pub fn build(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    for (i, (name, _)) in files.iter().enumerate() {
        if name.is_empty() || name.len() >= NAME_SIZE || name.as_bytes().contains(&0) {
            bail!("guest name `{name}` must be 1 to {} bytes without NUL", NAME_SIZE - 1);
        }
        if files[..i].iter().any(|(other, _)| other == name) {
            bail!("guest name `{name}` appears twice in the archive");
        }
    }
    let count = u32::try_from(files.len()).map_err(|_| crate::Error("too many guests".into()))?;

    let mut offsets = Vec::with_capacity(files.len());
    let mut end = HEADER_SIZE + ENTRY_SIZE * files.len();
    for (_, data) in files {
        let offset = align_up(end, FILE_ALIGN);
        offsets.push(offset);
        end = offset + data.len();
    }

    let mut out = Vec::with_capacity(end);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for ((name, data), &offset) in files.iter().zip(&offsets) {
        let mut field = [0u8; NAME_SIZE];
        field[..name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&field);
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    }
    for ((_, data), &offset) in files.iter().zip(&offsets) {
        out.resize(offset, 0);
        out.extend_from_slice(data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn layout_matches_the_format() {
        let files = vec![
            ("hello".to_string(), vec![1u8; 5000]),
            ("counter".to_string(), vec![2u8; 3]),
            ("empty".to_string(), vec![]),
        ];
        let ar = build(&files).unwrap();
        assert_eq!(&ar[..8], MAGIC);
        assert_eq!(u32_at(&ar, 8), 3);
        assert_eq!(u32_at(&ar, 12), 0);
        for (i, (name, data)) in files.iter().enumerate() {
            let e = HEADER_SIZE + i * ENTRY_SIZE;
            let field = &ar[e..e + NAME_SIZE];
            let len = field.iter().position(|&b| b == 0).unwrap();
            assert_eq!(&field[..len], name.as_bytes());
            assert!(field[len..].iter().all(|&b| b == 0));
            let offset = u64_at(&ar, e + NAME_SIZE) as usize;
            let size = u64_at(&ar, e + NAME_SIZE + 8) as usize;
            assert_eq!(offset % FILE_ALIGN, 0, "{name} aligned");
            assert_eq!(size, data.len());
            assert_eq!(&ar[offset..offset + size], &data[..]);
        }
        // hello at 4096, counter after hello's 5000 bytes rounded up, empty right after.
        assert_eq!(u64_at(&ar, HEADER_SIZE + NAME_SIZE), 4096);
        assert_eq!(u64_at(&ar, HEADER_SIZE + ENTRY_SIZE + NAME_SIZE), 12288);
        assert_eq!(u64_at(&ar, HEADER_SIZE + 2 * ENTRY_SIZE + NAME_SIZE), 16384);
    }

    #[test]
    fn empty_archive_is_just_a_header() {
        let ar = build(&[]).unwrap();
        assert_eq!(ar.len(), HEADER_SIZE);
        assert_eq!(u32_at(&ar, 8), 0);
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(build(&[(String::new(), vec![])]).is_err());
        assert!(build(&[("x".repeat(NAME_SIZE), vec![])]).is_err());
        assert!(build(&[("x".repeat(NAME_SIZE - 1), vec![])]).is_ok());
        assert!(build(&[("a".into(), vec![]), ("a".into(), vec![])]).is_err());
    }
}
