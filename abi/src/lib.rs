//! Hypercall ABI v1, shared by guests (through `guest-lib`) and the hypervisor: its own crate,
//! so that the hypervisor does not link the guest library.
//!
//! Number in rax; arguments in rdi, rsi, rdx, r10, r8, r9; status in rax (0 = ok,
//! negative = `Error`), value in rdx. The instruction is VMCALL on Intel, VMMCALL on AMD.
#![no_std]

mod call;
pub use call::{Call, CreateFlags, ExmapOp, GuestSlice, Name, Timeout};

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
/// Morsel names: 1 to 32 bytes of printable ASCII without spaces (else `Invalid`).
pub const MORSEL_NAME_MAX: usize = 32;
/// `morsel_create(name_ptr, name_len, size, flags)`: creates and mounts read-write a named
/// morsel; returns its guest-physical address. Flags: `MORSEL_HUGE_PAGES`,
/// `MORSEL_SHARE_WRITABLE`.
pub const HC_MORSEL_CREATE: u64 = 0x10;
/// `morsel_create` flag: back the morsel with 2 MiB pages (else 4 KiB).
pub const MORSEL_HUGE_PAGES: u64 = 1 << 0;
/// `morsel_create` flag: other guests may open it read-write (else read-only).
pub const MORSEL_SHARE_WRITABLE: u64 = 1 << 1;
/// `morsel_create` flag: put it in persistent memory, where it outlives the run (and a crash)
/// until it is destroyed; `Invalid` where the machine has none. After a reboot it has no
/// owner: any guest may open it (read-write if it was created with `MORSEL_SHARE_WRITABLE`)
/// and destroy it if it may write it.
pub const MORSEL_PERSISTENT: u64 = 1 << 2;
/// Per-guest quotas: a call that would pass one gets `NoMemory`. Morsels a guest owns at
/// once (created and not destroyed).
pub const MORSEL_QUOTA: u64 = 64;
/// Morsels mounted in one guest at once (its own and others', `morsel_create` included).
pub const MOUNT_QUOTA: u64 = 128;
/// Device mounts (`device_mount`) of one guest at once.
pub const DEVICE_MOUNT_QUOTA: u64 = 16;
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

/// `device_mount(name_ptr, name_len, bdf, iova, writable)`: mounts the named morsel into the
/// DMA domain (VT-d) of the PCI function `bdf` (`device_bdf`) at I/O virtual address `iova`
/// (aligned to the morsel's window: 2 MiB, 1 GiB or 512 GiB), read-write if `writable` is 1
/// and the owner allows it as for `morsel_open`. One entry write in the domain's table and one
/// IOTLB invalidation; the mount is dropped when the calling guest ends. Returns `iova`.
/// Only edu is offered: another existing function (host bridge, LPC, the NVMe controller,
/// which the hypervisor drives for the proxy) is `Denied`, a `bdf` nobody answers `NotFound`.
/// edu is lent to one guest at a time: `Busy` while another guest has a mount there; before
/// it goes to a new guest the hypervisor zeroes its buffer. `NoMemory` past
/// `DEVICE_MOUNT_QUOTA`.
pub const HC_DEVICE_MOUNT: u64 = 0x20;
/// `device_unmount(bdf, iova)`: undoes the caller's `device_mount` at `iova`.
pub const HC_DEVICE_UNMOUNT: u64 = 0x21;
/// `edu_dma(direction, iova, len)`: QEMU's edu device copies `len` (1..=4095, see
/// `EDU_MAX_TRANSFER`) bytes between
/// its 4 KiB buffer and I/O virtual address `iova` (below 256 MiB, edu's DMA mask), in the
/// `direction` `EDU_TO_DEVICE` or `EDU_TO_MEMORY`, and waits for it. `iova..iova + len` must
/// lie inside the window of one of the caller's own edu mounts (`Denied` otherwise: the device
/// is shared). Returns the microseconds it took; `DeviceFault` if the IOMMU blocked the access
/// (past the end of the morsel, or a write through a read-only mount; the fault is logged).
pub const HC_EDU_DMA: u64 = 0x22;
/// Longest `edu_dma`: QEMU 7.2's edu aborts on a transfer that ends exactly at the end of
/// its 4 KiB buffer.
pub const EDU_MAX_TRANSFER: u64 = 4095;
/// `edu_dma` direction: memory at `iova` into the device's buffer.
pub const EDU_TO_DEVICE: u64 = 0;
/// `edu_dma` direction: the device's buffer out to memory at `iova`.
pub const EDU_TO_MEMORY: u64 = 1;
/// `nvme_read(gpa, offset, lba, count)`: the NVMe proxy (ExMap's pread, done by the device):
/// reads `count` blocks of `NVME_BLOCK` bytes from `lba` on into the caller's morsel mounted
/// at `gpa` (read-write), at byte `offset` (block aligned). The proxy mounts the morsel into
/// the NVMe domain for the call (one entry write), the device DMAs straight into the morsel's
/// frames. Returns the number of blocks.
pub const HC_NVME_READ: u64 = 0x23;
/// `nvme_write(gpa, offset, lba, count)`: the same in the other direction (the morsel may be
/// mounted read-only).
pub const HC_NVME_WRITE: u64 = 0x24;
/// Block size of the NVMe proxy's LBAs.
pub const NVME_BLOCK: u64 = 512;

