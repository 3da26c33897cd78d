//! Typed decoding of a raw hypercall (number and six argument registers) into a `Call`,
//! before any handler runs (uhyve's `Hypercall`, Firecracker's typed exits are the model).
//! What can be checked without guest memory or hypervisor state is checked here: unknown
//! numbers, flag bits, booleans, name and console lengths, pointer ranges that wrap, device
//! ids, directions and opcodes. Handlers then see only well-formed arguments.

use crate::*;

/// A guest-physical pointer and a length whose end does not wrap (the memory itself is
/// checked when the hypervisor reads it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSlice {
    pub ptr: u64,
    pub len: u64,
}

impl GuestSlice {
    fn new(ptr: u64, len: u64) -> Result<GuestSlice, Error> {
        ptr.checked_add(len).map(|_| GuestSlice { ptr, len }).ok_or(Error::BadAddress)
    }
}

/// A morsel or region name: 1 to `MORSEL_NAME_MAX` bytes at `ptr` (their contents, printable
/// ASCII without spaces, are checked when they are read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Name(pub GuestSlice);

impl Name {
    fn new(ptr: u64, len: u64) -> Result<Name, Error> {
        if len == 0 || len > MORSEL_NAME_MAX as u64 {
            return Err(Error::Invalid);
        }
        GuestSlice::new(ptr, len).map(Name)
    }
}

/// `morsel_create`'s flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateFlags {
    pub huge_pages: bool,
    pub share_writable: bool,
    pub persistent: bool,
}

/// An ExMap batch operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExmapOp {
    Alloc,
    Free,
    Read,
    Write,
}

/// How long `wait` may block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// Do not block: take what is pending.
    Poll,
    /// At most this many microseconds (1..=`WAIT_MAX_US`).
    Micros(u64),
    /// Until a doorbell or an interrupt.
    Forever,
}

/// A virtual interrupt vector: 32..=255.
fn vector(v: u64) -> Result<u8, Error> {
    match v {
        FIRST_INTERRUPT_VECTOR..=255 => Ok(v as u8),
        _ => Err(Error::Invalid),
    }
}

/// A finite duration: 1..=`WAIT_MAX_US` microseconds.
fn micros(us: u64) -> Result<u64, Error> {
    match us {
        0 => Err(Error::Invalid),
        1..=WAIT_MAX_US => Ok(us),
        _ => Err(Error::TooLarge),
    }
}

/// A hypercall with its arguments, as the guest meant it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Info { what: u64 },
    ConsoleWrite { text: GuestSlice },
    Exit { code: i32 },
    Yield,
    MorselCreate { name: Name, size: u64, flags: CreateFlags },
    MorselOpen { name: Name, writable: bool },
    MorselUnmount { gpa: u64 },
    MorselDestroy { name: Name },
    MorselSize { gpa: u64 },
    MorselStats,
    DeviceMount { name: Name, bdf: u16, iova: u64, writable: bool },
    DeviceUnmount { bdf: u16, iova: u64 },
    EduDma { to_device: bool, iova: u64, len: u64 },
    Nvme { write: bool, gpa: u64, offset: u64, lba: u64, count: u64 },
    ExmapCreate { name: Name, size: u64, share_writable: bool },
    ExmapAction { region: u64, iov: u64, count: u64, op: ExmapOp },
    ExmapInfo { region: u64, what: u64 },
    GuestExceptions { mask: u32 },
    /// `vector`: None for bits only.
    NotifySubscribe { gpa: u64, vector: Option<u8> },
    Notify { gpa: u64, bits: u64 },
    Wait { mask: u64, timeout: Timeout },
    Sleep { us: u64 },
    /// `us` 0: cancel.
    Timer { us: u64, vector: u8 },
    /// `bits` 0: cancel.
    NameWatch { name: Name, bits: u64 },
    /// `count`: 1..=`BENCH_MAX_COUNT`.
    BenchFrames { huge: bool, count: u64 },
}

fn flag(v: u64) -> Result<bool, Error> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::Invalid),
    }
}

fn device(bdf: u64) -> Result<u16, Error> {
    u16::try_from(bdf).map_err(|_| Error::Invalid)
}

