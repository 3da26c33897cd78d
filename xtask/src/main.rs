//! `cargo xtask`: the one entry point for building, booting and testing ParPerOS.
//!
//! Subcommands: `build`, `run`, `test`, `bench`, `setup` (see `USAGE`). Build flags live in
//! `images`, emulator setups in `qemu-configs/`, scenarios in `tests/scenarios/`. Every error
//! the user can cause ends as one `error: ...` line and exit status 1, never a backtrace.

mod archive;
mod emulator;
mod images;
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
  bench                      allocator and morsel benchmarks (release builds)
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

/// Run `cmd` to the end with stdout and stderr merged into one pipe, returning both.
pub fn output_merged(mut cmd: std::process::Command) -> std::io::Result<(std::process::ExitStatus, String)> {
    use std::io::Read;
    let (mut reader, writer) = std::io::pipe()?;
    cmd.stdin(std::process::Stdio::null()).stdout(writer.try_clone()?).stderr(writer);
    let mut child = cmd.spawn()?;
    drop(cmd); // close our copies of the write end, or the read below never ends
    let mut out = Vec::new();
    reader.read_to_end(&mut out)?;
    Ok((child.wait()?, String::from_utf8_lossy(&out).into_owned()))
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
        "bench" => {
            if let Some(extra) = rest.first() {
                bail!("`bench` takes no arguments (got `{extra}`)");
            }
            images::bench()
        }
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
