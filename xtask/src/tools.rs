//! External programs xtask needs (emulators, GRUB, xorriso, mtools), the apt packages that
//! provide them, and `cargo xtask setup` which installs those packages and then runs
//! `.ci/fetch-qemu-evlog` (a second QEMU unpacked under `build/`) and `.ci/install-mdbook`. A missing program is
//! reported in one line that names the packages to install.

use crate::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The apt packages the emulator tests need; `.ci/run` reads the same file.
pub const APT_PACKAGES_FILE: &str = include_str!("../../.ci/apt-packages");

pub fn apt_packages() -> Vec<&'static str> {
    APT_PACKAGES_FILE
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect()
}

/// A program on PATH and the apt packages that provide it (and what it needs at run time).
pub struct Tool {
    pub program: &'static str,
    pub packages: &'static str,
}

pub const QEMU: Tool = Tool { program: "qemu-system-x86_64", packages: "qemu-system-x86" };
pub const BOCHS: Tool = Tool { program: "bochs", packages: "bochs bochsbios vgabios" };
pub const GRUB_MKRESCUE: Tool = Tool { program: "grub-mkrescue", packages: "grub-common grub-pc-bin" };
pub const XORRISO: Tool = Tool { program: "xorriso", packages: "xorriso" };
pub const MFORMAT: Tool = Tool { program: "mformat", packages: "mtools" };

/// GRUB's BIOS modules: grub-mkrescue runs without them but makes an ISO that cannot boot.
const GRUB_I386_PC: &str = "/usr/lib/grub/i386-pc";

fn missing(what: &str, packages: &str) -> crate::Error {
    crate::Error(format!(
        "{what} not found: install the apt packages `{packages}` \
         (sudo apt-get install {packages}, or `cargo xtask setup` for all of them)"
    ))
}

/// Full path of `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

pub fn require(tool: &Tool) -> Result<PathBuf> {
    which(tool.program).ok_or_else(|| missing(&format!("`{}`", tool.program), tool.packages))
}

/// Everything `grub-mkrescue` needs to make a BIOS-bootable ISO.
pub fn require_iso_tools() -> Result<()> {
    require(&GRUB_MKRESCUE)?;
    require(&XORRISO)?;
    require(&MFORMAT)?;
    if !Path::new(GRUB_I386_PC).join("moddep.lst").is_file() {
        return Err(missing(&format!("GRUB BIOS modules ({GRUB_I386_PC})"), "grub-pc-bin"));
    }
    Ok(())
}

/// A file the Bochs configuration names (ROM images) must exist.
pub fn require_bochs_file(path: &Path) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    let packages = if path.to_string_lossy().contains("vgabios") { "vgabios" } else { "bochsbios" };
    Err(missing(&format!("Bochs ROM image {}", path.display()), packages))
}

fn is_root() -> bool {
    // `/proc/self/status` has `Uid: real effective saved fs`; sudo matters for the effective one.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `cargo xtask setup`: apt-get update, then install the packages (sudo only if not root).
pub fn setup() -> Result<()> {
    if which("apt-get").is_none() {
        bail!("apt-get not found: install these packages by hand: {}", apt_packages().join(" "));
    }
    let sudo = !is_root();
    if sudo && which("sudo").is_none() {
        bail!("not root and no sudo: run as root: apt-get install {}", apt_packages().join(" "));
    }
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if sudo { Command::new("sudo") } else { Command::new("apt-get") };
        if sudo {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let shown = format!("{}apt-get {}", if sudo { "sudo " } else { "" }, args.join(" "));
        println!("$ {shown}");
        let status = cmd.status().context(|| format!("cannot start `{shown}`"))?;
        if !status.success() {
            bail!("`{shown}` failed ({status})");
        }
        Ok(())
    };
    apt(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(apt_packages());
    apt(&install)?;
    println!("setup: installed {}", apt_packages().join(" "));
    // The QEMU of `qemu-amd-iommu-evlog`, unpacked under build/ (never fails: says why not).
    let fetch = crate::root().join(".ci/fetch-qemu-evlog");
    println!("$ {}", fetch.display());
    let status = Command::new(&fetch).status().context(|| format!("cannot start {}", fetch.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", fetch.display());
    }
    // mdBook for the book (`cargo xtask doc`), pinned, skipped if that version is there.
    let mdbook = crate::root().join(INSTALL_MDBOOK);
    println!("$ {}", mdbook.display());
    let status = Command::new(&mdbook).status().context(|| format!("cannot start {}", mdbook.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", mdbook.display());
    }
    Ok(())
}

/// Installs the pinned mdBook with `cargo install` (also run by `.ci/run`).
pub const INSTALL_MDBOOK: &str = ".ci/install-mdbook";

/// `mdbook` on PATH (or in cargo's bin folder, where `cargo install` puts it).
pub fn require_mdbook() -> Result<PathBuf> {
    if let Some(p) = which("mdbook") {
        return Ok(p);
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin/mdbook"));
    match cargo_bin {
        Some(p) if is_executable(&p) => Ok(p),
        _ => bail!("`mdbook` not found: `cargo xtask setup` (or {INSTALL_MDBOOK}) installs it with `cargo install`"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn package_list_names_every_tool_package() {
        let pkgs = super::apt_packages();
        for tool in [&super::QEMU, &super::BOCHS, &super::GRUB_MKRESCUE, &super::XORRISO, &super::MFORMAT] {
            for p in tool.packages.split_whitespace() {
                assert!(pkgs.contains(&p), "{p} missing from .ci/apt-packages");
            }
        }
    }
}
