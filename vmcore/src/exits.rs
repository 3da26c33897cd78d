//! Which VM exits need the world (the state guests share, behind the world lock) and which
//! the vCPU loop handles on its own CPU with no lock: `classify`, host-tested.
//!
//! Without a lock: CPUID (its result is the host's leaves, its next RIP known), HLT with
//! interrupts on (ends the slice), a preemption, an interrupt that needs nothing but a
//! flush. Everything that may wake, stop, inject or change what guests share goes to the
//! world: hypercalls, faults, HLT with interrupts off (stops the guest), the interrupt
//! window (an injection), any exit after another CPU asked this one to look (`attention`:
//! a kick of a stopped guest, a doorbell's wake-up) or once the vCPU's timer is due, and a
//! CPUID or HLT whose length must still be decoded from guest memory.
//!
//! Two hypercalls are handled without the lock too (from guest kernel mode, their next RIP
//! known, no attention asked): `info` for the selectors whose answer is fixed at guest
//! creation or an atomic (`info_is_local`), and `console_write` (its text copied from guest
//! RAM, whose frames are fixed at creation; the line buffer behind the small console lock).
//! The vCPU loop may still send such a call to the world when it cannot serve it there (a
//! text outside guest RAM, arguments the decoder refuses): the world answers every call.

/// What the vCPU loop knows about an exit, before it takes any lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub exit: Kind,
    /// The next RIP, where the CPU reported it or it was decoded before at this RIP.
    pub next_rip: Option<u64>,
    /// Another CPU sent this one an IPI that asks it to look at shared state.
    pub attention: bool,
    /// The vCPU's one-shot timer is due.
    pub timer_due: bool,
    /// The slice's deadline passed.
    pub slice_over: bool,
}

/// The exits `classify` tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cpuid,
    /// HLT; `interrupts`: the guest's RFLAGS.IF.
    Halt { interrupts: bool },
    Preempted,
    Interrupt,
    InterruptWindow,
    /// A hypercall: its number (rax) and first argument (rdi); `user`: made from guest user
    /// mode (CPL > 0), which the world refuses.
    Hypercall { nr: u64, arg: u64, user: bool },
    /// Faults and anything else.
    Other,
}

/// What the vCPU loop does before it enters the guest again, no lock taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    Nothing,
    /// Emulate CPUID (the host's leaves).
    Cpuid,
    /// Answer `info(what)` from the vCPU's and its guest's fixed state.
    Info { what: u64 },
    /// Copy a `console_write` text from guest RAM into the vCPU's line buffer.
    Console,
}

/// Whether `info(what)` is answered from state fixed at guest creation (or an atomic), so
/// without the world lock; exit and interrupt counts and unknown selectors need the world.
pub fn info_is_local(what: u64) -> bool {
    matches!(
        what,
        abi::INFO_ABI_VERSION
            | abi::INFO_GUEST_ID
            | abi::INFO_MEMORY_SIZE
            | abi::INFO_GUEST_COUNT
            | abi::INFO_LOG_LEVEL
            | abi::INFO_VCPU_INDEX
            | abi::INFO_VCPU_COUNT
            | abi::INFO_CPU_INDEX
            | abi::INFO_TSC_PER_US
            | abi::INFO_SLICE_US
    )
}

/// What to do with an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Enter the guest again, no lock taken: do `work` first, continue at `next_rip` if
    /// given.
    Resume { next_rip: Option<u64>, work: Work },
    /// The slice ends, no lock taken (the next slice takes it): do `work` first, continue at
    /// `next_rip` if given; `preempt`: count a used slice (HLT, or the slice's time ran out
    /// across exits handled here). A `Preempted` exit counts itself.
    EndSlice { next_rip: Option<u64>, work: Work, preempt: bool },
    /// Take the world lock and handle it there.
    World,
}

/// Decides where exit `seen` is handled (see the module doc).
pub fn classify(seen: Seen) -> Class {
    match seen.exit {
        Kind::Preempted => Class::EndSlice { next_rip: None, work: Work::Nothing, preempt: false },
        Kind::Other | Kind::InterruptWindow | Kind::Halt { interrupts: false } => Class::World,
        _ if seen.attention || seen.timer_due => Class::World,
        Kind::Halt { interrupts: true } => match seen.next_rip {
            Some(rip) => Class::EndSlice { next_rip: Some(rip), work: Work::Nothing, preempt: true },
            None => Class::World,
        },
        Kind::Cpuid => emulate(seen, Work::Cpuid),
        Kind::Hypercall { user: true, .. } => Class::World,
        Kind::Hypercall { nr: abi::HC_INFO, arg: what, .. } if info_is_local(what) => emulate(seen, Work::Info { what }),
        Kind::Hypercall { nr: abi::HC_CONSOLE_WRITE, .. } => emulate(seen, Work::Console),
        Kind::Hypercall { .. } => Class::World,
        Kind::Interrupt if seen.slice_over => Class::EndSlice { next_rip: None, work: Work::Nothing, preempt: true },
        Kind::Interrupt => Class::Resume { next_rip: None, work: Work::Nothing },
    }
}

