//! A vCPU's exits, handled without hardware: the exit enum both backends translate into
//! (`Exit`, `Resume`, `ExitKind`, and the registers `Regs` the world switches save), and one
//! arm per exit, generic over what the arms need from the vCPU and its guest. The vCPU loop
//! (`hypervisor/src/vm/sched.rs`) enters the guest, then hands the exit here: `lockless` with
//! no lock (what `exits::classify` allows), else `handle` under the world lock. Host-tested
//! with synthetic exits against a fake vCPU and guest (`tests.rs`), as Firecracker tests its
//! `handle_kvm_exit`.
//!
//! What the arms need: from the vCPU without a lock (`Local`) its registers, the host's CPUID
//! leaves and the two calls answered there (`info` of fixed state, `console_write`); from the
//! guest under the world lock (`Guest`) its memory (to decode an instruction whose length the
//! CPU did not report), its exit counters and slice budget, and the hooks that stop it, kick
//! its other vCPUs and report why. The hypercall itself is a callback (`handle`'s `call`),
//! which answers with a `Call`.
//!
//! # Mutations the tests catch
//! Broken by hand once each, the tests below failed, and the code was restored:
//! - CPUID's RIP not advanced in `handle`'s CPUID arm (`regs.rip = next_rip` removed):
//!   `cpuid_with_the_cpus_next_rip_answers_the_leaves_and_advances`,
//!   `cpuid_decoded_from_guest_memory_answers_and_advances_past_the_prefixes` and
//!   `the_decoded_length_is_used_at_the_same_rip` failed.
//! - HLT with IF=0 not stopping the guest (its `report` and `stop` removed):
//!   `halt_with_interrupts_off_stops_the_guest` failed.
//! - The decoded-length cache keyed without the RIP (`d.rip == rip` dropped in
//!   `Core::known_next`): `the_decoded_length_is_not_used_at_another_rip` failed.
//! - A hypercall's `Retry` leaving RIP after the call (`regs.rip = at` removed):
//!   `a_retried_hypercall_leaves_rip_at_the_call` failed.

use crate::exits;
use formats::decode;

#[cfg(test)]
mod tests;

/// Guest general registers as the world switches save and load them. `rsp` and `rip`
/// live in the VMCB/VMCS; backends copy them in and out around a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rsp: u64,
    pub rip: u64,
}

/// Where the guest goes on after an instruction the hypervisor emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The CPU reported the next RIP (VMX exit instruction length, SVM next-RIP save).
    At(u64),
    /// The CPU did not say (SVM without next-RIP save): the instruction at RIP is decoded
    /// from guest memory (`formats::decode`), prefixes included.
    Decode,
}

/// Why a guest stopped running, in vendor-neutral terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// VMCALL / VMMCALL from privilege level `cpl`.
    Hypercall { resume: Resume, cpl: u8 },
    /// CPUID (VMX exits on it unconditionally); emulated.
    Cpuid { resume: Resume },
    /// HLT; `interrupts` is the guest's RFLAGS.IF (with IF = 0 it could never wake).
    Halt { resume: Resume, interrupts: bool },
    /// The time slice ended (VMX preemption timer; the scheduler also turns an `Interrupt`
    /// that the slice timer caused, or that came at or after the slice's end, into this).
    Preempted,
    /// A physical interrupt made the guest leave (SVM INTR intercept, VMX external-interrupt
    /// exiting): the host's handler has run. An IPI (a shootdown, a wake-up, a kick) before
    /// the slice's end resumes the same vCPU (`vm/sched.rs`).
    Interrupt,
    /// An access the second-level table does not allow.
    SecondLevelFault { gpa: u64, write: bool, fetch: bool, present: bool },
    /// A guest exception (all are intercepted: guests have no IDT). `address`: for #PF the
    /// faulting linear address, which the guest's CR2 would have held; 0 for other vectors.
    Exception { vector: u8, error_code: u32, address: u64 },
    /// Triple fault / shutdown.
    TripleFault,
    /// Port I/O (not allowed for guests).
    Io { port: u16, write: bool },
    /// MSR access (not allowed for guests).
    Msr { msr: u32, write: bool },
    /// An instruction the guest may not use (VMX/SVM instructions, INVD, ...).
    Forbidden { code: u64 },
    /// VM entry failed: the backend's state is inconsistent (a hypervisor bug).
    EntryFailed { code: u64, qualification: u64 },
    /// The guest can take an interrupt now (VMX interrupt-window exiting, SVM VINTR): asked
    /// for with `Backend::interrupt_window` while a virtual interrupt waits for RFLAGS.IF.
    InterruptWindow,
    /// Any other exit, with the raw vendor code.
    Other { code: u64 },
    /// The exit came back with the host's own state where the guest's belongs (`code`: the
    /// vendor's exit code it carried, `host_rip`: the RIP it held, the host's), again after
    /// every re-entry from the state saved before it: the emulator's (or the hypervisor's)
    /// fault, never the guest's (`svm::leaked_host_state`).
    HostStateLost { code: u64, host_rip: u64 },
}

