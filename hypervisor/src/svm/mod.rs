//! AMD-V backend: EFER.SVME, one VMCB per guest, nested paging (NPT), ASIDs, VMMCALL.
//! Preemption: the host's LAPIC timer interrupt is intercepted (INTR exit).
//! References: AMD APM Vol. 2 chapter 15.

mod switch;
mod vmcb;

use crate::cpu::{CpuFacts, Extension};
use alloc::vec;
use alloc::vec::Vec;
use crate::frames::Frames;
use crate::vm::fpu::FpuState;
use crate::vm::{Backend, BackendError, Exit, Regs, VcpuSetup};
use morsel::{FrameAlloc, HostPhysAddr, Npt};
use vmcb::*;

const EFER_MSR: u32 = 0xc000_0080;
const EFER_SVME: u64 = 1 << 12;
const VM_CR: u32 = 0xc001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
const VM_HSAVE_PA: u32 = 0xc001_0117;

/// SVM enabled on this CPU, with the shared I/O and MSR permission maps.
pub struct Svm {
    nrip_save: bool,
    asids: u32,
    /// By ASID: the guest whose translations the TLB may hold under it. With more guests than
    /// ASIDs they share (guest id modulo), and a guest whose ASID another guest used last
    /// runs after a flush of that ASID.
    asid_user: Vec<u32>,
    iopm: HostPhysAddr,
    msrpm: HostPhysAddr,
}

/// A guest's VMCB and its saved registers.
pub struct Vcpu {
    guest: u32,
    asid: u32,
    vmcb: Vmcb,
    regs: Regs,
    fpu: FpuState,
}

/// Segment attributes in VMCB form (descriptor bits 40-47 in 0-7, 52-55 in 8-11).
const CODE64: u16 = 0x09b | (1 << 9) | (1 << 11); // present, code r/x accessed, L, G
const DATA: u16 = 0x093 | (1 << 10) | (1 << 11); // present, data r/w accessed, D/B, G
const TSS64: u16 = 0x08b; // present, busy 64-bit TSS
const LDT: u16 = 0x082;

impl Backend for Svm {
    type Format = Npt;
    type Vcpu = Vcpu;
    const NAME: &'static str = "svm";

    fn enable(facts: &CpuFacts, frames: &Frames) -> Result<Self, BackendError> {
        if facts.extension != Extension::Svm {
            return Err(BackendError::Missing("SVM (CPUID 8000_0001 ECX bit 2)"));
        }
        if !facts.second_level {
            return Err(BackendError::Missing("nested paging (CPUID 8000_000A EDX bit 0)"));
        }
        if facts.asids < 2 {
            return Err(BackendError::Missing("ASIDs for guests"));
        }
        // SAFETY: VM_CR exists on CPUs with SVM (APM 15.30.1); reading has no side effects.
        if unsafe { x86::msr::rdmsr(VM_CR) } & VM_CR_SVMDIS != 0 {
            return Err(BackendError::Disabled("SVM (VM_CR.SVMDIS)"));
        }
        let hsave = frames.alloc_zeroed(0).ok_or(BackendError::NoMemory)?;
        // The I/O permission map is 12 KiB, the MSR permission map 8 KiB (APM 15.10, 15.11):
        // all ones intercepts every port and MSR. A 2 MiB frame holds both contiguously.
        let maps = frames.alloc_zeroed(9).ok_or(BackendError::NoMemory)?;
        let iopm = maps;
        let msrpm = HostPhysAddr::new(maps.as_u64() + 0x4000);
        // SAFETY: the 2 MiB frame is ours and identity-mapped; 0x6000 bytes lie inside it.
        unsafe { core::ptr::write_bytes(maps.as_u64() as *mut u8, 0xff, 0x6000) };
        // SAFETY: SVM exists and is not disabled (checked above); the host save area is a
        // page we own for the rest of the run.
        unsafe {
            x86::msr::wrmsr(EFER_MSR, x86::msr::rdmsr(EFER_MSR) | EFER_SVME);
            x86::msr::wrmsr(VM_HSAVE_PA, hsave.as_u64());
        }
        crate::apic::start_periodic_timer_us(crate::vm::sched::SLICE_US);
        log::info!(target: "svm", "SVM enabled: {} ASIDs, NPT, next-RIP save {}",
            facts.asids, if facts.nrip_save { "yes" } else { "no (VMMCALL length is used)" });
        Ok(Svm { nrip_save: facts.nrip_save, asids: facts.asids, asid_user: vec![u32::MAX; facts.asids as usize], iopm, msrpm })
    }

