//! Scenario files `tests/scenarios/<name>.scn`: what to boot and what the serial log must show.
//!
//! `key = value` lines; lines whose first non-blank character is `#` are comments (there are
//! no trailing comments, so values may contain `#`, as in `EXCEPTION #PF`). A value wrapped in
//! double quotes keeps its inner blanks. Keys are listed in `KEYS_HELP`; `expect`, `reject` and
//! `expect_count` repeat, and take a `.<config>` suffix to apply to one config only.

use crate::Result;
use std::path::Path;
use std::time::Duration;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

const KEYS_HELP: &str = "description, configs, cmdline, cmdline.<config>, timeout, timeout.<config>, \
    expect, expect.<config>, reject, reject.<config>, expect_count, expect_count.<config>, expect_order, expect_order.<config>, exit, disk, check_disk";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Success,
    Failure,
}

impl ExitKind {
    pub fn word(self) -> &'static str {
        match self {
            ExitKind::Success => "success",
            ExitKind::Failure => "failure",
        }
    }
}

/// A check that applies to every config (`config: None`) or to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check<T> {
    pub config: Option<String>,
    pub what: T,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub configs: Vec<String>,
    pub cmdline: String,
    cmdlines: Vec<(String, String)>,
    timeout: Duration,
    timeouts: Vec<(String, Duration)>,
    pub expect: Vec<Check<String>>,
    pub reject: Vec<Check<String>>,
    pub expect_count: Vec<Check<(usize, String)>>,
    /// `A | B | C`: lines containing A, B, C appear in this order.
    pub expect_order: Vec<Check<Vec<String>>>,
    pub exit: ExitKind,
    /// `disk = SIZE`: a fresh pattern image of SIZE bytes attached as an NVMe drive.
    pub disk: Option<u64>,
    /// `check_disk = LBA BYTE`: after the run, block LBA holds only BYTE (hex).
    pub check_disk: Vec<(u64, u8)>,
}

impl Scenario {
    /// The hypervisor command line for a run under `config`.
    pub fn cmdline(&self, config: &str) -> &str {
        self.cmdlines.iter().find(|(c, _)| c == config).map_or(self.cmdline.as_str(), |(_, l)| l.as_str())
    }

    /// The scenario with `placeholder` replaced by `value` in the command lines and checks.
    pub fn substitute(&self, placeholder: &str, value: &str) -> Scenario {
        let mut s = self.clone();
        let r = |t: &mut String| *t = t.replace(placeholder, value);
        r(&mut s.cmdline);
        s.cmdlines.iter_mut().for_each(|(_, l)| r(l));
        s.expect.iter_mut().chain(s.reject.iter_mut()).for_each(|c| r(&mut c.what));
        s.expect_count.iter_mut().for_each(|c| r(&mut c.what.1));
        s.expect_order.iter_mut().for_each(|c| c.what.iter_mut().for_each(|t| r(t)));
        s
    }

    pub fn timeout(&self, config: &str) -> Duration {
        self.timeouts.iter().find(|(c, _)| c == config).map_or(self.timeout, |(_, t)| *t)
    }

    /// Everything wrong with `log` (the serial output of one run under `config`); empty = good.
    /// The exit status is judged by the caller, which knows the emulator.
    pub fn check_log(&self, config: &str, log: &str) -> Vec<String> {
        let applies = |c: &Option<String>| c.as_deref().is_none_or(|c| c == config);
        let mut problems = Vec::new();
        for e in self.expect.iter().filter(|e| applies(&e.config)) {
            if !log.contains(e.what.as_str()) {
                problems.push(format!("expected `{}` in the serial log", e.what));
            }
        }
        for r in self.reject.iter().filter(|r| applies(&r.config)) {
            if log.contains(r.what.as_str()) {
                problems.push(format!("rejected `{}` found in the serial log", r.what));
            }
        }
        for c in self.expect_count.iter().filter(|c| applies(&c.config)) {
            let (want, text) = &c.what;
            let got = log.lines().filter(|l| l.contains(text.as_str())).count();
            if got != *want {
                problems.push(format!("expected {want} lines with `{text}`, found {got}"));
            }
        }
        for c in self.expect_order.iter().filter(|c| applies(&c.config)) {
            let mut lines = log.lines();
            for text in &c.what {
                if !lines.any(|l| l.contains(text.as_str())) {
                    problems.push(format!("expected `{text}` in this order: `{}`", c.what.join(" | ")));
                    break;
                }
            }
        }
        problems
    }
}

