//! `cargo xtask test [FILTER]`: the host test commands, then every scenario of
//! `tests/scenarios/` under each of its configs, with a time limit, checked against the
//! serial log and the exit status. One PASS/FAIL line per host command and per
//! `scenario [config]`, the log tail of each failure, then `N passed, N failed`.
//!
//! QEMU runs always use TCG (the scenarios expect the emulated AMD CPU); its serial port is a
//! pipe read while QEMU runs, so the time to `parperos: ready` is measured. Bochs writes its
//! serial port to a file that is polled. Bochs runs one at a time; QEMU runs in parallel (-j).

use crate::emulator::{self, Accel, Config, Emulator};
use crate::scenario::{self, ExitKind, Scenario};
use crate::{bail, images, tools, Context, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SCENARIO_DIR: &str = "tests/scenarios";
const LOG_DIR: &str = "build/test-logs";
const READY_LINE: &str = "parperos: ready";
/// Stands for the disk image's checksum (decimal) in a scenario with `disk = SIZE`.
const DISK_SUM: &str = "@DISK_SUM@";
const EXIT_SUCCESS_LINE: &str = "parperos: exit success";
const EXIT_FAILURE_LINE: &str = "parperos: exit failure";
/// isa-debug-exit status: (value << 1) | 1 for the hypervisor's 0x10 and 0x11.
const QEMU_EXIT_SUCCESS: i32 = 33;
const QEMU_EXIT_FAILURE: i32 = 35;
/// Lines of serial log (and of host test output) shown for a failure.
const TAIL_LINES: usize = 40;
const HOST_TESTS: &str = "host: cargo test (allocator morsel xtask)";
const HOST_LOOM: &str = "host: loom (allocator)";
const HOST_HV: &str = "host: cargo test (hypervisor lib: archive, ELF, DMAR, MMIO)";
/// Time limit for each host test command (a hung test must not hang CI).
const HOST_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// After Bochs printed its exit line, how long it may take to power off before it is stopped.
const BOCHS_GRACE: Duration = Duration::from_secs(3);

pub struct Options {
    filter: Option<String>,
    jobs: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut filter = None;
        let mut jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            if arg == "-j" || arg == "--jobs" {
                let Some(n) = it.next().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0) else {
                    bail!("`{arg}` needs a positive number");
                };
                jobs = n;
            } else if let Some(n) = arg.strip_prefix("-j").filter(|n| !n.is_empty()) {
                jobs = match n.parse() {
                    Ok(n) if n > 0 => n,
                    _ => bail!("`{arg}`: -j needs a positive number"),
                };
            } else if arg.starts_with('-') {
                bail!("unknown option `{arg}` for `test` (usage: cargo xtask test [FILTER] [-j N])");
            } else if filter.replace(arg.clone()).is_some() {
                bail!("`test` takes one FILTER (got `{arg}` too)");
            }
        }
        Ok(Options { filter, jobs })
    }
}

struct Tally {
    passed: usize,
    failed: usize,
    width: usize,
}

