//! Each CPU's run-time state in one type, `PerCpu`, one static table of them (`CPUS`, by CPU
//! index), reached one way: `this()` for the CPU the code runs on, `of(index)` for another.
//!
//! How a CPU finds its own entry: its index, looked up by its APIC ID (`index`: one xAPIC ID
//! register read and one load from `INDEX_OF`). Hermit's `CoreLocal` keeps a pointer in the GS
//! base instead (one `mov reg, gs:[..]`); here GS base would have to survive every world
//! switch (SVM: the host VMSAVE page; VMX: the VMCS host GS base field, written per VMCS), and
//! every place that took one of the arrays this table replaced read the APIC ID already; the
//! table costs one load more per `this()` (the map) and touches no world switch. Code that
//! knows its index (the vCPU loop's `me`) takes `of(me)` and reads no APIC ID at all: the
//! guest entry's two tick reads do, which saves two APIC reads per exit. `INDEX_OF` is a map (APIC ID to
//! index), not per-CPU state: it has an entry for each of 256 APIC IDs whether a CPU has it or
//! not, and it is how an entry is found, so it lives here beside the table, not in it.
//!
//! The entry is laid out by who writes it (`#[repr(C, align(64))]` groups, checked below), so
//! that a field other CPUs write (a mailbox) never shares a cache line with one this CPU writes
//! on every timer tick or exit:
//!
//! - `mine`: written by this CPU only, often (every timer tick, every device interrupt); read
//!   by this CPU (and `device_interrupts` by any reader that asks). Also this CPU's allocator
//!   handle, written once (below).
//! - `inbox`: written by other CPUs (a kick's attention flag, a drain request), read and
//!   cleared by this CPU before its next guest entry.
//! - `outbox`: written by this CPU, rarely (its APIC ID once, at its start; a drain's
//!   acknowledgment), polled by other CPUs (every IPI sender; a CPU waiting for a drain).
//! - `owed`: this CPU's shootdown `Owed` record, behind a spin lock only this CPU takes
//!   (`vm/shootdown.rs`).
//!
//! The allocator handle (`mm::frames::Frames`: the allocator and this CPU's core index, which
//! is its CPU index) lives here too, set once by the CPU itself as it comes up (`come_up`:
//! register, check, handle; the boot CPU in `main` right after the allocator is made, each AP
//! first thing in `smp::ap_entry`), and is reached one way: `frames()` (`Frames::here()`)
//! finds this CPU's entry by its APIC ID, `of(me).frames()` where the index is known (the
//! vCPU loop: the ExMap fast path and a call's lock-free part read no APIC ID). Before a CPU
//! came up both panic instead of falling back to CPU 0's core, as `index` does: two CPUs on
//! one core index would break the allocator's one-user-per-index contract silently. It used
//! to be an argument (`&Frames`), threaded through ~100 signatures from each CPU's
//! start down to every allocation; a function that allocates now takes it itself, once per
//! call (one APIC ID read where it does not know its index; never one per frame).
//!
//! Not here: the shootdown mailboxes (`arch::ipi::MAILBOXES`, a `vmcore::shootdown::Mailboxes`
//! whose array is the host-tested, loom-checked protocol's own); what a CPU is handed at its
//! start (`smp::Cpu`: its tables, stack, start handshake and the allocator handle it puts
//! here, which the start protocol passes by reference).

use super::apic;
use super::ipi::MAX_CPUS;
use crate::mm::frames::Frames;
use core::mem::{align_of, offset_of, size_of};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use static_assertions::const_assert;

/// One CPU's state. Fields are atomics (or behind a lock) because other CPUs reach some of
/// them; each says who writes and who reads it, and with which ordering.
#[repr(C, align(64))]
pub struct PerCpu {
    pub mine: Mine,
    pub inbox: Inbox,
    pub outbox: Outbox,
    /// What this CPU owes before it may give frames back (`vm::shootdown`). Taken only by
    /// this CPU, never from an interrupt handler; lock order in docs/src/smp.md.
    pub owed: spin::Mutex<crate::vm::shootdown::Owed>,
}