/// An instruction emulated here: needs its next RIP; ends the slice if it is over.
fn emulate(seen: Seen, work: Work) -> Class {
    match (seen.next_rip, seen.slice_over) {
        (None, _) => Class::World,
        (Some(rip), false) => Class::Resume { next_rip: Some(rip), work },
        (Some(rip), true) => Class::EndSlice { next_rip: Some(rip), work, preempt: true },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(exit: Kind) -> Seen {
        Seen { exit, next_rip: Some(0x1002), attention: false, timer_due: false, slice_over: false }
    }

    #[test]
    fn cpuid_with_known_length_takes_no_lock() {
        assert_eq!(classify(seen(Kind::Cpuid)), Class::Resume { next_rip: Some(0x1002), work: Work::Cpuid });
    }

    #[test]
    fn cpuid_to_decode_goes_to_the_world() {
        assert_eq!(classify(Seen { next_rip: None, ..seen(Kind::Cpuid) }), Class::World);
        assert_eq!(classify(Seen { next_rip: None, ..seen(Kind::Halt { interrupts: true }) }), Class::World);
    }

    #[test]
    fn cpuid_at_the_end_of_the_slice_is_done_and_ends_it() {
        let s = Seen { slice_over: true, ..seen(Kind::Cpuid) };
        assert_eq!(classify(s), Class::EndSlice { next_rip: Some(0x1002), work: Work::Cpuid, preempt: true });
    }

    #[test]
    fn halt_with_interrupts_ends_the_slice_and_pays_for_it() {
        assert_eq!(classify(seen(Kind::Halt { interrupts: true })), Class::EndSlice { next_rip: Some(0x1002), work: Work::Nothing, preempt: true });
    }

    #[test]
    fn halt_without_interrupts_stops_the_guest_in_the_world() {
        assert_eq!(classify(seen(Kind::Halt { interrupts: false })), Class::World);
    }

    #[test]
    fn preemption_ends_the_slice_counted_once() {
        assert_eq!(classify(seen(Kind::Preempted)), Class::EndSlice { next_rip: None, work: Work::Nothing, preempt: false });
        // Even when another CPU asked to look: the next slice starts under the lock anyway.
        assert_eq!(classify(Seen { attention: true, ..seen(Kind::Preempted) }), Class::EndSlice { next_rip: None, work: Work::Nothing, preempt: false });
    }

    #[test]
    fn an_interrupt_inside_the_slice_resumes() {
        assert_eq!(classify(seen(Kind::Interrupt)), Class::Resume { next_rip: None, work: Work::Nothing });
        assert_eq!(classify(Seen { slice_over: true, ..seen(Kind::Interrupt) }), Class::EndSlice { next_rip: None, work: Work::Nothing, preempt: true });
    }

    #[test]
    fn attention_or_a_due_timer_sends_every_lockless_exit_to_the_world() {
        for exit in [Kind::Cpuid, Kind::Halt { interrupts: true }, Kind::Interrupt] {
            assert_eq!(classify(Seen { attention: true, ..seen(exit) }), Class::World, "{exit:?}");
            assert_eq!(classify(Seen { timer_due: true, ..seen(exit) }), Class::World, "{exit:?}");
        }
    }

    #[test]
    fn hypercalls_faults_and_windows_go_to_the_world() {
        for exit in [Kind::Other, Kind::InterruptWindow] {
            assert_eq!(classify(seen(exit)), Class::World);
        }
    }

    fn call(nr: u64, arg: u64) -> Kind {
        Kind::Hypercall { nr, arg, user: false }
    }

    #[test]
    fn info_of_fixed_state_takes_no_lock() {
        for what in [abi::INFO_ABI_VERSION, abi::INFO_GUEST_ID, abi::INFO_MEMORY_SIZE, abi::INFO_GUEST_COUNT, abi::INFO_LOG_LEVEL,
            abi::INFO_VCPU_INDEX, abi::INFO_VCPU_COUNT, abi::INFO_CPU_INDEX, abi::INFO_TSC_PER_US, abi::INFO_SLICE_US] {
            assert_eq!(classify(seen(call(abi::HC_INFO, what))), Class::Resume { next_rip: Some(0x1002), work: Work::Info { what } }, "{what}");
        }
    }

    #[test]
    fn info_of_shared_counters_or_unknown_selectors_goes_to_the_world() {
        for what in [abi::INFO_EXITS, abi::INFO_SLICES, abi::INFO_INTERRUPTS, 13, u64::MAX] {
            assert_eq!(classify(seen(call(abi::HC_INFO, what))), Class::World, "{what}");
        }
    }

    #[test]
    fn console_write_takes_no_lock() {
        assert_eq!(classify(seen(call(abi::HC_CONSOLE_WRITE, 0x2000))), Class::Resume { next_rip: Some(0x1002), work: Work::Console });
    }

    #[test]
    fn a_lockless_call_at_the_end_of_the_slice_is_done_and_ends_it() {
        let s = Seen { slice_over: true, ..seen(call(abi::HC_INFO, abi::INFO_GUEST_ID)) };
        assert_eq!(classify(s), Class::EndSlice { next_rip: Some(0x1002), work: Work::Info { what: abi::INFO_GUEST_ID }, preempt: true });
    }

    #[test]
    fn lockless_calls_go_to_the_world_when_asked_undecoded_or_from_user_mode() {
        for k in [call(abi::HC_INFO, abi::INFO_GUEST_ID), call(abi::HC_CONSOLE_WRITE, 0x2000)] {
            assert_eq!(classify(Seen { attention: true, ..seen(k) }), Class::World);
            assert_eq!(classify(Seen { timer_due: true, ..seen(k) }), Class::World);
            assert_eq!(classify(Seen { next_rip: None, ..seen(k) }), Class::World);
            let Kind::Hypercall { nr, arg, .. } = k else { unreachable!() };
            assert_eq!(classify(seen(Kind::Hypercall { nr, arg, user: true })), Class::World);
        }
    }

    #[test]
    fn every_other_hypercall_goes_to_the_world() {
        for nr in [abi::HC_EXIT, abi::HC_YIELD, abi::HC_MORSEL_CREATE, abi::HC_MORSEL_OPEN, abi::HC_WAIT, abi::HC_NOTIFY, 0x7777] {
            assert_eq!(classify(seen(call(nr, abi::INFO_GUEST_ID))), Class::World, "{nr:#x}");
        }
    }
}
