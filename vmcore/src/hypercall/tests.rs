//! Synthetic hypercalls against a fake `Services` that records every service it is asked for,
//! answers from canned values, and a test logger that keeps this thread's log lines.

use super::*;
use abi::*;
use std::cell::RefCell;
use std::string::{String, ToString};
use std::vec::Vec;

/// A service as the fake recorded it, with its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Svc {
    FlushConsole,
    ConsoleWrite(GuestSlice),
    Wait(u64, Timeout),
    BenchFrames(bool, u64),
    Exits,
    Slices,
    Interrupts,
    MorselCreate(abi::Name, u64, CreateFlags),
    MorselOpen(abi::Name, bool),
    MorselUnmount(u64),
    MorselDestroy(abi::Name),
    MorselSize(u64),
    MorselStats,
    DeviceMount(abi::Name, u16, u64, bool),
    DeviceUnmount(u16, u64),
    EduDma(bool, u64, u64),
    Nvme(bool, u64, u64, u64, u64),
    ExmapCreate(abi::Name, u64, bool),
    ExmapAction(u64, u64, u64, ExmapOp),
    ExmapInfo(u64, u64),
    GuestExceptions(u32),
    NotifySubscribe(u64, Option<u8>),
    Notify(u64, u64),
    Timer(u64, u8),
    NameWatch(abi::Name, u64),
    /// A deferred work's steps (`Deferred`), by its number.
    Run(u32),
    Finish(u32),
    Abandon(u32),
}

/// The fake's deferred part, numbered in the order the services made them; not `Copy`, so
/// that, as in the hypervisor, it is ended once.
#[derive(Debug, PartialEq, Eq)]
struct Work(u32);

/// What the fake's deferred parts are given (`Host`): the fake's record to run and end
/// through.
struct FakeHost;

impl Host for FakeHost {
    type Alone = RefCell<Vec<Svc>>;
    type World<'a> = Answers<'a>;
    type Guest = Refusals;
}

/// The world under the lock as the fake's deferred parts see it: the record, and the result
/// (and reason) every answering service gives.
struct Answers<'a> {
    calls: &'a RefCell<Vec<Svc>>,
    result: Result<u64, Error>,
    reason: Option<&'static str>,
}

impl Deferred<FakeHost> for Work {
    fn run(&mut self, calls: &RefCell<Vec<Svc>>) {
        calls.borrow_mut().push(Svc::Run(self.0));
    }
    fn finish(self, w: Answers<'_>, refusals: &mut Refusals) -> Result<u64, Error> {
        w.calls.borrow_mut().push(Svc::Finish(self.0));
        match (w.result, w.reason) {
            (Err(e), Some(why)) => Err(refusals.refuse(e, format_args!("{why}"))),
            (r, _) => r,
        }
    }
    fn abandon(self, w: Answers<'_>) {
        w.calls.borrow_mut().push(Svc::Abandon(self.0));
    }
}

/// What the services that may defer return.
#[derive(Clone, Copy)]
enum Mode {
    Answer,
    Defer,
    Retry,
}

struct Fake {
    calls: RefCell<Vec<Svc>>,
    bench: bool,
    refusals: Refusals,
    /// Every answering service's result.
    result: Result<u64, Error>,
    /// Its reason, where it refuses (`Refusals::refuse`).
    reason: Option<&'static str>,
    mode: Mode,
    wait: Result<Option<u64>, Error>,
    exceptions: u32,
    /// Numbers the deferred parts in order.
    work: u32,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            calls: RefCell::new(Vec::new()),
            bench: true,
            refusals: Refusals::new(),
            result: Ok(7),
            reason: None,
            mode: Mode::Answer,
            wait: Ok(Some(5)),
            exceptions: 0x40,
            work: 0,
        }
    }

    fn calls(&self) -> Vec<Svc> {
        self.calls.borrow().clone()
    }

    fn record(&self, s: Svc) {
        self.calls.borrow_mut().push(s);
    }

    fn answer(&mut self, s: Svc) -> Result<u64, Error> {
        self.record(s);
        match (self.result, self.reason) {
            (Err(e), Some(why)) => Err(self.refusals.refuse(e, format_args!("{why}"))),
            (r, _) => r,
        }
    }

    fn outcome(&mut self, s: Svc) -> Outcome<Work> {
        match self.mode {
            Mode::Answer => Outcome::Answer(self.answer(s)),
            Mode::Defer => {
                self.record(s);
                self.work += 1;
                Outcome::Defer(Work(self.work))
            }
            Mode::Retry => {
                self.record(s);
                Outcome::Retry
            }
        }
    }
}

/// The fake's fixed state (`Services::facts`).
struct FakeFacts;