/// `exmap_create(name_ptr, name_len, size, flags)`: an ExMap region of `size` bytes (a
/// multiple of 4 KiB, at most `EXMAP_MAX_SIZE`): a morsel with its tables and no data frame,
/// mounted read-write like `morsel_create`'s; every page starts unpopulated (touching one
/// stops the guest). Flag `MORSEL_SHARE_WRITABLE` as for morsels; others `morsel_open` it
/// (read-only sharers see pages as they are populated) and devices mount it as any morsel.
/// Returns its guest-physical address.
pub const HC_EXMAP_CREATE: u64 = 0x30;
/// `exmap_action(region_gpa, iov_gpa, count, opcode)`: one batch over the region mounted
/// read-write at `region_gpa`. `iov_gpa` is a 4 KiB-aligned page of guest RAM holding
/// `count` (1..=`EXMAP_MAX_ENTRIES`) entries `exmap_entry(page, pages)`; each is done or
/// fails on its own, and its u64 is overwritten with its result: pages changed (>= 0) or
/// the negative `Error` (a count of 0: `Invalid`; a first page past the region: `BadAddress`;
/// a range that runs past it: `TooLarge`; overlapping an earlier entry: `Busy`; no frame
/// left: `NoMemory`, with nothing of that entry kept; WRITE of an unpopulated page:
/// `NotFound`; READ of a page already populated: `Busy`; READ or WRITE of a range past the
/// disk's end: `TooLarge`; the device failed: `DeviceFault`, and a READ entry's pages are
/// unmapped again). Returns the number of failed entries. `Denied` for a read-only mount,
/// `Invalid` for a mount that is not an ExMap region, `NotFound` for READ / WRITE without
/// an NVMe disk.
pub const HC_EXMAP_ACTION: u64 = 0x31;
/// `exmap_info(region_gpa, what)`: a counter of the region mounted at `region_gpa`
/// (`EXMAP_INFO_*`), for any guest that has it mounted.
pub const HC_EXMAP_INFO: u64 = 0x32;
/// `exmap_action` opcodes: populate pages (present ones are skipped), evict pages (absent
/// ones are skipped; one invalidation for the whole call), populate and read from the NVMe
/// disk at the same byte offset, write populated pages to the disk at their offset.
pub const EXMAP_ALLOC: u64 = 0;
pub const EXMAP_FREE: u64 = 1;
pub const EXMAP_READ: u64 = 2;
pub const EXMAP_WRITE: u64 = 3;
/// Entries in one iovec page.
pub const EXMAP_MAX_ENTRIES: u64 = 512;
/// Largest page count of one entry (12 bits).
pub const EXMAP_MAX_COUNT: u64 = 4095;
/// Largest region.
pub const EXMAP_MAX_SIZE: u64 = 16 << 30;
/// An iovec entry: `pages` (1..=4095) pages from page index `page` (below 2^52).
pub const fn exmap_entry(page: u64, pages: u64) -> u64 {
    page << 12 | (pages & EXMAP_MAX_COUNT)
}
/// `exmap_info` selectors: pages populated now, `exmap_action` calls, invalidations (TLB
/// flushes of the caller plus IOTLB flushes of device domains), pages populated and evicted
/// so far, frames zeroed on the way in, failed entries.
pub const EXMAP_INFO_POPULATED: u64 = 0;
pub const EXMAP_INFO_CALLS: u64 = 1;
pub const EXMAP_INFO_INVALIDATIONS: u64 = 2;
pub const EXMAP_INFO_ALLOCATED: u64 = 3;
pub const EXMAP_INFO_FREED: u64 = 4;
pub const EXMAP_INFO_ZEROED: u64 = 5;
pub const EXMAP_INFO_FAILED: u64 = 6;
/// Pages the disk read into (READ) and wrote from (WRITE); NVMe commands of READ / WRITE;
/// the most commands the device held at once.
pub const EXMAP_INFO_READ: u64 = 7;
pub const EXMAP_INFO_WRITTEN: u64 = 8;
pub const EXMAP_INFO_COMMANDS: u64 = 9;
pub const EXMAP_INFO_MAX_DEPTH: u64 = 10;

