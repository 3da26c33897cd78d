//! `cargo xtask run`: build, then boot one emulator setup with the serial console on this
//! terminal (QEMU: `-serial mon:stdio`, Ctrl-A X quits; Bochs: com1 goes to a file under
//! build/ that is echoed here while Bochs runs).

use crate::emulator::{self, Config, Emulator};
use crate::{bail, images, Context, Result};
use std::io::{Read, Write};
use std::path::Path;
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
    extra: Vec<String>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options { emulator: None, config: None, cmdline: None, cpus: None, gdb: false, extra: Vec::new() };
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
                        other => bail!("unknown emulator `{other}` (qemu or bochs)"),
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
                "--" => {
                    o.extra = it.by_ref().cloned().collect();
                }
                other => bail!("unknown option `{other}` for `run` (see `cargo xtask help`)"),
            }
        }
        Ok(o)
    }
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
            bail!("config `{}` is for {}, not --emulator {}", config.name, config.emulator.word(), e.word());
        }
    }
    let cmdline = match &o.cmdline {
        Some(c) => c.clone(),
        None => {
            let path = root.join(DEMO_CMDLINE);
            std::fs::read_to_string(&path).context(|| format!("cannot read {}", path.display()))?.trim().to_string()
        }
    };
    // Check the emulator before the (longer) build.
    match config.emulator {
        Emulator::Qemu => drop(crate::tools::require(&crate::tools::QEMU)?),
        Emulator::Bochs => {
            crate::tools::require(&crate::tools::BOCHS)?;
            crate::tools::require_iso_tools()?;
        }
    }
    let built = images::build_all(false)?;
    match config.emulator {
        Emulator::Qemu => run_qemu(&config, &built, &cmdline, o),
        Emulator::Bochs => run_bochs(&root, &config, &built, &cmdline, o),
    }
}

fn run_qemu(config: &Config, built: &images::Built, cmdline: &str, o: &Options) -> Result<ExitCode> {
    let (accel, why) = emulator::detect_accel();
    println!("accel: {why}");
    let mut cmd = emulator::qemu_command(config, accel, &built.hypervisor, cmdline, &built.archive)?;
    cmd.args(["-serial", "mon:stdio"]);
    if let Some(n) = o.cpus {
        cmd.args(emulator::qemu_cpus_args(n));
    }
    if o.gdb {
        cmd.args(["-s", "-S"]);
        println!(
            "gdb: QEMU waits for a debugger on tcp::1234; attach with\n  \
             gdb {} -ex 'target remote :1234'",
            built.hypervisor.display()
        );
    }
    cmd.args(&o.extra);
    println!("qemu: config {} ({}), cmdline `{cmdline}`; Ctrl-A X quits", config.name, config.path.display());
    let status = cmd.status().context(|| "cannot start qemu-system-x86_64".to_string())?;
    Ok(match status.code() {
        Some(33) => {
            println!("qemu: hypervisor reported success (exit 33)");
            ExitCode::SUCCESS
        }
        Some(35) => {
            println!("qemu: hypervisor reported failure (exit 35)");
            ExitCode::FAILURE
        }
        Some(0) => ExitCode::SUCCESS, // quit by the user (or a reset with -no-reboot)
        _ => {
            println!("qemu: exited with {status}");
            ExitCode::FAILURE
        }
    })
}

fn run_bochs(root: &Path, config: &Config, built: &images::Built, cmdline: &str, o: &Options) -> Result<ExitCode> {
    if !o.extra.is_empty() {
        bail!("extra emulator arguments are for QEMU; edit {} for Bochs", config.path.display());
    }
    let iso = images::make_iso(built, "run", cmdline)?;
    let serial = root.join(images::BUILD_DIR).join("run.serial.log");
    let rc = root.join(images::BUILD_DIR).join(format!("run.{}.bochsrc", config.name));
    let _ = std::fs::remove_file(&serial);
    emulator::write_bochsrc(config, &iso, &serial, &rc, o.cpus)?;
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
    // Bochs' own log goes to build/run.bochs.log; the serial file is echoed here.
    let log_path = root.join(images::BUILD_DIR).join("run.bochs.log");
    let log = std::fs::File::create(&log_path).context(|| format!("cannot create {}", log_path.display()))?;
    if !o.gdb {
        cmd.stdout(log.try_clone().context(|| "cannot dup log".to_string())?);
    }
    cmd.stderr(log);
    let mut child = cmd.spawn().context(|| "cannot start bochs".to_string())?;
    let mut shown = 0usize;
    let echo = |shown: &mut usize| {
        if let Ok(mut f) = std::fs::File::open(&serial) {
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).is_ok() && buf.len() > *shown {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&buf[*shown..]);
                let _ = out.flush();
                *shown = buf.len();
            }
        }
    };
    loop {
        echo(&mut shown);
        if child.try_wait().context(|| "waiting for bochs".to_string())?.is_some() {
            echo(&mut shown);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    if !log.is_empty() && !log.ends_with('\n') {
        println!();
    }
    let ok = log.lines().any(|l| l.contains("parperos: exit success"));
    println!("bochs: stopped; its log is {}", log_path.display());
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