impl Facts for FakeFacts {
    fn guest_id(&self) -> u64 {
        3
    }
    fn memory(&self) -> u64 {
        64 << 20
    }
    fn guest_count(&self) -> u64 {
        4
    }
    fn vcpu_index(&self) -> u64 {
        1
    }
    fn vcpu_count(&self) -> u64 {
        2
    }
    fn cpu_index(&self) -> u64 {
        5
    }
    fn tsc_per_us(&self) -> u64 {
        2_000
    }
    fn slice_us(&self) -> u64 {
        10_000
    }
}

impl Services for Fake {
    fn facts(&self) -> impl Facts + '_ {
        FakeFacts
    }

    type Host = FakeHost;
    type Deferred = Work;

    fn refusals(&mut self) -> (Who<'_>, &mut Refusals) {
        (Who { guest: 3, name: "fake", vcpu: 1 }, &mut self.refusals)
    }
    fn bench(&self) -> bool {
        self.bench
    }
    fn flush_console(&mut self) {
        self.record(Svc::FlushConsole);
    }
    fn console_write(&mut self, text: GuestSlice) -> Result<u64, Error> {
        self.answer(Svc::ConsoleWrite(text))
    }
    fn wait(&mut self, mask: u64, timeout: Timeout) -> Result<Option<u64>, Error> {
        self.record(Svc::Wait(mask, timeout));
        self.wait
    }
    fn bench_frames(&mut self, huge: bool, count: u64) -> Work {
        self.record(Svc::BenchFrames(huge, count));
        self.work += 1;
        Work(self.work)
    }
    fn exits(&self) -> u64 {
        self.record(Svc::Exits);
        100
    }
    fn slices(&self) -> u64 {
        self.record(Svc::Slices);
        101
    }
    fn interrupts(&self) -> u64 {
        self.record(Svc::Interrupts);
        102
    }
    fn morsel_create(&mut self, name: abi::Name, size: u64, flags: CreateFlags) -> Outcome<Work> {
        self.outcome(Svc::MorselCreate(name, size, flags))
    }
    fn morsel_open(&mut self, name: abi::Name, writable: bool) -> Outcome<Work> {
        self.outcome(Svc::MorselOpen(name, writable))
    }
    fn morsel_unmount(&mut self, gpa: u64) -> Result<u64, Error> {
        self.answer(Svc::MorselUnmount(gpa))
    }
    fn morsel_destroy(&mut self, name: abi::Name) -> Outcome<Work> {
        self.outcome(Svc::MorselDestroy(name))
    }
    fn morsel_size(&mut self, gpa: u64) -> Result<u64, Error> {
        self.answer(Svc::MorselSize(gpa))
    }
    fn morsel_stats(&mut self) {
        self.record(Svc::MorselStats);
    }
    fn device_mount(&mut self, name: abi::Name, bdf: u16, iova: u64, writable: bool) -> Result<u64, Error> {
        self.answer(Svc::DeviceMount(name, bdf, iova, writable))
    }
    fn device_unmount(&mut self, bdf: u16, iova: u64) -> Result<u64, Error> {
        self.answer(Svc::DeviceUnmount(bdf, iova))
    }
    fn edu_dma(&mut self, to_device: bool, iova: u64, len: u64) -> Result<u64, Error> {
        self.answer(Svc::EduDma(to_device, iova, len))
    }
    fn nvme(&mut self, write: bool, gpa: u64, offset: u64, lba: u64, count: u64) -> Outcome<Work> {
        self.outcome(Svc::Nvme(write, gpa, offset, lba, count))
    }
    fn exmap_create(&mut self, name: abi::Name, size: u64, share_writable: bool) -> Result<u64, Error> {
        self.answer(Svc::ExmapCreate(name, size, share_writable))
    }
    fn exmap_action(&mut self, region: u64, iov: u64, count: u64, op: ExmapOp) -> Outcome<Work> {
        self.outcome(Svc::ExmapAction(region, iov, count, op))
    }
    fn exmap_info(&mut self, region: u64, what: u64) -> Result<u64, Error> {
        self.answer(Svc::ExmapInfo(region, what))
    }
    fn guest_exceptions(&mut self, mask: u32) -> u32 {
        self.record(Svc::GuestExceptions(mask));
        core::mem::replace(&mut self.exceptions, mask)
    }
    fn notify_subscribe(&mut self, gpa: u64, vector: Option<u8>) -> Result<u64, Error> {
        self.answer(Svc::NotifySubscribe(gpa, vector))
    }
    fn notify(&mut self, gpa: u64, bits: u64) -> Result<u64, Error> {
        self.answer(Svc::Notify(gpa, bits))
    }
    fn timer(&mut self, us: u64, vector: u8) -> Result<u64, Error> {
        self.answer(Svc::Timer(us, vector))
    }
    fn name_watch(&mut self, name: abi::Name, bits: u64) -> Result<u64, Error> {
        self.answer(Svc::NameWatch(name, bits))
    }
    fn world(&mut self) -> (Answers<'_>, &mut Refusals) {
        (Answers { calls: &self.calls, result: self.result, reason: self.reason }, &mut self.refusals)
    }
}

