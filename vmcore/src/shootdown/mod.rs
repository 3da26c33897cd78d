//! TLB shootdown for second-level translations and the deferred free behind it: the protocol
//! core, generic over what touches hardware ([`Cpus`]: which CPU this is, sending the IPI
//! vector, flushing, answering), so that it runs and is model-checked on the host. The
//! hypervisor's `arch::ipi` holds one [`Mailboxes`] for every CPU and supplies the APIC;
//! `vm::shootdown` keeps one [`Owed`] per CPU and supplies the frame allocator.
//!
//! # Mailbox protocol
//! One [`Mailbox`] per CPU index, all atomics, no lock:
//! * the initiator bumps the target's `request` (fetch_add, SeqCst) and sends the IPI
//!   ([`Mailboxes::request`], [`Cpus::send`]), unless the target is `busy`: running
//!   hypervisor code that answers before its next guest entry or halt (below);
//! * the target, in [`Mailboxes::service`], sees `done < request`, bumps its own `flush_gen`,
//!   flushes ([`Cpus::flush`]) and then stores `done = request` (Release): the
//!   acknowledgment;
//! * the initiator waits until `done >=` the request it made (Acquire) ([`Mailboxes::wait`]).
//!
//! # No IPI to a CPU that answers anyway
//! An IPI to a CPU in the hypervisor (interrupts off) does nothing until that CPU enters a
//! guest, where it costs a VM exit right after the entry; yet that CPU answers every request
//! before the entry anyway. So a CPU marks itself `busy` when its guest exits
//! ([`Mailboxes::busy`]) and clears the mark where it is about to enter a guest or halt
//! ([`Mailboxes::ready`]: store `false`, a SeqCst fence, then `service`). The initiator reads
//! the mark after its `request` bump (both SeqCst): it sees `busy` only if the target's clear
//! comes later in the SeqCst order, and then the target's `service` after it sees the
//! request; otherwise it sends the IPI as before. So a skipped IPI never leaves a request
//! unanswered in guest mode or in a halt, and the wait for the acknowledgment is as before
//! (the target answers at its next service point), minus the target's extra exit.
//!
//! `flush_gen` is what the hypervisor's vCPU loop checks (interrupts off) right before every
//! guest entry: a vCPU whose last seen generation differs flushes its second-level
//! translations first (so the hypervisor's [`Cpus::flush`] does nothing: the flush is the
//! generation's bump). After an acknowledgment no guest entry on that CPU can use a
//! translation cached before it; a guest running when the IPI arrives leaves guest mode and
//! the handler runs `service`.
//!
//! `service` runs from the IPI handler, from every place a CPU waits with interrupts off
//! (the world lock's spin, the idle loop, every wait here: [`Cpus::answer`]), right before
//! every guest entry, and every 2 MiB of long work done with interrupts off: no CPU keeps
//! another waiting for longer than one such piece, and two CPUs waiting for each other both
//! go on. Requests are counters: waiting for the largest covers every earlier one ([`Acks`]).
//!
//! # No CPU waits for another while holding the world lock
//! A shootdown is split in two ([`Mailboxes::request`], then [`Mailboxes::wait`]) so that its
//! initiator can let go of every lock before it waits. For one call:
//!
//! 1. under the world lock: entries cleared; frames they led to go into this CPU's [`Owed`]
//!    ([`Owed::keep`]) instead of the allocator; the IPIs are sent and their acknowledgments
//!    added to the same record ([`Owed::owe`]);
//! 2. the lock is let go: other CPUs handle exits meanwhile; the kept frames are in no one's
//!    hands but this CPU's, so none can be handed out while a CPU may still cache a
//!    translation to it;
//! 3. no lock: every acknowledgment arrives, then the kept frames are freed
//!    ([`Owed::settle`]);
//! 4. only then does the calling vCPU enter its guest again.
//!
//! Frames whose translation *another* CPU's call removed (a morsel destroyed right after
//! another CPU unmounted it, whose caller may still be in step 3) are freed only behind
//! [`Mailboxes::barrier`]: every shootdown any CPU started so far acknowledged.
//!
//! Lock order: the world lock, then this CPU's `Owed` (the hypervisor keeps it behind a lock
//! only its own CPU takes, never from an interrupt handler). The mailboxes take no lock. An
//! `Owed` with no room left ([`Kept::Overflow`]) shoots down on every CPU that may cache
//! anything and waits at once, under the world lock: bounded, and the caller logs it.
//!
//! # Model-checked
//! `loom_tests.rs` (`RUSTFLAGS="--cfg loom" cargo test --release -p vmcore --lib loom`)
//! explores every interleaving (within a preemption bound) of: a deferred free against a
//! target that caches the translation and answers; `barrier` behind another CPU's unmount;
//! a stopped guest's CPU and two CPUs shooting at each other; a shootdown of this CPU alone
//! beside another CPU's shootdown of both; a target that is busy between two guest runs,
//! whose guest mode ends only by an IPI (model (e)). Mutations tried by hand, each
//! caught (docs/src/notes/shootdown-model.md has the failures):
//!
//! | mutation | models that fail |
//! | --- | --- |
//! | M1: `Owed::settle` frees before it waits | (a) `loom_deferred_free_waits_for_flush`, (c) `loom_stopped_guest_still_answers` |
//! | M2: `service` acknowledges before it flushes | (a), (b) `loom_barrier_covers_other_cpus_unmount` |
//! | M3: `done` stored and awaited `Relaxed` (not Release/Acquire) | (a), (b), (c) |
//! | M4: `barrier` waits for nothing | (b) |
//! | M5: `wait` does not answer this CPU's own requests | (c): loom reports a wait that never ends |
//! | M6: the walk over a mask's set bits skips the lowest CPU | (a), (b), (c), (d) |
//! | M7: a shootdown naming only this CPU skips its local flush too | (d) `loom_self_only_shootdown_flushes_here_and_still_answers` |
//! | B1: a request never sends the IPI | (e) `loom_busy_target_gets_no_ipi_but_answers_before_its_entry` (a wait that never ends), (a) |
//! | B2: `ready` without its SeqCst fence | (e) |
//! | B3: `request_into` without its SeqCst fence before it reads `busy` | (e) |
//! | B4: `ready` clears the mark but does not answer | (e) |
//!
//! # Cost
//! Every walk (requesting, waiting, merging, clearing) visits the set bits of a mask, not
//! the `N` slots: a call whose guest ran only on this CPU flushes locally, touches no
//! mailbox and owes nothing ([`Mailboxes::request_into`]). Only [`Mailboxes::outstanding`]
//! (the barrier, behind a destroy) reads every slot.

