//! Synthetic exits against a fake vCPU (`Fake`: registers, CPUID leaves, the lock-free
//! calls) and a fake guest (`FakeGuest`: 4-level page tables and code in a byte array, its
//! counters, and a log of the stop / kick / report hooks in the order they were called).

use super::*;
use alloc::vec;
use alloc::vec::Vec;

/// Guest-virtual address of the fake guest's code: two pages mapped (`CODE_GPA`), the page
/// after them not.
const CODE: u64 = 0x40_0000;
const CODE_GPA: u64 = 0x5000;
const CR3: u64 = 0x1000;
const PRESENT: u64 = 1;

/// What a fake guest's hooks were asked to do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Stop,
    Kick,
    Report(Stop),
}

struct FakeGuest {
    mem: Vec<u8>,
    exits: [u64; ExitKind::COUNT],
    max_slices: Option<u64>,
    events: Vec<Event>,
}

impl FakeGuest {
    /// PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000: `CODE` and the page after it at
    /// `CODE_GPA` and the next page; the third page not present.
    fn new() -> Self {
        let mut g = FakeGuest { mem: vec![0; 0x7000], exits: [0; ExitKind::COUNT], max_slices: None, events: Vec::new() };
        g.entry(0x1000, 0, 0x2000 | PRESENT);
        g.entry(0x2000, 0, 0x3000 | PRESENT);
        g.entry(0x3000, (CODE >> 21) & 0x1ff, 0x4000 | PRESENT);
        g.entry(0x4000, 0, CODE_GPA | PRESENT);
        g.entry(0x4000, 1, (CODE_GPA + 0x1000) | PRESENT);
        g
    }

    fn entry(&mut self, table: u64, index: u64, value: u64) {
        let at = (table + index * 8) as usize;
        self.mem[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// Puts `bytes` at guest-virtual `va` (in the two mapped code pages).
    fn code(&mut self, va: u64, bytes: &[u8]) {
        let at = (CODE_GPA + (va - CODE)) as usize;
        self.mem[at..at + bytes.len()].copy_from_slice(bytes);
    }
}

impl Guest for FakeGuest {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let at = usize::try_from(gpa).ok()?;
        let bytes = self.mem.get(at..at.checked_add(8)?)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(src) = usize::try_from(gpa).ok().and_then(|at| self.mem.get(at..at.checked_add(buf.len())?)) else { return false };
        buf.copy_from_slice(src);
        true
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        leaves(leaf, subleaf)
    }

    fn exits(&mut self) -> &mut [u64; ExitKind::COUNT] {
        &mut self.exits
    }

    fn max_slices(&self) -> Option<u64> {
        self.max_slices
    }

    fn stop(&mut self) {
        self.events.push(Event::Stop);
    }

    fn kick_siblings(&mut self) {
        self.events.push(Event::Kick);
    }

    fn report(&mut self, why: &Stop) {
        self.events.push(Event::Report(*why));
    }
}

/// The fake host's CPUID: every leaf distinct, so a test sees which one was answered.
fn leaves(leaf: u32, subleaf: u32) -> [u32; 4] {
    [leaf ^ 0xa0, subleaf ^ 0xb0, 0xc0, 0xd0]
}

/// A vCPU with its lock-free calls: `info` answers `info_answer`, `console` accepts or not.
struct Fake {
    regs: Regs,
    info_answer: Option<u64>,
    console_ok: bool,
    /// What `signals` answers.
    signals: Signals,
    consoles: Vec<abi::GuestSlice>,
}

impl Fake {
    fn at(rip: u64) -> Self {
        Fake { regs: Regs { rip, ..Regs::default() }, info_answer: Some(0x77), console_ok: true, signals: QUIET, consoles: Vec::new() }
    }
}

impl Local for Fake {
    fn regs(&mut self) -> &mut Regs {
        &mut self.regs
    }

    fn signals(&mut self) -> Signals {
        self.signals
    }

    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        leaves(leaf, subleaf)
    }

    fn info(&mut self, _what: u64) -> Option<u64> {
        self.info_answer
    }

