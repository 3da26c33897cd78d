//! Emulator setups from `qemu-configs/`: `NAME.args` (QEMU argument files) and `NAME.bochsrc`
//! (Bochs configurations with `@ISO@`/`@SERIAL@` placeholders), the choice between KVM and
//! software emulation, and the command lines built from them.
//!
//! Argument file format: one argument or `-flag value` pair per line; blank lines and `#`
//! comments (whole line, or after a blank) are skipped; a line prefixed `tcg:` or `kvm:` is
//! used only under that accelerator; `@ROOT@` stands for the repository root (for files a
//! config names, such as the persistent-memory image of `qemu-pmem`). A line `hypervisor:
//! WORDS` is no QEMU argument: WORDS go at the end of every hypervisor command line booted
//! with the config (`qemu-iommu-sharept`: `iommu=sharept`); a line `binary: PATH`
//! runs that QEMU instead of the one on PATH (`qemu-amd-iommu-evlog`: the QEMU that
//! `.ci/fetch-qemu-evlog` unpacks under `build/`).

use crate::{bail, tools, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const CONFIG_DIR: &str = "qemu-configs";
/// Bochs' internal-debugger commands for unattended runs (`c`, then `quit`).
pub const BOCHS_DEBUGGER_RC: &str = "qemu-configs/bochs-debugger.rc";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulator {
    Qemu,
    Bochs,
}

impl Emulator {
    pub fn word(self) -> &'static str {
        match self {
            Emulator::Qemu => "qemu",
            Emulator::Bochs => "bochs",
        }
    }
}

/// One emulator setup, a file in `qemu-configs/`.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub emulator: Emulator,
    pub path: PathBuf,
}

impl Config {
    pub fn resolve(root: &Path, name: &str) -> Result<Config> {
        let name = crate::scenario::config_name(name);
        let dir = root.join(CONFIG_DIR);
        let args = dir.join(format!("{name}.args"));
        let rc = dir.join(format!("{name}.bochsrc"));
        match (args.is_file(), rc.is_file()) {
            (true, false) => Ok(Config { name, emulator: Emulator::Qemu, path: args }),
            (false, true) => Ok(Config { name, emulator: Emulator::Bochs, path: rc }),
            (true, true) => bail!("config `{name}` is ambiguous: both {name}.args and {name}.bochsrc exist"),
            (false, false) => {
                let have = available(&dir);
                let hint = crate::did_you_mean(&name, have.iter().map(String::as_str));
                Err(crate::usage_error(format!("no config `{name}` in {CONFIG_DIR}/{hint} (have: {})", have.join(", "))))
            }
        }
    }
}

/// Every config with the first comment line of its file (for `cargo xtask list`).
pub fn describe_configs(root: &Path) -> Vec<(String, String)> {
    let dir = root.join(CONFIG_DIR);
    available(&dir)
        .into_iter()
        .map(|name| {
            let line = Config::resolve(root, &name)
                .ok()
                .and_then(|c| std::fs::read_to_string(c.path).ok())
                .and_then(|t| t.lines().next().map(|l| l.trim_start_matches('#').trim().to_string()))
                .unwrap_or_default();
            (name, line)
        })
        .collect()
}

