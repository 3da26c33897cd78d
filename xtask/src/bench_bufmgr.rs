//! `cargo xtask bench bufmgr`: the vmcache-style buffer manager (guest `bmtree`: a B+-tree of
//! 131,072 records of 8 + 120 bytes in 4,247 pages, a shared pool of 512 pages, uniform random
//! lookups, each checked) with 1, 2 and 4 vCPUs.
//! - QEMU TCG (`qemu-iommu`: SVM plus VT-d, which ExMap READ needs; an NVMe drive with a fresh
//!   32 MiB image per boot; as many CPUs as vCPUs), interleaved rounds, medians: lookups/s and
//!   pages read/s (READ from the disk on a miss, FREE in batches of 64), exits and
//!   invalidations per 1,000 lookups. TCG's CPUs share this host's cores with everything else.
//! - Bochs (`bochs-vmx`, as many CPUs as vCPUs, once each): Bochs has no NVMe disk, so the
//!   guest runs in `alloc` mode (a miss is ExMap ALLOC + the node written by the guest's
//!   deterministic generator). Its TSC advances with emulated instructions, so TSC ticks per
//!   lookup (elapsed over all vCPUs' lookups) give the scaling 1 -> 2 -> 4, independent of
//!   the host's load.

use crate::bench_smp::{median, qemu_svm_setup};
use crate::emulator::{self, Accel, Config};
use crate::machine::{Machine, SerialFrom};
use crate::{bail, images, Context, Result};
use std::process::ExitCode;
use std::time::Duration;

/// vCPU counts measured.
const VCPUS: [usize; 3] = [1, 2, 4];
/// Lookups per vCPU in the measured phase (QEMU, Bochs).
const QEMU_LOOKUPS: u64 = 2000;
const BOCHS_LOOKUPS: u64 = 1500;

/// The guest's `bmtree result:` line.
#[derive(Debug, Default, Clone, PartialEq)]
struct Figures {
    vcpus: u64,
    lookups: u64,
    ticks_per_lookup: u64,
    lookups_per_s: u64,
    pages_per_s: u64,
    /// Per 1,000 lookups, in hundredths.
    exits: u64,
    invalidations: u64,
    pages: u64,
    /// TSC ticks per ExMap call (the vCPU's view: waits for the world lock and Busy included)
    /// and in ExMap calls per lookup (summed over the vCPUs).
    ticks_per_call: u64,
    call_ticks_per_lookup: u64,
}

fn hundredths(v: &str) -> Option<u64> {
    let (i, f) = v.split_once('.')?;
    Some(i.parse::<u64>().ok()? * 100 + f.parse::<u64>().ok()?)
}

fn parse(serial: &str) -> Result<Figures> {
    if let Some(l) = serial.lines().find(|l| l.contains("FAILED")) {
        bail!("the bench guest failed: {l}");
    }
    // The console may wrap a long line: join the guest's lines before looking.
    let joined: String = serial.lines().map(|l| l.strip_prefix("[guest 0 bmtree] ").unwrap_or(l)).collect::<Vec<_>>().join("");
    let Some(rest) = joined.split("bmtree result: ").nth(1) else { bail!("no `bmtree result:` line in the serial log:\n{serial}") };
    let mut f = Figures::default();
    for word in rest.split(' ') {
        let Some((k, v)) = word.split_once('=') else { break };
        let v = v.trim_end_matches(|c: char| !c.is_ascii_digit());
        match k {
            "vcpus" => f.vcpus = v.parse().unwrap_or(0),
            "lookups" => f.lookups = v.parse().unwrap_or(0),
            "ticks/lookup" => f.ticks_per_lookup = v.parse().unwrap_or(0),
            "lookups/s" => f.lookups_per_s = v.parse().unwrap_or(0),
            "pages/s" => f.pages_per_s = v.parse().unwrap_or(0),
            "exits/1k" => f.exits = hundredths(v).unwrap_or(0),
            "invalidations/1k" => f.invalidations = hundredths(v).unwrap_or(0),
            "pages/1k" => f.pages = hundredths(v).unwrap_or(0),
            "exmap-ticks/call" => f.ticks_per_call = v.parse().unwrap_or(0),
            "exmap-ticks/lookup" => f.call_ticks_per_lookup = v.parse().unwrap_or(0),
            _ => {}
        }
        if k == "exmap-ticks/lookup" {
            break;
        }
    }
    if f.vcpus == 0 || f.lookups == 0 || f.ticks_per_lookup == 0 {
        bail!("cannot read the `bmtree result:` line in:\n{serial}");
    }
    Ok(f)
}

