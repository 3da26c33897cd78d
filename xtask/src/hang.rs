//! What a QEMU run that timed out was doing: before the test runner kills it, it asks QEMU's
//! monitor (a Unix socket each scenario run gets) for every CPU's registers and reports, per
//! CPU, RIP, RSP, CPL, RFLAGS and whether it halted, with RIP named from the hypervisor's
//! or a guest's ELF where one knows it. A hang then says whether the hypervisor spins (in
//! which function), the guests run, or everything halted: the serial log alone cannot.
//!
//! Under nested SVM in TCG the registers are those of the mode the CPU is in: a CPU in guest
//! mode shows the guest's RIP, which only a guest's ELF names.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::symbolize::Symbolizer;

/// Where the monitor socket of one run lives: short (a Unix socket path is at most 108
/// bytes) and unique per process and run.
pub fn monitor_path(run: usize) -> PathBuf {
    std::env::temp_dir().join(format!("parperos-mon-{}-{run}.sock", std::process::id()))
}

/// QEMU's arguments for a monitor on `path` that nobody waits for.
pub fn monitor_args(path: &Path) -> [String; 2] {
    ["-monitor".to_string(), format!("unix:{},server=on,wait=off", path.display())]
}

/// `info registers -a` from the monitor at `path`, or why not (at most ~3 s).
pub fn registers(path: &Path) -> Result<String, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("monitor {}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_millis(300))).map_err(|e| e.to_string())?;
    let read_quiet = |s: &mut UnixStream, limit: Duration| {
        let (mut out, mut buf, start) = (Vec::new(), [0u8; 8192], Instant::now());
        while start.elapsed() < limit {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // Quiet for 300 ms after something came: the answer is complete.
                Err(_) if !out.is_empty() => break,
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let _greeting = read_quiet(&mut s, Duration::from_secs(1));
    s.write_all(b"info registers -a\n").map_err(|e| format!("monitor: {e}"))?;
    Ok(read_quiet(&mut s, Duration::from_secs(2)))
}

/// One CPU's summary line per `CPU#N` block of `info registers -a`.
pub fn summarize(text: &str, symbols: &mut Symbolizer) -> Vec<String> {
    let mut lines = Vec::new();
    for block in text.split("CPU#").skip(1) {
        let cpu: String = block.chars().take_while(char::is_ascii_digit).collect();
        let field = |name: &str| {
            let at = block.find(&format!("{name}="))? + name.len() + 1;
            Some(block[at..].split(|c: char| c.is_whitespace()).next()?.to_string())
        };
        let (Some(rip), Some(rsp)) = (field("RIP"), field("RSP")) else { continue };
        let (cpl, rfl, hlt) = (field("CPL").unwrap_or_default(), field("RFL").unwrap_or_default(), field("HLT").unwrap_or_default());
        let name = u64::from_str_radix(&rip, 16).ok().and_then(|a| symbols.anywhere(a));
        let name = name.map_or_else(|| " <in no ELF built here>".to_string(), |(elf, f)| format!(" <{elf}: {f}>"));
        lines.push(format!("cpu {cpu}: RIP {rip}{name} RSP {rsp} CPL {cpl} RFL {rfl} HLT {hlt}"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_each_cpu_block() {
        // The shape of QEMU 11's `info registers -a` (abridged).
        let text = "QEMU 11.1 monitor\n(qemu) info registers -a\n\nCPU#0\nRAX=0000000000000000 RBX=0000000000000001\n\
            RSI=0 RDI=0 RBP=0 RSP=ffff800000123f00\nR8 =0\nRIP=0000000000000010 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
            \nCPU#1\nRSP=0000000000007f00\nRIP=0000000000000020 RFL=00000002 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0\n(qemu) ";
        let mut symbols = Symbolizer::new(Path::new("/nonexistent/hypervisor"), &[]);
        let lines = summarize(text, &mut symbols);
        assert_eq!(
            lines,
            [
                "cpu 0: RIP 0000000000000010 <in no ELF built here> RSP ffff800000123f00 CPL 0 RFL 00000246 HLT 1",
                "cpu 1: RIP 0000000000000020 <in no ELF built here> RSP 0000000000007f00 CPL 3 RFL 00000002 HLT 0",
            ]
        );
        assert!(summarize("(qemu) garbage", &mut symbols).is_empty());
    }
}
