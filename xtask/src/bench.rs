//! `cargo xtask bench [allocator|morsel|exmap] [--rounds N] [--docs]`: runs the host
//! benchmarks the READMEs quote (release builds of each crate's `examples/bench.rs`), in
//! interleaved rounds, and reports medians in one table format, as CSV under `build/bench/`
//! and as SVG plots drawn here (no plotting crate, no fonts: plain SVG text); `--docs` also
//! copies the plots to `docs/src/bench/`, where the book's Benchmarks chapter shows them.
//! Every CSV row and every plot's footer says what ran where (`Provenance`): date, commit,
//! the host's CPU count and its load average before and after.

use crate::{bail, images, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

pub const BENCHES: &[&str] = &["allocator", "morsel", "exmap"];
const OUT_DIR: &str = "build/bench";
const DOCS_DIR: &str = "docs/src/bench";
const DEFAULT_ROUNDS: usize = 5;
/// The allocator patterns of the LLFree paper, each at 4 KiB and 2 MiB, at 1 and 2 threads.
const PATTERNS: &[&str] = &["bulk", "repeat", "random"];
const ORDERS: &[(u8, &str)] = &[(0, "4 KiB"), (9, "2 MiB")];
/// Morsel sizes for the mount-cost plot (2 MiB pages).
const MORSEL_SIZES: &str = "2M,8M,32M,128M,512M,1G,4G,16G,64G";
/// Mount+unmount pairs per morsel size and round (the example's default is 4 Mi).
const MORSEL_OPS: &str = "1048576";

pub struct Options {
    pub benches: Vec<&'static str>,
    /// `smp`: the in-emulator SMP bench (`bench_smp`), only when named.
    pub smp: bool,
    /// `ipc`: the in-emulator ping-pong and idle bench (`bench_ipc`), only when named.
    pub ipc: bool,
    /// `bufmgr`: the in-emulator buffer manager bench (`bench_bufmgr`), only when named.
    pub bufmgr: bool,
    /// `smp-bochs`: only the Bochs part of `smp` (`bench_smp::bochs`), only when named.
    pub smp_bochs: bool,
    /// `--log LEVEL`: the hypervisor's log level for `smp-bochs` (default `warn`).
    pub log: String,
    /// `exits`: Bochs ticks per null exit (`bench_smp::bench_exits`), only when named.
    pub exits: bool,
    /// `exmap-smp`: Bochs ticks per ExMap page on 1, 2, 4 CPUs (`bench_exmap_smp`), only when named.
    pub exmap_smp: bool,
    /// `--cpus 1,2`: the CPU counts `exmap-smp` boots (default 1, 2, 4).
    pub cpus: Vec<usize>,
    /// `--configs c`: the `exmap-smp` configurations booted past 1 CPU (default `abc`).
    pub configs: String,
    /// `--probe`: `exmap-smp` with the hypervisor's phase counters (feature `percall-probe`).
    pub probe: bool,
    pub rounds: usize,
    pub docs: bool,
    /// `--upstream PATH`: a checkout of upstream llfree-rs (outside this repository); the
    /// allocator bench then also measures it, side by side in the same process.
    pub upstream: Option<PathBuf>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options { benches: Vec::new(), smp: false, smp_bochs: false, log: "warn".into(), ipc: false, bufmgr: false, exits: false, exmap_smp: false, cpus: vec![1, 2, 4], configs: "abc".into(), probe: false, rounds: DEFAULT_ROUNDS, docs: false, upstream: None };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--docs" => o.docs = true,
                "--log" => {
                    o.log = match it.next() {
                        Some(l) if ["error", "warn", "info", "debug"].contains(&l.as_str()) => l.clone(),
                        _ => bail!("`--log` wants error, warn, info or debug"),
                    }
                }
                "--probe" => o.probe = true,
                "--rounds" => {
                    o.rounds = match it.next().map(|v| v.parse::<usize>()) {
                        Some(Ok(n)) if n >= 1 => n,
                        _ => bail!("`--rounds` wants a number of rounds, at least 1"),
                    }
                }
                "--cpus" => {
                    let list = it.next().map(|v| v.split(',').map(str::parse::<usize>).collect::<std::result::Result<Vec<_>, _>>());
                    o.cpus = match list {
                        Some(Ok(l)) if l.contains(&1) && l.iter().all(|&n| (1..=64).contains(&n)) => l,
                        _ => bail!("`--cpus` wants CPU counts such as 1,2 (1 among them: the baseline)"),
                    }
                }
                "--configs" => {
                    o.configs = match it.next() {
                        Some(c) if !c.is_empty() && c.chars().all(|c| "abc".contains(c)) => c.clone(),
                        _ => bail!("`--configs` wants some of a, b, c (`exmap-smp`'s configurations)"),
                    }
                }
                "--upstream" => match it.next() {
                    Some(p) => o.upstream = Some(PathBuf::from(p)),
                    None => bail!("`--upstream` wants the path of a llfree-rs checkout"),
                },
                "smp" => o.smp = true,
                "smp-bochs" => o.smp_bochs = true,
                "ipc" => o.ipc = true,
                "bufmgr" => o.bufmgr = true,
                "exits" => o.exits = true,
                "exmap-smp" => o.exmap_smp = true,
                name => match BENCHES.iter().find(|b| **b == name) {
                    Some(b) if !o.benches.contains(b) => o.benches.push(b),
                    Some(_) => bail!("`{name}` named twice"),
                    None => bail!("`bench` takes allocator, morsel, exmap, smp, smp-bochs, ipc, bufmgr, exits or exmap-smp, --rounds N, --docs (got `{name}`)"),
                },
            }
        }
        if o.benches.is_empty() && !o.smp && !o.smp_bochs && !o.ipc && !o.bufmgr && !o.exits && !o.exmap_smp {
            o.benches = BENCHES.to_vec();
        }
        Ok(o)
    }
}

/// One measured figure of one run: which benchmark, which case, how many threads, which
/// implementation (ours or the comparison), its unit, and the value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub bench: &'static str,
    pub case: String,
    pub threads: u32,
    pub imp: String,
    pub unit: &'static str,
    pub value: f64,
    /// Where the bench took its own median over runs (exmap): how many; None: one run.
    pub runs: Option<usize>,
}

/// The figures of one key over every round: median, min and max.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub bench: &'static str,
    pub case: String,
    pub threads: u32,
    pub imp: String,
    pub unit: &'static str,
    pub values: Vec<f64>,
    /// The runs behind `values` where that is not one per value (exmap's min, median, max).
    pub runs: Option<usize>,
}

