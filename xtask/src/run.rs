//! `cargo xtask run`: build, then boot one emulator setup with the serial console on this
//! terminal (QEMU: `-serial mon:stdio`, Ctrl-A X quits; Bochs: com1 goes to a file under
//! build/ that is echoed here while Bochs runs).

use crate::emulator::{self, Config, Emulator};
use crate::machine::{Machine, SerialFrom};
use crate::symbolize::Symbolizer;
use crate::{bail, images, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The default hypervisor command line for `run`.
const DEMO_CMDLINE: &str = "qemu-configs/demo.cmdline";

pub struct Options {
    emulator: Option<Emulator>,
    config: Option<String>,
    cmdline: Option<String>,
    cpus: Option<usize>,
    gdb: bool,
    /// `--accel kvm|tcg` (QEMU; None: KVM where usable, `emulator::choose_accel`).
    accel: Option<emulator::Accel>,
    /// `--timeout SECONDS`: stop the emulator then (the run fails).
    timeout: Option<Duration>,
    /// `--guest PATH[:OPTS]`: guest ELFs from outside this repository, booted in this order.
    guests: Vec<(PathBuf, String)>,
    extra: Vec<String>,
}

/// The options of `run`, for "did you mean".
const RUN_OPTIONS: &[&str] = &["--emulator", "--config", "--cmdline", "--cpus", "--guest", "--timeout", "--gdb", "--accel"];

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options { emulator: None, config: None, cmdline: None, cpus: None, gdb: false, accel: None, timeout: None, guests: Vec::new(), extra: Vec::new() };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = |name: &str| -> Result<String> {
                match inline.clone().or_else(|| it.next().cloned()) {
                    Some(v) => Ok(v),
                    None => bail!("`{name}` needs a value"),
                }
            };
            match flag {
                "--emulator" => {
                    o.emulator = Some(match value("--emulator")?.as_str() {
                        "qemu" => Emulator::Qemu,
                        "bochs" => Emulator::Bochs,
                        other => bail!("unknown emulator `{other}` (qemu or bochs){}", crate::did_you_mean(other, ["qemu", "bochs"])),
                    })
                }
                "--config" => o.config = Some(value("--config")?),
                "--cmdline" => o.cmdline = Some(value("--cmdline")?),
                "--cpus" => {
                    o.cpus = match value("--cpus")?.parse() {
                        Ok(n) if n >= 1 => Some(n),
                        _ => bail!("`--cpus` wants a number of CPUs, at least 1"),
                    }
                }
                "--gdb" => o.gdb = true,
                "--accel" => o.accel = Some(emulator::Accel::parse(&value("--accel")?)?),
                "--timeout" => {
                    let v = value("--timeout")?;
                    match v.parse::<f64>() {
                        Ok(secs) if secs > 0.0 && secs.is_finite() => o.timeout = Some(Duration::from_secs_f64(secs)),
                        _ => bail!("`--timeout {v}`: a positive number of seconds"),
                    }
                }
                "--guest" => o.guests.push(split_guest(&value("--guest")?)),
                "--" => {
                    o.extra = it.by_ref().cloned().collect();
                }
                other => bail!("unknown option `{other}` for `run`{} (see `cargo xtask run --help`)", crate::did_you_mean(other, RUN_OPTIONS.iter().copied())),
            }
        }
        Ok(o)
    }
}

/// `--guest PATH[:OPTS]`: the options start at the first `:` after the file name.
pub fn split_guest(v: &str) -> (PathBuf, String) {
    let name_start = v.rfind('/').map_or(0, |i| i + 1);
    let (path, opts) = match v[name_start..].find(':') {
        Some(i) => (&v[..name_start + i], &v[name_start + i..]),
        None => (v, ""),
    };
    (PathBuf::from(path), opts.to_string())
}

/// The archive name of a `--guest` ELF: its file name, which must work in `guests=`.
pub fn guest_file_name(path: &Path) -> Result<String> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.is_empty() || name.len() >= crate::archive::NAME_SIZE || name.contains([':', ',', '=']) || name.contains(char::is_whitespace) {
        bail!("--guest {}: the file name must be 1 to {} characters without `:`, `,`, `=` or blanks (it becomes the guest's name)", path.display(), crate::archive::NAME_SIZE - 1);
    }
    Ok(name)
}