use crate::sync::{fence, spin, AtomicBool, AtomicU64, Ordering};
use alloc::vec::Vec;

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;

/// What touches hardware, per CPU (the hypervisor: the local APIC and its IPI vector; the
/// models: flags and threads).
pub trait Cpus {
    /// The index of the CPU this runs on.
    fn me(&self) -> usize;
    /// Sends the shootdown IPI to CPU `cpu` (nothing if there is no such CPU).
    fn send(&self, cpu: usize);
    /// CPU `cpu` (this one) flushes its cached second-level translations, or marks them
    /// stale so that none is used again: called after its `flush_gen` was bumped and before
    /// the acknowledgment.
    fn flush(&self, cpu: usize);
    /// Answers this CPU's pending requests ([`Mailboxes::service`] and whatever else the
    /// caller answers with it): called in every round of every wait here.
    fn answer(&self);
}

/// One CPU's shootdown mailbox.
pub struct Mailbox {
    request: AtomicU64,
    done: AtomicU64,
    flush_gen: AtomicU64,
    /// The CPU runs hypervisor code and answers its requests before its next guest entry or
    /// halt: a request to it needs no IPI.
    busy: AtomicBool,
}

impl Mailbox {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Mailbox { request: AtomicU64::new(0), done: AtomicU64::new(0), flush_gen: AtomicU64::new(0), busy: AtomicBool::new(false) }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Mailbox { request: AtomicU64::new(0), done: AtomicU64::new(0), flush_gen: AtomicU64::new(0), busy: AtomicBool::new(false) }
    }
}