impl Exit {
    /// Short name for the per-guest exit statistics.
    #[inline]
    pub fn kind(&self) -> ExitKind {
        match self {
            Exit::Hypercall { .. } => ExitKind::Hypercall,
            Exit::Cpuid { .. } => ExitKind::Cpuid,
            Exit::Halt { .. } => ExitKind::Halt,
            Exit::Preempted => ExitKind::Preempted,
            Exit::Interrupt => ExitKind::Interrupt,
            Exit::SecondLevelFault { .. } => ExitKind::SecondLevelFault,
            Exit::Exception { .. } => ExitKind::Exception,
            Exit::TripleFault => ExitKind::TripleFault,
            Exit::Io { .. } | Exit::Msr { .. } | Exit::Forbidden { .. } => ExitKind::Forbidden,
            Exit::InterruptWindow => ExitKind::InterruptWindow,
            Exit::EntryFailed { .. } | Exit::Other { .. } | Exit::HostStateLost { .. } => ExitKind::Other,
        }
    }
}

/// Exit classes counted per guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum ExitKind {
    Hypercall,
    Cpuid,
    Halt,
    Preempted,
    SecondLevelFault,
    Exception,
    TripleFault,
    Forbidden,
    InterruptWindow,
    Interrupt,
    Other,
}

impl ExitKind {
    pub const COUNT: usize = 11;
    pub const ALL: [ExitKind; Self::COUNT] = [
        ExitKind::Hypercall,
        ExitKind::Cpuid,
        ExitKind::Halt,
        ExitKind::Preempted,
        ExitKind::SecondLevelFault,
        ExitKind::Exception,
        ExitKind::TripleFault,
        ExitKind::Forbidden,
        ExitKind::InterruptWindow,
        ExitKind::Interrupt,
        ExitKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Hypercall => "hypercall",
            ExitKind::Cpuid => "cpuid",
            ExitKind::Halt => "hlt",
            ExitKind::Preempted => "preempted",
            ExitKind::SecondLevelFault => "second-level-fault",
            ExitKind::Exception => "exception",
            ExitKind::TripleFault => "triple-fault",
            ExitKind::Forbidden => "forbidden",
            ExitKind::InterruptWindow => "interrupt-window",
            ExitKind::Interrupt => "interrupt",
            ExitKind::Other => "other",
        }
    }
}

/// A hypercall's status and value into the guest's registers: rax 0 and the value in rdx,
/// or the error's negative number in rax and 0 in rdx.
#[inline]
pub fn answer(regs: &mut Regs, result: Result<u64, abi::Error>) {
    match result {
        Ok(v) => {
            regs.rax = 0;
            regs.rdx = v;
        }
        Err(e) => {
            regs.rax = e as i64 as u64;
            regs.rdx = 0;
        }
    }
}

/// CPUID's answer (`leaves`: eax, ebx, ecx, edx of the host's leaf) into the registers.
#[inline]
fn answer_cpuid(regs: &mut Regs, leaves: [u32; 4]) {
    let [a, b, c, d] = leaves;
    (regs.rax, regs.rbx, regs.rcx, regs.rdx) = (a as u64, b as u64, c as u64, d as u64);
}

/// The hypercall instruction whose length is decoded where the CPU does not report it
/// (only SVM lacks next-RIP save; VMCALL is `0f 01 c1`).
const VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];
const CPUID: [u8; 2] = [0x0f, 0xa2];
const HLT: [u8; 1] = [0xf4];