impl Call {
    /// Decodes hypercall `nr` with arguments `a` (rdi, rsi, rdx, r10, r8, r9).
    pub fn decode(nr: u64, a: [u64; 6]) -> Result<Call, Error> {
        Ok(match nr {
            HC_INFO => Call::Info { what: a[0] },
            HC_CONSOLE_WRITE => {
                if a[1] > CONSOLE_MAX {
                    return Err(Error::TooLarge);
                }
                Call::ConsoleWrite { text: GuestSlice::new(a[0], a[1])? }
            }
            HC_EXIT => Call::Exit { code: a[0] as u32 as i32 },
            HC_YIELD => Call::Yield,
            HC_MORSEL_CREATE => {
                let name = Name::new(a[0], a[1])?;
                if a[3] & !(MORSEL_HUGE_PAGES | MORSEL_SHARE_WRITABLE | MORSEL_PERSISTENT) != 0 {
                    return Err(Error::Invalid);
                }
                let flags = CreateFlags {
                    huge_pages: a[3] & MORSEL_HUGE_PAGES != 0,
                    share_writable: a[3] & MORSEL_SHARE_WRITABLE != 0,
                    persistent: a[3] & MORSEL_PERSISTENT != 0,
                };
                Call::MorselCreate { name, size: a[2], flags }
            }
            HC_MORSEL_OPEN => Call::MorselOpen { name: Name::new(a[0], a[1])?, writable: flag(a[2])? },
            HC_MORSEL_UNMOUNT => Call::MorselUnmount { gpa: a[0] },
            HC_MORSEL_DESTROY => Call::MorselDestroy { name: Name::new(a[0], a[1])? },
            HC_MORSEL_SIZE => Call::MorselSize { gpa: a[0] },
            HC_MORSEL_STATS => Call::MorselStats,
            HC_DEVICE_MOUNT => Call::DeviceMount {
                name: Name::new(a[0], a[1])?,
                bdf: device(a[2])?,
                iova: a[3],
                writable: flag(a[4])?,
            },
            HC_DEVICE_UNMOUNT => Call::DeviceUnmount { bdf: device(a[0])?, iova: a[1] },
            HC_EDU_DMA => {
                let to_device = match a[0] {
                    EDU_TO_DEVICE => true,
                    EDU_TO_MEMORY => false,
                    _ => return Err(Error::Invalid),
                };
                Call::EduDma { to_device, iova: a[1], len: a[2] }
            }
            HC_NVME_READ | HC_NVME_WRITE => {
                Call::Nvme { write: nr == HC_NVME_WRITE, gpa: a[0], offset: a[1], lba: a[2], count: a[3] }
            }
            HC_EXMAP_CREATE => {
                let name = Name::new(a[0], a[1])?;
                if a[3] & !MORSEL_SHARE_WRITABLE != 0 {
                    return Err(Error::Invalid);
                }
                Call::ExmapCreate { name, size: a[2], share_writable: a[3] & MORSEL_SHARE_WRITABLE != 0 }
            }
            HC_EXMAP_ACTION => {
                let op = match a[3] {
                    EXMAP_ALLOC => ExmapOp::Alloc,
                    EXMAP_FREE => ExmapOp::Free,
                    EXMAP_READ => ExmapOp::Read,
                    EXMAP_WRITE => ExmapOp::Write,
                    _ => return Err(Error::Invalid),
                };
                if !(1..=EXMAP_MAX_ENTRIES).contains(&a[2]) {
                    return Err(Error::Invalid);
                }
                Call::ExmapAction { region: a[0], iov: a[1], count: a[2], op }
            }
            HC_EXMAP_INFO => Call::ExmapInfo { region: a[0], what: a[1] },
            HC_GUEST_EXCEPTIONS => {
                if a[0] & !GUEST_EXCEPTIONS != 0 {
                    return Err(Error::Invalid);
                }
                Call::GuestExceptions { mask: a[0] as u32 }
            }
            HC_NOTIFY_SUBSCRIBE => Call::NotifySubscribe { gpa: a[0], vector: if a[1] == 0 { None } else { Some(vector(a[1])?) } },
            HC_NOTIFY => {
                if a[1] == 0 {
                    return Err(Error::Invalid);
                }
                Call::Notify { gpa: a[0], bits: a[1] }
            }
            HC_WAIT => {
                if a[0] == 0 {
                    return Err(Error::Invalid);
                }
                let timeout = match a[1] {
                    0 => Timeout::Poll,
                    WAIT_FOREVER => Timeout::Forever,
                    us => Timeout::Micros(micros(us)?),
                };
                Call::Wait { mask: a[0], timeout }
            }
            HC_SLEEP => Call::Sleep { us: micros(a[0])? },
            HC_TIMER => match a[0] {
                0 => Call::Timer { us: 0, vector: 0 },
                us => Call::Timer { us: micros(us)?, vector: vector(a[1])? },
            },
            HC_NAME_WATCH => Call::NameWatch { name: Name::new(a[0], a[1])?, bits: a[2] },
            HC_BENCH_FRAMES => {
                let huge = match a[0] {
                    BENCH_ORDER_4K => false,
                    BENCH_ORDER_2M => true,
                    _ => return Err(Error::Invalid),
                };
                match a[1] {
                    0 => return Err(Error::Invalid),
                    1..=BENCH_MAX_COUNT => Call::BenchFrames { huge, count: a[1] },
                    _ => return Err(Error::TooLarge),
                }
            }
            _ => return Err(Error::NoSuchCall),
        })
    }