    fn console(&mut self, text: abi::GuestSlice) -> Option<u64> {
        self.consoles.push(text);
        self.console_ok.then_some(text.len)
    }
}

const QUIET: Signals = Signals { attention: false, timer_due: false, slice_over: false };

/// Registers of a CPUID exit for leaf 7, subleaf 1 at `rip`.
fn cpuid_regs(rip: u64) -> Regs {
    Regs { rax: 7, rcx: 1, rip, ..Regs::default() }
}

/// A hypercall handler that must not run.
fn no_call(_: &mut FakeGuest, _: &mut Regs) -> Call {
    panic!("the hypercall handler ran")
}

fn assert_cpuid_answered(regs: &Regs) {
    let [a, b, c, d] = leaves(7, 1);
    assert_eq!((regs.rax, regs.rbx, regs.rcx, regs.rdx), (a as u64, b as u64, c as u64, d as u64));
}

#[test]
fn cpuid_with_the_cpus_next_rip_answers_the_leaves_and_advances() {
    // Lock-free.
    let mut v = Fake::at(CODE);
    v.regs = cpuid_regs(CODE);
    let mut core = Core::new();
    assert_eq!(lockless(&mut v, &mut core, &Exit::Cpuid { resume: Resume::At(CODE + 2) }), Step::Resume);
    assert_cpuid_answered(&v.regs);
    assert_eq!(v.regs.rip, CODE + 2);
    // Under the world lock (where attention sent it).
    let mut g = FakeGuest::new();
    let mut regs = cpuid_regs(CODE);
    let h = handle(&mut g, &mut core, &mut regs, None, Exit::Cpuid { resume: Resume::At(CODE + 2) }, no_call);
    assert_eq!(h, Handled::GoOn);
    assert_cpuid_answered(&regs);
    assert_eq!(regs.rip, CODE + 2);
    assert!(g.events.is_empty());
}

#[test]
fn cpuid_decoded_from_guest_memory_answers_and_advances_past_the_prefixes() {
    let mut g = FakeGuest::new();
    // cs: operand-size, REX.W, CPUID: 5 bytes.
    g.code(CODE + 0x10, &[0x2e, 0x66, 0x48, 0x0f, 0xa2, 0x90]);
    let mut regs = cpuid_regs(CODE + 0x10);
    let mut core = Core::new();
    let h = handle(&mut g, &mut core, &mut regs, Some(CR3), Exit::Cpuid { resume: Resume::Decode }, no_call);
    assert_eq!(h, Handled::GoOn);
    assert_cpuid_answered(&regs);
    assert_eq!(regs.rip, CODE + 0x15);
    assert!(g.events.is_empty());
    // Lock-free, the CPU not saying the length: the world must decode it.
    let mut v = Fake::at(CODE + 0x40);
    assert_eq!(lockless(&mut v, &mut Core::new(), &Exit::Cpuid { resume: Resume::Decode }), Step::World { quiet: true });
    assert_eq!(v.regs, Regs { rip: CODE + 0x40, ..Regs::default() });
}

#[test]
fn an_instruction_that_is_not_the_one_that_exited_stops_the_guest() {
    let mut g = FakeGuest::new();
    g.code(CODE, &[0x0f, 0x0b]); // UD2, not CPUID
    let mut regs = cpuid_regs(CODE);
    let h = handle(&mut g, &mut Core::new(), &mut regs, Some(CR3), Exit::Cpuid { resume: Resume::Decode }, no_call);
    assert_eq!(h, Handled::EndSlice);
    assert_eq!(regs, cpuid_regs(CODE), "nothing answered, RIP unchanged");
    let mut bytes = [0u8; decode::MAX_INSTRUCTION];
    bytes[..2].copy_from_slice(&[0x0f, 0x0b]);
    assert_eq!(g.events, [Event::Report(Stop::Undecodable { rip: CODE, bytes, got: 15 }), Event::Stop]);
}