/// The mailboxes of `N` CPUs (the hypervisor: 64, its masks are `u64`).
pub struct Mailboxes<const N: usize> {
    boxes: [Mailbox; N],
}

impl<const N: usize> Default for Mailboxes<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Mailboxes<N> {
    /// No request made, none done.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Mailboxes { boxes: [const { Mailbox::new() }; N] }
    }

    /// No request made, none done (loom's atomics are not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        Mailboxes { boxes: core::array::from_fn(|_| Mailbox::new()) }
    }

    fn at(&self, cpu: usize) -> &Mailbox {
        &self.boxes[cpu % N]
    }

    /// CPU `cpu`'s flush generation: changes whenever a shootdown reached it.
    pub fn flush_gen(&self, cpu: usize) -> u64 {
        self.at(cpu).flush_gen.load(Ordering::Acquire)
    }

    /// Marks CPU `cpu`'s (this one's) cached translations stale and flushes.
    pub fn flush_local(&self, cpu: usize, hw: &impl Cpus) {
        self.at(cpu).flush_gen.fetch_add(1, Ordering::AcqRel);
        hw.flush(cpu);
    }

    /// CPU `me` (this one) runs hypervisor code from now on and answers its requests
    /// ([`Mailboxes::ready`]) before its next guest entry or halt: requests to it send no IPI.
    /// (Seen late, an IPI is sent that was not needed: harmless.)
    #[inline]
    pub fn busy(&self, me: usize) {
        self.at(me).busy.store(true, Ordering::Relaxed);
    }

    /// CPU `me` (this one) is about to enter a guest or halt: requests from now on send the
    /// IPI again, and those made before are answered now. True if one was.
    #[inline]
    pub fn ready(&self, me: usize, hw: &impl Cpus) -> bool {
        self.at(me).busy.store(false, Ordering::SeqCst);
        // Pairs with the initiator's bump and read of `busy` (SeqCst both): either it sees
        // `busy` clear and sends the IPI, or this `service` sees its request.
        fence(Ordering::SeqCst);
        self.service(me, hw)
    }

    /// Acknowledges a pending request to CPU `me` (this one), flushing first. True if there
    /// was one.
    pub fn service(&self, me: usize, hw: &impl Cpus) -> bool {
        let m = self.at(me);
        let want = m.request.load(Ordering::Acquire);
        if m.done.load(Ordering::Acquire) < want {
            self.flush_local(me, hw);
            m.done.store(want, Ordering::Release);
            return true;
        }
        false
    }

    /// Asks every CPU in `mask` but this one to flush (one IPI each) without waiting; this
    /// CPU flushes locally. Returns what to wait for and how many IPIs were sent.
    pub fn request(&self, mask: u64, hw: &impl Cpus) -> (Acks<N>, u32) {
        let mut acks = Acks::NONE;
        let sent = self.request_into(mask, hw, &mut acks);
        (acks, sent)
    }

    /// [`Mailboxes::request`], its acknowledgments added to `acks` (no copy of a whole
    /// [`Acks`]). Only the CPUs of `mask` are visited (one step per set bit, not per slot);
    /// where `mask` names no CPU but this one, this CPU flushes locally and no mailbox is
    /// touched: nothing to wait for.
    pub fn request_into(&self, mask: u64, hw: &impl Cpus, acks: &mut Acks<N>) -> u32 {
        let me = hw.me();
        self.flush_local(me, hw);
        let others = mask & Acks::<N>::ALL & !(1u64 << (me % 64));
        let mut sent = 0;
        for cpu in bits(others) {
            let m = &self.boxes[cpu];
            let want = m.request.fetch_add(1, Ordering::SeqCst) + 1;
            acks.add(cpu, want);
            // A `busy` target answers before its next entry or halt (see the module doc). The
            // fence pairs with `ready`'s (a locked RMW is one on x86, but not in the language's
            // model, nor in loom's).
            fence(Ordering::SeqCst);
            if !m.busy.load(Ordering::SeqCst) {
                hw.send(cpu);
                sent += 1;
            }
        }
        sent
    }

    /// True if every request of `acks` is acknowledged.
    pub fn acknowledged(&self, acks: &Acks<N>) -> bool {
        bits(acks.cpus).all(|cpu| self.boxes[cpu].done.load(Ordering::Acquire) >= acks.want[cpu])
    }

    /// Waits until every CPU of `acks` acknowledged, answering this CPU's own requests
    /// meanwhile (two CPUs waiting for each other both go on).
    pub fn wait(&self, acks: &Acks<N>, hw: &impl Cpus) {
        for cpu in bits(acks.cpus) {
            let (m, want) = (&self.boxes[cpu], acks.want[cpu]);
            while m.done.load(Ordering::Acquire) < want {
                hw.answer();
                spin();
            }
        }
    }

    /// Asks every CPU in `mask` but this one to flush and waits for each acknowledgment;
    /// this CPU flushes locally. Returns how many IPIs it sent.
    pub fn shoot(&self, mask: u64, hw: &impl Cpus) -> u32 {
        let (acks, sent) = self.request(mask, hw);
        self.wait(&acks, hw);
        sent
    }

    /// Every request any CPU made so far and that is not acknowledged yet: waiting for these
    /// is a barrier behind every shootdown already started.
    pub fn outstanding(&self) -> Acks<N> {
        let mut acks = Acks::NONE;
        for (cpu, m) in self.boxes.iter().enumerate() {
            let r = m.request.load(Ordering::Acquire);
            if m.done.load(Ordering::Acquire) < r {
                acks.add(cpu, r);
            }
        }
        acks
    }

    /// Waits until every shootdown any CPU started so far is acknowledged: frames whose
    /// translation another CPU's call removed may be freed after it. True if it waited.
    pub fn barrier(&self, hw: &impl Cpus) -> bool {
        let acks = self.outstanding();
        if acks.is_empty() {
            return false;
        }
        self.wait(&acks, hw);
        true
    }
}

