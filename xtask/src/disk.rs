//! Disk images for scenarios with `disk = SIZE`: a deterministic pattern, its checksum (what
//! `@DISK_SUM@` stands for in the scenario), and the `check_disk = LBA BYTE` checks after the
//! run. Pattern and checksum are defined in tests/scenarios/README.md.

use crate::{Context, Result};
use std::io::{Read, Write};
use std::path::Path;

/// Bytes per block (LBA) of the NVMe namespace QEMU makes from a raw image.
pub const BLOCK: u64 = 512;

/// Little-endian word `i` of a fresh image.
pub fn word(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0d15_c0de_5eed
}

/// The checksum of an image: the sum of w_i * (2i + 1) modulo 2^64 over its words.
pub fn checksum(words: impl Iterator<Item = u64>) -> u64 {
    words.enumerate().fold(0u64, |c, (i, w)| c.wrapping_add(w.wrapping_mul(2 * i as u64 + 1)))
}

/// Writes a fresh image of `size` bytes (a multiple of 512) and returns its checksum.
pub fn create(path: &Path, size: u64) -> Result<u64> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).context(|| format!("cannot create {}", path.display()))?);
    for i in 0..size / 8 {
        f.write_all(&word(i).to_le_bytes()).context(|| format!("cannot write {}", path.display()))?;
    }
    f.flush().context(|| format!("cannot write {}", path.display()))?;
    Ok(checksum((0..size / 8).map(word)))
}

/// After the run: every block in `checks` holds only its byte, every other block still holds
/// the pattern. Returns the problems (empty = good).
pub fn check(path: &Path, checks: &[(u64, u8)]) -> Result<Vec<String>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).context(|| format!("cannot read {}", path.display()))?;
    let mut problems = Vec::new();
    for (b, block) in bytes.chunks(BLOCK as usize).enumerate() {
        let b = b as u64;
        match checks.iter().find(|(lba, _)| *lba == b) {
            Some(&(_, byte)) => {
                if block.iter().any(|&x| x != byte) {
                    problems.push(format!("disk block {b} does not hold {byte:#04x} in all {BLOCK} bytes after the run"));
                }
            }
            None => {
                let first = b * BLOCK / 8;
                let same = block.chunks_exact(8).enumerate().all(|(i, w)| w == word(first + i as u64).to_le_bytes());
                if !same && problems.len() < 5 {
                    problems.push(format!("disk block {b} changed, but no check_disk line names it"));
                }
            }
        }
    }
    for &(lba, _) in checks {
        if lba >= bytes.len() as u64 / BLOCK {
            problems.push(format!("check_disk block {lba} is beyond the {} blocks of the image", bytes.len() as u64 / BLOCK));
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_check() {
        let dir = std::env::temp_dir().join(format!("parperos-disk-{}", std::process::id()));
        let path = dir.join("t.img");
        let sum = create(&path, 8 * BLOCK).unwrap();
        assert_eq!(sum, checksum((0..8 * BLOCK / 8).map(word)));
        assert!(check(&path, &[]).unwrap().is_empty());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3 * 512..4 * 512].fill(0xab);
        std::fs::write(&path, &bytes).unwrap();
        assert!(check(&path, &[(3, 0xab)]).unwrap().is_empty());
        assert_eq!(check(&path, &[]).unwrap().len(), 1);
        assert_eq!(check(&path, &[(3, 0xab), (2, 0)]).unwrap().len(), 1);
        assert_eq!(check(&path, &[(3, 0xab), (9, 0)]).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
