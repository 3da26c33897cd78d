//! Hypercall ABI v1, shared by guests and the hypervisor (which depends on this module).
//!
//! Number in rax; arguments in rdi, rsi, rdx, r10, r8, r9; status in rax (0 = ok,
//! negative = `Error`), value in rdx. The instruction is VMCALL on Intel, VMMCALL on AMD.

/// ABI version reported by `INFO_ABI_VERSION`.
pub const ABI_VERSION: u64 = 1;

/// `info(what)`: returns a fact about the guest or the system in rdx.
pub const HC_INFO: u64 = 0;
/// `console_write(ptr, len)`: writes guest bytes to the console; returns bytes written.
pub const HC_CONSOLE_WRITE: u64 = 1;
/// `exit(code)`: stops the guest; does not return.
pub const HC_EXIT: u64 = 2;
/// `yield()`: gives the CPU to the next guest.
pub const HC_YIELD: u64 = 3;
/// `morsel_create(name_ptr, name_len, size, flags)`: creates and mounts read-write a named
/// morsel; returns its guest-physical address. Flags: `MORSEL_HUGE_PAGES`,
/// `MORSEL_SHARE_WRITABLE`.
pub const HC_MORSEL_CREATE: u64 = 0x10;
/// `morsel_create` flag: back the morsel with 2 MiB pages (else 4 KiB).
pub const MORSEL_HUGE_PAGES: u64 = 1 << 0;
/// `morsel_create` flag: other guests may open it read-write (else read-only).
pub const MORSEL_SHARE_WRITABLE: u64 = 1 << 1;
/// `morsel_open(name_ptr, name_len, writable)`: mounts an existing morsel (writable: 0 or 1);
/// returns its guest-physical address; the size is returned by `morsel_size`.
pub const HC_MORSEL_OPEN: u64 = 0x11;
/// `morsel_unmount(gpa)`: unmounts the morsel mounted at `gpa`.
pub const HC_MORSEL_UNMOUNT: u64 = 0x12;
/// `morsel_destroy(name_ptr, name_len)`: destroys a morsel the caller owns (refused while
/// mounted anywhere).
pub const HC_MORSEL_DESTROY: u64 = 0x13;
/// `morsel_size(gpa)`: size in bytes of the morsel mounted at `gpa`.
pub const HC_MORSEL_SIZE: u64 = 0x14;
/// `morsel_stats()`: prints the morsel manager's counters to the console.
pub const HC_MORSEL_STATS: u64 = 0x15;

/// `info` selectors.
pub const INFO_ABI_VERSION: u64 = 0;
pub const INFO_GUEST_ID: u64 = 1;
pub const INFO_MEMORY_SIZE: u64 = 2;
pub const INFO_GUEST_COUNT: u64 = 3;

/// Longest console write accepted in one call.
pub const CONSOLE_MAX: u64 = 4096;

/// Hypercall errors, returned as their negative value in rax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum Error {
    /// Unknown hypercall number or selector.
    NoSuchCall = -1,
    /// A guest pointer is outside the guest's memory.
    BadAddress = -2,
    /// An argument is invalid (size, flags, alignment).
    Invalid = -3,
    /// Out of memory (frames or window space).
    NoMemory = -4,
    /// No such morsel.
    NotFound = -5,
    /// The owner did not grant this access.
    Denied = -6,
    /// The object is in use (mounted) or the name is taken.
    Busy = -7,
    /// A length is larger than the call accepts.
    TooLarge = -8,
}

impl Error {
    pub fn from_status(status: i64) -> Option<Error> {
        use Error::*;
        [NoSuchCall, BadAddress, Invalid, NoMemory, NotFound, Denied, Busy, TooLarge]
            .into_iter()
            .find(|e| *e as i64 == status)
    }

    pub fn name(self) -> &'static str {
        match self {
            Error::NoSuchCall => "no such call",
            Error::BadAddress => "bad address",
            Error::Invalid => "invalid argument",
            Error::NoMemory => "out of memory",
            Error::NotFound => "not found",
            Error::Denied => "access denied",
            Error::Busy => "busy",
            Error::TooLarge => "too large",
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as i64)
    }
}

/// What the hypervisor puts at `BOOT_INFO_GPA` and passes in rdi.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BootInfo {
    pub abi_version: u64,
    pub guest_id: u64,
    /// Guest RAM is [0, memory_size).
    pub memory_size: u64,
    /// Morsels are mounted in [morsel_window, morsel_window + morsel_window_size).
    pub morsel_window: u64,
    pub morsel_window_size: u64,
    /// A number from the command line (`:arg=N`), 0 if none.
    pub arg: u64,
    /// The guest's name, NUL-padded.
    pub name: [u8; 32],
}

/// Guest-physical address of the boot information.
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Guest-physical address of the guest's PML4 (the page tables follow it).
pub const PAGE_TABLES_GPA: u64 = 0x2000;
/// Where guest images are linked (see guest.ld).
pub const IMAGE_BASE_GPA: u64 = 0x20_0000;
/// Start of the morsel window: 512 GiB, the second PML4 slot.
pub const MORSEL_WINDOW_GPA: u64 = 512 << 30;
/// Size of the morsel window: PML4 slots 1-7 (3.5 TiB).
pub const MORSEL_WINDOW_SIZE: u64 = 7 * (512 << 30);