/// Refuses what is not a guest before anything boots it: not an ELF at all, or an ELF that
/// the hypervisor's loader would refuse (not an x86-64 executable linked with guest.ld at
/// `abi::IMAGE_BASE_GPA`, such as an ordinary host program).
pub fn check_guest_elf(path: &Path) -> Result<()> {
    let data = std::fs::read(path).context(|| format!("--guest {}: cannot read it", path.display()))?;
    let hint = "make a guest crate with `cargo xtask new-guest DIR` and `cargo build` it there";
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        bail!("--guest {}: not an ELF file; {hint}", path.display());
    }
    // The largest guest memory the hypervisor accepts bounds the image (the loader checks
    // the guest's own size at boot).
    if let Err(e) = formats::elf::Image::parse(&data, abi_image_base(), 512 << 30) {
        bail!("--guest {}: an ELF, but not a ParPerOS guest ({e}); {hint}", path.display());
    }
    Ok(())
}

/// Where guests are linked (guest-lib/guest.ld, `abi::IMAGE_BASE_GPA`).
fn abi_image_base() -> u64 {
    0x20_0000
}

/// What the hypervisor keeps for itself out of the emulator's RAM, at most (image, heap,
/// allocator metadata, page tables; measured: under 40 MiB at 2 GiB), with room to spare.
const HYPERVISOR_RESERVE: u64 = 128 << 20;

/// The emulator's RAM under `config` with `extra` QEMU arguments (the last `-m` wins;
/// Bochs: `megs:`).
fn emulator_memory(config: &Config, extra: &[String]) -> Option<u64> {
    let text = std::fs::read_to_string(&config.path).ok()?;
    match config.emulator {
        Emulator::Qemu => {
            let mut args = emulator::parse_args_file(&text, emulator::Accel::Tcg);
            args.extend(extra.iter().cloned());
            let m = args.windows(2).rev().find(|w| w[0] == "-m").map(|w| w[1].clone())?;
            crate::pmem::ram_size(m.split(',').next().unwrap_or_default())
        }
        Emulator::Bochs => text.lines().find_map(|l| l.trim().strip_prefix("megs:")).and_then(|m| m.trim().parse::<u64>().ok()).map(|m| m << 20),
    }
}

/// Refuses at once guests that ask for more memory than the emulator has, saying how to give
/// it more (instead of a boot that ends "out of host memory").
fn check_emulator_memory(config: &Config, cmdline: &str, extra: &[String]) -> Result<()> {
    let want = crate::cmdline::guest_memory(cmdline);
    let Some(have) = emulator_memory(config, extra) else { return Ok(()) };
    if want.saturating_add(HYPERVISOR_RESERVE) <= have {
        return Ok(());
    }
    let need = (want + HYPERVISOR_RESERVE).next_multiple_of(1 << 30);
    let how = match config.emulator {
        Emulator::Qemu => format!("add `-- -m {}G` to this command (QEMU takes the last -m)", need >> 30),
        Emulator::Bochs => format!("raise `megs:` in {} to {} or more", config.path.display(), need >> 20),
    };
    Err(crate::usage_error(format!(
        "the guests ask for {} MiB of memory in all, but config `{}` gives the emulator {} MiB (and the hypervisor keeps up to {} MiB): {how}",
        want >> 20, config.name, have >> 20, HYPERVISOR_RESERVE >> 20
    )))
}

/// The command line `run` boots without `--cmdline`: `qemu-configs/<config>.cmdline` where
/// the config has one (a demo of what the config is for: a device under an IOMMU, persistent
/// memory), else `qemu-configs/demo.cmdline`. `#` lines are comments.
pub fn demo_cmdline(root: &Path, config: &str) -> Result<(PathBuf, String)> {
    let own = root.join(emulator::CONFIG_DIR).join(format!("{config}.cmdline"));
    let path = if own.is_file() { own } else { root.join(DEMO_CMDLINE) };
    let text = std::fs::read_to_string(&path).context(|| format!("cannot read {}", path.display()))?;
    let line: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    Ok((path, line.join(" ")))
}

