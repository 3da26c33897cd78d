//! Turns the RIPs in a serial log into `function (file:line)` from the ELFs' debug info
//! (`addr2line`): a guest's RIP (`guest N (NAME) ... RIP 0x...`) from that guest's ELF, any
//! other RIP (a hypervisor exception) from the hypervisor ELF. Release builds carry line
//! tables (`debug = 1` in the workspace profile), so this works on what `cargo xtask` boots.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct Symbolizer {
    hypervisor: PathBuf,
    guests: HashMap<String, PathBuf>,
    /// Per ELF: its debug info and its executable segments (only addresses inside these are
    /// named: debug info also holds code that the linker dropped, at address 0).
    loaded: HashMap<PathBuf, Option<Elf>>,
}

/// An ELF's debug info, its executable (start, end) ranges and its code symbols.
type Elf = (addr2line::Loader, Vec<(u64, u64)>, Vec<Symbol>);

impl Symbolizer {
    pub fn new(hypervisor: &Path, guests: &[(String, PathBuf)]) -> Symbolizer {
        Symbolizer { hypervisor: hypervisor.to_path_buf(), guests: guests.iter().cloned().collect(), loaded: HashMap::new() }
    }

    /// `line` with ` <function (file:line)>` after each `RIP 0x...` that the ELF knows.
    /// `hypervisor RIP 0x...` is always the hypervisor's, also in a line about a guest (a
    /// fault of the hypervisor or the emulator while that guest ran, `vm/report.rs`).
    pub fn line(&mut self, line: &str) -> String {
        let guest_elf = match guest_name(line) {
            Some(name) => self.guests.get(name).cloned(),
            None => Some(self.hypervisor.clone()),
        };
        let mut out = String::with_capacity(line.len() + 64);
        let mut rest = line;
        while let Some(i) = rest.find("RIP 0x") {
            let start = i + "RIP 0x".len();
            let digits = rest[start..].find(|c: char| !c.is_ascii_hexdigit()).map_or(rest.len(), |n| start + n);
            let elf = match rest[..i].ends_with("hypervisor ") {
                true => Some(self.hypervisor.clone()),
                false => guest_elf.clone(),
            };
            out.push_str(&rest[..digits]);
            if let (Ok(addr), Some(elf)) = (u64::from_str_radix(&rest[start..digits], 16), elf) {
                if let Some(name) = self.lookup(&elf, addr) {
                    out.push_str(&format!(" <{name}>"));
                }
            }
            rest = &rest[digits..];
        }
        out.push_str(rest);
        out
    }

    /// Which ELF knows `addr` (the hypervisor's first, then the guests' in the order given to
    /// `new`) and its `function (file:line)` there.
    pub fn anywhere(&mut self, addr: u64) -> Option<(String, String)> {
        let mut elfs = vec![("hypervisor".to_string(), self.hypervisor.clone())];
        let mut guests: Vec<(String, PathBuf)> = self.guests.iter().map(|(n, p)| (format!("guest {n}"), p.clone())).collect();
        guests.sort();
        elfs.extend(guests);
        elfs.into_iter().find_map(|(which, elf)| Some((which, self.lookup(&elf, addr)?)))
    }

    /// `function (file:line)` for `addr` in `elf`, innermost inlined frame first.
    pub fn lookup(&mut self, elf: &Path, addr: u64) -> Option<String> {
        let (loader, code, labels) = self
            .loaded
            .entry(elf.to_path_buf())
            .or_insert_with(|| {
                let data = std::fs::read(elf).ok()?;
                Some((addr2line::Loader::new(elf).ok()?, code_ranges(&data), code_symbols(&data)))
            })
            .as_ref()?;
        if !code.iter().any(|&(start, end)| (start..end).contains(&addr)) {
            return None;
        }
        // Assembly (the world switches) has no debug info, and the debug info may give its
        // addresses to the function before it: the nearest symbol, if it is an assembly
        // label, names it (`svm_vmrun_return`, `svm_world_switch+0x21`).
        if let Some(label) = nearest_label(labels, addr) {
            return Some(label);
        }
        let mut frames = loader.find_frames(addr).ok()?;
        let mut names = Vec::new();
        while let Ok(Some(frame)) = frames.next() {
            let function = frame.function.as_ref().and_then(|f| f.demangle().ok()).map(|f| f.into_owned());
            let place = frame.location.as_ref().and_then(|l| {
                let file = Path::new(l.file?).file_name()?.to_string_lossy().into_owned();
                Some(format!("{file}:{}", l.line.unwrap_or(0)))
            });
            match (function, place) {
                (Some(f), Some(p)) => names.push(format!("{f} ({p})")),
                (Some(f), None) => names.push(f),
                (None, Some(p)) => names.push(p),
                (None, None) => {}
            }
        }
        if names.is_empty() {
            return loader.find_symbol(addr).map(|s| addr2line::demangle_auto(s.into(), None).into_owned());
        }
        Some(names.join(" inlined into "))
    }
}

