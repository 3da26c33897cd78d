//! `cargo xtask bench ipc`: inter-guest communication under QEMU TCG (the SVM backend), in
//! interleaved rounds. Ping-pong between two guests over a shared page (the `channel` guest,
//! roles 2-5): round trips per second and VM exits per round trip (ping's + pong's), the
//! other side woken by doorbell + `wait` or found by `yield` polling, on 1 CPU (both guests
//! take turns) and on 2 (one guest each, a doorbell wakes the other CPU by IPI). Then what an
//! idle system costs the host: two guests idle for 3 s each, parked in `sleep` or polling
//! with `yield` (roles 6 and 7), and the host CPU time QEMU used for the boot (user + system,
//! from `wait4`), beside its wall time. Medians over the rounds; the host's core count beside
//! them (TCG's vCPUs compete with everything else on the host).

use crate::machine::{Machine, SerialFrom};
use crate::emulator::{self, Accel, Config};
use crate::bench_smp::median;
use crate::{bail, images, Result};
use std::process::ExitCode;

/// What one ping-pong boot printed: round trips per second, ping's and pong's exits per
/// round trip (in hundredths).
#[derive(Debug, PartialEq)]
struct PingPong {
    per_second: u64,
    ping_exits: u64,
    pong_exits: u64,
}

/// `A.BC` before `suffix` as hundredths.
fn hundredths_before(line: &str, suffix: &str) -> Option<u64> {
    let end = line.find(suffix)?;
    let word = line[..end].trim_end().rsplit(' ').next()?;
    let (int, frac) = word.split_once('.')?;
    Some(int.parse::<u64>().ok()? * 100 + frac.parse::<u64>().ok()?)
}

fn parse_pingpong(serial: &str) -> Result<PingPong> {
    let (mut per_second, mut ping_exits, mut pong_exits) = (None, None, None);
    for line in serial.lines() {
        if let Some(rest) = line.split(" round trips in ").nth(1) {
            per_second = rest.split(": ").nth(1).and_then(|w| w.split(' ').next()).and_then(|v| v.parse().ok());
            ping_exits = hundredths_before(rest, " exits per round trip");
        } else if let Some(rest) = line.split(": pong ").nth(1) {
            pong_exits = hundredths_before(rest, " exits per round trip");
        }
    }
    match (per_second, ping_exits, pong_exits) {
        (Some(per_second), Some(ping_exits), Some(pong_exits)) => Ok(PingPong { per_second, ping_exits, pong_exits }),
        _ => bail!("no ping-pong figures in the serial log:\n{serial}"),
    }
}

/// The idle lines of a boot: how many guests were idle at least the asked time, and their
/// exits in total.
fn parse_idle(serial: &str, mode: &str) -> Result<(usize, u64)> {
    let prefix = format!("idle {mode}: ");
    let mut n = 0;
    let mut exits = 0;
    for line in serial.lines() {
        if let Some(rest) = line.split(&prefix).nth(1) {
            let e = rest.split(", ").nth(1).and_then(|w| w.split(' ').next()).and_then(|v| v.parse::<u64>().ok());
            match e {
                Some(e) => exits += e,
                None => bail!("cannot read `{line}`"),
            }
            n += 1;
        }
    }
    Ok((n, exits))
}

/// Boots `cmdline` with `cpus` CPUs; the serial log, the wall time and QEMU's CPU time
/// (user + system) in milliseconds.
fn boot(config: &Config, built: &images::Built, cmdline: &str, cpus: usize) -> Result<(String, u64, u64)> {
    let mut b = emulator::QemuBoot::new(&built.hypervisor, cmdline, &built.archive, "stdio");
    b.cpus = Some(cpus);
    let mut cmd = emulator::qemu_command(config, Accel::Tcg, &b)?;
    cmd.stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut m = Machine::spawn(cmd, SerialFrom::Stdout)?;
    let (ended, serial) = m.run_to_end(None)?;
    let wall_ms = m.started.elapsed().as_millis() as u64;
    let serial = String::from_utf8_lossy(&serial).into_owned();
    // The emulator's own CPU time (user + system), from wait4.
    let cpu_ms = ended.map_or(0, |e| e.cpu.as_millis() as u64);
    // isa-debug-exit: QEMU exits with 33 when the hypervisor reports success.
    if ended.and_then(|e| e.status.code()) != Some(33) {
        bail!("the boot `{cmdline}` with {cpus} CPU(s) did not end with success:\n{serial}");
    }
    Ok((serial, wall_ms, cpu_ms))
}