fn available(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.ends_with(".args") || n.ends_with(".bochsrc")).then(|| crate::scenario::config_name(&n))
        })
        .collect();
    names.sort();
    names
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// KVM only where `/dev/kvm` opens read-write AND the CPU flags show vmx or svm (on these
/// build machines `/dev/kvm` opens but is a paravirtual module that cannot run us).
/// Returns the choice and a one-line reason.
pub fn detect_accel() -> (Accel, String) {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    if let Err(e) = kvm {
        return (Accel::Tcg, format!("TCG software emulation (/dev/kvm not usable: {e})"));
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .find(|f| *f == "vmx" || *f == "svm");
    match flag {
        Some(f) => (Accel::Kvm, format!("KVM (-accel kvm -cpu host: /dev/kvm usable, cpu has {f})")),
        None => (Accel::Tcg, "TCG software emulation (/dev/kvm opens but the cpu shows no vmx/svm)".into()),
    }
}

impl Accel {
    /// `--accel kvm|tcg`.
    pub fn parse(word: &str) -> Result<Accel> {
        match word {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => bail!("unknown accelerator `{other}` (kvm or tcg){}", crate::did_you_mean(other, ["kvm", "tcg"])),
        }
    }
}

/// Whether a QEMU config may run under KVM: it has `kvm:` lines. The configs that emulate a
/// CPU without a virtualization feature (qemu-novirt: no SVM, qemu-svm-nonpt: no NPT) have
/// none: under KVM `-cpu host` would have the feature and they would test nothing.
pub fn allows_kvm(config: &Config) -> bool {
    config.emulator == Emulator::Qemu
        && std::fs::read_to_string(&config.path).is_ok_and(|t| t.lines().any(|l| l.trim_start().starts_with("kvm:")))
}

/// Who picks the accelerator when `--accel` is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    /// `run`: KVM where it is usable (`detect_accel`).
    Detect,
    /// `test`, benches: TCG, the path the scenarios are written for.
    Tcg,
}

/// The accelerator for `config` and the one-line reason the run prints first: `--accel`
/// if given (KVM refused for a TCG-only config, or where /dev/kvm cannot run us), else by
/// `default`.
pub fn choose_accel(config: &Config, requested: Option<Accel>, default: Default) -> Result<(Accel, String)> {
    if config.emulator == Emulator::Bochs {
        return Ok((Accel::Tcg, "Bochs (software emulation; --accel is for QEMU)".into()));
    }
    let tcg_only = !allows_kvm(config);
    let tcg_only_why = || format!("config `{}` emulates a CPU without a virtualization feature, which `-cpu host` under KVM would have", config.name);
    match requested {
        Some(Accel::Tcg) => Ok((Accel::Tcg, "TCG software emulation (--accel tcg)".into())),
        Some(Accel::Kvm) if tcg_only => Err(crate::usage_error(format!("--accel kvm: {}; use --accel tcg", tcg_only_why()))),
        Some(Accel::Kvm) => match detect_accel() {
            (Accel::Kvm, why) => Ok((Accel::Kvm, format!("{why}; --accel kvm"))),
            (Accel::Tcg, why) => bail!("--accel kvm: KVM cannot run the hypervisor here: {why}; use --accel tcg"),
        },
        None if tcg_only => Ok((Accel::Tcg, format!("TCG software emulation ({}: kept on TCG)", tcg_only_why()))),
        None if default == Default::Tcg => Ok((Accel::Tcg, "TCG software emulation (the tested path; --accel kvm to use KVM)".into())),
        None => {
            let (a, why) = detect_accel();
            Ok((a, format!("{why}; chosen automatically, --accel tcg or kvm to choose")))
        }
    }
}

/// Parse a QEMU argument file for `accel`.
pub fn parse_args_file(text: &str, accel: Accel) -> Vec<String> {
    let mut out = Vec::new();
    for raw in text.lines() {
        let mut line = raw.trim();
        if let Some(i) = line.find(" #").or_else(|| line.find("\t#")) {
            line = line[..i].trim_end();
        }
        if line.is_empty() || line.starts_with('#') || line.starts_with("binary:") {
            continue;
        }
        if line.starts_with(HYPERVISOR) {
            continue;
        }
        if let Some(rest) = line.strip_prefix("tcg:") {
            if accel != Accel::Tcg {
                continue;
            }
            line = rest.trim();
        } else if let Some(rest) = line.strip_prefix("kvm:") {
            if accel != Accel::Kvm {
                continue;
            }
            line = rest.trim();
        }
        match line.split_once(char::is_whitespace) {
            Some((flag, value)) => {
                out.push(flag.to_string());
                out.push(value.trim().to_string());
            }
            None => out.push(line.to_string()),
        }
    }
    out
}

/// The prefix of an argument-file line that adds words to the hypervisor command line.
const HYPERVISOR: &str = "hypervisor:";

