//! Checks a hypervisor command line before `cargo xtask run` boots it, so that a typo is one
//! `error:` line naming what is valid instead of a boot that fails. The rules are the
//! hypervisor's (`hypervisor/src/cmdline.rs`, which keeps its own checks: it also boots from
//! GRUB); change both together. Guest names are checked against the archive being booted.

use crate::{bail, Result};

/// The keys the hypervisor understands, with their values.
pub const KEYS: &str = "guests=SPEC,SPEC,...  log=error|warn|info|debug|trace  \
    test=fault|dma-fault|dma-nodomain|sharept|svm-host-state|svm-host-state:always|pmem-crash:format|pmem-crash:magic  pmem=format|drop:N[,N...]|drop:damaged  iommu=register|sharept  nvme=poll  cpus=N  bench=on";
/// The options of one guest SPEC after its name.
pub const GUEST_OPTIONS: &str = "mem=SIZE, slices=N, arg=N (or SIZE), vcpus=N, cpu=K, code=N, stopped";
/// What a SIZE may end with.
pub const SIZE_SUFFIXES: &str = "none (bytes), K, M or G (KiB, MiB, GiB; either case)";
/// The keys alone, for "did you mean".
const KEY_NAMES: &[&str] = &["guests", "log", "test", "pmem", "iommu", "nvme", "cpus", "bench"];
const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// Checks every word of `line`; `guests` are the names in the archive.
pub fn check(line: &str, guests: &[&str]) -> Result<()> {
    let mut problems = Vec::new();
    for word in line.split_ascii_whitespace() {
        if let Err(e) = check_word(word, guests) {
            problems.push(format!("`{word}`: {e}"));
        }
    }
    match problems.len() {
        0 => Ok(()),
        _ => bail!("command line `{line}`:\n  {}", problems.join("\n  ")),
    }
}

fn check_word(word: &str, guests: &[&str]) -> std::result::Result<(), String> {
    let Some((key, value)) = word.split_once('=') else {
        return Err(format!("not `key=value`; the keys are {KEYS}"));
    };
    match key {
        "guests" => {
            let mut errors = Vec::new();
            for spec in value.split(',').filter(|s| !s.is_empty()) {
                if let Err(e) = check_guest(spec, guests) {
                    errors.push(format!("guest `{spec}`: {e}"));
                }
            }
            match errors.is_empty() {
                true => Ok(()),
                false => Err(errors.join("; ")),
            }
        }
        "log" if LEVELS.contains(&value.to_ascii_lowercase().as_str()) => Ok(()),
        "log" => Err(format!("unknown log level; valid: {}", LEVELS[1..].join(", "))),
        "test" if ["fault", "dma-fault", "dma-nodomain", "sharept", "svm-host-state", "svm-host-state:always", "pmem-crash:format", "pmem-crash:magic"].contains(&value) => Ok(()),
        "test" => Err("unknown test; valid: fault, dma-fault, dma-nodomain, sharept, svm-host-state, svm-host-state:always, pmem-crash:format, pmem-crash:magic".into()),
        "pmem" if value == "format" || value == "drop:damaged" => Ok(()),
        "pmem" if value.strip_prefix("drop:").is_some_and(|slots| {
            slots.split(',').all(|n| n.parse::<u8>().is_ok_and(|n| n < 64))
        }) => Ok(()),
        "pmem" => Err("valid: `format`, `drop:damaged`, `drop:N[,N...]` with slots 0-63".into()),
        "iommu" if value == "register" || value == "sharept" => Ok(()),
        "iommu" => Err("valid: `register` (VT-d register-based invalidation), `sharept` (device mounts through the EPT subtree)".into()),
        "cpus" if value.parse::<usize>().is_ok_and(|n| n >= 1) => Ok(()),
        "cpus" => Err("a number of CPUs, at least 1".into()),
        "bench" if value == "on" => Ok(()),
        "bench" => Err("valid: `on` (guests may call bench_frames)".into()),
        "nvme" if value == "poll" => Ok(()),
        "nvme" => Err("valid: `poll` (NVMe completions polled, not by MSI-X interrupt)".into()),
        _ => Err(format!("unknown key `{key}`{}; the keys are {KEYS}", crate::did_you_mean(key, KEY_NAMES.iter().copied()))),
    }
}