/// The executable PT_LOAD segments (start, end) of a little-endian ELF64 file.
fn code_ranges(elf: &[u8]) -> Vec<(u64, u64)> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()));
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return Vec::new();
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else { return Vec::new() };
    (0..phnum)
        .filter_map(|i| {
            let ph = phoff as usize + i * phentsize;
            // p_type 1 = PT_LOAD, p_flags bit 0 = PF_X; p_vaddr at +0x10, p_memsz at +0x28.
            (u32_at(ph)? == 1 && u32_at(ph + 4)? & 1 != 0).then_some(())?;
            let start = u64_at(ph + 0x10)?;
            Some((start, start.checked_add(u64_at(ph + 0x28)?)?))
        })
        .collect()
}

/// A symbol of an ELF's code: address, name, whether it is an assembly label (STT_NOTYPE,
/// as `global_asm!` labels are) rather than a function (STT_FUNC).
type Symbol = (u64, String, bool);

/// The named STT_FUNC and STT_NOTYPE symbols of a little-endian ELF64 `.symtab`, by address.
fn code_symbols(elf: &[u8]) -> Vec<Symbol> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let mut out = Vec::new();
    let (Some(shoff), Some(shentsize), Some(shnum)) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c)) else { return out };
    let section = |i: usize| shoff as usize + i * shentsize;
    for i in 0..shnum {
        let sh = section(i);
        if u32_at(sh + 4) != Some(2) {
            continue; // SHT_SYMTAB
        }
        let (Some(off), Some(size), Some(link), Some(entsize)) = (u64_at(sh + 0x18), u64_at(sh + 0x20), u32_at(sh + 0x28), u64_at(sh + 0x38)) else { continue };
        let Some(strtab) = u64_at(section(link) + 0x18) else { continue };
        if entsize == 0 {
            continue;
        }
        for sym in (off as usize..(off + size) as usize).step_by(entsize as usize) {
            let (Some(name), Some(info), Some(shndx), Some(value)) = (u32_at(sym), elf.get(sym + 4), u16_at(sym + 6), u64_at(sym + 8)) else { continue };
            let kind = info & 0xf; // 0 NOTYPE, 2 FUNC
            if (kind != 0 && kind != 2) || shndx == 0 || name == 0 {
                continue;
            }
            let start = strtab as usize + name;
            let Some(len) = elf.get(start..).and_then(|b| b.iter().position(|&c| c == 0)) else { continue };
            let name = String::from_utf8_lossy(&elf[start..start + len]).into_owned();
            // Linker-script markers (`__kernel_start`) are no code.
            if !name.starts_with("__") && !name.starts_with('.') {
                out.push((value, name, kind == 0));
            }
        }
    }
    out.sort();
    out
}

/// `label` or `label+0xN` if the nearest code symbol at or below `addr` is an assembly label.
fn nearest_label(symbols: &[Symbol], addr: u64) -> Option<String> {
    let i = symbols.partition_point(|s| s.0 <= addr).checked_sub(1)?;
    let (at, name, label) = &symbols[i];
    label.then(|| if *at == addr { name.clone() } else { format!("{name}+{:#x}", addr - at) })
}

