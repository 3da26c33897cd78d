//! `cargo xtask bench smp`: boots the `smpbench` guest under QEMU TCG (the SVM backend) with
//! 1 CPU (one vCPU) and with 2 CPUs (two vCPUs, one on each, measuring at once), in
//! interleaved rounds, and prints per CPU the hypervisor's morsel create+destroy rate (4 KiB
//! and 2 MiB pages: the frame allocator through that CPU's core index, table writes) and
//! unmount+open rate (each unmount one TLB shootdown), and the hypervisor's shootdown figures
//! (IPIs per shootdown, microseconds per shootdown); and, first, with all vCPUs at once, the
//! frame allocator alone measured inside the hypervisor (`bench_frames`, hypervisor command
//! line `bench=on`): 4 KiB and 2 MiB frame alloc+free pairs per second through each CPU's own
//! allocator core, no lock held. Medians over the rounds; the host's core count beside them:
//! TCG's vCPUs compete for those cores with everything else. Then the Bochs figures, and
//! last the ExMap rows of `bench_exmap_smp` (Bochs, 1, 2 and 4 CPUs).

use crate::machine::{Machine, SerialFrom};
use crate::emulator::{self, Accel, Config};
use std::time::Duration;
use crate::{bail, images, Context, Result};
use std::process::ExitCode;

/// One boot's figures: per vCPU (4 KiB, 2 MiB, unmount+open per second), shootdown line.
struct Boot {
    vcpus: Vec<[u64; 3]>,
    /// Per vCPU: 4 KiB pairs/s, ns per 4 KiB pair, 2 MiB pairs/s, ns per 2 MiB pair.
    frames: Vec<[u64; 4]>,
    ipis_per_shootdown: Option<f64>,
    us_per_shootdown: Option<u64>,
    /// Per vCPU: TSC ticks per 4 KiB create+destroy, 2 MiB create+destroy, unmount+open.
    ticks: Vec<[u64; 3]>,
}

fn number_before(line: &str, suffix: &str) -> Option<u64> {
    let end = line.find(suffix)?;
    let start = line[..end].rfind(' ')? + 1;
    line[start..end].parse().ok()
}

fn parse(serial: &str) -> Result<Boot> {
    let mut vcpus = Vec::new();
    let mut b = Boot { vcpus: Vec::new(), frames: Vec::new(), ipis_per_shootdown: None, us_per_shootdown: None, ticks: Vec::new() };
    for line in serial.lines() {
        if let Some(rest) = line.rfind("smpbench vcpu ").map(|i| &line[i..]).filter(|r| r.contains("frame alloc+free")) {
            if rest.contains("FAILED") {
                bail!("the bench guest failed: {line}");
            }
            // `... 4 KiB R/s (N ns), 2 MiB R/s (N ns) (P pairs each)`
            let small = rest.split("4 KiB ").nth(1).unwrap_or("");
            let huge = rest.split("2 MiB ").nth(1).unwrap_or("");
            let rate = |t: &str| t.split("/s").next().and_then(|v| v.parse().ok());
            let ns = |t: &str| t.split(" ns)").next().and_then(|v| v.rsplit('(').next()).and_then(|v| v.parse().ok());
            match (rate(small), ns(small), rate(huge), ns(huge)) {
                (Some(a), Some(b2), Some(c), Some(d)) => b.frames.push([a, b2, c, d]),
                _ => bail!("cannot read `{line}`"),
            }
        }
        // The console prefix of a vCPU's line (`[guest 0 smpbench vcpu 1]`) says it too.
        if let Some(rest) = line.rfind("smpbench vcpu ").map(|i| &line[i..]).filter(|r| r.contains("create+destroy")) {
            if rest.contains("FAILED") {
                bail!("the bench guest failed: {line}");
            }
            let small = number_before(rest, "/s, 2 MiB");
            let huge = number_before(rest, "/s, unmount");
            let remount = number_before(rest, "/s (");
            match (small, huge, remount) {
                (Some(s), Some(h), Some(r)) => vcpus.push([s, h, r]),
                _ => bail!("cannot read `{line}`"),
            }
        }
        if let Some(rest) = line.split("morsel ticks per op: ").nth(1) {
            // `small S huge H remount R`
            let word = |k: &str| rest.split(&format!("{k} ")).nth(1).and_then(|w| w.split(' ').next()).and_then(|v| v.trim().parse().ok());
            match (word("small"), word("huge"), word("remount")) {
                (Some(s), Some(h), Some(r)) => b.ticks.push([s, h, r]),
                _ => bail!("cannot read `{line}`"),
            }
        }
        if let Some(rest) = line.split("stats shootdowns: ").nth(1) {
            // `N (M IPIs, a.bc IPIs per shootdown, T us per shootdown)`
            b.ipis_per_shootdown = rest.split(", ").nth(1).and_then(|w| w.split(' ').next()).and_then(|v| v.parse().ok());
            b.us_per_shootdown = rest.split(", ").nth(2).and_then(|w| w.split(' ').next()).and_then(|v| v.parse().ok());
        }
    }
    b.vcpus = vcpus;
    Ok(b)
}

