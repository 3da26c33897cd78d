//! `cargo xtask test [FILTER]`: the host test commands, then every scenario of
//! `tests/scenarios/` under each of its configs, with a time limit, checked against the
//! serial log and the exit status. One PASS/FAIL line per host command and per
//! `scenario [config]`, the log tail of each failure, then `N passed, N failed`.
//!
//! A scenario with `boots = N` boots its config N times in sequence in one job, with the same
//! disk image and pmem file; `kill@K` SIGKILLs boot K a seeded random delay after a text
//! appears (a crash). The seed is `PARPEROS_SEED` or from the clock, printed where it matters.
//!
//! QEMU runs always use TCG (the scenarios expect the emulated AMD CPU); its serial port is a
//! pipe read while QEMU runs, so the time to `parperos: ready` is measured. Bochs writes its
//! serial port to a file that is polled. Every run takes one of the `-j` workers, Bochs' as
//! QEMU's; Bochs runs are queued first (they are the long ones: one emulated instruction at a
//! time), so the short QEMU runs fill the workers at the end instead of one worker running
//! the Bochs runs alone while the others idle.

use crate::emulator::{self, Accel, Config, Emulator};
use crate::machine::{Machine, SerialFrom};
use crate::scenario::{self, ExitKind, Scenario, SplitMix64, BOOT, DISK_SUM, SEED};
use crate::{bail, images, pmem, tools, Context, Result};
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SCENARIO_DIR: &str = "tests/scenarios";
const LOG_DIR: &str = "build/test-logs";
/// Beside `LOG_DIR`: `disk = SIZE` images and `pmem = SIZE` files, `<scenario>.<config>.img`.
const DISK_DIR: &str = "disks";
const PMEM_DIR: &str = "pmem";
/// Fixes the seed of every run (decimal u64); otherwise each run takes one from the clock.
const SEED_VAR: &str = "PARPEROS_SEED";
const READY_LINE: &str = "parperos: ready";
const EXIT_SUCCESS_LINE: &str = "parperos: exit success";
const EXIT_FAILURE_LINE: &str = "parperos: exit failure";
/// isa-debug-exit status: (value << 1) | 1 for the hypervisor's 0x10 and 0x11.
const QEMU_EXIT_SUCCESS: i32 = 33;
const QEMU_EXIT_FAILURE: i32 = 35;
/// Lines of serial log (and of host test output) shown for a failure.
const TAIL_LINES: usize = 40;
/// Host test commands: each crate's tests in a release AND a debug build (debug builds check
/// overflow and the standard library's debug assertions, e.g. `slice::from_raw_parts`'s
/// alignment check, which caught undefined behaviour that release builds ran through).
const HOST_TESTS: &str = "host: cargo test --release (allocator morsel exmap vmcore abi guest-lib xtask)";
const HOST_HV: &str = "host: cargo test --release (formats: archive, ELF, DMAR, NFIT, decode, MMIO)";
const HOST_TESTS_DEBUG: &str = "host: cargo test, debug build (allocator morsel exmap vmcore abi guest-lib xtask formats)";
/// Release only: loom explores every interleaving of the same code the two runs above test,
/// and a debug build multiplies its minutes; the debug run of the allocator's own tests covers
/// its debug assertions.
const HOST_LOOM: &str = "host: loom --release (allocator vmcore)";
const HOST_CRATES: [&str; 7] = ["allocator", "morsel", "exmap", "vmcore", "abi", "guest-lib", "xtask"];
/// The book builds, its links resolve (`doc` selects it alone, `host` with the host tests).
const DOC_CHECK: &str = "doc: the book builds, its links resolve";
/// Time limit for each host test command (a hung test must not hang CI).
const HOST_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// After Bochs printed its exit line, how long it may take to power off before it is stopped.
const BOCHS_GRACE: Duration = Duration::from_secs(3);
/// How often a running emulator is looked at (QEMU's kill text wakes the supervisor at once).
const TICK: Duration = Duration::from_millis(10);

pub struct Options {
    filter: Option<String>,
    jobs: usize,
    /// `--junit FILE`: a JUnit XML report of every result line.
    junit: Option<PathBuf>,
    /// `--accel kvm|tcg` (None: TCG).
    accel: Option<Accel>,
    /// `--guest ELF[:OPTS]`: boot these instead of the scenarios.
    guests: Vec<(PathBuf, String)>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut filter = None;
        let mut junit = None;
        let mut accel = None;
        let mut guests = Vec::new();
        let mut jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            if arg == "--accel" || arg == "--guest" {
                let Some(v) = it.next() else { bail!("`{arg}` needs a value") };
                if arg == "--accel" {
                    accel = Some(Accel::parse(v)?);
                } else {
                    guests.push(crate::run::split_guest(v));
                }
            } else if let Some(v) = arg.strip_prefix("--accel=") {
                accel = Some(Accel::parse(v)?);
            } else if let Some(v) = arg.strip_prefix("--guest=") {
                guests.push(crate::run::split_guest(v));
            } else if arg == "--junit" {
                let Some(file) = it.next() else { bail!("`--junit` needs a file name") };
                junit = Some(PathBuf::from(file));
            } else if let Some(file) = arg.strip_prefix("--junit=") {
                junit = Some(PathBuf::from(file));
            } else if arg == "-j" || arg == "--jobs" {
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
                bail!("unknown option `{arg}` for `test`{} (usage: cargo xtask test [FILTER] [-j N] [--junit FILE] [--accel kvm|tcg] [--guest ELF[:OPTS]])", crate::did_you_mean(arg, ["-j", "--junit", "--accel", "--guest"]));
            } else if filter.replace(arg.clone()).is_some() {
                bail!("`test` takes one FILTER (got `{arg}` too)");
            }
        }
        if !guests.is_empty() && filter.is_some() {
            bail!("`test --guest` boots your guests instead of the scenarios: no FILTER with it");
        }
        Ok(Options { filter, jobs, junit, accel, guests })
    }
}

struct Tally {
    passed: usize,
    failed: usize,
    width: usize,
    /// Every result: name, passed, facts, details (for `--junit`).
    results: Vec<(String, bool, String, String)>,
}

