//! One running emulator, the same type for `run`, `test` and the benches: spawn it, read its
//! serial output as a stream (QEMU: its stdout pipe, read by a thread; Bochs: the serial
//! file it writes, read as it grows), stop it, and learn how it ended (exit status and the CPU
//! time it used). The commands come from `emulator` (`qemu_command`, `bochs_command`); this
//! type owns the process from then on.
//!
//! The process dies with the thread that spawned it (`die_with_parent`, set by the command
//! builders), and a `Machine` that is dropped before it was reaped is killed and reaped: no
//! emulator outlives its `Machine`. The child is reaped with `wait4`, so its resource usage
//! (user + system time) is known however it ended.

use crate::{Context, Result};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where the guest's serial console comes out.
pub enum SerialFrom {
    /// The process's stdout (QEMU `-serial stdio` or `mon:stdio`).
    Stdout,
    /// A file the emulator writes (Bochs `com1: mode=file`); removed before the start.
    File(PathBuf),
    /// Nowhere we read (the tests of `Machine` and of the test runner's supervisor).
    #[cfg(test)]
    Nothing,
}

enum Serial {
    Pipe(mpsc::Receiver<Vec<u8>>, Option<std::thread::JoinHandle<()>>),
    File(PathBuf, u64),
    #[cfg(test)]
    Nothing,
}

/// How a `Machine` ended.
#[derive(Clone, Copy, Debug)]
pub struct Ended {
    pub status: ExitStatus,
    /// User + system CPU time of the emulator process.
    pub cpu: Duration,
}

pub struct Machine {
    child: Child,
    serial: Serial,
    ended: Option<Ended>,
    pub started: Instant,
}

impl Machine {
    /// Starts `cmd`; with `SerialFrom::Stdout` its stdout becomes a pipe read by a thread.
    pub fn spawn(mut cmd: Command, from: SerialFrom) -> Result<Machine> {
        if let SerialFrom::File(path) = &from {
            let _ = std::fs::remove_file(path);
        }
        if matches!(from, SerialFrom::Stdout) {
            cmd.stdout(Stdio::piped());
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let started = Instant::now();
        let mut child = cmd.spawn().context(|| format!("cannot start {program}"))?;
        let serial = match from {
            SerialFrom::Stdout => {
                let mut out = child.stdout.take();
                let (tx, rx) = mpsc::channel();
                let reader = std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Some(out) = out.as_mut() {
                        match out.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if tx.send(buf[..n].to_vec()).is_err() {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                });
                Serial::Pipe(rx, Some(reader))
            }
            SerialFrom::File(path) => Serial::File(path, 0),
            #[cfg(test)]
            SerialFrom::Nothing => Serial::Nothing,
        };
        Ok(Machine { child, serial, ended: None, started })
    }

    /// Starts Bochs (`emulator::bochs_command`) with its serial port in `serial`, one start at
    /// a time (`emulator::BochsStart`): the lock is given back once `log` (where the command
    /// sends Bochs' stdout) says its display listens; None (the log goes to a terminal, where
    /// it cannot be read): at once.
    pub fn spawn_bochs(root: &std::path::Path, cmd: Command, serial: PathBuf, log: Option<&std::path::Path>) -> Result<Machine> {
        let starting = crate::emulator::BochsStart::begin(root)?;
        let mut m = Machine::spawn(cmd, SerialFrom::File(serial))?;
        if let Some(log) = log {
            starting.listening(log, || !matches!(m.try_wait(), Ok(None)));
        }
        Ok(m)
    }

    #[cfg(test)]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Serial output that is new since the last call, waiting at most `wait` for some (an
    /// empty result: none came).
    pub fn serial(&mut self, wait: Duration) -> Vec<u8> {
        match &mut self.serial {
            Serial::Pipe(rx, _) => {
                let mut out = match rx.recv_timeout(wait) {
                    Ok(chunk) => chunk,
                    Err(mpsc::RecvTimeoutError::Timeout) => return Vec::new(),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(wait);
                        return Vec::new();
                    }
                };
                while let Ok(more) = rx.try_recv() {
                    out.extend(more);
                }
                out
            }
            Serial::File(path, offset) => {
                let grown = |offset: u64| std::fs::metadata(&*path).is_ok_and(|m| m.len() > offset);
                if !grown(*offset) {
                    std::thread::sleep(wait);
                }
                let mut out = Vec::new();
                if let Ok(mut f) = std::fs::File::open(&*path) {
                    use std::io::Seek;
                    if f.seek(std::io::SeekFrom::Start(*offset)).is_ok() && f.read_to_end(&mut out).is_ok() {
                        *offset += out.len() as u64;
                    }
                }
                out
            }
            #[cfg(test)]
            Serial::Nothing => {
                std::thread::sleep(wait);
                Vec::new()
            }
        }
    }

    /// The rest of the serial output once the machine ended (the pipe read to its end).
    pub fn serial_rest(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        match &mut self.serial {
            Serial::Pipe(rx, reader) => {
                if self.ended.is_some() {
                    // Read to the pipe's end; a descendant that still holds it open (none of
                    // the emulators forks one) would stop this after 2 s of silence.
                    while let Ok(chunk) = rx.recv_timeout(Duration::from_secs(2)) {
                        out.extend(chunk);
                    }
                    if reader.as_ref().is_some_and(|r| r.is_finished()) {
                        let _ = reader.take().map(|r| r.join());
                    }
                } else {
                    while let Ok(chunk) = rx.try_recv() {
                        out.extend(chunk);
                    }
                }
            }
            Serial::File(..) => out = self.serial(Duration::ZERO),
            #[cfg(test)]
            Serial::Nothing => {}
        }
        out
    }

