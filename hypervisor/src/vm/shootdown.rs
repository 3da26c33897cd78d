//! TLB shootdown for second-level translations: after an unmount, or an ExMap FREE, cleared
//! entries may still be cached by every CPU that ran a vCPU of an affected guest
//! (`Guest::ran_on`). `guest`/`cpus` flush this CPU (its vCPUs flush before their next
//! entry), send one IPI to each other such CPU and wait for every acknowledgment
//! (`arch::ipi`'s mailbox protocol): when they return, no CPU can use a cleared translation
//! again. Each target flushes by the backend's own means before its next guest entry: INVEPT
//! single-context (all VPIDs of that EPTP) on VMX, TLB_CONTROL = flush this ASID on SVM
//! (`Backend::flush_second_level`). One shootdown per hypercall, however many entries it
//! cleared. The frames the call freed cannot be handed out again before then: every
//! allocation by a guest's call happens under the world lock the caller holds.

use super::guest::Guest;
use super::Backend;
use crate::arch::ipi;
use core::sync::atomic::{AtomicU64, Ordering};

static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
static IPIS: AtomicU64 = AtomicU64::new(0);
static TSC_SPENT: AtomicU64 = AtomicU64::new(0);
/// Every CPU that ran any guest's vCPU.
static ANY_RAN_ON: AtomicU64 = AtomicU64::new(0);

/// CPU `cpu` is about to run a vCPU (the vCPU loop, before each entry).
pub fn note_ran(cpu: usize) {
    ANY_RAN_ON.fetch_or(1 << (cpu % ipi::MAX_CPUS), Ordering::AcqRel);
}

/// The CPUs that ran any vCPU so far.
pub fn any_ran_on() -> u64 {
    ANY_RAN_ON.load(Ordering::Acquire)
}

/// Shoots down the translations of guest `g` on every CPU that ran one of its vCPUs. A guest
/// with no vCPU left needs none (it never enters again; its ASID/VPID and EPTP are flushed
/// before any reuse).
pub fn guest<B: Backend>(g: &Guest<B>) {
    if g.live_vcpus > 0 {
        cpus(g.ran_on);
    }
}

/// Shoots down on every CPU of `mask` (this one flushes locally).
pub fn cpus(mask: u64) {
    let t0 = crate::platform::time::tsc();
    let sent = ipi::shoot(mask);
    TSC_SPENT.fetch_add(crate::platform::time::tsc() - t0, Ordering::Relaxed);
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
    IPIS.fetch_add(sent as u64, Ordering::Relaxed);
}

/// (shootdowns, IPIs, microseconds spent in them) so far.
pub fn stats() -> (u64, u64, u64) {
    let us = TSC_SPENT.load(Ordering::Relaxed) / crate::platform::time::tsc_per_us().max(1);
    (SHOOTDOWNS.load(Ordering::Relaxed), IPIS.load(Ordering::Relaxed), us)
}

/// Prints the counters (with the morsel stats).
pub fn log_stats() {
    let (n, ipis, us) = stats();
    let per = (ipis * 100).checked_div(n).unwrap_or(0);
    log::info!(target: "morsel", "stats shootdowns: {n} ({ipis} IPIs, {}.{:02} IPIs per shootdown, {} us per shootdown)",
        per / 100, per % 100, us.checked_div(n).unwrap_or(0));
}