/// The instructions whose length `Core` remembers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Cpuid,
    Hlt,
    /// VMMCALL (SVM): a hypercall's next RIP, kept for `info` and `console_write`.
    Hypercall,
}

/// An instruction whose length was decoded from guest memory (SVM without next-RIP save),
/// kept per vCPU so that the next exit at the same RIP needs no guest memory, hence no lock.
/// The CPU's exit says the instruction there is the same (a CPUID exit is a CPUID); only
/// its prefixes could differ if the guest rewrote them, which misleads that guest alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decoded {
    rip: u64,
    next: u64,
    opcode: Opcode,
}

/// The hardware-free part of a vCPU's slot: its exit counts and its decoded-length cache.
#[derive(Clone, Debug)]
pub struct Core {
    /// Every exit of this vCPU, by kind (its summary at the end).
    pub exits: [u64; ExitKind::COUNT],
    /// Exits counted here and not yet added to the guest's counters (`fold`).
    pub unfolded: [u64; ExitKind::COUNT],
    /// The last `DECODED` instruction lengths decoded from guest memory (a guest's loop of
    /// `morsel_open` and `morsel_unmount` exits at several call sites), the oldest replaced.
    decoded: [Option<Decoded>; DECODED],
    /// Where the next decoded length goes in `decoded`.
    decoded_at: u8,
}

/// Entries of `Core`'s decoded-length cache.
const DECODED: usize = 4;

impl Default for Core {
    fn default() -> Self {
        Self::new()
    }
}

impl Core {
    #[inline]
    pub const fn new() -> Self {
        Core { exits: [0; ExitKind::COUNT], unfolded: [0; ExitKind::COUNT], decoded: [None; DECODED], decoded_at: 0 }
    }

    /// Counts `exit` (here and for the guest's next `fold`).
    #[inline]
    pub fn count(&mut self, exit: &Exit) {
        self.count_kind(exit.kind());
    }

    #[inline]
    fn count_kind(&mut self, kind: ExitKind) {
        self.exits[kind as usize] += 1;
        self.unfolded[kind as usize] += 1;
    }

    /// Adds the counts not yet folded to the guest's `into`; returns the slices among them.
    #[inline]
    pub fn fold(&mut self, into: &mut [u64; ExitKind::COUNT]) -> u64 {
        let slices = self.unfolded[ExitKind::Preempted as usize];
        for (g, u) in into.iter_mut().zip(self.unfolded.iter_mut()) {
            *g += core::mem::take(u);
        }
        slices
    }

    /// Keeps `d` in the decoded-length cache: in place of an entry for the same RIP and
    /// instruction, else of the oldest.
    fn remember(&mut self, d: Decoded) {
        if let Some(e) = self.decoded.iter_mut().find(|e| e.is_some_and(|e| e.rip == d.rip && e.opcode == d.opcode)) {
            *e = Some(d);
            return;
        }
        let i = self.decoded_at as usize % DECODED;
        self.decoded[i] = Some(d);
        self.decoded_at = ((i + 1) % DECODED) as u8;
    }

    /// The RIP after the instruction `opcode` at `rip`: the CPU's (`Resume::At`), or the one
    /// decoded earlier at the same RIP for the same instruction; None: not known without
    /// reading guest memory.
    #[inline]
    pub fn known_next(&self, rip: u64, resume: &Resume, opcode: Opcode) -> Option<u64> {
        match *resume {
            Resume::At(next) => Some(next),
            Resume::Decode => self.decoded.iter().flatten().find(|d| d.rip == rip && d.opcode == opcode).map(|d| d.next),
        }
    }
}

/// What the vCPU loop knows, no lock taken, besides the exit (the inputs of `classify`):
/// `Local::signals`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    /// Another CPU sent this one an IPI that asks it to look at shared state (taken).
    pub attention: bool,
    /// The vCPU's one-shot timer is due.
    pub timer_due: bool,
    /// The slice's deadline passed.
    pub slice_over: bool,
}