/// Parse one scenario; `name` comes from the file name, `path` is only for messages.
pub fn parse(name: &str, path: &Path, text: &str) -> Result<Scenario> {
    let mut s = Scenario {
        name: name.to_string(),
        description: String::new(),
        configs: Vec::new(),
        cmdline: String::new(),
        cmdlines: Vec::new(),
        timeout: DEFAULT_TIMEOUT,
        timeouts: Vec::new(),
        expect: Vec::new(),
        reject: Vec::new(),
        expect_count: Vec::new(),
        expect_order: Vec::new(),
        exit: ExitKind::Success,
        disk: None,
        check_disk: Vec::new(),
    };
    let mut seen: Vec<&str> = Vec::new();
    // Per-config keys are checked against `configs` at the end: remember where they were.
    let mut config_refs: Vec<(usize, String)> = Vec::new();

    for (index, raw) in text.lines().enumerate() {
        let lineno = index + 1;
        let at = || format!("{}:{lineno}", path.display());
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            crate::bail!("{}: expected `key = value`, got `{line}`", at());
        };
        let key = key.trim();
        let value = unquote(value.trim());
        let (base, config) = match key.split_once('.') {
            Some((base, config)) => (base, Some(config.to_string())),
            None => (key, None),
        };
        if let Some(c) = &config {
            if c.is_empty() || !matches!(base, "cmdline" | "timeout" | "expect" | "reject" | "expect_count" | "expect_order") {
                crate::bail!("{}: unknown key `{key}` (keys: {KEYS_HELP})", at());
            }
            config_refs.push((lineno, c.clone()));
        }
        let once = |seen: &mut Vec<&str>, k: &'static str| -> Result<()> {
            if seen.contains(&k) {
                crate::bail!("{}: `{k}` given twice", at());
            }
            seen.push(k);
            Ok(())
        };
        match base {
            "description" => {
                once(&mut seen, "description")?;
                s.description = value.to_string();
            }
            "configs" => {
                once(&mut seen, "configs")?;
                s.configs = value.split_whitespace().map(config_name).collect();
                if s.configs.is_empty() {
                    crate::bail!("{}: `configs` is empty", at());
                }
                for (i, c) in s.configs.iter().enumerate() {
                    if s.configs[..i].contains(c) {
                        crate::bail!("{}: config `{c}` listed twice", at());
                    }
                }
            }
            "cmdline" => match config {
                None => {
                    once(&mut seen, "cmdline")?;
                    s.cmdline = value.to_string();
                }
                Some(c) => {
                    if s.cmdlines.iter().any(|(k, _)| *k == c) {
                        crate::bail!("{}: `{key}` given twice", at());
                    }
                    s.cmdlines.push((c, value.to_string()));
                }
            },
            "timeout" => {
                let secs: u64 = match value.parse() {
                    Ok(n) if n > 0 => n,
                    _ => crate::bail!("{}: timeout must be a positive number of seconds, got `{value}`", at()),
                };
                let t = Duration::from_secs(secs);
                match config {
                    None => {
                        once(&mut seen, "timeout")?;
                        s.timeout = t;
                    }
                    Some(c) => {
                        if s.timeouts.iter().any(|(k, _)| *k == c) {
                            crate::bail!("{}: `{key}` given twice", at());
                        }
                        s.timeouts.push((c, t));
                    }
                }
            }
            "expect" | "reject" => {
                if value.is_empty() {
                    crate::bail!("{}: `{key}` needs a non-empty text", at());
                }
                let check = Check { config, what: value.to_string() };
                if base == "expect" { s.expect.push(check) } else { s.reject.push(check) }
            }
            "expect_count" => {
                let (n, text) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
                let text = unquote(text.trim());
                let Ok(n) = n.parse::<usize>() else {
                    crate::bail!("{}: expect_count wants `N <text>`, got `{value}`", at());
                };
                if text.is_empty() {
                    crate::bail!("{}: expect_count wants `N <text>`, the text is missing", at());
                }
                s.expect_count.push(Check { config, what: (n, text.to_string()) });
            }
            "expect_order" => {
                let texts: Vec<String> = value.split(" | ").map(|t| t.trim().to_string()).collect();
                if texts.len() < 2 || texts.iter().any(|t| t.is_empty()) {
                    crate::bail!("{}: expect_order wants `A | B [| ...]` with non-empty texts", at());
                }
                s.expect_order.push(Check { config, what: texts });
            }
            "disk" => {
                once(&mut seen, "disk")?;
                match parse_size(value) {
                    Some(n) if n > 0 && n % 512 == 0 => s.disk = Some(n),
                    _ => crate::bail!("{}: disk wants a size that is a multiple of 512 (`64M`), got `{value}`", at()),
                }
            }
            "check_disk" => {
                let parsed = value.split_once(char::is_whitespace).and_then(|(lba, byte)| {
                    let byte = byte.trim();
                    Some((lba.parse::<u64>().ok()?, u8::from_str_radix(byte.strip_prefix("0x").unwrap_or(byte), 16).ok()?))
                });
                match parsed {
                    Some(c) => s.check_disk.push(c),
                    None => crate::bail!("{}: check_disk wants `LBA BYTE` (`5 ab`), got `{value}`", at()),
                }
            }
            "exit" => {
                once(&mut seen, "exit")?;
                s.exit = match value {
                    "success" => ExitKind::Success,
                    "failure" => ExitKind::Failure,
                    _ => crate::bail!("{}: exit must be `success` or `failure`, got `{value}`", at()),
                };
            }
            _ => crate::bail!("{}: unknown key `{key}` (keys: {KEYS_HELP})", at()),
        }
    }

    if s.configs.is_empty() {
        crate::bail!("{}: no `configs = ...` line", path.display());
    }
    if !s.check_disk.is_empty() && s.disk.is_none() {
        crate::bail!("{}: check_disk without a `disk = SIZE` line", path.display());
    }
    for (lineno, c) in config_refs {
        if !s.configs.contains(&config_name(&c)) {
            crate::bail!(
                "{}:{lineno}: config `{c}` is not in `configs` ({})",
                path.display(),
                s.configs.join(" ")
            );
        }
    }
    Ok(s)
}