impl Row {
    pub fn median(&self) -> f64 {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    pub fn runs(&self) -> usize {
        self.runs.unwrap_or(self.values.len())
    }
    fn min(&self) -> f64 {
        self.values.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Groups samples by (bench, case, threads, implementation, unit), in the order first seen.
pub fn collect(samples: &[Sample]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for s in samples {
        match rows.iter_mut().find(|r| r.bench == s.bench && r.case == s.case && r.threads == s.threads && r.imp == s.imp && r.unit == s.unit) {
            Some(r) => r.values.push(s.value),
            None => rows.push(Row {
                bench: s.bench,
                case: s.case.clone(),
                threads: s.threads,
                imp: s.imp.clone(),
                unit: s.unit,
                values: vec![s.value],
                runs: s.runs,
            }),
        }
    }
    rows
}

/// What ran where: when, which commit, the host's CPU count and its 1-minute load average
/// before and after the run. Written into every CSV row and every plot's footer.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// `2026-12-06 05:40 UTC`.
    pub date: String,
    /// `git rev-parse --short HEAD`, `+dirty` if tracked files differ from it.
    pub commit: String,
    pub cpus: usize,
    pub load_start: f64,
    pub load_end: f64,
    pub rounds: usize,
}

impl Provenance {
    /// Taken when the run starts (date, commit, load); `load_end` is set when it ends.
    fn start(root: &Path, rounds: usize) -> Provenance {
        let git = |args: &[&str]| {
            Command::new("git").arg("-C").arg(root).args(args).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let mut commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
            commit.push_str("+dirty");
        }
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Provenance {
            date: utc_date(secs),
            commit,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_start: load_average(),
            load_end: f64::NAN,
            rounds,
        }
    }

    /// Busier than the CPUs can serve: the figures are noisy.
    pub fn noisy(&self) -> bool {
        self.load_start.max(self.load_end) > self.cpus as f64
    }

    /// One line for a plot's footer or the console.
    pub fn describe(&self) -> String {
        format!(
            "{}, commit {}, {} host CPU{}, load average {:.1} before, {:.1} after{}",
            self.date,
            self.commit,
            self.cpus,
            if self.cpus == 1 { "" } else { "s" },
            self.load_start,
            self.load_end,
            if self.noisy() { " (more than the CPUs: noisy)" } else { "" }
        )
    }
}

/// The 1-minute load average (`/proc/loadavg`'s first field), NaN where there is none.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(f64::NAN)
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time (the civil-from-days algorithm of H. Hinnant).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02} UTC")
}

pub fn bench(o: &Options) -> Result<ExitCode> {
    if o.exits && o.benches.is_empty() && !o.smp && !o.ipc && !o.bufmgr {
        return crate::bench_smp::bench_exits();
    }
    if o.smp_bochs && o.benches.is_empty() && !o.smp && !o.ipc && !o.bufmgr {
        return crate::bench_smp::bench_bochs(&o.log);
    }
    if o.exmap_smp && o.benches.is_empty() && !o.smp && !o.ipc && !o.bufmgr {
        return crate::bench_exmap_smp::bench(&o.cpus, &o.configs, o.probe);
    }
    if [o.smp, o.ipc, o.bufmgr].iter().filter(|&&b| b).count() > 1 {
        bail!("`bench smp`, `bench ipc` and `bench bufmgr` run one at a time (each boots QEMU)");
    }
    if o.bufmgr && o.benches.is_empty() {
        return crate::bench_bufmgr::bench(o.rounds.min(3));
    }
    if o.smp && o.benches.is_empty() {
        return crate::bench_smp::bench(o.rounds.min(3));
    }
    if o.ipc && o.benches.is_empty() {
        return crate::bench_ipc::bench(o.rounds.min(5));
    }
    if o.smp || o.ipc || o.bufmgr {
        bail!("`bench smp` and `bench ipc` run on their own (they boot QEMU): `cargo xtask bench smp`, `cargo xtask bench ipc`");
    }
    let root = crate::root();
    let mut prov = Provenance::start(&root, o.rounds);
    let mut exes = Vec::new();
    for &b in &o.benches {
        let exe = match (b, &o.upstream) {
            ("allocator", Some(up)) => build_side_by_side(&root, up)?,
            _ => build_example(&root, b)?,
        };
        exes.push((b, exe));
    }
    let mut samples = Vec::new();
    // Rounds interleave the benchmarks (and the allocator's patterns), so a noisy moment on
    // this shared machine spreads over all of them instead of spoiling one.
    for round in 1..=o.rounds {
        for (b, exe) in &exes {
            match *b {
                "allocator" => {
                    for p in PATTERNS {
                        for (order, _) in ORDERS {
                            let out = run(exe, &["--threads", "1,2", "--order", &order.to_string(), "--memory", "8", "--pattern", p, "--runs", "1"])?;
                            samples.extend(parse_allocator(&out)?);
                        }
                    }
                }
                "morsel" => samples.extend(parse_morsel(&run(exe, &[MORSEL_OPS, "--sizes", MORSEL_SIZES])?)?),
                // ExMap's bench interleaves its own cases over `--rounds` runs: run it once with
                // that count (so --rounds is honoured), then count instructions per page of each
                // case under callgrind.
                "exmap" if round == 1 => {
                    samples.extend(parse_exmap(&run(exe, &["--rounds", &o.rounds.to_string()])?)?);
                    samples.extend(exmap_instructions(exe)?);
                }
                _ => {}
            }
        }
        eprintln!("bench: round {round} of {} done", o.rounds);
    }
    let rows = collect(&samples);
    prov.load_end = load_average();
    print!("{}", table(&rows));
    let out = root.join(OUT_DIR);
    std::fs::create_dir_all(&out).context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    for &b in &o.benches {
        let mine: Vec<Row> = rows.iter().filter(|r| r.bench == b).cloned().collect();
        let csv_path = out.join(format!("{b}.csv"));
        images::write_atomic(&csv_path, csv(&mine, &prov).as_bytes())?;
        written.push(csv_path);
        let svg = match b {
            "allocator" => allocator_svg(&mine, &prov),
            "morsel" => morsel_svg(&mine, &prov),
            _ => exmap_svg(&mine, &prov),
        };
        let svg_path = out.join(format!("{b}.svg"));
        images::write_atomic(&svg_path, svg.as_bytes())?;
        written.push(svg_path.clone());
        if o.docs {
            let doc = root.join(DOCS_DIR).join(format!("{b}.svg"));
            std::fs::create_dir_all(root.join(DOCS_DIR)).context(|| format!("cannot create {DOCS_DIR}"))?;
            images::write_atomic(&doc, svg.as_bytes())?;
            written.push(doc);
        }
    }
    let names: Vec<String> = written.iter().map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string()).collect();
    println!("\nmedian of {} interleaved round(s); {}", o.rounds, prov.describe());
    println!("wrote {}", names.join(", "));
    Ok(ExitCode::SUCCESS)
}