/// `cmdline` with `specs` appended to its `guests=` word (or a new one).
fn add_guests(cmdline: &str, specs: &[String]) -> String {
    if specs.is_empty() {
        return cmdline.to_string();
    }
    let mut words: Vec<String> = cmdline.split_ascii_whitespace().map(str::to_string).collect();
    match words.iter_mut().find(|w| w.starts_with("guests=")) {
        Some(w) => {
            if w.len() > "guests=".len() {
                w.push(',');
            }
            w.push_str(&specs.join(","));
        }
        None => words.push(format!("guests={}", specs.join(","))),
    }
    words.join(" ")
}

pub fn run(o: &Options) -> Result<ExitCode> {
    let root = crate::root();
    let name = match (&o.config, o.emulator) {
        (Some(c), _) => c.clone(),
        (None, Some(Emulator::Bochs)) => "bochs-vmx".into(),
        (None, _) => "qemu-svm".into(),
    };
    let config = Config::resolve(&root, &name)?;
    if let Some(e) = o.emulator {
        if e != config.emulator {
            return Err(crate::usage_error(format!("config `{}` is for {}, not --emulator {}", config.name, config.emulator.word(), e.word())));
        }
    }
    let mut specs = Vec::new();
    let mut extra_guests = Vec::new();
    for (path, opts) in &o.guests {
        check_guest_elf(path)?;
        let name = guest_file_name(path)?;
        specs.push(format!("{name}{opts}"));
        extra_guests.push((name, path.canonicalize().unwrap_or_else(|_| path.clone())));
    }
    let cmdline = match (&o.cmdline, specs.is_empty()) {
        (Some(c), _) => c.clone(),
        (None, false) => String::new(), // --guest alone: just those guests
        (None, true) => {
            let (path, line) = demo_cmdline(&root, &config.name)?;
            println!("demo: {} (`--cmdline` boots another)", path.display());
            line
        }
    };
    let cmdline = add_guests(&cmdline, &specs);
    let emulator: &dyn Interactive = match config.emulator {
        Emulator::Qemu => &Qemu,
        Emulator::Bochs => &Bochs,
    };
    // Check the emulator before the (longer) build.
    emulator.require()?;
    // build/ is locked while we write into it; the emulator then runs on files of its own.
    let lock = images::lock_build(&root)?;
    let mut built = images::build_all(false)?;
    if !extra_guests.is_empty() {
        built = images::with_extra_guests(&built, "run.guests.ar", &extra_guests)?;
    }
    crate::cmdline::check(&cmdline, &built.guest_names()).map_err(|e| crate::usage_error(e.0))?;
    check_emulator_memory(&config, &cmdline, &o.extra)?;
    let media = emulator.prepare(&built, &cmdline)?;
    drop(lock);
    let mut symbols = Symbolizer::new(&built.hypervisor, &built.guests);
    let run = Run { root: &root, config: &config, built: &built, cmdline: &cmdline, o, media };
    emulator.run(&run, &mut symbols)
}

/// What `run` boots, once built.
struct Run<'a> {
    root: &'a Path,
    config: &'a Config,
    built: &'a images::Built,
    cmdline: &'a str,
    o: &'a Options,
    /// What `prepare` made (Bochs: the GRUB ISO).
    media: Option<PathBuf>,
}

/// An emulator as `cargo xtask run` drives it: with the serial console on this terminal (the
/// test runner's counterpart is `testrun::Driver`).
trait Interactive {
    /// Fails with the apt packages to install if the emulator or its tools are missing.
    fn require(&self) -> Result<()>;
    /// Boot media beside the build outputs (while `build/` is locked).
    fn prepare(&self, built: &images::Built, cmdline: &str) -> Result<Option<PathBuf>>;
    /// Boots, echoes the serial console with RIPs named, and says how the hypervisor ended.
    fn run(&self, r: &Run, symbols: &mut Symbolizer) -> Result<ExitCode>;
}

struct Qemu;
struct Bochs;

impl Interactive for Qemu {
    fn require(&self) -> Result<()> {
        crate::tools::require(&crate::tools::QEMU).map(drop)
    }

    fn prepare(&self, _: &images::Built, _: &str) -> Result<Option<PathBuf>> {
        Ok(None)
    }

    fn run(&self, r: &Run, symbols: &mut Symbolizer) -> Result<ExitCode> {
        run_qemu(r.config, r.built, r.cmdline, r.o, symbols)
    }
}