/// `64M`, `1G`, `4096K` or plain bytes.
fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// `qemu-svm.args` and `qemu-svm` name the same config.
pub fn config_name(word: &str) -> String {
    word.strip_suffix(".args").or_else(|| word.strip_suffix(".bochsrc")).unwrap_or(word).to_string()
}

fn unquote(v: &str) -> &str {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Scenario> {
        parse("t", Path::new("tests/scenarios/t.scn"), text)
    }

    const FULL: &str = r#"
# a comment
description = boots and says ready
configs = qemu-svm bochs-vmx.bochsrc
cmdline = guests=hello test=x
timeout = 20
timeout.bochs-vmx = 90
expect = parperos: ready
expect.qemu-svm = cpu: vendor AuthenticAMD svm=yes npt=yes
expect = EXCEPTION #PF
reject = panic
expect_count = 2 hello from
expect_count.bochs-vmx = 1 "  spaced  "
exit = failure
"#;

    #[test]
    fn parses_every_key() {
        let s = p(FULL).unwrap();
        assert_eq!(s.description, "boots and says ready");
        assert_eq!(s.configs, ["qemu-svm", "bochs-vmx"]);
        assert_eq!(s.cmdline, "guests=hello test=x");
        assert_eq!(s.timeout("qemu-svm"), Duration::from_secs(20));
        assert_eq!(s.timeout("bochs-vmx"), Duration::from_secs(90));
        assert_eq!(s.expect.len(), 3);
        assert_eq!(s.expect[1].config.as_deref(), Some("qemu-svm"));
        assert_eq!(s.expect[2].what, "EXCEPTION #PF");
        assert_eq!(s.reject[0].what, "panic");
        assert_eq!(s.expect_count[0].what, (2, "hello from".to_string()));
        assert_eq!(s.expect_count[1].what, (1, "  spaced  ".to_string()));
        assert_eq!(s.exit, ExitKind::Failure);
    }

    #[test]
    fn defaults() {
        let s = p("configs = qemu-svm\ncmdline =\n").unwrap();
        assert_eq!(s.cmdline, "");
        assert_eq!(s.timeout("qemu-svm"), DEFAULT_TIMEOUT);
        assert_eq!(s.exit, ExitKind::Success);
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = p("configs = qemu-svm\n\nexpekt = x\n").unwrap_err().0;
        assert!(e.starts_with("tests/scenarios/t.scn:3: unknown key `expekt`"), "{e}");
        let e = p("configs = a\nno equals sign\n").unwrap_err().0;
        assert!(e.contains("t.scn:2:"), "{e}");
        let e = p("configs = a\ndescription.a = x\n").unwrap_err().0;
        assert!(e.contains(":2: unknown key `description.a`"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(p("cmdline = x\n").is_err(), "configs missing");
        assert!(p("configs =\n").is_err());
        assert!(p("configs = a a\n").is_err());
        assert!(p("configs = a\ntimeout = 0\n").is_err());
        assert!(p("configs = a\ntimeout = soon\n").is_err());
        assert!(p("configs = a\ntimeout = 1\ntimeout = 2\n").is_err());
        assert!(p("configs = a\nexit = maybe\n").is_err());
        assert!(p("configs = a\nexpect =\n").is_err());
        assert!(p("configs = a\nexpect_count = two x\n").is_err());
        assert!(p("configs = a\nexpect_count = 2\n").is_err());
        let e = p("configs = a\nexpect.b = x\n").unwrap_err().0;
        assert!(e.contains(":2: config `b` is not in `configs`"), "{e}");
    }

    /// `cargo xtask run` boots `qemu-configs/demo.cmdline`; the `demo` scenario tests it.
    #[test]
    fn the_demo_scenario_runs_the_demo_command_line() {
        let root = crate::root();
        let demo = std::fs::read_to_string(root.join("qemu-configs/demo.cmdline")).unwrap();
        let path = root.join("tests/scenarios/demo.scn");
        let s = parse("demo", &path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        for config in &s.configs {
            assert_eq!(s.cmdline(config), demo.trim(), "{config}");
        }
    }

    #[test]
    fn disk_keys() {
        let s = p("configs = a\ndisk = 64M\ncheck_disk = 5 ab\ncheck_disk = 7 0x00\ncmdline = x:arg=@DISK_SUM@\nexpect = sum @DISK_SUM@\n").unwrap();
        assert_eq!(s.disk, Some(64 << 20));
        assert_eq!(s.check_disk, [(5, 0xab), (7, 0)]);
        let t = s.substitute("@DISK_SUM@", "42");
        assert_eq!((t.cmdline("a"), t.expect[0].what.as_str()), ("x:arg=42", "sum 42"));
        assert!(p("configs = a\ndisk = 100\n").is_err());
        assert!(p("configs = a\ncheck_disk = 5 ab\n").is_err());
        assert!(p("configs = a\ndisk = 1M\ncheck_disk = x\n").is_err());
    }

    #[test]
    fn checks_the_order() {
        let s = parse("t", Path::new("t.scn"), "configs = a\nexpect_order = one | two | three\n").unwrap();
        assert!(s.check_log("a", "x one\ny two\nz three\n").is_empty());
        assert_eq!(s.check_log("a", "two\none\nthree\n").len(), 1);
        assert_eq!(s.check_log("a", "one\nthree\ntwo\n").len(), 1);
        assert!(parse("t", Path::new("t.scn"), "configs = a\nexpect_order = lonely\n").is_err());
    }

    #[test]
    fn checks_the_log() {
        let s = p(FULL).unwrap();
        let good = "cpu: vendor AuthenticAMD svm=yes npt=yes\r\nparperos: ready\r\n\
                    hello from a\nhello from b\nEXCEPTION #PF at RIP 0x10\n";
        assert!(s.check_log("qemu-svm", good).is_empty(), "{:?}", s.check_log("qemu-svm", good));
        // bochs-vmx does not need the AMD line but wants one `  spaced  ` line.
        let problems = s.check_log("bochs-vmx", good);
        assert_eq!(problems, ["expected 1 lines with `  spaced  `, found 0"]);
        let bad = "parperos: ready\nhello from a\npanic: oops\n";
        let problems = s.check_log("qemu-svm", bad);
        assert_eq!(problems.len(), 4, "{problems:?}");
    }
}
