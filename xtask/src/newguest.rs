//! `cargo xtask new-guest DIR`: writes a guest crate outside this repository that builds
//! with a plain `cargo build`: its own `.cargo/config.toml` (the target and the freestanding
//! flags of `cargo xtask guest-flags`, with this checkout's absolute linker-script path),
//! `panic = "abort"` in both profiles, guest-lib (feature `heap`) as a path dependency on
//! this checkout, this checkout's Cargo.lock (versions known to build), and an example
//! (`templates/new-guest/main.rs`) that uses the heap, a shared morsel, a doorbell
//! rendezvous and ExMap.

use crate::{bail, images, Context, Result};
use std::path::{Path, PathBuf};

const MAIN_RS: &str = include_str!("../templates/new-guest/main.rs");
/// Where `cargo build` puts the guest, relative to its crate.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The crate (and guest) name for `dir`: its last component, checked.
pub fn crate_name(dir: &Path) -> Result<String> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ok = !name.is_empty()
        && name.len() < crate::archive::NAME_SIZE - 5 // room for "-data" in the example's morsel name
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok {
        bail!(
            "new-guest {}: the directory's name becomes the crate and guest name: 1 to {} characters, \
             a lowercase letter first, then lowercase letters, digits, `_` or `-`",
            dir.display(),
            crate::archive::NAME_SIZE - 6
        );
    }
    Ok(name)
}

/// The `[target]` rustflags of the new crate: `guest-flags` as a TOML array.
fn rustflags_toml(root: &Path) -> String {
    let mut flags: Vec<String> = images::FREESTANDING_RUSTFLAGS.split_whitespace().map(str::to_string).collect();
    flags.push("-C".into());
    flags.push(format!("link-arg=-T{}", root.join("guest-lib/guest.ld").display()));
    let quoted: Vec<String> = flags.iter().map(|f| format!("\"{}\"", f.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("[{}]", quoted.join(", "))
}

/// The files of a new guest crate named `name`, for this checkout at `root`.
pub fn files(root: &Path, name: &str) -> Vec<(PathBuf, String)> {
    let guest_lib = root.join("guest-lib");
    let cargo_toml = format!(
        "[package]\n\
         name = \"{name}\"\n\
         version = \"0.1.0\"\n\
         edition = \"2021\"\n\
         rust-version = \"{rv}\"\n\
         publish = false\n\
         \n\
         [dependencies]\n\
         # This ParPerOS checkout's guest library; or from git:\n\
         # guest-lib = {{ git = \"<the ParPerOS repository>\", features = [\"heap\"] }}\n\
         guest-lib = {{ path = \"{lib}\", features = [\"heap\"] }}\n\
         \n\
         # A guest has no unwinder: both profiles abort on panic (guest-lib prints the message).\n\
         [profile.dev]\n\
         panic = \"abort\"\n\
         \n\
         [profile.release]\n\
         panic = \"abort\"\n\
         \n\
         # Its own workspace, even inside another one.\n\
         [workspace]\n",
        rv = RUST_VERSION,
        lib = guest_lib.display().to_string().replace('\\', "\\\\"),
    );
    let config = format!(
        "# Made by `cargo xtask new-guest` from {root}: the flags of `cargo xtask guest-flags`.\n\
         # Guests are built for the host target as freestanding images (no std, no libc):\n\
         # with an explicit target, build scripts stay ordinary host programs.\n\
         [build]\n\
         target = \"{TARGET}\"\n\
         \n\
         [target.{TARGET}]\n\
         rustflags = {flags}\n",
        root = root.display(),
        flags = rustflags_toml(root),
    );
    let mut out = vec![
        (PathBuf::from("Cargo.toml"), cargo_toml),
        (PathBuf::from(".cargo/config.toml"), config),
        (PathBuf::from("src/main.rs"), MAIN_RS.replace("@NAME@", name)),
        (PathBuf::from(".gitignore"), "/target\n".to_string()),
    ];
    if let Ok(lock) = std::fs::read_to_string(root.join("Cargo.lock")) {
        out.push((PathBuf::from("Cargo.lock"), lock));
    }
    out
}

/// The Rust version this workspace declares (`rust-version` in Cargo.toml).
pub const RUST_VERSION: &str = "1.89";

/// Writes the crate into `dir` (which must not exist or be empty); returns its name.
pub fn create(root: &Path, dir: &Path) -> Result<String> {
    let name = crate_name(dir)?;
    if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("new-guest {}: the directory exists and is not empty", dir.display());
    }
    for (rel, text) in files(root, &name) {
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(name)
}

/// The ELF `cargo build` (debug) makes in the crate at `dir`.
pub fn elf(dir: &Path, name: &str) -> PathBuf {
    dir.join("target").join(TARGET).join("debug").join(name)
}

/// Runs a plain `cargo build` in `dir`, as a user would (none of the variables that cargo
/// sets for xtask, nor RUSTFLAGS from outside); returns the ELF.
pub fn build(dir: &Path, name: &str) -> Result<PathBuf> {
    let mut cmd = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.arg("build").current_dir(dir);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let inherited = k.starts_with("CARGO_") && k != "CARGO_HOME" && !k.starts_with("CARGO_NET") && !k.starts_with("CARGO_REGISTR")
            || k.contains("RUSTFLAGS")
            || k == "RUSTC_WRAPPER";
        if inherited {
            cmd.env_remove(&k);
        }
    }
    let done = crate::output_merged(cmd, Some(std::time::Duration::from_secs(600))).context(|| "cannot start cargo".to_string())?;
    match done.status {
        Some(s) if s.success() => Ok(elf(dir, name)),
        _ => {
            let lines: Vec<&str> = done.output.lines().collect();
            bail!("`cargo build` in {} failed:\n{}", dir.display(), lines[lines.len().saturating_sub(30)..].join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_files() {
        assert_eq!(crate_name(Path::new("/tmp/x/my-guest")).unwrap(), "my-guest");
        for bad in ["/tmp/My", "/tmp/1abc", "/tmp/a:b", "/tmp/a b", "/"] {
            assert!(crate_name(Path::new(bad)).is_err(), "{bad}");
        }
        let root = Path::new("/repo");
        let files = files(root, "app");
        let get = |p: &str| files.iter().find(|(f, _)| f == Path::new(p)).map(|(_, t)| t.clone()).unwrap();
        let cargo = get("Cargo.toml");
        assert!(cargo.contains("name = \"app\"") && cargo.contains("path = \"/repo/guest-lib\""), "{cargo}");
        assert_eq!(cargo.matches("panic = \"abort\"").count(), 2, "both profiles abort");
        let config = get(".cargo/config.toml");
        assert!(config.contains("link-arg=-T/repo/guest-lib/guest.ld"), "{config}");
        // Every flag of guest-flags, none lost.
        for f in images::FREESTANDING_RUSTFLAGS.split_whitespace() {
            assert!(config.contains(&format!("\"{f}\"")), "{f} missing from {config}");
        }
        let main = get("src/main.rs");
        assert!(!main.contains("@NAME@") && main.contains("\"app-data\""));
        for api in ["morsel::create", "open_when_created", "Doorbell", "ExMap::create", "Vec<u64>"] {
            assert!(main.contains(api), "the example shows {api}");
        }
    }

    #[test]
    fn the_declared_rust_version_is_the_workspaces() {
        let text = std::fs::read_to_string(crate::root().join("Cargo.toml")).unwrap();
        assert!(text.contains(&format!("rust-version = \"{RUST_VERSION}\"")), "workspace Cargo.toml declares {RUST_VERSION}");
    }
}