/// Builds `krate`'s bench example and copies it to `build/bench/bin/<krate>-bench`: the three
/// crates' examples are all called `bench` and share the `target/release/examples/bench` link.
fn build_example(root: &Path, krate: &str) -> Result<PathBuf> {
    let out = images::cargo(root)
        .args(["build", "--release", "-p", krate, "--example", "bench", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context(|| "cannot start cargo".to_string())?;
    if !out.status.success() {
        bail!("building the {krate} bench failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(exe) = text
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"kind\":[\"example\"]"))
        .filter_map(|l| l.split("\"executable\":\"").nth(1)?.split('"').next().map(str::to_string))
        .next_back()
    else {
        bail!("cargo did not say where the {krate} bench is");
    };
    let bin = root.join(OUT_DIR).join("bin");
    std::fs::create_dir_all(&bin).context(|| format!("cannot create {}", bin.display()))?;
    let copy = bin.join(format!("{krate}-bench"));
    std::fs::copy(&exe, &copy).context(|| format!("cannot copy {exe} to {}", copy.display()))?;
    Ok(copy)
}

/// Builds the allocator bench with upstream llfree-rs beside ours (`--cfg llfree_upstream`) in a
/// harness crate next to the checkout, `<checkout>/../parperos-llfree-side-by-side`, so that
/// nothing of upstream is built or kept inside this repository; returns the binary.
fn build_side_by_side(root: &Path, upstream: &Path) -> Result<PathBuf> {
    let up = upstream.canonicalize().context(|| format!("no llfree-rs checkout at {}", upstream.display()))?;
    let core = up.join("core");
    if !core.join("Cargo.toml").is_file() {
        bail!("{} is not a llfree-rs checkout (no core/Cargo.toml)", up.display());
    }
    let root = root.canonicalize().context(|| "cannot resolve the repository root".to_string())?;
    if up.starts_with(&root) {
        bail!("the llfree-rs checkout must lie outside this repository (got {})", up.display());
    }
    let harness = up.parent().unwrap_or(&up).join("parperos-llfree-side-by-side");
    std::fs::create_dir_all(&harness).context(|| format!("cannot create {}", harness.display()))?;
    let lit = |p: &Path| format!("{:?}", p.display().to_string());
    let manifest = format!(
        "[package]\nname = \"llfree-side-by-side\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[workspace]\n\n\
         [dependencies]\nallocator = {{ path = {} }}\nllfree = {{ path = {} }}\nlibc = \"0.2\"\n\n\
         [[bin]]\nname = \"bench\"\npath = \"main.rs\"\n\n\
         # The same release profile as this repository's, for both allocators.\n\
         [profile.release]\npanic = \"abort\"\ndebug = 1\n\n\
         [lints.rust]\nunexpected_cfgs = {{ level = \"warn\", check-cfg = ['cfg(llfree_upstream)'] }}\n",
        lit(&root.join("allocator")),
        lit(&core)
    );
    let main = format!(
        "// Generated by `cargo xtask bench allocator --upstream`: the repository's allocator bench.\n\
         #[path = {}]\nmod bench;\nfn main() {{\n    bench::main()\n}}\n",
        lit(&root.join("allocator/examples/bench.rs"))
    );
    images::write_atomic(&harness.join("Cargo.toml"), manifest.as_bytes())?;
    images::write_atomic(&harness.join("main.rs"), main.as_bytes())?;
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--quiet"])
        .current_dir(&harness)
        .env("RUSTFLAGS", "--cfg llfree_upstream")
        .env("CARGO_TARGET_DIR", harness.join("target"))
        .status()
        .context(|| "cannot start cargo".to_string())?;
    if !status.success() {
        bail!("building the side-by-side bench in {} failed", harness.display());
    }
    let commit = Command::new("git").arg("-C").arg(&up).args(["rev-parse", "--short", "HEAD"]).output().ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown commit".into());
    eprintln!("bench: upstream llfree-rs {} at {commit}, built beside ours in {}", up.display(), harness.display());
    Ok(harness.join("target/release/bench"))
}

fn run(exe: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(exe).args(args).output().context(|| format!("cannot start {}", exe.display()))?;
    if !out.status.success() {
        bail!("{} {} failed: {}", exe.display(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The allocator bench's lines: a `pattern P, order O, ...` header, then
/// `T  llfree-pp|spinlock  GET PUT  MOPS` (or `T  who  PAIR  MOPS` for `repeat`).
pub fn parse_allocator(out: &str) -> Result<Vec<Sample>> {
    let mut pattern = None;
    let mut size = None;
    let mut samples = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("pattern ") {
            let mut words = rest.split([',', ' ']).filter(|w| !w.is_empty());
            pattern = words.next().map(str::to_string);
            size = match words.nth(1) {
                Some("0") => Some("4 KiB"),
                Some("9") => Some("2 MiB"),
                _ => None,
            };
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let imp = match w.get(1) {
            Some(&"llfree-pp") => "ours",
            Some(&"spinlock") => "spinlock",
            Some(&"llfree-rs") => "llfree-rs (upstream)",
            _ => continue,
        };
        let (Some(p), Some(sz), Ok(threads)) = (&pattern, size, w[0].parse::<u32>()) else {
            bail!("allocator bench: a result line before its header: `{line}`");
        };
        let num = |i: usize| w.get(i).and_then(|v| v.parse::<f64>().ok());
        let mut push = |op: &str, unit: &'static str, v: Option<f64>| match v {
            Some(value) => {
                samples.push(Sample { bench: "allocator", case: format!("{p} {sz} {op}"), threads, imp: imp.into(), unit, value, runs: None });
                Ok(())
            }
            None => bail!("allocator bench: cannot read `{line}`"),
        };
        if p == "repeat" {
            push("get+put", "ns/pair", num(2))?;
        } else {
            push("get", "ns/op", num(2))?;
            push("put", "ns/op", num(3))?;
        }
    }
    if samples.is_empty() {
        bail!("allocator bench: no result lines in its output");
    }
    Ok(samples)
}

/// The morsel bench's table rows: `| 2 MiB | pages | tables | mount | unmount | writes |
/// map-all | teardown | writes | ratio |`.
pub fn parse_morsel(out: &str) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for line in out.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 10 || !(cells[0].ends_with("MiB") || cells[0].ends_with("GiB")) {
            continue;
        }
        let f = |i: usize| cells[i].parse::<f64>().map_err(|_| crate::Error(format!("morsel bench: cannot read `{line}`")));
        for (imp, unit, value) in [
            ("mount", "ns/op", f(3)?),
            ("unmount", "ns/op", f(4)?),
            ("map page by page", "ns/object", f(6)?),
            ("teardown", "ns/object", f(7)?),
        ] {
            samples.push(Sample { bench: "morsel", case: cells[0].to_string(), threads: 1, imp: imp.into(), unit, value, runs: None });
        }
    }
    if samples.is_empty() {
        bail!("morsel bench: no table rows in its output");
    }
    Ok(samples)
}

/// Bytes of a morsel size as the bench prints it (`2 MiB`, `64 GiB`).
pub fn size_bytes(case: &str) -> Option<u64> {
    let (n, unit) = case.split_once(' ')?;
    let n: u64 = n.parse().ok()?;
    match unit {
        "MiB" => Some(n << 20),
        "GiB" => Some(n << 30),
        _ => None,
    }
}

/// The exmap bench's lines: a header `... median of N interleaved runs`, then
/// `NAME ORDER batch B, T thread(s): X ns/page (per thread; runs A..B)` (ORDER `sorted` or
/// `wrapping`): the median it took over its N runs, with the runs' extremes (three values,
/// so min, median and max come out as printed).
pub fn parse_exmap(out: &str) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let runs = out.split("median of ").nth(1).and_then(|r| r.split_whitespace().next()?.parse::<usize>().ok());
    for line in out.lines() {
        let Some((name, rest)) = line.split_once(": ") else { continue };
        let Some((median, range)) = rest.split_once(" ns/page") else { continue };
        let bad = || crate::Error(format!("exmap bench: cannot read `{line}`"));
        let (case, threads, imp) = exmap_case(name).ok_or_else(bad)?;
        let median: f64 = median.trim().parse().map_err(|_| bad())?;
        let (lo, hi) = range
            .split("runs ")
            .nth(1)
            .and_then(|r| r.trim_end_matches(')').split_once(".."))
            .and_then(|(a, b)| Some((a.parse::<f64>().ok()?, b.parse::<f64>().ok()?)))
            .ok_or_else(bad)?;
        for value in [lo, median, hi] {
            samples.push(Sample { bench: "exmap", case: case.clone(), threads, imp: imp.into(), unit: "ns/page", value, runs });
        }
    }
    if samples.is_empty() {
        bail!("exmap bench: no result lines in its output");
    }
    Ok(samples)
}

/// `(case, threads, implementation)` of an exmap bench case name (`exmap alloc+free sorted
/// batch 64, 2 threads`): case `alloc+free sorted batch 64`.
fn exmap_case(name: &str) -> Option<(String, u32, &'static str)> {
    let (what, threads) = name.rsplit_once(", ")?;
    let (imp, batch) = what.rsplit_once(" batch ")?;
    let threads: u32 = threads.split_whitespace().next()?.parse().ok()?;
    batch.parse::<u32>().ok()?;
    let order = imp.rsplit(' ').next().filter(|o| *o == "sorted" || *o == "wrapping")?;
    // The per-page path has no batches (an allocator call per page): a case of its own.
    if imp.starts_with("per-page") {
        return Some((format!("per-page path {order}"), threads, "per-page path"));
    }
    Some((format!("alloc+free {order} batch {batch}"), threads, "exmap"))
}

/// The cases whose instructions per page `exmap_instructions` counts, as the bench's
/// `--case` takes them.
pub const EXMAP_CASES: &[&str] = &[
    "1,1,wrapping,exmap", "64,1,wrapping,exmap", "512,1,wrapping,exmap", "1,2,wrapping,exmap", "64,2,wrapping,exmap", "512,2,wrapping,exmap",
    "1,1,sorted,exmap", "64,1,sorted,exmap", "512,1,sorted,exmap", "1,2,sorted,exmap", "64,2,sorted,exmap", "512,2,sorted,exmap",
    "512,1,wrapping,per-page", "512,2,wrapping,per-page", "512,1,sorted,per-page", "512,2,sorted,per-page",
];
/// Pages per thread of the two counted runs: their difference cancels the set-up.
const COUNTED_PAGES: (u64, u64) = (20_480, 122_880);

/// Instructions per page of each exmap case, counted by `valgrind --tool=callgrind`
/// (deterministic, unlike ns on this shared machine): each case runs twice, with
/// `COUNTED_PAGES` pages per thread, and the difference of the two totals divided by the
/// difference of the pages is the cost of one page's ALLOC+FREE, set-up and teardown
/// cancelled. Without valgrind: none, with a note.
pub fn exmap_instructions(exe: &Path) -> Result<Vec<Sample>> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("bench: valgrind not found: no instruction counts for exmap (apt-get install valgrind)");
        return Ok(Vec::new());
    }
    let mut samples = Vec::new();
    for case in EXMAP_CASES {
        let mut total = [0u64; 2];
        for (k, pages) in [COUNTED_PAGES.0, COUNTED_PAGES.1].into_iter().enumerate() {
            let out = Command::new("valgrind")
                .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
                .arg(exe)
                .args(["--case", case, "--pages", &pages.to_string(), "--rounds", "1", "--memory", "128"])
                .output()
                .context(|| "cannot start valgrind".to_string())?;
            if !out.status.success() {
                bail!("valgrind {} --case {case} failed: {}", exe.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
            total[k] = parse_collected(&String::from_utf8_lossy(&out.stderr))
                .ok_or_else(|| crate::Error(format!("callgrind said no `Collected :` total for --case {case}")))?;
        }
        let out = run(exe, &["--case", case, "--pages", "512", "--rounds", "1", "--memory", "16"])?;
        let name = out.lines().nth(1).and_then(|l| l.split_once(": ")).map(|(n, _)| n.to_string()).unwrap_or_default();
        let (case_name, threads, imp) = exmap_case(&name).ok_or_else(|| crate::Error(format!("exmap bench: cannot read its case `{name}`")))?;
        let pages = (COUNTED_PAGES.1 - COUNTED_PAGES.0) * threads as u64;
        let value = total[1].saturating_sub(total[0]) as f64 / pages as f64;
        samples.push(Sample { bench: "exmap", case: case_name, threads, imp: imp.into(), unit: "instr/page", value, runs: None });
    }
    Ok(samples)
}

/// The total of callgrind's `==PID== Collected : N` line.
pub fn parse_collected(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| l.split("Collected :").nth(1)?.trim().parse().ok())
}

/// One table for every benchmark: case, threads, implementation, median, min..max, runs.
pub fn table(rows: &[Row]) -> String {
    let w = rows.iter().map(|r| r.case.len()).chain([4]).max().unwrap_or(4);
    let iw = rows.iter().map(|r| r.imp.len()).chain([14]).max().unwrap_or(14);
    let mut t = String::new();
    let _ = writeln!(t, "| bench     | {:<w$} | threads | {:<iw$} | median     | min..max          | runs | unit      |", "case", "implementation");
    let _ = writeln!(t, "|-----------|-{}-|---------|-{}-|------------|-------------------|------|-----------|", "-".repeat(w), "-".repeat(iw));
    for r in rows {
        let _ = writeln!(
            t,
            "| {:<9} | {:<w$} | {:>7} | {:<iw$} | {:>10.1} | {:>17} | {:>4} | {:<9} |",
            r.bench,
            r.case,
            r.threads,
            r.imp,
            r.median(),
            format!("{:.1}..{:.1}", r.min(), r.max()),
            r.runs(),
            r.unit
        );
    }
    t
}

pub fn csv(rows: &[Row], p: &Provenance) -> String {
    let mut t = String::from("bench,case,threads,implementation,unit,median,min,max,runs,date,commit,host_cpus,load_before,load_after\n");
    for r in rows {
        let _ = writeln!(
            t,
            "{},{},{},{},{},{:.2},{:.2},{:.2},{},{},{},{},{:.2},{:.2}",
            r.bench,
            r.case,
            r.threads,
            r.imp,
            r.unit,
            r.median(),
            r.min(),
            r.max(),
            r.runs(),
            p.date,
            p.commit,
            p.cpus,
            p.load_start,
            p.load_end
        );
    }
    t
}

/// Text for SVG: `&`, `<`, `>` escaped.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

const COLORS: &[&str] = &["#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a"];

/// One bar: median with the min..max of its rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bar {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Bar {
    fn of(r: &Row) -> Bar {
        Bar { median: r.median(), min: r.min(), max: r.max() }
    }
}

