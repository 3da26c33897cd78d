//! Hypercall dispatch (ABI v1): a decoded `abi::Call` routed to the hypervisor's services
//! (`Services`, one method per call or call family, implemented by `hypervisor/src/vm/hypercall.rs`
//! under the world lock), the `Action` the vCPU loop takes next, and the refusal policy
//! (`conclude`). The abi crate decodes and range-checks the raw call before anything here runs;
//! the services check the rest. Host-tested with a fake that records every call (`tests.rs`).
//!
//! A call either returns to the guest at once (answered here: status and value through
//! `vcpu::answer`), parks or yields the vCPU, exits it, is issued again (`Retry`: nothing
//! answered, `rax` still holds it), or leaves a deferred part (`Action::Unlocked`, a
//! `Deferred`: the work implements its own steps where it is made) that the vCPU loop runs
//! with the world lock let go and then ends here: `finish` (answered) or, its guest gone,
//! `abandon` (what it holds goes back, nothing answered).
//!
//! Refusals: a refused call's reason (`Refusals::refuse`, a fixed buffer, no allocation) is
//! logged beside its error; the first `LOUD_FAILURES` of a guest at INFO, later ones at DEBUG
//! (one note says so), and the refusals guests expect as part of a protocol (`expected`) at
//! DEBUG, not counted.
//!
//! # Mutations the tests catch
//! Broken by hand once each, the named tests failed, and the code was restored:
//! - `Sleep` routed as `wait(1, ..)`: `every_call_routes_to_its_service_with_its_arguments`.
//! - A decode error not answered (`return Action::Continue`):
//!   `a_decode_error_is_answered_with_its_code_and_no_service_runs`.
//! - The note at `n >= LOUD_FAILURES`, or INFO only for `n < LOUD_FAILURES` (`loudness`):
//!   `the_eighth_loud_refusal_carries_the_one_note_and_later_ones_are_quiet`,
//!   `loudness_is_info_up_to_the_limit_with_one_note`.
//! - `expected` refusals counted: `expected_refusals_are_quiet_and_not_counted`.
//! - The `bench=on` gate dropped: `bench_frames_without_bench_on_is_denied_and_nothing_runs`.
//! - `Retry` answered `Ok(0)`: `retry_passes_through_and_answers_nothing`.
//! - `finish` not answering, `abandon` not giving back:
//!   `a_deferred_call_is_answered_by_finish_and_abandon_answers_nothing`.
//! - `finish` ending the work by its `abandon`, or `abandon` dropping it unended:
//!   `a_deferred_work_runs_once_and_ends_once_by_finish_or_abandon`.
//! - The reason kept after a call that succeeded, or not taken after a refusal:
//!   `a_reason_is_logged_once_and_not_kept_for_the_next_call`.
//! - `exit` without `flush_console`: `exit_returns_its_code_after_the_console_is_flushed`.
//! - `yield` unanswered: `yield_is_answered_zero_and_yields`.
//! - `INFO_SLICE_US` answered with the TSC rate: `info_selectors_answer_from_their_source`.

use crate::reason::Reason;
use crate::vcpu::{answer, Regs};
use abi::{Call, CreateFlags, Error, ExmapOp, GuestSlice, Name, Timeout};

#[cfg(test)]
mod tests;

/// The first refusals of each guest that are logged at INFO; later ones at DEBUG, so a guest
/// that loops on a bad call does not flood the log.
pub const LOUD_FAILURES: u32 = 8;

/// The note on a guest's last loud refusal.
pub const QUIET_NOTE: &str = " (later refusals of this guest at log=debug)";

/// What the vCPU loop does after a hypercall. `D`: the deferred part of a call
/// (`Services::Deferred`), returned once per call, on the stack, moved once (no allocation).
pub enum Action<D> {
    /// Answered; the vCPU goes on.
    Continue,
    /// The vCPU gives up the CPU: `yield` (answered 0), or a `wait` / `sleep` that parked it
    /// (not answered: the wake-up writes the result).
    Yield,
    /// The calling vCPU asked to exit, with this code.
    Exit(i32),
    /// The rest of the call is done by the vCPU loop with the world lock let go, then ended
    /// under it (`finish`, or `abandon` where the guest is gone). Nothing answered yet.
    Unlocked(D),
    /// The call cannot start now (a resource is held by another vCPU's work): the vCPU issues
    /// it again, the world lock let go in between (`rax` still holds it; nothing answered).
    Retry,
}