/// What the lock-free arms need from the vCPU (between runs) and its guest's fixed state.
pub trait Local {
    fn regs(&mut self) -> &mut Regs;
    /// What the vCPU loop knows besides the exit, taken once per exit after the exit was
    /// looked at (taking it clears the attention flag).
    fn signals(&mut self) -> Signals;
    /// The host's CPUID leaf `leaf`, `subleaf` (eax, ebx, ecx, edx): what the guest sees.
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// `info(what)` answered from fixed state, or None: the world answers it.
    fn info(&mut self, what: u64) -> Option<u64>;
    /// `console_write(text)` done without the lock (its length), or None (nothing done): the
    /// world answers it.
    fn console(&mut self, text: abi::GuestSlice) -> Option<u64>;
}

/// What `lockless` decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Resume,
    EndSlice,
    /// The world handles the exit; `quiet`: nothing asked this CPU to look (the IPI flag it
    /// took was clear), the vCPU's timer is not due and its slice not over, so an ExMap
    /// ALLOC / FREE may still go without the world lock (`exmap_fast`).
    World { quiet: bool },
}

/// Handles `exit` with no lock where it touches nothing another vCPU or guest can see
/// (`exits::classify` decides): CPUID, HLT with IF=1, preemptions, interrupts, `info` of fixed
/// state and `console_write`. The counts stay in `core` (`fold` adds them to the guest at
/// the next lock). Nothing is changed where the world must handle the exit.
#[inline]
pub fn lockless<L: Local>(v: &mut L, core: &mut Core, exit: &Exit) -> Step {
    let rip = v.regs().rip;
    let known = |resume: &Resume, opcode: Opcode| core.known_next(rip, resume, opcode);
    let (kind, next_rip) = match exit {
        Exit::Cpuid { resume } => (exits::Kind::Cpuid, known(resume, Opcode::Cpuid)),
        Exit::Halt { resume, interrupts } => (exits::Kind::Halt { interrupts: *interrupts }, known(resume, Opcode::Hlt)),
        Exit::Preempted => (exits::Kind::Preempted, None),
        Exit::Interrupt => (exits::Kind::Interrupt, None),
        Exit::InterruptWindow => (exits::Kind::InterruptWindow, None),
        Exit::Hypercall { resume, cpl } => {
            let regs = v.regs();
            (exits::Kind::Hypercall { nr: regs.rax, arg: regs.rdi, user: *cpl != 0 }, known(resume, Opcode::Hypercall))
        }
        _ => (exits::Kind::Other, None),
    };
    // After the exit's match, not before: the vCPU loop's match on the exit (its count)
    // and this one then compile to one jump per exit kind (with the signals taken first
    // Bochs counted 3 more ticks per CPUID exit, `cargo xtask bench exits`).
    let Signals { attention, timer_due, slice_over } = v.signals();
    let class = exits::classify(exits::Seen { exit: kind, next_rip, attention, timer_due, slice_over });
    let (next_rip, work, step, preempt) = match class {
        exits::Class::World => return Step::World { quiet: !attention && !timer_due && !slice_over },
        exits::Class::Resume { next_rip, work } => (next_rip, work, Step::Resume, false),
        exits::Class::EndSlice { next_rip, work, preempt } => (next_rip, work, Step::EndSlice, preempt),
    };
    match work {
        exits::Work::Nothing => {}
        exits::Work::Cpuid => {
            // CPUID has no side effects; the guest sees the host's leaves.
            let regs = v.regs();
            let (leaf, subleaf) = (regs.rax as u32, regs.rcx as u32);
            let leaves = v.cpuid(leaf, subleaf);
            answer_cpuid(v.regs(), leaves);
        }
        // Nothing was changed before these decide they can answer: otherwise the world
        // handles the exit from the start.
        exits::Work::Info { what } => match v.info(what) {
            Some(n) => answer(v.regs(), Ok(n)),
            None => return Step::World { quiet: false },
        },
        exits::Work::Console => {
            let regs = v.regs();
            let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
            let done = match abi::Call::decode(regs.rax, args) {
                Ok(abi::Call::ConsoleWrite { text }) => v.console(text),
                _ => None,
            };
            match done {
                Some(n) => answer(v.regs(), Ok(n)),
                None => return Step::World { quiet: false },
            }
        }
    }
    if preempt {
        // HLT, or the slice ran out across exits handled here: a used slice.
        core.count_kind(ExitKind::Preempted);
    }
    if let Some(next) = next_rip {
        v.regs().rip = next;
    }
    step
}