/// The CPU indices of the set bits of `mask`, lowest first: one step per CPU named, however
/// many slots there are.
fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    core::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let cpu = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(cpu)
    })
}

/// The acknowledgments a CPU waits for: per CPU index, the request number it must see done
/// (0: none), and the set of CPUs with one (`cpus`, bit N for CPU N: what every walk over
/// it visits). Requests are counters, so waiting for the largest covers every earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acks<const N: usize> {
    want: [u64; N],
    /// Bit `cpu` set iff `want[cpu] != 0`.
    cpus: u64,
}

impl<const N: usize> Acks<N> {
    /// The masks are `u64`: at most 64 CPUs.
    const ALL: u64 = {
        assert!(N >= 1 && N <= 64, "Mailboxes and Acks hold 1 to 64 CPUs");
        if N == 64 { u64::MAX } else { (1u64 << N) - 1 }
    };

    pub const NONE: Self = Acks { want: [0; N], cpus: 0 };

    /// The acknowledgments `want` (per CPU index, 0: none).
    pub fn of(want: [u64; N]) -> Self {
        let mut a = Self::NONE;
        for (cpu, &w) in want.iter().enumerate() {
            a.add(cpu, w);
        }
        a
    }

    /// Per CPU index, the request number awaited (0: none).
    pub fn want(&self) -> &[u64; N] {
        &self.want
    }

    /// The CPUs with an acknowledgment awaited (bit N: CPU N).
    pub fn cpus(&self) -> u64 {
        self.cpus
    }