impl Tally {
    /// Print one result line (and the details of a failure) in one write.
    fn report(&mut self, ok: bool, name: &str, facts: &str, details: &str) {
        if ok { self.passed += 1 } else { self.failed += 1 }
        let mut text = format!("{} {name:<w$}  {facts}\n", if ok { "PASS" } else { "FAIL" }, w = self.width);
        text.push_str(details);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

pub fn test(o: &Options) -> Result<ExitCode> {
    let root = crate::root();
    let host = o.filter.as_deref().is_none_or(|f| f == "host");
    let mut tally = Tally { passed: 0, failed: 0, width: 0 };

    // Load every scenario first, so that a broken file or a missing tool stops us early.
    let (scenarios, broken) = load_scenarios(&root)?;
    let mut jobs = Vec::new();
    for s in &scenarios {
        for c in &s.configs {
            let label = format!("{} [{c}]", s.name);
            if o.filter.as_deref().is_none_or(|f| label.contains(f)) {
                jobs.push(Job { scenario: s.clone(), config: Config::resolve(&root, c)?, label });
            }
        }
    }
    if jobs.iter().any(|j| j.config.emulator == Emulator::Qemu) {
        tools::require(&tools::QEMU)?;
    }
    if jobs.iter().any(|j| j.config.emulator == Emulator::Bochs) {
        tools::require(&tools::BOCHS)?;
        tools::require_iso_tools()?;
    }
    tally.width = jobs.iter().map(|j| j.label.len()).chain([HOST_TESTS.len(), HOST_LOOM.len(), HOST_HV.len()]).max().unwrap_or(0);

    if host {
        println!("== host tests");
        run_host(&root, &mut tally, HOST_TESTS, |c| {
            c.args(["test", "--release", "-p", "allocator", "-p", "morsel", "-p", "xtask"]);
        });
        run_host(&root, &mut tally, HOST_HV, |c| {
            c.args(["test", "--release", "-p", "hypervisor", "--lib"]);
        });
        let loom_dir = images::target_dir(&root).join("loom");
        run_host(&root, &mut tally, HOST_LOOM, |c| {
            c.args(["test", "--release", "-p", "allocator", "--lib", "loom"])
                .env("RUSTFLAGS", "--cfg loom")
                .env("CARGO_TARGET_DIR", &loom_dir);
        });
    }
    for (path, error) in &broken {
        tally.report(false, &format!("scenario file {}", path.display()), "", &format!("    {error}\n"));
    }

    if !jobs.is_empty() {
        println!("== scenarios ({} runs, {} at a time; QEMU under TCG)", jobs.len(), o.jobs);
        match images::build_all(true) {
            Ok(built) => run_jobs(&root, jobs, built, o.jobs, &mut tally),
            Err(e) => {
                let details: String = e.0.lines().map(|l| format!("    {l}\n")).collect();
                tally.report(false, "build: hypervisor and guests", "", &details);
                for j in &jobs {
                    tally.report(false, &j.label, "not run (build failed)", "");
                }
            }
        }
    }

    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(if tally.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// All `*.scn` files, sorted; files that do not parse are returned as (path, error).
/// Scenario files that failed to parse or name an unknown config: (path, error).
type Broken = Vec<(PathBuf, String)>;

fn load_scenarios(root: &Path) -> Result<(Vec<Scenario>, Broken)> {
    let dir = root.join(SCENARIO_DIR);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "scn"))
        .collect();
    paths.sort();
    let mut good = Vec::new();
    let mut broken = Vec::new();
    for path in paths {
        let shown = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let parsed = std::fs::read_to_string(&path)
            .context(|| format!("cannot read {}", shown.display()))
            .and_then(|text| scenario::parse(&name, &shown, &text))
            .and_then(|s| {
                for c in &s.configs {
                    Config::resolve(root, c).map_err(|e| crate::Error(format!("{}: {e}", shown.display())))?;
                }
                Ok(s)
            });
        match parsed {
            Ok(s) => good.push(s),
            Err(e) => broken.push((shown, e.0)),
        }
    }
    Ok((good, broken))
}

/// Run one host test command; its stdout and stderr go to one pipe, shown in part on failure.
fn run_host(root: &Path, tally: &mut Tally, name: &str, setup: impl FnOnce(&mut Command)) {
    let start = Instant::now();
    let mut cmd = images::cargo(root);
    setup(&mut cmd);
    let cmd_line = cmd_text(&cmd);
    let result = crate::output_merged(cmd, Some(HOST_TIMEOUT));
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(m) if m.status.is_some_and(|s| s.success()) => tally.report(true, name, &format!("{secs:7.2} s"), ""),
        Ok(crate::Merged { status, output: out }) => {
            let status = match status {
                Some(s) => s.to_string(),
                None => format!("stopped after the {} s limit", HOST_TIMEOUT.as_secs()),
            };
            // Progress lines would push the compiler's or the tests' messages out of the tail.
            let progress = ["Compiling ", "Downloaded ", "Downloading ", "Locking ", "Adding "];
            let kept: Vec<&str> =
                out.lines().filter(|l| !progress.iter().any(|p| l.trim_start().starts_with(p))).collect();
            let details = tail_block(&kept.join("\n"), &format!("output of `{}` ({status})", cmd_line));
            tally.report(false, name, &format!("{secs:7.2} s"), &details)
        }
        Err(e) => tally.report(false, name, "", &format!("    cannot run cargo: {e}\n")),
    }
}

/// `VAR=value cargo args...` as a user would type it (the env that xtask set, not inherited).
fn cmd_text(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(k, v)| Some(format!("{}={:?}", k.to_string_lossy(), v?)));
    let args = cmd.get_args().map(|a| a.to_string_lossy().into_owned());
    envs.chain(["cargo".to_string()]).chain(args).collect::<Vec<_>>().join(" ")
}

