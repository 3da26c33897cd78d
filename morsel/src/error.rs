//! The crate's error type. Every operation reachable from a guest returns one of these instead
//! of panicking.

use core::fmt;

/// Why a table or morsel operation was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Error {
    /// An address is not aligned as the operation needs.
    Misaligned { addr: u64, align: u64 },
    /// An input address lies beyond what the table translates.
    OutOfRange { addr: u64, limit: u64 },
    /// Something is already mapped or mounted where the operation wanted to write.
    Occupied { addr: u64 },
    /// Nothing is mapped at the address (of the requested size).
    NotMapped { addr: u64 },
    /// The address lies inside a mounted morsel window; only `Morsel::unmount` edits it.
    InsideMount { addr: u64 },
    /// The window does not hold a mount of this morsel.
    NotMounted { addr: u64 },
    /// Refused while the object is still mounted (`count` mounts).
    StillMounted { count: u32 },
    /// The frame allocator has nothing left.
    OutOfMemory,
    /// A morsel size that is 0 or too large for one subtree (`max` bytes).
    BadSize { size: u64, max: u64 },
    /// A permission without read (no format can encode it).
    BadPerm,
    /// A number of levels the format does not support.
    BadLevels { levels: u8 },
    /// The morsel's root is too high for the target table (`root` level, `levels` in table).
    RootTooHigh { root: u8, levels: u8 },
    /// A subtree in format `morsel` cannot be read by a walker of format `table`.
    IncompatibleFormats {
        morsel: &'static str,
        table: &'static str,
    },
    /// A recorded subtree does not have the shape its record says (entry at `addr`).
    Corrupt { addr: u64 },
    /// A page-by-page edit of a morsel that is not sparse (`Morsel::create_sparse`).
    NotSparse,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Misaligned { addr, align } => {
                write!(f, "address {addr:#x} is not aligned to {align:#x}")
            }
            Error::OutOfRange { addr, limit } => write!(
                f,
                "address {addr:#x} is beyond the table's limit {limit:#x}"
            ),
            Error::Occupied { addr } => write!(f, "address {addr:#x} is already mapped or mounted"),
            Error::NotMapped { addr } => write!(f, "nothing mapped at {addr:#x}"),
            Error::InsideMount { addr } => {
                write!(f, "address {addr:#x} is inside a mounted morsel")
            }
            Error::NotMounted { addr } => write!(f, "this morsel is not mounted at {addr:#x}"),
            Error::StillMounted { count } => write!(f, "still mounted {count} time(s)"),
            Error::OutOfMemory => f.write_str("out of physical frames"),
            Error::BadSize { size, max } => {
                write!(f, "morsel size {size:#x} is 0 or above {max:#x}")
            }
            Error::BadPerm => f.write_str("permission without read access"),
            Error::BadLevels { levels } => {
                write!(f, "{levels} table levels not supported by this format")
            }
            Error::RootTooHigh { root, levels } => {
                write!(
                    f,
                    "morsel root at level {root} does not fit below a {levels}-level table"
                )
            }
            Error::IncompatibleFormats { morsel, table } => {
                write!(
                    f,
                    "a subtree in {morsel} format cannot be mounted into a {table} table"
                )
            }
            Error::NotSparse => f.write_str("the morsel is not sparse (ExMap)"),
            Error::Corrupt { addr } => {
                write!(f, "the subtree does not match its record (entry at {addr:#x})")
            }
        }
    }
}

#[cfg(any(test, feature = "std"))]
impl std::error::Error for Error {}