/// Why `handle` stops a guest (what its `report` prints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// HLT with RFLAGS.IF = 0: no interrupt would ever wake it.
    HaltWithInterruptsOff { rip: u64 },
    /// The instruction at `rip` could not be read or is not the one that exited; `bytes`:
    /// the first `got` of it that were readable.
    Undecodable { rip: u64, bytes: [u8; decode::MAX_INSTRUCTION], got: usize },
    /// It used its budget of `slices` time slices.
    Budget { slices: u64, rip: u64 },
    /// A fault or an exit no guest may cause (second-level fault, exception, triple fault,
    /// forbidden I/O, MSR or instruction, failed entry, lost host state, unknown exits).
    Fault { exit: Exit, rip: u64 },
}

/// What a hypercall's handler (`handle`'s `call`) decided, as the vCPU loop sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Answered: the guest goes on after the call.
    Continue,
    /// Answered; the slice ends.
    Yield,
    /// The call cannot start now: the guest executes it again (RIP left at it).
    Retry,
    /// A part runs with the world lock let go (the handler kept it): goes on after it.
    Unlocked,
    /// The vCPU exits with this code.
    Exit(i32),
}

/// What `handle` decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// The vCPU goes on in this slice.
    GoOn,
    /// The slice ends (the guest may have been stopped: its state says).
    EndSlice,
    /// The vCPU ended with this code.
    Exit(i32),
}

/// What the arms under the world lock need from the vCPU's guest.
pub trait Guest {
    /// The 8 bytes at guest-physical `gpa` (a page-table entry), or None outside its memory.
    fn read_u64(&self, gpa: u64) -> Option<u64>;
    /// Guest-physical `gpa..gpa + buf.len()` into `buf`; false (and `buf` unspecified) where
    /// any of it is outside its memory.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;
    /// The host's CPUID leaf `leaf`, `subleaf` (eax, ebx, ecx, edx): what the guest sees.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// The guest's exit counters (its `preempted` count is its used slices).
    fn exits(&mut self) -> &mut [u64; ExitKind::COUNT];
    /// Its budget of time slices, if it has one.
    fn max_slices(&self) -> Option<u64>;
    /// Marks it stopped.
    fn stop(&mut self);
    /// Makes its vCPUs on other CPUs leave guest mode and look (an IPI to each).
    fn kick_siblings(&mut self);
    /// Prints why it stopped (its console flushed first).
    fn report(&mut self, why: &Stop);
}

