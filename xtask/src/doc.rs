//! `cargo xtask doc`: the book under `docs/` (mdBook) built into `build/book/`, and the check
//! `cargo xtask test doc` runs: the book builds, and every link of its chapters and of the
//! README resolves: to a chapter (listed in `SUMMARY.md`), a heading or explicit `id` of one
//! (`#anchor`), or a file or folder of the repository. `docs/pending/` (documentation of
//! branches not yet folded in) is not part of the book and not checked. The README's example
//! guest must be the file it names.

use crate::{bail, tools, Context, Result};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// The book's source and where `cargo xtask doc` puts the HTML.
pub const BOOK_DIR: &str = "docs";
pub const BOOK_SRC: &str = "docs/src";
pub const BOOK_OUT: &str = "build/book";
/// The README's example guest: the code block after this marker is that file.
const README_GUEST: &str = "tests/guests/src/bin/readme.rs";

/// `cargo xtask doc`: build the book into `build/book/`.
pub fn doc(root: &Path) -> Result<PathBuf> {
    let mdbook = tools::require_mdbook()?;
    let out = root.join(BOOK_OUT);
    let book = root.join(BOOK_DIR);
    let output = Command::new(&mdbook)
        .arg("build")
        .arg(&book)
        .arg("--dest-dir")
        .arg(&out)
        .output()
        .context(|| format!("cannot start {}", mdbook.display()))?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout);
    // mdBook reports some problems (a missing include) as ERROR lines and still exits 0.
    if !output.status.success() || text.lines().any(|l| l.contains("ERROR")) {
        bail!("mdbook build {} failed ({}):\n{}", book.display(), output.status, text.trim_end());
    }
    Ok(out.join("index.html"))
}

/// The whole check: build, then links, then the README's guest. Every problem, one per line.
pub fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    if let Err(e) = doc(root) {
        problems.push(e.0);
    }
    problems.extend(check_links(root)?);
    problems.extend(check_readme_guest(root)?);
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// Problems with the links of the README and of every chapter, as `file: message` lines.
pub fn check_links(root: &Path) -> Result<Vec<String>> {
    let src = root.join(BOOK_SRC);
    let summary_path = src.join("SUMMARY.md");
    let summary = read(&summary_path)?;
    let mut problems = Vec::new();
    // The chapters are what SUMMARY.md links; every .md under src/ must be one of them.
    let mut chapters: Vec<PathBuf> = Vec::new();
    for link in links(&summary) {
        let p = normalize(&src.join(&link.target));
        if !p.is_file() {
            problems.push(format!("{}: chapter `{}` does not exist", rel(root, &summary_path), link.target));
        }
        chapters.push(p);
    }
    for file in md_files(&src)? {
        if file != summary_path && !chapters.contains(&file) {
            problems.push(format!("{}: not listed in SUMMARY.md (mdBook would leave it out)", rel(root, &file)));
        }
    }
    let mut files = vec![root.join("README.md"), summary_path.clone()];
    files.extend(chapters.iter().filter(|p| p.is_file()).cloned());
    let mut ids: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for file in &files {
        let text = match expand_includes(file, &read(file)?) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{}: {e}", rel(root, file)));
                continue;
            }
        };
        for link in links(&text) {
            if let Err(e) = resolve(root, file, &link.target, &mut ids) {
                problems.push(format!("{}:{}: link `{}`: {e}", rel(root, file), link.line, link.target));
            }
        }
    }
    Ok(problems)
}

/// The README's example guest must be the file it names, byte for byte.
pub fn check_readme_guest(root: &Path) -> Result<Vec<String>> {
    let readme = read(&root.join("README.md"))?;
    let marker = format!("<!-- {README_GUEST} -->\n```rust\n");
    let Some(start) = readme.find(&marker).map(|i| i + marker.len()) else {
        return Ok(vec![format!("README.md: no `<!-- {README_GUEST} -->` code block (the example guest)")]);
    };
    let end = readme[start..].find("```\n").map_or(readme.len(), |e| start + e);
    let file = read(&root.join(README_GUEST))?;
    if readme[start..end] != file {
        return Ok(vec![format!("README.md: the example guest differs from {README_GUEST}: copy the file into the README")]);
    }
    Ok(Vec::new())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).context(|| format!("cannot read {}", path.display()))
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

fn md_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).context(|| format!("cannot list {}", dir.display()))?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(md_files(&p)?);
        } else if p.extension().is_some_and(|e| e == "md") {
            out.push(p);
        }
    }
    Ok(out)
}

