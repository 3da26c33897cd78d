//! The book's hypercall reference (`docs/src/hypercalls.md`) against this crate: every table
//! row must match the constants, `Call::decode` and `Error`, and every call, error and
//! selector the crate has must have its row. A change to the ABI without the book (or the
//! other way round) fails here.

use abi::*;
use std::collections::BTreeMap;

const CHAPTER: &str = include_str!("../../docs/src/hypercalls.md");
const LIB: &str = include_str!("../src/lib.rs");

/// The tables of a chapter, keyed by the first header cell: rows of trimmed cells.
fn tables(text: &str) -> BTreeMap<String, Vec<Vec<String>>> {
    let mut out: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(cells) = row(line) else {
            current = None;
            continue;
        };
        match &current {
            None if lines.peek().is_some_and(|l| l.trim_start().starts_with("| ---")) => {
                lines.next();
                assert!(!out.contains_key(&cells[0]), "two tables start with `{}`", cells[0]);
                out.insert(cells[0].clone(), Vec::new());
                current = Some(cells[0].clone());
            }
            None => {}
            Some(key) => out.get_mut(key).unwrap().push(cells),
        }
    }
    out
}

fn row(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(|c| c.trim().to_string()).collect())
}

/// `0x10`, `-3`, `4096`, `16 GiB`, `60000000`.
fn number(cell: &str) -> i128 {
    let (digits, unit) = match cell.split_once(' ') {
        Some((d, u)) => (d, u),
        None => (cell, ""),
    };
    let (neg, digits) = match digits.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, digits),
    };
    let v = match digits.strip_prefix("0x") {
        Some(h) => i128::from_str_radix(h, 16),
        None => digits.parse(),
    }
    .unwrap_or_else(|_| panic!("`{cell}` is not a number"));
    let scale: i128 = match unit {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        u => panic!("`{cell}`: unknown unit `{u}`"),
    };
    if neg { -v * scale } else { v * scale }
}

fn code(cell: &str) -> &str {
    cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')).unwrap_or_else(|| panic!("`{cell}` is not in backticks"))
}

fn table<'a>(t: &'a BTreeMap<String, Vec<Vec<String>>>, key: &str) -> &'a [Vec<String>] {
    t.get(key).unwrap_or_else(|| panic!("the chapter has no table whose first column is `{key}`"))
}