/// Registers for call `nr` with arguments rdi, rsi, rdx, r10, r8, r9; the others marked.
fn regs(nr: u64, a: [u64; 6]) -> Regs {
    Regs { rax: nr, rdi: a[0], rsi: a[1], rdx: a[2], r10: a[3], r8: a[4], r9: a[5], rbx: 0xb, rip: 0x1000, ..Regs::default() }
}

/// A name at `ptr`, `len` bytes, as the decoder makes it.
fn name(ptr: u64, len: u64) -> abi::Name {
    abi::Name(GuestSlice { ptr, len })
}

/// Which `Call` variant (the match lists every one: a new variant does not compile until a
/// routing case below covers it).
fn variant(c: &Call) -> usize {
    match c {
        Call::Info { .. } => 0,
        Call::ConsoleWrite { .. } => 1,
        Call::Exit { .. } => 2,
        Call::Yield => 3,
        Call::MorselCreate { .. } => 4,
        Call::MorselOpen { .. } => 5,
        Call::MorselUnmount { .. } => 6,
        Call::MorselDestroy { .. } => 7,
        Call::MorselSize { .. } => 8,
        Call::MorselStats => 9,
        Call::DeviceMount { .. } => 10,
        Call::DeviceUnmount { .. } => 11,
        Call::EduDma { .. } => 12,
        Call::Nvme { .. } => 13,
        Call::ExmapCreate { .. } => 14,
        Call::ExmapAction { .. } => 15,
        Call::ExmapInfo { .. } => 16,
        Call::GuestExceptions { .. } => 17,
        Call::NotifySubscribe { .. } => 18,
        Call::Notify { .. } => 19,
        Call::Wait { .. } => 20,
        Call::Sleep { .. } => 21,
        Call::Timer { .. } => 22,
        Call::NameWatch { .. } => 23,
        Call::BenchFrames { .. } => 24,
    }
}
const VARIANTS: usize = 25;

/// How a routed call ends in the routing table.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ends {
    /// Answered with this value.
    Value(u64),
    Yield,
    Exit(i32),
    Unlocked,
}