/// What a call that may defer or be retried did (the services' answer for those calls).
pub enum Outcome<D> {
    /// Done: the guest's answer.
    Answer(Result<u64, Error>),
    /// The rest runs with the world lock let go (`Action::Unlocked`).
    Defer(D),
    /// Issued again, the world lock let go in between (`Action::Retry`).
    Retry,
}

/// The calling guest and vCPU, as the log names them.
#[derive(Clone, Copy, Debug)]
pub struct Who<'a> {
    pub guest: u32,
    pub name: &'a str,
    pub vcpu: u32,
}

/// A guest's refusals: the reason of the call being handled (set by a service through
/// `refuse`, logged and cleared by `conclude`; one call at a time, under the world lock) and
/// how many loud refusals it had so far.
#[derive(Clone, Copy, Default)]
pub struct Refusals {
    reason: Option<Reason>,
    loud: u32,
}

/// How one refusal is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loudness {
    pub level: log::Level,
    /// The guest's last loud refusal: the log line says later ones go to DEBUG.
    pub note: bool,
}

impl Refusals {
    pub const fn new() -> Refusals {
        Refusals { reason: None, loud: 0 }
    }

    /// `e`, with the reason (`format_args!`, formatted into a fixed buffer, cut at
    /// `reason::REASON_MAX` bytes) logged beside it.
    pub fn refuse(&mut self, e: Error, why: core::fmt::Arguments) -> Error {
        self.reason = Some(Reason::format(why));
        e
    }

    /// Loud refusals so far (saturating).
    pub fn loud(&self) -> u32 {
        self.loud
    }

    /// Counts one loud refusal; how it is logged.
    pub fn count(&mut self) -> Loudness {
        self.loud = self.loud.saturating_add(1);
        loudness(self.loud)
    }
}

/// How the `n`th loud refusal of a guest (from 1) is logged.
pub fn loudness(n: u32) -> Loudness {
    Loudness { level: if n <= LOUD_FAILURES { log::Level::Info } else { log::Level::Debug }, note: n == LOUD_FAILURES }
}

/// A refusal that is part of a normal protocol, not a mistake: opening a name that does not
/// exist yet (a rendezvous), ringing a doorbell nobody subscribed to yet. Logged at DEBUG and
/// not counted among the guest's loud refusals.
pub fn expected(nr: u64, e: Error) -> bool {
    matches!((nr, e), (abi::HC_MORSEL_OPEN, Error::NotFound) | (abi::HC_NOTIFY, Error::NoReceiver))
}

/// What `info` answers without the world lock, from the calling vCPU's fixed state
/// (`exits::info_is_local` names these selectors; the lock-free path calls `info_local`).
pub trait Facts {
    fn guest_id(&self) -> u64;
    /// The guest's RAM, bytes.
    fn memory(&self) -> u64;
    fn guest_count(&self) -> u64;
    fn vcpu_index(&self) -> u64;
    fn vcpu_count(&self) -> u64;
    fn cpu_index(&self) -> u64;
    fn tsc_per_us(&self) -> u64;
    fn slice_us(&self) -> u64;
}

/// `info(what)` for the selectors answered from fixed state; None for the others.
#[inline]
pub fn info_local<F: Facts + ?Sized>(f: &F, what: u64) -> Option<u64> {
    Some(match what {
        abi::INFO_ABI_VERSION => abi::ABI_VERSION,
        abi::INFO_GUEST_ID => f.guest_id(),
        abi::INFO_MEMORY_SIZE => f.memory(),
        abi::INFO_GUEST_COUNT => f.guest_count(),
        abi::INFO_LOG_LEVEL => log::max_level() as u64,
        abi::INFO_VCPU_INDEX => f.vcpu_index(),
        abi::INFO_VCPU_COUNT => f.vcpu_count(),
        abi::INFO_CPU_INDEX => f.cpu_index(),
        abi::INFO_TSC_PER_US => f.tsc_per_us(),
        abi::INFO_SLICE_US => f.slice_us(),
        _ => return None,
    })
}

/// What the hypervisor does for one call of one guest vCPU, under the world lock: one
/// method per call or call family, each with the arguments `abi::Call` decoded. Methods
/// that answer at once return the guest's answer; those that may defer work or be retried
/// return an `Outcome`. A refusal's reason goes into `refusals().1` (`Refusals::refuse`).
pub trait Services {
    /// What a deferred part's steps are given.
    type Host: Host;
    /// The deferred part of a call (run with the world lock let go, then `finish`ed): one
    /// type for every call, which dispatches to the work it holds.
    type Deferred: Deferred<Self::Host>;

    /// The calling vCPU's fixed state, for `info` (`info_local`).
    fn facts(&self) -> impl Facts + '_;