#[test]
fn an_unreadable_instruction_stops_the_guest() {
    // Two bytes of a VMMCALL at the end of the second code page; the page after is not mapped.
    let mut g = FakeGuest::new();
    let rip = CODE + 0x1ffe;
    g.code(rip, &[0x0f, 0x01]);
    let mut regs = Regs { rip, ..Regs::default() };
    let h = handle(&mut g, &mut Core::new(), &mut regs, Some(CR3), Exit::Hypercall { resume: Resume::Decode, cpl: 0 }, no_call);
    assert_eq!(h, Handled::EndSlice);
    assert_eq!(regs.rip, rip);
    let mut bytes = [0u8; decode::MAX_INSTRUCTION];
    bytes[..2].copy_from_slice(&[0x0f, 0x01]);
    assert_eq!(g.events, [Event::Report(Stop::Undecodable { rip, bytes, got: 2 }), Event::Stop]);
    // No 4-level paging (no CR3): nothing readable.
    let mut g = FakeGuest::new();
    let mut regs = Regs { rip: CODE, ..Regs::default() };
    let h = handle(&mut g, &mut Core::new(), &mut regs, None, Exit::Halt { resume: Resume::Decode, interrupts: true }, no_call);
    assert_eq!(h, Handled::EndSlice);
    assert_eq!(regs.rip, CODE);
    let bytes = [0u8; decode::MAX_INSTRUCTION];
    assert_eq!(g.events, [Event::Report(Stop::Undecodable { rip: CODE, bytes, got: 0 }), Event::Stop]);
    assert_eq!(g.exits[ExitKind::Preempted as usize], 0, "a stopped HLT is no used slice");
}

#[test]
fn halt_with_interrupts_off_stops_the_guest() {
    let exit = Exit::Halt { resume: Resume::At(CODE + 1), interrupts: false };
    let mut v = Fake::at(CODE);
    assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::World { quiet: true });
    let mut g = FakeGuest::new();
    let mut regs = Regs { rip: CODE, ..Regs::default() };
    assert_eq!(handle(&mut g, &mut Core::new(), &mut regs, None, exit, no_call), Handled::EndSlice);
    assert_eq!(regs.rip, CODE);
    assert_eq!(g.events, [Event::Report(Stop::HaltWithInterruptsOff { rip: CODE }), Event::Stop]);
}

#[test]
fn halt_with_interrupts_on_ends_the_slice_and_counts_a_preemption() {
    // Lock-free: counted in the vCPU's core, folded into the guest later.
    let exit = Exit::Halt { resume: Resume::At(CODE + 1), interrupts: true };
    let mut v = Fake::at(CODE);
    let mut core = Core::new();
    assert_eq!(lockless(&mut v, &mut core, &exit), Step::EndSlice);
    assert_eq!(v.regs.rip, CODE + 1);
    assert_eq!(core.exits[ExitKind::Preempted as usize], 1);
    let mut guest = [0; ExitKind::COUNT];
    assert_eq!(core.fold(&mut guest), 1);
    assert_eq!(guest[ExitKind::Preempted as usize], 1);
    assert_eq!(core.unfolded, [0; ExitKind::COUNT]);
    // Under the world lock, decoded (`f3 f4`: a prefixed HLT): counted in the guest at once.
    let mut g = FakeGuest::new();
    g.code(CODE, &[0xf3, 0xf4]);
    let mut core = Core::new();
    let mut regs = Regs { rip: CODE, ..Regs::default() };
    let exit = Exit::Halt { resume: Resume::Decode, interrupts: true };
    assert_eq!(handle(&mut g, &mut core, &mut regs, Some(CR3), exit, no_call), Handled::EndSlice);
    assert_eq!(regs.rip, CODE + 2);
    assert_eq!(core.exits[ExitKind::Preempted as usize], 1);
    assert_eq!(g.exits[ExitKind::Preempted as usize], 1);
    assert!(g.events.is_empty());
}