fn tail_block(text: &str, title: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(TAIL_LINES);
    let mut s = format!("    --- {title}, last {} of {} lines ---\n", lines.len() - from, lines.len());
    for l in &lines[from..] {
        s.push_str("    | ");
        s.push_str(&printable(l));
        s.push('\n');
    }
    s
}

/// `line` without terminal control: ANSI escape sequences (GRUB clears the screen over serial)
/// are dropped, other control characters shown as `?`.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters... final byte in @..~; other escapes: ESC + one char.
                if chars.next_if_eq(&'[').is_some() {
                    while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {}
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            '\t' => out.push(c),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

struct Job {
    scenario: Scenario,
    config: Config,
    label: String,
}

/// What one emulator run produced.
struct Outcome {
    wall: Duration,
    ready: Option<Duration>,
    timed_out: bool,
    /// QEMU: the exit status code; Bochs: None (it always exits 1).
    code: Option<i32>,
    serial: String,
    serial_path: PathBuf,
    emulator_log: PathBuf,
    /// `disk = SIZE`: the image and its checksum before the run.
    disk: Option<(PathBuf, u64)>,
}

fn run_jobs(root: &Path, jobs: Vec<Job>, built: images::Built, workers: usize, tally: &mut Tally) {
    let logs = root.join(LOG_DIR);
    if let Err(e) = std::fs::create_dir_all(&logs) {
        for j in &jobs {
            tally.report(false, &j.label, "", &format!("    cannot create {}: {e}\n", logs.display()));
        }
        return;
    }
    let queue = Mutex::new(jobs.into_iter().collect::<VecDeque<_>>());
    let bochs_lane = Mutex::new(());
    let shared = Arc::new(Mutex::new(std::mem::replace(tally, Tally { passed: 0, failed: 0, width: 0 })));
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                let Some(job) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else { break };
                let outcome = match job.config.emulator {
                    Emulator::Qemu => run_qemu(&job, &built, &logs),
                    Emulator::Bochs => {
                        let _one_at_a_time = bochs_lane.lock().unwrap_or_else(|p| p.into_inner());
                        run_bochs(root, &job, &built, &logs)
                    }
                };
                let (ok, facts, details) = judge(&job, outcome);
                shared.lock().unwrap_or_else(|p| p.into_inner()).report(ok, &job.label, &facts, &details);
            });
        }
    });
    *tally = Arc::try_unwrap(shared)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_else(|_| unreachable!("all workers joined"));
}