impl Interactive for Bochs {
    fn require(&self) -> Result<()> {
        crate::tools::require(&crate::tools::BOCHS)?;
        crate::tools::require_iso_tools()
    }

    fn prepare(&self, built: &images::Built, cmdline: &str) -> Result<Option<PathBuf>> {
        images::make_iso(built, "run", cmdline).map(Some)
    }

    fn run(&self, r: &Run, symbols: &mut Symbolizer) -> Result<ExitCode> {
        let iso = r.media.as_deref().ok_or_else(|| crate::Error("no ISO was made".into()))?;
        run_bochs(r.root, r.config, iso, r.cmdline, r.o, symbols)
    }
}

/// Copies the emulator's serial output to this terminal a line at a time, each RIP named.
fn echo_lines(pending: &mut Vec<u8>, new: &[u8], symbols: &mut Symbolizer, clean: bool) {
    pending.extend_from_slice(new);
    let Some(end) = pending.iter().rposition(|&b| b == b'\n') else { return };
    let text = String::from_utf8_lossy(&pending[..=end]).into_owned();
    pending.drain(..=end);
    let mut out = std::io::stdout().lock();
    for line in text.lines() {
        // GRUB's terminal control (screen clearing over serial) would wipe the user's terminal.
        let line = if clean { crate::testrun::printable(line) } else { line.trim_end_matches('\r').to_string() };
        let _ = writeln!(out, "{}", symbols.line(&line));
    }
    let _ = out.flush();
}

fn run_qemu(config: &Config, built: &images::Built, cmdline: &str, o: &Options, symbols: &mut Symbolizer) -> Result<ExitCode> {
    let (accel, why) = emulator::choose_accel(config, o.accel, emulator::Default::Detect)?;
    println!("accel: {why}");
    let mut boot = emulator::QemuBoot::new(&built.hypervisor, cmdline, &built.archive, "mon:stdio");
    boot.cpus = o.cpus;
    if o.gdb {
        boot.extra.extend(["-s".to_string(), "-S".to_string()]);
        println!(
            "gdb: QEMU waits for a debugger on tcp::1234; attach with\n  \
             gdb {} -ex 'target remote :1234' -x {}\n\
             gdb: QEMU's stub does not walk nested paging, so `x` cannot read guest memory; the script's \
             `guest-list`, `guest-x GUEST GPA [N]`, `guest-bytes`, `guest-disas` and `$guest_pa(GUEST, GPA)` \
             read it through the guest's second-level table (book: docs/src/debugging.md)",
            built.hypervisor.display(),
            crate::root().join("qemu-configs/gdb/parperos.py").display()
        );
    }
    boot.extra.extend(o.extra.iter().cloned());
    let cmd = emulator::qemu_command(config, accel, &boot)?;
    println!("qemu: config {} ({}), cmdline `{}`; Ctrl-A X quits", config.name, config.path.display(), emulator::config_cmdline(config, cmdline)?);
    // The serial output comes through us (to name RIPs); the terminal stays QEMU's input.
    let mut m = Machine::spawn(cmd, SerialFrom::Stdout)?;
    let mut pending = Vec::new();
    let mut timed_out = false;
    let status = loop {
        if let Some(e) = m.try_wait()? {
            break e.status;
        }
        if o.timeout.is_some_and(|t| m.started.elapsed() >= t) {
            timed_out = true;
            break m.terminate()?.status;
        }
        let chunk = m.serial(Duration::from_millis(50));
        echo_lines(&mut pending, &chunk, symbols, false);
    };
    echo_lines(&mut pending, &m.serial_rest(), symbols, false);
    if !pending.is_empty() {
        echo_lines(&mut pending, b"\n", symbols, false);
    }
    if timed_out {
        println!("qemu: stopped after --timeout {:.0} s", o.timeout.unwrap_or_default().as_secs_f64());
        return Ok(ExitCode::FAILURE);
    }
    Ok(match status.code() {
        Some(33) => {
            println!("qemu: hypervisor reported success (exit 33)");
            ExitCode::SUCCESS
        }
        Some(35) => {
            println!("qemu: hypervisor reported failure (exit 35)");
            ExitCode::FAILURE
        }
        Some(0) => {
            println!("qemu: quit (by the user, or a reset under -no-reboot: no exit status from the hypervisor)");
            ExitCode::SUCCESS
        }
        _ => {
            println!("qemu: exited with {status}");
            ExitCode::FAILURE
        }
    })
}