#[test]
fn the_slice_budget_stops_the_guest() {
    let mut g = FakeGuest { max_slices: Some(3), ..FakeGuest::new() };
    let mut regs = Regs { rip: CODE, ..Regs::default() };
    // Two slices used (a preemption is folded into the guest before `handle`): goes on.
    g.exits[ExitKind::Preempted as usize] = 2;
    assert_eq!(handle(&mut g, &mut Core::new(), &mut regs, None, Exit::Preempted, no_call), Handled::EndSlice);
    assert!(g.events.is_empty());
    // A HLT pays for the third: stopped.
    let exit = Exit::Halt { resume: Resume::At(CODE + 1), interrupts: true };
    assert_eq!(handle(&mut g, &mut Core::new(), &mut regs, None, exit, no_call), Handled::EndSlice);
    assert_eq!(g.events, [Event::Report(Stop::Budget { slices: 3, rip: CODE + 1 }), Event::Stop]);
    // A preemption at the budget stops it too.
    let mut g = FakeGuest { max_slices: Some(3), ..FakeGuest::new() };
    g.exits[ExitKind::Preempted as usize] = 3;
    assert_eq!(handle(&mut g, &mut Core::new(), &mut regs, None, Exit::Preempted, no_call), Handled::EndSlice);
    assert_eq!(g.events, [Event::Report(Stop::Budget { slices: 3, rip: CODE + 1 }), Event::Stop]);
    // No budget: never.
    let mut g = FakeGuest::new();
    g.exits[ExitKind::Preempted as usize] = 1_000_000;
    check_budget(&mut g, CODE);
    assert!(g.events.is_empty());
}

#[test]
fn a_hypercall_from_user_mode_gets_denied_and_goes_on() {
    let mut g = FakeGuest::new();
    let mut regs = Regs { rax: abi::HC_EXIT, rdx: 5, rip: CODE, ..Regs::default() };
    let exit = Exit::Hypercall { resume: Resume::At(CODE + 3), cpl: 3 };
    assert_eq!(handle(&mut g, &mut Core::new(), &mut regs, None, exit, no_call), Handled::GoOn);
    assert_eq!((regs.rax, regs.rdx, regs.rip), (abi::Error::Denied as i64 as u64, 0, CODE + 3));
    assert!(g.events.is_empty());
    // Never lock-free, even `info`.
    let mut v = Fake::at(CODE);
    v.regs.rax = abi::HC_INFO;
    v.regs.rdi = abi::INFO_GUEST_ID;
    assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::World { quiet: true });
    assert_eq!(v.regs.rip, CODE);
}

/// Runs a kernel-mode hypercall at `CODE` (next RIP `CODE + 3`) whose handler answers
/// `answer`; returns what `handle` said, the registers after, and the RIP the handler saw.
fn call_answering(answer: Call) -> (Handled, Regs, u64) {
    let mut g = FakeGuest::new();
    let mut regs = Regs { rax: 0x42, rip: CODE, ..Regs::default() };
    let mut seen = 0;
    let exit = Exit::Hypercall { resume: Resume::At(CODE + 3), cpl: 0 };
    let h = handle(&mut g, &mut Core::new(), &mut regs, None, exit, |_, r| {
        seen = r.rip;
        r.rdx = 9;
        answer
    });
    assert!(g.events.is_empty());
    (h, regs, seen)
}

#[test]
fn a_hypercall_runs_its_handler_after_the_call() {
    let (h, regs, seen) = call_answering(Call::Continue);
    assert_eq!((h, regs.rip, seen, regs.rdx), (Handled::GoOn, CODE + 3, CODE + 3, 9));
    let (h, regs, _) = call_answering(Call::Unlocked);
    assert_eq!((h, regs.rip), (Handled::GoOn, CODE + 3));
    let (h, regs, _) = call_answering(Call::Yield);
    assert_eq!((h, regs.rip), (Handled::EndSlice, CODE + 3));
}

#[test]
fn a_retried_hypercall_leaves_rip_at_the_call() {
    let (h, regs, seen) = call_answering(Call::Retry);
    assert_eq!((h, regs.rip, seen), (Handled::GoOn, CODE, CODE + 3));
}

#[test]
fn an_exit_call_ends_the_vcpu_with_its_code() {
    let (h, _, _) = call_answering(Call::Exit(-7));
    assert_eq!(h, Handled::Exit(-7));
}