/// The words of the `hypervisor:` lines of an argument file, space-separated.
pub fn hypervisor_words(text: &str) -> String {
    let words: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix(HYPERVISOR))
        .map(|w| w.split(" #").next().unwrap_or_default().trim())
        .filter(|w| !w.is_empty())
        .collect();
    words.join(" ")
}

/// `cmdline` with the config's `hypervisor:` words at its end.
pub fn config_cmdline(config: &Config, cmdline: &str) -> Result<String> {
    if config.emulator != Emulator::Qemu {
        return Ok(cmdline.to_string());
    }
    let text = std::fs::read_to_string(&config.path).context(|| format!("cannot read {}", config.path.display()))?;
    let words = hypervisor_words(&text);
    Ok(match (cmdline.trim().is_empty(), words.is_empty()) {
        (_, true) => cmdline.to_string(),
        (true, false) => words,
        (false, false) => format!("{} {words}", cmdline.trim_end()),
    })
}

pub fn qemu_args(config: &Config, accel: Accel) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(&config.path).context(|| format!("cannot read {}", config.path.display()))?;
    let root = crate::root();
    let root = root.to_string_lossy();
    Ok(parse_args_file(&text, accel).into_iter().map(|a| a.replace("@ROOT@", &root)).collect())
}

/// The `binary: PATH` line of a QEMU argument file, if any.
pub fn parse_binary(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.trim().strip_prefix("binary:")).map(|p| p.trim().to_string())
}

/// The QEMU a config runs: its `binary:` (with `@ROOT@` filled in), else the one on PATH.
/// `Ok(Err(message))`: the config names a QEMU that is not there (the message says how to
/// get it); `cargo xtask test` skips such a config.
pub fn qemu_binary(config: &Config) -> Result<std::result::Result<PathBuf, String>> {
    let text = std::fs::read_to_string(&config.path).context(|| format!("cannot read {}", config.path.display()))?;
    match parse_binary(&text) {
        None => Ok(Ok(tools::require(&tools::QEMU)?)),
        Some(p) => {
            let path = PathBuf::from(p.replace("@ROOT@", &crate::root().to_string_lossy()));
            if path.is_file() {
                Ok(Ok(path))
            } else {
                Ok(Err(format!(
                    "config `{}` runs {}, which is not there: `cargo xtask setup` (or .ci/fetch-qemu-evlog) fetches it",
                    config.name,
                    path.display()
                )))
            }
        }
    }
}

/// Everything a QEMU boot adds to its config's arguments. `qemu_command` is the one place
/// the QEMU command line is assembled (`run` and `test` fill this in).
pub struct QemuBoot<'a> {
    pub kernel: &'a Path,
    pub cmdline: &'a str,
    pub initrd: &'a Path,
    /// `-serial` value: `stdio` (tests, a pipe) or `mon:stdio` (`run`, the terminal).
    pub serial: &'a str,
    /// `-smp N` after the config's own, which it overrides.
    pub cpus: Option<usize>,
    /// `disk = SIZE`: an image attached as NVMe drive `disk0`.
    pub disk: Option<&'a Path>,
    /// `pmem = SIZE`: a file and its size, an NVDIMM (`pmem::qemu_args`).
    pub pmem: Option<(&'a Path, u64)>,
    /// Anything else, last (`run --gdb`, `run -- ARGS`).
    pub extra: Vec<String>,
}

impl<'a> QemuBoot<'a> {
    pub fn new(kernel: &'a Path, cmdline: &'a str, initrd: &'a Path, serial: &'a str) -> Self {
        QemuBoot { kernel, cmdline, initrd, serial, cpus: None, disk: None, pmem: None, extra: Vec::new() }
    }
}