fn run_bochs(root: &Path, config: &Config, iso: &Path, cmdline: &str, o: &Options, symbols: &mut Symbolizer) -> Result<ExitCode> {
    if !o.extra.is_empty() {
        bail!("extra emulator arguments are for QEMU; edit {} for Bochs", config.path.display());
    }
    let serial = root.join(images::BUILD_DIR).join("run.serial.log");
    let rc = root.join(images::BUILD_DIR).join(format!("run.{}.bochsrc", config.name));
    let _ = std::fs::remove_file(&serial);
    emulator::write_bochsrc(config, iso, &serial, &rc, o.cpus)?;
    // Debian's Bochs is built with the internal debugger, which excludes the GDB stub.
    let mut cmd = emulator::bochs_command(root, &rc, !o.gdb)?;
    if o.gdb {
        println!(
            "gdb: Debian's Bochs has no GDB stub (it is built with the internal debugger instead); \
             starting at the Bochs debugger prompt (`c` continues, Ctrl-C breaks, `help`)"
        );
    } else {
        cmd.stdin(std::process::Stdio::null());
    }
    println!(
        "bochs: config {} ({}), cmdline `{cmdline}`; serial log {}; Ctrl-C stops",
        config.name,
        config.path.display(),
        serial.display()
    );
    println!("bochs: the log's time stamps are Bochs' virtual time (clock: sync=none), which runs faster than the wall clock");
    // Bochs' own log goes to build/run.bochs.log; the serial file is echoed here.
    let log_path = root.join(images::BUILD_DIR).join("run.bochs.log");
    let log = std::fs::File::create(&log_path).context(|| format!("cannot create {}", log_path.display()))?;
    if !o.gdb {
        cmd.stdout(log.try_clone().context(|| "cannot dup log".to_string())?);
    }
    cmd.stderr(log);
    // With `--gdb` Bochs' log goes to the terminal, where the start lock cannot read it.
    let mut m = Machine::spawn_bochs(root, cmd, serial.clone(), (!o.gdb).then_some(log_path.as_path()))?;
    let mut pending = Vec::new();
    let mut timed_out = false;
    loop {
        if m.try_wait()?.is_some() {
            break;
        }
        if o.timeout.is_some_and(|t| m.started.elapsed() >= t) {
            timed_out = true;
            m.terminate()?;
            break;
        }
        let chunk = m.serial(Duration::from_millis(50));
        echo_lines(&mut pending, &chunk, symbols, true);
    }
    echo_lines(&mut pending, &m.serial_rest(), symbols, true);
    let wall = m.started.elapsed();
    if !pending.is_empty() {
        echo_lines(&mut pending, b"\n", symbols, true);
    }
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    if let Some(virtual_secs) = last_stamp(&log) {
        println!(
            "bochs: {virtual_secs:.1} s of Bochs' virtual time in {:.1} s of wall time ({:.1}x)",
            wall.as_secs_f64(),
            virtual_secs / wall.as_secs_f64().max(0.001)
        );
    }
    println!("bochs: its own log is {}", log_path.display());
    let ended = log.lines().rev().find_map(|l| {
        if l.contains("parperos: exit success") {
            Some(true)
        } else if l.contains("parperos: exit failure") {
            Some(false)
        } else {
            None
        }
    });
    Ok(match (timed_out, ended) {
        (true, _) => {
            println!("bochs: stopped after --timeout {:.0} s", o.timeout.unwrap_or_default().as_secs_f64());
            ExitCode::FAILURE
        }
        (false, Some(true)) => {
            println!("bochs: hypervisor reported success");
            ExitCode::SUCCESS
        }
        (false, Some(false)) => {
            println!("bochs: hypervisor reported failure");
            ExitCode::FAILURE
        }
        (false, None) => {
            println!("bochs: stopped without an exit line from the hypervisor (quit by the user, or it never got that far)");
            ExitCode::FAILURE
        }
    })
}

