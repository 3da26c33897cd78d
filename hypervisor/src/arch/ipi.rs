//! Inter-processor interrupts between the online CPUs: which CPU index has which APIC ID,
//! the one IPI vector (`IPI_VECTOR`), and the flush mailbox that TLB shootdowns use.
//!
//! The shootdown protocol itself (mailboxes, generations, acknowledgments, the barrier) is
//! `vmcore::shootdown`, host-tested and model-checked; this file supplies what touches
//! hardware (`Apic`: this CPU's index, the IPI) and holds every CPU's mailbox (`MAILBOXES`).
//! The drain mailbox beside it ("give your allocator reservations back") follows the same
//! protocol.
//!
//! `service` runs from the IPI handler, from every place a CPU waits with interrupts off
//! (the world lock's spin, the idle loop, a wait for acknowledgments), right before every
//! guest entry, and every 2 MiB of long work done with interrupts off (zeroing a new morsel,
//! freeing a destroyed one, `bench_frames`, NVMe waits): no CPU keeps another waiting for
//! longer than one such piece, and two CPUs waiting for each other both go on.
//!
//! A shootdown is split in two (`request`, then `wait`) so that its initiator can let go of
//! every lock before it waits (`vm::shootdown`); `outstanding` is a barrier behind every
//! shootdown any CPU started.

use super::apic;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use vmcore::shootdown::{Cpus, Mailboxes};

/// The vector of every IPI the hypervisor sends (kicks, shootdowns and doorbell wake-ups
/// alike; a guest it interrupts inside its slice resumes, see `vm/sched.rs`).
pub const IPI_VECTOR: u8 = 0x21;

/// CPUs the hypervisor handles (the shootdown masks are u64).
pub const MAX_CPUS: usize = 64;

const NO_CPU: u8 = u8::MAX;

/// Every CPU's shootdown mailbox (`vmcore::shootdown`'s protocol).
static MAILBOXES: Mailboxes<MAX_CPUS> = Mailboxes::new();

/// One CPU's drain mailbox: the shootdown mailbox's protocol for "give your allocator
/// reservations back" (`frames::drain_core`).
struct Drain {
    request: AtomicU64,
    done: AtomicU64,
}

static DRAINS: [Drain; MAX_CPUS] = [const { Drain { request: AtomicU64::new(0), done: AtomicU64::new(0) } }; MAX_CPUS];

/// What the shootdown protocol needs of the hardware: the local APIC.
pub struct Apic;

impl Cpus for Apic {
    fn me(&self) -> usize {
        me()
    }

    fn send(&self, cpu: usize) {
        send_raw(cpu);
    }

    /// Nothing here: `flush_gen`'s bump is the flush (every vCPU flushes by its backend's
    /// means before its next entry on this CPU, `vm/sched.rs`).
    fn flush(&self, _cpu: usize) {}

    fn answer(&self) {
        service();
    }
}

/// `Apic` on CPU `.0`, which the caller knows to be this one (no APIC read for `me`).
pub struct Here(pub usize);

impl Cpus for Here {
    fn me(&self) -> usize {
        self.0
    }

    fn send(&self, cpu: usize) {
        send_raw(cpu);
    }

    /// As `Apic`'s: the generation's bump is the flush.
    fn flush(&self, _cpu: usize) {}

    fn answer(&self) {
        service_on(self.0);
    }
}

#[allow(clippy::declare_interior_mutable_const)]
const APIC_NONE: AtomicU32 = AtomicU32::new(u32::MAX);
static APIC_OF: [AtomicU32; MAX_CPUS] = [APIC_NONE; MAX_CPUS];
#[allow(clippy::declare_interior_mutable_const)]
const INDEX_NONE: AtomicU8 = AtomicU8::new(NO_CPU);
static INDEX_OF: [AtomicU8; 256] = [INDEX_NONE; 256];

/// Records that CPU `index` has APIC ID `apic_id` (each CPU at its start).
pub fn register(index: usize, apic_id: u32) {
    if index < MAX_CPUS && apic_id < 256 {
        APIC_OF[index].store(apic_id, Ordering::Release);
        INDEX_OF[apic_id as usize].store(index as u8, Ordering::Release);
    }
}