fn check_guest(spec: &str, guests: &[&str]) -> std::result::Result<(), String> {
    let mut parts = spec.split(':');
    let name = parts.next().unwrap_or_default();
    let mut problems = Vec::new();
    if name.is_empty() {
        problems.push("empty guest name".to_string());
    } else if !guests.contains(&name) {
        problems.push(format!("no guest `{name}` in the archive{} (have: {})", crate::did_you_mean(name, guests.iter().copied()), guests.join(", ")));
    }
    for part in parts {
        let problem = match part.split_once('=') {
            Some(("mem", size)) => check_memory(size).err().map(|e| format!("mem={size}: {e}")),
            Some(("arg", n)) => parse_size(n).err().map(|e| format!("arg={n}: {e}")),
            Some(("slices", n)) => n.parse::<u64>().err().map(|_| format!("slices={n}: not a whole number")),
            Some(("vcpus", n)) => n.parse::<u32>().ok().filter(|n| (1..=16).contains(n)).is_none().then(|| format!("vcpus={n}: 1 to 16")),
            Some(("cpu", n)) => n.parse::<usize>().err().map(|_| format!("cpu={n}: not a CPU index")),
            Some(("code", n)) => n.parse::<i32>().err().map(|_| format!("code={n}: not a 32-bit whole number")),
            None if part == "stopped" => None,
            _ => Some(format!("unknown option `{part}`; valid: {GUEST_OPTIONS}")),
        };
        problems.extend(problem);
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(problems.join("; ")),
    }
}

/// The guest memory sizes the hypervisor accepts (`hypervisor/src/vm/guest.rs`,
/// `Guest::create`): whole 2 MiB, from 4 MiB to 512 GiB.
pub const GUEST_MEMORY_MIN: u64 = 4 << 20;
pub const GUEST_MEMORY_MAX: u64 = 512 << 30;
const GUEST_MEMORY_STEP: u64 = 2 << 20;

/// A guest's `mem=SIZE`, checked as the hypervisor will check it; sizes in MiB.
pub fn check_memory(size: &str) -> std::result::Result<u64, String> {
    let n = parse_size(size)?;
    let mib = |b: u64| format!("{} MiB", b >> 20);
    if n < GUEST_MEMORY_MIN {
        return Err(format!("{} is below the smallest guest, {}", if n >= 1 << 20 { mib(n) } else { format!("{n} bytes") }, mib(GUEST_MEMORY_MIN)));
    }
    if n > GUEST_MEMORY_MAX {
        return Err(format!("{} is above the largest guest, 512 GiB", mib(n)));
    }
    if n % GUEST_MEMORY_STEP != 0 {
        return Err(format!("{} KiB is not a whole number of 2 MiB (try {})", n >> 10, mib(n.next_multiple_of(GUEST_MEMORY_STEP))));
    }
    Ok(n)
}

/// The memory the guests of `line` ask for in all (`mem=`, else the hypervisor's 16 MiB).
pub fn guest_memory(line: &str) -> u64 {
    let mut total = 0u64;
    for word in line.split_ascii_whitespace() {
        let Some(specs) = word.strip_prefix("guests=") else { continue };
        for spec in specs.split(',').filter(|s| !s.is_empty()) {
            let mem = spec.split(':').find_map(|p| p.strip_prefix("mem=")).and_then(|m| parse_size(m).ok()).unwrap_or(16 << 20);
            total = total.saturating_add(mem);
        }
    }
    total
}

/// The guest names `guests=` names in `line`, each once (None without a `guests=` word).
pub fn guest_names(line: &str) -> Option<Vec<String>> {
    let mut names: Option<Vec<String>> = None;
    for word in line.split_ascii_whitespace() {
        let Some(specs) = word.strip_prefix("guests=") else { continue };
        let list = names.get_or_insert_with(Vec::new);
        for spec in specs.split(',').filter(|s| !s.is_empty()) {
            let name = spec.split(':').next().unwrap_or(spec).to_string();
            if !list.contains(&name) {
                list.push(name);
            }
        }
    }
    names
}

