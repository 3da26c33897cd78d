//! `cargo xtask`: the one entry point for building, booting and testing ParPerOS.
//!
//! Subcommands: `build`, `run`, `test`, `list`, `bench`, `setup` (see `USAGE`; each has
//! `--help`). Build flags live in `images`, emulator setups in `qemu-configs/`, scenarios in
//! `tests/scenarios/`. Every error the user can cause ends as one `error: ...` line, never a
//! backtrace: exit status 2 for a usage error (bad option, unknown name), 1 for a failure.

mod archive;
mod bench;
mod bench_bufmgr;
mod bench_exmap_smp;
mod bench_ipc;
mod bench_smp;
mod cmdline;
mod disk;
mod doc;
mod emulator;
mod hang;
mod images;
mod machine;
mod newguest;
mod pmem;
mod run;
mod scenario;
mod symbolize;
mod testrun;
mod tools;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]   (`cargo xtask <command> --help` for one command)

commands:
  build     build the hypervisor, the guests and build/guests.ar
  run       boot the demo, a command line or your own guest ELF, console on this terminal
  test      host tests, then every scenario in tests/scenarios/ (or those FILTER selects)
  list      the guests, configs and scenarios there are
  new-guest DIR  write a guest crate of your own in DIR (builds with plain `cargo build`)
  guest-flags  print the RUSTFLAGS that build a guest crate of your own
  bench     the host benchmarks (allocator, morsel, exmap): table, CSV and SVG plots
  doc       build the book (docs/, mdBook) into build/book
  setup     install the apt packages the emulators need, and mdBook

exit status: 0 success, 1 failure, 2 usage error
";

const HELP_BUILD: &str = "\
usage: cargo xtask build
  builds the hypervisor and the guests of tests/guests/ (release, freestanding flags) and
  writes the guest archive build/guests.ar
";

const HELP_RUN: &str = "\
usage: cargo xtask run [options] [-- EMULATOR-ARGS]
  builds, checks the command line, then boots it with the serial console on this terminal;
  RIPs in the log are shown with `<function (file:line)>` from the ELF's debug info

  --emulator qemu|bochs  emulator (default qemu; bochs uses config bochs-vmx)
  --config NAME          a setup from qemu-configs/ (NAME.args or NAME.bochsrc; `cargo xtask list`)
  --cmdline TEXT         hypervisor command line (default: qemu-configs/demo.cmdline)
  --cpus N               N CPUs (QEMU -smp N, Bochs cpu: count=N)
  --accel kvm|tcg        QEMU: KVM (-cpu host) or TCG software emulation; default KVM where
                         /dev/kvm and the CPU's vmx/svm are usable, else TCG (the first line
                         says which and why); qemu-novirt and qemu-svm-nonpt stay on TCG
  --guest PATH[:OPTS]    a guest ELF built anywhere, booted under its file name with the
                         guest options OPTS (`:mem=32M:arg=1`); repeatable; added to the
                         command line's guests= (without --cmdline: only these guests)
  --timeout SECONDS      stop the emulator after this long (exit status 1)
  --gdb                  QEMU: wait for a debugger on :1234 (-s -S); docs/src/debugging.md
  -- ARGS                extra arguments for the emulator (QEMU only)
";

const HELP_TEST: &str = "\
usage: cargo xtask test [FILTER] [-j N] [--junit FILE] [--accel kvm|tcg] [--guest ELF[:OPTS]]
  host tests, then every scenario of tests/scenarios/ under each of its configs
  FILTER        only runs whose `name [config]` contains FILTER; `host`: host tests and the
                book check only; `doc`: the book check only (mdBook build, links);
                a FILTER that matches nothing is an error (exit status 2) listing what exists
  -j N          emulator runs at a time, QEMU or Bochs (default: the CPU count; Bochs runs
                are queued first)
  --junit FILE  also write a JUnit XML report to FILE
  --accel kvm|tcg  QEMU scenarios under KVM (where the config allows it) or TCG (default:
                TCG, the path the scenarios are written for)
  --guest ELF[:OPTS]  no scenarios: boot your own guest ELF (repeatable; `:arg=1:mem=32M`)
                under qemu-svm and pass if every guest exits with code 0 and every frame
                comes back
  PARPEROS_SEED=N  the seed of crash runs (kill@K), as a failure prints it
