//! Sizes as the logs print them (`16 KiB`, `2 MiB`, `1024 MiB`, `4097 bytes`) and as command
//! lines and scenario files write them (`16M`, `2G`, `4096K`, `4096`): `parse_size`, shared by
//! the hypervisor's command line and xtask's checks of it and of scenario files.

use core::fmt;

/// A byte count shown in the largest of MiB, KiB and bytes that divides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let n = self.0;
        if n != 0 && n.is_multiple_of(1 << 20) {
            write!(f, "{} MiB", n >> 20)
        } else if n != 0 && n.is_multiple_of(1 << 10) {
            write!(f, "{} KiB", n >> 10)
        } else {
            write!(f, "{n} bytes")
        }
    }
}

/// `16M`, `2G`, `4096K` (KiB, MiB, GiB; either case) or plain bytes; None for anything else
/// (an empty string, another suffix, blanks, a fraction) and for a size past 64 bits. The
/// digits are read by `u64::from_str`, which also takes one leading `+`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::{parse_size, Bytes};
    use alloc::format;

    #[test]
    fn sizes_with_and_without_suffix() {
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4096k"), Some(4 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size(&format!("{}G", u64::MAX >> 30)), Some((u64::MAX >> 30) << 30));
        assert_eq!(parse_size("+1K"), Some(1024));
        for bad in ["", "M", "12Q", "-1", " 1", "1 M", "1.5M", "99999999999G", "18446744073709551616", &format!("{}G", (u64::MAX >> 30) + 1)] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn picks_the_largest_unit_that_divides() {
        assert_eq!(format!("{}", Bytes(16 << 10)), "16 KiB");
        assert_eq!(format!("{}", Bytes(2 << 20)), "2 MiB");
        assert_eq!(format!("{}", Bytes(1 << 30)), "1024 MiB");
        assert_eq!(format!("{}", Bytes(4097)), "4097 bytes");
        assert_eq!(format!("{}", Bytes((1 << 20) + 4096)), "1028 KiB");
        assert_eq!(format!("{}", Bytes(0)), "0 bytes");
    }
}