    /// The calling guest and vCPU, and the guest's refusals.
    fn refusals(&mut self) -> (Who<'_>, &mut Refusals);
    /// `bench=on`: `bench_frames` is answered.
    fn bench(&self) -> bool;
    /// `exit`: what the guest printed goes out before the exit is logged.
    fn flush_console(&mut self);
    fn console_write(&mut self, text: GuestSlice) -> Result<u64, Error>;
    /// `wait` and `sleep` (mask 0, a finite timeout): Ok(None) where the vCPU parked (its
    /// wake-up writes the result).
    fn wait(&mut self, mask: u64, timeout: Timeout) -> Result<Option<u64>, Error>;
    /// `bench_frames` (enabled): always deferred.
    fn bench_frames(&mut self, huge: bool, count: u64) -> Self::Deferred;
    /// `info` selectors that need the world: every exit, slices used, interrupts injected.
    fn exits(&self) -> u64;
    fn slices(&self) -> u64;
    fn interrupts(&self) -> u64;

    fn morsel_create(&mut self, name: Name, size: u64, flags: CreateFlags) -> Outcome<Self::Deferred>;
    fn morsel_open(&mut self, name: Name, writable: bool) -> Outcome<Self::Deferred>;
    fn morsel_unmount(&mut self, gpa: u64) -> Result<u64, Error>;
    fn morsel_destroy(&mut self, name: Name) -> Outcome<Self::Deferred>;
    fn morsel_size(&mut self, gpa: u64) -> Result<u64, Error>;
    fn morsel_stats(&mut self);
    fn device_mount(&mut self, name: Name, bdf: u16, iova: u64, writable: bool) -> Result<u64, Error>;
    fn device_unmount(&mut self, bdf: u16, iova: u64) -> Result<u64, Error>;
    fn edu_dma(&mut self, to_device: bool, iova: u64, len: u64) -> Result<u64, Error>;
    fn nvme(&mut self, write: bool, gpa: u64, offset: u64, lba: u64, count: u64) -> Outcome<Self::Deferred>;
    fn exmap_create(&mut self, name: Name, size: u64, share_writable: bool) -> Result<u64, Error>;
    fn exmap_action(&mut self, region: u64, iov: u64, count: u64, op: ExmapOp) -> Outcome<Self::Deferred>;
    fn exmap_info(&mut self, region: u64, what: u64) -> Result<u64, Error>;
    /// The guest's new exception bitmap; returns the old one.
    fn guest_exceptions(&mut self, mask: u32) -> u32;
    fn notify_subscribe(&mut self, gpa: u64, vector: Option<u8>) -> Result<u64, Error>;
    fn notify(&mut self, gpa: u64, bits: u64) -> Result<u64, Error>;
    fn timer(&mut self, us: u64, vector: u8) -> Result<u64, Error>;
    fn name_watch(&mut self, name: Name, bits: u64) -> Result<u64, Error>;

    /// The world under its lock and the calling guest, for a deferred part's `finish`.
    fn world(&mut self) -> (<Self::Host as Host>::World<'_>, &mut <Self::Host as Host>::Guest);
}

/// What a call's deferred part is given at each of its steps (`Deferred`): the hypervisor's
/// own types (`vm/hypercall.rs`'s `Hv`), a recorder in the tests.
pub trait Host {
    /// What `run` works through with the world lock let go (the calling CPU's allocator
    /// handle).
    type Alone: ?Sized;
    /// The world under its lock, without the calling guest (the hypercall context, the
    /// calling CPU's allocator handle).
    type World<'a>
    where
        Self: 'a;
    /// The calling guest, under the world lock.
    type Guest: ?Sized;
}

/// A call's deferred part (`Action::Unlocked`), implemented by the work itself where the
/// service that defers the call makes it: the vCPU loop `run`s it once with the world lock
/// let go, then ends it once under the lock: `finish` where its guest is still there (the
/// guest's answer, through `finish` below), or `abandon` where it is gone (what it holds goes
/// back, nothing answered). Both take it by value: a work is ended once. No allocation and
/// no move but the caller's: the work may be large (an ExMap batch), filled in place.
pub trait Deferred<H: Host + ?Sized> {
    /// The work itself, with no world lock held.
    fn run(&mut self, alone: &H::Alone);
    /// Its end under the world lock, its guest there: the guest's answer.
    fn finish(self, world: H::World<'_>, guest: &mut H::Guest) -> Result<u64, Error>;
    /// Its end under the world lock, its guest gone.
    fn abandon(self, world: H::World<'_>);
}

/// A name the world lock's handler of this call will look up or reserve (`morsel_open`,
/// `morsel_create`, `exmap_create`, `morsel_destroy`, `device_mount`, `name_watch`: their
/// first two arguments), for the vCPU loop to read
/// from guest RAM and hash (`names::Keys::hash`) before it takes the lock: a [`NameAhead`]
/// for the handler. Not decoded here (the handler decodes the call): a call the decoder
/// refuses never reaches the handler, so its name read ahead is not used. None for every
/// other call.
pub fn name_to_read(regs: &Regs) -> Option<Name> {
    match regs.rax {
        abi::HC_MORSEL_OPEN
        | abi::HC_MORSEL_CREATE
        | abi::HC_EXMAP_CREATE
        | abi::HC_MORSEL_DESTROY
        | abi::HC_DEVICE_MOUNT
        | abi::HC_NAME_WATCH => Some(Name(GuestSlice { ptr: regs.rdi, len: regs.rsi })),
        _ => None,
    }
}

/// A call's name read and hashed with no lock held: valid (`names::Name`), read whole from
/// guest RAM at `at`. The handler uses it for a call whose name is `at` (`for_call`); any
/// other name, or one that could not be read so, is read under the lock as before (the same
/// checks, the same errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameAhead {
    pub at: Name,
    pub name: crate::names::Hashed,
}

impl NameAhead {
    /// The name read ahead for a call whose name argument is `at`, if that is the one.
    pub fn for_call(ahead: Option<&NameAhead>, at: Name) -> Option<crate::names::Hashed> {
        ahead.filter(|a| a.at == at).map(|a| a.name)
    }
}

/// Handles the hypercall in `regs` (already past the instruction; `rax` its number, the
/// arguments in rdi, rsi, rdx, r10, r8, r9), answering it unless it parks, retries or defers.
pub fn handle<S: Services>(s: &mut S, regs: &mut Regs) -> Action<S::Deferred> {
    let nr = regs.rax;
    let call = Call::decode(nr, [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9]);
    let outcome = match call {
        Err(e) => Outcome::Answer(Err(e)),
        Ok(Call::Exit { code }) => {
            s.flush_console();
            let (who, _) = s.refusals();
            match who.vcpu {
                0 => log::info!(target: "vm", "guest {} ({}) exited with code {code}", who.guest, who.name),
                v => log::info!(target: "vm", "guest {} ({}) vcpu {v} exited with code {code}", who.guest, who.name),
            }
            return Action::Exit(code);
        }
        Ok(Call::Yield) => {
            answer(regs, Ok(0));
            return Action::Yield;
        }
        // A parked vCPU gives up the CPU; its wake-up writes the result.
        Ok(Call::Wait { mask, timeout }) => match s.wait(mask, timeout) {
            Ok(None) => return Action::Yield,
            other => Outcome::Answer(other.map(|got| got.unwrap_or(0))),
        },
        Ok(Call::Sleep { us }) => match s.wait(0, Timeout::Micros(us)) {
            Ok(None) => return Action::Yield,
            other => Outcome::Answer(other.map(|got| got.unwrap_or(0))),
        },
        Ok(Call::BenchFrames { huge, count }) => {
            if s.bench() {
                Outcome::Defer(s.bench_frames(huge, count))
            } else {
                let (_, r) = s.refusals();
                Outcome::Answer(Err(r.refuse(Error::Denied, format_args!("the hypervisor runs without bench=on"))))
            }
        }
        Ok(Call::MorselCreate { name, size, flags }) => s.morsel_create(name, size, flags),
        Ok(Call::MorselOpen { name, writable }) => s.morsel_open(name, writable),
        Ok(Call::MorselDestroy { name }) => s.morsel_destroy(name),
        Ok(Call::Nvme { write, gpa, offset, lba, count }) => s.nvme(write, gpa, offset, lba, count),
        Ok(Call::ExmapAction { region, iov, count, op }) => s.exmap_action(region, iov, count, op),
        Ok(call) => Outcome::Answer(dispatch(s, call)),
    };
    match outcome {
        Outcome::Answer(result) => {
            conclude(s, nr, regs, result);
            Action::Continue
        }
        Outcome::Defer(d) => Action::Unlocked(d),
        Outcome::Retry => Action::Retry,
    }
}

/// Ends a call whose deferred part ran (`regs.rax` still holds its number): answered with
/// what the work's `finish` says. `done` is the call's `Services::Deferred`, or the work it
/// held where the vCPU loop took it out (an ExMap batch that could not end alone).
pub fn finish<S: Services, D: Deferred<S::Host>>(s: &mut S, regs: &mut Regs, done: D) {
    let (world, guest) = s.world();
    let result = done.finish(world, guest);
    conclude(s, regs.rax, regs, result);
}

/// A call whose deferred part ran for a guest that is gone: what it holds goes back
/// (`Deferred::abandon`), nothing is answered or logged as a refusal.
pub fn abandon<H: Host, D: Deferred<H>>(world: H::World<'_>, done: D) {
    done.abandon(world);
}

/// Runs a decoded call that answers at once.
fn dispatch<S: Services>(s: &mut S, call: Call) -> Result<u64, Error> {
    match call {
        Call::Info { what } => info(s, what),
        Call::ConsoleWrite { text } => s.console_write(text),
        Call::MorselUnmount { gpa } => s.morsel_unmount(gpa),
        Call::MorselSize { gpa } => s.morsel_size(gpa),
        Call::MorselStats => {
            s.morsel_stats();
            Ok(0)
        }
        Call::ExmapCreate { name, size, share_writable } => s.exmap_create(name, size, share_writable),
        Call::NameWatch { name, bits } => s.name_watch(name, bits),
        Call::ExmapInfo { region, what } => s.exmap_info(region, what),
        Call::DeviceMount { name, bdf, iova, writable } => s.device_mount(name, bdf, iova, writable),
        Call::DeviceUnmount { bdf, iova } => s.device_unmount(bdf, iova),
        Call::EduDma { to_device, iova, len } => s.edu_dma(to_device, iova, len),
        // Every vCPU of the guest takes the new bitmap before its next entry.
        Call::GuestExceptions { mask } => Ok(s.guest_exceptions(mask) as u64),
        Call::NotifySubscribe { gpa, vector } => s.notify_subscribe(gpa, vector),
        Call::Notify { gpa, bits } => s.notify(gpa, bits),
        Call::Timer { us, vector } => s.timer(us, vector),
        // Handled by `handle`.
        Call::Exit { .. } | Call::Yield | Call::Wait { .. } | Call::Sleep { .. } | Call::BenchFrames { .. }
        | Call::MorselCreate { .. } | Call::MorselDestroy { .. } | Call::Nvme { .. } | Call::ExmapAction { .. }
        | Call::MorselOpen { .. } => Err(Error::Invalid),
    }
}

/// `info(what)`: fixed state (`info_local`), else the guest's counters.
fn info<S: Services>(s: &S, what: u64) -> Result<u64, Error> {
    if let Some(v) = info_local(&s.facts(), what) {
        return Ok(v);
    }
    match what {
        abi::INFO_EXITS => Ok(s.exits()),
        abi::INFO_SLICES => Ok(s.slices()),
        abi::INFO_INTERRUPTS => Ok(s.interrupts()),
        _ => Err(Error::NoSuchCall),
    }
}

/// Whether call `nr` answers with a new mount: its status (rax) is then the morsel's size.
fn mounts(nr: u64) -> bool {
    matches!(nr, abi::HC_MORSEL_CREATE | abi::HC_MORSEL_OPEN | abi::HC_EXMAP_CREATE)
}

/// Logs a refusal (the first few of a guest at INFO) and writes status and value. A call
/// that mounted something answers its size as the status (non-negative: success), looked up
/// under the same world lock, so the guest needs no `morsel_size` call (an exit and a world
/// lock) after `morsel_create`, `morsel_open` or `exmap_create`.
fn conclude<S: Services>(s: &mut S, nr: u64, regs: &mut Regs, result: Result<u64, Error>) {
    let size = match result {
        Ok(gpa) if mounts(nr) => s.morsel_size(gpa).ok(),
        _ => None,
    };
    if let Err(e) = result {
        let (who, refusals) = s.refusals();
        let reason = refusals.reason.take();
        if expected(nr, e) {
            log::debug!(target: "vm", "guest {} ({}): {} ({nr:#x}) refused ({e}), as guests expect it to be",
                who.guest, who.name, Call::name_of(nr));
        } else {
            let loud = refusals.count();
            let why = reason.as_ref().map_or("", |r| r.as_str());
            let sep = if why.is_empty() { "" } else { ": " };
            log::log!(target: "vm", loud.level, "guest {} ({}): {} ({nr:#x}) refused ({e}){sep}{why}{}",
                who.guest, who.name, Call::name_of(nr), if loud.note { QUIET_NOTE } else { "" });
        }
    } else {
        // A reason left by a step that was then recovered from is not kept for the next call.
        s.refusals().1.reason = None;
    }
    answer(regs, result);
    if let Some(size) = size {
        // Sizes are below 2^63 (a morsel fits in guest-physical memory): never negative.
        regs.rax = size & (u64::MAX >> 1);
    }
}