";

const HELP_LIST: &str = "\
usage: cargo xtask list
  the guests of tests/guests/ (the archive's names), the configs of qemu-configs/ with the
  first line of each, and the scenarios of tests/scenarios/ with their description
";

const HELP_GUEST_FLAGS: &str = "\
usage: cargo xtask guest-flags
  prints the RUSTFLAGS for a guest crate outside this repository (freestanding flags and
  guest-lib/guest.ld):  RUSTFLAGS=\"$(cargo xtask guest-flags)\" cargo build --release \\
  --target x86_64-unknown-linux-gnu; then `cargo xtask run --guest path/to/elf`
";

const HELP_NEW_GUEST: &str = "\
usage: cargo xtask new-guest DIR
  writes a guest crate in DIR (outside this repository; DIR must not exist or be empty; its
  name becomes the crate's and the guest's): Cargo.toml (guest-lib of this checkout as a
  path dependency with the heap, panic = \"abort\" in both profiles), .cargo/config.toml (the
  target and the flags of `guest-flags`, this checkout's linker script), and src/main.rs, an
  example that uses the heap, a shared morsel, a doorbell rendezvous and ExMap. Then:
    cd DIR && cargo build
    cargo xtask run --guest DIR/target/x86_64-unknown-linux-gnu/debug/NAME \\
                    --guest DIR/target/x86_64-unknown-linux-gnu/debug/NAME:arg=1
";

const HELP_BENCH: &str = "\
usage: cargo xtask bench [allocator|morsel|exmap|smp|smp-bochs|ipc|bufmgr|exits|exmap-smp] [--rounds N] [--docs] [--upstream PATH] [--cpus 1,2] [--configs ac] [--probe]
  the host benchmarks (release builds of each crate's examples/bench.rs): all of them, or
  those named, in N interleaved rounds (default 5; exmap interleaves its own N runs).
  Prints one table (median, min..max per case), writes build/bench/<bench>.csv (with the date,
  commit, host CPU count and load average) and
  build/bench/<bench>.svg; --docs also writes the plots to docs/src/bench/ (the book's Benchmarks chapter)
  --upstream PATH: a llfree-rs checkout outside this repository (github.com/luhsra/llfree-rs);
  the allocator bench is built with it in PATH/../parperos-llfree-side-by-side and measures
  upstream in the same loops and process, rows labelled `llfree-rs (upstream)`
  smp: boots the smpbench guest (bench=on) under QEMU with 1 and 2 CPUs (at most 3 rounds),
  then under Bochs VMX once each, and prints per CPU the frame alloc+free rates inside the
  hypervisor, the morsel create+destroy and unmount+open rates and the shootdown cost, and
  Bochs' 2-CPU/1-CPU ratios of emulated time per operation (2 CPUs: one guest with a vCPU
  per CPU, whose unmounts shoot down the other CPU, and a guest per CPU, whose do not)
  smp-bochs: only the Bochs part of smp; --log info runs it at that log level (default warn)
  ipc: boots two channel guests under QEMU (at most 5 rounds): ping-pong round trips per
  second and exits per round trip, doorbell + wait vs yield polling, on 1 and 2 CPUs; and
  the host CPU time of two guests idle for 3 s, waiting vs polling
  bufmgr: the vmcache-style buffer manager guest (bmtree) with 1, 2, 4 vCPUs: under QEMU
  (qemu-iommu, pages READ from NVMe; at most 3 rounds) lookups/s, pages read/s, exits and
  invalidations per 1,000 lookups; under Bochs VMX (ALLOC + generator) TSC ticks per lookup
  exits: boots the smpbench guest under Bochs VMX with 1 and 2 CPUs (all vCPUs exiting at
  once) and prints Bochs ticks (about emulated instructions) per CPUID exit and per `info`
  hypercall
  exmap-smp: boots the exmapbench guest under Bochs VMX with 1, 2 and 4 CPUs (a guest per CPU;
  one guest, a vCPU per CPU, one shared region; the same, a region each) and prints Bochs
  ticks per page of ExMap ALLOC+FREE at 512 and 1 entries per call, the ratio to 1 CPU and
  the pages zeroed; `bench smp` ends with it; `--probe` builds the hypervisor with its
  phase counters (feature `percall-probe`) and prints what an ALLOC / FREE of one entry
  spends in each phase (1 CPU only)
";

const HELP_SETUP: &str = "\
usage: cargo xtask setup
  apt-get install qemu-system-x86 bochs bochsbios vgabios grub-pc-bin grub-common xorriso mtools,
  then .ci/fetch-qemu-evlog: QEMU 11.1 from Debian trixie-backports unpacked under
  build/qemu-evlog (the qemu-amd-iommu-evlog config; nothing installed on the system),
  then .ci/install-mdbook: mdBook (pinned) with `cargo install`, unless that version is there
";

const HELP_DOC: &str = "\
usage: cargo xtask doc
  builds the book (docs/book.toml, docs/src/) with mdBook into build/book (open
  build/book/index.html) and checks its links; `cargo xtask test doc` runs the same check
";

/// Exit status of a usage error (a bad option, a filter that selects nothing).
pub const EXIT_USAGE: u8 = 2;

/// Set by `usage_error`: the command fails with exit status 2 (a usage error), whichever
/// path the error took back to `main`.
static USAGE_SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// An error the user made in what they asked for (an unknown config or guest, a guest size
/// the hypervisor refuses): exit status 2, even where it is found late (after a build).
pub fn usage_error(message: String) -> Error {
    USAGE_SEEN.store(true, std::sync::atomic::Ordering::Relaxed);
    Error(message)
}

/// The candidate closest to `word` if it is a likely misspelling (edit distance at most 1
/// for short words, 2 from 5 characters on, and less than the word's length).
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = if word.chars().count() >= 5 { 2 } else { 1 };
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|&(d, c)| d <= limit && d < word.chars().count().max(c.chars().count()) && d > 0)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// ` (did you mean `X`?)` or nothing.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    suggest(word, candidates).map_or(String::new(), |c| format!(" (did you mean `{c}`?)"))
}

/// Edit distance by characters, a swap of two neighbours counting as one edit (optimal
/// string alignment).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The subcommands, for "did you mean".
const COMMANDS: &[&str] = &["build", "run", "test", "list", "new-guest", "guest-flags", "bench", "setup", "help"];

/// One readable message; printed as `error: <message>`.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `bail!("...", args)`: return an `Error` built with `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error(format!($($arg)*))) };
}