#[test]
fn every_call_routes_to_its_service_with_its_arguments() {
    let flags = CreateFlags { huge_pages: true, share_writable: false, persistent: true };
    let cases: &[(u64, [u64; 6], &[Svc], Ends)] = &[
        (HC_INFO, [INFO_EXITS, 0, 0, 0, 0, 0], &[Svc::Exits], Ends::Value(100)),
        (HC_CONSOLE_WRITE, [0x2000, 12, 0, 0, 0, 0], &[Svc::ConsoleWrite(GuestSlice { ptr: 0x2000, len: 12 })], Ends::Value(7)),
        (HC_EXIT, [(-3i32) as u32 as u64, 0, 0, 0, 0, 0], &[Svc::FlushConsole], Ends::Exit(-3)),
        (HC_YIELD, [0; 6], &[], Ends::Yield),
        (HC_MORSEL_CREATE, [0x3000, 5, 1 << 21, MORSEL_HUGE_PAGES | MORSEL_PERSISTENT, 0, 0],
            &[Svc::MorselCreate(name(0x3000, 5), 1 << 21, flags), Svc::MorselSize(7)], Ends::Value(7)),
        (HC_MORSEL_OPEN, [0x3000, 6, 1, 0, 0, 0], &[Svc::MorselOpen(name(0x3000, 6), true), Svc::MorselSize(7)], Ends::Value(7)),
        (HC_MORSEL_UNMOUNT, [0x4000_0000, 0, 0, 0, 0, 0], &[Svc::MorselUnmount(0x4000_0000)], Ends::Value(7)),
        (HC_MORSEL_DESTROY, [0x3000, 7, 0, 0, 0, 0], &[Svc::MorselDestroy(name(0x3000, 7))], Ends::Value(7)),
        (HC_MORSEL_SIZE, [0x4020_0000, 0, 0, 0, 0, 0], &[Svc::MorselSize(0x4020_0000)], Ends::Value(7)),
        (HC_MORSEL_STATS, [0; 6], &[Svc::MorselStats], Ends::Value(0)),
        (HC_DEVICE_MOUNT, [0x3000, 8, 0x18, 0x10_0000, 1, 0], &[Svc::DeviceMount(name(0x3000, 8), 0x18, 0x10_0000, true)], Ends::Value(7)),
        (HC_DEVICE_UNMOUNT, [0x20, 0x20_0000, 0, 0, 0, 0], &[Svc::DeviceUnmount(0x20, 0x20_0000)], Ends::Value(7)),
        (HC_EDU_DMA, [EDU_TO_MEMORY, 0x1000, 64, 0, 0, 0], &[Svc::EduDma(false, 0x1000, 64)], Ends::Value(7)),
        (HC_NVME_READ, [0x5000, 0x200, 9, 2, 0, 0], &[Svc::Nvme(false, 0x5000, 0x200, 9, 2)], Ends::Value(7)),
        (HC_NVME_WRITE, [0x6000, 0x400, 10, 3, 0, 0], &[Svc::Nvme(true, 0x6000, 0x400, 10, 3)], Ends::Value(7)),
        (HC_EXMAP_CREATE, [0x3000, 9, 1 << 30, MORSEL_SHARE_WRITABLE, 0, 0], &[Svc::ExmapCreate(name(0x3000, 9), 1 << 30, true), Svc::MorselSize(7)], Ends::Value(7)),
        (HC_EXMAP_ACTION, [0x8000_0000, 0x7000, 3, EXMAP_FREE, 0, 0], &[Svc::ExmapAction(0x8000_0000, 0x7000, 3, ExmapOp::Free)], Ends::Value(7)),
        (HC_EXMAP_INFO, [0x8000_0000, EXMAP_INFO_CALLS, 0, 0, 0, 0], &[Svc::ExmapInfo(0x8000_0000, EXMAP_INFO_CALLS)], Ends::Value(7)),
        // The old bitmap is the answer.
        (HC_GUEST_EXCEPTIONS, [1 << 14, 0, 0, 0, 0, 0], &[Svc::GuestExceptions(1 << 14)], Ends::Value(0x40)),
        (HC_NOTIFY_SUBSCRIBE, [0x9000, 40, 0, 0, 0, 0], &[Svc::NotifySubscribe(0x9000, Some(40))], Ends::Value(7)),
        (HC_NOTIFY_SUBSCRIBE, [0x9000, 0, 0, 0, 0, 0], &[Svc::NotifySubscribe(0x9000, None)], Ends::Value(7)),
        (HC_NOTIFY, [0x9000, 0b101, 0, 0, 0, 0], &[Svc::Notify(0x9000, 0b101)], Ends::Value(7)),
        (HC_WAIT, [0b11, 250, 0, 0, 0, 0], &[Svc::Wait(0b11, Timeout::Micros(250))], Ends::Value(5)),
        (HC_WAIT, [0b1, WAIT_FOREVER, 0, 0, 0, 0], &[Svc::Wait(0b1, Timeout::Forever)], Ends::Value(5)),
        // `sleep` is a wait for no doorbell.
        (HC_SLEEP, [300, 0, 0, 0, 0, 0], &[Svc::Wait(0, Timeout::Micros(300))], Ends::Value(5)),
        (HC_TIMER, [400, 33, 0, 0, 0, 0], &[Svc::Timer(400, 33)], Ends::Value(7)),
        (HC_NAME_WATCH, [0x3000, 10, 0b110, 0, 0, 0], &[Svc::NameWatch(name(0x3000, 10), 0b110)], Ends::Value(7)),
        (HC_BENCH_FRAMES, [BENCH_ORDER_2M, 16, 0, 0, 0, 0], &[Svc::BenchFrames(true, 16)], Ends::Unlocked),
    ];
    let mut seen = [false; VARIANTS];
    for &(nr, a, want, ends) in cases {
        seen[variant(&Call::decode(nr, a).expect("a well-formed call"))] = true;
        let mut s = Fake::new();
        let mut r = regs(nr, a);
        let before = r;
        let action = handle(&mut s, &mut r);
        assert_eq!(s.calls(), want, "{}", Call::name_of(nr));
        let got = match action {
            Action::Continue => {
                // A call that mounts answers the size (the fake's 7) as its status.
                let status = if matches!(nr, HC_MORSEL_CREATE | HC_MORSEL_OPEN | HC_EXMAP_CREATE) { 7 } else { 0 };
                assert_eq!((r.rax, r.rdx), (status, match ends { Ends::Value(v) => v, _ => u64::MAX }), "{}", Call::name_of(nr));
                Ends::Value(r.rdx)
            }
            Action::Yield => Ends::Yield,
            Action::Exit(code) => {
                assert_eq!(r, before, "exit answers nothing");
                Ends::Exit(code)
            }
            Action::Unlocked(_) => {
                assert_eq!(r, before, "a deferred call is not answered yet");
                Ends::Unlocked
            }
            Action::Retry => panic!("{} retried", Call::name_of(nr)),
        };
        assert_eq!(got, ends, "{}", Call::name_of(nr));
        assert_eq!((r.rbx, r.rip), (0xb, 0x1000), "only rax and rdx are written");
    }
    assert!(seen.iter().all(|&s| s), "every Call variant has a routing case: {seen:?}");
}