    /// How it ended, if it did (reaps it then).
    pub fn try_wait(&mut self) -> Result<Option<Ended>> {
        if self.ended.is_none() {
            self.ended = self.wait4(false)?;
        }
        Ok(self.ended)
    }

    /// Waits for the end.
    pub fn wait(&mut self) -> Result<Ended> {
        if let Some(e) = self.ended {
            return Ok(e);
        }
        let Some(e) = self.wait4(true)? else { crate::bail!("wait4 returned no status") };
        self.ended = Some(e);
        Ok(e)
    }

    /// SIGKILL, then the end (which may be an exit status, if it ended on its own just before).
    pub fn kill(&mut self) -> Result<Ended> {
        if self.ended.is_none() {
            self.signal(libc::SIGKILL);
        }
        self.wait()
    }

    /// SIGTERM (QEMU then restores the terminal), 2 s to end, then SIGKILL.
    pub fn terminate(&mut self) -> Result<Ended> {
        if self.ended.is_none() {
            self.signal(libc::SIGTERM);
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                if let Some(e) = self.try_wait()? {
                    return Ok(e);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill()
    }

    /// Runs to the end (or past `limit`: killed, and `None`), returning all serial output.
    pub fn run_to_end(&mut self, limit: Option<Duration>) -> Result<(Option<Ended>, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            if let Some(e) = self.try_wait()? {
                out.extend(self.serial_rest());
                return Ok((Some(e), out));
            }
            if limit.is_some_and(|l| self.started.elapsed() >= l) {
                self.kill()?;
                out.extend(self.serial_rest());
                return Ok((None, out));
            }
            out.extend(self.serial(Duration::from_millis(50)));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid, not yet reaped (ended is None), so the pid
        // cannot belong to another process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// `wait4` on the child (blocking or not): its status and CPU time once it ended. std's
    /// `Child::wait` is never used, so this is the one place that reaps it.
    fn wait4(&self, block: bool) -> Result<Option<Ended>> {
        use std::os::unix::process::ExitStatusExt;
        let mut status = 0;
        loop {
            // SAFETY: `rusage` is plain data that wait4 fills; the pid is our unreaped child.
            let (pid, usage) = unsafe {
                let mut usage: libc::rusage = std::mem::zeroed();
                let flags = if block { 0 } else { libc::WNOHANG };
                (libc::wait4(self.child.id() as libc::pid_t, &mut status, flags, &mut usage), usage)
            };
            if pid == 0 {
                return Ok(None);
            }
            if pid < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                crate::bail!("waiting for the emulator: {e}");
            }
            let t = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
            return Ok(Some(Ended { status: ExitStatus::from_raw(status), cpu: t(usage.ru_utime) + t(usage.ru_stime) }));
        }
    }
}

impl Drop for Machine {
    /// No emulator outlives its `Machine`.
    fn drop(&mut self) {
        if self.ended.is_none() {
            let _ = self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]).stdin(Stdio::null());
        c
    }

    #[test]
    fn streams_stdout_and_reports_the_status() {
        let mut m = Machine::spawn(sh("echo one; sleep 0.2; echo two; exit 3"), SerialFrom::Stdout).unwrap();
        let (ended, out) = m.run_to_end(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(ended.unwrap().status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out), "one\ntwo\n");
    }

    #[test]
    fn reads_a_serial_file_as_it_grows() {
        let path = std::env::temp_dir().join(format!("xtask-machine-{}.serial", std::process::id()));
        let script = format!("echo a > {p}; sleep 0.3; echo b >> {p}", p = path.display());
        let mut m = Machine::spawn(sh(&script), SerialFrom::File(path.clone())).unwrap();
        let (ended, out) = m.run_to_end(Some(Duration::from_secs(10))).unwrap();
        assert!(ended.unwrap().status.success());
        assert_eq!(String::from_utf8_lossy(&out), "a\nb\n");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_limit_kills_and_drop_leaves_nothing_behind() {
        let start = Instant::now();
        let mut m = Machine::spawn(sh("echo started; exec sleep 30"), SerialFrom::Stdout).unwrap();
        let (ended, out) = m.run_to_end(Some(Duration::from_millis(300))).unwrap();
        assert!(ended.is_none() && start.elapsed() < Duration::from_secs(10));
        assert_eq!(String::from_utf8_lossy(&out), "started\n");
        assert_eq!(m.wait().unwrap().status.code(), None, "killed by a signal");
        // Dropped while running: killed and reaped.
        let m = Machine::spawn(sh("exec sleep 30"), SerialFrom::Nothing).unwrap();
        let pid = m.id();
        drop(m);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the process is gone");
    }

    #[test]
    fn cpu_time_is_counted() {
        let mut m = Machine::spawn(sh("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"), SerialFrom::Nothing).unwrap();
        let e = m.wait().unwrap();
        assert!(e.status.success() && e.cpu > Duration::ZERO, "{e:?}");
    }
}