impl Tally {
    /// Print one result line (and the details of a failure) in one write.
    fn report(&mut self, ok: bool, name: &str, facts: &str, details: &str) {
        if ok { self.passed += 1 } else { self.failed += 1 }
        self.results.push((name.to_string(), ok, facts.to_string(), details.to_string()));
        let mut text = format!("{} {name:<w$}  {facts}\n", if ok { "PASS" } else { "FAIL" }, w = self.width);
        text.push_str(details);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

pub fn test(o: &Options) -> Result<ExitCode> {
    let root = crate::root();
    let host = o.guests.is_empty() && o.filter.as_deref().is_none_or(|f| f == "host");
    let doc = o.guests.is_empty() && o.filter.as_deref().is_none_or(|f| f == "host" || f == "doc");
    let mut tally = Tally { passed: 0, failed: 0, width: 0, results: Vec::new() };

    // Load every scenario first, so that a broken file or a missing tool stops us early.
    let (scenarios, broken) = match o.guests.is_empty() {
        true => load_scenarios(&root)?,
        false => (vec![own_guests_scenario(&o.guests)?], Vec::new()),
    };
    let fixed_seed = seed_from_env()?;
    if o.accel == Some(Accel::Kvm) {
        if let (Accel::Tcg, why) = emulator::detect_accel() {
            bail!("--accel kvm: KVM cannot run the hypervisor here: {why}; use --accel tcg");
        }
        println!("accel: KVM (-cpu host) for QEMU configs that allow it; qemu-novirt and qemu-svm-nonpt stay on TCG");
    }
    let mut jobs = Vec::new();
    for s in &scenarios {
        for c in &s.configs {
            let label = format!("{} [{c}]", s.name);
            if o.filter.as_deref().is_none_or(|f| label.contains(f)) {
                let seed = fixed_seed.unwrap_or_else(|| clock_seed(&label));
                let config = Config::resolve(&root, c)?;
                let accel = match o.accel {
                    Some(Accel::Kvm) if emulator::allows_kvm(&config) => Accel::Kvm,
                    _ => Accel::Tcg,
                };
                jobs.push(Job { scenario: s.clone(), config, label, seed, accel });
            }
        }
    }
    if let Some(message) = no_match(o.filter.as_deref(), &all_labels(&scenarios), jobs.len()) {
        eprintln!("error: {message}");
        return Ok(ExitCode::from(crate::EXIT_USAGE));
    }
    // A config whose `binary:` QEMU is not there is skipped, with why (.ci/fetch-qemu-evlog).
    let mut skipped = Vec::new();
    for j in &jobs {
        if j.config.emulator == Emulator::Qemu && !skipped.iter().any(|(c, _): &(String, String)| *c == j.config.name) {
            if let Err(why) = crate::emulator::qemu_binary(&j.config)? {
                skipped.push((j.config.name.clone(), why));
            }
        }
    }
    for (_, why) in &skipped {
        println!("skipped: {why}");
    }
    jobs.retain(|j| {
        let skip = skipped.iter().any(|(c, _)| *c == j.config.name);
        if skip {
            println!("skip  {}", j.label);
        }
        !skip
    });
    if jobs.iter().any(|j| j.config.emulator == Emulator::Qemu) {
        tools::require(&tools::QEMU)?;
    }
    if jobs.iter().any(|j| j.config.emulator == Emulator::Bochs) {
        tools::require(&tools::BOCHS)?;
        tools::require_iso_tools()?;
    }
    tally.width = jobs
        .iter()
        .map(|j| j.label.len())
        .chain([HOST_TESTS.len(), HOST_LOOM.len(), HOST_HV.len(), HOST_TESTS_DEBUG.len(), DOC_CHECK.len()])
        .max()
        .unwrap_or(0);

    if host {
        println!("== host tests");
        let packages = |c: &mut Command, crates: &[&str]| {
            for p in crates {
                c.args(["-p", p]);
            }
        };
        run_host(&root, &mut tally, HOST_TESTS, |c| {
            c.args(["test", "--release"]);
            packages(c, &HOST_CRATES);
        });
        run_host(&root, &mut tally, HOST_HV, |c| {
            c.args(["test", "--release", "-p", "formats"]);
        });
        run_host(&root, &mut tally, HOST_TESTS_DEBUG, |c| {
            c.arg("test");
            packages(c, &HOST_CRATES);
            packages(c, &["formats"]);
        });
        let loom_dir = images::target_dir(&root).join("loom");
        run_host(&root, &mut tally, HOST_LOOM, |c| {
            c.args(["test", "--release", "-p", "allocator", "-p", "vmcore", "--lib", "loom"])
                .env("RUSTFLAGS", "--cfg loom")
                .env("CARGO_TARGET_DIR", &loom_dir);
        });
    }
    if doc {
        println!("== the book");
        let start = Instant::now();
        let result = crate::doc::check(&root);
        let facts = format!("{:7.2} s", start.elapsed().as_secs_f64());
        match result {
            Ok(()) => tally.report(true, DOC_CHECK, &facts, ""),
            Err(e) => tally.report(false, DOC_CHECK, &facts, &e.0.lines().map(|l| format!("    {l}\n")).collect::<String>()),
        }
    }
    for (path, error) in &broken {
        tally.report(false, &format!("scenario file {}", path.display()), "", &format!("    {error}\n"));
    }

    if !jobs.is_empty() {
        println!("== building the hypervisor and {} guests (cargo build --release, freestanding; output kept back unless it fails)", images::guest_bins(&root)?.len());
        let build_start = Instant::now();
        let built = images::build_all(true);
        if built.is_ok() {
            println!("   built in {:.1} s", build_start.elapsed().as_secs_f64());
        }
        let under = if jobs.iter().any(|j| j.accel == Accel::Kvm) { "KVM where the config allows it, else TCG" } else { "TCG" };
        println!("== scenarios ({} runs, {} at a time; QEMU under {under})", jobs.len(), o.jobs);
        match built {
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
    if let Some(path) = &o.junit {
        std::fs::write(path, junit_xml(&tally.results)).context(|| format!("cannot write {}", path.display()))?;
        println!("JUnit report: {}", path.display());
    }
    Ok(if tally.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A JUnit XML report: one `testcase` per result line, failures with their details.
fn junit_xml(results: &[(String, bool, String, String)]) -> String {
    fn esc(s: &str) -> String {
        printable(s).replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
    }
    let failures = results.iter().filter(|r| !r.1).count();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"parperos\" tests=\"{}\" failures=\"{failures}\">\n",
        results.len()
    );
    for (name, ok, facts, details) in results {
        // The wall time leads the facts (`  1.23 s ...`) where there is one.
        let secs = facts.split_whitespace().next().and_then(|t| t.parse::<f64>().ok()).unwrap_or(0.0);
        let (class, case) = match name.split_once(" [") {
            Some((n, c)) => (c.trim_end_matches(']'), n),
            None => ("host", name.as_str()),
        };
        x.push_str(&format!("  <testcase classname=\"{}\" name=\"{}\" time=\"{secs:.2}\">", esc(class), esc(case)));
        if !ok {
            let text: String = details.lines().map(|l| esc(l) + "\n").collect();
            // The reason: the first line of the details (the timing is in `time`).
            let reason = details.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or(facts.trim());
            x.push_str(&format!("\n    <failure message=\"{}\">{text}</failure>\n  ", esc(reason)));
        }
        x.push_str("</testcase>\n");
    }
    x.push_str("</testsuite>\n</testsuites>\n");
    x
}

/// (name, configs, description) of every scenario that parses, for `cargo xtask list`.
pub fn describe_scenarios(root: &Path) -> Result<Vec<(String, String, String)>> {
    let (good, broken) = load_scenarios(root)?;
    let mut out: Vec<_> = good.into_iter().map(|s| (s.name.clone(), s.configs.join(" "), s.description.clone())).collect();
    out.extend(broken.into_iter().map(|(p, e)| (p.display().to_string(), String::new(), format!("BROKEN: {e}"))));
    Ok(out)
}

/// Every `name [config]` the scenarios define, in order.
fn all_labels(scenarios: &[Scenario]) -> Vec<String> {
    scenarios.iter().flat_map(|s| s.configs.iter().map(move |c| format!("{} [{c}]", s.name))).collect()
}

/// A FILTER that selects nothing is an error (a typo in CI must not be a green build): the
/// message lists what exists. `host` selects the host tests (and the book check), `doc` the
/// book check alone.
fn no_match(filter: Option<&str>, labels: &[String], selected: usize) -> Option<String> {
    let f = filter?;
    if selected > 0 || f == "host" || f == "doc" {
        return None;
    }
    let mut names: Vec<&str> = labels.iter().map(|l| l.split(" [").next().unwrap_or(l)).collect();
    names.dedup();
    let mut configs: Vec<&str> = labels.iter().filter_map(|l| l.split(" [").nth(1)?.strip_suffix(']')).collect();
    configs.sort();
    configs.dedup();
    Some(format!(
        "FILTER `{f}` matches no run: it must be `host`, `doc` or a substring of `scenario [config]`.\n  \
         scenarios: {}\n  configs: {}\n  (`cargo xtask list` describes them)",
        names.join(", "),
        configs.join(", ")
    ))
}

/// All `*.scn` files, sorted; files that do not parse are returned as (path, error).
/// Scenario files that failed to parse or name an unknown config: (path, error).
type Broken = Vec<(PathBuf, String)>;

pub fn load_scenarios(root: &Path) -> Result<(Vec<Scenario>, Broken)> {
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
                    let config = Config::resolve(root, c).map_err(|e| crate::Error(format!("{}: {e}", shown.display())))?;
                    s.check_emulator(&shown, c, config.emulator)?;
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

/// `PARPEROS_SEED`, if set: the seed of every run.
fn seed_from_env() -> Result<Option<u64>> {
    match std::env::var(SEED_VAR) {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(seed) => Ok(Some(seed)),
            Err(_) => bail!("{SEED_VAR} must be a decimal u64 (as printed by a run), got `{v}`"),
        },
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("{SEED_VAR}: {e}"),
    }
}

/// A seed from the clock, different for runs started in the same nanosecond (FNV-1a of `label`).
fn clock_seed(label: &str) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let fnv = label.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    SplitMix64::new(nanos ^ fnv).next_u64()
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
pub(crate) fn printable(line: &str) -> String {
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
    /// The run's seed: kill delays and `@SEED@` (`PARPEROS_SEED`, else from the clock).
    seed: u64,
    /// QEMU's accelerator (`--accel`; TCG unless asked and the config allows KVM).
    accel: Accel,
}

/// How an emulator run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// On its own, with this exit status code (None: a signal from elsewhere).
    Exited(Option<i32>),
    /// Stopped with SIGKILL at the time the watcher asked for (`kill@K`, Bochs' grace time).
    Stopped,
    /// Stopped with SIGKILL at the time limit.
    TimedOut,
}

/// What one boot produced.
struct Outcome {
    wall: Duration,
    ready: Option<Duration>,
    end: End,
    /// `kill@K`: the delay drawn for the kill after the text.
    kill_delay: Duration,
    /// Whether the emulator was killed (after `kill_delay`).
    killed: bool,
    serial: String,
    serial_path: PathBuf,
    emulator_log: PathBuf,
    /// A QEMU run that timed out: each CPU's registers just before it was stopped (`hang`).
    hang: Vec<String>,
}

/// The files that every boot of a job shares, made fresh before the first.
struct Media {
    /// `disk = SIZE`: the image and its checksum when fresh.
    disk: Option<(PathBuf, u64)>,
    /// `pmem = SIZE`: the zero-filled file and its size.
    pmem: Option<(PathBuf, u64)>,
}

fn run_jobs(root: &Path, jobs: Vec<Job>, built: images::Built, workers: usize, tally: &mut Tally) {
    let logs = root.join(LOG_DIR);
    if let Err(e) = std::fs::create_dir_all(&logs) {
        for j in &jobs {
            tally.report(false, &j.label, "", &format!("    cannot create {}: {e}\n", logs.display()));
        }
        return;
    }
    let queue = Mutex::new(queue_order(jobs));
    let shared = Arc::new(Mutex::new(std::mem::replace(tally, Tally { passed: 0, failed: 0, width: 0, results: Vec::new() })));
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                let Some(job) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else { break };
                let (mut ok, mut facts, mut details) = run_job(root, &job, &built, &logs);
                if let Some(why) = (!ok).then(|| run_again(&job, &logs)).flatten() {
                    let first = details;
                    (ok, facts, details) = run_job(root, &job, &built, &logs);
                    facts.push_str(&format!("  (run twice: the first {why})"));
                    if !ok {
                        details = format!("{first}    --- the second run ---\n{details}");
                    }
                }
                shared.lock().unwrap_or_else(|p| p.into_inner()).report(ok, &job.label, &facts, &details);
            });
        }
    });
    *tally = Arc::try_unwrap(shared)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_else(|_| unreachable!("all workers joined"));
}