/// The QEMU command for `config` and `boot`. QEMU dies with the thread that spawns it
/// (`die_with_parent`).
pub fn qemu_command(config: &Config, accel: Accel, boot: &QemuBoot) -> Result<Command> {
    let qemu = qemu_binary(config)?.map_err(crate::Error)?;
    let config_args = qemu_args(config, accel)?;
    let cmdline = config_cmdline(config, boot.cmdline)?;
    let mut cmd = Command::new(qemu);
    crate::die_with_parent(&mut cmd);
    cmd.args(&config_args)
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-append")
        .arg(&cmdline)
        .arg("-initrd")
        .arg(boot.initrd);
    if let Some(path) = boot.disk {
        cmd.arg("-drive").arg(format!("file={},if=none,id=disk0,format=raw", path.display()));
        cmd.args(["-device", "nvme,serial=parperos0,drive=disk0"]);
    }
    if let Some((path, size)) = boot.pmem {
        cmd.args(crate::pmem::qemu_args(&config_args, path, size)?);
    }
    if let Some(n) = boot.cpus {
        cmd.args(["-smp".to_string(), n.to_string()]);
    }
    cmd.args(["-serial", boot.serial]).args(&boot.extra);
    Ok(cmd)
}

/// The bochsrc text with `count=N` in its `cpu:` line (replacing a count it has).
pub fn bochsrc_with_cpus(text: &str, cpus: usize) -> Result<String> {
    let mut found = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| match line.trim_start().strip_prefix("cpu:") {
            Some(rest) if !line.trim_start().starts_with('#') => {
                found = true;
                let others = rest.split(',').map(str::trim).filter(|w| !w.is_empty() && !w.starts_with("count="));
                let words: Vec<String> = std::iter::once(format!("count={cpus}")).chain(others.map(String::from)).collect();
                format!("cpu: {}", words.join(", "))
            }
            _ => line.to_string(),
        })
        .collect();
    if !found {
        bail!("the bochsrc has no `cpu:` line to set count={cpus} in");
    }
    Ok(lines.join("\n") + "\n")
}

/// Copy the Bochs configuration to `out` with `@ISO@` and `@SERIAL@` filled in (and
/// `count=N` in its `cpu:` line with `cpus`), after checking that the ROM images it names exist.
pub fn write_bochsrc(config: &Config, iso: &Path, serial: &Path, out: &Path, cpus: Option<usize>) -> Result<()> {
    let text = std::fs::read_to_string(&config.path).context(|| format!("cannot read {}", config.path.display()))?;
    for needed in ["@ISO@", "@SERIAL@"] {
        if !text.contains(needed) {
            bail!("{} lacks the placeholder {needed}", config.path.display());
        }
    }
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        if line.starts_with("romimage:") || line.starts_with("vgaromimage:") {
            if let Some(file) = line.split([',', ' ']).find_map(|w| w.strip_prefix("file=")) {
                tools::require_bochs_file(Path::new(file.trim_matches('"')))?;
            }
        }
    }
    let mut filled = text.replace("@ISO@", &iso.to_string_lossy()).replace("@SERIAL@", &serial.to_string_lossy());
    if let Some(n) = cpus {
        filled = bochsrc_with_cpus(&filled, n)?;
    }
    crate::images::write_atomic(out, filled.as_bytes())
}

/// `bochs -q -f <rc> [-rc <debugger commands>]`; without commands Bochs stops at its
/// debugger prompt (interactive use). Bochs dies with the thread that spawns it.
pub fn bochs_command(root: &Path, bochsrc: &Path, unattended: bool) -> Result<Command> {
    let bochs = tools::require(&tools::BOCHS)?;
    let mut cmd = Command::new(bochs);
    crate::die_with_parent(&mut cmd);
    cmd.arg("-q").arg("-f").arg(bochsrc);
    if unattended {
        cmd.arg("-rc").arg(root.join(BOCHS_DEBUGGER_RC));
    }
    Ok(cmd)
}

