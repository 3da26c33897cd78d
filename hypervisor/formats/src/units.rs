//! Sizes as the logs print them: `16 KiB`, `2 MiB`, `1024 MiB`, `4097 bytes`.

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

#[cfg(test)]
mod tests {
    use super::Bytes;
    use alloc::format;

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