/// Handles an exit the world must (`lockless` said so), the world lock held: hypercalls
/// (`call` runs the handler on the registers, RIP already after the call), faults, and
/// the exits that may have to wake, stop or inject. `cr3`: the guest's, if it runs with
/// 4-level paging (what decoding an instruction at RIP needs).
#[inline]
pub fn handle<G: Guest>(g: &mut G, core: &mut Core, regs: &mut Regs, cr3: Option<u64>, exit: Exit,
    call: impl FnOnce(&mut G, &mut Regs) -> Call) -> Handled {
    match exit {
        Exit::Hypercall { resume, cpl } => {
            let Some(next_rip) = resume_at(g, core, regs, cr3, resume, Opcode::Hypercall) else { return Handled::EndSlice };
            let at = regs.rip;
            regs.rip = next_rip;
            if cpl != 0 {
                answer(regs, Err(abi::Error::Denied));
                return Handled::GoOn;
            }
            match call(g, regs) {
                Call::Continue | Call::Unlocked => Handled::GoOn,
                Call::Yield => Handled::EndSlice,
                // The guest executes the call again, the world lock let go.
                Call::Retry => {
                    regs.rip = at;
                    Handled::GoOn
                }
                Call::Exit(code) => Handled::Exit(code),
            }
        }
        Exit::Cpuid { resume } => match resume_at(g, core, regs, cr3, resume, Opcode::Cpuid) {
            None => Handled::EndSlice,
            Some(next_rip) => {
                // CPUID has no side effects; the guest sees the host's leaves.
                answer_cpuid(regs, g.cpuid(regs.rax as u32, regs.rcx as u32));
                regs.rip = next_rip;
                Handled::GoOn
            }
        },
        Exit::Halt { interrupts: false, .. } => {
            // No interrupt is ever delivered to it: on hardware it would halt forever.
            g.report(&Stop::HaltWithInterruptsOff { rip: regs.rip });
            g.stop();
            Handled::EndSlice
        }
        Exit::Halt { resume, interrupts: true } => {
            // A yield that still pays for its slice: halting in a loop uses the budget.
            if let Some(next_rip) = resume_at(g, core, regs, cr3, resume, Opcode::Hlt) {
                regs.rip = next_rip;
                core.exits[ExitKind::Preempted as usize] += 1;
                end_slice(g, regs.rip);
            }
            Handled::EndSlice
        }
        Exit::Preempted => {
            check_budget(g, regs.rip);
            Handled::EndSlice
        }
        // notify hook: the guest can take its interrupt now; the next entry injects it.
        Exit::InterruptWindow => Handled::GoOn,
        // An IPI inside the slice: its work (a flush, a pending virtual interrupt, a stop)
        // is done before the next entry (`prepare`); the deadline check there bounds how
        // long IPIs can keep a vCPU going.
        Exit::Interrupt => Handled::GoOn,
        other => {
            // Stopped and the siblings kicked before the report is printed: a line takes
            // milliseconds on a slow UART (Bochs), and a sibling's ExMap batch ending with no
            // world lock (`Batch::finish_alone`) sees the stop only through the kick.
            g.stop();
            g.kick_siblings();
            g.report(&Stop::Fault { exit: other, rip: regs.rip });
            Handled::EndSlice
        }
    }
}

/// Ends the slice of a guest that used it up without a timer exit (hypercall or CPUID loops,
/// HLT): counted as a preemption, so `slices=N` sees it.
pub fn end_slice<G: Guest>(g: &mut G, rip: u64) {
    g.exits()[ExitKind::Preempted as usize] += 1;
    check_budget(g, rip);
}

/// Stops the guest once it has used its budget of slices.
pub fn check_budget<G: Guest>(g: &mut G, rip: u64) {
    let slices = g.exits()[ExitKind::Preempted as usize];
    if g.max_slices().is_some_and(|max| slices >= max) {
        g.report(&Stop::Budget { slices, rip });
        g.stop();
    }
}

/// Where the guest continues after the instruction `opcode` at its RIP: what the CPU said,
/// or the length decoded from guest memory (remembered in `core` for the next exit there).
/// A guest whose instruction cannot be read or is not the one that exited is stopped (None).
fn resume_at<G: Guest>(g: &mut G, core: &mut Core, regs: &Regs, cr3: Option<u64>, resume: Resume, opcode: Opcode) -> Option<u64> {
    let next = match resume {
        Resume::At(rip) => return Some(rip),
        Resume::Decode => decode_next(g, regs.rip, cr3, opcode)?,
    };
    core.remember(Decoded { rip: regs.rip, next, opcode });
    Some(next)
}

/// The RIP after the instruction `opcode` at `rip`, decoded from guest memory through the
/// guest's page tables at `cr3`; None (the guest stopped, reported) where it cannot be.
fn decode_next<G: Guest>(g: &mut G, rip: u64, cr3: Option<u64>, opcode: Opcode) -> Option<u64> {
    let mut bytes = [0u8; decode::MAX_INSTRUCTION];
    let mut got = 0;
    if let Some(cr3) = cr3 {
        let guest = &*g;
        while got < bytes.len() {
            let va = rip.wrapping_add(got as u64);
            let Some(gpa) = decode::translate(cr3, va, |gpa| guest.read_u64(gpa)) else { break };
            if !guest.read(gpa, &mut bytes[got..got + 1]) {
                break;
            }
            got += 1;
        }
    }
    let opcode: &[u8] = match opcode {
        Opcode::Cpuid => &CPUID,
        Opcode::Hlt => &HLT,
        Opcode::Hypercall => &VMMCALL,
    };
    if let Some(len) = decode::length_of(&bytes[..got], opcode) {
        return Some(rip.wrapping_add(len as u64));
    }
    g.report(&Stop::Undecodable { rip, bytes, got });
    g.stop();
    None
}
