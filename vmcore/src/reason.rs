//! Why a hypercall was refused, as a value that needs no allocation: `Reason`, a fixed
//! buffer that `core::fmt` writes into (a guest can trigger refusals at will, so the text
//! must not come from the heap, where running out would panic the hypervisor).

use core::fmt;

/// The longest reason kept; longer ones end in `...`.
pub const REASON_MAX: usize = 120;

/// A refusal's reason, formatted into a fixed buffer, cut at `REASON_MAX` bytes.
#[derive(Clone, Copy)]
pub struct Reason {
    buf: [u8; REASON_MAX],
    len: usize,
    cut: bool,
}

impl Reason {
    pub const fn new() -> Reason {
        Reason { buf: [0; REASON_MAX], len: 0, cut: false }
    }

    /// `args` formatted (cut if too long).
    pub fn format(args: fmt::Arguments) -> Reason {
        let mut r = Reason::new();
        let _ = fmt::write(&mut r, args);
        r
    }

    /// The text (whole UTF-8: a cut never splits a character).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// Whether the text was cut.
    pub fn is_cut(&self) -> bool {
        self.cut
    }
}

impl Default for Reason {
    fn default() -> Reason {
        Reason::new()
    }
}

impl fmt::Write for Reason {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.cut {
            return Ok(());
        }
        // Room for text, always leaving space for the `...` of a cut.
        let room = REASON_MAX - 3 - self.len;
        if s.len() <= room {
            self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
            self.len += s.len();
            return Ok(());
        }
        // Keep what fits before the `...`, ending on a character boundary.
        let mut n = room;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        self.buf[self.len..self.len + 3].copy_from_slice(b"...");
        self.len += 3;
        self.cut = true;
        Ok(())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_reasons_are_kept_whole() {
        let r = Reason::format(format_args!("name '{}' is taken by guest {}", "db", 3));
        assert_eq!(r.as_str(), "name 'db' is taken by guest 3");
        assert!(!r.is_cut());
    }

    #[test]
    fn long_reasons_are_cut_with_an_ellipsis() {
        let long = "x".repeat(500);
        let r = Reason::format(format_args!("a{long}"));
        assert_eq!(r.as_str().len(), REASON_MAX);
        assert!(r.as_str().ends_with("..."));
        assert!(r.is_cut());
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        let r = Reason::format(format_args!("{}", "é".repeat(100)));
        assert!(r.as_str().ends_with("é..."), "{r:?}");
        assert!(r.as_str().len() <= REASON_MAX);
    }

    proptest! {
        #[test]
        fn every_text_fits_and_starts_like_the_original(parts in proptest::collection::vec(".{0,50}", 0..8)) {
            let mut r = Reason::new();
            for p in &parts {
                fmt::Write::write_str(&mut r, p).unwrap();
            }
            let whole: String = parts.concat();
            prop_assert!(r.as_str().len() <= REASON_MAX);
            if whole.len() <= REASON_MAX - 3 {
                prop_assert_eq!(r.as_str(), whole.as_str());
            } else {
                let kept = r.as_str().strip_suffix("...").expect("ends with ...");
                prop_assert!(whole.starts_with(kept));
            }
        }
    }
}
