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

/// An ELF's debug info and its executable (start, end) ranges.
type Elf = (addr2line::Loader, Vec<(u64, u64)>);

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

    /// `function (file:line)` for `addr` in `elf`, innermost inlined frame first.
    pub fn lookup(&mut self, elf: &Path, addr: u64) -> Option<String> {
        let (loader, code) = self
            .loaded
            .entry(elf.to_path_buf())
            .or_insert_with(|| Some((addr2line::Loader::new(elf).ok()?, code_ranges(&std::fs::read(elf).ok()?))))
            .as_ref()?;
        if !code.iter().any(|&(start, end)| (start..end).contains(&addr)) {
            return None;
        }
        // The symbol table wins where it names something the debug info does not know
        // about: an assembly label (`svm_vmrun_return`) inside a range that the debug info
        // gives to the function before it.
        let symbol = loader.find_symbol(addr).map(|s| addr2line::demangle_auto(s.into(), None).into_owned());
        let mut frames = loader.find_frames(addr).ok()?;
        let mut names = Vec::new();
        let mut outermost = None;
        while let Ok(Some(frame)) = frames.next() {
            let function = frame.function.as_ref().and_then(|f| f.demangle().ok()).map(|f| f.into_owned());
            outermost = function.clone().or(outermost);
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
        if let (Some(sym), Some(f)) = (&symbol, &outermost) {
            if !sym.starts_with(f.as_str()) && !f.starts_with(sym.as_str()) {
                return Some(sym.clone());
            }
        }
        if names.is_empty() {
            return symbol;
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
        std::fs::write(&src, "#[inline(never)]\n#[no_mangle]\npub extern \"C\" fn parperos_known_function() -> u32 {\n    std::hint::black_box(7)\n}\nfn main() { println!(\"{}\", parperos_known_function()); }\n").unwrap();
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
