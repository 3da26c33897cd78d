//! Inter-processor interrupts between the online CPUs: which CPU index has which APIC ID,
//! the one IPI vector (`IPI_VECTOR`), and the flush mailbox that TLB shootdowns use.
//!
//! Mailbox protocol (one `Mailbox` per CPU index, all atomics, no lock):
//! * the initiator bumps the target's `request` (fetch_add, AcqRel) and sends `IPI_VECTOR`;
//! * the target, in `service`, sees `done < request`, bumps its own `flush_gen` and then
//!   stores `done = request` (Release): the acknowledgment;
//! * the initiator waits until `done >= ` the request it made (Acquire).
//!
//! `flush_gen` is what the vCPU loop checks (interrupts off) right before every guest entry:
//! a vCPU whose last seen generation differs flushes its second-level translations first. So
//! after an acknowledgment no guest entry on that CPU can use a translation cached before it;
//! a guest running at the moment the IPI arrives leaves guest mode (SVM INTR intercept, VMX
//! external-interrupt exiting), and the handler runs `service`.
//!
//! `service` runs from the IPI handler, from every place a CPU waits with interrupts off
//! (the world lock's spin, the idle loop, a wait for acknowledgments), right before every
//! guest entry, and every 2 MiB of long work done with interrupts off (zeroing a new morsel,
//! freeing a destroyed one, `bench_frames`, NVMe waits): no CPU keeps another waiting for
//! longer than one such piece, and two CPUs waiting for each other both go on.
//!
//! A shootdown is split in two (`request`, then `Acks::wait`) so that its initiator can let
//! go of every lock before it waits (`vm::shootdown`); `outstanding` is a barrier behind every
//! shootdown any CPU started.

use super::apic;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// The vector of every IPI the hypervisor sends (kicks, shootdowns and doorbell wake-ups
/// alike; a guest it interrupts inside its slice resumes, see `vm/sched.rs`).
pub const IPI_VECTOR: u8 = 0x21;

/// CPUs the hypervisor handles (the shootdown masks are u64).
pub const MAX_CPUS: usize = 64;

const NO_CPU: u8 = u8::MAX;

/// One CPU's shootdown mailbox.
struct Mailbox {
    request: AtomicU64,
    done: AtomicU64,
    flush_gen: AtomicU64,
    /// The same protocol for "give your allocator reservations back" (`frames::drain_core`).
    drain_request: AtomicU64,
    drain_done: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const MAILBOX: Mailbox = Mailbox {
    request: AtomicU64::new(0),
    done: AtomicU64::new(0),
    flush_gen: AtomicU64::new(0),
    drain_request: AtomicU64::new(0),
    drain_done: AtomicU64::new(0),
};
static MAILBOXES: [Mailbox; MAX_CPUS] = [MAILBOX; MAX_CPUS];

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
    MAILBOXES[index % MAX_CPUS].flush_gen.load(Ordering::Acquire)
}

/// Marks this CPU's cached second-level translations stale (every vCPU flushes before its
/// next entry here).
pub fn flush_local(index: usize) {
    MAILBOXES[index % MAX_CPUS].flush_gen.fetch_add(1, Ordering::AcqRel);
}

/// Acknowledges a pending flush request to this CPU (see the protocol above), and drains
/// this CPU's allocator core where another CPU asked (it ran out of memory). Never runs
/// inside an allocator call of this CPU: only from the places listed above.
pub fn service() {
    service_on(me());
}

/// `service` on CPU `me`, which the caller knows to be this one (no APIC read).
pub fn service_on(me: usize) {
    let me = me % MAX_CPUS;
    let m = &MAILBOXES[me];
    let want = m.request.load(Ordering::Acquire);
    if m.done.load(Ordering::Acquire) < want {
        m.flush_gen.fetch_add(1, Ordering::AcqRel);
        m.done.store(want, Ordering::Release);
    }
    let want = m.drain_request.load(Ordering::Acquire);
    if m.drain_done.load(Ordering::Acquire) < want {
        crate::mm::frames::drain_core(me);
        m.drain_done.store(want, Ordering::Release);
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
            *want = MAILBOXES[cpu].drain_request.fetch_add(1, Ordering::AcqRel) + 1;
            send_raw(cpu);
            sent += 1;
        }
    }
    for (cpu, &want) in waiting.iter().enumerate() {
        while want != 0 && MAILBOXES[cpu].drain_done.load(Ordering::Acquire) < want {
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

/// The acknowledgments a CPU waits for: per CPU index, the request number it must see done
/// (0: none). Requests are counters, so waiting for the largest covers every earlier one.
#[derive(Clone, Copy)]
pub struct Acks(pub [u64; MAX_CPUS]);

impl Acks {
    pub const NONE: Acks = Acks([0; MAX_CPUS]);

    /// Adds `other`'s requests (the larger number per CPU).
    pub fn merge(&mut self, other: &Acks) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = (*a).max(*b);
        }
    }

    /// True if nothing is awaited.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Waits until every awaited CPU acknowledged, answering this CPU's own requests
    /// meanwhile (two CPUs waiting for each other both go on).
    pub fn wait(&self) {
        for (cpu, &want) in self.0.iter().enumerate() {
            while want != 0 && MAILBOXES[cpu].done.load(Ordering::Acquire) < want {
                service();
                core::hint::spin_loop();
            }
        }
    }
}

/// Asks every CPU in `mask` but this one to flush (one IPI each) without waiting; this CPU
/// flushes locally. Returns what to wait for and how many IPIs were sent.
pub fn request(mask: u64) -> (Acks, u32) {
    let me = me();
    flush_local(me);
    let mut acks = Acks::NONE;
    let mut sent = 0;
    for (cpu, want) in acks.0.iter_mut().enumerate() {
        if cpu != me && mask & (1 << cpu) != 0 {
            *want = MAILBOXES[cpu].request.fetch_add(1, Ordering::AcqRel) + 1;
            send_raw(cpu);
            sent += 1;
        }
    }
    (acks, sent)
}

/// Every flush request any CPU made so far and that is not acknowledged yet: waiting for
/// these is a barrier behind every shootdown already started (`vm::shootdown::barrier`).
pub fn outstanding() -> Acks {
    let mut acks = Acks::NONE;
    for (cpu, want) in acks.0.iter_mut().enumerate() {
        let m = &MAILBOXES[cpu];
        let r = m.request.load(Ordering::Acquire);
        if m.done.load(Ordering::Acquire) < r {
            *want = r;
        }
    }
    acks
}

/// Asks every CPU in `mask` but this one to flush and waits for each acknowledgment; this
/// CPU flushes locally. Returns how many IPIs it sent.
pub fn shoot(mask: u64) -> u32 {
    let (acks, sent) = request(mask);
    acks.wait();
    sent
}