#[test]
fn a_decoded_hypercall_runs_past_its_prefixes() {
    let mut g = FakeGuest::new();
    g.code(CODE, &[0x66, 0x0f, 0x01, 0xd9]);
    let mut regs = Regs { rip: CODE, ..Regs::default() };
    let exit = Exit::Hypercall { resume: Resume::Decode, cpl: 0 };
    assert_eq!(handle(&mut g, &mut Core::new(), &mut regs, Some(CR3), exit, |_, _| Call::Continue), Handled::GoOn);
    assert_eq!(regs.rip, CODE + 4);
}

#[test]
fn a_fault_stops_the_guest_and_kicks_its_siblings_first() {
    let faults = [
        Exit::SecondLevelFault { gpa: 0x1234_5000, write: true, fetch: false, present: false },
        Exit::Exception { vector: 14, error_code: 2, address: 0xdead_0000 },
        Exit::Exception { vector: 6, error_code: 0, address: 0 },
        Exit::TripleFault,
        Exit::Io { port: 0x3f8, write: true },
        Exit::Msr { msr: 0xc000_0080, write: false },
        Exit::Forbidden { code: 18 },
        Exit::EntryFailed { code: 33, qualification: 0 },
        Exit::Other { code: 0x999 },
        Exit::HostStateLost { code: 0x81, host_rip: 0xffff_8000_0010_0000 },
    ];
    for exit in faults {
        let mut v = Fake::at(CODE);
        assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::World { quiet: true }, "{exit:?}");
        let mut g = FakeGuest::new();
        let mut regs = Regs { rip: CODE, ..Regs::default() };
        assert_eq!(handle(&mut g, &mut Core::new(), &mut regs, Some(CR3), exit, no_call), Handled::EndSlice, "{exit:?}");
        assert_eq!(regs, Regs { rip: CODE, ..Regs::default() }, "{exit:?}");
        assert_eq!(g.events, [Event::Stop, Event::Kick, Event::Report(Stop::Fault { exit, rip: CODE })], "{exit:?}");
    }
}

#[test]
fn interrupts_and_windows_go_on() {
    for exit in [Exit::Interrupt, Exit::InterruptWindow] {
        let mut g = FakeGuest::new();
        let mut regs = Regs { rip: CODE, ..Regs::default() };
        assert_eq!(handle(&mut g, &mut Core::new(), &mut regs, None, exit, no_call), Handled::GoOn);
        assert_eq!(regs.rip, CODE);
        assert!(g.events.is_empty());
    }
    let mut v = Fake::at(CODE);
    assert_eq!(lockless(&mut v, &mut Core::new(), &Exit::Interrupt), Step::Resume);
    let mut core = Core::new();
    let over = Signals { slice_over: true, ..QUIET };
    v.signals = over;
    assert_eq!(lockless(&mut v, &mut core, &Exit::Interrupt), Step::EndSlice);
    assert_eq!(core.exits[ExitKind::Preempted as usize], 1, "an interrupt past the slice's end is a used slice");
    v.signals = QUIET;
    assert_eq!(lockless(&mut v, &mut Core::new(), &Exit::InterruptWindow), Step::World { quiet: true });
}

/// A vCPU's core after the world decoded `66 0f a2` (a CPUID of 3 bytes) at `CODE + 8`.
fn core_with_a_decoded_cpuid() -> Core {
    let mut g = FakeGuest::new();
    g.code(CODE + 8, &[0x66, 0x0f, 0xa2]);
    let mut core = Core::new();
    let mut regs = cpuid_regs(CODE + 8);
    handle(&mut g, &mut core, &mut regs, Some(CR3), Exit::Cpuid { resume: Resume::Decode }, no_call);
    assert_eq!(regs.rip, CODE + 11);
    core
}