/// Per vCPU: Bochs ticks per CPUID exit and per `info` hypercall (`null exits:` lines).
fn parse_exits(serial: &str) -> Result<Vec<[u64; 2]>> {
    let mut out = Vec::new();
    for line in serial.lines() {
        if let Some(rest) = line.split("null exits: CPUID ").nth(1) {
            // `C ticks, info I ticks per exit (N each)`
            let cpuid = rest.split(' ').next().and_then(|v| v.parse().ok());
            let info = rest.split("info ").nth(1).and_then(|r| r.split(' ').next()).and_then(|v| v.parse().ok());
            match (cpuid, info) {
                (Some(c), Some(i)) => out.push([c, i]),
                _ => bail!("cannot read `{line}`"),
            }
        }
    }
    Ok(out)
}

/// `cargo xtask bench exits`: the smpbench guest under Bochs VMX with 1 CPU and with 2 CPUs
/// (one vCPU each, exiting at the same time): Bochs ticks (about one per emulated
/// instruction, deterministic) per CPUID exit and per `info` hypercall. With 2 CPUs Bochs
/// emulates both in one thread, so a CPU's ticks per exit double even when nothing is shared;
/// what is shared (a lock both spin on) adds to that.
pub fn bench_exits() -> Result<ExitCode> {
    let root = crate::root();
    let built = {
        let _lock = images::lock_build(&root)?;
        images::build_all(false)?
    };
    crate::tools::require(&crate::tools::BOCHS)?;
    for cpus in [1usize, 2] {
        let cmdline = format!("log=warn guests=smpbench:vcpus={cpus}:mem=64M:arg=25");
        let text = bochs_boot(&root, &built, &format!("bench-exits-{cpus}"), &cmdline, cpus)?;
        let rows = parse_exits(&text)?;
        if rows.len() != cpus {
            bail!("bochs with {cpus} CPU(s): {} null-exit lines", rows.len());
        }
        for (v, r) in rows.iter().enumerate() {
            println!("bochs-vmx, {cpus} CPU(s) exiting at once, vCPU {v}: {} ticks per CPUID exit, {} ticks per info hypercall", r[0], r[1]);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask bench smp-bochs [--log LEVEL]`: only the Bochs part of `bench smp` (`bochs`),
/// at log level `log` (`bench smp`: `warn`).
pub fn bench_bochs(log: &str) -> Result<ExitCode> {
    let root = crate::root();
    let built = {
        let _lock = images::lock_build(&root)?;
        images::build_all(false)?
    };
    bochs(&root, &built, log)?;
    Ok(ExitCode::SUCCESS)
}

/// Boots `cmdline` under Bochs VMX with `cpus` CPUs and returns the serial log.
pub(crate) fn bochs_boot(root: &std::path::Path, built: &images::Built, name: &str, cmdline: &str, cpus: usize) -> Result<String> {
    let config = Config::resolve(root, "bochs-vmx")?;
    let iso = images::make_iso(built, name, cmdline)?;
    let dir = root.join(images::BUILD_DIR).join("bench");
    std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    let serial = dir.join(format!("{name}.serial.log"));
    let rc = dir.join(format!("{name}.bochsrc"));
    let _ = std::fs::remove_file(&serial);
    emulator::write_bochsrc(&config, &iso, &serial, &rc, Some(cpus))?;
    let mut cmd = emulator::bochs_command(root, &rc, true)?;
    let log = bochs_log(&dir, name, &mut cmd)?;
    cmd.current_dir(&dir).stdin(std::process::Stdio::null());
    let (ended, text) = Machine::spawn_bochs(root, cmd, serial, Some(&log))?.run_to_end(Some(Duration::from_secs(600)))?;
    if ended.is_none() {
        bail!("bochs with {cpus} CPU(s) did not finish in 600 s");
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Sends Bochs' own log (its stdout and stderr) to `dir/NAME.bochs.log`, which
/// [`emulator::BochsStart`] reads; returns the path. Shared with `bench_bufmgr`.
pub(crate) fn bochs_log(dir: &std::path::Path, name: &str, cmd: &mut std::process::Command) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.bochs.log"));
    let file = std::fs::File::create(&path).context(|| format!("cannot create {}", path.display()))?;
    cmd.stdout(file.try_clone().context(|| "cannot dup the Bochs log".to_string())?).stderr(file);
    Ok(path)
}

/// The median of `v` (0 if empty); shared with `bench_ipc`.
pub(crate) fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// What the in-emulator benches (`bench smp`, `bench ipc`) start from: QEMU present, the
/// images built, the `qemu-svm` config.
pub(crate) fn qemu_svm_setup() -> Result<(std::path::PathBuf, images::Built, Config)> {
    let root = crate::root();
    crate::tools::require(&crate::tools::QEMU)?;
    let built = {
        let _lock = images::lock_build(&root)?;
        images::build_all(false)?
    };
    let config = Config::resolve(&root, "qemu-svm")?;
    Ok((root, built, config))
}

pub fn bench(rounds: usize) -> Result<ExitCode> {
    let (root, built, config) = qemu_svm_setup()?;
    let mut runs: Vec<(usize, Boot)> = Vec::new();
    for round in 1..=rounds {
        for cpus in [1usize, 2] {
            let cmdline = format!("bench=on guests=smpbench:vcpus={cpus}:mem=64M");
            let mut boot = emulator::QemuBoot::new(&built.hypervisor, &cmdline, &built.archive, "stdio");
            boot.cpus = Some(cpus);
            let mut cmd = emulator::qemu_command(&config, Accel::Tcg, &boot)?;
            cmd.stdin(std::process::Stdio::null());
            let (ended, serial) = Machine::spawn(cmd, SerialFrom::Stdout)?.run_to_end(None)?;
            let serial = String::from_utf8_lossy(&serial);
            if ended.and_then(|e| e.status.code()) != Some(33) {
                bail!("the bench boot with {cpus} CPU(s) did not end with success:\n{serial}");
            }
            runs.push((cpus, parse(&serial)?));
        }
        eprintln!("bench smp: round {round} of {rounds} done");
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("bench smp: QEMU TCG, SVM backend; medians of {rounds} interleaved round(s); this host has {cores} core(s), shared");
    println!("{:<22} {:>22} {:>22} {:>18} {:>14} {:>14}", "run", "4 KiB create+destroy/s", "2 MiB create+destroy/s", "unmount+open/s", "IPIs/shootdown", "us/shootdown");
    for cpus in [1usize, 2] {
        let boots: Vec<&Boot> = runs.iter().filter(|(c, _)| *c == cpus).map(|(_, b)| b).collect();
        for v in 0..cpus {
            let col = |k: usize| median(boots.iter().filter_map(|b| b.vcpus.get(v).map(|r| r[k])).collect());
            let ipis = boots.iter().filter_map(|b| b.ipis_per_shootdown).fold(0.0, f64::max);
            let us = median(boots.iter().filter_map(|b| b.us_per_shootdown).collect());
            println!("{:<22} {:>22} {:>22} {:>18} {:>14.2} {:>14}", format!("{cpus} CPU(s), vCPU {v}"), col(0), col(1), col(2), ipis, us);
        }
    }
    println!("(per CPU; with 2 CPUs both measure at the same time. The hypervisor's own counters: `stats shootdowns` in the serial log.)");
    println!("{:<22} {:>24} {:>24}", "run", "4 KiB frame alloc+free/s", "2 MiB frame alloc+free/s");
    for cpus in [1usize, 2] {
        let boots: Vec<&Boot> = runs.iter().filter(|(c, _)| *c == cpus).map(|(_, b)| b).collect();
        for v in 0..cpus {
            let col = |k: usize| median(boots.iter().filter_map(|b| b.frames.get(v).map(|r| r[k])).collect());
            println!("{:<22} {:>24} {:>24}", format!("{cpus} CPU(s), vCPU {v}"), col(0), col(2));
        }
    }
    println!("(inside the hypervisor, `bench_frames`: each CPU through its own allocator core, no lock, all CPUs at once; {cores} host core(s))");
    bochs(&root, &built, "warn")?;
    crate::bench_exmap_smp::bench(&[1, 2, 4], "abc", false)
}

/// The same boots under Bochs (VMX backend), once each: Bochs' virtual clock (`clock:
/// sync=none`) advances with the instructions it emulates, so the guest's rates there are per
/// emulated second, independent of the host's load, and the 2-CPU/1-CPU ratio of the time per
/// operation says whether CPUs slow each other down (retries, lock spins): goal <= 1.1x.
/// At `log=warn`: the morsel manager's INFO lines (four per create+destroy) would otherwise
/// go out at the emulated UART's baud rate and make the ratio the serial port's.
/// Two 2-CPU configurations: (b) one guest with a vCPU per CPU (each unmount shoots down the
/// other CPU and waits for it: inherent to one second-level table per guest), and (a) a
/// guest per CPU (`cpu=K`: every unmount flushes locally, so what is left is the world lock
/// and the hypervisor's shared state). Ratios from the guests' TSC ticks per operation.
fn bochs(root: &std::path::Path, built: &images::Built, log: &str) -> Result<()> {
    crate::tools::require(&crate::tools::BOCHS)?;
    let config = Config::resolve(root, "bochs-vmx")?;
    let runs: [(&str, usize, String); 3] = [
        ("1 CPU", 1, "smpbench:vcpus=1:mem=64M:arg=50".to_string()),
        ("2 CPUs, one guest (b)", 2, "smpbench:vcpus=2:mem=64M:arg=50".to_string()),
        ("2 CPUs, a guest each (a)", 2, "smpbench:mem=64M:arg=50:cpu=0,smpbench:mem=64M:arg=50:cpu=1".to_string()),
    ];
    let mut ticks: Vec<[f64; 3]> = Vec::new();
    let mut frame_ns: Vec<[f64; 2]> = Vec::new();
    for (k, (label, cpus, guests)) in runs.iter().enumerate() {
        let cpus = *cpus;
        let cmdline = format!("bench=on log={log} guests={guests}");
        let name = format!("bench-smp-{cpus}{}", ["", "b", "a"][k]);
        let iso = images::make_iso(built, &name, &cmdline)?;
        let dir = root.join(images::BUILD_DIR).join("bench");
        std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
        let serial = dir.join(format!("{name}.serial.log"));
        let rc = dir.join(format!("{name}.bochsrc"));
        let _ = std::fs::remove_file(&serial);
        emulator::write_bochsrc(&config, &iso, &serial, &rc, Some(cpus))?;
        let mut cmd = emulator::bochs_command(root, &rc, true)?;
        let log = bochs_log(&dir, &name, &mut cmd)?;
        cmd.current_dir(&dir).stdin(std::process::Stdio::null());
        let (ended, text) = Machine::spawn_bochs(root, cmd, serial.clone(), Some(&log))?.run_to_end(Some(Duration::from_secs(900)))?;
        if ended.is_none() {
            bail!("bochs with {cpus} CPU(s) did not finish in 900 s");
        }
        let text = String::from_utf8_lossy(&text);
        let b = parse(&text)?;
        if b.vcpus.len() != cpus || b.ticks.len() != cpus {
            bail!("bochs, {label}: {} bench lines, {} ticks lines in {}", b.vcpus.len(), b.ticks.len(), serial.display());
        }
        for (v, r) in b.vcpus.iter().enumerate() {
            let t = b.ticks[v];
            println!("bochs-vmx, {label}, vCPU {v}: {} / {} / {} per emulated second, {} / {} / {} ticks per operation (4 KiB, 2 MiB create+destroy, unmount+open)",
                r[0], r[1], r[2], t[0], t[1], t[2]);
        }
        if b.frames.len() != cpus {
            bail!("bochs, {label}: {} frame bench lines in {}", b.frames.len(), serial.display());
        }
        for (v, r) in b.frames.iter().enumerate() {
            println!("bochs-vmx, {label}, vCPU {v}: frame alloc+free {} ns (4 KiB), {} ns (2 MiB) of emulated time per pair", r[1], r[3]);
        }
        if let (Some(n), Some(us)) = (b.ipis_per_shootdown, b.us_per_shootdown) {
            println!("bochs-vmx, {label}: {n:.2} IPIs per shootdown, {us} us per shootdown");
        }
        let avg = |k: usize| b.frames.iter().map(|r| r[k] as f64).sum::<f64>() / cpus as f64;
        frame_ns.push([avg(1), avg(3)]);
        let mean = |k: usize| b.ticks.iter().map(|t| t[k] as f64).sum::<f64>() / cpus as f64;
        ticks.push([mean(0), mean(1), mean(2)]);
    }
    for (k, (label, _, _)) in runs.iter().enumerate().skip(1) {
        let r = |i: usize| ticks[k][i] / ticks[0][i].max(1.0);
        println!("bochs-vmx: ticks per operation, {label} vs 1 CPU: 4 KiB create+destroy {:.2}x ({:.0} vs {:.0}), 2 MiB create+destroy {:.2}x, unmount+open {:.2}x ({:.0} vs {:.0}) (goal <= 1.1x)",
            r(0), ticks[k][0], ticks[0][0], r(1), r(2), ticks[k][2], ticks[0][2]);
        println!("bochs-vmx: emulated time per frame alloc+free inside the hypervisor, {label} vs 1 CPU: {:.2}x (4 KiB), {:.2}x (2 MiB) (goal <= 1.1x)",
            frame_ns[k][0] / frame_ns[0][0].max(1.0), frame_ns[k][1] / frame_ns[0][1].max(1.0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_guest_and_hypervisor_lines() {
        let serial = "[guest 0 smpbench] smpbench vcpu 0 cpu 0: 4 KiB morsel create+destroy 1234/s, 2 MiB morsel create+destroy 567/s, unmount+open 89/s (200 calls each)\n\
                      [guest 0 smpbench vcpu 1] smpbench vcpu 1 cpu 1: 4 KiB morsel create+destroy 1000/s, 2 MiB morsel create+destroy 500/s, unmount+open 80/s (200 calls each)\n\
                      [guest 0 smpbench] smpbench vcpu 0 cpu 0: frame alloc+free 4 KiB 5000000/s (200 ns), 2 MiB 2500000/s (400 ns) (12800 pairs each)\n\
                      [guest 1 smpbench] smpbench vcpu 0 cpu 1 guest 1: morsel ticks per op: small 27000 huge 900000 remount 4100\n\
                      [    1.0] INFO  morsel: stats shootdowns: 400 (400 IPIs, 1.00 IPIs per shootdown, 35 us per shootdown)\n";
        let b = parse(serial).expect("parses");
        assert_eq!(b.vcpus, vec![[1234, 567, 89], [1000, 500, 80]]);
        assert_eq!(b.frames, vec![[5000000, 200, 2500000, 400]]);
        assert_eq!(b.ipis_per_shootdown, Some(1.0));
        assert_eq!(b.us_per_shootdown, Some(35));
        assert_eq!(b.ticks, vec![[27000, 900000, 4100]]);
        assert!(parse("smpbench vcpu 0 cpu 1 guest 1: morsel ticks per op: small 1 huge x remount 3").is_err());
        assert!(parse("smpbench vcpu 0 cpu 0: frame alloc+free: Err(NoMemory) Ok(1) FAILED").is_err());
        let exits = "[guest 0 smpbench vcpu 1] smpbench vcpu 1 cpu 1: null exits: CPUID 4100 ticks, info 5200 ticks per exit (500 each)\n";
        assert_eq!(parse_exits(exits).expect("parses"), vec![[4100, 5200]]);
        assert!(parse_exits("null exits: CPUID x ticks").is_err());
        assert!(parse("smpbench vcpu 0 cpu 0: 4 KiB morsel create+destroy 1/s, 2 MiB morsel create+destroy 1/s, unmount+open 1/s (2 calls each) FAILED").is_err());
    }
}