/// Attach a context line to I/O and similar errors.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Make `cmd`'s process die with SIGKILL when the thread that spawns it ends, however that
/// happens (SIGTERM or SIGINT to xtask alone, a panic, SIGKILL): an emulator never outlives
/// the xtask that started it (Linux `PR_SET_PDEATHSIG`). Spawn from a thread that waits for
/// the child (the signal follows the spawning thread, not the process).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only makes two
    // async-signal-safe system calls (prctl, getppid) and kills itself.
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would send the signal.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// What `output_merged` saw: the exit status (None if stopped at the time limit) and the
/// merged stdout and stderr.
pub struct Merged {
    pub status: Option<std::process::ExitStatus>,
    pub output: String,
}

/// Run `cmd` with stdout and stderr merged into one pipe; past `limit` stop it and all its
/// descendants (found through /proc, each killed by its pid).
pub fn output_merged(mut cmd: std::process::Command, limit: Option<std::time::Duration>) -> std::io::Result<Merged> {
    use std::io::Read;
    let (mut reader, writer) = std::io::pipe()?;
    cmd.stdin(std::process::Stdio::null()).stdout(writer.try_clone()?).stderr(writer);
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn()?;
    drop(cmd); // close our copies of the write end, or the reader never sees EOF
    let collect = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = reader.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let deadline = limit.map(|l| std::time::Instant::now() + l);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            kill_tree(child.id());
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let output = collect.join().unwrap_or_default();
    Ok(Merged { status, output })
}