/// The serial logs a job's boots wrote (those that exist).
fn serial_logs(job: &Job, logs: &Path) -> Vec<String> {
    (1..=job.scenario.boots)
        .filter_map(|boot| std::fs::read(logs.join(format!("{}.serial.log", file_stem(job, boot)))).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

/// Why a failed job runs once more, if it does: QEMU's SVM world-switch fault, which the
/// hypervisor itself diagnosed (docs/src/notes/worldswitch.md), or a Bochs that stopped before
/// the guest could print (a host-side failure; Bochs is deterministic, so a fault of ours
/// fails again).
fn run_again(job: &Job, logs: &Path) -> Option<String> {
    match job.config.emulator {
        Emulator::Qemu => serial_logs(job, logs)
            .iter()
            .any(|l| met_emulator_fault(l))
            .then(|| "met QEMU's SVM world-switch fault".to_string()),
        Emulator::Bochs => bochs_start_failure(job, logs).map(|panic| format!("Bochs stopped before any serial output: {panic}")),
    }
}

/// A failed Bochs job whose first boot printed nothing: the panic Bochs gave (its log's first
/// `>>PANIC<<` line), as when its display found no port (`emulator::BochsStart`).
fn bochs_start_failure(job: &Job, logs: &Path) -> Option<String> {
    let stem = file_stem(job, 1);
    let serial = std::fs::read(logs.join(format!("{stem}.serial.log"))).unwrap_or_default();
    let log = std::fs::read(logs.join(format!("{stem}.bochs.log"))).ok()?;
    start_panic(&serial, &String::from_utf8_lossy(&log))
}

/// The first panic line of a Bochs log when the serial log is empty.
fn start_panic(serial: &[u8], bochs_log: &str) -> Option<String> {
    if !serial.is_empty() {
        return None;
    }
    bochs_log.lines().find(|l| l.contains(">>PANIC<<")).map(|l| l.trim().to_string())
}

/// Whether a failed QEMU run's serial log shows the hypervisor's own diagnosis of QEMU 7.2's
/// SVM world-switch fault (a #VMEXIT that came back with the host's state, which stops the
/// guest: its partners then wait for it until the time limit). Such a run is run once more;
/// a scenario that expects the diagnosis passes the first time and is never rerun.
fn met_emulator_fault(serial: &str) -> bool {
    serial.contains("stopped by an emulator or hypervisor fault, not its own") && serial.contains("came back with the host's state")
}

/// The order the workers take jobs in: Bochs runs first (each takes minutes of one host CPU
/// where a QEMU run takes seconds), each emulator's jobs in scenario order. (Bochs runs were
/// once one at a time: a worker that drew a second one waited idle, and the Bochs runs ended
/// alone on one CPU; Bochs' RFB display takes the next free port, so they run side by side.)
fn queue_order(jobs: Vec<Job>) -> VecDeque<Job> {
    let (bochs, qemu): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| j.config.emulator == Emulator::Bochs);
    bochs.into_iter().chain(qemu).collect()
}

/// Boots the job's config `boots` times in sequence with the same disk and pmem files, each
/// boot judged by the keys that apply to it; the first failing boot ends the job. Returns
/// PASS/FAIL, the facts for the result line, and the details shown for a failure.
fn run_job(root: &Path, job: &Job, built: &images::Built, logs: &Path) -> (bool, String, String) {
    let media = match prepare_media(job, logs) {
        Ok(m) => m,
        Err(e) => return (false, String::new(), format!("    {e}\n")),
    };
    let own;
    let built = match outside_guests(root, job, built) {
        Ok(Some(b)) => {
            own = b;
            &own
        }
        Ok(None) => built,
        Err(e) => return (false, String::new(), format!("    {}\n", e.0.replace('\n', "\n    "))),
    };
    let boots = job.scenario.boots;
    let mut wall = Duration::ZERO;
    let mut readies = Vec::new();
    let mut kills = Vec::new();
    for boot in 1..=boots {
        if let Some((path, _)) = &media.pmem {
            for (_, w) in job.scenario.pmem_writes.iter().filter(|(k, _)| *k == boot) {
                if let Err(e) = pmem::apply(path, w) {
                    return (false, facts(job, wall, &readies, &kills), format!("    {}{e}\n", which_boot(job, boot)));
                }
            }
        }
        let s = scenario_for(job, &media, boot);
        let d = driver(job.config.emulator);
        let b = Boot { root, job, s: &s, boot, built, logs, media: &media };
        let outcome = d.build_command(&b).and_then(|launch| d.boot(&b, launch));
        let o = match outcome {
            Ok(o) => o,
            Err(e) => {
                let details = format!("    {}{e}\n{}", which_boot(job, boot), replay_hint(job));
                return (false, facts(job, wall, &readies, &kills), details);
            }
        };
        wall += o.wall;
        readies.push(o.ready);
        if o.killed {
            kills.push((boot, o.kill_delay));
        }
        let mut problems = judge(job, &s, boot, &o);
        if let (true, Some((path, _))) = (boot == boots, &media.disk) {
            match crate::disk::check(path, &s.check_disk) {
                Ok(p) => problems.extend(p),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            return (false, facts(job, wall, &readies, &kills), failure_details(job, boot, &o, &problems));
        }
    }
    (true, facts(job, wall, &readies, &kills), String::new())
}

/// `test --guest ELF[:OPTS] ...`: one scenario that boots the user's guests under qemu-svm and
/// passes when the hypervisor reports success (every guest exited with its expected code, 0)
/// with every frame back; the ELFs are checked before anything boots.
fn own_guests_scenario(guests: &[(PathBuf, String)]) -> Result<Scenario> {
    let mut text = String::from("description = your own guests (test --guest)\nconfigs = qemu-svm\ntimeout = 120\n");
    let mut specs = Vec::new();
    for (path, opts) in guests {
        crate::run::check_guest_elf(path).map_err(|e| crate::usage_error(e.0))?;
        let name = crate::run::guest_file_name(path).map_err(|e| crate::usage_error(e.0))?;
        let abs = path.canonicalize().context(|| format!("--guest {}", path.display()))?;
        text.push_str(&format!("guest_elf = {}\n", abs.display()));
        specs.push(format!("{name}{opts}"));
    }
    text.push_str(&format!("cmdline = guests={}\n", specs.join(",")));
    text.push_str("expect = frames not returned after all guests ended: 0\nreject = UNEXPECTED\nexit = success\n");
    scenario::parse("own_guests", Path::new("(test --guest)"), &text)
}

/// The archive of a job whose scenario boots guests from outside tests/guests (`guest_elf`,
/// `new_guest`), each checked as `run --guest` checks it; None for the others.
fn outside_guests(root: &Path, job: &Job, built: &images::Built) -> Result<Option<images::Built>> {
    let s = &job.scenario;
    if s.guest_elfs.is_empty() && s.new_guest.is_none() {
        return Ok(None);
    }
    let mut extra = Vec::new();
    for path in &s.guest_elfs {
        let path = if path.is_absolute() { path.clone() } else { root.join(path) };
        crate::run::check_guest_elf(&path)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        extra.push((name, path));
    }
    if let Some(name) = &s.new_guest {
        let dir = root.join(images::BUILD_DIR).join("new-guest").join(format!("{}.{}", job_stem(job), name)).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        crate::newguest::create(root, &dir)?;
        let elf = crate::newguest::build(&dir, name)?;
        crate::run::check_guest_elf(&elf)?;
        extra.push((name.clone(), elf));
    }
    images::with_extra_guests(built, &format!("{}.guests.ar", job_stem(job)), &extra).map(Some)
}

/// Makes the fresh disk image and pmem file of a job.
fn prepare_media(job: &Job, logs: &Path) -> Result<Media> {
    let build = logs.parent().unwrap_or(logs);
    let file = |dir: &str| build.join(dir).join(format!("{}.img", job_stem(job)));
    let disk = match job.scenario.disk {
        Some(size) => {
            let path = file(DISK_DIR);
            let sum = crate::disk::create(&path, size)?;
            Some((path, sum))
        }
        None => None,
    };
    let pmem = match job.scenario.pmem {
        Some(size) => {
            let path = file(PMEM_DIR);
            pmem::create(&path, size)?;
            Some((path, size))
        }
        None => None,
    };
    Ok(Media { disk, pmem })
}

/// The scenario as boot `boot` sees it: `@BOOT@`, `@SEED@` and `@DISK_SUM@` filled in.
fn scenario_for(job: &Job, media: &Media, boot: usize) -> Scenario {
    let s = job.scenario.substitute(BOOT, &boot.to_string()).substitute(SEED, &job.seed.to_string());
    match &media.disk {
        Some((_, sum)) => s.substitute(DISK_SUM, &sum.to_string()),
        None => s,
    }
}

/// The result line's facts: wall time of all boots, time to `ready` per boot, how many boots
/// and kills, the seed where it matters.
fn facts(job: &Job, wall: Duration, readies: &[Option<Duration>], kills: &[(usize, Duration)]) -> String {
    let mut f = format!("{:7.2} s", wall.as_secs_f64());
    if readies.iter().all(Option::is_none) {
        f.push_str("  boot -");
    } else {
        let times: Vec<String> = readies.iter().map(|r| r.map_or("-".into(), |r| format!("{:.2}", r.as_secs_f64()))).collect();
        f.push_str(&format!("  boot {} s", times.join("/")));
    }
    if job.scenario.boots > 1 {
        f.push_str(&format!("  {} boots", job.scenario.boots));
    }
    if !kills.is_empty() {
        let k: Vec<String> = kills.iter().map(|(b, d)| format!("boot {b} killed +{} ms", d.as_millis())).collect();
        f.push_str(&format!(" ({})", k.join(", ")));
    }
    if job.scenario.uses_seed() {
        f.push_str(&format!("  seed {}", job.seed));
    }
    f
}

/// `boot K of N: ` for a multi-boot scenario, else nothing.
fn which_boot(job: &Job, boot: usize) -> String {
    match job.scenario.boots {
        1 => String::new(),
        n => format!("boot {boot} of {n}: "),
    }
}

/// How to run a seeded job again with the same seed.
fn replay_hint(job: &Job) -> String {
    match job.scenario.uses_seed() {
        true => format!("    replay: {SEED_VAR}={} cargo xtask test '{}'\n", job.seed, job.label),
        false => String::new(),
    }
}

/// Everything wrong with one boot: how it ended against `exit`/`kill@K`, and its serial log.
fn judge(job: &Job, s: &Scenario, boot: usize, o: &Outcome) -> Vec<String> {
    let config = &job.config.name;
    let want = s.exit(config, boot);
    let timed_out = o.end == End::TimedOut;
    let mut problems = Vec::new();
    if timed_out {
        problems.push(format!("timed out after {} s (stopped)", s.timeout(config, boot).as_secs()));
    }
    // How the hypervisor ended: killed by us, QEMU by isa-debug-exit status, Bochs by its last serial line.
    let ended = match o.killed {
        true => Ok(ExitKind::Killed),
        false => driver(job.config.emulator).judge(o.end, &o.serial),
    };
    match ended {
        Ok(kind) if kind == want => {}
        _ if want == ExitKind::Killed => {
            let text = s.kill(boot).unwrap_or_default();
            let why = match o.serial.contains(text) {
                false => format!("kill text `{text}` never appeared (kill@{boot})"),
                true => format!(
                    "kill text `{text}` appeared, but the run ended before the kill {} ms later (kill@{boot}, kill_delay)",
                    o.kill_delay.as_millis()
                ),
            };
            match ended {
                _ if timed_out => problems.push(why),
                Ok(kind) => problems.push(format!("{why}; the hypervisor exited with {}", kind.word())),
                Err(how) => problems.push(format!("{why}; {how}")),
            }
        }
        Ok(kind) => problems.push(format!("hypervisor exited with {}, expected {}", kind.word(), want.word())),
        Err(why) if !timed_out => problems.push(format!("{why}; expected exit {}", want.word())),
        Err(_) => {}
    }
    problems.extend(s.check_log(config, boot, &o.serial));
    problems
}

/// The problems of the failing boot, its serial log tail, the emulator's own output, and how
/// to replay the seed.
fn failure_details(job: &Job, boot: usize, o: &Outcome, problems: &[String]) -> String {
    let which = which_boot(job, boot);
    let mut details: String = problems.iter().map(|p| format!("    {which}{p}\n")).collect();
    details.push_str(&tail_block(&o.serial, &format!("serial log {}", o.serial_path.display())));
    if !o.hang.is_empty() {
        details.push_str("    --- each CPU when it timed out (QEMU monitor) ---\n");
        for l in &o.hang {
            details.push_str(&format!("    | {l}\n"));
        }
    }
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
    details.push_str(&replay_hint(job));
    details
}

/// `<scenario>.<config>`: the name of a job's disk image and pmem file.
fn job_stem(job: &Job) -> String {
    format!("{}.{}", job.scenario.name, job.config.name)
}

/// The name of a boot's logs (and Bochs ISO): the job's, with `.boot<K>` where the scenario
/// boots more than once.
fn file_stem(job: &Job, boot: usize) -> String {
    match job.scenario.boots {
        1 => job_stem(job),
        _ => format!("{}.boot{boot}", job_stem(job)),
    }
}

/// Wait for the machine until it exits or `deadline`. Between looks at it, `watch(new)` gets
/// the serial output that came meanwhile (at most `TICK` is waited for it) and returns when the
/// emulator is to be stopped, if it is. Stopping is SIGKILL followed by a wait: the emulator is
/// gone when this returns.
fn supervise(m: &mut Machine, deadline: Instant, mut watch: impl FnMut(&[u8]) -> Option<Instant>, mut at_timeout: impl FnMut()) -> Result<End> {
    let mut stop_at: Option<Instant> = None;
    loop {
        if let Some(e) = m.try_wait()? {
            return Ok(End::Exited(e.status.code()));
        }
        let now = Instant::now();
        let timed_out = now >= deadline;
        if timed_out || stop_at.is_some_and(|t| now >= t) {
            if timed_out {
                at_timeout();
            }
            let e = m.kill()?;
            return Ok(match e.status.code() {
                Some(code) => End::Exited(Some(code)), // it ended on its own just before
                None if timed_out => End::TimedOut,
                None => End::Stopped,
            });
        }
        let until = stop_at.map_or(deadline, |t| t.min(deadline));
        let new = m.serial(TICK.min(until - now));
        stop_at = watch(&new);
    }
}

/// Each CPU's registers from QEMU's monitor, RIPs named from the hypervisor's and this
/// boot's guests' ELFs (`hang`), or the one line that says why not.
fn registers_at_timeout(monitor: Option<&Path>, built: &images::Built, cmdline: &str) -> Vec<String> {
    let Some(path) = monitor else { return Vec::new() };
    let guests: Vec<(String, PathBuf)> =
        built.guests.iter().filter(|(name, _)| cmdline.contains(name.as_str())).cloned().collect();
    let mut symbols = crate::symbolize::Symbolizer::new(&built.hypervisor, &guests);
    // Three looks 200 ms apart: a CPU that stays at one RIP spins or waits there.
    let mut out = Vec::new();
    for look in 1..=3 {
        match crate::hang::registers(path) {
            Ok(text) => match crate::hang::summarize(&text, &mut symbols) {
                lines if lines.is_empty() => out.push(format!("no registers in the monitor's answer: {:?}", text.chars().take(200).collect::<String>())),
                lines => out.extend(lines.into_iter().map(|l| format!("look {look}: {l}"))),
            },
            Err(e) => {
                out.push(e);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    out
}

/// QEMU's serial output as it comes (not line by line, so a kill text is seen at once): kept
/// in memory and in the log file, watched for `parperos: ready` and the kill text.
struct SerialLog {
    file: std::fs::File,
    all: Vec<u8>,
    start: Instant,
    ready: Option<Duration>,
    kill: Option<String>,
    /// When the kill text first appeared.
    kill_seen: Option<Instant>,
}

impl SerialLog {
    fn new(file: std::fs::File, start: Instant, kill: Option<String>) -> SerialLog {
        SerialLog { file, all: Vec::new(), start, ready: None, kill, kill_seen: None }
    }

    fn add(&mut self, new: &[u8]) {
        if new.is_empty() {
            return;
        }
        let from = self.all.len();
        self.all.extend_from_slice(new);
        if self.kill_seen.is_none() && self.kill.as_deref().is_some_and(|k| appeared(&self.all, from, k.as_bytes())) {
            self.kill_seen = Some(Instant::now());
        }
        if self.ready.is_none() && appeared(&self.all, from, READY_LINE.as_bytes()) {
            self.ready = Some(self.start.elapsed());
        }
        let _ = self.file.write_all(new);
    }
}

/// Whether `needle` occurs in `all` ending at or after `from` (in the bytes new since `from`).
fn appeared(all: &[u8], from: usize, needle: &[u8]) -> bool {
    let start = from.saturating_sub(needle.len().saturating_sub(1));
    !needle.is_empty() && all[start..].windows(needle.len()).any(|w| w == needle)
}

/// One emulator as the test runner drives it: the command line of one boot (and the files it
/// needs), the boot itself (started, watched for `ready` and the kill text, stopped), and how
/// the way a boot ended reads as the hypervisor's exit.
trait Driver: Sync {
    fn build_command(&self, b: &Boot) -> Result<Launch>;
    fn boot(&self, b: &Boot, launch: Launch) -> Result<Outcome>;
    /// How the hypervisor ended, from the emulator's end and the serial log (not for kills).
    fn judge(&self, end: End, serial: &str) -> std::result::Result<ExitKind, String>;
}

/// One boot of a job: the scenario as that boot sees it, and what it boots.
struct Boot<'a> {
    root: &'a Path,
    job: &'a Job,
    s: &'a Scenario,
    boot: usize,
    built: &'a images::Built,
    logs: &'a Path,
    media: &'a Media,
}

/// A boot's command and where its serial output and the emulator's own output go.
struct Launch {
    cmd: Command,
    serial_path: PathBuf,
    emulator_log: PathBuf,
    /// QEMU's monitor socket, asked for the registers of a run that timed out.
    monitor: Option<PathBuf>,
}

struct Qemu;
struct Bochs;

/// Numbers the QEMU runs of this process (their monitor sockets).
static MONITORS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn driver(e: Emulator) -> &'static dyn Driver {
    match e {
        Emulator::Qemu => &Qemu,
        Emulator::Bochs => &Bochs,
    }
}

impl Driver for Qemu {
    fn build_command(&self, b: &Boot) -> Result<Launch> {
        let Boot { job, s, boot, built, logs, media, .. } = *b;
        let config = &job.config.name;
        let serial_path = logs.join(format!("{}.serial.log", file_stem(job, boot)));
        let emulator_log = logs.join(format!("{}.qemu.log", file_stem(job, boot)));
        let mut qemu = emulator::QemuBoot::new(&built.hypervisor, s.cmdline(config, boot), &built.archive, "stdio");
        qemu.cpus = s.cpus(config);
        qemu.disk = media.disk.as_ref().map(|(path, _)| path.as_path());
        qemu.pmem = media.pmem.as_ref().map(|(path, size)| (path.as_path(), *size));
        let monitor = crate::hang::monitor_path(MONITORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let _ = std::fs::remove_file(&monitor);
        qemu.extra.extend(crate::hang::monitor_args(&monitor));
        let mut cmd = emulator::qemu_command(&job.config, job.accel, &qemu)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&emulator_log).context(|| format!("cannot create {}", emulator_log.display()))?);
        Ok(Launch { cmd, serial_path, emulator_log, monitor: Some(monitor) })
    }

    fn boot(&self, b: &Boot, launch: Launch) -> Result<Outcome> {
        run_qemu(b.job, b.s, b.boot, launch, b.built)
    }

    fn judge(&self, end: End, _serial: &str) -> std::result::Result<ExitKind, String> {
        match end {
            End::Exited(Some(QEMU_EXIT_SUCCESS)) => Ok(ExitKind::Success),
            End::Exited(Some(QEMU_EXIT_FAILURE)) => Ok(ExitKind::Failure),
            End::Exited(Some(0)) => Err("QEMU exited 0: reset or triple fault (-no-reboot), not isa-debug-exit".into()),
            End::Exited(Some(c)) => Err(format!("QEMU exited with status {c}")),
            _ => Err("QEMU was stopped by a signal".to_string()),
        }
    }
}

impl Driver for Bochs {
    fn build_command(&self, b: &Boot) -> Result<Launch> {
        let Boot { root, job, s, boot, built, logs, .. } = *b;
        if job.scenario.disk.is_some() || job.scenario.pmem.is_some() {
            bail!("`disk` and `pmem` need a QEMU config (Bochs has no NVMe or NVDIMM)");
        }
        let config = &job.config.name;
        let stem = file_stem(job, boot);
        let iso = images::make_iso(built, &stem, s.cmdline(config, boot))?;
        let serial_path = logs.join(format!("{stem}.serial.log"));
        let emulator_log = logs.join(format!("{stem}.bochs.log"));
        let rc = logs.join(format!("{stem}.bochsrc"));
        let _ = std::fs::remove_file(&serial_path);
        emulator::write_bochsrc(&job.config, &iso, &serial_path, &rc, s.cpus(config))?;
        let log = std::fs::File::create(&emulator_log).context(|| format!("cannot create {}", emulator_log.display()))?;
        let mut cmd = emulator::bochs_command(root, &rc, true)?;
        cmd.current_dir(logs)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context(|| "cannot dup log".to_string())?)
            .stderr(log);
        Ok(Launch { cmd, serial_path, emulator_log, monitor: None })
    }

    fn boot(&self, b: &Boot, launch: Launch) -> Result<Outcome> {
        run_bochs(b.job, b.s, b.boot, launch)
    }

    /// Bochs always exits 1: the last `parperos: exit` line of the serial log says.
    fn judge(&self, _end: End, serial: &str) -> std::result::Result<ExitKind, String> {
        let last = serial.lines().rev().find_map(|l| {
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
}

fn run_qemu(job: &Job, s: &Scenario, boot: usize, launch: Launch, built: &images::Built) -> Result<Outcome> {
    let config = &job.config.name;
    let Launch { cmd, serial_path, emulator_log, monitor } = launch;
    let file = std::fs::File::create(&serial_path).context(|| format!("cannot create {}", serial_path.display()))?;
    let mut m = Machine::spawn(cmd, SerialFrom::Stdout)?;
    let mut log = SerialLog::new(file, m.started, s.kill(boot).map(str::to_string));
    let delay = s.kill_delay(boot, job.seed);
    let start = m.started;
    let mut hang = Vec::new();
    let supervised = supervise(
        &mut m,
        start + s.timeout(config, boot),
        |new| {
            log.add(new);
            log.kill_seen.map(|at| at + delay)
        },
        || hang = registers_at_timeout(monitor.as_deref(), built, s.cmdline(config, boot)),
    );
    if let Some(path) = &monitor {
        let _ = std::fs::remove_file(path);
    }
    let wall = m.started.elapsed();
    log.add(&m.serial_rest());
    let end = supervised?;
    Ok(Outcome {
        hang,
        wall,
        ready: log.ready,
        end,
        kill_delay: delay,
        killed: end == End::Stopped,
        serial: String::from_utf8_lossy(&log.all).into_owned(),
        serial_path,
        emulator_log,
    })
}

fn run_bochs(job: &Job, s: &Scenario, boot: usize, launch: Launch) -> Result<Outcome> {
    let config = &job.config.name;
    let Launch { cmd, serial_path, emulator_log, .. } = launch;
    let read = |path: &Path| std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let mut m = Machine::spawn_bochs(&crate::root(), cmd, serial_path.clone(), Some(&emulator_log))?;
    let start = m.started;
    let mut ready = None;
    let mut ended_at: Option<Instant> = None;
    let mut kill_at: Option<Instant> = None;
    let delay = s.kill_delay(boot, job.seed);
    let mut all = Vec::new();
    let supervised = supervise(&mut m, start + s.timeout(config, boot), |new| {
        // Look at the text only when the serial file grew.
        if !new.is_empty() {
            all.extend_from_slice(new);
            let text = String::from_utf8_lossy(&all);
            if ready.is_none() && text.contains(READY_LINE) {
                ready = Some(start.elapsed());
            }
            if ended_at.is_none() && (text.contains(EXIT_SUCCESS_LINE) || text.contains(EXIT_FAILURE_LINE)) {
                ended_at = Some(Instant::now());
            }
            if kill_at.is_none() && s.kill(boot).is_some_and(|k| text.contains(k)) {
                kill_at = Some(Instant::now() + delay);
            }
        }
        [ended_at.map(|t| t + BOCHS_GRACE), kill_at].into_iter().flatten().min()
    }, || {});
    let wall = start.elapsed();
    let end = supervised?;
    let serial = read(&serial_path);
    if ready.is_none() && serial.contains(READY_LINE) {
        ready = Some(wall); // appeared after the last poll
    }
    // Stopped: by the kill if that came before the grace time after the exit line ran out.
    let killed = end == End::Stopped && kill_at.is_some_and(|k| ended_at.is_none_or(|e| k <= e + BOCHS_GRACE));
    Ok(Outcome { wall, ready, end, kill_delay: delay, killed, serial, serial_path, emulator_log, hang: Vec::new() })
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
    fn a_filter_that_matches_nothing_is_an_error_listing_what_exists() {
        let labels = vec!["boot_ready [qemu-svm]".to_string(), "boot_ready [bochs-vmx]".into(), "demo [qemu-svm]".into()];
        let m = no_match(Some("NOPE"), &labels, 0).expect("an error");
        assert!(m.contains("`NOPE`") && m.contains("boot_ready, demo") && m.contains("bochs-vmx, qemu-svm"), "{m}");
        assert_eq!(no_match(Some("boot"), &labels, 2), None);
        assert_eq!(no_match(Some("host"), &labels, 0), None);
        assert_eq!(no_match(None, &labels, 0), None);
        // The shipped scenarios: a typo matches nothing, a real name something.
        let (scenarios, _) = load_scenarios(&crate::root()).unwrap();
        let all = all_labels(&scenarios);
        assert!(all.iter().any(|l| l.contains("boot_ready")));
        assert!(!all.iter().any(|l| l.contains("NOPE")));
    }

    #[test]
    fn junit_report() {
        let x = junit_xml(&[
            ("boot_ready [qemu-svm]".into(), true, "   0.20 s  boot 0.09 s".into(), String::new()),
            ("host: loom".into(), false, "  12.00 s".into(), "    a <b> & \x1b[2Jc\n".into()),
        ]);
        assert!(x.contains("tests=\"2\" failures=\"1\""), "{x}");
        assert!(x.contains("<testcase classname=\"qemu-svm\" name=\"boot_ready\" time=\"0.20\"></testcase>"), "{x}");
        assert!(x.contains("<failure message=\"a &lt;b&gt; &amp; c\">    a &lt;b&gt; &amp; c\n</failure>"), "{x}");
        let o = Options::parse(&["--junit".into(), "r.xml".into()]).unwrap();
        assert_eq!(o.junit, Some(PathBuf::from("r.xml")));
        let o = Options::parse(&["--accel".into(), "kvm".into(), "--guest".into(), "a/app:arg=1".into(), "--guest=b".into()]).unwrap();
        assert_eq!(o.accel, Some(Accel::Kvm));
        assert_eq!(o.guests, [(PathBuf::from("a/app"), ":arg=1".to_string()), (PathBuf::from("b"), String::new())]);
        assert!(Options::parse(&["--guest".into(), "x".into(), "demo".into()]).is_err(), "no FILTER with --guest");
        assert!(Options::parse(&["--acel".into()]).err().unwrap().0.contains("did you mean `--accel`"));
    }

    #[test]
    fn options() {
        let o = Options::parse(&["boot".into(), "-j3".into()]).unwrap();
        assert_eq!((o.filter.as_deref(), o.jobs), (Some("boot"), 3));
        assert!(Options::parse(&["-j".into(), "0".into()]).is_err());
        assert!(Options::parse(&["a".into(), "b".into()]).is_err());
    }

    #[test]
    fn kill_text_is_seen_across_reads() {
        // The output in small pieces, as a pipe may hand it out.
        let path = std::env::temp_dir().join(format!("parperos-serial-{}.log", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let mut log = SerialLog::new(file, Instant::now(), Some("pm: writing".into()));
        for piece in [&b"parperos: re"[..], b"ady\npm: wri", b"", b"ting\n"] {
            log.add(piece);
        }
        let first = log.kill_seen.expect("the kill text across two pieces");
        log.add(b"pm: writing\n");
        assert!(log.ready.is_some());
        assert_eq!(log.kill_seen, Some(first), "the first time counts");
        assert_eq!(std::fs::read(&path).unwrap(), log.all);
        let _ = std::fs::remove_file(path);
        assert!(appeared(b"abcdef", 4, b"cde") && !appeared(b"abcdef", 5, b"abc"));
    }

    #[test]
    fn only_a_bochs_that_printed_nothing_is_run_again() {
        let log = "00000000000i[RFB   ] Trying port 5900\n00000000000p[RFB   ] >>PANIC<< RFB could not bind any port between 5900 and 5949\n";
        assert_eq!(start_panic(b"", log).as_deref(), Some("00000000000p[RFB   ] >>PANIC<< RFB could not bind any port between 5900 and 5949"));
        assert_eq!(start_panic(b"GRUB", log), None, "the guest printed: its failure is its own");
        assert_eq!(start_panic(b"", "00000000000i[RFB   ] listening for connections on port 5900\n"), None, "no panic: a hang");
    }

    #[test]
    fn only_the_diagnosed_emulator_fault_is_run_again() {
        let fault = "    | [  3.88] ERROR vm: guest 10 (names) stopped by an emulator or hypervisor fault, not its own: exit 0x400 came back with the host's state in place of the guest's";
        assert!(met_emulator_fault(fault));
        assert!(!met_emulator_fault("    | [  3.88] ERROR vm: guest 10 (names) stopped: unhandled exception 14 #PF"));
        assert!(!met_emulator_fault("    timed out after 120 s (stopped)"));
    }

    #[test]
    fn bochs_runs_are_queued_first_in_scenario_order() {
        let text = "description = d\nconfigs = qemu-svm bochs-vmx bochs-svm\ncmdline = guests=hello\n";
        let jobs: Vec<Job> = ["a", "b"]
            .iter()
            .flat_map(|name| {
                let s = scenario::parse(name, Path::new("(test)"), text).unwrap();
                s.configs.clone().into_iter().map(move |c| Job {
                    scenario: s.clone(),
                    config: Config::resolve(&crate::root(), &c).unwrap(),
                    label: format!("{name} [{c}]"),
                    seed: 0,
                    accel: Accel::Tcg,
                })
            })
            .collect();
        let order: Vec<String> = queue_order(jobs).into_iter().map(|j| j.label).collect();
        assert_eq!(order, ["a [bochs-vmx]", "a [bochs-svm]", "b [bochs-vmx]", "b [bochs-svm]", "a [qemu-svm]", "b [qemu-svm]"]);
    }

    #[test]
    fn supervise_kills_when_asked_and_waits() {
        let sleep = || {
            let mut c = Command::new("sleep");
            c.arg("30");
            Machine::spawn(c, SerialFrom::Nothing).unwrap()
        };
        let mut m = sleep();
        let start = Instant::now();
        let stop = start + Duration::from_millis(50);
        let end = supervise(&mut m, start + Duration::from_secs(20), |_| Some(stop), || {}).unwrap();
        assert_eq!(end, End::Stopped);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(50) && took < Duration::from_secs(5), "{took:?}");
        assert!(m.try_wait().unwrap().is_some(), "reaped");
        let mut m = sleep();
        let mut asked = 0;
        let end = supervise(&mut m, Instant::now() + Duration::from_millis(30), |_| None, || asked += 1).unwrap();
        assert_eq!(end, End::TimedOut);
        assert_eq!(asked, 1, "a timeout asks for the registers once, before the kill");
        let mut m = Machine::spawn(Command::new("true"), SerialFrom::Nothing).unwrap();
        assert_eq!(supervise(&mut m, Instant::now() + Duration::from_secs(20), |_| None, || panic!("no timeout")).unwrap(), End::Exited(Some(0)));
    }
}