#[test]
fn a_decode_error_is_answered_with_its_code_and_no_service_runs() {
    let bad: &[(u64, [u64; 6], Error)] = &[
        (0x7777, [0; 6], Error::NoSuchCall),
        // `writable` is a boolean.
        (HC_MORSEL_OPEN, [0x3000, 4, 2, 0, 0, 0], Error::Invalid),
        (HC_MORSEL_CREATE, [0x3000, 0, 4096, 0, 0, 0], Error::Invalid),
        (HC_CONSOLE_WRITE, [0x2000, CONSOLE_MAX + 1, 0, 0, 0, 0], Error::TooLarge),
        (HC_CONSOLE_WRITE, [u64::MAX, 2, 0, 0, 0, 0], Error::BadAddress),
        (HC_EXMAP_ACTION, [0, 0, 0, EXMAP_ALLOC, 0, 0], Error::Invalid),
        (HC_BENCH_FRAMES, [BENCH_ORDER_4K, BENCH_MAX_COUNT + 1, 0, 0, 0, 0], Error::TooLarge),
        (HC_SLEEP, [0, 0, 0, 0, 0, 0], Error::Invalid),
    ];
    for &(nr, a, e) in bad {
        let mut s = Fake::new();
        let mut r = regs(nr, a);
        assert!(matches!(handle(&mut s, &mut r), Action::Continue));
        assert_eq!((r.rax, r.rdx), (e as i64 as u64, 0), "{nr:#x}");
        assert_eq!(s.calls(), [], "{nr:#x}: no service runs");
        assert_eq!(s.refusals.loud(), 1, "a malformed call is a loud refusal");
    }
}

#[test]
fn exit_returns_its_code_after_the_console_is_flushed() {
    let mut s = Fake::new();
    let mut r = regs(HC_EXIT, [7, 0, 0, 0, 0, 0]);
    assert!(matches!(handle(&mut s, &mut r), Action::Exit(7)));
    assert_eq!(s.calls(), [Svc::FlushConsole]);
    assert_eq!(r.rax, HC_EXIT);
}

#[test]
fn yield_is_answered_zero_and_yields() {
    let mut s = Fake::new();
    let mut r = regs(HC_YIELD, [0; 6]);
    r.rdx = 99;
    assert!(matches!(handle(&mut s, &mut r), Action::Yield));
    assert_eq!((r.rax, r.rdx), (0, 0));
}

#[test]
fn a_wait_or_sleep_that_parks_yields_unanswered() {
    for (nr, a) in [(HC_WAIT, [1, 0, 0, 0, 0, 0]), (HC_SLEEP, [10, 0, 0, 0, 0, 0])] {
        let mut s = Fake::new();
        s.wait = Ok(None);
        let mut r = regs(nr, a);
        let before = r;
        assert!(matches!(handle(&mut s, &mut r), Action::Yield), "{nr:#x}");
        assert_eq!(r, before, "the wake-up writes the result");
        // A refused wait is answered.
        let mut s = Fake::new();
        s.wait = Err(Error::Busy);
        assert!(matches!(handle(&mut s, &mut r), Action::Continue));
        assert_eq!(r.rax, Error::Busy as i64 as u64);
    }
}

#[test]
fn retry_passes_through_and_answers_nothing() {
    for (nr, a) in [
        (HC_MORSEL_OPEN, [0x3000, 4, 0, 0, 0, 0]),
        (HC_EXMAP_ACTION, [0x8000_0000, 0x7000, 1, EXMAP_ALLOC, 0, 0]),
    ] {
        let mut s = Fake::new();
        s.mode = Mode::Retry;
        let mut r = regs(nr, a);
        let before = r;
        assert!(matches!(handle(&mut s, &mut r), Action::Retry), "{nr:#x}");
        assert_eq!(r, before, "rax still holds the call");
        assert_eq!(s.refusals.loud(), 0);
    }
}

#[test]
fn a_deferred_call_is_answered_by_finish_and_abandon_answers_nothing() {
    for (nr, a) in [
        (HC_MORSEL_CREATE, [0x3000, 4, 4096, 0, 0, 0]),
        (HC_MORSEL_DESTROY, [0x3000, 4, 0, 0, 0, 0]),
        (HC_NVME_WRITE, [0x5000, 0, 0, 1, 0, 0]),
        (HC_EXMAP_ACTION, [0x8000_0000, 0x7000, 1, EXMAP_READ, 0, 0]),
    ] {
        let mut s = Fake::new();
        s.mode = Mode::Defer;
        let mut r = regs(nr, a);
        let before = r;
        let Action::Unlocked(work) = handle(&mut s, &mut r) else { panic!("{nr:#x} not deferred") };
        assert_eq!(r, before, "{nr:#x}: not answered before its end");
        // Ended with its guest there: answered with what `finish` says.
        let mut f = r;
        s.result = Ok(0x4000_0000);
        finish(&mut s, &mut f, work);
        if nr == HC_MORSEL_CREATE {
            // A create's end mounts: its status is the size, asked after the end (the fake
            // answers every service with its result, so the size is 0x4000_0000 too).
            assert!(s.calls().ends_with(&[Svc::Finish(1), Svc::MorselSize(0x4000_0000)]), "{:?}", s.calls());
            assert_eq!((f.rax, f.rdx), (0x4000_0000, 0x4000_0000));
        } else {
            assert_eq!(s.calls().last(), Some(&Svc::Finish(1)));
            assert_eq!((f.rax, f.rdx), (0, 0x4000_0000));
        }
        // A refused end is a refusal of that call.
        let Action::Unlocked(work) = handle(&mut s, &mut r) else { panic!("{nr:#x} not deferred") };
        let mut f = r;
        s.result = Err(Error::NoMemory);
        finish(&mut s, &mut f, work);
        assert_eq!(f.rax, Error::NoMemory as i64 as u64);
        assert_eq!(s.refusals.loud(), 1);
        // Its guest gone: what it holds goes back, nothing written anywhere.
        let Action::Unlocked(work) = handle(&mut s, &mut r) else { panic!("{nr:#x} not deferred") };
        let (calls, before) = (s.calls().len(), r);
        abandon::<FakeHost, _>(Answers { calls: &s.calls, result: Ok(9), reason: None }, work);
        assert_eq!(s.calls()[calls..], [Svc::Abandon(3)]);
        assert_eq!(r, before);
        assert_eq!(s.refusals.loud(), 1);
    }
}