/// `guest_exceptions(mask)`: the exception vectors (bit N = vector N) this guest handles
/// itself through its own IDT; every other exception still stops the guest. Only the bits in
/// `GUEST_EXCEPTIONS` may be set (else `Invalid`). Returns the previous mask.
pub const HC_GUEST_EXCEPTIONS: u64 = 0x40;
/// Exceptions a guest may take itself: #DE, #BP, #OF, #BR, #UD, #NP, #SS, #GP, #PF, #MF, #XM.
/// #DB and #AC stay intercepted (a guest could loop the CPU on them in microcode), as do NMI,
/// #DF, #TS and #MC (their delivery is the hypervisor's business).
pub const GUEST_EXCEPTIONS: u64 = 1 << 0 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 16 | 1 << 19;
/// `notify_subscribe(mount_gpa, vector)`: this guest wants the doorbell bits others ring on
/// the morsel it has mounted at `mount_gpa` (`NotFound` if it has none there); `vector` 0:
/// bits only (for `wait`), 32..=255: also a virtual interrupt with that vector (else
/// `Invalid`). Again for the same morsel replaces the vector. Ends with the mount.
pub const HC_NOTIFY_SUBSCRIBE: u64 = 0x41;
/// `notify(mount_gpa, bits)`: rings `bits` (non-zero, else `Invalid`) on the morsel the caller
/// has mounted at `mount_gpa` (`NotFound` if none): every vCPU of every guest that mounted
/// it and subscribed, but the calling vCPU, gets the bits ORed into its pending set, and the
/// interrupt if its guest asked for one. Returns how many guests it reached (the caller's own
/// counts if another of its vCPUs was reached); `NoReceiver` if none.
pub const HC_NOTIFY: u64 = 0x42;
/// `wait(mask, timeout_us)`: blocks until a pending doorbell bit in `mask` (non-zero) is
/// set, a virtual interrupt is pending for this vCPU, or `timeout_us` passed (0: do not
/// block, `WAIT_FOREVER`: no timeout, else at most `WAIT_MAX_US`, else `TooLarge`). Returns
/// the pending bits in `mask` (the calling vCPU's; cleared by the call; 0 on a timeout or an
/// interrupt). The scheduler does not run the waiting vCPU; the guest's others run on.
pub const HC_WAIT: u64 = 0x43;
/// `sleep(us)`: blocks for at least `us` (1..=`WAIT_MAX_US`) microseconds; doorbell bits
/// stay pending, a virtual interrupt ends it early. Returns 0.
pub const HC_SLEEP: u64 = 0x44;
/// `timer(us, vector)`: a one-shot timer: after at least `us` microseconds (1..=`WAIT_MAX_US`)
/// the calling vCPU gets a virtual interrupt with `vector` (32..=255); `us` = 0 cancels (vector
/// ignored). One per vCPU: a new one replaces the old. Returns 0.
pub const HC_TIMER: u64 = 0x45;
/// `name_watch(name_ptr, name_len, bits)`: a rendezvous: `bits` (non-zero) are ORed into the
/// calling vCPU's pending set (as a doorbell would, so `wait` for them) as soon as a morsel or
/// ExMap region named so is in the directory: at once if it is there now (returns 1), else
/// when a create enters it (returns 0; the watch then ends). One watch per vCPU: a new one
/// replaces the old; `bits` 0 cancels (returns 0). A name reserved by a create that is not
/// finished counts as not there. Says nothing about whether the caller may open it.
pub const HC_NAME_WATCH: u64 = 0x46;
/// `bench_frames(order, count)`: a benchmark, answered only when the hypervisor's command
/// line says `bench=on` (else `Denied`): the hypervisor allocates and frees one frame of
/// `order` (0: 4 KiB, 9: 2 MiB; else `Invalid`) `count` times (1..=`BENCH_MAX_COUNT`; 0:
/// `Invalid`, more: `TooLarge`) through the calling CPU's allocator core, without holding any
/// lock of its own, and returns the TSC ticks the loop took (`INFO_TSC_PER_US`). Nothing stays
/// allocated (`NoMemory` if a frame could not be had, after freeing what it held); the time is
/// charged to the caller's slice.
pub const HC_BENCH_FRAMES: u64 = 0x50;
/// Most alloc+free pairs of one `bench_frames` call.
pub const BENCH_MAX_COUNT: u64 = 256;
/// `bench_frames` orders: a 4 KiB frame, a 2 MiB frame.
pub const BENCH_ORDER_4K: u64 = 0;
pub const BENCH_ORDER_2M: u64 = 9;
/// `wait`'s timeout that never ends (only a doorbell or an interrupt wakes).
pub const WAIT_FOREVER: u64 = u64::MAX;
/// Longest finite timeout of `wait`, `sleep` and `timer`: 60 s.
pub const WAIT_MAX_US: u64 = 60_000_000;
/// Lowest vector a virtual interrupt may use (0-31 are exceptions).
pub const FIRST_INTERRUPT_VECTOR: u64 = 32;

