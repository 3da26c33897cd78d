//! Checks that the hypervisor keeps this guest's SSE registers and MXCSR across exits:
//! loads a pattern into xmm0-xmm15 and a non-default MXCSR, yields to the other guests
//! (which do the same with their own pattern), and compares, in one assembly block so no
//! compiled code can touch the registers in between.
#![no_std]
#![no_main]

use core::arch::asm;
use guest_lib::{abi, println, BootInfo};

guest_lib::entry!(main);

#[repr(C, align(16))]
struct Xmm([u64; 32]);

fn is_amd() -> bool {
    core::arch::x86_64::__cpuid(0).ebx == u32::from_le_bytes(*b"Auth")
}

macro_rules! round_trip {
    ($insn:literal, $input:expr, $output:expr, $mxcsr_in:expr, $mxcsr_out:expr) => {
        // SAFETY: loads and stores 256 bytes of the two aligned arrays; the hypercall
        // (yield) only changes rax and rdx; every xmm register is declared clobbered.
        unsafe {
            asm!(
                "ldmxcsr [{mi}]",
                "movdqa xmm0, [{i}]", "movdqa xmm1, [{i} + 16]", "movdqa xmm2, [{i} + 32]", "movdqa xmm3, [{i} + 48]",
                "movdqa xmm4, [{i} + 64]", "movdqa xmm5, [{i} + 80]", "movdqa xmm6, [{i} + 96]", "movdqa xmm7, [{i} + 112]",
                "movdqa xmm8, [{i} + 128]", "movdqa xmm9, [{i} + 144]", "movdqa xmm10, [{i} + 160]", "movdqa xmm11, [{i} + 176]",
                "movdqa xmm12, [{i} + 192]", "movdqa xmm13, [{i} + 208]", "movdqa xmm14, [{i} + 224]", "movdqa xmm15, [{i} + 240]",
                $insn,
                "movdqa [{o}], xmm0", "movdqa [{o} + 16], xmm1", "movdqa [{o} + 32], xmm2", "movdqa [{o} + 48], xmm3",
                "movdqa [{o} + 64], xmm4", "movdqa [{o} + 80], xmm5", "movdqa [{o} + 96], xmm6", "movdqa [{o} + 112], xmm7",
                "movdqa [{o} + 128], xmm8", "movdqa [{o} + 144], xmm9", "movdqa [{o} + 160], xmm10", "movdqa [{o} + 176], xmm11",
                "movdqa [{o} + 192], xmm12", "movdqa [{o} + 208], xmm13", "movdqa [{o} + 224], xmm14", "movdqa [{o} + 240], xmm15",
                "stmxcsr [{mo}]",
                "mov dword ptr [{mi}], 0x1f80",
                "ldmxcsr [{mi}]",
                i = in(reg) $input, o = in(reg) $output, mi = in(reg) $mxcsr_in, mo = in(reg) $mxcsr_out,
                inout("rax") abi::HC_YIELD => _, out("rdx") _,
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
                out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            )
        }
    };
}

fn main(info: &BootInfo) -> i32 {
    let amd = is_amd();
    let mut bad = 0;
    for round in 0..20u64 {
        let mut input = Xmm([0; 32]);
        for (i, w) in input.0.iter_mut().enumerate() {
            *w = ((info.guest_id + 1) << 56) | (round << 32) | (i as u64 * 0x0101_0101);
        }
        let mut output = Xmm([0; 32]);
        // Round toward zero (MXCSR.RC = 11b) and flush-to-zero, unlike the host's default.
        let mut mxcsr_in: u32 = 0x1f80 | 0x6000 | 0x8000;
        let want_mxcsr = mxcsr_in;
        let mut mxcsr_out: u32 = 0;
        let (i, o, mi, mo) = (input.0.as_ptr(), output.0.as_mut_ptr(), &mut mxcsr_in as *mut u32, &mut mxcsr_out as *mut u32);
        if amd {
            round_trip!("vmmcall", i, o, mi, mo);
        } else {
            round_trip!("vmcall", i, o, mi, mo);
        }
        if input.0 != output.0 || mxcsr_out & 0xffbf != want_mxcsr {
            bad += 1;
            println!("round {round}: SSE state changed across an exit (mxcsr {mxcsr_out:#x})");
        }
    }
    println!("SSE state kept across 20 yields: {}", if bad == 0 { "yes" } else { "NO" });
    bad
}