/// Written by this CPU only, often.
#[repr(C, align(64))]
pub struct Mine {
    /// Timer interrupts this CPU took (`apic::timer_interrupt`, Relaxed): the scheduler
    /// compares it across a guest entry to tell a slice-timer exit from an IPI's
    /// (`apic::ticks(me)`, this CPU, Relaxed: the interrupt ran on this CPU).
    pub ticks: AtomicU64,
    /// Device completion interrupts this CPU took (`idt`'s `DEVICE_VECTOR` handler, AcqRel);
    /// read through `idt::device_interrupts` (Acquire) by the NVMe driver on this CPU.
    pub device_interrupts: AtomicU64,
    /// Whether this CPU's LAPIC timer runs periodically (set once by
    /// `apic::start_periodic_timer`, read by `apic::halt_once`; this CPU only, Relaxed).
    pub periodic: AtomicBool,
    /// This CPU's allocator handle (the allocator and this CPU's core index): set once by
    /// this CPU as it comes up (`come_up`, Release inside `Once`), read by this CPU only
    /// (`frames()`, `PerCpu::frames`, Acquire). Never written again, so it shares the line
    /// with the fields above without costing a miss.
    frames: spin::Once<Frames>,
}

/// Written by other CPUs, taken by this one.
#[repr(C, align(64))]
pub struct Inbox {
    /// An IPI that needs more than a flush is pending: set by the sender (`ipi::send`,
    /// Release), taken by this CPU (`ipi::attention`, AcqRel swap) or peeked at
    /// (`ipi::attention_pending`, Acquire).
    pub attention: AtomicBool,
    /// Drain requests to this CPU: bumped by a CPU out of memory (`ipi::drain_others`,
    /// AcqRel), read by this CPU (`ipi::service_on`, Acquire).
    pub drain_request: AtomicU64,
}

/// Written by this CPU, rarely; polled by others.
#[repr(C, align(64))]
pub struct Outbox {
    /// This CPU's APIC ID (`register`, Release; `NO_APIC` until then), read by every CPU that
    /// sends it an IPI (`ipi`, Acquire).
    pub apic_id: AtomicU32,
    /// Drain requests this CPU has served: set by this CPU (`ipi::service_on`, Release), polled
    /// by the requester (`ipi::drain_others`, Acquire).
    pub drain_done: AtomicU64,
}

/// `Outbox::apic_id` of a CPU that has not registered.
pub const NO_APIC: u32 = u32::MAX;

// The layout the module doc promises: each group on lines of its own.
const_assert!(align_of::<PerCpu>() == 64 && size_of::<PerCpu>().is_multiple_of(64));
const_assert!(size_of::<Mine>() == 64 && size_of::<Inbox>() == 64 && size_of::<Outbox>() == 64);
const_assert!(offset_of!(PerCpu, inbox) == 64 && offset_of!(PerCpu, outbox) == 128);
const_assert!(offset_of!(PerCpu, owed) == 192);

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            mine: Mine { ticks: AtomicU64::new(0), device_interrupts: AtomicU64::new(0), periodic: AtomicBool::new(false), frames: spin::Once::new() },
            inbox: Inbox { attention: AtomicBool::new(false), drain_request: AtomicU64::new(0) },
            outbox: Outbox { apic_id: AtomicU32::new(NO_APIC), drain_done: AtomicU64::new(0) },
            owed: spin::Mutex::new(crate::vm::shootdown::Owed::new()),
        }
    }

    /// The index of the CPU this entry belongs to (its place in `CPUS`).
    pub fn index(&self) -> usize {
        (self as *const PerCpu as usize - CPUS.as_ptr() as usize) / size_of::<PerCpu>()
    }

    /// This CPU's APIC ID, if it registered.
    pub fn apic_id(&self) -> Option<u32> {
        Some(self.outbox.apic_id.load(Ordering::Acquire)).filter(|&id| id != NO_APIC)
    }

    /// The allocator handle of the CPU this entry belongs to. Only for the entry of the CPU
    /// the code runs on (`of(me)`, `me` being this CPU's index, as the vCPU loop's is): the
    /// handle's core index is that CPU's, and the allocator allows one user per index at a
    /// time. Panics if that CPU has not come up (`come_up`): a wrong core would break that
    /// contract silently.
    pub fn frames(&self) -> Frames {
        match self.mine.frames.get() {
            Some(f) => *f,
            None => panic!("cpu {}: allocator handle used before the CPU came up (percpu::come_up)", self.index()),
        }
    }
}