/// SIGKILL every descendant of `pid` (not `pid` itself), by pid.
fn kill_tree(pid: u32) {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`; comm may hold spaces, so read after the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.push((p, ppid));
        }
    }
    let mut victims = vec![pid];
    let mut i = 0;
    while i < victims.len() {
        let parent = victims[i];
        victims.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    let pids: Vec<String> = victims[1..].iter().map(u32::to_string).collect();
    if !pids.is_empty() {
        let _ = std::process::Command::new("kill").arg("-KILL").args(&pids).status();
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(code) => code,
        Err(Fail::Usage(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Fail::Failed(e)) => {
            eprintln!("error: {e}");
            if USAGE_SEEN.load(std::sync::atomic::Ordering::Relaxed) {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Why a command did not succeed: the user asked for something that does not exist (exit
/// status 2), or what was asked for failed (1).
enum Fail {
    Usage(Error),
    Failed(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Failed(e)
    }
}

fn usage<T>(r: Result<T>) -> std::result::Result<T, Fail> {
    r.map_err(Fail::Usage)
}

fn no_arguments(cmd: &str, rest: &[String]) -> std::result::Result<(), Fail> {
    match rest.first() {
        Some(extra) => Err(Fail::Usage(Error(format!("`{cmd}` takes no arguments (got `{extra}`; see `cargo xtask {cmd} --help`)")))),
        None => Ok(()),
    }
}

fn dispatch(args: &[String]) -> std::result::Result<ExitCode, Fail> {
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return Ok(ExitCode::from(EXIT_USAGE));
    };
    let help = match cmd.as_str() {
        "build" => HELP_BUILD,
        "run" => HELP_RUN,
        "test" => HELP_TEST,
        "list" => HELP_LIST,
        "bench" => HELP_BENCH,
        "guest-flags" => HELP_GUEST_FLAGS,
        "new-guest" => HELP_NEW_GUEST,
        "setup" => HELP_SETUP,
        "doc" => HELP_DOC,
        _ => USAGE,
    };
    if rest.iter().take_while(|a| *a != "--").any(|a| a == "--help" || a == "-h") {
        print!("{help}");
        return Ok(ExitCode::SUCCESS);
    }
    let root = root();
    match cmd.as_str() {
        "build" => {
            no_arguments(cmd, rest)?;
            let _lock = images::lock_build(&root)?;
            let built = images::build_all(false)?;
            println!("hypervisor: {}", built.hypervisor.display());
            println!("guests:     {} ({})", built.archive.display(), built.guest_names().join(", "));
            Ok(ExitCode::SUCCESS)
        }
        "run" => Ok(run::run(&usage(run::Options::parse(rest))?)?),
        "test" => {
            let o = usage(testrun::Options::parse(rest))?;
            // The whole test run: its ISOs, logs, disk and pmem files are under build/ too.
            let _lock = images::lock_build(&root)?;
            Ok(testrun::test(&o)?)
        }
        "list" => {
            no_arguments(cmd, rest)?;
            list(&root)?;
            Ok(ExitCode::SUCCESS)
        }
        "guest-flags" => {
            no_arguments(cmd, rest)?;
            println!("{} -C link-arg=-T{}", images::FREESTANDING_RUSTFLAGS, root.join("guest-lib/guest.ld").display());
            Ok(ExitCode::SUCCESS)
        }
        "new-guest" => {
            let dir = match rest {
                [dir] if !dir.starts_with('-') => PathBuf::from(dir),
                _ => return Err(Fail::Usage(Error("`new-guest` takes one directory (see `cargo xtask new-guest --help`)".into()))),
            };
            let name = newguest::create(&root, &dir)?;
            println!("new guest `{name}` in {}; build and boot it:", dir.display());
            println!("  (cd {} && cargo build)", dir.display());
            let elf = newguest::elf(&dir, &name);
            println!("  cargo xtask run --guest {} --guest {}:arg=1", elf.display(), elf.display());
            Ok(ExitCode::SUCCESS)
        }
        "bench" => {
            let o = usage(bench::Options::parse(rest))?;
            Ok(bench::bench(&o)?)
        }
        "doc" => {
            no_arguments(cmd, rest)?;
            let index = doc::doc(&root)?;
            let problems = doc::check_links(&root)?;
            if !problems.is_empty() {
                return Err(Fail::Failed(Error(format!("the book has broken links:\n{}", problems.join("\n")))));
            }
            println!("book: {}", index.display());
            Ok(ExitCode::SUCCESS)
        }
        "setup" => {
            no_arguments(cmd, rest)?;
            tools::setup()?;
            Ok(ExitCode::SUCCESS)
        }
        "help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "-h" | "--help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(Fail::Usage(Error(format!("unknown command `{other}`{} (try `cargo xtask help`)", did_you_mean(other, COMMANDS.iter().copied()))))),
    }
}

/// `cargo xtask list`: guests, configs, scenarios, one line each.
fn list(root: &Path) -> Result<()> {
    println!("guests (tests/guests/src/bin/, archived under these names; `run --guest PATH` adds your own):");
    for g in images::guest_bins(root)? {
        println!("  {g}");
    }
    println!("configs (qemu-configs/, for --config):");
    for (name, line) in emulator::describe_configs(root) {
        println!("  {name:<16} {line}");
    }
    println!("scenarios (tests/scenarios/, `cargo xtask test NAME`):");
    for (name, configs, description) in testrun::describe_scenarios(root)? {
        println!("  {name:<44} [{configs}] {description}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[test]
    fn output_merged_stops_a_whole_tree_at_its_limit() {
        let mut cmd = std::process::Command::new("sh");
        // The grandchild holds the pipe open too: it must be killed for the read to end.
        cmd.args(["-c", "echo out; echo err >&2; sleep 30 & sleep 30"]);
        let start = Instant::now();
        let m = super::output_merged(cmd, Some(Duration::from_millis(500))).unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(m.status.is_none());
        assert!(m.output.contains("out") && m.output.contains("err"), "{}", m.output);
    }

    /// Helper for the test below, run in a child process of its own: spawns an "emulator"
    /// (`sleep`) the way xtask spawns QEMU and Bochs, prints its pid, and waits to be killed.
    #[test]
    #[ignore = "run by a_killed_xtask_leaves_no_emulator_behind"]
    fn helper_spawns_an_emulator_and_waits() {
        if std::env::var_os("PARPEROS_KILL_HELPER").is_none() {
            return;
        }
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("300");
        super::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        println!("EMULATOR {}", child.id());
        std::thread::sleep(Duration::from_secs(300));
        let _ = child.wait();
    }

    #[test]
    fn a_killed_xtask_leaves_no_emulator_behind() {
        use std::io::BufRead;
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGKILL] {
            let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "tests::helper_spawns_an_emulator_and_waits", "--ignored", "--nocapture"])
                .env("PARPEROS_KILL_HELPER", "1")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let out = std::io::BufReader::new(helper.stdout.take().unwrap());
            let pid: i32 = out
                .lines()
                .map_while(|l| l.ok())
                .find_map(|l| l.strip_prefix("EMULATOR ").map(|p| p.trim().parse().unwrap()))
                .expect("the helper reports its emulator");
            assert!(alive(pid), "the emulator runs");
            // SAFETY: kill(2) on the helper, our own child.
            unsafe { libc::kill(helper.id() as i32, signal) };
            let _ = helper.wait();
            let start = Instant::now();
            while alive(pid) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(!alive(pid), "signal {signal}: the emulator {pid} outlived xtask");
        }
    }

    /// Whether `pid` exists and is not a zombie.
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()) != Some("Z"),
            Err(_) => false,
        }
    }

    #[test]
    fn misspellings_get_a_suggestion() {
        use super::{did_you_mean, suggest, COMMANDS};
        assert_eq!(suggest("rn", COMMANDS.iter().copied()), Some("run"));
        assert_eq!(suggest("tset", COMMANDS.iter().copied()), Some("test"));
        assert_eq!(suggest("--emulater", ["--emulator", "--config"]), Some("--emulator"));
        assert_eq!(suggest("helo", ["hello", "counter"]), Some("hello"));
        assert_eq!(suggest("qemu-svn", ["qemu-svm", "qemu-iommu"]), Some("qemu-svm"));
        assert_eq!(suggest("xyzzy", COMMANDS.iter().copied()), None);
        assert_eq!(suggest("run", COMMANDS.iter().copied()), None, "an exact name is no misspelling");
        assert_eq!(suggest("a", ["b"]), None, "one letter is no basis for a guess");
        assert_eq!(did_you_mean("rn", ["run"]), " (did you mean `run`?)");
    }

    #[test]
    fn output_merged_returns_the_status() {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "echo hi; exit 3"]);
        let m = super::output_merged(cmd, None).unwrap();
        assert_eq!(m.status.and_then(|s| s.code()), Some(3));
        assert_eq!(m.output, "hi\n");
    }
}
