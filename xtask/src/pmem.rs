//! Persistent memory for scenarios with `pmem = SIZE`: a zero-filled file that QEMU maps as an
//! NVDIMM (found by the hypervisor through the ACPI NFIT). The backend is
//! `memory-backend-file,share=on`, so guest stores go straight into the file's shared mapping
//! and survive a SIGKILL of QEMU: the crash model of `kill@K`. One file per scenario and config,
//! `build/pmem/<scenario>.<config>.img`, made fresh at the start of the run and kept by every boot.

use crate::{bail, Context, Result};
use std::path::Path;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Creates `path` (and its folder) as `size` zero bytes, replacing an older file.
pub fn create(path: &Path, size: u64) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
    }
    // A new file, not a truncated old one: QEMU of an earlier run may still map the old inode.
    let _ = std::fs::remove_file(path);
    let file = std::fs::File::create(path).context(|| format!("cannot create {}", path.display()))?;
    file.set_len(size).context(|| format!("cannot size {} to {size} bytes", path.display()))
}

/// Applies a `pmem_write` to the file (between boots: no QEMU maps it then).
pub fn apply(path: &Path, w: &crate::scenario::PmemWrite) -> Result<()> {
    use crate::scenario::PmemWrite;
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path)
        .context(|| format!("cannot open {}", path.display()))?;
    let size = f.metadata().context(|| format!("cannot stat {}", path.display()))?.len();
    let (at, bytes) = match *w {
        PmemWrite::Word { at, value } => (at, value.to_le_bytes().to_vec()),
        PmemWrite::Copy { at, from, len } => {
            if from.checked_add(len).is_none_or(|end| end > size) {
                bail!("pmem_write: {len} bytes from {from:#x} lie outside the {size}-byte file");
            }
            let mut b = vec![0u8; len as usize];
            f.seek(SeekFrom::Start(from)).and_then(|_| f.read_exact(&mut b))
                .context(|| format!("cannot read {}", path.display()))?;
            (at, b)
        }
    };
    if at.checked_add(bytes.len() as u64).is_none_or(|end| end > size) {
        bail!("pmem_write: {} bytes at {at:#x} lie outside the {size}-byte file", bytes.len());
    }
    f.seek(SeekFrom::Start(at)).and_then(|_| f.write_all(&bytes))
        .context(|| format!("cannot write {}", path.display()))
}

/// The QEMU arguments that add `path` as NVDIMM `nvdimm0` of `size` bytes to the machine that
/// `config_args` (a config's arguments) describe: its `-m RAM` becomes
/// `-m RAM,slots=2,maxmem=RAM+size rounded up to 2 GiB` (2G and 64M: `maxmem=4G`); QEMU
/// merges a later `-m` and `-machine nvdimm=on` with the config's own.
pub fn qemu_args(config_args: &[String], path: &Path, size: u64) -> Result<Vec<String>> {
    let Some(ram) = config_args.windows(2).rev().find(|w| w[0] == "-m").map(|w| w[1].as_str()) else {
        bail!("`pmem` needs the config to give the memory size (`-m 2G`)");
    };
    let Some(ram_bytes) = ram_size(ram) else {
        bail!("`pmem`: cannot read the config's memory size `-m {ram}` (write it as `-m 2G`)");
    };
    let maxmem = ram_bytes + size.div_ceil(2 * GIB) * 2 * GIB;
    Ok(vec![
        "-machine".into(),
        "nvdimm=on".into(),
        "-m".into(),
        format!("{ram},slots=2,maxmem={}", qemu_size(maxmem)),
        "-object".into(),
        format!("memory-backend-file,id=pmem0,share=on,mem-path={},size={}", path.display(), qemu_size(size)),
        "-device".into(),
        "nvdimm,id=nvdimm0,memdev=pmem0".into(),
    ])
}

/// A QEMU `-m` value in bytes: `2G`, `2048M`, `2048` (MiB, QEMU's default unit).
fn ram_size(v: &str) -> Option<u64> {
    let v = v.strip_prefix("size=").unwrap_or(v);
    let (num, unit) = match v.as_bytes().last()? {
        b'T' | b't' => (&v[..v.len() - 1], 1024 * GIB),
        b'G' | b'g' => (&v[..v.len() - 1], GIB),
        b'M' | b'm' => (&v[..v.len() - 1], MIB),
        b'K' | b'k' => (&v[..v.len() - 1], 1024),
        _ => (v, MIB),
    };
    num.parse::<u64>().ok()?.checked_mul(unit)
}

/// `bytes` as QEMU writes sizes: `4G` where whole GiB, else `2112M` (sizes are 2 MiB multiples).
fn qemu_size(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{}G", bytes / GIB)
    } else {
        format!("{}M", bytes / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn qemu_arguments() {
        let config = args(&["-machine", "q35", "-m", "2G", "-smp", "1"]);
        let a = qemu_args(&config, Path::new("build/pmem/t.qemu-svm.img"), 64 << 20).unwrap();
        assert_eq!(
            a.join(" "),
            "-machine nvdimm=on -m 2G,slots=2,maxmem=4G \
             -object memory-backend-file,id=pmem0,share=on,mem-path=build/pmem/t.qemu-svm.img,size=64M \
             -device nvdimm,id=nvdimm0,memdev=pmem0"
        );
        let a = qemu_args(&args(&["-m", "1024"]), Path::new("p"), 3 << 30).unwrap();
        assert!(a.contains(&"1024,slots=2,maxmem=5G".to_string()), "{a:?}");
        assert!(a.iter().any(|w| w.ends_with("size=3G")), "{a:?}");
        assert!(qemu_args(&args(&["-smp", "1"]), Path::new("p"), 2 << 20).is_err());
        assert!(qemu_args(&args(&["-m", "lots"]), Path::new("p"), 2 << 20).is_err());
    }

    #[test]
    fn create_is_fresh_and_zeroed() {
        let dir = std::env::temp_dir().join(format!("parperos-pmem-{}", std::process::id()));
        let path = dir.join("sub").join("t.img");
        create(&path, 4 << 20).unwrap();
        std::fs::write(&path, [7u8; 16]).unwrap();
        create(&path, 2 << 20).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 2 << 20);
        assert!(bytes.iter().all(|&b| b == 0));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn writes_words_and_copies_inside_the_file() {
        use crate::scenario::PmemWrite;
        let dir = std::env::temp_dir().join(format!("parperos-pmem-w-{}", std::process::id()));
        let path = dir.join("t.img");
        create(&path, 4096).unwrap();
        apply(&path, &PmemWrite::Word { at: 0x10, value: 0x1122_3344_5566_7788 }).unwrap();
        apply(&path, &PmemWrite::Copy { at: 0x100, from: 0x10, len: 8 }).unwrap();
        let b = std::fs::read(&path).unwrap();
        assert_eq!(b[0x10..0x18], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[0x100..0x108], b[0x10..0x18]);
        assert!(apply(&path, &PmemWrite::Word { at: 4090, value: 1 }).is_err());
        assert!(apply(&path, &PmemWrite::Copy { at: 0, from: 4000, len: 100 }).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        let _ = std::fs::remove_dir_all(dir);
    }
}