/// A y axis: linear from 0 where the figures lie within a factor of 20 (bar lengths then mean
/// something), else log over whole decades (then each median is a mark, not a bar from an
/// arbitrary floor).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scale {
    Linear { max: f64 },
    Log { lo: f64, hi: f64 },
}

impl Scale {
    fn fit(values: impl Iterator<Item = f64> + Clone) -> Scale {
        let lo = values.clone().filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
        let hi = values.clone().fold(0.0, f64::max);
        if !lo.is_finite() || hi / lo < 20.0 {
            Scale::Linear { max: nice_ceiling(hi.max(1e-9) * 1.08) }
        } else {
            let (lo, hi) = decades(values);
            Scale::Log { lo, hi }
        }
    }

    /// Where `v` lies, 0.0 (bottom) ..= 1.0 (top).
    fn frac(&self, v: f64) -> f64 {
        match *self {
            Scale::Linear { max } => (v / max).clamp(0.0, 1.0),
            Scale::Log { lo, hi } => ((v.max(10f64.powf(lo)).log10() - lo) / (hi - lo)).clamp(0.0, 1.0),
        }
    }

    /// Grid values: 5 steps on a linear axis, 1-2-5 per decade on a log one.
    fn ticks(&self) -> Vec<(f64, bool)> {
        match *self {
            Scale::Linear { max } => (0..=5).map(|i| (max * i as f64 / 5.0, true)).collect(),
            Scale::Log { lo, hi } => ((lo as i32)..=(hi as i32))
                .flat_map(|e| [1.0, 2.0, 5.0].map(|m| (m * 10f64.powi(e), m == 1.0)))
                .filter(|(v, _)| v.log10() <= hi + 1e-9)
                .collect(),
        }
    }
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|c| *c >= v * (1.0 - 1e-12)).unwrap_or(10.0 * p)
}