#[test]
fn the_decoded_length_is_used_at_the_same_rip() {
    let mut core = core_with_a_decoded_cpuid();
    // The same CPUID again (a loop): lock-free, no guest memory read.
    let mut v = Fake::at(CODE + 8);
    v.regs = cpuid_regs(CODE + 8);
    assert_eq!(lockless(&mut v, &mut core, &Exit::Cpuid { resume: Resume::Decode }), Step::Resume);
    assert_cpuid_answered(&v.regs);
    assert_eq!(v.regs.rip, CODE + 11);
}

#[test]
fn the_decoded_length_is_not_used_at_another_rip() {
    let mut core = core_with_a_decoded_cpuid();
    // Another RIP: the world decodes it.
    let mut v = Fake::at(CODE + 0x20);
    assert_eq!(lockless(&mut v, &mut core, &Exit::Cpuid { resume: Resume::Decode }), Step::World { quiet: true });
    assert_eq!(v.regs, Regs { rip: CODE + 0x20, ..Regs::default() });
    // Nor for another instruction at the same RIP.
    let mut v = Fake::at(CODE + 8);
    let hlt = Exit::Halt { resume: Resume::Decode, interrupts: true };
    assert_eq!(lockless(&mut v, &mut core, &hlt), Step::World { quiet: true });
    assert_eq!(core.known_next(CODE + 8, &Resume::Decode, Opcode::Hypercall), None);
    assert_eq!(core.known_next(CODE + 8, &Resume::Decode, Opcode::Cpuid), Some(CODE + 11));
    // The CPU's next RIP is used as it is.
    assert_eq!(core.known_next(CODE, &Resume::At(CODE + 5), Opcode::Hlt), Some(CODE + 5));
}

fn info_call(v: &mut Fake, what: u64) {
    v.regs.rax = abi::HC_INFO;
    v.regs.rdi = what;
}

#[test]
fn info_of_fixed_state_is_answered_lock_free() {
    let exit = Exit::Hypercall { resume: Resume::At(CODE + 3), cpl: 0 };
    let mut v = Fake::at(CODE);
    info_call(&mut v, abi::INFO_GUEST_ID);
    let mut core = Core::new();
    assert_eq!(lockless(&mut v, &mut core, &exit), Step::Resume);
    assert_eq!((v.regs.rax, v.regs.rdx, v.regs.rip), (0, 0x77, CODE + 3));
    // At the end of the slice: answered, and the slice ends as a used one.
    let mut v = Fake::at(CODE);
    info_call(&mut v, abi::INFO_GUEST_ID);
    v.signals = Signals { slice_over: true, ..QUIET };
    assert_eq!(lockless(&mut v, &mut core, &exit), Step::EndSlice);
    assert_eq!((v.regs.rdx, v.regs.rip), (0x77, CODE + 3));
    assert_eq!(core.unfolded[ExitKind::Preempted as usize], 1);
}

#[test]
fn info_falls_back_to_the_world_unchanged() {
    let exit = Exit::Hypercall { resume: Resume::At(CODE + 3), cpl: 0 };
    // The vCPU cannot answer: the world does, nothing changed.
    let mut v = Fake::at(CODE);
    v.info_answer = None;
    info_call(&mut v, abi::INFO_GUEST_ID);
    let before = v.regs;
    assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::World { quiet: false });
    assert_eq!(v.regs, before);
    // Counters that live in the world.
    let mut v = Fake::at(CODE);
    info_call(&mut v, abi::INFO_EXITS);
    assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::World { quiet: true });
    // Another CPU asked this one to look: not quiet.
    let mut v = Fake::at(CODE);
    info_call(&mut v, abi::INFO_GUEST_ID);
    let before = v.regs;
    v.signals = Signals { attention: true, ..QUIET };
    assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::World { quiet: false });
    v.signals = Signals { timer_due: true, ..QUIET };
    assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::World { quiet: false });
    assert_eq!(v.regs, before);
}

fn console_call(v: &mut Fake, ptr: u64, len: u64) {
    v.regs.rax = abi::HC_CONSOLE_WRITE;
    v.regs.rdi = ptr;
    v.regs.rsi = len;
}