/// `a/b/../c` -> `a/c`, without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// mdBook's `{{#include path}}` replaced by the file (relative to the including file).
fn expand_includes(file: &Path, text: &str) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("{{#include ") {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find("}}") else { return Err("unclosed {{#include".into()) };
        let target = rest[i + "{{#include ".len()..i + j].trim();
        // `path:anchor` or `path:1:10` select part of the file; the whole file is checked.
        let path = target.split(':').next().unwrap_or(target);
        let p = normalize(&file.parent().unwrap_or(Path::new(".")).join(path));
        match std::fs::read_to_string(&p) {
            Ok(t) => out.push_str(&t),
            Err(e) => return Err(format!("{{{{#include {target}}}}}: {e}")),
        }
        rest = &rest[i + j + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Debug, PartialEq)]
struct Link {
    line: usize,
    target: String,
}

/// Markdown links `[text](target)` and images `![alt](target)` outside code, one line at a
/// time (the links here do not break across lines), plus reference definitions `[x]: target`.
fn links(text: &str) -> Vec<Link> {
    let mut out = Vec::new();
    let mut fence = false;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = !fence;
            continue;
        }
        if fence {
            continue;
        }
        let plain = strip_code_spans(line);
        if let Some(target) = reference_definition(&plain) {
            out.push(Link { line: n + 1, target });
            continue;
        }
        let b = plain.as_bytes();
        let mut i = 0;
        while let Some(k) = plain[i..].find("](") {
            let start = i + k + 2;
            // The matching `)`, allowing one level of parentheses inside the target.
            let mut depth = 0;
            let mut end = None;
            for (j, &c) in b.iter().enumerate().skip(start) {
                match c {
                    b'(' => depth += 1,
                    b')' if depth == 0 => {
                        end = Some(j);
                        break;
                    }
                    b')' => depth -= 1,
                    _ => {}
                }
            }
            let Some(end) = end else { break };
            let raw = plain[start..end].trim();
            // An optional title: `(target "title")`.
            let target = raw.split_once(" \"").map_or(raw, |(t, _)| t).trim_matches(|c| c == '<' || c == '>');
            if !target.is_empty() {
                out.push(Link { line: n + 1, target: target.to_string() });
            }
            i = end + 1;
        }
    }
    out
}

/// `[label]: target` at the start of a line.
fn reference_definition(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (label, after) = rest.split_once("]:")?;
    if label.is_empty() || label.contains(']') {
        return None;
    }
    after.split_whitespace().next().map(str::to_string)
}

/// The line with inline code spans (`...`) blanked out, same length.
fn strip_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(' ');
        } else if in_code {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `target`, linked from `file`, resolves; `ids` caches each file's anchors.
fn resolve(root: &Path, file: &Path, target: &str, ids: &mut BTreeMap<PathBuf, Vec<String>>) -> std::result::Result<(), String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return Ok(()); // external: not checked (no network in CI)
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    let dest = if path.is_empty() {
        file.to_path_buf()
    } else if path.starts_with('/') {
        return Err("absolute path: link relative to this file".into());
    } else {
        normalize(&file.parent().unwrap_or(Path::new(".")).join(path))
    };
    if !dest.starts_with(root) {
        return Err("points outside the repository".into());
    }
    if !dest.exists() {
        return Err(format!("{} does not exist", rel(root, &dest)));
    }
    let book = root.join(BOOK_SRC);
    if file.starts_with(&book) && dest.starts_with(root.join("docs/pending")) {
        return Err("docs/pending/ is not part of the book".into());
    }
    // A chapter linking a repository .md file gets `.html` from mdBook: link its folder.
    if file.starts_with(&book) && !dest.starts_with(&book) && dest.extension().is_some_and(|e| e == "md") {
        return Err(format!(
            "mdBook turns links to .md files into .html, which {} has not: link the folder or another file",
            rel(root, &dest)
        ));
    }
    let Some(anchor) = anchor else { return Ok(()) };
    if dest.extension().is_none_or(|e| e != "md") {
        return Err(format!("an anchor into {}, which is no Markdown file", rel(root, &dest)));
    }
    if !ids.contains_key(&dest) {
        let text = std::fs::read_to_string(&dest).map_err(|e| e.to_string())?;
        let text = expand_includes(&dest, &text)?;
        ids.insert(dest.clone(), anchors(&text));
    }
    if ids[&dest].iter().any(|id| id == anchor) {
        Ok(())
    } else {
        Err(format!("no heading or id `{anchor}` in {}", rel(root, &dest)))
    }
}

/// The anchors of a Markdown file: its headings' ids as mdBook (and GitHub) make them
/// (lower case, spaces to `-`, other punctuation dropped; a repeated id gets `-1`, `-2`...),
/// and explicit `id="..."` attributes.
fn anchors(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut fence = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = !fence;
            continue;
        }
        if fence {
            continue;
        }
        if let Some(h) = t.strip_prefix('#') {
            let h = h.trim_start_matches('#');
            if h.starts_with(' ') {
                let base = heading_id(h.trim());
                let mut id = base.clone();
                let mut n = 1;
                while out.contains(&id) {
                    id = format!("{base}-{n}");
                    n += 1;
                }
                out.push(id);
            }
        }
        let mut rest = line;
        while let Some(i) = rest.find("id=\"") {
            let after = &rest[i + 4..];
            if let Some(j) = after.find('"') {
                out.push(after[..j].to_string());
                rest = &after[j..];
            } else {
                break;
            }
        }
    }
    out
}

