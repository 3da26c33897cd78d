//! Persistent memory for scenarios with `pmem = SIZE`: a zero-filled file that QEMU maps as an
//! NVDIMM (found by the hypervisor through the ACPI NFIT). The backend is
//! `memory-backend-file,share=on`, so guest stores go straight into the file's shared mapping
//! and survive a SIGKILL of QEMU: the crash model of `kill@K`. One file per scenario and config,
//! `build/pmem/<scenario>.<config>.img`, made fresh at the start of the run and kept by every boot.

use crate::{bail, Context, Result};
use formats::pmem_layout as layout;
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

/// The superblock words a `pmem_write` may name as `sb.WORD`.
const SB_WORDS: &[(&str, usize)] = &[
    ("magic", layout::SB_MAGIC),
    ("version", layout::SB_VERSION),
    ("len", layout::SB_LEN),
    ("format", layout::SB_FORMAT),
    ("boots", layout::SB_BOOTS),
];
/// The directory record fields a `pmem_write` may name as `slot(N).FIELD`.
const RECORD_FIELDS: &[(&str, u64)] = &[
    ("state", layout::R_STATE),
    ("root", layout::R_ROOT),
    ("len", layout::R_LEN),
    ("page", layout::R_PAGE),
    ("writable", layout::R_WRITABLE),
    ("name_len", layout::R_NAME_LEN),
    ("name", layout::R_NAME),
];
/// What an OFFSET may be, for messages.
pub const OFFSET_FORMS: &str = "0xHEX, sb.magic|version|len|format|boots, slot(N) or slot(N).state|root|len|page|writable|name_len|name";

/// An offset in the pmem file (whose byte 0 is the region's base: the superblock) written as
/// hex (`0x1048`) or by its name in the on-media layout (`formats::pmem_layout`):
/// `sb.magic` (superblock word), `slot(1)` (directory record 1), `slot(1).root` (a field).
pub fn offset(word: &str) -> Option<u64> {
    let word = word.trim();
    if let Some(hex) = word.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok();
    }
    if let Some(name) = word.strip_prefix("sb.") {
        return SB_WORDS.iter().find(|(n, _)| *n == name).map(|&(_, w)| 8 * w as u64);
    }
    let rest = word.strip_prefix("slot(")?;
    let (n, field) = rest.split_once(')')?;
    let n = n.parse::<usize>().ok().filter(|&n| n < layout::SLOTS)?;
    let slot = layout::DIRECTORY + n as u64 * layout::SLOT;
    match field {
        "" => Some(slot),
        f => RECORD_FIELDS.iter().find(|(name, _)| Some(*name) == f.strip_prefix('.')).map(|&(_, off)| slot + off),
    }
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
pub fn ram_size(v: &str) -> Option<u64> {
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
    fn offsets_by_name_follow_the_layout() {
        assert_eq!(offset("0x1048"), Some(0x1048));
        assert_eq!(offset("sb.magic"), Some(8 * layout::SB_MAGIC as u64));
        assert_eq!(offset("sb.boots"), Some(8 * layout::SB_BOOTS as u64));
        assert_eq!(offset("slot(0)"), Some(layout::DIRECTORY));
        assert_eq!(offset("slot(1).root"), Some(layout::DIRECTORY + layout::SLOT + layout::R_ROOT));
        assert_eq!(offset("slot(63).name"), Some(layout::DIRECTORY + 63 * layout::SLOT + layout::R_NAME));
        // Every name lies inside the superblock and directory, before the allocator's metadata.
        for (name, _) in SB_WORDS {
            assert!(offset(&format!("sb.{name}")).unwrap() < layout::DIRECTORY, "{name}");
        }
        for (name, _) in RECORD_FIELDS {
            let at = offset(&format!("slot({}).{name}", layout::SLOTS - 1)).unwrap();
            assert!(at < layout::META, "{name}");
        }
        for bad in ["slot(64)", "slot(1).rooot", "slot(1)root", "slot(x)", "sb.nope", "1048", "0x", "slot(-1)", ""] {
            assert_eq!(offset(bad), None, "{bad}");
        }
    }

    /// The shipped damage scenarios name their offsets; here they are pinned to the numbers the
    /// layout gives today, so a change of `formats::pmem_layout` shows up as a failing host
    /// test and a reviewed update of these numbers, never as a scenario that quietly damages
    /// something else.
    #[test]
    fn shipped_damage_scenarios_hit_the_fields_they_name() {
        use crate::scenario::PmemWrite::{Copy, Word};
        let root = crate::root();
        let writes = |name: &str| {
            let path = root.join(format!("tests/scenarios/{name}.scn"));
            crate::scenario::parse(name, &path, &std::fs::read_to_string(&path).unwrap()).unwrap().pmem_writes
        };
        let record = |n: u64, field: u64| layout::DIRECTORY + n * layout::SLOT + field;
        // Record 1 takes record 0's root, length and page word (24 bytes).
        assert_eq!(layout::R_PAGE + 8 - layout::R_ROOT, 24);
        let contained = [
            (2, Copy { at: record(1, layout::R_ROOT), from: record(0, layout::R_ROOT), len: 24 }),
            (3, Word { at: record(1, layout::R_STATE), value: 0 }),
            (4, Word { at: record(0, layout::R_ROOT), value: 0x2_0000_0000 }),
            (5, Word { at: 8 * layout::SB_MAGIC as u64, value: 0x1234 }),
            (7, Word { at: 8 * layout::SB_MAGIC as u64, value: 0 }),
            (7, Word { at: 8 * layout::SB_FORMAT as u64, value: 0 }),
            (7, Word { at: 8 * layout::SB_BOOTS as u64, value: 0 }),
        ];
        assert_eq!(writes("persistent_directory_damage_is_contained"), contained);
        let raw = [0x1048, 0x1040, 0x1008, 0x0, 0x0, 0x18, 0x20];
        assert_eq!(contained.map(|(_, w)| match w { Word { at, .. } | Copy { at, .. } => at }), raw);
        let quarantined = [
            (2, Word { at: record(1, layout::R_LEN), value: 0x11000 }),
            (2, Word { at: record(3, layout::R_STATE), value: 0 }),
        ];
        assert_eq!(writes("persistent_damaged_record_is_quarantined"), quarantined);
        assert_eq!(quarantined.map(|(_, w)| match w { Word { at, .. } | Copy { at, .. } => at }), [0x1050, 0x10c0]);
        assert_eq!(writes("persistent_format_survives_a_crash"), [(3, Word { at: 0, value: 0x1234 })]);
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