    /// The ABI name of hypercall `nr` (for logs).
    pub fn name_of(nr: u64) -> &'static str {
        match nr {
            HC_INFO => "info",
            HC_CONSOLE_WRITE => "console_write",
            HC_EXIT => "exit",
            HC_YIELD => "yield",
            HC_MORSEL_CREATE => "morsel_create",
            HC_MORSEL_OPEN => "morsel_open",
            HC_MORSEL_UNMOUNT => "morsel_unmount",
            HC_MORSEL_DESTROY => "morsel_destroy",
            HC_MORSEL_SIZE => "morsel_size",
            HC_MORSEL_STATS => "morsel_stats",
            HC_DEVICE_MOUNT => "device_mount",
            HC_DEVICE_UNMOUNT => "device_unmount",
            HC_EDU_DMA => "edu_dma",
            HC_NVME_READ => "nvme_read",
            HC_NVME_WRITE => "nvme_write",
            HC_EXMAP_CREATE => "exmap_create",
            HC_EXMAP_ACTION => "exmap_action",
            HC_EXMAP_INFO => "exmap_info",
            HC_GUEST_EXCEPTIONS => "guest_exceptions",
            HC_NOTIFY_SUBSCRIBE => "notify_subscribe",
            HC_NOTIFY => "notify",
            HC_WAIT => "wait",
            HC_SLEEP => "sleep",
            HC_TIMER => "timer",
            HC_NAME_WATCH => "name_watch",
            HC_BENCH_FRAMES => "bench_frames",
            _ => "unknown call",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(nr: u64, a: [u64; 6]) -> Result<Call, Error> {
        Call::decode(nr, a)
    }

    #[test]
    fn unknown_numbers_are_no_such_call() {
        for nr in [0x04, 0x0f, 0x16, 0x25, 0x33, u64::MAX] {
            assert_eq!(d(nr, [0; 6]), Err(Error::NoSuchCall), "{nr:#x}");
        }
    }

    #[test]
    fn console_lengths_and_wrapping_pointers() {
        assert_eq!(d(HC_CONSOLE_WRITE, [0x1000, 5, 0, 0, 0, 0]), Ok(Call::ConsoleWrite { text: GuestSlice { ptr: 0x1000, len: 5 } }));
        assert_eq!(d(HC_CONSOLE_WRITE, [0x1000, CONSOLE_MAX + 1, 0, 0, 0, 0]), Err(Error::TooLarge));
        assert_eq!(d(HC_CONSOLE_WRITE, [u64::MAX - 2, 16, 0, 0, 0, 0]), Err(Error::BadAddress));
    }

    #[test]
    fn names_flags_and_booleans() {
        let ok = d(HC_MORSEL_CREATE, [0x1000, 4, 4096, MORSEL_HUGE_PAGES | MORSEL_PERSISTENT, 0, 0]);
        assert_eq!(ok, Ok(Call::MorselCreate {
            name: Name(GuestSlice { ptr: 0x1000, len: 4 }),
            size: 4096,
            flags: CreateFlags { huge_pages: true, share_writable: false, persistent: true },
        }));
        for len in [0, MORSEL_NAME_MAX as u64 + 1, u64::MAX] {
            assert_eq!(d(HC_MORSEL_CREATE, [0x1000, len, 4096, 0, 0, 0]), Err(Error::Invalid), "len {len}");
        }
        assert_eq!(d(HC_MORSEL_CREATE, [u64::MAX - 1, 4, 4096, 0, 0, 0]), Err(Error::BadAddress));
        assert_eq!(d(HC_MORSEL_CREATE, [0x1000, 4, 4096, 8, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_MORSEL_OPEN, [0x1000, 4, 2, 0, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_DEVICE_MOUNT, [0x1000, 4, 0x18, 0, 2, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_DEVICE_MOUNT, [0x1000, 4, 1 << 16, 0, 1, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_DEVICE_UNMOUNT, [0x18, 0x20_0000, 0, 0, 0, 0]), Ok(Call::DeviceUnmount { bdf: 0x18, iova: 0x20_0000 }));
    }

    #[test]
    fn directions_opcodes_and_batch_sizes() {
        assert_eq!(d(HC_EDU_DMA, [2, 0, 64, 0, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_EDU_DMA, [EDU_TO_MEMORY, 0, 64, 0, 0, 0]), Ok(Call::EduDma { to_device: false, iova: 0, len: 64 }));
        assert_eq!(d(HC_NVME_WRITE, [1, 2, 3, 4, 0, 0]), Ok(Call::Nvme { write: true, gpa: 1, offset: 2, lba: 3, count: 4 }));
        assert_eq!(d(HC_EXMAP_ACTION, [0, 0, 1, 4, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_EXMAP_ACTION, [0, 0, 0, EXMAP_ALLOC, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_EXMAP_ACTION, [0, 0, EXMAP_MAX_ENTRIES + 1, EXMAP_FREE, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_EXMAP_ACTION, [7, 8, 512, EXMAP_READ, 0, 0]), Ok(Call::ExmapAction { region: 7, iov: 8, count: 512, op: ExmapOp::Read }));
        assert_eq!(d(HC_EXMAP_CREATE, [0x1000, 4, 4096, MORSEL_HUGE_PAGES, 0, 0]), Err(Error::Invalid));
    }

    #[test]
    fn exception_masks_vectors_and_timeouts() {
        assert_eq!(d(HC_GUEST_EXCEPTIONS, [1 << 14, 0, 0, 0, 0, 0]), Ok(Call::GuestExceptions { mask: 1 << 14 }));
        assert_eq!(d(HC_GUEST_EXCEPTIONS, [GUEST_EXCEPTIONS, 0, 0, 0, 0, 0]), Ok(Call::GuestExceptions { mask: GUEST_EXCEPTIONS as u32 }));
        for bad in [1 << 1, 1 << 2, 1 << 8, 1 << 17, 1 << 18, 1 << 31, 1 << 32, u64::MAX] {
            assert_eq!(d(HC_GUEST_EXCEPTIONS, [bad, 0, 0, 0, 0, 0]), Err(Error::Invalid), "{bad:#x}");
        }
        assert_eq!(d(HC_NOTIFY_SUBSCRIBE, [7, 0, 0, 0, 0, 0]), Ok(Call::NotifySubscribe { gpa: 7, vector: None }));
        assert_eq!(d(HC_NOTIFY_SUBSCRIBE, [7, 255, 0, 0, 0, 0]), Ok(Call::NotifySubscribe { gpa: 7, vector: Some(255) }));
        for bad in [1, 14, 31, 256, u64::MAX] {
            assert_eq!(d(HC_NOTIFY_SUBSCRIBE, [7, bad, 0, 0, 0, 0]), Err(Error::Invalid), "{bad}");
            assert_eq!(d(HC_TIMER, [10, bad, 0, 0, 0, 0]), Err(Error::Invalid), "{bad}");
        }
        assert_eq!(d(HC_NOTIFY, [7, 0, 0, 0, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_NOTIFY, [7, u64::MAX, 0, 0, 0, 0]), Ok(Call::Notify { gpa: 7, bits: u64::MAX }));
        assert_eq!(d(HC_WAIT, [0, 10, 0, 0, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_WAIT, [1, 0, 0, 0, 0, 0]), Ok(Call::Wait { mask: 1, timeout: Timeout::Poll }));
        assert_eq!(d(HC_WAIT, [1, WAIT_MAX_US, 0, 0, 0, 0]), Ok(Call::Wait { mask: 1, timeout: Timeout::Micros(WAIT_MAX_US) }));
        assert_eq!(d(HC_WAIT, [1, WAIT_MAX_US + 1, 0, 0, 0, 0]), Err(Error::TooLarge));
        assert_eq!(d(HC_WAIT, [1, WAIT_FOREVER, 0, 0, 0, 0]), Ok(Call::Wait { mask: 1, timeout: Timeout::Forever }));
        assert_eq!(d(HC_SLEEP, [0, 0, 0, 0, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_SLEEP, [u64::MAX, 0, 0, 0, 0, 0]), Err(Error::TooLarge));
        assert_eq!(d(HC_SLEEP, [500, 0, 0, 0, 0, 0]), Ok(Call::Sleep { us: 500 }));
        assert_eq!(d(HC_TIMER, [0, 3, 0, 0, 0, 0]), Ok(Call::Timer { us: 0, vector: 0 }));
        assert_eq!(d(HC_TIMER, [WAIT_MAX_US + 1, 40, 0, 0, 0, 0]), Err(Error::TooLarge));
        assert_eq!(d(HC_TIMER, [100, 40, 0, 0, 0, 0]), Ok(Call::Timer { us: 100, vector: 40 }));
    }

    #[test]
    fn bench_orders_and_counts() {
        assert_eq!(d(HC_BENCH_FRAMES, [BENCH_ORDER_4K, 1, 0, 0, 0, 0]), Ok(Call::BenchFrames { huge: false, count: 1 }));
        assert_eq!(d(HC_BENCH_FRAMES, [BENCH_ORDER_2M, BENCH_MAX_COUNT, 0, 0, 0, 0]), Ok(Call::BenchFrames { huge: true, count: BENCH_MAX_COUNT }));
        for bad in [1, 8, 10, 18, u64::MAX] {
            assert_eq!(d(HC_BENCH_FRAMES, [bad, 1, 0, 0, 0, 0]), Err(Error::Invalid), "order {bad}");
        }
        assert_eq!(d(HC_BENCH_FRAMES, [BENCH_ORDER_4K, 0, 0, 0, 0, 0]), Err(Error::Invalid));
        for big in [BENCH_MAX_COUNT + 1, u64::MAX] {
            assert_eq!(d(HC_BENCH_FRAMES, [BENCH_ORDER_2M, big, 0, 0, 0, 0]), Err(Error::TooLarge), "count {big}");
        }
    }

    #[test]
    fn name_watches_check_the_name_length() {
        assert_eq!(d(HC_NAME_WATCH, [0x1000, 4, 1, 0, 0, 0]), Ok(Call::NameWatch { name: Name(GuestSlice { ptr: 0x1000, len: 4 }), bits: 1 }));
        assert_eq!(d(HC_NAME_WATCH, [0x1000, 4, 0, 0, 0, 0]), Ok(Call::NameWatch { name: Name(GuestSlice { ptr: 0x1000, len: 4 }), bits: 0 }));
        assert_eq!(d(HC_NAME_WATCH, [0x1000, 0, 1, 0, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_NAME_WATCH, [0x1000, MORSEL_NAME_MAX as u64 + 1, 1, 0, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(HC_NAME_WATCH, [u64::MAX - 2, 4, 1, 0, 0, 0]), Err(Error::BadAddress));
    }

    #[test]
    fn every_number_has_a_name() {
        for nr in [HC_INFO, HC_CONSOLE_WRITE, HC_EXIT, HC_YIELD, HC_MORSEL_CREATE, HC_MORSEL_OPEN, HC_MORSEL_UNMOUNT,
            HC_MORSEL_DESTROY, HC_MORSEL_SIZE, HC_MORSEL_STATS, HC_DEVICE_MOUNT, HC_DEVICE_UNMOUNT, HC_EDU_DMA,
            HC_NVME_READ, HC_NVME_WRITE, HC_EXMAP_CREATE, HC_EXMAP_ACTION, HC_EXMAP_INFO, HC_GUEST_EXCEPTIONS,
            HC_NOTIFY_SUBSCRIBE, HC_NOTIFY, HC_WAIT, HC_SLEEP, HC_TIMER, HC_NAME_WATCH, HC_BENCH_FRAMES]
        {
            assert_ne!(Call::name_of(nr), "unknown call", "{nr:#x}");
            assert_ne!(Call::decode(nr, [0x1000, 1, 4096, 0, 0, 0]), Err(Error::NoSuchCall), "{nr:#x}");
        }
    }
}