    /// Awaits request `want` of CPU `cpu` too (the larger of it and what was awaited).
    fn add(&mut self, cpu: usize, want: u64) {
        if want != 0 {
            self.want[cpu] = self.want[cpu].max(want);
            self.cpus |= 1 << cpu;
        }
    }

    /// Adds `other`'s requests (the larger number per CPU), visiting only its CPUs.
    pub fn merge(&mut self, other: &Self) {
        for cpu in bits(other.cpus) {
            self.add(cpu, other.want[cpu]);
        }
    }

    /// True if nothing is awaited.
    pub fn is_empty(&self) -> bool {
        self.cpus == 0
    }

    /// Awaits nothing (visiting only the CPUs awaited, not every slot).
    pub fn clear(&mut self) {
        for cpu in bits(self.cpus) {
            self.want[cpu] = 0;
        }
        self.cpus = 0;
    }
}

/// What one CPU owes before it may give frames back: the acknowledgments it asked for and
/// the frames kept until they arrive (each `address | order`, the address 4 KiB-aligned).
/// Plain data: its owner keeps it where only its own CPU reaches it.
pub struct Owed<const N: usize> {
    acks: Acks<N>,
    frames: Vec<u64>,
}

/// Where [`Owed::keep`] put a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// Kept until [`Owed::settle`].
    Deferred,
    /// No room: a shootdown of every CPU that may cache anything was waited for at once,
    /// and every frame kept so far went back with this one.
    Overflow,
}

impl<const N: usize> Default for Owed<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Owed<N> {
    /// Nothing owed, no room to keep frames ([`Owed::reserve`] makes some).
    pub const fn new() -> Self {
        Owed { acks: Acks::NONE, frames: Vec::new() }
    }

    /// Makes room for `keep` kept frames, if memory allows (without it every kept frame
    /// waits at once).
    pub fn reserve(&mut self, keep: usize) {
        let _ = self.frames.try_reserve_exact(keep.saturating_sub(self.frames.len()));
    }

    /// Adds acknowledgments to wait for before the kept frames go back.
    pub fn owe(&mut self, acks: &Acks<N>) {
        self.acks.merge(acks);
    }

    /// Requests a shootdown of `mask` ([`Mailboxes::request_into`]) and owes its
    /// acknowledgments: none where `mask` names only this CPU. Returns the IPIs sent.
    pub fn request(&mut self, mb: &Mailboxes<N>, hw: &impl Cpus, mask: u64) -> u32 {
        mb.request_into(mask, hw, &mut self.acks)
    }

    /// True if nothing is awaited and nothing kept.
    pub fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.frames.is_empty()
    }

    /// The acknowledgments awaited.
    pub fn acks(&self) -> &Acks<N> {
        &self.acks
    }

    /// How many frames are kept.
    pub fn kept(&self) -> usize {
        self.frames.len()
    }

    /// Keeps `frame` (`address | order`) until the acknowledgments are in. With no room
    /// left (never grows: no allocation on this path) it shoots down on `all` (every CPU that
    /// may cache anything: this call's own shootdown may not be requested yet), waits, and
    /// gives every kept frame and `frame` to `free` now.
    pub fn keep(&mut self, frame: u64, mb: &Mailboxes<N>, hw: &impl Cpus, all: u64, mut free: impl FnMut(u64)) -> Kept {
        if self.frames.len() == self.frames.capacity() {
            self.request(mb, hw, all);
            self.settle(mb, hw, &mut free);
            free(frame);
            return Kept::Overflow;
        }
        self.frames.push(frame);
        Kept::Deferred
    }

    /// Waits (no lock may be held but the caller's own `Owed`) for every acknowledgment owed,
    /// then gives every kept frame to `free`. Owes nothing afterwards.
    pub fn settle(&mut self, mb: &Mailboxes<N>, hw: &impl Cpus, mut free: impl FnMut(u64)) {
        mb.wait(&self.acks, hw);
        self.acks.clear();
        for &f in self.frames.iter() {
            free(f);
        }
        self.frames.clear();
    }
}