fn h(v: u64) -> String {
    format!("{}.{:02}", v / 100, v % 100)
}

pub fn bench(rounds: usize) -> Result<ExitCode> {
    let (root, built, _) = qemu_svm_setup()?;
    let config = Config::resolve(&root, "qemu-iommu")?;
    let dir = root.join(images::BUILD_DIR).join("bench");
    std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    let disk = dir.join("bufmgr-disk.img");
    let mut runs: Vec<Figures> = Vec::new();
    for round in 1..=rounds {
        for cpus in VCPUS {
            crate::disk::create(&disk, 32 << 20)?;
            let cmdline = format!("log=warn guests=bmtree:vcpus={cpus}:arg={}", QEMU_LOOKUPS * 10);
            let mut boot = emulator::QemuBoot::new(&built.hypervisor, &cmdline, &built.archive, "stdio");
            boot.cpus = Some(cpus);
            boot.disk = Some(&disk);
            let mut cmd = emulator::qemu_command(&config, Accel::Tcg, &boot)?;
            cmd.stdin(std::process::Stdio::null());
            let (ended, serial) = Machine::spawn(cmd, SerialFrom::Stdout)?.run_to_end(None)?;
            let serial = String::from_utf8_lossy(&serial);
            if ended.and_then(|e| e.status.code()) != Some(33) {
                bail!("the bench boot with {cpus} vCPU(s) did not end with success:\n{serial}");
            }
            let problems = crate::disk::check(&disk, &[])?;
            if !problems.is_empty() {
                bail!("the bench boot with {cpus} vCPU(s) left the disk changed: {}", problems.join("; "));
            }
            runs.push(parse(&serial)?);
        }
        eprintln!("bench bufmgr: round {round} of {rounds} done");
    }
    let _ = std::fs::remove_file(&disk);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("bench bufmgr: QEMU TCG, qemu-iommu (SVM + VT-d), pages READ from NVMe; {QEMU_LOOKUPS} lookups per vCPU; medians of {rounds} interleaved round(s); this host has {cores} core(s), shared");
    println!("{:<8} {:>10} {:>10} {:>12} {:>12} {:>15} {:>14} {:>12}", "vCPUs", "lookups/s", "pages/s", "pages/s x1", "exits/1k", "invalid./1k", "pages/1k", "lookups/s x1");
    let med = |cpus: usize, k: fn(&Figures) -> u64| median(runs.iter().filter(|f| f.vcpus == cpus as u64).map(k).collect());
    let (base_l, base_p) = (med(1, |f| f.lookups_per_s).max(1), med(1, |f| f.pages_per_s).max(1));
    for cpus in VCPUS {
        let (l, p) = (med(cpus, |f| f.lookups_per_s), med(cpus, |f| f.pages_per_s));
        println!("{:<8} {:>10} {:>10} {:>12.2} {:>12} {:>15} {:>14} {:>12.2}", cpus, l, p, p as f64 / base_p as f64,
            h(med(cpus, |f| f.exits)), h(med(cpus, |f| f.invalidations)), h(med(cpus, |f| f.pages)), l as f64 / base_l as f64);
    }
    bochs(&root, &built)?;
    Ok(ExitCode::SUCCESS)
}