/// PASS/FAIL, the facts for the result line, and the details shown for a failure.
fn judge(job: &Job, outcome: Result<Outcome>) -> (bool, String, String) {
    let o = match outcome {
        Ok(o) => o,
        Err(e) => return (false, String::new(), format!("    {e}\n")),
    };
    let substituted;
    let s = match &o.disk {
        Some((_, sum)) => {
            substituted = job.scenario.substitute(DISK_SUM, &sum.to_string());
            &substituted
        }
        None => &job.scenario,
    };
    let mut facts = format!("{:7.2} s", o.wall.as_secs_f64());
    match o.ready {
        Some(r) => facts.push_str(&format!("  boot {:.2} s", r.as_secs_f64())),
        None => facts.push_str("  boot -"),
    }
    let mut problems = Vec::new();
    if o.timed_out {
        problems.push(format!("timed out after {} s (stopped)", s.timeout(&job.config.name).as_secs()));
    }
    // How the hypervisor ended: QEMU by isa-debug-exit status, Bochs by its last serial line.
    let ended = match (job.config.emulator, o.code) {
        (Emulator::Qemu, Some(QEMU_EXIT_SUCCESS)) => Ok(ExitKind::Success),
        (Emulator::Qemu, Some(QEMU_EXIT_FAILURE)) => Ok(ExitKind::Failure),
        (Emulator::Qemu, Some(0)) => Err("QEMU exited 0: reset or triple fault (-no-reboot), not isa-debug-exit".into()),
        (Emulator::Qemu, Some(c)) => Err(format!("QEMU exited with status {c}")),
        (Emulator::Qemu, None) => Err("QEMU was stopped by a signal".to_string()),
        (Emulator::Bochs, _) => {
            let last = o.serial.lines().rev().find_map(|l| {
                if l.contains(EXIT_SUCCESS_LINE) {
                    Some(ExitKind::Success)
                } else if l.contains(EXIT_FAILURE_LINE) {
                    Some(ExitKind::Failure)
                } else {
                    None
                }
            });
            last.ok_or_else(|| format!("no `{EXIT_SUCCESS_LINE}`/`failure` line in the serial log"))
        }
    };
    match ended {
        Ok(kind) if kind == s.exit => {}
        Ok(kind) => problems.push(format!("hypervisor exited with {}, expected {}", kind.word(), s.exit.word())),
        Err(why) if !o.timed_out => problems.push(format!("{why}; expected exit {}", s.exit.word())),
        Err(_) => {}
    }
    problems.extend(s.check_log(&job.config.name, &o.serial));
    if let Some((path, _)) = &o.disk {
        match crate::disk::check(path, &s.check_disk) {
            Ok(p) => problems.extend(p),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        return (true, facts, String::new());
    }
    let mut details: String = problems.iter().map(|p| format!("    {p}\n")).collect();
    details.push_str(&tail_block(&o.serial, &format!("serial log {}", o.serial_path.display())));
    if let Ok(text) = std::fs::read_to_string(&o.emulator_log) {
        let useful: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if !useful.is_empty() && job.config.emulator == Emulator::Qemu {
            let from = useful.len().saturating_sub(10);
            details.push_str("    --- QEMU stderr ---\n");
            for l in &useful[from..] {
                details.push_str(&format!("    | {l}\n"));
            }
        } else if job.config.emulator == Emulator::Bochs {
            details.push_str(&format!("    (Bochs' own log: {})\n", o.emulator_log.display()));
        }
    }
    (false, facts, details)
}

fn file_stem(job: &Job) -> String {
    format!("{}.{}", job.scenario.name, job.config.name)
}

/// Wait for `child` until it exits or `deadline`; `poll` runs every tick and may ask to stop
/// it early (returns true). Returns (exit code, timed out).
fn supervise(child: &mut Child, deadline: Instant, mut poll: impl FnMut() -> bool) -> Result<(Option<i32>, bool)> {
    loop {
        if let Some(status) = child.try_wait().context(|| "waiting for the emulator".to_string())? {
            return Ok((status.code(), false));
        }
        let stop = poll();
        if stop || Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().context(|| "waiting for the emulator".to_string())?;
            return Ok((if stop { status.code() } else { None }, !stop));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run_qemu(job: &Job, built: &images::Built, logs: &Path) -> Result<Outcome> {
    let serial_path = logs.join(format!("{}.serial.log", file_stem(job)));
    let emulator_log = logs.join(format!("{}.qemu.log", file_stem(job)));
    let disk = match job.scenario.disk {
        Some(size) => {
            let path = logs.parent().unwrap_or(logs).join("disks").join(format!("{}.img", file_stem(job)));
            let sum = crate::disk::create(&path, size)?;
            Some((path, sum))
        }
        None => None,
    };
    let cmdline = match &disk {
        Some((_, sum)) => job.scenario.cmdline(&job.config.name).replace(DISK_SUM, &sum.to_string()),
        None => job.scenario.cmdline(&job.config.name).to_string(),
    };
    let mut cmd = emulator::qemu_command(&job.config, Accel::Tcg, &built.hypervisor, &cmdline, &built.archive)?;
    if let Some((path, _)) = &disk {
        cmd.arg("-drive").arg(format!("file={},if=none,id=disk0,format=raw", path.display()));
        cmd.args(["-device", "nvme,serial=parperos0,drive=disk0"]);
    }
    cmd.args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&emulator_log).context(|| format!("cannot create {}", emulator_log.display()))?);
    let mut file = std::fs::File::create(&serial_path).context(|| format!("cannot create {}", serial_path.display()))?;

    let start = Instant::now();
    let mut child = cmd.spawn().context(|| "cannot start qemu-system-x86_64".to_string())?;
    let stdout = child.stdout.take();
    // The reader keeps the log and notes when `ready` appears; it ends at QEMU's EOF.
    let reader = std::thread::spawn(move || {
        let mut ready = None;
        let mut all = Vec::new();
        if let Some(out) = stdout {
            let mut r = BufReader::new(out);
            let mut line = Vec::new();
            while r.read_until(b'\n', &mut line).map(|n| n > 0).unwrap_or(false) {
                if ready.is_none() && String::from_utf8_lossy(&line).contains(READY_LINE) {
                    ready = Some(start.elapsed());
                }
                let _ = file.write_all(&line);
                all.extend_from_slice(&line);
                line.clear();
            }
        }
        (ready, all)
    });
    let deadline = start + job.scenario.timeout(&job.config.name);
    let supervised = supervise(&mut child, deadline, || false);
    let wall = start.elapsed();
    let (ready, serial) = reader.join().unwrap_or_default();
    let (code, timed_out) = supervised?;
    Ok(Outcome {
        wall,
        ready,
        timed_out,
        code,
        serial: String::from_utf8_lossy(&serial).into_owned(),
        serial_path,
        emulator_log,
        disk,
    })
}

fn run_bochs(root: &Path, job: &Job, built: &images::Built, logs: &Path) -> Result<Outcome> {
    if job.scenario.disk.is_some() {
        bail!("`disk` needs a QEMU config (Bochs has no NVMe)");
    }
    let iso = images::make_iso(built, &format!("{}.{}", job.scenario.name, job.config.name), job.scenario.cmdline(&job.config.name))?;
    let serial_path = logs.join(format!("{}.serial.log", file_stem(job)));
    let emulator_log = logs.join(format!("{}.bochs.log", file_stem(job)));
    let rc = logs.join(format!("{}.bochsrc", file_stem(job)));
    let _ = std::fs::remove_file(&serial_path);
    emulator::write_bochsrc(&job.config, &iso, &serial_path, &rc)?;
    let log = std::fs::File::create(&emulator_log).context(|| format!("cannot create {}", emulator_log.display()))?;
    let mut cmd = emulator::bochs_command(root, &rc, true)?;
    cmd.current_dir(logs)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context(|| "cannot dup log".to_string())?)
        .stderr(log);

    let start = Instant::now();
    let mut child = cmd.spawn().context(|| "cannot start bochs".to_string())?;
    let mut ready = None;
    let mut ended_at: Option<Instant> = None;
    let mut seen_len = 0u64;
    let deadline = start + job.scenario.timeout(&job.config.name);
    let supervised = supervise(&mut child, deadline, || {
        // Read the serial file only when it grew.
        let len = std::fs::metadata(&serial_path).map_or(0, |m| m.len());
        if len != seen_len {
            seen_len = len;
            let text = std::fs::read_to_string(&serial_path).unwrap_or_default();
            if ready.is_none() && text.contains(READY_LINE) {
                ready = Some(start.elapsed());
            }
            if ended_at.is_none() && (text.contains(EXIT_SUCCESS_LINE) || text.contains(EXIT_FAILURE_LINE)) {
                ended_at = Some(Instant::now());
            }
        }
        ended_at.is_some_and(|t| t.elapsed() > BOCHS_GRACE)
    });
    let wall = start.elapsed();
    let (_, timed_out) = supervised?;
    let serial = std::fs::read(&serial_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    if ready.is_none() && serial.contains(READY_LINE) {
        ready = Some(wall); // appeared after the last poll
    }
    Ok(Outcome { wall, ready, timed_out, code: None, serial, serial_path, emulator_log, disk: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_drops_terminal_control() {
        assert_eq!(printable("\x1b[H\x1b[J\x1b[1;1H  Booting `parperos'\r"), "  Booting `parperos'");
        assert_eq!(printable("a\x07b\tc"), "a?b\tc");
    }

    #[test]
    fn options() {
        let o = Options::parse(&["boot".into(), "-j3".into()]).unwrap();
        assert_eq!((o.filter.as_deref(), o.jobs), (Some("boot"), 3));
        assert!(Options::parse(&["-j".into(), "0".into()]).is_err());
        assert!(Options::parse(&["a".into(), "b".into()]).is_err());
    }
}