/// The steps one deferred work went through, in order (`Svc::Run`, `Finish`, `Abandon`).
fn steps(calls: &[Svc], work: u32) -> Vec<Svc> {
    calls.iter().copied().filter(|c| matches!(c, Svc::Run(w) | Svc::Finish(w) | Svc::Abandon(w) if *w == work)).collect()
}

#[test]
fn a_deferred_work_runs_once_and_ends_once_by_finish_or_abandon() {
    // As the vCPU loop does it: the work runs with the world lock let go, then its guest is
    // there (`finish`) or gone (`abandon`).
    for gone in [false, true] {
        let mut s = Fake::new();
        s.mode = Mode::Defer;
        let mut r = regs(HC_EXMAP_ACTION, [0x8000_0000, 0x7000, 1, EXMAP_ALLOC, 0, 0]);
        let Action::Unlocked(mut work) = handle(&mut s, &mut r) else { panic!("not deferred") };
        assert_eq!(steps(&s.calls(), 1), [], "made, not run");
        work.run(&s.calls);
        match gone {
            false => finish(&mut s, &mut r, work),
            true => abandon::<FakeHost, _>(Answers { calls: &s.calls, result: Ok(0), reason: None }, work),
        }
        let end = if gone { Svc::Abandon(1) } else { Svc::Finish(1) };
        assert_eq!(steps(&s.calls(), 1), [Svc::Run(1), end], "gone: {gone}");
    }
    // `bench_frames`, the one call deferred in every case, likewise.
    let mut s = Fake::new();
    let mut r = regs(HC_BENCH_FRAMES, [BENCH_ORDER_4K, 4, 0, 0, 0, 0]);
    let Action::Unlocked(mut work) = handle(&mut s, &mut r) else { panic!("not deferred") };
    work.run(&s.calls);
    finish(&mut s, &mut r, work);
    assert_eq!(steps(&s.calls(), 1), [Svc::Run(1), Svc::Finish(1)]);
    assert_eq!((r.rax, r.rdx), (0, 7));
}

#[test]
fn bench_frames_without_bench_on_is_denied_and_nothing_runs() {
    let _log = Capture::start();
    let mut s = Fake::new();
    s.bench = false;
    let mut r = regs(HC_BENCH_FRAMES, [BENCH_ORDER_4K, 4, 0, 0, 0, 0]);
    assert!(matches!(handle(&mut s, &mut r), Action::Continue));
    assert_eq!((r.rax, r.rdx), (Error::Denied as i64 as u64, 0));
    assert_eq!(s.calls(), []);
    assert_eq!(s.refusals.loud(), 1);
    let lines = Capture::lines();
    assert_eq!(lines.len(), 1);
    let want = std::format!("bench_frames (0x50) refused ({}): the hypervisor runs without bench=on", Error::Denied);
    assert!(lines[0].1.ends_with(&want), "{lines:?}");
    // With bench=on it is deferred.
    let mut s = Fake::new();
    let mut r = regs(HC_BENCH_FRAMES, [BENCH_ORDER_4K, 4, 0, 0, 0, 0]);
    assert!(matches!(handle(&mut s, &mut r), Action::Unlocked(Work(1))));
    assert_eq!(s.calls(), [Svc::BenchFrames(false, 4)]);
}

#[test]
fn loudness_is_info_up_to_the_limit_with_one_note() {
    for n in 1..LOUD_FAILURES {
        assert_eq!(loudness(n), Loudness { level: log::Level::Info, note: false });
    }
    assert_eq!(loudness(LOUD_FAILURES), Loudness { level: log::Level::Info, note: true });
    for n in [LOUD_FAILURES + 1, LOUD_FAILURES + 2, u32::MAX] {
        assert_eq!(loudness(n), Loudness { level: log::Level::Debug, note: false });
    }
}