/// `NAME` of `guest N (NAME)` in a log line.
fn guest_name(line: &str) -> Option<&str> {
    let at = line.find("guest ")?;
    let rest = &line[at + "guest ".len()..];
    let (id, rest) = rest.split_once(" (")?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.split_once(')').map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_names_are_found() {
        assert_eq!(guest_name("[ 0.1] ERROR vm: guest 0 (oob) stopped: x, RIP 0x200010"), Some("oob"));
        assert_eq!(guest_name("EXCEPTION #PF (vector 14) at RIP 0x100000"), None);
    }

    /// Builds a small static program with debug info and checks that its function's address
    /// is named, with file and line, and that a RIP in a log line is annotated.
    #[test]
    fn symbolization_names_a_known_function() {
        let dir = std::env::temp_dir().join(format!("parperos-sym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("known.rs");
        std::fs::write(&src, "#[inline(never)]\n#[no_mangle]\npub extern \"C\" fn parperos_known_function() -> u32 {\n    std::hint::black_box(7)\n}\ncore::arch::global_asm!(\".global parperos_label\", \"parperos_label:\", \"nop\", \"nop\", \"ret\");\nextern \"C\" { fn parperos_label(); }\nfn main() { println!(\"{} {:p}\", parperos_known_function(), parperos_label as *const ()); }\n").unwrap();
        let elf = dir.join("known");
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let ok = std::process::Command::new(rustc)
            .args(["-g", "-C", "opt-level=1", "-C", "relocation-model=static", "-C", "link-arg=-no-pie", "-o"])
            .arg(&elf)
            .arg(&src)
            .status()
            .unwrap()
            .success();
        assert!(ok, "rustc failed");
        // The symbol's address from the symbol table (as `nm` shows it).
        let data = std::fs::read(&elf).unwrap();
        let addr = find_symbol_address(&data, "parperos_known_function").expect("symbol in the ELF");
        let mut s = Symbolizer::new(&elf, &[("known".into(), elf.clone())]);
        let name = s.lookup(&elf, addr + 1).expect("a name");
        assert!(name.contains("parperos_known_function (known.rs:"), "{name}");
        let line = s.line(&format!("ERROR vm: guest 1 (known) stopped: x, RIP {:#x}", addr + 1));
        assert!(line.contains("RIP 0x") && line.contains(" <") && line.contains("parperos_known_function (known.rs:4)>"), "{line}");
        // An address the ELF does not know stays as it is.
        assert_eq!(s.line("guest 1 (known) stopped, RIP 0x10"), "guest 1 (known) stopped, RIP 0x10");
        // `hypervisor RIP` in a guest's line is named from the hypervisor's ELF (here the
        // same program under another role), the guest's RIP from the guest's (none here).
        let mut s = Symbolizer::new(&elf, &[("other".into(), dir.join("missing"))]);
        let line = s.line(&format!("ERROR vm: guest 4 (other) stopped by an emulator fault (hypervisor RIP {:#x}); the guest was at RIP {:#x}", addr + 1, addr + 1));
        assert!(line.contains(&format!("hypervisor RIP {:#x} <", addr + 1)) && line.contains("parperos_known_function (known.rs:4)>"), "{line}");
        assert!(line.ends_with(&format!("the guest was at RIP {:#x}", addr + 1)), "{line}");
        let line = s.line(&format!("guest 4 (nameless) stopped: hypervisor RIP {:#x}", addr + 1));
        assert!(line.contains("parperos_known_function"), "{line}");
        // An assembly label (no debug info) is named from the symbol table.
        let label = find_symbol_address(&data, "parperos_label").expect("label in the ELF");
        assert_eq!(s.lookup(&elf, label).as_deref(), Some("parperos_label"));
        assert_eq!(s.lookup(&elf, label + 1).as_deref(), Some("parperos_label+0x1"));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The value of symbol `name` from a little-endian ELF64 `.symtab`.
    fn find_symbol_address(elf: &[u8], name: &str) -> Option<u64> {
        let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
        let (shoff, shentsize, shnum) = (u64_at(0x28) as usize, u16_at(0x3a), u16_at(0x3c));
        let section = |i: usize| shoff + i * shentsize;
        for i in 0..shnum {
            let sh = section(i);
            if u32_at(sh + 4) != 2 {
                continue; // SHT_SYMTAB
            }
            let (off, size, link, entsize) = (u64_at(sh + 0x18) as usize, u64_at(sh + 0x20) as usize, u32_at(sh + 0x28), u64_at(sh + 0x38) as usize);
            let strtab = u64_at(section(link) + 0x18) as usize;
            for sym in (off..off + size).step_by(entsize) {
                let n = strtab + u32_at(sym);
                let end = elf[n..].iter().position(|&b| b == 0)? + n;
                if &elf[n..end] == name.as_bytes() {
                    return Some(u64_at(sym + 8));
                }
            }
        }
        None
    }
}
