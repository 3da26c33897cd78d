//! Bench-only phase counters of an ExMap call that takes no world lock (feature
//! `percall-probe`, off in every normal build, where these functions are empty and inline to
//! nothing): `cargo xtask bench exmap-smp --probe` (docs/src/notes/exmap-call.md, stage 4).
//! One CPU only (one set of counters, no per-CPU state). An exit cycle runs from one guest
//! exit to the next (`cycle`); `mark(k)` charges the time since the last mark to segment k
//! of the cycle. A cycle whose exit was an ALLOC / FREE of one entry taken by `exmap_fast`
//! (`fast_call`) is added to that operation's sums at the next exit; the others are dropped.

/// Segments of an exit cycle, in order.
#[cfg_attr(not(feature = "percall-probe"), allow(dead_code))]
pub const SEGMENTS: [&str; 10] = [
    "exit: backend.run's return to exmap_fast (lockless, classify)",
    "exmap_fast: hypercall checks and decode",
    "the region's lock by CAS (Fast::take)",
    "the batch (run_batch: iovec read, exmap alloc / free, results written)",
    "its end (end_alone: shootdown decision and request, trim, counters, lock given back)",
    "resume_alone: answer, shootdown::complete, attention, timer",
    "enter: back to the loop, ipi::service_on, flush generation, flush, tsc",
    "vmx run before the switch: VMPTRLD check, VMWRITEs, KERNEL_GS_BASE",
    "switch::run: world switch, FPU, VM entry, the guest until its next exit",
    "vmx run after the switch: VMREADs, KERNEL_GS_BASE, Exit built",
];

#[cfg(feature = "percall-probe")]
mod on {
    use super::SEGMENTS;
    use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

    const N: usize = SEGMENTS.len();
    static LAST: AtomicU64 = AtomicU64::new(0);
    static PENDING: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
    /// 0: this cycle is not counted; 1 + op: an ALLOC (op 0) or FREE (op 1) of one entry.
    static OP: AtomicU64 = AtomicU64::new(0);
    static SUM: [[AtomicU64; N]; 2] = [const { [const { AtomicU64::new(0) }; N] }; 2];
    static CALLS: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

    pub fn mark(seg: usize) {
        let now = crate::platform::time::tsc();
        let last = LAST.swap(now, Relaxed);
        PENDING[seg].fetch_add(now.wrapping_sub(last), Relaxed);
    }

    pub fn fast_call(op: u64, count: u64) {
        if count == 1 && op <= 1 {
            OP.store(1 + op, Relaxed);
        }
    }

    pub fn cycle() {
        mark(N - 1);
        let op = OP.swap(0, Relaxed);
        for (k, p) in PENDING.iter().enumerate() {
            let v = p.swap(0, Relaxed);
            if op > 0 {
                SUM[op as usize - 1][k].fetch_add(v, Relaxed);
            }
        }
        if op > 0 {
            CALLS[op as usize - 1].fetch_add(1, Relaxed);
        }
    }

    pub fn report() {
        for (op, name) in ["ALLOC", "FREE"].iter().enumerate() {
            let calls = CALLS[op].load(Relaxed).max(1);
            let mut total = 0;
            for (k, seg) in SEGMENTS.iter().enumerate() {
                let per = SUM[op][k].load(Relaxed) / calls;
                total += per;
                log::warn!(target: "probe", "probe {name} of 1 entry ({calls} calls): segment {k} {per} ticks per call: {seg}");
            }
            log::warn!(target: "probe", "probe {name} of 1 entry: {total} ticks per exit cycle");
        }
    }
}

#[cfg(feature = "percall-probe")]
pub use on::{cycle, fast_call, mark, report};

#[cfg(not(feature = "percall-probe"))]
mod off {
    #[inline(always)]
    pub fn mark(_seg: usize) {}
    #[inline(always)]
    pub fn fast_call(_op: u64, _count: u64) {}
    #[inline(always)]
    pub fn cycle() {}
    #[inline(always)]
    pub fn report() {}
}

#[cfg(not(feature = "percall-probe"))]
pub use off::{cycle, fast_call, mark, report};