/// A grouped bar chart: one group per category (its label on two lines: first word, rest), one
/// bar per series (None: no bar), each with a min..max whisker and its median written above.
/// The plot is as wide as its groups need (at least 560 px), so no part of it stays empty.
fn bar_chart(title: &str, y_label: &str, categories: &[String], series: &[(String, Vec<Option<Bar>>)], notes: &[String]) -> String {
    let (left, top, right) = (70.0, 60.0, 20.0);
    let bottom = 80.0 + 14.0 * notes.len() as f64;
    let per_bar = 30.0;
    let natural = (per_bar * series.len() as f64 + 24.0) * categories.len() as f64;
    // Wide enough for the footer's longest line (10 px sans-serif: about 5.5 px a character).
    let footer_w = notes.iter().map(|n| n.chars().count() as f64 * 5.5).fold(0.0, f64::max) - left - right;
    let plot_w = natural.max(560.0).max(footer_w);
    let group_w = plot_w / categories.len().max(1) as f64;
    let bar_w = ((group_w - 24.0) / series.len().max(1) as f64).min(40.0);
    let width = left + right + plot_w;
    let height = 440.0 + 14.0 * notes.len() as f64;
    let plot_h = height - top - bottom;
    let scale = Scale::fit(series.iter().flat_map(|(_, v)| v.iter().flatten()).flat_map(|b| [b.min, b.median, b.max]).collect::<Vec<_>>().into_iter());
    let y = |v: f64| top + plot_h * (1.0 - scale.frac(v));
    let base = top + plot_h;
    let mut s = svg_head(width, height, title);
    let scale_name = match scale {
        Scale::Linear { .. } => "",
        Scale::Log { .. } => ", log scale",
    };
    let _ = writeln!(s, r#"<text x="14" y="{:.0}" transform="rotate(-90 14 {:.0})" text-anchor="middle">{}{}</text>"#, top + plot_h / 2.0, top + plot_h / 2.0, esc(y_label), scale_name);
    for (v, major) in scale.ticks() {
        let stroke = if major { "#ccc" } else { "#eee" };
        let _ = writeln!(s, r#"<line x1="{left}" x2="{:.0}" y1="{:.1}" y2="{:.1}" stroke="{stroke}"/><text x="{:.0}" y="{:.1}" text-anchor="end" font-size="10">{}</text>"#, width - right, y(v), y(v), left - 6.0, y(v) + 4.0, fmt_num(v));
    }
    for (c, cat) in categories.iter().enumerate() {
        let present = series.iter().filter(|(_, v)| v[c].is_some()).count();
        // The group's bars side by side, centred in the group.
        let x0 = left + group_w * c as f64 + (group_w - bar_w * present as f64) / 2.0;
        let mut k_in_group = 0;
        for (k, (name, values)) in series.iter().enumerate() {
            let Some(b) = values[c] else { continue };
            let x = x0 + bar_w * k_in_group as f64;
            k_in_group += 1;
            let (w, cx) = (bar_w - 4.0, x + (bar_w - 4.0) / 2.0);
            let tip = esc(&format!("{cat}, {name}: median {:.1}, min {:.1}, max {:.1}", b.median, b.min, b.max));
            match scale {
                Scale::Linear { .. } => {
                    let _ = writeln!(s, r#"<rect x="{x:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{tip}</title></rect>"#, y(b.median), base - y(b.median), COLORS[k % COLORS.len()]);
                }
                Scale::Log { .. } => {
                    let _ = writeln!(s, r#"<rect x="{:.1}" y="{:.1}" width="{w:.1}" height="5" fill="{}"><title>{tip}</title></rect>"#, x, y(b.median) - 2.5, COLORS[k % COLORS.len()]);
                }
            }
            // The min..max whisker.
            let _ = writeln!(
                s,
                r##"<path d="M{cx:.1},{:.1}V{:.1}M{:.1},{:.1}h6M{:.1},{:.1}h6" stroke="#333" fill="none"/>"##,
                y(b.min),
                y(b.max),
                cx - 3.0,
                y(b.min),
                cx - 3.0,
                y(b.max)
            );
            let _ = writeln!(s, r#"<text x="{cx:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#, y(b.max) - 4.0, fmt_num(b.median));
        }
        let cx = left + group_w * (c as f64 + 0.5);
        let (first, rest) = cat.split_once(' ').unwrap_or((cat, ""));
        let _ = writeln!(s, r#"<text x="{cx:.1}" y="{:.0}" text-anchor="middle">{}</text>"#, base + 16.0, esc(first));
        let _ = writeln!(s, r#"<text x="{cx:.1}" y="{:.0}" text-anchor="middle" font-size="11">{}</text>"#, base + 30.0, esc(rest));
    }
    let _ = writeln!(s, r##"<line x1="{left}" x2="{:.0}" y1="{base:.1}" y2="{base:.1}" stroke="#333"/>"##, width - right);
    legend(&mut s, left, base + 54.0, &series.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
    footer(&mut s, left, height, notes);
    s.push_str("</svg>\n");
    s
}

/// Footer lines, the last at the bottom.
fn footer(s: &mut String, left: f64, height: f64, notes: &[String]) {
    for (i, n) in notes.iter().enumerate() {
        let _ = writeln!(s, r##"<text x="{left}" y="{:.0}" font-size="10" fill="#555">{}</text>"##, height - 10.0 - 14.0 * (notes.len() - 1 - i) as f64, esc(n));
    }
}

/// The footer of every plot: how it was made, and what ran where.
fn notes(what: &str, p: &Provenance) -> Vec<String> {
    vec![what.to_string(), format!("median of {} interleaved rounds, whiskers min..max", p.rounds), p.describe()]
}

fn svg_head(width: f64, height: f64, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{:.0}" y="24" font-size="15" text-anchor="middle" font-weight="bold">{}</text>"#, width / 2.0, esc(title));
    s
}

fn legend(s: &mut String, x: f64, y: f64, names: &[String]) {
    let mut cx = x;
    for (k, n) in names.iter().enumerate() {
        let _ = writeln!(s, r#"<rect x="{cx:.0}" y="{:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{:.0}">{}</text>"#, y - 10.0, COLORS[k % COLORS.len()], cx + 16.0, y, esc(n));
        cx += 24.0 + 7.0 * n.len() as f64;
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Allocator ns per operation by pattern and thread count, ours against the spinlock bitmap.
pub fn allocator_svg(rows: &[Row], p: &Provenance) -> String {
    let mut cases: Vec<String> = Vec::new();
    for r in rows {
        if !cases.contains(&r.case) {
            cases.push(r.case.clone());
        }
    }
    let find = |case: &str, t: u32, imp: &str| rows.iter().find(|r| r.case == case && r.threads == t && r.imp == imp).map(Bar::of);
    let series: Vec<(String, Vec<Option<Bar>>)> = [("ours", 1), ("ours", 2), ("spinlock", 1), ("spinlock", 2)]
        .iter()
        .map(|&(imp, t)| {
            let name = format!("{} {t} thread{}", if imp == "ours" { "llfree-pp (ours)" } else { "spinlock bitmap" }, if t > 1 { "s" } else { "" });
            (name, cases.iter().map(|c| find(c, t, imp)).collect())
        })
        .collect();
    bar_chart(
        "Frame allocator: ns per operation per thread (lower is better)",
        "ns per op (repeat: per get+put pair)",
        &cases,
        &series,
        &notes("cargo xtask bench allocator: 8 GiB, frames untouched, threads pinned", p),
    )
}

/// ExMap ns per page by batch size and thread count; the per-page path (no batches, an
/// allocator call and zeroing per page) is its own group.
pub fn exmap_svg(rows: &[Row], p: &Provenance) -> String {
    let mut cases: Vec<String> = Vec::new();
    for r in rows.iter().filter(|r| r.unit == "ns/page" && r.imp == "exmap").chain(rows.iter().filter(|r| r.unit == "ns/page" && r.imp != "exmap")) {
        if !cases.contains(&r.case) {
            cases.push(r.case.clone());
        }
    }
    let find = |case: &str, t: u32| rows.iter().find(|r| r.case == case && r.threads == t && r.unit == "ns/page").map(Bar::of);
    let series: Vec<(String, Vec<Option<Bar>>)> =
        [1, 2].iter().map(|&t| (format!("{t} thread{}", if t > 1 { "s" } else { "" }), cases.iter().map(|c| find(c, t)).collect())).collect();
    bar_chart(
        "ExMap: ns per page of ALLOC+FREE (lower is better)",
        "ns per page per thread",
        &cases.iter().map(|c| c.replace("alloc+free ", "ExMap ")).collect::<Vec<_>>(),
        &series,
        &notes("cargo xtask bench exmap: 512 MiB, sparse NPT region, no TLB flush; per-page path: get/put + zeroing, no cache", p),
    )
}

/// Morsel mount+unmount against mapping the object page by page (+ teardown), both axes log,
/// min..max whiskers at every point.
pub fn morsel_svg(rows: &[Row], p: &Provenance) -> String {
    let mut sizes: Vec<(u64, String)> = Vec::new();
    for r in rows {
        if let Some(b) = size_bytes(&r.case) {
            if !sizes.iter().any(|(s, _)| *s == b) {
                sizes.push((b, r.case.clone()));
            }
        }
    }
    sizes.sort();
    let get = |case: &str, imp: &str| rows.iter().find(|r| r.case == case && r.imp == imp).map(Bar::of);
    // A sum of two rows: medians, mins and maxes added (the whisker then spans both).
    let sum = |a: Option<Bar>, b: Option<Bar>| Some(Bar { median: a?.median + b?.median, min: a?.min + b?.min, max: a?.max + b?.max });
    type Line = (String, Vec<(f64, Bar)>);
    let lines: Vec<Line> = vec![
        ("morsel mount + unmount".into(), sizes.iter().filter_map(|(b, c)| Some((*b as f64, sum(get(c, "mount"), get(c, "unmount"))?))).collect()),
        ("map page by page (2 MiB pages)".into(), sizes.iter().filter_map(|(b, c)| Some((*b as f64, get(c, "map page by page")?))).collect()),
        ("map page by page + teardown".into(), sizes.iter().filter_map(|(b, c)| Some((*b as f64, sum(get(c, "map page by page"), get(c, "teardown"))?))).collect()),
    ];
    let notes = notes("cargo xtask bench morsel: EPT, 2 MiB pages, simulated memory (tables only), no TLB flush", p);
    let (width, left, right, top) = (760.0, 80.0, 80.0, 60.0);
    let bottom = 76.0 + 14.0 * notes.len() as f64;
    let height = 420.0 + 14.0 * notes.len() as f64;
    let all: Vec<(f64, Bar)> = lines.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let (x_lo, x_hi) = decades(all.iter().map(|p| p.0));
    let (y_lo, y_hi) = decades(all.iter().flat_map(|p| [p.1.min, p.1.max]));
    let px = |x: f64| left + (width - left - right) * (x.log10() - x_lo) / (x_hi - x_lo);
    let py = |y: f64| top + (height - top - bottom) * (1.0 - (y.log10() - y_lo) / (y_hi - y_lo));
    let mut s = svg_head(width, height, "Morsel: cost to give a guest an object, by object size (log-log)");
    for e in (y_lo as i32)..=(y_hi as i32) {
        let v = 10f64.powi(e);
        let _ = writeln!(s, r##"<line x1="{left}" x2="{:.0}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##, width - right, py(v), py(v), left - 6.0, py(v) + 4.0, ns_label(v));
    }
    for (b, label) in &sizes {
        let x = px(*b as f64);
        let _ = writeln!(s, r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{:.0}" stroke="#eee"/><text x="{x:.1}" y="{:.0}" text-anchor="middle" font-size="10">{}</text>"##, height - bottom, height - bottom + 16.0, esc(label));
    }
    let _ = writeln!(s, r#"<text x="{:.0}" y="{:.0}" text-anchor="middle">object size</text>"#, (left + width - right) / 2.0, height - bottom + 34.0);
    let _ = writeln!(s, r#"<text x="16" y="{:.0}" transform="rotate(-90 16 {:.0})" text-anchor="middle">time per object (ns, log)</text>"#, (top + height - bottom) / 2.0, (top + height - bottom) / 2.0);
    let color = |k: usize| [COLORS[0], COLORS[4], COLORS[2]][k % 3];
    let mut end_labels = Vec::new();
    for (k, (name, points)) in lines.iter().enumerate() {
        let path: Vec<String> = points.iter().map(|&(x, b)| format!("{:.1},{:.1}", px(x), py(b.median))).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#, path.join(" "), color(k));
        for &(x, b) in points {
            let _ = writeln!(s, r#"<path d="M{:.1},{:.1}V{:.1}" stroke="{}" fill="none"/>"#, px(x), py(b.min), py(b.max), color(k));
            let tip = esc(&format!("{name}: median {:.1} ns, min {:.1}, max {:.1}", b.median, b.min, b.max));
            let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"><title>{tip}</title></circle>"#, px(x), py(b.median), color(k));
        }
        if let Some(&(x, b)) = points.last() {
            end_labels.push((py(b.median), px(x), k, ns_label(b.median)));
        }
    }
    // The values at the right end, right of the last points, moved apart so none overlaps.
    for (y, x, k, text) in spread(end_labels, 13.0) {
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" font-size="10" fill="{}">{}</text>"#, x + 8.0, y + 4.0, color(k), text);
    }
    let mut cx = left;
    for (k, (n, _)) in lines.iter().enumerate() {
        let _ = writeln!(s, r#"<rect x="{cx:.0}" y="{:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{:.0}">{}</text>"#, height - bottom + 42.0, color(k), cx + 16.0, height - bottom + 52.0, esc(n));
        cx += 30.0 + 7.0 * n.len() as f64;
    }
    footer(&mut s, left, height, &notes);
    s.push_str("</svg>\n");
    s
}

/// Labels `(y, ...)` sorted by y and pushed down where two would be closer than `gap`.
fn spread<T>(mut labels: Vec<(f64, f64, usize, T)>, gap: f64) -> Vec<(f64, f64, usize, T)> {
    labels.sort_by(|a, b| a.0.total_cmp(&b.0));
    for i in 1..labels.len() {
        if labels[i].0 < labels[i - 1].0 + gap {
            labels[i].0 = labels[i - 1].0 + gap;
        }
    }
    labels
}

/// The whole decades (log10) that cover `values` (positive).
fn decades(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| *v > 0.0).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let (a, b) = (lo.log10().floor(), hi.log10().ceil());
    (a, if b > a { b } else { a + 1.0 })
}

fn ns_label(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{} ms", fmt_num(ns / 1e6))
    } else if ns >= 1e3 {
        format!("{} µs", fmt_num(ns / 1e3))
    } else {
        format!("{} ns", fmt_num(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOC: &str = "\
pattern bulk, order 0, 8 GiB (2097152 frames), metadata 271168 bytes = 33.1 KiB per GiB (2 CPUs)
threads  allocator  get ns    put ns   Mops/s total   (median of 1 runs, ns per op per thread)
      1  llfree-pp    45.4      13.0           34.2
      1  spinlock      8.3       5.7          143.4
      1  ratio      spinlock / ours: get 0.18x, put 0.44x
      2  llfree-pp    20.4      13.0           74.6
pattern repeat, order 9, 8 GiB (2097152 frames), metadata 271168 bytes = 33.1 KiB per GiB (2 CPUs)
threads  allocator  get+put ns   Mops/s total   (median of 1 runs, ns per op per thread)
      1  llfree-pp        12.1          165.8
";

    #[test]
    fn reads_the_allocator_bench() {
        let s = parse_allocator(ALLOC).unwrap();
        let got: Vec<(String, u32, &str, f64)> = s.iter().map(|s| (s.case.clone(), s.threads, s.imp.as_str(), s.value)).collect();
        assert_eq!(
            got,
            [
                ("bulk 4 KiB get".to_string(), 1, "ours", 45.4),
                ("bulk 4 KiB put".into(), 1, "ours", 13.0),
                ("bulk 4 KiB get".into(), 1, "spinlock", 8.3),
                ("bulk 4 KiB put".into(), 1, "spinlock", 5.7),
                ("bulk 4 KiB get".into(), 2, "ours", 20.4),
                ("bulk 4 KiB put".into(), 2, "ours", 13.0),
                ("repeat 2 MiB get+put".into(), 1, "ours", 12.1),
            ]
        );
        assert!(parse_allocator("nothing\n").is_err());
        assert!(parse_allocator("      1  llfree-pp    45.4      13.0           34.2\n").is_err(), "no header");
    }

    #[test]
    fn reads_the_morsel_and_exmap_benches() {
        let m = "|   2 MiB |      1 |      1 |     17.5 |       22.6 |       1 + 1 |          222 |           2908 |           3 |              78x |\n\
                 |  64 GiB |  32768 |     65 |     14.6 |       13.9 |       1 + 1 |       555673 |          75347 |       32833 |           22071x |\n";
        let s = parse_morsel(m).unwrap();
        assert_eq!(s.len(), 8);
        assert_eq!((s[0].case.as_str(), s[0].imp.as_str(), s[0].value), ("2 MiB", "mount", 17.5));
        assert_eq!((s[6].imp.as_str(), s[6].value, s[6].unit), ("map page by page", 555673.0, "ns/object"));
        assert_eq!(size_bytes("64 GiB"), Some(64 << 30));
        let e = "exmap host benchmark: 512 MiB of real memory, median of 5 interleaved runs\n\
                 exmap alloc+free sorted batch 64, 2 threads: 24.0 ns/page (per thread; runs 20.7..27.0)\n\
                 per-page path (allocator call + zeroing per page, no cache) wrapping batch 512, 1 thread: 63.8 ns/page (per thread; runs 60.1..65.7)\n";
        let mut samples = parse_exmap(e).unwrap();
        samples.push(Sample { bench: "exmap", case: "alloc+free sorted batch 64".into(), threads: 2, imp: "exmap".into(), unit: "instr/page", value: 180.0, runs: None });
        let rows = collect(&samples);
        let r = &rows[0];
        assert_eq!((r.case.as_str(), r.threads, r.imp.as_str()), ("alloc+free sorted batch 64", 2, "exmap"));
        assert_eq!((r.median(), r.min(), r.max(), r.runs()), (24.0, 20.7, 27.0, 5));
        assert_eq!((rows[1].case.as_str(), rows[1].threads, rows[1].imp.as_str()), ("per-page path wrapping", 1, "per-page path"));
        assert_eq!((rows[2].unit, rows[2].median()), ("instr/page", 180.0), "instructions are a row of their own");
        let prov = Provenance { date: "d".into(), commit: "c".into(), cpus: 2, load_start: 0.0, load_end: 0.0, rounds: 5 };
        assert!(exmap_svg(&rows, &prov).contains("sorted batch 64"));
        assert!(parse_exmap("exmap alloc+free sorted batch 1, x threads: 1.0 ns/page (per thread; runs 1.0..2.0)\n").is_err());
        assert!(parse_exmap("exmap alloc+free batch 1, 1 thread: 1.0 ns/page (per thread; runs 1.0..2.0)\n").is_err(), "no order");
        assert_eq!(parse_collected("==12== Events    : Ir\n==12== Collected : 207806271\n"), Some(207806271));
    }

    #[test]
    fn medians_tables_csv_and_plots() {
        let mk = |v: f64| Sample { bench: "allocator", case: "bulk 4 KiB get".into(), threads: 1, imp: "ours".into(), unit: "ns/op", value: v, runs: None };
        let rows = collect(&[mk(9.0), mk(7.0), mk(30.0), Sample { threads: 2, ..mk(5.0) }]);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].median(), rows[0].min(), rows[0].max()), (9.0, 7.0, 30.0));
        assert_eq!(collect(&[mk(1.0), mk(2.0)])[0].median(), 1.5);
        let t = table(&rows);
        assert!(t.lines().nth(2).unwrap().contains("|        9.0 |         7.0..30.0 |    3 | ns/op"), "{t}");
        let prov = Provenance { date: "2026-12-06 05:40 UTC".into(), commit: "abc1234".into(), cpus: 2, load_start: 3.5, load_end: 1.0, rounds: 3 };
        assert_eq!(csv(&rows, &prov).lines().nth(1), Some("allocator,bulk 4 KiB get,1,ours,ns/op,9.00,7.00,30.00,3,2026-12-06 05:40 UTC,abc1234,2,3.50,1.00"));
        let svg = allocator_svg(&rows, &prov);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("llfree-pp (ours) 1 thread"), "{svg}");
        // The footer says what ran where, and that a load above the CPU count is noise.
        assert!(svg.contains("2026-12-06 05:40 UTC, commit abc1234, 2 host CPUs, load average 3.5 before, 1.0 after (more than the CPUs: noisy)"), "{svg}");
        assert!(!svg.contains("2-core"), "no machine is assumed");
        // Whiskers: one per bar, from the min to the max.
        assert_eq!(svg.matches("stroke=\"#333\" fill=\"none\"").count(), 2, "{svg}");
        let quiet = Provenance { load_start: 0.5, load_end: 0.7, ..prov.clone() };
        assert!(!quiet.describe().contains("noisy"));
        let m = parse_morsel("|   2 MiB | 1 | 1 | 17.5 | 22.6 | 1 + 1 | 222 | 2908 | 3 | 78x |\n|  64 GiB | 1 | 1 | 14.6 | 13.9 | 1 + 1 | 555673 | 75347 | 3 | 1x |\n").unwrap();
        let svg = morsel_svg(&collect(&m), &prov);
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("median of 3 interleaved rounds"), "{svg}");
        assert!(svg.contains("(log-log)") && svg.contains("64 GiB"), "{svg}");
        assert_eq!(decades([17.0, 630000.0].into_iter()), (1.0, 6.0));
    }

    #[test]
    fn exmap_plot_has_a_group_for_the_per_page_path() {
        let e = "exmap host benchmark: 512 MiB of real memory, median of 5 interleaved runs\n\
                 exmap alloc+free wrapping batch 1, 1 thread: 26.0 ns/page (per thread; runs 25.0..27.0)\n\
                 exmap alloc+free wrapping batch 512, 1 thread: 19.0 ns/page (per thread; runs 18.0..20.0)\n\
                 exmap alloc+free wrapping batch 512, 2 threads: 19.5 ns/page (per thread; runs 18.0..21.0)\n\
                 per-page path (allocator call + zeroing per page, no cache) wrapping batch 512, 1 thread: 60.0 ns/page (per thread; runs 59.0..61.0)\n";
        let prov = Provenance { date: "d".into(), commit: "c".into(), cpus: 16, load_start: 0.1, load_end: 0.2, rounds: 1 };
        let svg = exmap_svg(&collect(&parse_exmap(e).unwrap()), &prov);
        assert!(svg.contains(">ExMap<") && svg.contains(">wrapping batch 512<") && svg.contains(">per-page<") && svg.contains(">path wrapping<"), "{svg}");
        assert!(!svg.contains("per-page path batch"), "{svg}");
        // Figures within a factor of 20: a linear axis from 0, bars are bars.
        assert!(svg.contains(">0<") && !svg.contains("log scale"), "{svg}");
        // The plot is only as wide as its groups need.
        let width: f64 = svg.split("width=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
        assert!(width <= 800.0, "{width}");
    }

    #[test]
    fn scales_ticks_dates_and_labels() {
        assert_eq!(Scale::fit([5.0, 60.0].into_iter()), Scale::Linear { max: 100.0 });
        assert_eq!(Scale::fit([5.0, 160.0].into_iter()), Scale::Log { lo: 0.0, hi: 3.0 });
        assert_eq!(nice_ceiling(64.8), 100.0);
        assert_eq!(nice_ceiling(17.0), 20.0);
        assert_eq!(nice_ceiling(50.0), 50.0);
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(1_796_535_600), "2026-12-06 05:40 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        let s = spread(vec![(100.0, 0.0, 0, "a"), (95.0, 0.0, 1, "b"), (300.0, 0.0, 2, "c")], 13.0);
        assert_eq!(s.iter().map(|l| (l.0, l.3)).collect::<Vec<_>>(), [(95.0, "b"), (108.0, "a"), (300.0, "c")]);
    }

    #[test]
    fn options() {
        let o = Options::parse(&[]).unwrap();
        assert_eq!((o.benches, o.rounds, o.docs), (BENCHES.to_vec(), DEFAULT_ROUNDS, false));
        let o = Options::parse(&["morsel".into(), "--rounds".into(), "3".into(), "--docs".into()]).unwrap();
        assert_eq!((o.benches, o.rounds, o.docs), (vec!["morsel"], 3, true));
        assert!(Options::parse(&["nope".into()]).is_err());
        assert!(Options::parse(&["--rounds".into(), "0".into()]).is_err());
        assert!(Options::parse(&["exmap".into(), "exmap".into()]).is_err());
        // `exmap-smp` alone runs only the Bochs ExMap rows, not every host bench.
        let o = Options::parse(&["exmap-smp".into()]).unwrap();
        assert!(o.exmap_smp && o.benches.is_empty() && !o.smp);
        assert_eq!((o.cpus, o.configs.as_str()), (vec![1, 2, 4], "abc"));
        let o = Options::parse(&["exmap-smp".into(), "--cpus".into(), "1,2".into(), "--configs".into(), "c".into()]).unwrap();
        assert_eq!((o.cpus, o.configs.as_str()), (vec![1, 2], "c"));
        assert!(Options::parse(&["exmap-smp".into(), "--cpus".into(), "2".into()]).is_err(), "no baseline");
        assert!(Options::parse(&["exmap-smp".into(), "--configs".into(), "d".into()]).is_err());
    }
}