/// One Bochs start at a time, until its RFB display listens.
///
/// Bochs' RFB display (Debian's build has no `nogui`) sets `SO_REUSEADDR` on its socket, then
/// binds port 5900, 5901, ... and listens on the first it can bind. Two sockets with that
/// option may bind the same port while neither listens yet: the second `listen` then fails,
/// the loop goes on with a socket that is already bound (every further `bind` fails), and
/// Bochs panics ("RFB could not bind any port") before the guest's first instruction. So a
/// start holds a lock, shared by every xtask process through a file lock on
/// `build/bochs-start.lock`, from before the spawn until Bochs' log says it listens (or says
/// it could not, or Bochs ended, or [`BOCHS_START_WAIT`] passed). A CI run once lost a
/// scenario to an empty serial log 1.8 s after the start (2026-12-08); the race was not
/// reproduced here in 150 simultaneous starts: the window is the few instructions between
/// `bind` and `listen`.
pub struct BochsStart {
    _lock: std::fs::File,
}

/// How long a start waits for Bochs' `listening for connections` line (~0.1 s when idle).
pub const BOCHS_START_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl BochsStart {
    /// Waits for the lock (other starts: each at most [`BOCHS_START_WAIT`]).
    pub fn begin(root: &Path) -> Result<BochsStart> {
        let path = root.join(crate::images::BUILD_DIR).join("bochs-start.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .context(|| format!("cannot open {}", path.display()))?;
        file.lock().context(|| format!("cannot lock {}", path.display()))?;
        Ok(BochsStart { _lock: file })
    }

    /// Gives the lock back once `log` (Bochs' stdout and stderr) shows that the display
    /// listens or failed, or `ended()` says Bochs is gone, or the wait ran out.
    pub fn listening(self, log: &Path, mut ended: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while start.elapsed() < BOCHS_START_WAIT && !ended() {
            let text = std::fs::read(log).unwrap_or_default();
            if rfb_settled(&String::from_utf8_lossy(&text)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Whether Bochs' log shows that its RFB display listens, or gave up.
fn rfb_settled(log: &str) -> bool {
    log.contains("listening for connections on port") || log.contains("RFB could not bind")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# comment
-machine q35
tcg: -accel tcg
tcg: -cpu max,+svm,+npt
kvm: -accel kvm
kvm: -cpu host   # host cpu
-no-reboot

-append a b
hypervisor: iommu=sharept   # not for QEMU
";

    #[test]
    fn a_bochs_start_ends_when_its_display_listens_or_gives_up() {
        assert!(rfb_settled("00000000000i[RFB   ] Trying port 5900\n00000000000i[RFB   ] listening for connections on port 5901\n"));
        assert!(rfb_settled("00000000000p[RFB   ] >>PANIC<< RFB could not bind any port between 5900 and 5949"));
        assert!(!rfb_settled("00000000000i[RFB   ] Trying port 5900\n"));
    }

    #[test]
    fn named_configs_stay_honest_under_kvm() {
        let root = crate::root();
        for name in ["qemu-novirt", "qemu-svm-nonpt"] {
            let c = Config::resolve(&root, name).unwrap();
            assert!(!allows_kvm(&c), "{name} has no kvm: lines");
            assert_eq!(choose_accel(&c, None, Default::Detect).unwrap().0, Accel::Tcg, "{name}");
            let e = choose_accel(&c, Some(Accel::Kvm), Default::Detect).unwrap_err().0;
            assert!(e.contains("--accel tcg"), "{e}");
        }
        let svm = Config::resolve(&root, "qemu-svm").unwrap();
        assert!(allows_kvm(&svm));
        let (a, why) = choose_accel(&svm, Some(Accel::Tcg), Default::Detect).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("--accel tcg"), "{why}");
        assert_eq!(choose_accel(&svm, None, Default::Tcg).unwrap().0, Accel::Tcg);
        assert!(Accel::parse("kmv").unwrap_err().0.contains("did you mean `kvm`"));
    }

    #[test]
    fn hypervisor_lines_are_words_not_arguments() {
        assert_eq!(hypervisor_words(FILE), "iommu=sharept");
        assert_eq!(hypervisor_words("hypervisor: a b\n  hypervisor:c\n-m 2G\n"), "a b c");
        assert_eq!(hypervisor_words("-m 2G\n"), "");
    }

    #[test]
    fn args_file_per_accel() {
        assert_eq!(
            parse_args_file(FILE, Accel::Tcg),
            ["-machine", "q35", "-accel", "tcg", "-cpu", "max,+svm,+npt", "-no-reboot", "-append", "a b"]
        );
        assert_eq!(
            parse_args_file(FILE, Accel::Kvm),
            ["-machine", "q35", "-accel", "kvm", "-cpu", "host", "-no-reboot", "-append", "a b"]
        );
    }

    #[test]
    fn shipped_configs_parse_and_resolve() {
        let root = crate::root();
        for name in ["qemu-svm", "qemu-iommu"] {
            let c = Config::resolve(&root, name).unwrap();
            assert_eq!(c.emulator, Emulator::Qemu);
            let tcg = qemu_args(&c, Accel::Tcg).unwrap();
            assert!(tcg.windows(2).any(|w| w == ["-cpu", "max,+svm,+npt,enforce"]), "{tcg:?}");
            assert!(tcg.iter().any(|a| a == "isa-debug-exit,iobase=0xf4,iosize=0x04"));
            let kvm = qemu_args(&c, Accel::Kvm).unwrap();
            assert!(kvm.windows(2).any(|w| w == ["-cpu", "host"]), "{kvm:?}");
        }
        for name in ["bochs-vmx", "bochs-svm.bochsrc"] {
            assert_eq!(Config::resolve(&root, name).unwrap().emulator, Emulator::Bochs);
        }
        let pmem = qemu_args(&Config::resolve(&root, "qemu-pmem").unwrap(), Accel::Tcg).unwrap();
        let file = format!("mem-path={}/build/pmem.img,", root.display());
        assert!(pmem.iter().any(|a| a.contains(&file)), "{pmem:?}");
        let sharept = Config::resolve(&root, "qemu-iommu-sharept").unwrap();
        assert_eq!(qemu_args(&sharept, Accel::Tcg).unwrap(), qemu_args(&Config::resolve(&root, "qemu-iommu").unwrap(), Accel::Tcg).unwrap());
        assert_eq!(config_cmdline(&sharept, "guests=hello ").unwrap(), "guests=hello iommu=sharept");
        assert_eq!(config_cmdline(&sharept, "").unwrap(), "iommu=sharept");
        assert_eq!(config_cmdline(&Config::resolve(&root, "qemu-iommu").unwrap(), "guests=hello").unwrap(), "guests=hello");
        let e = Config::resolve(&root, "nope").unwrap_err().0;
        assert!(e.contains("qemu-svm"), "{e}");
    }

    #[test]
    fn binary_line() {
        let text = "-machine q35\nbinary: @ROOT@/build/q/qemu\n-m 2G\n";
        assert_eq!(parse_args_file(text, Accel::Tcg), ["-machine", "q35", "-m", "2G"]);
        assert_eq!(parse_binary(text).as_deref(), Some("@ROOT@/build/q/qemu"));
        assert_eq!(parse_binary(FILE), None);
        let root = crate::root();
        let evlog = Config::resolve(&root, "qemu-amd-iommu-evlog").unwrap();
        let text = std::fs::read_to_string(&evlog.path).unwrap();
        assert_eq!(parse_binary(&text).as_deref(), Some("@ROOT@/build/qemu-evlog/qemu-system-x86_64"));
        assert!(qemu_args(&evlog, Accel::Tcg).unwrap().iter().any(|a| a == "amd-iommu,dma-remap=on"));
    }

    #[test]
    fn bochs_cpu_count() {
        let rc = "megs: 2048\n# cpu: not this\ncpu: model=ryzen, reset_on_triple_fault=0\n";
        assert_eq!(
            bochsrc_with_cpus(rc, 2).unwrap(),
            "megs: 2048\n# cpu: not this\ncpu: count=2, model=ryzen, reset_on_triple_fault=0\n"
        );
        let twice = bochsrc_with_cpus(&bochsrc_with_cpus(rc, 2).unwrap(), 4).unwrap();
        assert!(twice.contains("cpu: count=4, model=ryzen, reset_on_triple_fault=0\n"), "{twice}");
        assert!(bochsrc_with_cpus("megs: 2048\n", 2).is_err());
    }
}