/// Bochs VMX with 1, 2, 4 CPUs, once each, `alloc` mode: TSC ticks per lookup.
fn bochs(root: &std::path::Path, built: &images::Built) -> Result<()> {
    crate::tools::require(&crate::tools::BOCHS)?;
    let config = Config::resolve(root, "bochs-vmx")?;
    let dir = root.join(images::BUILD_DIR).join("bench");
    let mut per_lookup = Vec::new();
    println!("bench bufmgr: Bochs (bochs-vmx), pages by ExMap ALLOC + the guest's generator (no NVMe under Bochs); {BOCHS_LOOKUPS} lookups per vCPU; one boot each");
    println!("{:<8} {:>14} {:>9} {:>10} {:>12} {:>10} {:>18} {:>20} {:>7}", "vCPUs", "ticks/lookup", "speed-up", "exits/1k", "invalid./1k", "pages/1k", "ExMap ticks/call", "ExMap ticks/lookup", "wall s");
    for cpus in VCPUS {
        let cmdline = format!("log=warn guests=bmtree:vcpus={cpus}:arg={}", BOCHS_LOOKUPS * 10 + 2);
        let name = format!("bench-bufmgr-{cpus}");
        let iso = images::make_iso(built, &name, &cmdline)?;
        let serial = dir.join(format!("{name}.serial.log"));
        let rc = dir.join(format!("{name}.bochsrc"));
        let _ = std::fs::remove_file(&serial);
        emulator::write_bochsrc(&config, &iso, &serial, &rc, Some(cpus))?;
        let mut cmd = emulator::bochs_command(root, &rc, true)?;
        let log = crate::bench_smp::bochs_log(&dir, &name, &mut cmd)?;
        cmd.current_dir(&dir).stdin(std::process::Stdio::null());
        let mut m = Machine::spawn_bochs(root, cmd, serial.clone(), Some(&log))?;
        let start = m.started;
        let (ended, text) = m.run_to_end(Some(Duration::from_secs(900)))?;
        if ended.is_none() {
            bail!("bochs with {cpus} CPU(s) did not finish in 900 s");
        }
        let text = String::from_utf8_lossy(&text);
        let f = parse(&text)?;
        per_lookup.push(f.ticks_per_lookup);
        println!("{:<8} {:>14} {:>9.2} {:>10} {:>12} {:>10} {:>18} {:>20} {:>7.0}", cpus, f.ticks_per_lookup, per_lookup[0] as f64 / f.ticks_per_lookup as f64,
            h(f.exits), h(f.invalidations), h(f.pages), f.ticks_per_call, f.call_ticks_per_lookup, start.elapsed().as_secs_f64());
    }
    println!("(ticks/lookup: emulated TSC ticks from the start of the measured phase until every vCPU finished, over all vCPUs' lookups; speed-up = 1-vCPU ticks/lookup over N-vCPU;");
    println!(" ExMap ticks: what the vCPUs spent inside ExMap calls, per call and per lookup summed over the vCPUs: the part that the hypervisor's world lock serialises)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_result_line_also_when_wrapped() {
        let serial = "[guest 0 bmtree] bmtree result: vcpus=2 mode=read lookups=3000 ticks=10390502385 ticks/lookup=3463500 lookups/s=652 pages/s=578 exits/1k=4658.66 invalidations/1k=13.66 pages/1k=\n\
                      [guest 0 bmtree] 886.66 exmap-calls=2700 exmap-ticks/call=5000 exmap-ticks/lookup=4500\n[guest 0 bmtree] bmtree: done\n";
        let f = parse(serial).expect("parses");
        assert_eq!(f, Figures { vcpus: 2, lookups: 3000, ticks_per_lookup: 3463500, lookups_per_s: 652, pages_per_s: 578, exits: 465866, invalidations: 1366, pages: 88666, ticks_per_call: 5000, call_ticks_per_lookup: 4500 });
        assert!(parse("[guest 0 bmtree] bmtree: FAILED: x\n").is_err());
        assert!(parse("nothing\n").is_err());
    }
}