/// `16M`, `2G`, `4096K` or plain bytes, as the hypervisor reads them (`formats::units`).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    match formats::units::parse_size(s) {
        Some(n) => Ok(n),
        // Digits with at most one suffix that still fail: the number does not fit.
        None if s.trim_end_matches(['K', 'k', 'M', 'm', 'G', 'g']).len() + 1 >= s.len()
            && s.trim_end_matches(['K', 'k', 'M', 'm', 'G', 'g']).bytes().all(|b| b.is_ascii_digit())
            && !s.is_empty() =>
        {
            Err("too large for 64 bits".to_string())
        }
        None => Err(format!("not a size; a number with suffix {SIZE_SUFFIXES}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn guest_names_once_each_without_options() {
        assert_eq!(super::guest_names("log=info guests=bmtree:vcpus=4:arg=10002,hello,bmtree:arg=1 bench=on"), Some(vec!["bmtree".to_string(), "hello".to_string()]));
        assert_eq!(super::guest_names("log=info"), None);
    }

    use super::*;

    const GUESTS: &[&str] = &["hello", "counter"];

    fn err(line: &str) -> String {
        check(line, GUESTS).unwrap_err().0
    }

    #[test]
    fn valid_lines_pass() {
        check("", GUESTS).unwrap();
        check("guests=hello,counter:mem=32M:slices=5:arg=1:code=3,hello:stopped log=debug", GUESTS).unwrap();
        check("test=fault pmem=format log=WARN", GUESTS).unwrap();
    }

    #[test]
    fn unknown_keys_name_the_valid_ones() {
        let e = err("foo=bar");
        assert!(e.contains("unknown key `foo`") && e.contains("guests=SPEC") && e.contains("log="), "{e}");
        assert!(err("verbose").contains("not `key=value`"));
        assert!(err("log=loud").contains("error, warn, info, debug, trace"));
        assert!(err("test=oops").contains("fault, dma-fault"));
        assert!(check("cpus=2 pmem=drop:1,63 pmem=drop:damaged test=pmem-crash:magic", &[]).is_ok());
        assert!(err("cpus=0").contains("at least 1"));
        assert!(err("pmem=drop:64").contains("slots 0-63"));
        assert!(check("iommu=register iommu=sharept", &[]).is_ok());
        assert!(err("iommu=shared").contains("`sharept`"));
        assert!(check("nvme=poll iommu=register", &[]).is_ok());
        assert!(check("bench=on", &[]).is_ok());
        assert!(err("bench=off").contains("`on`"));
        assert!(err("nvme=msi").contains("`poll`"));
    }

    #[test]
    fn bad_sizes_name_the_suffixes() {
        let e = err("guests=hello:mem=12Q");
        assert!(e.contains("mem=12Q") && e.contains("K, M or G"), "{e}");
        assert!(err("guests=hello:mem=99999999999G").contains("too large"));
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
    }

    #[test]
    fn guest_memory_is_checked_as_the_hypervisor_does() {
        let e = err("guests=hello:mem=2M");
        assert!(e.contains("2 MiB is below the smallest guest, 4 MiB"), "{e}");
        assert!(!e.contains("0x"), "sizes in MiB, not hex: {e}");
        assert!(err("guests=hello:mem=5M").contains("not a whole number of 2 MiB (try 6 MiB)"));
        assert!(err("guests=hello:mem=1024G").contains("above the largest guest"));
        assert!(err("guests=hello:mem=100").contains("100 bytes is below"));
        check("guests=hello:mem=4M,hello:mem=512G", GUESTS).unwrap();
        assert_eq!(guest_memory("log=info guests=hello:mem=4G,counter,hello:mem=32M"), (4 << 30) + (16 << 20) + (32 << 20));
        assert_eq!(guest_memory("log=info"), 0);
    }

    #[test]
    fn misspelt_names_and_keys_get_a_suggestion() {
        assert!(err("guests=helo").contains("did you mean `hello`?"));
        assert!(err("gusets=hello").contains("did you mean `guests`?"));
    }

    #[test]
    fn unknown_guest_options_and_names_list_what_exists() {
        let e = err("guests=hello:memory=1M");
        assert!(e.contains("unknown option `memory=1M`") && e.contains("mem=SIZE, slices=N"), "{e}");
        let e = err("guests=helo");
        assert!(e.contains("no guest `helo`") && e.contains("have: hello, counter"), "{e}");
        assert!(err("guests=hello:slices=x").contains("slices=x"));
        // Every problem is listed, not only the first.
        let e = err("foo=1 guests=nope:mem=12Q");
        assert!(e.contains("`foo=1`") && e.contains("no guest `nope`") && e.contains("mem=12Q"), "{e}");
    }
}