/// The last `[   12.345678]` time stamp of a serial log, in seconds.
fn last_stamp(log: &str) -> Option<f64> {
    log.lines().rev().find_map(|l| l.trim_start().strip_prefix('[')?.split_once(']')?.0.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn guest_paths_and_options() {
        let o = Options::parse(&args(&["--guest", "../my/app:mem=32M:arg=2", "--guest=x/y", "--timeout", "2.5"])).unwrap();
        assert_eq!(o.guests, [(PathBuf::from("../my/app"), ":mem=32M:arg=2".to_string()), (PathBuf::from("x/y"), String::new())]);
        assert_eq!(o.timeout, Some(Duration::from_millis(2500)));
        assert!(Options::parse(&args(&["--timeout", "0"])).is_err());
        assert!(Options::parse(&args(&["--timeout"])).is_err());
        assert_eq!(add_guests("log=debug", &["app:arg=1".into()]), "log=debug guests=app:arg=1");
        assert_eq!(add_guests("guests=hello log=debug", &["app".into(), "b".into()]), "guests=hello,app,b log=debug");
        assert_eq!(add_guests("guests=", &["app".into()]), "guests=app");
        assert!(guest_file_name(Path::new("a/b:c")).is_err());
        assert_eq!(guest_file_name(Path::new("a/app")).unwrap(), "app");
        assert_eq!(last_stamp("[    1.5] x\n[  349.17] INFO y\nparperos: exit success\n"), Some(349.17));
    }

    #[test]
    fn guests_beyond_the_emulators_memory_are_refused_with_a_remedy() {
        let root = crate::root();
        let qemu = Config::resolve(&root, "qemu-svm").unwrap();
        let e = check_emulator_memory(&qemu, "guests=hello:mem=4G", &[]).unwrap_err().0;
        assert!(e.contains("4096 MiB") && e.contains("2048 MiB") && e.contains("-- -m 5G"), "{e}");
        check_emulator_memory(&qemu, "guests=hello:mem=4G", &args(&["-m", "8G"])).unwrap();
        check_emulator_memory(&qemu, "guests=hello,hello:mem=1G", &[]).unwrap();
        let bochs = Config::resolve(&root, "bochs-vmx").unwrap();
        assert!(check_emulator_memory(&bochs, "guests=hello:mem=4G", &[]).unwrap_err().0.contains("megs:"));
    }

    /// Each config's demo is a command line a scenario runs under that config, so it is tested.
    #[test]
    fn each_configs_demo_is_a_tested_command_line() {
        let root = crate::root();
        let (scenarios, _) = crate::testrun::load_scenarios(&root).unwrap();
        for (name, _) in emulator::describe_configs(&root) {
            let (path, line) = demo_cmdline(&root, &name).unwrap();
            let tested = scenarios.iter().any(|s| s.configs.contains(&name) && (1..=s.boots).any(|b| s.cmdline(&name, b).replace("@BOOT@", "1") == line))
                // Configs without their own demo fall back to demo.cmdline (the `demo`
                // scenario runs it on qemu-svm and Bochs; novirt/nonpt report what is missing).
                || path.ends_with("demo.cmdline");
            assert!(tested, "config {name}: its demo `{line}` ({}) is run by no scenario under {name}", path.display());
        }
        assert!(demo_cmdline(&root, "qemu-iommu").unwrap().1.contains("edu_share"), "qemu-iommu shows a device");
        assert!(demo_cmdline(&root, "qemu-pmem").unwrap().1.contains("pm:"), "qemu-pmem shows persistent memory");
    }

    #[test]
    fn guest_elfs_are_checked_before_boot() {
        let dir = std::env::temp_dir().join(format!("xtask-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("notes.txt");
        std::fs::write(&text, "hello").unwrap();
        let e = check_guest_elf(&text).unwrap_err().0;
        assert!(e.contains("not an ELF file") && e.contains("new-guest"), "{e}");
        // This test binary: an ELF, but a host program (PIE, linked at 0), not a guest.
        let e = check_guest_elf(&std::env::current_exe().unwrap()).unwrap_err().0;
        assert!(e.contains("not a ParPerOS guest") && e.contains("new-guest"), "{e}");
        assert!(check_guest_elf(&dir.join("missing")).unwrap_err().0.contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
