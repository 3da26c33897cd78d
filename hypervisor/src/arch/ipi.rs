//! Inter-processor interrupts between the online CPUs: the one IPI vector (`IPI_VECTOR`),
//! and the flush mailbox that TLB shootdowns use.
//!
//! The shootdown protocol itself (mailboxes, generations, acknowledgments, the barrier) is
//! `vmcore::shootdown`, host-tested and model-checked; this file supplies what touches
//! hardware (`Apic`: this CPU's index, the IPI) and holds every CPU's mailbox (`MAILBOXES`).
//! The drain mailbox ("give your allocator reservations back") follows the same protocol;
//! its two counters, the attention flag and each CPU's APIC ID are in the CPU's `PerCpu`
//! (`arch::percpu`).
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
use super::percpu;
use core::sync::atomic::Ordering;
use vmcore::shootdown::{Cpus, Mailboxes};

/// The vector of every IPI the hypervisor sends (kicks, shootdowns and doorbell wake-ups
/// alike; a guest it interrupts inside its slice resumes, see `vm/sched.rs`).
pub const IPI_VECTOR: u8 = 0x21;

/// CPUs the hypervisor handles (the shootdown masks are u64).
pub const MAX_CPUS: usize = 64;

/// Every CPU's shootdown mailbox (`vmcore::shootdown`'s protocol).
static MAILBOXES: Mailboxes<MAX_CPUS> = Mailboxes::new();

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

/// The index of the CPU this runs on (`percpu::index`: 0 before its `percpu::register`, as
/// on the boot CPU).
pub fn me() -> usize {
    percpu::index()
}

/// Sends `IPI_VECTOR` to CPU `index` (nothing if it is not registered) and asks it to look
/// at its vCPUs' shared state before it enters a guest again (`attention`): a kick of a
/// stopped guest, a doorbell's wake-up, the start of the run.
pub fn send(index: usize) {
    if index < MAX_CPUS {
        percpu::of(index).inbox.attention.store(true, Ordering::Release);
    }
    send_raw(index);
}

/// True (once) if another CPU sent this CPU an IPI with `send` since the last call: the vCPU
/// loop then takes the world lock before the next entry instead of the lock-free path.
pub fn attention(index: usize) -> bool {
    percpu::of(index).inbox.attention.swap(false, Ordering::AcqRel)
}

/// Whether an IPI that needs more than a flush is pending for this CPU (`send`), without
/// taking it (`attention` does).
pub fn attention_pending(index: usize) -> bool {
    percpu::of(index).inbox.attention.load(Ordering::Acquire)
}

/// Sends `IPI_VECTOR` to CPU `index` (nothing if it is not registered): a shootdown's IPI,
/// which needs nothing but `service`.
fn send_raw(index: usize) {
    if let Some(id) = (index < MAX_CPUS).then(|| percpu::of(index).apic_id()).flatten() {
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
    drain_if_asked(me);
}

/// CPU `me` (this one) left its guest: until `ready_on`, it answers shootdown requests
/// before any guest entry or halt, so they send it no IPI (`vmcore::shootdown`: "No IPI to a
/// CPU that answers anyway"), which would only force an exit right after its next entry.
#[inline]
pub fn busy(me: usize) {
    MAILBOXES.busy(me % MAX_CPUS);
}

/// CPU `me` (this one) is about to enter a guest or halt: requests send it the IPI again,
/// and those made before are answered now (`service_on`, after the mark is cleared).
pub fn ready_on(me: usize) {
    let me = me % MAX_CPUS;
    MAILBOXES.ready(me, &Apic);
    drain_if_asked(me);
}

/// `ready_on` this CPU (an APIC read: the halts).
pub fn ready() {
    ready_on(me());
}

/// Drains this CPU's (`me`) allocator core where another CPU asked (it ran out of memory).
fn drain_if_asked(me: usize) {
    let cpu = percpu::of(me);
    let want = cpu.inbox.drain_request.load(Ordering::Acquire);
    if cpu.outbox.drain_done.load(Ordering::Acquire) < want {
        crate::mm::frames::drain_core(me);
        cpu.outbox.drain_done.store(want, Ordering::Release);
    }
}

/// Asks every other registered CPU to drain its allocator core and waits until each did
/// (an out-of-memory `get` while others hold reservations). Returns how many were asked.
pub fn drain_others() -> u32 {
    let me = me();
    let mut waiting = [0u64; MAX_CPUS];
    let mut sent = 0;
    for (cpu, want) in waiting.iter_mut().enumerate() {
        let other = percpu::of(cpu);
        if cpu != me && other.apic_id().is_some() {
            *want = other.inbox.drain_request.fetch_add(1, Ordering::AcqRel) + 1;
            send_raw(cpu);
            sent += 1;
        }
    }
    for (cpu, &want) in waiting.iter().enumerate() {
        while want != 0 && percpu::of(cpu).outbox.drain_done.load(Ordering::Acquire) < want {
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