#[test]
fn the_eighth_loud_refusal_carries_the_one_note_and_later_ones_are_quiet() {
    let _log = Capture::start();
    let mut s = Fake::new();
    s.result = Err(Error::NotFound);
    s.reason = Some("no mount there");
    let n = LOUD_FAILURES as usize + 3;
    for _ in 0..n {
        let mut r = regs(HC_MORSEL_SIZE, [0x4000_0000, 0, 0, 0, 0, 0]);
        handle(&mut s, &mut r);
        assert_eq!(r.rax, Error::NotFound as i64 as u64);
    }
    let lines = Capture::lines();
    assert_eq!(lines.len(), n);
    for (i, (level, line)) in lines.iter().enumerate() {
        let nth = i as u32 + 1;
        assert_eq!(*level, if nth <= LOUD_FAILURES { log::Level::Info } else { log::Level::Debug }, "{line}");
        assert_eq!(line.contains(QUIET_NOTE), nth == LOUD_FAILURES, "{line}");
        let want = std::format!("guest 3 (fake): morsel_size (0x14) refused ({}): no mount there", Error::NotFound);
        assert!(line.starts_with(&want), "{line}");
    }
    assert_eq!(s.refusals.loud(), n as u32);
}

#[test]
fn expected_refusals_are_quiet_and_not_counted() {
    let _log = Capture::start();
    let mut s = Fake::new();
    s.result = Err(Error::NotFound);
    for _ in 0..LOUD_FAILURES + 2 {
        let mut r = regs(HC_MORSEL_OPEN, [0x3000, 4, 0, 0, 0, 0]);
        handle(&mut s, &mut r);
        assert_eq!(r.rax, Error::NotFound as i64 as u64);
    }
    s.result = Err(Error::NoReceiver);
    let mut r = regs(HC_NOTIFY, [0x9000, 1, 0, 0, 0, 0]);
    handle(&mut s, &mut r);
    assert_eq!(r.rax, Error::NoReceiver as i64 as u64);
    assert_eq!(s.refusals.loud(), 0);
    let lines = Capture::lines();
    assert_eq!(lines.len(), LOUD_FAILURES as usize + 3);
    assert!(lines.iter().all(|(l, line)| *l == log::Level::Debug && line.ends_with("as guests expect it to be")), "{lines:?}");
    // The same errors from other calls are mistakes.
    s.result = Err(Error::NotFound);
    handle(&mut s, &mut regs(HC_MORSEL_SIZE, [0; 6]));
    s.result = Err(Error::Denied);
    handle(&mut s, &mut regs(HC_MORSEL_OPEN, [0x3000, 4, 0, 0, 0, 0]));
    assert_eq!(s.refusals.loud(), 2);
}

#[test]
fn a_reason_is_logged_once_and_not_kept_for_the_next_call() {
    let _log = Capture::start();
    let mut s = Fake::new();
    s.result = Err(Error::Busy);
    s.reason = Some("the name is taken");
    handle(&mut s, &mut regs(HC_MORSEL_SIZE, [0; 6]));
    s.reason = None;
    handle(&mut s, &mut regs(HC_MORSEL_SIZE, [0; 6]));
    // A reason left by a call that then succeeded (a step recovered from) goes with it.
    let _ = s.refusals.refuse(Error::Busy, format_args!("stale"));
    s.result = Ok(1);
    handle(&mut s, &mut regs(HC_MORSEL_SIZE, [0; 6]));
    s.result = Err(Error::Busy);
    handle(&mut s, &mut regs(HC_MORSEL_SIZE, [0; 6]));
    let lines = Capture::lines();
    assert_eq!(lines.len(), 3);
    let busy = std::format!("refused ({})", Error::Busy);
    assert!(lines[0].1.ends_with(&(busy.clone() + ": the name is taken")), "{lines:?}");
    assert!(lines[1].1.ends_with(&busy), "{lines:?}");
    assert!(lines[2].1.ends_with(&busy), "{lines:?}");
}

