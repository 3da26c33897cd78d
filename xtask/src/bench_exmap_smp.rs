//! `cargo xtask bench exmap-smp` (also the end of `bench smp`): the `exmapbench` guest under
//! Bochs VMX with 1, 2 and 4 CPUs, ExMap ALLOC + FREE of single-page entries, 512 and 1 per
//! call, in three configurations: (a) one guest per CPU, (b) one guest with a vCPU per CPU
//! on one shared region, (c) the same with a region per vCPU. Prints Bochs ticks per page
//! (about one per emulated instruction; deterministic, so one boot per configuration), the
//! ratio to 1 CPU (goal <= 1.1x), and the pages the hypervisor zeroed while the guest timed.

use crate::{bail, images, Result};
use std::process::ExitCode;

/// Rounds of 512 pages per vCPU (the guest's `arg / 10`; batch 1 does 32 pages a round).
const ROUNDS: u64 = 8;

/// One vCPU's `exmapbench.result` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub guest: u64,
    pub vcpu: u64,
    pub cpu: u64,
    pub shared: bool,
    /// Ticks per page, pages, pages zeroed: 512 entries per call, then 1.
    pub b512: [u64; 3],
    pub b1: [u64; 3],
}

/// Every `exmapbench.result key=value ...` line of a serial log; a line that says FAILED, or
/// lacks a field, is an error.
pub fn parse(serial: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for line in serial.lines() {
        let Some(rest) = line.split("exmapbench.result ").nth(1) else { continue };
        if rest.contains("FAILED") {
            bail!("the bench guest failed: {line}");
        }
        let field = |key: &str| -> Option<&str> { rest.split_ascii_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')) };
        let num = |key: &str| -> Result<u64> {
            match field(key).map(str::parse::<u64>) {
                Some(Ok(v)) => Ok(v),
                _ => bail!("no number `{key}=` in `{line}`"),
            }
        };
        let shared = match field("region") {
            Some("shared") => true,
            Some("own") => false,
            _ => bail!("no `region=own|shared` in `{line}`"),
        };
        rows.push(Row {
            guest: num("guest")?,
            vcpu: num("vcpu")?,
            cpu: num("cpu")?,
            shared,
            b512: [num("b512_ticks_per_page")?, num("b512_pages")?, num("b512_zeroed")?],
            b1: [num("b1_ticks_per_page")?, num("b1_pages")?, num("b1_zeroed")?],
        });
    }
    Ok(rows)
}

/// The hypervisor's `guests=` for `config` on `cpus` CPUs: 'a' a guest per CPU, 'b' one
/// guest with a vCPU per CPU on a shared region, 'c' the same with a region per vCPU.
pub fn guests(config: char, cpus: usize) -> String {
    let arg = 10 * ROUNDS;
    match config {
        'a' => (0..cpus).map(|k| format!("exmapbench:mem=16M:arg={arg}:cpu={k}")).collect::<Vec<_>>().join(","),
        'b' => format!("exmapbench:mem=16M:vcpus={cpus}:arg={}", arg + 1),
        _ => format!("exmapbench:mem=16M:vcpus={cpus}:arg={arg}"),
    }
}

/// Mean and range of a column over the vCPUs of one boot.
fn spread(rows: &[Row], col: impl Fn(&Row) -> u64) -> (f64, u64, u64) {
    let v: Vec<u64> = rows.iter().map(col).collect();
    let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    (mean, v.iter().copied().min().unwrap_or(0), v.iter().copied().max().unwrap_or(0))
}

/// Boots every configuration of `configs` ('a', 'b', 'c') on each of `cpu_counts` CPUs (1 CPU:
/// the one baseline, config 'c').
pub fn bench(cpu_counts: &[usize], configs: &str, probe: bool) -> Result<ExitCode> {
    let root = crate::root();
    let built = {
        let _lock = images::lock_build(&root)?;
        images::build_with(false, probe.then_some("percall-probe"))?
    };
    crate::tools::require(&crate::tools::BOCHS)?;
    // 1 CPU: one guest, one vCPU, its own region: the baseline of every configuration.
    let mut runs: Vec<(char, usize, Vec<Row>)> = Vec::new();
    for &cpus in cpu_counts {
        let configs: Vec<char> = if cpus == 1 { vec!['c'] } else { configs.chars().collect() };
        for config in &configs {
            let cmdline = format!("log=warn guests={}", guests(*config, cpus));
            let start = std::time::Instant::now();
            let text = crate::bench_smp::bochs_boot(&root, &built, &format!("bench-exmap-{config}-{cpus}"), &cmdline, cpus)?;
            let rows = parse(&text)?;
            // The hypervisor's phase counters (`--probe`), printed at its end.
            for line in text.lines().filter(|l| probe && l.contains("probe ")) {
                println!("{line}");
            }
            if rows.len() != cpus {
                bail!("bochs, config ({config}) with {cpus} CPU(s): {} result lines (build/bench/bench-exmap-{config}-{cpus}.serial.log)", rows.len());
            }
            for r in &rows {
                println!("bochs-vmx ({config}) {cpus} CPU(s), guest {} vCPU {} on cpu {}{}: batch 512 {} ticks/page ({} zeroed of {}), batch 1 {} ticks/page ({} zeroed of {})",
                    r.guest, r.vcpu, r.cpu, if r.shared { ", shared region" } else { "" }, r.b512[0], r.b512[2], r.b512[1], r.b1[0], r.b1[2], r.b1[1]);
            }
            eprintln!("bench exmap-smp: ({config}) {cpus} CPU(s) took {:.0} s", start.elapsed().as_secs_f64());
            runs.push((*config, cpus, rows));
        }
    }
    let Some((_, _, base)) = runs.iter().find(|(_, c, _)| *c == 1) else { bail!("no 1-CPU run") };
    let (b512, _, _) = spread(base, |r| r.b512[0]);
    let (b1, _, _) = spread(base, |r| r.b1[0]);
    println!("\nBochs VMX ticks per page (mean over the vCPUs, min..max), ratio to 1 CPU (goal <= 1.1x); pages zeroed while timed");
    println!("{:<44} {:>24} {:>8} {:>24} {:>8} {:>8}", "configuration", "batch 512", "ratio", "batch 1", "ratio", "zeroed");
    for (config, cpus, rows) in &runs {
        let what = match (config, cpus) {
            (_, 1) => "1 guest, 1 vCPU".to_string(),
            ('a', n) => format!("(a) {n} guests, one per CPU"),
            ('b', n) => format!("(b) 1 guest, {n} vCPUs, one shared region"),
            (_, n) => format!("(c) 1 guest, {n} vCPUs, a region each"),
        };
        let (m512, lo512, hi512) = spread(rows, |r| r.b512[0]);
        let (m1, lo1, hi1) = spread(rows, |r| r.b1[0]);
        // A shared region's counter is every vCPU's: count it once.
        let zeroed: u64 = match config {
            'b' => rows.iter().map(|r| r.b512[2] + r.b1[2]).max().unwrap_or(0),
            _ => rows.iter().map(|r| r.b512[2] + r.b1[2]).sum(),
        };
        let pages: u64 = rows.iter().map(|r| r.b512[1] + r.b1[1]).sum();
        println!("{:<44} {:>24} {:>7.2}x {:>24} {:>7.2}x {:>8}",
            what, format!("{m512:.0} ({lo512}..{hi512})"), m512 / b512.max(1.0), format!("{m1:.0} ({lo1}..{hi1})"), m1 / b1.max(1.0), format!("{zeroed}/{pages}"));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_result_lines() {
        let serial = "[guest 0 exmapbench] exmapbench.result guest=0 vcpu=0 cpu=0 region=own b512_ticks_per_page=546 b512_pages=4096 b512_zeroed=0 b1_ticks_per_page=7153 b1_pages=256 b1_zeroed=3\n\
                      noise\n\
                      [guest 0 exmapbench vcpu 1] exmapbench.result guest=0 vcpu=1 cpu=1 region=shared b512_ticks_per_page=1083 b512_pages=4096 b512_zeroed=12 b1_ticks_per_page=9000 b1_pages=256 b1_zeroed=0\n";
        let rows = parse(serial).expect("parses");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], Row { guest: 0, vcpu: 0, cpu: 0, shared: false, b512: [546, 4096, 0], b1: [7153, 256, 3] });
        assert!(rows[1].shared);
        assert_eq!(rows[1].b512, [1083, 4096, 12]);
        // `b1_zeroed` must not be read as `b1_zeroed_x`, nor `b512_pages` as `pages`.
        let odd = "exmapbench.result guest=0 vcpu=0 cpu=0 region=own b512_ticks_per_page=1 b512_pages=2 b512_zeroed=3 b1_ticks_per_page=4 b1_pages=5 b1_zeroed_x=9 b1_zeroed=6";
        assert_eq!(parse(odd).expect("parses")[0].b1, [4, 5, 6]);
        assert!(parse("exmapbench.result guest=0 vcpu=0 cpu=0 region=own b512_ticks_per_page=1 FAILED").is_err());
        assert!(parse("exmapbench.result guest=0 vcpu=0 cpu=0 region=own b512_ticks_per_page=x b512_pages=2 b512_zeroed=3 b1_ticks_per_page=4 b1_pages=5 b1_zeroed=6").is_err());
        assert!(parse("exmapbench.result guest=0 vcpu=0 cpu=0 b512_ticks_per_page=1 b512_pages=2 b512_zeroed=3 b1_ticks_per_page=4 b1_pages=5 b1_zeroed=6").is_err());
        assert!(parse("no results here").expect("parses").is_empty());
    }

    #[test]
    fn configurations() {
        assert_eq!(guests('a', 2), "exmapbench:mem=16M:arg=80:cpu=0,exmapbench:mem=16M:arg=80:cpu=1");
        assert_eq!(guests('b', 4), "exmapbench:mem=16M:vcpus=4:arg=81");
        assert_eq!(guests('c', 2), "exmapbench:mem=16M:vcpus=2:arg=80");
    }
}
