//! The loader over a simulated machine: what a guest finds in its RAM at its first
//! instruction (segments, boot information, page tables), and RAM that does not fit.

use super::*;
use crate::memory::tests::{machine, Backed};
use morsel::Npt;
use std::boxed::Box;
use std::vec;
use std::vec::Vec;

const MIB: u64 = 1 << 20;

/// A minimal ELF64 executable with `(vaddr, file bytes, memsz, flags)` segments.
fn elf(entry: u64, segs: &[(u64, &[u8], u64, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; 64 + 56 * segs.len()];
    d[..4].copy_from_slice(b"\x7fELF");
    d[4] = 2; // 64-bit
    d[5] = 1; // little-endian
    d[16..18].copy_from_slice(&2u16.to_le_bytes()); // executable
    d[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    d[24..32].copy_from_slice(&entry.to_le_bytes());
    d[32..40].copy_from_slice(&64u64.to_le_bytes());
    d[54..56].copy_from_slice(&56u16.to_le_bytes());
    d[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
    for (i, &(vaddr, file, memsz, flags)) in segs.iter().enumerate() {
        let off = d.len() as u64;
        d.extend_from_slice(file);
        let ph = 64 + 56 * i;
        d[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        d[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
        d[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
        d[ph + 16..ph + 24].copy_from_slice(&vaddr.to_le_bytes());
        d[ph + 32..ph + 40].copy_from_slice(&(file.len() as u64).to_le_bytes());
        d[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    }
    d
}

fn u64_at(mem: &GuestMemory<Npt, &'static Backed>, gpa: u64) -> u64 {
    mem.read_u64(GuestPhysAddr::new(gpa)).unwrap()
}

#[test]
fn a_loaded_guest_finds_its_image_boot_info_and_page_tables() {
    let m = machine();
    let code: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let data = [0x5au8; 100];
    let image_bytes = elf(2 * MIB + 0x40, &[(2 * MIB, &code, 8192, 5), (3 * MIB, &data, 4096, 6)]);
    let image = elf::Image::parse(&image_bytes, 2 * MIB, 8 * MIB).unwrap();
    let mut mem = GuestMemory::<Npt, _>::new(&m.sim, m).unwrap();
    let g = Load { id: 3, name: "a-guest-name-longer-than-thirty-one-bytes", memory: 8 * MIB, arg: 0x77, vcpus: 2, log_level: 4 };
    let start = load(&mut mem, &image, &g, &m.sim).unwrap();
    assert_eq!(start, Start { rip: 2 * MIB + 0x40, rsp: 8 * MIB, rdi: abi::BOOT_INFO_GPA, cr3: abi::PAGE_TABLES_GPA });
    assert_eq!(mem.ram(), 8 * MIB);
    // The segments, and zeros past their file bytes (fresh RAM).
    let mut back = vec![0u8; code.len() + 64];
    mem.read(GuestPhysAddr::new(2 * MIB), &mut back).unwrap();
    assert_eq!(&back[..code.len()], &code[..]);
    assert!(back[code.len()..].iter().all(|&b| b == 0), "the zero-filled end of a segment");
    let mut d = [0u8; 101];
    mem.read(GuestPhysAddr::new(3 * MIB), &mut d).unwrap();
    assert_eq!((&d[..100], d[100]), (&data[..], 0));
    // The boot information, field by field (the ABI's layout).
    let b = abi::BOOT_INFO_GPA;
    assert_eq!(u64_at(&mem, b), abi::ABI_VERSION);
    assert_eq!(u64_at(&mem, b + 8), 3, "guest id");
    assert_eq!(u64_at(&mem, b + 16), 8 * MIB, "memory size");
    assert_eq!(u64_at(&mem, b + 24), abi::MORSEL_WINDOW_GPA);
    assert_eq!(u64_at(&mem, b + 32), abi::MORSEL_WINDOW_SIZE);
    assert_eq!(u64_at(&mem, b + 40), 0x77, "arg");
    let mut info = [0u8; size_of::<abi::BootInfo>()];
    mem.read(GuestPhysAddr::new(b), &mut info).unwrap();
    // SAFETY: BootInfo is plain old data; every bit pattern of it is valid.
    let info: abi::BootInfo = unsafe { core::ptr::read_unaligned(info.as_ptr().cast()) };
    assert_eq!(&info.name[..31], &g.name.as_bytes()[..31], "the name cut to 31 bytes");
    assert_eq!(info.name[31], 0, "and NUL-terminated");
    assert_eq!((info.log_level, info.vcpu_count), (4, 2));
    // The page tables: PML4 slot 0 for RAM, slots 1-7 for the morsel window, each to a
    // table of 1 GiB identity pages, but the GiB with the top of RAM (here the first).
    let pml4 = abi::PAGE_TABLES_GPA;
    for slot in 0..8u64 {
        assert_eq!(u64_at(&mem, pml4 + 8 * slot), (pml4 + 0x1000 * (slot + 1)) | 3, "PML4 slot {slot}");
        for j in [0u64, 1, 511] {
            let e = u64_at(&mem, pml4 + 0x1000 * (slot + 1) + 8 * j);
            match (slot, j) {
                (0, 0) => assert_eq!(e, (pml4 + 0x9000) | 3, "the GiB with the stacks, in 2 MiB pages"),
                _ => assert_eq!(e, ((slot * 512 + j) << 30) | 0x83, "slot {slot} entry {j}"),
            }
        }
    }
    assert_eq!(u64_at(&mem, pml4 + 8 * 8), 0, "nothing above the morsel window");
    mem.release(&m.sim).unwrap();
    assert_eq!(m.sim.allocated_frames(), 0);
}

#[test]
fn ram_that_does_not_fit_fails_the_load() {
    let m = machine();
    let image_bytes = elf(2 * MIB, &[(2 * MIB, &[0x90; 16], 16, 5)]);
    let image = elf::Image::parse(&image_bytes, 2 * MIB, 64 * MIB).unwrap();
    let mut mem = GuestMemory::<Npt, _>::new(&m.sim, m).unwrap();
    m.sim.limit_free(4 * 512);
    let g = Load { id: 0, name: "big", memory: 64 * MIB, arg: 0, vcpus: 1, log_level: 0 };
    assert_eq!(load(&mut mem, &image, &g, &m.sim), Err(MapError::NoMemory));
    mem.release(&m.sim).unwrap();
    assert_eq!(m.sim.allocated_frames(), 0, "what was mapped goes back");
}

/// Where the guest's own page tables take `va` (None: not present), walked as the CPU walks
/// them (1 GiB, 2 MiB and 4 KiB pages).
fn translate(mem: &GuestMemory<Npt, &'static Backed>, va: u64) -> Option<u64> {
    let mut table = abi::PAGE_TABLES_GPA;
    for (level, shift) in [(4, 39u32), (3, 30), (2, 21), (1, 12)] {
        let e = u64_at(mem, table + 8 * ((va >> shift) & 511));
        if e & 1 == 0 {
            return None;
        }
        let addr = e & 0x000f_ffff_ffff_f000;
        if level == 1 || (level < 4 && e & 0x80 != 0) {
            return Some(addr + (va & ((1 << shift) - 1)));
        }
        table = addr;
    }
    unreachable!()
}

#[test]
fn each_vcpu_stack_has_a_guard_page_below_it_and_the_rest_is_identity() {
    // Room for a guest whose top of RAM lies in its second GiB.
    let m: &'static Backed = Box::leak(Box::new(Backed::new(5 << 29)));
    let image_bytes = elf(2 * MIB, &[(2 * MIB, &[0x90; 16], 16, 5)]);
    for (memory, vcpus) in [(4 * MIB, 1u32), (8 * MIB, 2), (16 * MIB, 16), (1024 * MIB, 3), (1026 * MIB, 4)] {
        let image = elf::Image::parse(&image_bytes, 2 * MIB, memory).unwrap();
        let mut mem = GuestMemory::<Npt, _>::new(&m.sim, m).unwrap();
        let g = Load { id: 0, name: "g", memory, arg: 0, vcpus, log_level: 0 };
        load(&mut mem, &image, &g, &m.sim).unwrap_or_else(|e| panic!("{memory:#x}: {e:?}"));
        let r = abi::VCPU_STACK_RESERVE;
        for v in 0..vcpus as u64 {
            let guard = memory - (v + 1) * r;
            assert_eq!(translate(&mem, guard), None, "{memory:#x}/{vcpus}: vCPU {v}'s guard page");
            assert_eq!(translate(&mem, guard + 0xff8), None);
            assert_eq!(stack_guard(memory, vcpus, guard + 0x10), Some(v as u32));
            assert_eq!(translate(&mem, guard + 0x1000), Some(guard + 0x1000), "its stack's lowest page");
            assert_eq!(translate(&mem, guard - 8), Some(guard - 8), "the page below the guard");
            assert_eq!(stack_guard(memory, vcpus, guard + 0x1000), None);
            assert_eq!(stack_owner(memory, vcpus, guard), Some(v as u32), "the guard is in the reserve");
            assert_eq!(stack_owner(memory, vcpus, guard + r - 1), Some(v as u32), "its top byte");
            assert_eq!(stack_owner(memory, vcpus, guard + r), v.checked_sub(1).map(|o| o as u32), "the next vCPU's");
        }
        assert_eq!(stack_owner(memory, vcpus, memory), None, "past RAM");
        assert_eq!(stack_owner(memory, vcpus, memory - vcpus as u64 * r - 1), None, "the heap below the reserves");
        // Everything else that is RAM: identity, in 4 KiB, 2 MiB and 1 GiB pages alike.
        let guards = (0..vcpus as u64).map(|v| memory - (v + 1) * r).collect::<Vec<_>>();
        let mut at = memory - 4 * MIB;
        while at < memory {
            let want = (!guards.contains(&at)).then_some(at + 0x123);
            assert_eq!(translate(&mem, at + 0x123), want, "{memory:#x}/{vcpus}: {at:#x}");
            at += 0x1000;
        }
        for va in [0u64, 0x1000, 2 * MIB, memory / 2, 5 << 30] {
            assert_eq!(translate(&mem, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&mem, abi::MORSEL_WINDOW_GPA + 0x5000), Some(abi::MORSEL_WINDOW_GPA + 0x5000));
        assert_eq!(stack_guard(memory, vcpus, memory), None, "past RAM");
        assert_eq!(stack_guard(memory, vcpus, memory - (vcpus as u64 + 1) * r), None, "below the last reserve: heap");
        mem.release(&m.sim).unwrap();
    }
    assert_eq!(m.sim.allocated_frames(), 0);
}