#[test]
fn console_write_is_done_lock_free_or_by_the_world() {
    let exit = Exit::Hypercall { resume: Resume::At(CODE + 3), cpl: 0 };
    let mut v = Fake::at(CODE);
    console_call(&mut v, 0x8000, 12);
    assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::Resume);
    assert_eq!(v.consoles, [abi::GuestSlice { ptr: 0x8000, len: 12 }]);
    assert_eq!((v.regs.rax, v.regs.rdx, v.regs.rip), (0, 12, CODE + 3));
    // Outside guest RAM (the vCPU could not copy it): the world answers.
    let mut v = Fake::at(CODE);
    v.console_ok = false;
    console_call(&mut v, 0x8000, 12);
    let before = v.regs;
    assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::World { quiet: false });
    assert_eq!(v.regs, before);
    // Arguments the decoder refuses (longer than CONSOLE_MAX): the world answers.
    let mut v = Fake::at(CODE);
    console_call(&mut v, 0x8000, abi::CONSOLE_MAX + 1);
    assert_eq!(lockless(&mut v, &mut Core::new(), &exit), Step::World { quiet: false });
    assert!(v.consoles.is_empty());
}

#[test]
fn a_preemption_ends_the_slice_and_counts_once() {
    let mut v = Fake::at(CODE);
    let mut core = Core::new();
    core.count(&Exit::Preempted);
    assert_eq!(lockless(&mut v, &mut core, &Exit::Preempted), Step::EndSlice);
    assert_eq!(core.exits[ExitKind::Preempted as usize], 1);
    assert_eq!(core.unfolded[ExitKind::Preempted as usize], 1);
}

#[test]
fn cpuid_at_the_end_of_the_slice_is_answered_and_pays_for_it() {
    let mut v = Fake::at(CODE);
    v.regs = cpuid_regs(CODE);
    let mut core = Core::new();
    let over = Signals { slice_over: true, ..QUIET };
    v.signals = over;
    assert_eq!(lockless(&mut v, &mut core, &Exit::Cpuid { resume: Resume::At(CODE + 2) }), Step::EndSlice);
    assert_cpuid_answered(&v.regs);
    assert_eq!(v.regs.rip, CODE + 2);
    assert_eq!(core.exits[ExitKind::Preempted as usize], 1);
}

#[test]
fn the_decoded_lengths_of_four_sites_are_kept() {
    // A guest's loop of calls at four sites (`morsel_open` and `morsel_unmount` in two
    // places): each decoded once by the world, then known at every site; a fifth site
    // replaces the oldest only.
    let mut g = FakeGuest::new();
    let mut core = Core::new();
    let sites = [CODE + 8, CODE + 0x20, CODE + 0x40, CODE + 0x60, CODE + 0x80];
    for &at in &sites {
        g.code(at, &[0x66, 0x0f, 0xa2]);
    }
    for &at in &sites[..4] {
        let mut regs = cpuid_regs(at);
        handle(&mut g, &mut core, &mut regs, Some(CR3), Exit::Cpuid { resume: Resume::Decode }, no_call);
    }
    for &at in &sites[..4] {
        assert_eq!(core.known_next(at, &Resume::Decode, Opcode::Cpuid), Some(at + 3));
    }
    // Decoded again at a known site: kept in its place, nothing else goes.
    let mut regs = cpuid_regs(sites[0]);
    handle(&mut g, &mut core, &mut regs, Some(CR3), Exit::Cpuid { resume: Resume::Decode }, no_call);
    assert!(sites[..4].iter().all(|&at| core.known_next(at, &Resume::Decode, Opcode::Cpuid).is_some()));
    let mut regs = cpuid_regs(sites[4]);
    handle(&mut g, &mut core, &mut regs, Some(CR3), Exit::Cpuid { resume: Resume::Decode }, no_call);
    assert_eq!(core.known_next(sites[4], &Resume::Decode, Opcode::Cpuid), Some(sites[4] + 3));
    let known = sites[..4].iter().filter(|&&at| core.known_next(at, &Resume::Decode, Opcode::Cpuid).is_some()).count();
    assert_eq!(known, 3);
}