/// Names of `pub const PREFIX...` in lib.rs.
fn lib_constants(prefix: &str) -> Vec<String> {
    LIB.lines()
        .filter_map(|l| l.trim().strip_prefix("pub const ")?.split(':').next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn constant(name: &str) -> Option<u64> {
    Some(match name {
        "ABI_VERSION" => ABI_VERSION,
        "CONSOLE_MAX" => CONSOLE_MAX,
        "MORSEL_NAME_MAX" => MORSEL_NAME_MAX as u64,
        "MORSEL_QUOTA" => MORSEL_QUOTA,
        "MOUNT_QUOTA" => MOUNT_QUOTA,
        "DEVICE_MOUNT_QUOTA" => DEVICE_MOUNT_QUOTA,
        "EDU_MAX_TRANSFER" => EDU_MAX_TRANSFER,
        "NVME_BLOCK" => NVME_BLOCK,
        "EXMAP_MAX_ENTRIES" => EXMAP_MAX_ENTRIES,
        "EXMAP_MAX_COUNT" => EXMAP_MAX_COUNT,
        "EXMAP_MAX_SIZE" => EXMAP_MAX_SIZE,
        "BENCH_MAX_COUNT" => BENCH_MAX_COUNT,
        "WAIT_MAX_US" => WAIT_MAX_US,
        "FIRST_INTERRUPT_VECTOR" => FIRST_INTERRUPT_VECTOR,
        "BOOT_INFO_GPA" => BOOT_INFO_GPA,
        "PAGE_TABLES_GPA" => PAGE_TABLES_GPA,
        "VCPU_STACK_RESERVE" => VCPU_STACK_RESERVE,
        "IMAGE_BASE_GPA" => IMAGE_BASE_GPA,
        "MORSEL_WINDOW_GPA" => MORSEL_WINDOW_GPA,
        "MORSEL_WINDOW_SIZE" => MORSEL_WINDOW_SIZE,
        "INFO_ABI_VERSION" => INFO_ABI_VERSION,
        "INFO_GUEST_ID" => INFO_GUEST_ID,
        "INFO_MEMORY_SIZE" => INFO_MEMORY_SIZE,
        "INFO_GUEST_COUNT" => INFO_GUEST_COUNT,
        "INFO_LOG_LEVEL" => INFO_LOG_LEVEL,
        "INFO_VCPU_INDEX" => INFO_VCPU_INDEX,
        "INFO_VCPU_COUNT" => INFO_VCPU_COUNT,
        "INFO_CPU_INDEX" => INFO_CPU_INDEX,
        "INFO_EXITS" => INFO_EXITS,
        "INFO_SLICES" => INFO_SLICES,
        "INFO_INTERRUPTS" => INFO_INTERRUPTS,
        "INFO_TSC_PER_US" => INFO_TSC_PER_US,
        "INFO_SLICE_US" => INFO_SLICE_US,
        "EXMAP_ALLOC" => EXMAP_ALLOC,
        "EXMAP_FREE" => EXMAP_FREE,
        "EXMAP_READ" => EXMAP_READ,
        "EXMAP_WRITE" => EXMAP_WRITE,
        "EXMAP_INFO_POPULATED" => EXMAP_INFO_POPULATED,
        "EXMAP_INFO_CALLS" => EXMAP_INFO_CALLS,
        "EXMAP_INFO_INVALIDATIONS" => EXMAP_INFO_INVALIDATIONS,
        "EXMAP_INFO_ALLOCATED" => EXMAP_INFO_ALLOCATED,
        "EXMAP_INFO_FREED" => EXMAP_INFO_FREED,
        "EXMAP_INFO_ZEROED" => EXMAP_INFO_ZEROED,
        "EXMAP_INFO_FAILED" => EXMAP_INFO_FAILED,
        "EXMAP_INFO_READ" => EXMAP_INFO_READ,
        "EXMAP_INFO_WRITTEN" => EXMAP_INFO_WRITTEN,
        "EXMAP_INFO_COMMANDS" => EXMAP_INFO_COMMANDS,
        "EXMAP_INFO_MAX_DEPTH" => EXMAP_INFO_MAX_DEPTH,
        _ => return None,
    })
}

/// Arguments under which every existing call decodes to something other than `NoSuchCall`.
const ARGS: [u64; 6] = [0x1000, 1, 4096, 0, 0, 0];

#[test]
fn calls_match_the_abi() {
    let t = tables(CHAPTER);
    let rows = table(&t, "nr");
    let mut documented = Vec::new();
    for r in rows {
        let nr = u64::try_from(number(&r[0])).unwrap();
        assert_eq!(Call::name_of(nr), r[1], "call {:#04x}: the book says `{}`, abi says `{}`", nr, r[1], Call::name_of(nr));
        assert_ne!(Call::decode(nr, ARGS), Err(Error::NoSuchCall), "the book lists {:#04x} ({}), which abi does not decode", nr, r[1]);
        documented.push(nr);
    }
    // Every number the crate decodes (or names) is in the table.
    for nr in 0..0x1000u64 {
        let exists = Call::decode(nr, ARGS) != Err(Error::NoSuchCall) || Call::name_of(nr) != Call::name_of(u64::MAX);
        assert_eq!(exists, documented.contains(&nr), "call {nr:#04x} ({}) is in abi but not in the book, or the other way round", Call::name_of(nr));
    }
    // The HC_ constants and the table agree in count (each constant names a distinct call).
    assert_eq!(lib_constants("HC_").len(), documented.len(), "HC_ constants against the book's calls");
}

#[test]
fn errors_match_the_abi() {
    let t = tables(CHAPTER);
    let rows = table(&t, "status");
    let mut documented = Vec::new();
    for r in rows {
        let status = i64::try_from(number(&r[0])).unwrap();
        let e = Error::from_status(status).unwrap_or_else(|| panic!("the book lists status {status}, which is no abi::Error"));
        assert_eq!(format!("{e:?}"), code(&r[1]), "status {status}");
        assert_eq!(e.name(), r[2], "status {status}: message");
        documented.push(status);
    }
    for status in -1000..0 {
        if let Some(e) = Error::from_status(status) {
            assert!(documented.contains(&status), "abi::Error::{e:?} ({status}) is not in the book's error table");
        }
    }
}

/// A table of `| number | `CONSTANT` | ... |` rows: each constant has that value, and every
/// constant of lib.rs with `prefix` (but those in `except`) has a row.
fn selectors(key: &str, prefix: &str, except: &[&str]) {
    let t = tables(CHAPTER);
    let rows = table(&t, key);
    let mut documented = Vec::new();
    for r in rows {
        let name = code(&r[1]);
        let value = constant(name).unwrap_or_else(|| panic!("the book's `{key}` table names `{name}`, not a known abi constant"));
        assert_eq!(i128::from(value), number(&r[0]), "{name}");
        documented.push(name.to_string());
    }
    for name in lib_constants(prefix) {
        if !except.iter().any(|e| name.starts_with(e)) {
            assert!(documented.contains(&name), "abi::{name} is not in the book's `{key}` table");
        }
    }
}

#[test]
fn info_selectors_match_the_abi() {
    selectors("selector", "INFO_", &[]);
}

#[test]
fn exmap_opcodes_and_selectors_match_the_abi() {
    selectors("opcode", "EXMAP_", &["EXMAP_INFO_", "EXMAP_MAX_"]);
    selectors("exmap selector", "EXMAP_INFO_", &[]);
}

#[test]
fn constants_match_the_abi() {
    let t = tables(CHAPTER);
    for r in table(&t, "constant") {
        let name = code(&r[0]);
        let value = constant(name).unwrap_or_else(|| panic!("the book's constants table names `{name}`, not a known abi constant"));
        assert_eq!(i128::from(value), number(&r[1]), "{name}");
    }
}

#[test]
fn the_table_reader_reads_numbers_and_tables() {
    assert_eq!(number("0x1f"), 31);
    assert_eq!(number("-10"), -10);
    assert_eq!(number("16 GiB"), 16 << 30);
    let t = tables("text\n\n| a | b |\n| --- | --- |\n| 1 | `x` |\n| 2 | y |\n\nmore\n| c |\n| --- |\n| 3 |\n");
    assert_eq!(t["a"], vec![vec!["1".to_string(), "`x`".to_string()], vec!["2".to_string(), "y".to_string()]]);
    assert_eq!(t["c"], vec![vec!["3".to_string()]]);
}
