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
    /// Hypercalls, faults and anything else.
    Other,
}

/// What to do with an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Enter the guest again, no lock taken: emulate CPUID first if `cpuid`, continue at
    /// `next_rip` if given.
    Resume { next_rip: Option<u64>, cpuid: bool },
    /// The slice ends, no lock taken (the next slice takes it): emulate CPUID first if
    /// `cpuid`, continue at `next_rip` if given; `preempt`: count a used slice (HLT, or the
    /// slice's time ran out across exits handled here). A `Preempted` exit counts itself.
    EndSlice { next_rip: Option<u64>, cpuid: bool, preempt: bool },
    /// Take the world lock and handle it there.
    World,
}

/// Decides where exit `seen` is handled (see the module doc).
pub fn classify(seen: Seen) -> Class {
    match seen.exit {
        Kind::Preempted => Class::EndSlice { next_rip: None, cpuid: false, preempt: false },
        Kind::Other | Kind::InterruptWindow | Kind::Halt { interrupts: false } => Class::World,
        _ if seen.attention || seen.timer_due => Class::World,
        Kind::Halt { interrupts: true } => match seen.next_rip {
            Some(rip) => Class::EndSlice { next_rip: Some(rip), cpuid: false, preempt: true },
            None => Class::World,
        },
        Kind::Cpuid => match (seen.next_rip, seen.slice_over) {
            (None, _) => Class::World,
            (Some(rip), false) => Class::Resume { next_rip: Some(rip), cpuid: true },
            (Some(rip), true) => Class::EndSlice { next_rip: Some(rip), cpuid: true, preempt: true },
        },
        Kind::Interrupt if seen.slice_over => Class::EndSlice { next_rip: None, cpuid: false, preempt: true },
        Kind::Interrupt => Class::Resume { next_rip: None, cpuid: false },
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
        assert_eq!(classify(seen(Kind::Cpuid)), Class::Resume { next_rip: Some(0x1002), cpuid: true });
    }

    #[test]
    fn cpuid_to_decode_goes_to_the_world() {
        assert_eq!(classify(Seen { next_rip: None, ..seen(Kind::Cpuid) }), Class::World);
        assert_eq!(classify(Seen { next_rip: None, ..seen(Kind::Halt { interrupts: true }) }), Class::World);
    }

    #[test]
    fn cpuid_at_the_end_of_the_slice_is_done_and_ends_it() {
        let s = Seen { slice_over: true, ..seen(Kind::Cpuid) };
        assert_eq!(classify(s), Class::EndSlice { next_rip: Some(0x1002), cpuid: true, preempt: true });
    }

    #[test]
    fn halt_with_interrupts_ends_the_slice_and_pays_for_it() {
        assert_eq!(classify(seen(Kind::Halt { interrupts: true })), Class::EndSlice { next_rip: Some(0x1002), cpuid: false, preempt: true });
    }

    #[test]
    fn halt_without_interrupts_stops_the_guest_in_the_world() {
        assert_eq!(classify(seen(Kind::Halt { interrupts: false })), Class::World);
    }

    #[test]
    fn preemption_ends_the_slice_counted_once() {
        assert_eq!(classify(seen(Kind::Preempted)), Class::EndSlice { next_rip: None, cpuid: false, preempt: false });
        // Even when another CPU asked to look: the next slice starts under the lock anyway.
        assert_eq!(classify(Seen { attention: true, ..seen(Kind::Preempted) }), Class::EndSlice { next_rip: None, cpuid: false, preempt: false });
    }

    #[test]
    fn an_interrupt_inside_the_slice_resumes() {
        assert_eq!(classify(seen(Kind::Interrupt)), Class::Resume { next_rip: None, cpuid: false });
        assert_eq!(classify(Seen { slice_over: true, ..seen(Kind::Interrupt) }), Class::EndSlice { next_rip: None, cpuid: false, preempt: true });
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
}