fn fmt_hundredths(v: u64) -> String {
    format!("{}.{:02}", v / 100, v % 100)
}

pub fn bench(rounds: usize) -> Result<ExitCode> {
    let (_, built, config) = crate::bench_smp::qemu_svm_setup()?;
    // (label, CPUs, command line)
    let pingpongs = [
        ("doorbell + wait", 1, "guests=channel:arg=2,channel:arg=3"),
        ("yield polling", 1, "guests=channel:arg=4,channel:arg=5"),
        ("doorbell + wait", 2, "guests=channel:arg=2,channel:arg=3"),
        ("yield polling", 2, "guests=channel:arg=4,channel:arg=5"),
    ];
    let idles = [("waiting", "guests=channel:arg=6,channel:arg=6"), ("polling", "guests=channel:arg=7,channel:arg=7")];
    let mut pp: Vec<Vec<PingPong>> = pingpongs.iter().map(|_| Vec::new()).collect();
    let mut idle: Vec<Vec<(u64, u64, u64)>> = idles.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, (_, cpus, cmdline)) in pingpongs.iter().enumerate() {
            let (serial, _, _) = boot(&config, &built, cmdline, *cpus)?;
            pp[i].push(parse_pingpong(&serial)?);
        }
        for (i, (mode, cmdline)) in idles.iter().enumerate() {
            let (serial, wall, cpu) = boot(&config, &built, cmdline, 2)?;
            let (n, exits) = parse_idle(&serial, mode)?;
            if n != 2 {
                bail!("idle {mode}: {n} of 2 guests reported:\n{serial}");
            }
            idle[i].push((wall, cpu, exits));
        }
        eprintln!("bench ipc: round {round} of {rounds} done");
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("bench ipc: QEMU TCG, SVM backend (our bench); medians of {rounds} interleaved round(s); this host has {cores} core(s), shared");
    println!("{:<18} {:>5} {:>16} {:>22}", "ping-pong", "CPUs", "round trips/s", "exits per round trip");
    for (i, (label, cpus, _)) in pingpongs.iter().enumerate() {
        let rate = median(pp[i].iter().map(|p| p.per_second).collect());
        let ping = median(pp[i].iter().map(|p| p.ping_exits).collect());
        let pong = median(pp[i].iter().map(|p| p.pong_exits).collect());
        println!("{:<18} {:>5} {:>16} {:>22}", label, cpus, rate, format!("{} + {}", fmt_hundredths(ping), fmt_hundredths(pong)));
    }
    println!("{:<18} {:>5} {:>16} {:>16} {:>14}", "idle (2 x 3 s)", "CPUs", "QEMU wall ms", "QEMU CPU ms", "guest exits");
    for (i, (mode, _)) in idles.iter().enumerate() {
        let col = |k: usize| median(idle[i].iter().map(|r| [r.0, r.1, r.2][k]).collect());
        println!("{:<18} {:>5} {:>16} {:>16} {:>14}", mode, 2, col(0), col(1), col(2));
    }
    println!("(the CPU time includes QEMU's start-up and the boot; the idle part is the 3 s both guests wait or poll)");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_guests_lines() {
        let serial = "[guest 0 channel] pingpong doorbell+wait: 2000 round trips in 225964 us: 8851 round trips/s, ping 2.00 exits per round trip\n\
                      [guest 1 channel] pingpong doorbell+wait: pong 1.43 exits per round trip\n";
        assert_eq!(parse_pingpong(serial).expect("parses"), PingPong { per_second: 8851, ping_exits: 200, pong_exits: 143 });
        assert!(parse_pingpong("[guest 0 channel] pingpong yield polling: pong 1.00 exits per round trip").is_err());
        let idle = "[guest 0 channel] idle waiting: 3000102 us idle, 4 exits\n[guest 1 channel] idle waiting: 3000500 us idle, 5 exits\n";
        assert_eq!(parse_idle(idle, "waiting").expect("parses"), (2, 9));
        assert_eq!(parse_idle(idle, "polling").expect("parses"), (0, 0));
        assert!(parse_idle("idle waiting: 3 us idle, many exits", "waiting").is_err());
    }
}