/// Every CPU's entry, by CPU index.
static CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];

const NO_CPU: u8 = u8::MAX;

/// APIC ID to CPU index (`NO_CPU`: no registered CPU has it). Written once per CPU by
/// `register` (Release), read by `index` (Acquire) on every `this()`.
static INDEX_OF: [AtomicU8; 256] = [const { AtomicU8::new(NO_CPU) }; 256];

/// Records that CPU `index` has APIC ID `apic_id` (each CPU at its start; the boot CPU's
/// start does it for the boot CPU). Indices past `MAX_CPUS` and APIC IDs past 255 (x2APIC) are
/// not recorded: `smp::start` starts no such CPU.
fn register(index: usize, apic_id: u32) {
    if index < MAX_CPUS && apic_id < 256 {
        CPUS[index].outbox.apic_id.store(apic_id, Ordering::Release);
        INDEX_OF[apic_id as usize].store(index as u8, Ordering::Release);
    }
}

/// Registers CPU `index` (this CPU) with `apic_id`, checks that it finds its own entry, and
/// gives it its allocator handle, whose core index must be `index` (the allocator core index
/// of a CPU is its CPU index). Each CPU calls it once, itself, before it allocates: the boot
/// CPU right after the allocator is made (`main`), each AP first thing in `smp::ap_entry`.
pub fn come_up(index: usize, apic_id: u32, frames: Frames) {
    assert!(frames.core() == index, "cpu {index} given the allocator handle of core {}", frames.core());
    register(index, apic_id);
    check(index);
    let me = of(index);
    assert!(me.mine.frames.get().is_none(), "cpu {index} came up twice");
    me.mine.frames.call_once(|| frames);
}

/// This CPU's allocator handle (`Frames::here`): one xAPIC ID register read, one load from
/// `INDEX_OF` and one from the entry. Code that knows its index takes `of(me).frames()`
/// instead (no APIC ID read). Panics on a CPU that has not come up (`come_up`): unlike
/// `index`, it does not fall back to CPU 0, whose core index another CPU must not use.
pub fn frames() -> Frames {
    let apic_id = apic::id() & 0xff;
    match INDEX_OF[apic_id as usize].load(Ordering::Acquire) {
        NO_CPU => panic!("the CPU with apic id {apic_id} asks for its allocator handle before it came up (percpu::come_up)"),
        i => CPUS[i as usize].frames(),
    }
}

/// The index of the CPU this runs on (0 before `register`, as on the boot CPU).
pub fn index() -> usize {
    match INDEX_OF[(apic::id() & 0xff) as usize].load(Ordering::Acquire) {
        NO_CPU => 0,
        i => i as usize,
    }
}

/// This CPU's entry.
pub fn this() -> &'static PerCpu {
    of(index())
}

/// CPU `index`'s entry. Every index the hypervisor hands out is below `MAX_CPUS` (`register`,
/// `smp::start`); a larger one wraps, as the arrays this table replaced did.
pub fn of(index: usize) -> &'static PerCpu {
    &CPUS[index % MAX_CPUS]
}

/// Checks, on CPU `index` right after its `register`, that `this()` finds its own entry:
/// the table is indexed by the CPU's own index, and its APIC ID leads back to it. A CPU that
/// found another's would count its ticks and take its kicks and shootdowns there, so the
/// hypervisor stops instead (scenarios `smp_*` run it on every CPU).
fn check(index: usize) {
    let me = this();
    assert!(
        me.index() == index && me.apic_id() == Some(apic::id() & 0xff),
        "cpu {index} (apic id {}) finds the per-CPU entry of cpu {} (apic id {:?})",
        apic::id(),
        me.index(),
        me.apic_id()
    );
}