/// The `bdf` argument of device calls: PCI bus, device, function as a 16-bit source id.
pub const fn device_bdf(bus: u8, dev: u8, func: u8) -> u64 {
    (bus as u64) << 8 | (dev as u64) << 3 | func as u64
}

/// `info` selector: the ABI version (`ABI_VERSION`).
pub const INFO_ABI_VERSION: u64 = 0;
/// `info` selector: this guest's id (its place on the command line, from 0).
pub const INFO_GUEST_ID: u64 = 1;
/// `info` selector: this guest's RAM in bytes.
pub const INFO_MEMORY_SIZE: u64 = 2;
/// `info` selector: how many guests the command line starts.
pub const INFO_GUEST_COUNT: u64 = 3;
/// The command line's `log=` level: 0 off, 1 error, 2 warn, 3 info, 4 debug, 5 trace.
pub const INFO_LOG_LEVEL: u64 = 4;
/// `info` selector: the calling vCPU's index in its guest (0 .. vCPU count).
pub const INFO_VCPU_INDEX: u64 = 5;
/// `info` selector: the guest's vCPU count.
pub const INFO_VCPU_COUNT: u64 = 6;
/// `info` selector: the index of the CPU the calling vCPU runs on.
pub const INFO_CPU_INDEX: u64 = 7;
/// `info` selector: VM exits of this guest so far (all kinds).
pub const INFO_EXITS: u64 = 8;
/// `info` selector: time slices this guest used up so far (preemptions).
pub const INFO_SLICES: u64 = 9;
/// `info` selector: virtual interrupts injected into this guest so far.
pub const INFO_INTERRUPTS: u64 = 10;
/// `info` selector: TSC ticks per microsecond as the hypervisor measured them (guests may
/// read the TSC; `sleep` and `wait` deadlines are kept on it).
pub const INFO_TSC_PER_US: u64 = 11;
/// `info` selector: the length of a time slice in microseconds (what `INFO_SLICES` counts).
pub const INFO_SLICE_US: u64 = 12;

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
    /// Out of memory: frames, the hypervisor's heap, or a per-guest quota (`MORSEL_QUOTA`,
    /// `MOUNT_QUOTA`, `DEVICE_MOUNT_QUOTA`).
    NoMemory = -4,
    /// No such morsel, mount or device.
    NotFound = -5,
    /// The owner did not grant this access, or the device is not offered to guests.
    Denied = -6,
    /// The object is in use (mounted), the name is taken, the morsel window has no free slot
    /// of the needed size, or the device is lent to another guest.
    Busy = -7,
    /// A length is larger than the call accepts.
    TooLarge = -8,
    /// A device failed the request or the IOMMU blocked its DMA.
    DeviceFault = -9,
    /// A doorbell nobody listens to: no other guest subscribed to that morsel.
    NoReceiver = -10,
}