/// The index of the CPU this runs on (0 before `register`, as on the boot CPU).
pub fn me() -> usize {
    match INDEX_OF[(apic::id() & 0xff) as usize].load(Ordering::Acquire) {
        NO_CPU => 0,
        i => i as usize,
    }
}

/// Sends `IPI_VECTOR` to CPU `index` (nothing if it is not registered) and asks it to look
/// at its vCPUs' shared state before it enters a guest again (`attention`): a kick of a
/// stopped guest, a doorbell's wake-up, the start of the run.
pub fn send(index: usize) {
    if let Some(a) = ATTENTION.get(index) {
        a.store(true, Ordering::Release);
    }
    send_raw(index);
}

/// True (once) if another CPU sent this CPU an IPI with `send` since the last call: the vCPU
/// loop then takes the world lock before the next entry instead of the lock-free path.
pub fn attention(index: usize) -> bool {
    ATTENTION[index % MAX_CPUS].swap(false, Ordering::AcqRel)
}

/// Whether an IPI that needs more than a flush is pending for this CPU (`send`), without
/// taking it (`attention` does).
pub fn attention_pending(index: usize) -> bool {
    ATTENTION[index % MAX_CPUS].load(Ordering::Acquire)
}

#[allow(clippy::declare_interior_mutable_const)]
const NO_ATTENTION: AtomicBool = AtomicBool::new(false);
/// Per CPU index: an IPI that needs more than a flush is pending (`send`).
static ATTENTION: [AtomicBool; MAX_CPUS] = [NO_ATTENTION; MAX_CPUS];

/// Sends `IPI_VECTOR` to CPU `index` (nothing if it is not registered): a shootdown's IPI,
/// which needs nothing but `service`.
fn send_raw(index: usize) {
    if let Some(id) = APIC_OF.get(index).map(|a| a.load(Ordering::Acquire)).filter(|&id| id != u32::MAX) {
        apic::send_fixed(id, IPI_VECTOR);
    }
}

/// This CPU's flush generation: changes whenever a shootdown reached it.
pub fn flush_gen(index: usize) -> u64 {
    MAILBOXES.flush_gen(index % MAX_CPUS)
}

/// Acknowledges a pending flush request to this CPU (`vmcore::shootdown`'s protocol), and
/// drains this CPU's allocator core where another CPU asked (it ran out of memory). Never
/// runs inside an allocator call of this CPU: only from the places listed above.
pub fn service() {
    service_on(me());
}

/// `service` on CPU `me`, which the caller knows to be this one (no APIC read).
pub fn service_on(me: usize) {
    let me = me % MAX_CPUS;
    MAILBOXES.service(me, &Apic);
    let d = &DRAINS[me];
    let want = d.request.load(Ordering::Acquire);
    if d.done.load(Ordering::Acquire) < want {
        crate::mm::frames::drain_core(me);
        d.done.store(want, Ordering::Release);
    }
}

/// Asks every other registered CPU to drain its allocator core and waits until each did
/// (an out-of-memory `get` while others hold reservations). Returns how many were asked.
pub fn drain_others() -> u32 {
    let me = me();
    let mut waiting = [0u64; MAX_CPUS];
    let mut sent = 0;
    for (cpu, want) in waiting.iter_mut().enumerate() {
        if cpu != me && APIC_OF[cpu].load(Ordering::Acquire) != u32::MAX {
            *want = DRAINS[cpu].request.fetch_add(1, Ordering::AcqRel) + 1;
            send_raw(cpu);
            sent += 1;
        }
    }
    for (cpu, &want) in waiting.iter().enumerate() {
        while want != 0 && DRAINS[cpu].done.load(Ordering::Acquire) < want {
            service();
            core::hint::spin_loop();
        }
    }
    sent
}

/// The IPI handler: acknowledge, then EOI.
pub fn interrupt() {
    service();
    apic::eoi();
}

/// The mailboxes themselves (`vm::shootdown`'s `Owed` waits on them).
pub fn mailboxes() -> &'static Mailboxes<MAX_CPUS> {
    &MAILBOXES
}

/// Waits until every shootdown any CPU started so far is acknowledged. True if it waited.
pub fn barrier() -> bool {
    MAILBOXES.barrier(&Apic)
}
