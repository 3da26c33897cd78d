//! `cargo xtask`: the one entry point for building, booting and testing ParPerOS.
//!
//! Subcommands: `build`, `run`, `test`, `bench`, `setup` (see `USAGE`). Build flags live in
//! `images`, emulator setups in `qemu-configs/`, scenarios in `tests/scenarios/`. Every error
//! the user can cause ends as one `error: ...` line and exit status 1, never a backtrace.

mod archive;
mod disk;
mod emulator;
mod images;
mod pmem;
mod run;
mod scenario;
mod testrun;
mod tools;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  build                      build the hypervisor, the guests and build/guests.ar
  run [options] [-- ARGS]    boot the demo with the serial console on this terminal
      --emulator qemu|bochs  emulator (default qemu; bochs uses config bochs-vmx)
      --config NAME          a setup from qemu-configs/ (NAME.args or NAME.bochsrc)
      --cmdline TEXT         hypervisor command line (default: qemu-configs/demo.cmdline)
      --gdb                  QEMU: wait for a debugger on :1234 (-s -S)
      -- ARGS                extra arguments for the emulator (QEMU only)
  test [FILTER] [-j N]       host tests, then every scenario in tests/scenarios/
                             FILTER: substring of `name [config]`; `host` = host tests only
                             PARPEROS_SEED=N: the seed of crash runs (kill@K), as printed
  bench [allocator|morsel|exmap]  the host benchmarks (release builds), all or one
  setup                      install the apt packages the emulators need
";

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
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: &[String]) -> Result<ExitCode> {
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return Ok(ExitCode::FAILURE);
    };
    match cmd.as_str() {
        "build" => {
            if let Some(extra) = rest.first() {
                bail!("`build` takes no arguments (got `{extra}`)");
            }
            let built = images::build_all(false)?;
            println!("hypervisor: {}", built.hypervisor.display());
            println!("guests:     {} ({})", built.archive.display(), built.guest_names().join(", "));
            Ok(ExitCode::SUCCESS)
        }
        "run" => run::run(&run::Options::parse(rest)?),
        "test" => testrun::test(&testrun::Options::parse(rest)?),
        "bench" => match rest {
            [] => images::bench(&["allocator", "morsel", "exmap"]),
            [one] if ["allocator", "morsel", "exmap"].contains(&one.as_str()) => images::bench(&[one.as_str()]),
            [extra, ..] => bail!("`bench` takes allocator, morsel or exmap (got `{extra}`)"),
        },
        "setup" => {
            if let Some(extra) = rest.first() {
                bail!("`setup` takes no arguments (got `{extra}`)");
            }
            tools::setup()?;
            Ok(ExitCode::SUCCESS)
        }
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unknown command `{other}` (try `cargo xtask help`)"),
    }
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

    #[test]
    fn output_merged_returns_the_status() {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "echo hi; exit 3"]);
        let m = super::output_merged(cmd, None).unwrap();
        assert_eq!(m.status.and_then(|s| s.code()), Some(3));
        assert_eq!(m.output, "hi\n");
    }
}
