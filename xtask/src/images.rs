//! Building what the emulators boot: the freestanding hypervisor and guest ELFs (with the one
//! set of link flags below), the guest archive `build/guests.ar`, and per-scenario GRUB ISOs
//! for Bochs. Also the benchmark runs, which are plain cargo invocations.

use crate::{archive, bail, tools, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The host target the freestanding crates are built for (the only one installed).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Code generation and link flags for the freestanding crates (hypervisor, guests). The
/// linker scripts are added by each crate's build.rs. Keep every flag here, nowhere else.
pub const FREESTANDING_RUSTFLAGS: &str = "-C relocation-model=static -C code-model=small \
    -C target-feature=+crt-static -C link-arg=-nostartfiles -C link-arg=-nostdlib \
    -C link-arg=-static -C link-arg=-no-pie -C link-arg=-Wl,--build-id=none \
    -C link-arg=-Wl,-z,max-page-size=0x1000 -C link-arg=-Wl,--gc-sections";

/// Where the guest binaries come from: one ELF per `tests/guests/src/bin/*.rs`.
const GUESTS_BIN_DIR: &str = "tests/guests/src/bin";
pub const BUILD_DIR: &str = "build";

pub struct Built {
    pub hypervisor: PathBuf,
    pub archive: PathBuf,
    pub guests: Vec<(String, PathBuf)>,
}

impl Built {
    pub fn guest_names(&self) -> Vec<&str> {
        self.guests.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// `cargo` as invoked by the user, with the user's RUSTFLAGS (all spellings) removed so that only the flags
/// chosen here apply, run from the workspace root.
pub fn cargo(root: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS");
    cmd
}

/// `$CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Names of the guest binaries: `src/bin/NAME.rs` and `src/bin/NAME/main.rs`.
pub fn guest_bins(root: &Path) -> Result<Vec<String>> {
    let dir = root.join(GUESTS_BIN_DIR);
    let entries = std::fs::read_dir(&dir).context(|| format!("cannot list {}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".rs") {
            names.push(stem.to_string());
        } else if path.join("main.rs").is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Write `path` as a whole or not at all: the bytes go to a temporary file beside it, which
/// is then renamed over `path`. A reader (an emulator started by another xtask) sees either
/// the old file or the new one, never a half-written one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    std::fs::write(&tmp, bytes).context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// `<path>.tmp.<pid>`: a name no other xtask process writes.
fn temp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

/// An exclusive lock on `build/` (the file `build/.lock`), held until the file is dropped.
/// Builds and test runs take it, so two `cargo xtask` in one checkout take turns instead of
/// overwriting each other's archive, ISOs and logs; the second says whom it waits for.
pub fn lock_build(root: &Path) -> Result<std::fs::File> {
    let dir = root.join(BUILD_DIR);
    std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            eprintln!("waiting for {} (held by another cargo xtask in this checkout: {})", path.display(), holder.trim());
            file.lock().context(|| format!("cannot lock {}", path.display()))?;
        }
        Err(std::fs::TryLockError::Error(e)) => bail!("cannot lock {}: {e}", path.display()),
    }
    let me = format!("pid {} ({})\n", std::process::id(), std::env::args().skip(1).collect::<Vec<_>>().join(" "));
    let _ = file.set_len(0);
    let _ = std::io::Write::write_all(&mut &file, me.as_bytes());
    Ok(file)
}

/// Build the hypervisor and all guests, then write `build/guests.ar`. With `quiet`, the
/// compiler output is kept back and only its tail is shown if the build fails.
pub fn build_all(quiet: bool) -> Result<Built> {
    build_with(quiet, None)
}

/// `build_all` with the hypervisor's cargo `features` (such as `percall-probe`, bench only).
pub fn build_with(quiet: bool, features: Option<&str>) -> Result<Built> {
    let root = crate::root();
    let mut cmd = cargo(&root);
    cmd.args(["build", "--release", "-p", "hypervisor", "-p", "guests", "--target", TARGET]);
    if let Some(f) = features {
        cmd.args(["--features", &format!("hypervisor/{f}")]);
    }
    cmd
        .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", FREESTANDING_RUSTFLAGS);
    if quiet {
        let done = crate::output_merged(cmd, None).context(|| "cannot start cargo".to_string())?;
        let (Some(status), output) = (done.status, done.output) else {
            bail!("building the hypervisor and guests: cargo did not finish");
        };
        if !status.success() {
            let lines: Vec<&str> = output.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            bail!("building the hypervisor and guests failed ({status}):\n{tail}");
        }
    } else {
        let status = cmd.status().context(|| "cannot start cargo".to_string())?;
        if !status.success() {
            bail!("building the hypervisor and guests failed ({status}); see the compiler output above");
        }
    }
    let out = target_dir(&root).join(TARGET).join("release");
    let hypervisor = out.join("hypervisor");
    if !hypervisor.is_file() {
        bail!("the build did not produce {}", hypervisor.display());
    }
    let mut guests = Vec::new();
    let mut files = Vec::new();
    for name in guest_bins(&root)? {
        let path = out.join(&name);
        let data = std::fs::read(&path).context(|| format!("guest `{name}`: cannot read {}", path.display()))?;
        files.push((name.clone(), data));
        guests.push((name, path));
    }
    let build = root.join(BUILD_DIR);
    std::fs::create_dir_all(&build).context(|| format!("cannot create {}", build.display()))?;
    let archive = build.join("guests.ar");
    write_atomic(&archive, &archive::build(&files)?)?;
    Ok(Built { hypervisor, archive, guests })
}

/// `built` plus guest ELFs from elsewhere (`run --guest PATH`), each under its file name, in
/// a new archive `build/<name>`. The repository's guests stay in it, so both can be booted.
pub fn with_extra_guests(built: &Built, name: &str, extra: &[(String, PathBuf)]) -> Result<Built> {
    let mut guests = built.guests.clone();
    for (guest, path) in extra {
        if guests.iter().any(|(g, p)| g == guest && p != path) {
            bail!("--guest {}: the name `{guest}` is taken (by {}); rename the file", path.display(), guests.iter().find(|(g, _)| g == guest).map_or(String::new(), |(_, p)| p.display().to_string()));
        }
        if !guests.iter().any(|(g, _)| g == guest) {
            guests.push((guest.clone(), path.clone()));
        }
    }
    let mut files = Vec::new();
    for (guest, path) in &guests {
        let data = std::fs::read(path).context(|| format!("guest `{guest}`: cannot read {}", path.display()))?;
        files.push((guest.clone(), data));
    }
    let archive = crate::root().join(BUILD_DIR).join(name);
    write_atomic(&archive, &archive::build(&files)?)?;
    Ok(Built { hypervisor: built.hypervisor.clone(), archive, guests })
}

/// An ELF64 file cut after the last byte a program header names, without section headers:
/// what a loader needs (segments, notes), none of the debug info after them. `elf` itself
/// where it is not a little-endian ELF64 file or a header points past its end.
pub fn loadable_only(elf: &[u8]) -> Vec<u8> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
    let cut = || -> Option<usize> {
        if elf.get(..6)? != b"\x7fELF\x02\x01" {
            return None;
        }
        let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
        let mut end = phoff.checked_add(phentsize.checked_mul(phnum)?)?.max(64);
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            // p_offset at +0x08, p_filesz at +0x20.
            end = end.max(u64_at(ph + 0x08)?.checked_add(u64_at(ph + 0x20)?)?);
        }
        (end <= elf.len()).then_some(end)
    };
    let Some(end) = cut() else { return elf.to_vec() };
    let mut out = elf[..end].to_vec();
    // e_shoff (8 bytes at 0x28), e_shnum (0x3c) and e_shstrndx (0x3e): no section headers.
    out[0x28..0x30].fill(0);
    out[0x3c..0x40].fill(0);
    out
}

/// Make `build/<name>.iso` from `build/iso/<name>/`: GRUB (multiboot2) loads the hypervisor
/// with `cmdline` and the guest archive as module `guests`, console on COM1.
pub fn make_iso(built: &Built, name: &str, cmdline: &str) -> Result<PathBuf> {
    tools::require_iso_tools()?;
    let root = crate::root();
    let tree = root.join(BUILD_DIR).join("iso").join(name);
    let boot = tree.join("boot");
    let grub = boot.join("grub");
    std::fs::create_dir_all(&grub).context(|| format!("cannot create {}", grub.display()))?;
    let copy = |from: &Path, to: PathBuf| -> Result<()> {
        std::fs::copy(from, &to).map(drop).context(|| format!("cannot copy {} to {}", from.display(), to.display()))
    };
    // What GRUB loads under Bochs is read through emulated BIOS disk calls, ~1 s per 2.5 MiB:
    // the hypervisor without its debug info (the symbolizer reads `built.hypervisor`) and
    // an archive of only the guests the command line names save ~10 s of every Bochs boot
    // (19.2 -> 8.6 s to `ready` for guest_hello, 2026-12-07).
    let elf = std::fs::read(&built.hypervisor).context(|| format!("cannot read {}", built.hypervisor.display()))?;
    write_atomic(&boot.join("hypervisor.elf"), &loadable_only(&elf))?;
    let named = crate::cmdline::guest_names(cmdline).filter(|names| names.iter().all(|n| built.guests.iter().any(|(g, _)| g == n)));
    match named {
        Some(names) => {
            let mut files = Vec::new();
            for (guest, path) in built.guests.iter().filter(|(g, _)| names.contains(g)) {
                let data = std::fs::read(path).context(|| format!("guest `{guest}`: cannot read {}", path.display()))?;
                files.push((guest.clone(), data));
            }
            write_atomic(&boot.join("guests.ar"), &archive::build(&files)?)?;
        }
        // No `guests=`, or a name no guest has (the hypervisor's error says which): all.
        None => copy(&built.archive, boot.join("guests.ar"))?,
    }
    let cfg = format!(
        "serial --unit=0 --speed=115200\n\
         terminal_input serial\n\
         terminal_output serial\n\
         set timeout=0\n\
         menuentry \"parperos\" {{\n\
         \x20 multiboot2 /boot/hypervisor.elf {cmdline}\n\
         \x20 module2 /boot/guests.ar guests\n\
         \x20 boot\n\
         }}\n"
    );
    write_atomic(&grub.join("grub.cfg"), cfg.as_bytes())?;
    let iso = root.join(BUILD_DIR).join(format!("{name}.iso"));
    let tmp = temp_beside(&iso);
    let output = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&tmp)
        .arg(&tree)
        .output()
        .context(|| "cannot start grub-mkrescue".to_string());
    // The staging tree (a copy of the hypervisor and the guest archive, ~23 MiB) is in the
    // ISO now or useless: a full test run would otherwise leave one per Bochs boot.
    let _ = std::fs::remove_dir_all(&tree);
    let output = output?;
    if !output.status.success() {
        bail!(
            "grub-mkrescue failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    std::fs::rename(&tmp, &iso).context(|| format!("cannot rename {} to {}", tmp.display(), iso.display()))?;
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::loadable_only;

    /// An ELF64 header with two program headers (a segment at 0x100..0x180 and a note at
    /// 0x180..0x190), debug bytes after them and section headers at the end.
    fn elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x300];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[0x28..0x30].copy_from_slice(&0x280u64.to_le_bytes()); // e_shoff
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        f[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes()); // e_shnum
        f[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes()); // e_shstrndx
        for (i, (off, size)) in [(0x100u64, 0x80u64), (0x180, 0x10)].into_iter().enumerate() {
            let ph = 64 + i * 56;
            f[ph + 0x08..ph + 0x10].copy_from_slice(&off.to_le_bytes());
            f[ph + 0x20..ph + 0x28].copy_from_slice(&size.to_le_bytes());
        }
        f[0x100..0x190].fill(0xaa);
        f[0x190..0x280].fill(0xdd);
        f
    }

    #[test]
    fn keeps_what_the_program_headers_name_and_drops_the_rest() {
        let f = elf();
        let out = loadable_only(&f);
        assert_eq!(out.len(), 0x190, "cut after the note, the last byte a program header names");
        assert_eq!(out[..0x28], f[..0x28]);
        assert_eq!(out[0x30..0x3c], f[0x30..0x3c]);
        assert!(out[0x28..0x30].iter().chain(&out[0x3c..0x40]).all(|&b| b == 0), "no section headers");
        assert_eq!(out[0x100..0x190], f[0x100..0x190], "segments intact");
    }

    #[test]
    fn leaves_what_it_cannot_read_alone() {
        let mut past = elf();
        past[64 + 56 + 0x20..64 + 56 + 0x28].copy_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(loadable_only(&past), past, "a segment past the end of the file");
        let mut be = elf();
        be[5] = 2;
        assert_eq!(loadable_only(&be), be, "big-endian");
        assert_eq!(loadable_only(b"not an elf"), b"not an elf");
    }
}