impl Error {
    /// The error a negative status stands for (None for 0, positive or unknown statuses).
    pub fn from_status(status: i64) -> Option<Error> {
        use Error::*;
        [NoSuchCall, BadAddress, Invalid, NoMemory, NotFound, Denied, Busy, TooLarge, DeviceFault, NoReceiver]
            .into_iter()
            .find(|e| *e as i64 == status)
    }

    /// A short description (`"bad address"`), for messages.
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
            Error::DeviceFault => "device fault",
            Error::NoReceiver => "no receiver",
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
    /// The ABI the hypervisor speaks (`ABI_VERSION`).
    pub abi_version: u64,
    /// This guest's id (its place on the command line, from 0).
    pub guest_id: u64,
    /// Guest RAM is [0, memory_size).
    pub memory_size: u64,
    /// Morsels are mounted in [morsel_window, morsel_window + morsel_window_size).
    pub morsel_window: u64,
    /// Bytes in the morsel window.
    pub morsel_window_size: u64,
    /// A number from the command line (`:arg=N`), 0 if none.
    pub arg: u64,
    /// The guest's name, NUL-padded.
    pub name: [u8; 32],
    /// The command line's `log=` level, as `INFO_LOG_LEVEL` returns it (0 off .. 5 trace).
    pub log_level: u64,
    /// The guest's vCPUs (`:vcpus=N`, default 1). vCPU 0 starts at the entry with rsi = 0,
    /// every other vCPU v at the same entry with rsi = v and its own stack.
    pub vcpu_count: u64,
}

/// Guest-physical address of the boot information.
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Guest-physical address of the guest's PML4 (the page tables follow it: eleven pages, to
/// 0xd000).
pub const PAGE_TABLES_GPA: u64 = 0x2000;
/// Stack space per vCPU at the top of guest RAM (vCPU v's stack starts `v *
/// VCPU_STACK_RESERVE` below `memory_size`); image segments never lie there. The lowest
/// 4 KiB page of each reserve is left out of the guest's page tables (a guard page: a stack
/// that outgrows its reserve faults there, reported as a stack overflow).
pub const VCPU_STACK_RESERVE: u64 = 64 * 1024;
/// Where guest images are linked (see guest.ld).
pub const IMAGE_BASE_GPA: u64 = 0x20_0000;
/// Start of the morsel window: 512 GiB, the second PML4 slot.
pub const MORSEL_WINDOW_GPA: u64 = 512 << 30;
/// Size of the morsel window: PML4 slots 1-7 (3.5 TiB).
pub const MORSEL_WINDOW_SIZE: u64 = 7 * (512 << 30);
