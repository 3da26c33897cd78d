//! Scenario files `tests/scenarios/<name>.scn`: what to boot and what the serial log must show.
//!
//! `key = value` lines; lines whose first non-blank character is `#` are comments (there are
//! no trailing comments, so values may contain `#`, as in `EXCEPTION #PF`). A value wrapped in
//! double quotes keeps its inner blanks. Keys are listed in `KEYS_HELP`; `expect`, `reject`,
//! `expect_count` and `expect_order` repeat. A key may be narrowed to one config (`PER_CONFIG`)
//! and to one boot of a multi-boot scenario (`boots = N`, `PER_BOOT`), written in this order:
//! `key.<config>@K`. Where several lines set one value, the most specific wins (`PerRun`).

use crate::emulator::Emulator;
use crate::Result;
use formats::units::parse_size;
use std::path::Path;
use std::time::Duration;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Stands for the disk image's checksum (decimal) in a scenario with `disk = SIZE`.
pub const DISK_SUM: &str = "@DISK_SUM@";
/// Stands for the boot number (1..=boots) in command lines and checks.
pub const BOOT: &str = "@BOOT@";
/// Stands for the run's seed (decimal u64; `PARPEROS_SEED`) in command lines and checks.
pub const SEED: &str = "@SEED@";
/// `pmem = SIZE` must be a multiple of this (QEMU NVDIMMs are placed in 2 MiB steps).
pub const PMEM_ALIGN: u64 = 2 << 20;

const KEYS_HELP: &str = "description, configs, boots, cmdline, timeout, expect, reject, expect_count, expect_order, \
    event, event_count, exit, kill@K, kill_delay, disk, check_disk, pmem, pmem_write@K, cpus, guest_elf, new_guest; `.<config>` after cmdline, \
    timeout, expect, reject, expect_count, expect_order, event, event_count, cpus; `@K` (boot K) after those, exit, kill and kill_delay";

/// Keys that take a `.<config>` suffix.
const PER_CONFIG: &[&str] = &["cmdline", "timeout", "expect", "reject", "expect_count", "expect_order", "event", "event_count", "cpus"];
/// Keys that take a `@K` suffix: boot K only (1-based).
const PER_BOOT: &[&str] =
    &["cmdline", "timeout", "expect", "reject", "expect_count", "expect_order", "event", "event_count", "exit", "kill", "kill_delay", "pmem_write"];

/// A change to the pmem file between boots (offsets in the file: hex, or named after
/// `formats::pmem_layout` as `crate::pmem::offset` reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmemWrite {
    /// `pmem_write@K = OFFSET = VALUE`: a little-endian u64.
    Word { at: u64, value: u64 },
    /// `pmem_write@K = OFFSET <- FROM LEN`: LEN bytes copied from FROM.
    Copy { at: u64, from: u64, len: u64 },
}

fn hex(v: &str) -> Option<u64> {
    u64::from_str_radix(v.trim().strip_prefix("0x")?, 16).ok()
}

/// `0x1048 = 0x200000000` or `slot(1).root <- slot(0).root 24` (offsets hex or by name,
/// value hex, length decimal).
fn parse_pmem_write(value: &str) -> Option<PmemWrite> {
    use crate::pmem::offset;
    if let Some((at, v)) = value.split_once(" = ") {
        return Some(PmemWrite::Word { at: offset(at)?, value: hex(v)? });
    }
    let (at, rest) = value.split_once(" <- ")?;
    let (from, len) = rest.trim().split_once(' ')?;
    Some(PmemWrite::Copy { at: offset(at)?, from: offset(from)?, len: len.trim().parse().ok()? })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Success,
    Failure,
    /// SIGKILLed by xtask after the `kill@K` text appeared: a crash (power loss).
    Killed,
}

impl ExitKind {
    pub fn word(self) -> &'static str {
        match self {
            ExitKind::Success => "success",
            ExitKind::Failure => "failure",
            ExitKind::Killed => "killed",
        }
    }
}

/// `event = NAME key=value ...`: a structured line of the hypervisor, `@evt NAME key=value ...`
/// (log target `evt`), with this name and at least these fields (others may follow, in any
/// order). Numbers are matched as the hypervisor prints them, so a check reads like the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPattern {
    pub name: String,
    pub fields: Vec<(String, String)>,
}

/// What marks a structured line in the serial log (`hypervisor/src/platform/serial.rs`).
pub const EVENT_MARK: &str = "@evt ";

impl EventPattern {
    pub fn parse(text: &str) -> std::result::Result<EventPattern, String> {
        let mut words = text.split_whitespace();
        let name = words.next().filter(|n| !n.contains('=')).ok_or("an event needs a name first (`morsel.mount pte_writes=1`)")?;
        let fields = words
            .map(|w| match w.split_once('=') {
                Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(format!("`{w}` is no `key=value` field")),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(EventPattern { name: name.to_string(), fields })
    }

    /// Whether `line` is this event with these fields.
    pub fn matches(&self, line: &str) -> bool {
        let Some((_, rest)) = line.split_once(EVENT_MARK) else { return false };
        let mut words = rest.split_whitespace();
        if words.next() != Some(self.name.as_str()) {
            return false;
        }
        let fields: Vec<(&str, &str)> = words.filter_map(|w| w.split_once('=')).collect();
        self.fields.iter().all(|(k, v)| fields.iter().any(|(fk, fv)| fk == k && fv == v))
    }
}

impl std::fmt::Display for EventPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        for (k, v) in &self.fields {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// A check that applies to every config (`config: None`) or to one, and to every boot
/// (`boot: None`) or to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check<T> {
    pub config: Option<String>,
    pub boot: Option<usize>,
    pub what: T,
}

impl<T> Check<T> {
    fn applies(&self, config: &str, boot: usize) -> bool {
        self.config.as_deref().is_none_or(|c| c == config) && self.boot.is_none_or(|b| b == boot)
    }
}

/// A value that `key`, `key.<config>`, `key@K` and `key.<config>@K` lines set; for one run the
/// most specific wins, in that order from last to first, else the default.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PerRun<T> {
    default: T,
    set: Vec<(Option<String>, Option<usize>, T)>,
}

impl<T> PerRun<T> {
    fn new(default: T) -> Self {
        PerRun { default, set: Vec::new() }
    }