    fn create_vcpu(&mut self, s: &VcpuSetup, frames: &Frames) -> Result<Vcpu, BackendError> {
        // ASID 0 belongs to the host.
        let asid = 1 + s.id % (self.asids - 1);
        let mut v = Vmcb::new(frames.alloc_zeroed(0).ok_or(BackendError::NoMemory)?);
        // Intercept every exception: guests have no IDT, any exception is a failure.
        v.write32(INTERCEPT_EXCEPTIONS, 0xffff_ffff);
        v.write32(INTERCEPT_MISC1,
            MISC1_INTR | MISC1_NMI | MISC1_INVD | MISC1_HLT | MISC1_IOIO | MISC1_MSR | MISC1_SHUTDOWN);
        v.write32(INTERCEPT_MISC2, MISC2_ALL_SVM);
        v.write64(IOPM_BASE, self.iopm.as_u64());
        v.write64(MSRPM_BASE, self.msrpm.as_u64());
        v.write32(GUEST_ASID, asid);
        v.write64(VINTR, VINTR_MASKING);
        v.write64(NP_ENABLE, 1);
        v.write64(N_CR3, s.second_level_root.as_u64());
        v.write64(CLEAN_BITS, 0);

        // 64-bit mode, paging with the guest's identity map (APM 15.5: VMRUN checks).
        v.segment(CS, 0x08, CODE64, 0xffff_ffff, 0);
        for seg in [DS, ES, SS, FS, GS] {
            v.segment(seg, 0x10, DATA, 0xffff_ffff, 0);
        }
        v.segment(TR, 0x18, TSS64, 0x67, 0);
        v.segment(LDTR, 0, LDT, 0, 0);
        v.segment(GDTR, 0, 0, 0, 0);
        v.segment(IDTR, 0, 0, 0, 0);
        v.write8(CPL, 0);
        v.write64(EFER, (1 << 8) | (1 << 10) | EFER_SVME); // LME, LMA, SVME (required)
        v.write64(CR0, 0x8000_0033); // PG, NE, ET, MP, PE
        v.write64(CR3, s.cr3);
        v.write64(CR4, (1 << 5) | (1 << 9) | (1 << 10)); // PAE, OSFXSR, OSXMMEXCPT
        v.write64(DR6, 0xffff_0ff0);
        v.write64(DR7, 0x400);
        // IF = 1: with V_INTR_MASKING the guest's IF gates only virtual interrupts, which we
        // never inject (AMD APM Vol. 2 15.21.1), so this changes nothing on hardware or QEMU;
        // Bochs 2.7 instead masks physical interrupts while the guest's IF is 0, and a guest
        // entered with IF = 0 could not be preempted there.
        v.write64(RFLAGS, 0x202);
        v.write64(G_PAT, 0x0007_0406_0007_0406);
        let regs = Regs { rip: s.rip, rsp: s.rsp, rdi: s.rdi, ..Regs::default() };
        Ok(Vcpu { guest: s.id, asid, vmcb: v, regs, fpu: FpuState::initial() })
    }

    fn run(&mut self, vcpu: &mut Vcpu, _slice_us: u64) -> Exit {
        let v = &mut vcpu.vmcb;
        v.write64(RIP, vcpu.regs.rip);
        v.write64(RSP, vcpu.regs.rsp);
        v.write64(RAX, vcpu.regs.rax);
        let user = &mut self.asid_user[vcpu.asid as usize];
        // Also the first run: no ASID starts with a user.
        if *user != vcpu.guest {
            v.write8(TLB_CONTROL, 3); // flush this guest's ASID
            *user = vcpu.guest;
        }
        // SAFETY: the VMCB was set up by create_vcpu with a nested table that maps only the
        // guest's memory, and SVM is enabled.
        unsafe { switch::run(&mut vcpu.regs, v.pa().as_u64(), &mut vcpu.fpu) };
        let v = &mut vcpu.vmcb;
        v.write8(TLB_CONTROL, 0);
        vcpu.regs.rip = v.read64(RIP);
        vcpu.regs.rsp = v.read64(RSP);
        vcpu.regs.rax = v.read64(RAX);
        let (code, info1, info2) = (v.read64(EXITCODE), v.read64(EXITINFO1), v.read64(EXITINFO2));
        // Next RIP: from the VMCB where the CPU saves it, else the instruction length.
        let next = |len: u64| if self.nrip_save { v.read64(NRIP) } else { vcpu.regs.rip + len };
        match code {
            EXIT_VMMCALL => Exit::Hypercall { next_rip: next(3) },
            EXIT_CPUID => Exit::Cpuid { next_rip: next(2) },
            EXIT_HLT => Exit::Halt { next_rip: next(1) },
            EXIT_INTR | EXIT_NMI => Exit::Preempted,
            // EXITINFO1: #PF-style error code, EXITINFO2: guest-physical address (APM 15.25.6).
            EXIT_NPF => Exit::SecondLevelFault {
                gpa: info2,
                write: info1 & 2 != 0,
                fetch: info1 & 0x10 != 0,
                present: info1 & 1 != 0,
            },
            // EXITINFO2 of an intercepted #PF: the faulting address; CR2 is not written (APM Vol. 2, 15.12 Exception Intercepts).
            c if (EXIT_EXCEPTION_0..EXIT_EXCEPTION_0 + 32).contains(&c) => {
                let vector = (c - EXIT_EXCEPTION_0) as u8;
                Exit::Exception { vector, error_code: info1 as u32, address: if vector == 14 { info2 } else { 0 } }
            }
            EXIT_SHUTDOWN => Exit::TripleFault,
            EXIT_IOIO => Exit::Io { port: (info1 >> 16) as u16, write: info1 & 1 == 0 },
            EXIT_MSR => Exit::Msr { msr: vcpu.regs.rcx as u32, write: info1 & 1 != 0 },
            EXIT_INVD | EXIT_VMRUN..=0x86 => Exit::Forbidden { code },
            EXIT_INVALID => Exit::EntryFailed { code, qualification: 0 },
            _ => Exit::Other { code },
        }
    }

    fn regs(vcpu: &mut Vcpu) -> &mut Regs {
        &mut vcpu.regs
    }

    fn flush_second_level(&mut self, vcpu: &mut Vcpu) {
        vcpu.vmcb.write8(TLB_CONTROL, 3); // flush this guest's ASID on the next VMRUN
    }

    fn destroy_vcpu(&mut self, vcpu: Vcpu, frames: &Frames) {
        frames.free(vcpu.vmcb.pa(), 0);
    }
}