#[test]
fn info_selectors_answer_from_their_source() {
    let _log = Capture::start();
    let local = [
        (INFO_ABI_VERSION, ABI_VERSION),
        (INFO_GUEST_ID, 3),
        (INFO_MEMORY_SIZE, 64 << 20),
        (INFO_GUEST_COUNT, 4),
        (INFO_LOG_LEVEL, log::LevelFilter::Trace as u64),
        (INFO_VCPU_INDEX, 1),
        (INFO_VCPU_COUNT, 2),
        (INFO_CPU_INDEX, 5),
        (INFO_TSC_PER_US, 2_000),
        (INFO_SLICE_US, 10_000),
    ];
    for (what, want) in local {
        assert_eq!(info_local(&FakeFacts, what), Some(want), "selector {what}");
        let mut s = Fake::new();
        let mut r = regs(HC_INFO, [what, 0, 0, 0, 0, 0]);
        handle(&mut s, &mut r);
        assert_eq!((r.rax, r.rdx), (0, want), "selector {what}");
        assert_eq!(s.calls(), [], "selector {what} needs no world");
    }
    for (what, svc, want) in [(INFO_EXITS, Svc::Exits, 100), (INFO_SLICES, Svc::Slices, 101), (INFO_INTERRUPTS, Svc::Interrupts, 102)] {
        assert_eq!(info_local(&FakeFacts, what), None, "selector {what} is the world's");
        let mut s = Fake::new();
        let mut r = regs(HC_INFO, [what, 0, 0, 0, 0, 0]);
        handle(&mut s, &mut r);
        assert_eq!((r.rax, r.rdx, s.calls()), (0, want, std::vec![svc]), "selector {what}");
    }
    let mut s = Fake::new();
    let mut r = regs(HC_INFO, [13, 0, 0, 0, 0, 0]);
    handle(&mut s, &mut r);
    assert_eq!(r.rax, Error::NoSuchCall as i64 as u64);
}

/// Keeps the log lines of target `vm` this thread writes between `start` and `lines` (tests
/// run on several threads; the logger is global, set once, at TRACE).
struct Capture;

std::thread_local! {
    static LINES: RefCell<Option<Vec<(log::Level, String)>>> = const { RefCell::new(None) };
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        if record.target() == "vm" {
            LINES.with(|l| {
                if let Some(v) = l.borrow_mut().as_mut() {
                    v.push((record.level(), record.args().to_string()));
                }
            });
        }
    }
    fn flush(&self) {}
}

impl Capture {
    fn start() -> Capture {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            log::set_logger(&Logger).expect("the only logger");
            log::set_max_level(log::LevelFilter::Trace);
        });
        LINES.with(|l| *l.borrow_mut() = Some(Vec::new()));
        Capture
    }

    fn lines() -> Vec<(log::Level, String)> {
        LINES.with(|l| l.borrow().clone().unwrap_or_default())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        LINES.with(|l| *l.borrow_mut() = None);
    }
}

/// The calls whose name is read and hashed before the world lock: open, create and ExMap
/// create, each with its own name argument (not decoded: a refused call never reaches the
/// handler that would use it); none for another call.
#[test]
fn the_names_read_ahead_are_those_of_open_and_the_creates() {
    let cases: &[(u64, [u64; 6], Option<abi::Name>)] = &[
        (HC_MORSEL_OPEN, [0x3000, 6, 1, 0, 0, 0], Some(name(0x3000, 6))),
        (HC_MORSEL_CREATE, [0x4000, 5, 4096, 0, 0, 0], Some(name(0x4000, 5))),
        (HC_EXMAP_CREATE, [0x5000, 9, 1 << 30, MORSEL_SHARE_WRITABLE, 0, 0], Some(name(0x5000, 9))),
        (HC_MORSEL_DESTROY, [0x3000, 7, 0, 0, 0, 0], Some(name(0x3000, 7))),
        (HC_NAME_WATCH, [0x3000, 10, 0b110, 0, 0, 0], Some(name(0x3000, 10))),
        (HC_DEVICE_MOUNT, [0x3000, 8, 0x18, 0x10_0000, 1, 0], Some(name(0x3000, 8))),
        // No name: an address, a number, nothing.
        (HC_MORSEL_UNMOUNT, [0x3000, 6, 0, 0, 0, 0], None),
        (HC_MORSEL_SIZE, [0x3000, 6, 0, 0, 0, 0], None),
        (HC_INFO, [0x3000, 6, 0, 0, 0, 0], None),
        // Not decoded here: the name of a call the decoder refuses is read (and not used).
        (HC_MORSEL_OPEN, [0x3000, 4, 2, 0, 0, 0], Some(name(0x3000, 4))),
        (HC_MORSEL_CREATE, [0x3000, MORSEL_NAME_MAX as u64 + 1, 4096, 0, 0, 0], Some(name(0x3000, MORSEL_NAME_MAX as u64 + 1))),
    ];
    for &(nr, a, want) in cases {
        assert_eq!(name_to_read(&regs(nr, a)), want, "call {nr} {a:x?}");
    }
    let hashed = crate::names::Keys::of([1, 2]).hash(crate::names::Name::new(b"abc").unwrap());
    let ahead = NameAhead { at: name(0x3000, 3), name: hashed };
    assert_eq!(NameAhead::for_call(Some(&ahead), name(0x3000, 3)), Some(hashed));
    assert_eq!(NameAhead::for_call(Some(&ahead), name(0x3000, 4)), None);
    assert_eq!(NameAhead::for_call(Some(&ahead), name(0x3001, 3)), None);
    assert_eq!(NameAhead::for_call(None, name(0x3000, 3)), None);
}