    fn get(&self, config: &str, boot: usize) -> &T {
        let find = |c: Option<&str>, b: Option<usize>| {
            self.set.iter().find(|(sc, sb, _)| sc.as_deref() == c && *sb == b).map(|(_, _, v)| v)
        };
        find(Some(config), Some(boot))
            .or_else(|| find(None, Some(boot)))
            .or_else(|| find(Some(config), None))
            .or_else(|| find(None, None))
            .unwrap_or(&self.default)
    }

    /// Sets the value for one scope; false if that scope was set before.
    fn set(&mut self, config: Option<String>, boot: Option<usize>, value: T) -> bool {
        if self.set.iter().any(|(c, b, _)| *c == config && *b == boot) {
            return false;
        }
        self.set.push((config, boot, value));
        true
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        std::iter::once(&self.default).chain(self.set.iter().map(|(_, _, v)| v))
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        std::iter::once(&mut self.default).chain(self.set.iter_mut().map(|(_, _, v)| v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub configs: Vec<String>,
    /// `boots = N`: each config boots N times in sequence, with the same disk and pmem files.
    pub boots: usize,
    cmdline: PerRun<String>,
    timeout: PerRun<Duration>,
    exit: PerRun<ExitKind>,
    pub expect: Vec<Check<String>>,
    pub reject: Vec<Check<String>>,
    pub expect_count: Vec<Check<(usize, String)>>,
    /// `A | B | C`: lines containing A, B, C appear in this order.
    pub expect_order: Vec<Check<Vec<String>>>,
    /// `event = PATTERN` (None: at least one such line) and `event_count = N PATTERN` (Some(N)).
    pub events: Vec<Check<(Option<usize>, EventPattern)>>,
    /// `kill@K = TEXT`: (K, TEXT); boot K is SIGKILLed once TEXT appears.
    kills: Vec<(usize, String)>,
    /// `kill_delay = MIN-MAX`: milliseconds between the kill text and the kill.
    kill_delay: PerRun<(u64, u64)>,
    /// `disk = SIZE`: a fresh pattern image of SIZE bytes attached as an NVMe drive.
    pub disk: Option<u64>,
    /// `check_disk = LBA BYTE`: after the run, block LBA holds only BYTE (hex).
    pub check_disk: Vec<(u64, u8)>,
    /// `pmem = SIZE`: a fresh zero-filled file of SIZE bytes, an NVDIMM in every boot.
    pub pmem: Option<u64>,
    /// `pmem_write@K`: changes to the pmem file before boot K (damage for recovery tests).
    pub pmem_writes: Vec<(usize, PmemWrite)>,
    /// (line, key) of the keys that need a QEMU config (`disk`, `pmem`).
    qemu_only: Vec<(usize, &'static str)>,
    /// `cpus = N`, `cpus.<config> = N`: the machine's CPU count (None: the config's own).
    cpus: PerRun<Option<usize>>,
    /// `guest_elf = PATH`: a guest ELF from outside tests/guests (relative to the repository
    /// root, or absolute), added to the run's archive under its file name.
    pub guest_elfs: Vec<std::path::PathBuf>,
    /// `new_guest = NAME`: before the run, `cargo xtask new-guest build/new-guest/NAME` and a
    /// plain `cargo build` there; the ELF is added to the archive as NAME.
    pub new_guest: Option<String>,
}

impl Scenario {
    /// The hypervisor command line for boot `boot` under `config`.
    pub fn cmdline(&self, config: &str, boot: usize) -> &str {
        self.cmdline.get(config, boot)
    }

    /// `cpus` for `config`: QEMU `-smp N`, Bochs `cpu: count=N`; None keeps the config's.
    pub fn cpus(&self, config: &str) -> Option<usize> {
        *self.cpus.get(config, 1)
    }

    pub fn timeout(&self, config: &str, boot: usize) -> Duration {
        *self.timeout.get(config, boot)
    }

    /// How boot `boot` must end: `Killed` where it has `kill@K`.
    pub fn exit(&self, config: &str, boot: usize) -> ExitKind {
        match self.kill(boot) {
            Some(_) => ExitKind::Killed,
            None => *self.exit.get(config, boot),
        }
    }

    /// The `kill@K` text of boot `boot`.
    pub fn kill(&self, boot: usize) -> Option<&str> {
        self.kills.iter().find(|(k, _)| *k == boot).map(|(_, t)| t.as_str())
    }

    /// The delay between the kill text and the kill in boot `boot`: drawn from `kill_delay`
    /// by a PRNG seeded with `seed` and the boot number, so a seed replays every boot's delay.
    pub fn kill_delay(&self, boot: usize, seed: u64) -> Duration {
        // kill_delay has no `.<config>` form: no config name matches "".
        let (min, max) = *self.kill_delay.get("", boot);
        let mut rng = SplitMix64::new(seed ^ (boot as u64).wrapping_mul(0xd6e8_feb8_6659_fd93));
        Duration::from_millis(rng.in_range(min, max))
    }

    /// Whether the seed changes the run (a kill delay, `@SEED@`): then it is printed.
    pub fn uses_seed(&self) -> bool {
        !self.kills.is_empty() || self.cmdline.values().any(|c| c.contains(SEED))
    }

    /// The scenario with `placeholder` replaced by `value` in the command lines, the checks
    /// and the kill texts.
    pub fn substitute(&self, placeholder: &str, value: &str) -> Scenario {
        let mut s = self.clone();
        let r = |t: &mut String| *t = t.replace(placeholder, value);
        s.cmdline.values_mut().for_each(r);
        s.expect.iter_mut().chain(s.reject.iter_mut()).for_each(|c| r(&mut c.what));
        s.expect_count.iter_mut().for_each(|c| r(&mut c.what.1));
        s.expect_order.iter_mut().for_each(|c| c.what.iter_mut().for_each(r));
        s.events.iter_mut().for_each(|c| c.what.1.fields.iter_mut().for_each(|(_, v)| r(v)));
        s.kills.iter_mut().for_each(|(_, t)| r(t));
        s
    }

    /// Refuses a Bochs config for a scenario with QEMU devices (`disk`, `pmem`); `path` is
    /// only for the message.
    pub fn check_emulator(&self, path: &Path, config: &str, emulator: Emulator) -> Result<()> {
        match (emulator, self.qemu_only.first()) {
            (Emulator::Bochs, Some((line, key))) => {
                crate::bail!("{}:{line}: `{key}` needs a QEMU config, but `{config}` is Bochs", path.display())
            }
            _ => Ok(()),
        }
    }

    /// Everything wrong with `log` (the serial output of boot `boot` under `config`); empty =
    /// good. The exit status is judged by the caller, which knows the emulator.
    pub fn check_log(&self, config: &str, boot: usize, log: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for e in self.expect.iter().filter(|e| e.applies(config, boot)) {
            if !log.contains(e.what.as_str()) {
                problems.push(format!("expected `{}` in the serial log", e.what));
            }
        }
        for r in self.reject.iter().filter(|r| r.applies(config, boot)) {
            if log.contains(r.what.as_str()) {
                problems.push(format!("rejected `{}` found in the serial log", r.what));
            }
        }
        for c in self.expect_count.iter().filter(|c| c.applies(config, boot)) {
            let (want, text) = &c.what;
            let got = log.lines().filter(|l| l.contains(text.as_str())).count();
            if got != *want {
                problems.push(format!("expected {want} lines with `{text}`, found {got}"));
            }
        }
        for c in self.events.iter().filter(|c| c.applies(config, boot)) {
            let (want, pattern) = &c.what;
            let got = log.lines().filter(|l| pattern.matches(l)).count();
            match want {
                None if got == 0 => problems.push(format!("expected an event `{pattern}` (`{EVENT_MARK}{}` lines with these fields)", pattern.name)),
                Some(n) if got != *n => problems.push(format!("expected {n} events `{pattern}`, found {got}")),
                _ => {}
            }
        }
        for c in self.expect_order.iter().filter(|c| c.applies(config, boot)) {
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

/// SplitMix64 (Steele, Lea, Flood 2014): the tiny PRNG behind the kill delays.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `min..=max` (`min <= max`; the modulo bias does not matter for delays).
    pub fn in_range(&mut self, min: u64, max: u64) -> u64 {
        match (max - min).checked_add(1) {
            Some(span) => min + self.next_u64() % span,
            None => self.next_u64(),
        }
    }
}

/// `key`, `key.<config>`, `key@K` or `key.<config>@K` split into its parts; Err: why not.
fn split_key(key: &str) -> std::result::Result<(&str, Option<String>, Option<usize>), String> {
    let (rest, boot) = match key.rsplit_once('@') {
        None => (key, None),
        Some((rest, k)) => match k.parse::<usize>() {
            Ok(0) => return Err(format!("`{key}`: boots count from 1 (`@1` is the first)")),
            Ok(k) => (rest, Some(k)),
            Err(_) => return Err(format!("`{key}`: `@K` wants a boot number, as in `expect.<config>@2`")),
        },
    };
    let (base, config) = match rest.split_once('.') {
        Some((base, config)) => (base, Some(config.to_string())),
        None => (rest, None),
    };
    let bad_config = config.as_ref().is_some_and(|c| c.is_empty() || !PER_CONFIG.contains(&base));
    if bad_config || (boot.is_some() && !PER_BOOT.contains(&base)) {
        return Err(format!("unknown key `{key}` (keys: {KEYS_HELP})"));
    }
    Ok((base, config, boot))
}

/// `MIN-MAX` milliseconds with MIN <= MAX.
fn parse_delay(value: &str) -> Option<(u64, u64)> {
    let (min, max) = value.split_once('-')?;
    let (min, max) = (min.trim().parse::<u64>().ok()?, max.trim().parse::<u64>().ok()?);
    (min <= max).then_some((min, max))
}

/// Parse one scenario; `name` comes from the file name, `path` is only for messages.
/// One `key = value` line of a scenario file, its key split into base, config and boot.
struct Line<'a> {
    path: &'a Path,
    lineno: usize,
    key: &'a str,
    base: &'a str,
    value: &'a str,
    config: Option<String>,
    boot: Option<usize>,
}

impl Line<'_> {
    /// `file:line`, the prefix of every error about this line.
    fn at(&self) -> String {
        format!("{}:{}", self.path.display(), self.lineno)
    }

    fn twice(&self) -> crate::Error {
        crate::Error(format!("{}: `{}` given twice", self.at(), self.key))
    }
}

/// A scenario being parsed: what the lines said so far, and what can only be checked at the
/// end (when `configs` and `boots` are known).
struct Parser {
    s: Scenario,
    seen: Vec<&'static str>,
    config_refs: Vec<(usize, String)>,
    boot_refs: Vec<(usize, String, usize)>,
    exits: Vec<(usize, Option<usize>, ExitKind)>,
    delays: Vec<(usize, Option<usize>)>,
    first_kill: Option<(usize, usize)>,
}

/// One handler per key.
type Handler = fn(&mut Parser, &Line) -> Result<()>;
const HANDLERS: &[(&str, Handler)] = &[
    ("description", Parser::description),
    ("configs", Parser::configs),
    ("boots", Parser::boots),
    ("cmdline", Parser::cmdline),
    ("timeout", Parser::timeout),
    ("expect", Parser::expect_or_reject),
    ("reject", Parser::expect_or_reject),
    ("expect_count", Parser::expect_count),
    ("expect_order", Parser::expect_order),
    ("event", Parser::event),
    ("event_count", Parser::event),
    ("cpus", Parser::cpus),
    ("disk", Parser::disk),
    ("pmem", Parser::pmem),
    ("pmem_write", Parser::pmem_write),
    ("check_disk", Parser::check_disk),
    ("exit", Parser::exit),
    ("kill", Parser::kill),
    ("kill_delay", Parser::kill_delay),
    ("guest_elf", Parser::guest_elf),
    ("new_guest", Parser::new_guest),
];

pub fn parse(name: &str, path: &Path, text: &str) -> Result<Scenario> {
    let mut parser = Parser::new(name);
    for (index, raw) in text.lines().enumerate() {
        let lineno = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            crate::bail!("{}:{lineno}: expected `key = value`, got `{line}`", path.display());
        };
        let key = key.trim();
        let value = unquote(value.trim());
        let (base, config, boot) = split_key(key).map_err(|why| crate::Error(format!("{}:{lineno}: {why}", path.display())))?;
        let l = Line { path, lineno, key, base, value, config, boot };
        parser.line(&l)?;
    }
    parser.finish(path)
}

impl Parser {
    fn new(name: &str) -> Parser {
        let s = Scenario {
            name: name.to_string(),
            description: String::new(),
            configs: Vec::new(),
            boots: 1,
            cmdline: PerRun::new(String::new()),
            timeout: PerRun::new(DEFAULT_TIMEOUT),
            exit: PerRun::new(ExitKind::Success),
            expect: Vec::new(),
            reject: Vec::new(),
            expect_count: Vec::new(),
            expect_order: Vec::new(),
            events: Vec::new(),
            kills: Vec::new(),
            kill_delay: PerRun::new((0, 0)),
            disk: None,
            check_disk: Vec::new(),
            pmem: None,
            pmem_writes: Vec::new(),
            qemu_only: Vec::new(),
            cpus: PerRun::new(None),
            guest_elfs: Vec::new(),
            new_guest: None,
        };
        Parser {
            s,
            seen: Vec::new(),
            config_refs: Vec::new(),
            boot_refs: Vec::new(),
            exits: Vec::new(),
            delays: Vec::new(),
            first_kill: None,
        }
    }

    fn line(&mut self, l: &Line) -> Result<()> {
        if let Some(c) = &l.config {
            self.config_refs.push((l.lineno, c.clone()));
        }
        if let Some(k) = l.boot {
            self.boot_refs.push((l.lineno, l.key.to_string(), k));
        }
        match HANDLERS.iter().find(|(k, _)| *k == l.base) {
            Some((_, handle)) => handle(self, l),
            None => crate::bail!("{}: unknown key `{}` (keys: {KEYS_HELP})", l.at(), l.key),
        }
    }

    /// A key that may appear once.
    fn once(&mut self, l: &Line, k: &'static str) -> Result<()> {
        if self.seen.contains(&k) {
            crate::bail!("{}: `{k}` given twice", l.at());
        }
        self.seen.push(k);
        Ok(())
    }

    fn description(&mut self, l: &Line) -> Result<()> {
        let value = l.value;
        self.once(l, "description")?;
        self.s.description = value.to_string();
        Ok(())
    }

    fn configs(&mut self, l: &Line) -> Result<()> {
        let value = l.value;
        let at = || l.at();
        self.once(l, "configs")?;
        self.s.configs = value.split_whitespace().map(config_name).collect();
        if self.s.configs.is_empty() {
            crate::bail!("{}: `configs` is empty", at());
        }
        for (i, c) in self.s.configs.iter().enumerate() {
            if self.s.configs[..i].contains(c) {
                crate::bail!("{}: config `{c}` listed twice", at());
            }
        }
        Ok(())
    }

    fn boots(&mut self, l: &Line) -> Result<()> {
        let value = l.value;
        let at = || l.at();
        self.once(l, "boots")?;
        self.s.boots = match value.parse() {
            Ok(n) if n > 0 => n,
            _ => crate::bail!("{}: boots must be a positive number, got `{value}`", at()),
        };
        Ok(())
    }

    fn cmdline(&mut self, l: &Line) -> Result<()> {
        let value = l.value;
        let config = l.config.clone();
        let boot = l.boot;
        if !self.s.cmdline.set(config, boot, value.to_string()) {
            return Err(l.twice());
        }
        Ok(())
    }

    fn timeout(&mut self, l: &Line) -> Result<()> {
        let value = l.value;
        let config = l.config.clone();
        let boot = l.boot;
        let at = || l.at();
        let secs: u64 = match value.parse() {
            Ok(n) if n > 0 => n,
            _ => crate::bail!("{}: timeout must be a positive number of seconds, got `{value}`", at()),
        };
        if !self.s.timeout.set(config, boot, Duration::from_secs(secs)) {
            return Err(l.twice());
        }
        Ok(())
    }

    fn expect_or_reject(&mut self, l: &Line) -> Result<()> {
        let key = l.key;
        let base = l.base;
        let value = l.value;
        let config = l.config.clone();
        let boot = l.boot;
        let at = || l.at();
        if value.is_empty() {
            crate::bail!("{}: `{key}` needs a non-empty text", at());
        }
        let check = Check { config, boot, what: value.to_string() };
        if base == "expect" { self.s.expect.push(check) } else { self.s.reject.push(check) }
        Ok(())
    }

    fn expect_count(&mut self, l: &Line) -> Result<()> {
        let value = l.value;
        let config = l.config.clone();
        let boot = l.boot;
        let at = || l.at();
        let (n, text) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
        let text = unquote(text.trim());
        let Ok(n) = n.parse::<usize>() else {
            crate::bail!("{}: expect_count wants `N <text>`, got `{value}`", at());
        };
        if text.is_empty() {
            crate::bail!("{}: expect_count wants `N <text>`, the text is missing", at());
        }
        self.s.expect_count.push(Check { config, boot, what: (n, text.to_string()) });
        Ok(())
    }

    /// `event = PATTERN`, `event_count = N PATTERN`.
    fn event(&mut self, l: &Line) -> Result<()> {
        let (count, text) = if l.base == "event_count" {
            let (n, text) = l.value.split_once(char::is_whitespace).unwrap_or((l.value, ""));
            match n.parse::<usize>() {
                Ok(n) => (Some(n), text.trim()),
                Err(_) => crate::bail!("{}: event_count wants `N NAME key=value ...`, got `{}`", l.at(), l.value),
            }
        } else {
            (None, l.value)
        };
        let pattern = EventPattern::parse(text).map_err(|why| crate::Error(format!("{}: `{}`: {why}", l.at(), l.key)))?;
        self.s.events.push(Check { config: l.config.clone(), boot: l.boot, what: (count, pattern) });
        Ok(())
    }

    fn expect_order(&mut self, l: &Line) -> Result<()> {
        let value = l.value;
        let config = l.config.clone();
        let boot = l.boot;
        let at = || l.at();
        let texts: Vec<String> = value.split(" | ").map(|t| t.trim().to_string()).collect();
        if texts.len() < 2 || texts.iter().any(|t| t.is_empty()) {
            crate::bail!("{}: expect_order wants `A | B [| ...]` with non-empty texts", at());
        }
        self.s.expect_order.push(Check { config, boot, what: texts });
        Ok(())
    }

    fn cpus(&mut self, l: &Line) -> Result<()> {
        let value = l.value;
        let config = l.config.clone();
        let at = || l.at();
        let n = match value.parse::<usize>() {
            Ok(n) if (1..=255).contains(&n) => n,
            _ => crate::bail!("{}: cpus wants a number of CPUs from 1 to 255, got `{value}`", at()),
        };
        if !self.s.cpus.set(config, None, Some(n)) {
            return Err(l.twice());
        }
        Ok(())
    }

    fn disk(&mut self, l: &Line) -> Result<()> {
        let lineno = l.lineno;
        let value = l.value;
        let at = || l.at();
        self.once(l, "disk")?;
        match parse_size(value) {
            Some(n) if n > 0 && n % 512 == 0 => self.s.disk = Some(n),
            _ => crate::bail!("{}: disk wants a size that is a multiple of 512 (`64M`), got `{value}`", at()),
        }
        self.s.qemu_only.push((lineno, "disk"));
        Ok(())
    }

    fn pmem(&mut self, l: &Line) -> Result<()> {
        let lineno = l.lineno;
        let value = l.value;
        let at = || l.at();
        self.once(l, "pmem")?;
        match parse_size(value) {
            Some(n) if n > 0 && n % PMEM_ALIGN == 0 => self.s.pmem = Some(n),
            _ => crate::bail!("{}: pmem wants a size that is a multiple of 2 MiB (`64M`), got `{value}`", at()),
        }
        self.s.qemu_only.push((lineno, "pmem"));
        Ok(())
    }

    fn pmem_write(&mut self, l: &Line) -> Result<()> {
        let lineno = l.lineno;
        let value = l.value;
        let boot = l.boot;
        let at = || l.at();
        match (boot, parse_pmem_write(value)) {
            (Some(k), Some(w)) => {
                self.s.pmem_writes.push((k, w));
                self.s.qemu_only.push((lineno, "pmem_write"));
            }
            (None, _) => crate::bail!("{}: pmem_write needs `@K`: the boot before which the file changes", at()),
            (_, None) => crate::bail!(
                "{}: pmem_write wants `OFFSET = 0xVALUE` or `OFFSET <- FROM LEN` (OFFSET, FROM: {}), got `{value}`",
                at(),
                crate::pmem::OFFSET_FORMS
            ),
        };
        Ok(())
    }

    fn guest_elf(&mut self, l: &Line) -> Result<()> {
        if l.config.is_some() || l.boot.is_some() || l.value.is_empty() {
            crate::bail!("{}: `guest_elf = PATH` (no config or boot suffix)", l.at());
        }
        self.s.guest_elfs.push(std::path::PathBuf::from(l.value));
        Ok(())
    }

    fn new_guest(&mut self, l: &Line) -> Result<()> {
        self.once(l, "new_guest")?;
        if l.config.is_some() || l.boot.is_some() {
            crate::bail!("{}: `new_guest = NAME` (no config or boot suffix)", l.at());
        }
        crate::newguest::crate_name(std::path::Path::new(l.value)).map_err(|e| crate::Error(format!("{}: {e}", l.at())))?;
        self.s.new_guest = Some(l.value.to_string());
        Ok(())
    }

    fn check_disk(&mut self, l: &Line) -> Result<()> {
        let value = l.value;
        let at = || l.at();
        let parsed = value.split_once(char::is_whitespace).and_then(|(lba, byte)| {
            let byte = byte.trim();
            Some((lba.parse::<u64>().ok()?, u8::from_str_radix(byte.strip_prefix("0x").unwrap_or(byte), 16).ok()?))
        });
        match parsed {
            Some(c) => self.s.check_disk.push(c),
            None => crate::bail!("{}: check_disk wants `LBA BYTE` (`5 ab`), got `{value}`", at()),
        }
        Ok(())
    }

    fn exit(&mut self, l: &Line) -> Result<()> {
        let lineno = l.lineno;
        let value = l.value;
        let config = l.config.clone();
        let boot = l.boot;
        let at = || l.at();
        let kind = match value {
            "success" => ExitKind::Success,
            "failure" => ExitKind::Failure,
            "killed" => ExitKind::Killed,
            _ => crate::bail!("{}: exit must be `success`, `failure` or `killed`, got `{value}`", at()),
        };
        if !self.s.exit.set(config, boot, kind) {
            return Err(l.twice());
        }
        self.exits.push((lineno, boot, kind));
        Ok(())
    }

    fn kill(&mut self, l: &Line) -> Result<()> {
        let lineno = l.lineno;
        let key = l.key;
        let value = l.value;
        let boot = l.boot;
        let at = || l.at();
        let Some(k) = boot else {
            crate::bail!("{}: `kill` needs a boot number: `kill@K = TEXT`", at());
        };
        if value.is_empty() {
            crate::bail!("{}: `{key}` needs a non-empty text", at());
        }
        if self.s.kill(k).is_some() {
            return Err(l.twice());
        }
        self.s.kills.push((k, value.to_string()));
        self.first_kill.get_or_insert((lineno, k));
        Ok(())
    }

    fn kill_delay(&mut self, l: &Line) -> Result<()> {
        let lineno = l.lineno;
        let value = l.value;
        let boot = l.boot;
        let at = || l.at();
        let Some(range) = parse_delay(value) else {
            crate::bail!("{}: kill_delay wants `MIN-MAX` milliseconds with MIN <= MAX (`0-50`), got `{value}`", at());
        };
        if !self.s.kill_delay.set(None, boot, range) {
            return Err(l.twice());
        }
        self.delays.push((lineno, boot));
        Ok(())
    }

    /// The checks that need the whole file.
    fn finish(self, path: &Path) -> Result<Scenario> {
    let p = path.display();
        if self.s.configs.is_empty() {
            crate::bail!("{p}: no `configs = ...` line");
        }
        if !self.s.check_disk.is_empty() && self.s.disk.is_none() {
            crate::bail!("{p}: check_disk without a `disk = SIZE` line");
        }
        if !self.s.pmem_writes.is_empty() && self.s.pmem.is_none() {
            crate::bail!("{p}: pmem_write without a `pmem = SIZE` line");
        }
        for (lineno, c) in self.config_refs {
            if !self.s.configs.contains(&config_name(&c)) {
                crate::bail!("{p}:{lineno}: config `{c}` is not in `configs` ({})", self.s.configs.join(" "));
            }
        }
        for (lineno, key, k) in self.boot_refs {
            if k > self.s.boots {
                crate::bail!("{p}:{lineno}: `{key}` is for boot {k}, but the scenario boots {} time(s) (`boots = N`)", self.s.boots);
            }
        }
        if let (false, Some((lineno, k))) = (self.seen.contains(&"boots"), self.first_kill) {
            crate::bail!("{p}:{lineno}: `kill@{k}` needs a `boots = N` line (a later boot shows what survived the crash)");
        }
        for (lineno, boot) in self.delays {
            match boot {
                Some(k) if self.s.kill(k).is_none() => crate::bail!("{p}:{lineno}: `kill_delay@{k}` without `kill@{k} = TEXT`"),
                None if self.s.kills.is_empty() => crate::bail!("{p}:{lineno}: `kill_delay` without any `kill@K = TEXT`"),
                _ => {}
            }
        }
        for (lineno, boot, kind) in self.exits {
            match (boot, kind) {
                (Some(k), ExitKind::Killed) if self.s.kill(k).is_none() => {
                    crate::bail!("{p}:{lineno}: `exit@{k} = killed` needs `kill@{k} = TEXT`")
                }
                (Some(k), other) if other != ExitKind::Killed && self.s.kill(k).is_some() => crate::bail!(
                    "{p}:{lineno}: boot {k} has `kill@{k}`, so it ends killed: `exit@{k}` must be `killed`, not `{}`",
                    other.word()
                ),
                (None, ExitKind::Killed) => {
                    if let Some(k) = (1..=self.s.boots).find(|&k| self.s.kill(k).is_none()) {
                        crate::bail!("{p}:{lineno}: `exit = killed`, but boot {k} has no `kill@{k} = TEXT`");
                    }
                }
                _ => {}
            }
        }
        Ok(self.s)
    }
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
        assert_eq!(s.cmdline("qemu-svm", 1), "guests=hello test=x");
        assert_eq!(s.timeout("qemu-svm", 1), Duration::from_secs(20));
        assert_eq!(s.timeout("bochs-vmx", 1), Duration::from_secs(90));
        assert_eq!(s.expect.len(), 3);
        assert_eq!(s.expect[1].config.as_deref(), Some("qemu-svm"));
        assert_eq!(s.expect[2].what, "EXCEPTION #PF");
        assert_eq!(s.reject[0].what, "panic");
        assert_eq!(s.expect_count[0].what, (2, "hello from".to_string()));
        assert_eq!(s.expect_count[1].what, (1, "  spaced  ".to_string()));
        assert_eq!(s.exit("qemu-svm", 1), ExitKind::Failure);
    }

    #[test]
    fn defaults() {
        let s = p("configs = qemu-svm\ncmdline =\n").unwrap();
        assert_eq!(s.cmdline("qemu-svm", 1), "");
        assert_eq!(s.timeout("qemu-svm", 1), DEFAULT_TIMEOUT);
        assert_eq!(s.exit("qemu-svm", 1), ExitKind::Success);
        assert_eq!((s.boots, s.pmem, s.kill(1)), (1, None, None));
        assert_eq!(s.kill_delay(1, 42), Duration::ZERO);
        assert!(!s.uses_seed());
    }

    #[test]
    fn cpus_per_config() {
        let s = p("configs = qemu-svm bochs-vmx\ncpus = 2\ncpus.qemu-svm = 4\n").unwrap();
        assert_eq!((s.cpus("qemu-svm"), s.cpus("bochs-vmx")), (Some(4), Some(2)));
        assert_eq!(p("configs = qemu-svm\n").unwrap().cpus("qemu-svm"), None);
        for bad in ["cpus = 0", "cpus = x", "cpus = 256", "cpus@1 = 2", "cpus.bochs-vmx = 2"] {
            assert!(p(&format!("configs = qemu-svm\n{bad}\n")).is_err(), "{bad}");
        }
        assert!(p("configs = qemu-svm\ncpus = 2\ncpus = 3\n").is_err(), "twice");
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
            assert_eq!(s.cmdline(config, 1), demo.trim(), "{config}");
        }
    }

    #[test]
    fn disk_keys() {
        let s = p("configs = a\ndisk = 64M\ncheck_disk = 5 ab\ncheck_disk = 7 0x00\ncmdline = x:arg=@DISK_SUM@\nexpect = sum @DISK_SUM@\n").unwrap();
        assert_eq!(s.disk, Some(64 << 20));
        assert_eq!(s.check_disk, [(5, 0xab), (7, 0)]);
        let t = s.substitute("@DISK_SUM@", "42");
        assert_eq!((t.cmdline("a", 1), t.expect[0].what.as_str()), ("x:arg=42", "sum 42"));
        assert!(p("configs = a\ndisk = 100\n").is_err());
        assert!(p("configs = a\ncheck_disk = 5 ab\n").is_err());
        assert!(p("configs = a\ndisk = 1M\ncheck_disk = x\n").is_err());
    }

    #[test]
    fn checks_the_order() {
        let s = parse("t", Path::new("t.scn"), "configs = a\nexpect_order = one | two | three\n").unwrap();
        assert!(s.check_log("a", 1, "x one\ny two\nz three\n").is_empty());
        assert_eq!(s.check_log("a", 1, "two\none\nthree\n").len(), 1);
        assert_eq!(s.check_log("a", 1, "one\nthree\ntwo\n").len(), 1);
        assert!(parse("t", Path::new("t.scn"), "configs = a\nexpect_order = lonely\n").is_err());
    }

    #[test]
    fn checks_the_log() {
        let s = p(FULL).unwrap();
        let good = "cpu: vendor AuthenticAMD svm=yes npt=yes\r\nparperos: ready\r\n\
                    hello from a\nhello from b\nEXCEPTION #PF at RIP 0x10\n";
        assert!(s.check_log("qemu-svm", 1, good).is_empty(), "{:?}", s.check_log("qemu-svm", 1, good));
        // bochs-vmx does not need the AMD line but wants one `  spaced  ` line.
        let problems = s.check_log("bochs-vmx", 1, good);
        assert_eq!(problems, ["expected 1 lines with `  spaced  `, found 0"]);
        let bad = "parperos: ready\nhello from a\npanic: oops\n";
        let problems = s.check_log("qemu-svm", 1, bad);
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    const MULTI: &str = r#"
configs = qemu-svm qemu-iommu
pmem = 64M
boots = 3
cmdline = guests=pm:arg=@BOOT@
cmdline@2 = guests=pm:arg=2 seed=@SEED@
cmdline.qemu-iommu = iommu
cmdline.qemu-iommu@3 = iommu three
timeout = 30
timeout@3 = 90
kill@1 = pm: writing
kill@2 = pm: boot @BOOT@ writing
kill_delay = 0-50
kill_delay@2 = 5-5
exit@1 = killed
exit = failure
expect = pm: boot @BOOT@
expect@3 = pm: recovered
expect.qemu-iommu@3 = iommu on
reject@1 = recovered
expect_count@2 = 1 pm: writing
expect_order@3 = pm: boot | pm: recovered
"#;

    #[test]
    fn boot_keys() {
        let s = p(MULTI).unwrap();
        assert_eq!((s.boots, s.pmem), (3, Some(64 << 20)));
        // The most specific value wins: key.<config>@K, key@K, key.<config>, key.
        assert_eq!(s.cmdline("qemu-svm", 1), "guests=pm:arg=@BOOT@");
        assert_eq!(s.cmdline("qemu-svm", 2), "guests=pm:arg=2 seed=@SEED@");
        assert_eq!(s.cmdline("qemu-iommu", 1), "iommu");
        assert_eq!(s.cmdline("qemu-iommu", 2), "guests=pm:arg=2 seed=@SEED@");
        assert_eq!(s.cmdline("qemu-iommu", 3), "iommu three");
        assert_eq!(s.timeout("qemu-svm", 2), Duration::from_secs(30));
        assert_eq!(s.timeout("qemu-svm", 3), Duration::from_secs(90));
        // A boot with kill@K ends killed, the others as `exit` says.
        assert_eq!(s.exit("qemu-svm", 1), ExitKind::Killed);
        assert_eq!(s.exit("qemu-svm", 2), ExitKind::Killed);
        assert_eq!(s.exit("qemu-svm", 3), ExitKind::Failure);
        assert_eq!((s.kill(1), s.kill(3)), (Some("pm: writing"), None));
        assert_eq!(s.kill_delay(2, 7), Duration::from_millis(5));
        assert!(s.uses_seed());
        let t = s.substitute(BOOT, "2").substitute(SEED, "99");
        assert_eq!(t.cmdline("qemu-svm", 2), "guests=pm:arg=2 seed=99");
        assert_eq!(t.kill(2), Some("pm: boot 2 writing"));
        assert_eq!(t.expect[0].what, "pm: boot 2");
        assert!(p("configs = a\ncmdline = x @SEED@\n").unwrap().uses_seed());
    }

    #[test]
    fn checks_select_the_boot() {
        let s = p(MULTI).unwrap().substitute(BOOT, "3");
        let third = "pm: boot 3\npm: recovered\niommu on\n";
        assert!(s.check_log("qemu-iommu", 3, third).is_empty(), "{:?}", s.check_log("qemu-iommu", 3, third));
        // `expect.qemu-iommu@3` is not for qemu-svm; `reject@1` is not for boot 3.
        assert!(s.check_log("qemu-svm", 3, "pm: boot 3\npm: recovered\n").is_empty());
        assert_eq!(s.check_log("qemu-iommu", 3, "pm: boot 3\npm: recovered\n"), ["expected `iommu on` in the serial log"]);
        // Boot 1 rejects `recovered` and needs none of boot 3's lines.
        assert_eq!(s.check_log("qemu-svm", 1, "pm: boot 3\nrecovered\n"), ["rejected `recovered` found in the serial log"]);
        assert!(s.check_log("qemu-svm", 1, "pm: boot 3\n").is_empty());
        // Boot 2 counts its `writing` lines.
        assert_eq!(s.check_log("qemu-svm", 2, "pm: boot 3\npm: writing\npm: writing\n").len(), 1);
    }

    #[test]
    fn boot_key_errors_name_file_and_line() {
        let e = |text: &str| p(text).unwrap_err().0;
        let err = e("configs = a\nboots = 2\nexpect@0 = x\n");
        assert!(err.contains("t.scn:3: `expect@0`: boots count from 1"), "{err}");
        let err = e("configs = a\nboots = 2\nexpect@x = y\n");
        assert!(err.contains("t.scn:3: `expect@x`: `@K` wants a boot number"), "{err}");
        let err = e("configs = a\nexpect@2 = x\nboots = 2\ncmdline@3 = y\n");
        assert!(err.contains("t.scn:4: `cmdline@3` is for boot 3, but the scenario boots 2 time(s)"), "{err}");
        let err = e("configs = a\nexpect@2 = x\n");
        assert!(err.contains("t.scn:2: `expect@2` is for boot 2, but the scenario boots 1 time(s)"), "{err}");
        let err = e("configs = a\nkill@1 = x\n");
        assert!(err.contains("t.scn:2: `kill@1` needs a `boots = N` line"), "{err}");
        let err = e("configs = a\nboots = 2\nkill = x\n");
        assert!(err.contains("t.scn:3: `kill` needs a boot number"), "{err}");
        let err = e("configs = a\nboots = 2\nkill@1 = x\nkill_delay = 50-10\n");
        assert!(err.contains("t.scn:4: kill_delay wants `MIN-MAX`"), "{err}");
        let err = e("configs = a\nboots = 2\nkill@1 = x\nkill_delay@2 = 1-2\n");
        assert!(err.contains("t.scn:4: `kill_delay@2` without `kill@2"), "{err}");
        let err = e("configs = a\nboots = 2\nkill_delay = 1-2\n");
        assert!(err.contains("t.scn:3: `kill_delay` without any `kill@K"), "{err}");
        let err = e("configs = a\nboots = 2\nexit@2 = killed\n");
        assert!(err.contains("t.scn:3: `exit@2 = killed` needs `kill@2 = TEXT`"), "{err}");
        let err = e("configs = a\nboots = 2\nkill@1 = x\nexit@1 = success\n");
        assert!(err.contains("t.scn:4: boot 1 has `kill@1`"), "{err}");
        let err = e("configs = a\nboots = 2\nkill@1 = x\nexit = killed\n");
        assert!(err.contains("t.scn:4: `exit = killed`, but boot 2 has no `kill@2"), "{err}");
        let err = e("configs = a\nboots = 2\nkill@1 = x\nkill@1 = y\n");
        assert!(err.contains("t.scn:4: `kill@1` given twice"), "{err}");
        let err = e("configs = a\nboots = 2\ndisk@1 = 64M\n");
        assert!(err.contains("t.scn:3: unknown key `disk@1`"), "{err}");
        let err = e("configs = a\nboots = 2\nexpect@1.a = x\n");
        assert!(err.contains("t.scn:3: `expect@1.a`: `@K` wants a boot number"), "{err}");
        let err = e("configs = a\nboots = 2\ncmdline@2 = x\ncmdline@2 = y\n");
        assert!(err.contains("t.scn:4: `cmdline@2` given twice"), "{err}");
        assert!(p("configs = a\nboots = 0\n").is_err());
        assert!(p("configs = a\nboots = 2\nboots = 2\n").is_err());
        assert!(p("configs = a\nboots = 2\nkill@1 = x\nkill_delay = 5\n").is_err());
        assert!(p("configs = a\nboots = 2\nkill@1 =\n").is_err());
        // `cmdline.a@2` and `cmdline@2` are different scopes; `exit = killed` where every boot is killed.
        assert!(p("configs = a\nboots = 2\ncmdline.a@2 = x\ncmdline@2 = y\n").is_ok());
        assert!(p("configs = a\nboots = 1\nkill@1 = x\nexit = killed\n").is_ok());
    }

    #[test]
    fn pmem_write_key() {
        let s = p("configs = a\npmem = 2M\nboots = 2\npmem_write@2 = 0x1048 = 0x200000000\npmem_write@2 = 0x1048 <- 0x1008 24\n").unwrap();
        assert_eq!(s.pmem_writes, [
            (2, PmemWrite::Word { at: 0x1048, value: 0x2_0000_0000 }),
            (2, PmemWrite::Copy { at: 0x1048, from: 0x1008, len: 24 }),
        ]);
        assert!(p("configs = a\npmem = 2M\npmem_write = 0x10 = 0x1\n").is_err(), "no @K");
        assert!(p("configs = a\npmem = 2M\nboots = 2\npmem_write@2 = 16 = 1\n").is_err(), "not hex");
        let s = p("configs = a\npmem = 2M\nboots = 2\npmem_write@2 = slot(1).len = 0x11000\npmem_write@2 = slot(1).root <- slot(0).root 24\n").unwrap();
        assert_eq!(s.pmem_writes, [
            (2, PmemWrite::Word { at: 0x1050, value: 0x11000 }),
            (2, PmemWrite::Copy { at: 0x1048, from: 0x1008, len: 24 }),
        ]);
        let e = p("configs = a\npmem = 2M\nboots = 2\npmem_write@2 = slot(1).size = 0x1\n").unwrap_err().0;
        assert!(e.contains(":4: pmem_write wants") && e.contains("slot(N).state|root"), "{e}");
        assert!(p("configs = a\nboots = 2\npmem_write@2 = 0x10 = 0x1\n").is_err(), "no pmem");
        assert!(p("configs = a\npmem = 2M\npmem_write@3 = 0x10 = 0x1\n").is_err(), "no such boot");
    }

    #[test]
    fn pmem_key() {
        assert_eq!(p("configs = a\npmem = 2M\n").unwrap().pmem, Some(2 << 20));
        let err = p("configs = a\npmem = 3M\n").unwrap_err().0;
        assert!(err.contains("t.scn:2: pmem wants a size that is a multiple of 2 MiB"), "{err}");
        assert!(p("configs = a\npmem = 0\n").is_err());
        assert!(p("configs = a\npmem = 2M\npmem = 2M\n").is_err());
        let path = Path::new("tests/scenarios/t.scn");
        let s = p("configs = qemu-svm bochs-vmx\n\npmem = 64M\n").unwrap();
        assert!(s.check_emulator(path, "qemu-svm", Emulator::Qemu).is_ok());
        let err = s.check_emulator(path, "bochs-vmx", Emulator::Bochs).unwrap_err().0;
        assert_eq!(err, "tests/scenarios/t.scn:3: `pmem` needs a QEMU config, but `bochs-vmx` is Bochs");
        let s = p("configs = bochs-vmx\ndisk = 1M\n").unwrap();
        assert!(s.check_emulator(path, "bochs-vmx", Emulator::Bochs).unwrap_err().0.contains(":2: `disk` needs a QEMU"));
        assert!(p("configs = bochs-vmx\n").unwrap().check_emulator(path, "bochs-vmx", Emulator::Bochs).is_ok());
    }

    #[test]
    fn kill_delays_stay_in_range_and_replay() {
        let s = p("configs = a\nboots = 4\nkill@1 = x\nkill@2 = x\nkill@3 = x\nkill_delay = 10-50\nkill_delay@3 = 7-7\n").unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..500u64 {
            for boot in 1..=2 {
                let d = s.kill_delay(boot, seed).as_millis() as u64;
                assert!((10..=50).contains(&d), "seed {seed} boot {boot}: {d} ms");
                seen.insert(d);
            }
            assert_eq!(s.kill_delay(3, seed), Duration::from_millis(7));
            assert_eq!(s.kill_delay(1, seed), s.kill_delay(1, seed), "a seed replays");
        }
        assert!(seen.len() > 35, "delays spread over the range: {seen:?}");
        let mut r = SplitMix64::new(1);
        assert!((0..1000).all(|_| r.in_range(3, 5).wrapping_sub(3) <= 2));
        assert_eq!(r.in_range(9, 9), 9);
        let _ = r.in_range(0, u64::MAX);
        // The published SplitMix64 sequence for seed 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    }
}

#[cfg(test)]
mod event_tests {
    use super::*;

    #[test]
    fn events_match_by_name_and_fields() {
        let s = parse(
            "t",
            Path::new("t.scn"),
            "configs = a\nevent = morsel.mount name=d writable=0 pte_writes=1\nevent_count.a = 2 morsel.mount name=d\nevent_count = 0 run.end frames_not_returned=5\n",
        )
        .unwrap();
        let log = "[ 0.1] @evt morsel.mount guest=1 name=d writable=0 gpa=0x8000000000 pte_writes=1 path_writes=1\n\
                   [ 0.2] INFO  morsel: 'd' mounted read-write\n\
                   [ 0.3] @evt morsel.mount guest=0 name=d writable=1 gpa=0x8000000000 pte_writes=1 path_writes=1\n\
                   [ 0.4] @evt morsel.mountx name=d\n\
                   [ 0.5] @evt run.end frames_not_returned=0\n";
        assert_eq!(s.check_log("a", 1, log), Vec::<String>::new());
        // One PTE write more, or a field the line lacks: the check fails and says which.
        let worse = log.replace("writable=0 gpa=0x8000000000 pte_writes=1", "writable=0 gpa=0x8000000000 pte_writes=2");
        let p = s.check_log("a", 1, &worse);
        assert_eq!(p, ["expected an event `morsel.mount name=d writable=0 pte_writes=1` (`@evt morsel.mount` lines with these fields)"]);
        let p = s.check_log("a", 1, &log.replace("frames_not_returned=0", "frames_not_returned=5"));
        assert_eq!(p, ["expected 0 events `run.end frames_not_returned=5`, found 1"]);
        // Prose that happens to contain the words is not an event.
        assert!(!EventPattern::parse("morsel.mount name=d").unwrap().matches("morsel.mount name=d"));
        assert!(parse("t", Path::new("t.scn"), "configs = a\nevent = pte_writes=1\n").is_err());
        assert!(parse("t", Path::new("t.scn"), "configs = a\nevent = morsel.mount pte_writes\n").is_err());
        assert!(parse("t", Path::new("t.scn"), "configs = a\nevent_count = x morsel.mount\n").is_err());
    }
}