/// A heading's id: its text without Markdown (code marks, emphasis, link targets), lower
/// case, whitespace to `-`, everything but letters, digits, `-` and `_` dropped.
fn heading_id(heading: &str) -> String {
    // `[text](target)` -> `text`
    let mut text = String::new();
    let mut rest = heading;
    while let Some(i) = rest.find("](") {
        let Some(j) = rest[i..].find(')') else { break };
        text.push_str(&rest[..i]);
        rest = &rest[i + j + 1..];
    }
    text.push_str(rest);
    text.chars()
        .filter_map(|c| {
            if c.is_alphanumeric() || c == '_' || c == '-' {
                Some(c.to_lowercase().next().unwrap_or(c))
            } else if c.is_whitespace() {
                Some('-')
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heading_ids_follow_mdbook() {
        assert_eq!(heading_id("SMP bench (`cargo xtask bench smp`)"), "smp-bench-cargo-xtask-bench-smp");
        assert_eq!(heading_id("exmap_info selectors"), "exmap_info-selectors");
        assert_eq!(heading_id("The shared path: EPT subtrees in VT-d domains"), "the-shared-path-ept-subtrees-in-vt-d-domains");
        assert_eq!(heading_id("See [this](x.md) part"), "see-this-part");
        assert_eq!(anchors("# A\n## A\n```\n# not a heading\n```\n<a id=\"x\"></a>\n#nope\n"), ["a", "a-1", "x"]);
    }

    #[test]
    fn links_are_found_outside_code() {
        let text = "see [a](a.md) and ![img](b/c.svg \"t\") and `[no](x.md)`\n```\n[no](y.md)\n```\n[ref]: r.md\n[f(x)](f.md#g)\n";
        let got: Vec<String> = links(text).into_iter().map(|l| l.target).collect();
        assert_eq!(got, ["a.md", "b/c.svg", "r.md", "f.md#g"]);
        assert_eq!(links("[a](x(1).md)")[0].target, "x(1).md");
    }

    /// A small book in a temporary folder: good links pass, each kind of bad one is named.
    #[test]
    fn broken_links_are_reported() {
        let root = std::env::temp_dir().join(format!("xtask-doc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let src = root.join(BOOK_SRC);
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(root.join("docs/pending")).unwrap();
        std::fs::create_dir_all(root.join("crate")).unwrap();
        std::fs::write(root.join("crate/lib.rs"), "").unwrap();
        std::fs::write(root.join("crate/README.md"), "# Crate\n").unwrap();
        std::fs::write(root.join("docs/pending/x.md"), "[broken](nowhere.md)\n").unwrap();
        std::fs::write(src.join("SUMMARY.md"), "# Summary\n\n- [One](one.md)\n- [Two](two.md)\n").unwrap();
        std::fs::write(root.join("README.md"), "[one](docs/src/one.md#first-part)\n").unwrap();
        std::fs::write(
            src.join("one.md"),
            "# One\n\n## First part\n\n[two](two.md#second) [code](../../crate/lib.rs) [dir](../../crate/) [me](#one)\n",
        )
        .unwrap();
        std::fs::write(src.join("two.md"), "# Two\n\n## Second\n\n{{#include ../../crate/README.md}}\n").unwrap();
        assert_eq!(check_links(&root).unwrap(), Vec::<String>::new());

        std::fs::write(
            src.join("two.md"),
            "# Two\n\n## Second\n\n[a](one.md#nope) [b](missing.md) [c](../../crate/README.md) [d](../pending/x.md) [e](/etc/passwd) [f](../../crate/lib.rs#x)\n",
        )
        .unwrap();
        std::fs::write(src.join("three.md"), "# Three\n").unwrap();
        let problems = check_links(&root).unwrap();
        let expect = [
            "three.md: not listed in SUMMARY.md",
            "link `one.md#nope`: no heading or id `nope`",
            "link `missing.md`: docs/src/missing.md does not exist",
            "link `../../crate/README.md`: mdBook turns links to .md files into .html",
            "link `../pending/x.md`: docs/pending/ is not part of the book",
            "link `/etc/passwd`: absolute path",
            "link `../../crate/lib.rs#x`: an anchor into crate/lib.rs",
        ];
        for e in expect {
            assert!(problems.iter().any(|p| p.contains(e)), "{e} not in {problems:#?}");
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");

        // The README's anchor goes when its heading does.
        std::fs::write(src.join("one.md"), "# One\n").unwrap();
        let problems = check_links(&root).unwrap();
        assert!(problems.iter().any(|p| p.contains("README.md:1: link `docs/src/one.md#first-part`: no heading")), "{problems:#?}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
