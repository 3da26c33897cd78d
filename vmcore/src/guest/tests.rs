//! A guest's life without hardware: its spec's checks, its vCPUs' ends, the report's verdict,
//! its RAM's fixed frames.

use super::*;
use crate::memory::tests::machine;
use morsel::{Npt, Perm};
use std::vec;
use std::vec::Vec;

fn spec(memory: u64, vcpus: u32, expect: Expect) -> GuestSpec {
    GuestSpec { name: "g", memory, max_slices: None, arg: 0, expect, vcpus, cpu: None }
}

fn end(index: u32, state: State) -> VcpuSummary {
    VcpuSummary { index, cpu: index as usize, state, exits: [index as u64; ExitKind::COUNT] }
}

#[test]
fn memory_sizes_and_the_images_room() {
    for ok in [4 * MIB, 6 * MIB, 512 * GIB] {
        assert_eq!(check_memory(ok), Ok(()), "{ok:#x}");
    }
    for bad in [0, 2 * MIB, 5 * MIB, 4 * MIB + 4096, 512 * GIB + 2 * MIB, u64::MAX] {
        assert_eq!(check_memory(bad), Err(bad), "{bad:#x}");
    }
    let r = abi::VCPU_STACK_RESERVE;
    assert_eq!(image_limit(&spec(64 * MIB, 2, Expect::Code(0))), 64 * MIB - 2 * r);
    assert_eq!(image_limit(&spec(64 * MIB, 0, Expect::Code(0))), 64 * MIB - r, "no vCPUs count as one");
    assert_eq!(image_limit(&spec(r, 4, Expect::Code(0))), 0, "never below zero");
}

#[test]
fn the_guest_ends_with_vcpu_0s_code_unless_another_failed_first() {
    // (ends in order, the guest's final state)
    let cases: &[(&[(u32, State)], State)] = &[
        (&[(0, State::Exited(3)), (1, State::Exited(0))], State::Exited(3)),
        (&[(1, State::Exited(0)), (0, State::Exited(3))], State::Exited(3)),
        (&[(1, State::Exited(5)), (0, State::Exited(0))], State::Exited(5)),
        (&[(1, State::Exited(5)), (2, State::Exited(7)), (0, State::Exited(9))], State::Exited(5)),
        (&[(0, State::Exited(0)), (1, State::Exited(0))], State::Exited(0)),
        (&[(0, State::Stopped), (1, State::Exited(0))], State::Exited(0)),
    ];
    for (ends, want) in cases {
        let mut e = Ends::try_new(ends.len() as u32).unwrap();
        let mut state = State::Runnable;
        for (k, &(i, s)) in ends.iter().enumerate() {
            let last = e.vcpu_ended(&mut state, end(i, s));
            assert_eq!(last, k + 1 == ends.len(), "{ends:?}: end {k}");
            if !last {
                assert_eq!(state, State::Runnable, "{ends:?}: runnable until the last end");
            }
        }
        assert_eq!(state, *want, "{ends:?}");
        assert_eq!(e.ended.iter().map(|v| v.index).collect::<Vec<_>>(), ends.iter().map(|e| e.0).collect::<Vec<_>>());
    }
}

#[test]
fn a_stopped_guest_stays_stopped_and_an_end_never_allocates() {
    let mut e = Ends::try_new(2).unwrap();
    let cap = e.ended.capacity();
    let mut state = State::Stopped;
    assert!(!e.vcpu_ended(&mut state, end(0, State::Exited(0))));
    assert!(e.vcpu_ended(&mut state, end(1, State::Stopped)));
    assert_eq!(state, State::Stopped, "stopped by the hypervisor: the codes do not undo it");
    // An end past the vCPUs it was made for (never sent) is not recorded, and takes no room.
    assert!(e.vcpu_ended(&mut state, end(2, State::Exited(1))));
    assert_eq!((e.ended.len(), e.ended.capacity(), e.live), (2, cap, 0));
}

#[test]
fn the_report_says_whether_a_guest_ended_as_expected() {
    let cases = [
        (Expect::Code(0), State::Exited(0), true),
        (Expect::Code(0), State::Exited(1), false),
        (Expect::Code(-2), State::Exited(-2), true),
        (Expect::Code(0), State::Stopped, false),
        (Expect::Stopped, State::Stopped, true),
        (Expect::Stopped, State::Exited(0), false),
        (Expect::Code(0), State::Runnable, false),
    ];
    for (expect, state, want) in cases {
        let s = Summary { id: 0, spec: spec(4 * MIB, 1, expect), state, exits: [0; ExitKind::COUNT], vcpus: vec![] };
        assert_eq!(s.as_expected(), want, "{expect:?} {state:?}");
    }
}

#[test]
fn ram_frames_give_pieces_of_guest_ram_only() {
    let m = machine();
    let mut mem = GuestMemory::<Npt, _>::new(&m.sim, m).unwrap();
    mem.map_ram(6 * MIB, &m.sim).unwrap();
    let ram = RamFrames::record(&mem, 6 * MIB).unwrap();
    let hpa = |gpa: u64| mem.translate(GuestPhysAddr::new(gpa), Perm::RO).unwrap().0;
    // A range across two frame boundaries: three pieces, each where the table says.
    let mut got = Vec::new();
    assert_eq!(ram.pieces(2 * MIB - 10, 2 * MIB as usize + 20, |h, n, done| got.push((h, n, done))), Some(()));
    assert_eq!(got, vec![(hpa(2 * MIB - 10), 10, 0), (hpa(2 * MIB), 2 * MIB as usize, 10), (hpa(4 * MIB), 10, 2 * MIB as usize + 10)]);
    // Up to the last byte of RAM, not one past it; nothing is done for a refused range.
    assert_eq!(ram.pieces(6 * MIB - 8, 8, |_, _, _| {}), Some(()));
    for (gpa, len) in [(6 * MIB - 8, 9), (6 * MIB, 1), (u64::MAX - 2, 8), (0, usize::MAX)] {
        let mut calls = 0;
        assert_eq!(ram.pieces(gpa, len, |_, _, _| calls += 1), None, "{gpa:#x}+{len}");
        assert_eq!(calls, 0, "{gpa:#x}+{len}: refused before any piece");
    }
    let mut calls = 0;
    assert_eq!(ram.pieces(MIB, 0, |_, _, _| calls += 1), Some(()));
    assert_eq!(calls, 0, "an empty range has no pieces");
    assert!(RamFrames::record(&mem, 8 * MIB).is_err(), "RAM that is not mapped is not recorded");
    mem.release(&m.sim).unwrap();
}
