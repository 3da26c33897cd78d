//! Intel VT-x backend: VMXON, one VMCS per guest, EPT, VPIDs, VMCALL.
//! Preemption: the VMX-preemption timer (or, where the CPU lacks it, the host's LAPIC timer
//! with external-interrupt exiting).
//! References: Intel SDM Vol. 3C chapters 24-31, Vol. 3D appendices A-C.

pub mod caps;
mod setup;
mod switch;
mod vmcs;

use allocator::Order;
use crate::arch::cpu::{CpuFacts, Extension};
use crate::mm::frames::Frames;
use crate::vm::fpu::FpuState;
use crate::vm::{Backend, BackendError, Exit, Regs, Resume, VcpuSetup};
use caps::{fix_cr, Controls, FEATURE_CONTROL_LOCK, FEATURE_CONTROL_VMX_OUTSIDE_SMX, IA32_FEATURE_CONTROL};
use core::arch::asm;
use morsel::{Ept, HostPhysAddr};
use setup::{read_cr0, read_cr4};
use vmcs::*;

const IA32_EFER: u32 = 0xc000_0080;
const IA32_FS_BASE: u32 = 0xc000_0100;
const IA32_GS_BASE: u32 = 0xc000_0101;
const IA32_PAT: u32 = 0x277;
/// SWAPGS exchanges GS.base with this MSR, which VM entry and exit do not switch: it is
/// saved and loaded around every run so that no guest sees another's (or the host's).
const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
const CR4_VMXE: u64 = 1 << 13;
const CR4_LA57: u64 = 1 << 12;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_IF: u64 = 1 << 9;

/// INVEPT types (SDM Vol. 3C 31.3, INVEPT).
const INVEPT_SINGLE: u64 = 1;
const INVEPT_ALL: u64 = 2;

/// VMX on with the control words every VMCS gets.
pub struct Vmx {
    revision: u32,
    pin: u32,
    proc: u32,
    proc2: u32,
    exit: u32,
    entry: u32,
    cr0_fixed: (u64, u64),
    cr4_fixed: (u64, u64),
    /// Preemption timer rate: it counts down once per 2^rate TSC ticks; None without it.
    timer_rate: Option<u32>,
    invept_type: u64,
    /// The VMCS that VMPTRLD made current last.
    current: Option<HostPhysAddr>,
    /// The host's FPU/SSE state while a guest runs on this CPU.
    host_fpu: alloc::boxed::Box<FpuState>,
}

/// A guest's VMCS and its saved registers.
pub struct Vcpu {
    vmcs: Vmcs,
    eptp: u64,
    regs: Regs,
    fpu: FpuState,
    /// VMLAUNCH succeeded once: VMRESUME from now on (SDM Vol. 3C 25.11.3).
    launched: bool,
    /// INVEPT before the next entry: the EPT root frame may have served an earlier guest.
    flush: bool,
    /// The guest's IA32_KERNEL_GS_BASE (see the constant).
    kernel_gs_base: u64,
    /// RFLAGS and interruptibility state at the last exit (whether it can take an interrupt).
    rflags: u64,
    interruptibility: u64,
    /// The guest's IDTR limit at the first exit that found it non-zero (0 until then:
    /// `has_idt`). Read at each exit only until then: a guest that loaded an IDT and later
    /// loads an empty one gets the vectors it subscribed to anyway (its own fault, as with
    /// any interrupt), and every other exit saves the VMREAD (4 Bochs ticks).
    idtr_limit: u64,
    /// The event to inject at the next entry (VM-entry interruption-information format, 0:
    /// none), its error code and instruction length.
    inject: (u64, u64, u64),
    /// Interrupt-window exiting wanted.
    window: bool,
    /// The exception vectors the guest takes itself (cleared in EXCEPTION_BITMAP).
    exceptions: u32,
    /// PROC_CONTROLS and EXCEPTION_BITMAP as last written into this vCPU's VMCS
    /// (`write_events` writes only what changed; u64::MAX: not written yet).
    written: (u64, u64),
}

/// Says which control a capability MSR does not allow.
fn require(ok: bool, what: &'static str) -> Result<(), BackendError> {
    if ok { Ok(()) } else { Err(BackendError::Missing(what)) }
}

impl Backend for Vmx {
    type Format = Ept;
    type Vcpu = Vcpu;
    const NAME: &'static str = "vmx";

    type Caps = Controls;

    fn probe(facts: &CpuFacts) -> Result<Controls, BackendError> {
        if facts.extension != Extension::Vmx {
            return Err(BackendError::Missing("VMX (CPUID.1:ECX bit 5)"));
        }
        caps::snapshot().controls().map_err(BackendError::from)
    }

    fn enable(c: &Controls) -> Result<Self, BackendError> {
        let frames = &Frames::here();
        // IA32_FEATURE_CONTROL: lock it with VMX on if the firmware left it open (SDM Vol. 3C 24.7).
        if c.lock_feature_control {
            // SAFETY: the MSR exists with VMX and is unlocked (the snapshot said so);
            // setting the enable and lock bits has no other effect.
            unsafe {
                let fc = x86::msr::rdmsr(IA32_FEATURE_CONTROL);
                x86::msr::wrmsr(IA32_FEATURE_CONTROL, fc | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX)
            };
        }
        let Controls { revision, pin, proc, proc2, exit, entry, cr0_fixed, cr4_fixed, timer_rate, .. } = *c;
        let invept_type = if c.invept_single { INVEPT_SINGLE } else { INVEPT_ALL };
        // CR0/CR4 fixed bits, CR4.VMXE, then VMXON (SDM Vol. 3C 24.8).
        let cr0 = fix_cr(read_cr0(), cr0_fixed.0, cr0_fixed.1);
        let cr4 = fix_cr(read_cr4() | CR4_VMXE, cr4_fixed.0, cr4_fixed.1);
        // SAFETY: the fixed bits only force what VMX operation requires of a host that
        // already runs in 64-bit paged mode (PE, PG, NE; VMXE).
        unsafe {
            asm!("mov cr0, {}", in(reg) cr0, options(nostack));
            asm!("mov cr4, {}", in(reg) cr4, options(nostack));
        }
        let region = frames.alloc_zeroed(Order::BASE).ok_or(BackendError::NoMemory)?;
        // SAFETY: the VMXON region is a zeroed frame we own for the rest of the run; its
        // first dword takes the revision identifier (SDM Vol. 3C 25.11.5).
        unsafe { (region.as_u64() as *mut u32).write_volatile(revision) };
        let pa = region.as_u64();
        let (cf, zf): (u8, u8);
        // SAFETY: CR0/CR4 meet the VMX requirements and IA32_FEATURE_CONTROL allows VMXON;
        // the operand is the address of a u64 holding the region's physical address.
        unsafe {
            asm!("vmxon [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &raw const pa,
                cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack))
        };
        if cf != 0 || zf != 0 {
            frames.free(region, Order::BASE);
            return Err(BackendError::Failed("VMXON", if cf != 0 { u64::MAX } else { 0 }));
        }

        match timer_rate {
            Some(rate) => log::info!(target: "vmx",
                "VMX enabled: VMCS revision {revision:#x}, EPT 4-level WB, VPID, preemption timer at TSC/2^{rate}, INVEPT {}",
                if invept_type == INVEPT_SINGLE { "single-context" } else { "all-context" }),
            None => {
                // External-interrupt exiting then ends the slice. Bochs 2.7 leaves INTR masked
                // in a guest with RFLAGS.IF = 0 although the SDM says IF does not block it
                // (26.3): guests start with IF = 1, and one that runs CLI is not preempted there.
                crate::arch::apic::start_periodic_timer_us(crate::vm::sched::SLICE_US);
                log::info!(target: "vmx",
                    "VMX enabled: VMCS revision {revision:#x}, EPT 4-level WB, VPID, no preemption timer (LAPIC timer slices)")
            }
        }
        log::info!(target: "vmx", "controls: pin {pin:#x} proc {proc:#x} proc2 {proc2:#x} exit {exit:#x} entry {entry:#x}");
        Ok(Vmx {
            revision,
            pin,
            proc,
            proc2,
            exit,
            entry,
            cr0_fixed,
            cr4_fixed,
            timer_rate,
            invept_type,
            current: None,
            host_fpu: alloc::boxed::Box::new(FpuState::initial()),
        })
    }

    fn create_vcpu(&mut self, s: &VcpuSetup) -> Result<Vcpu, BackendError> {
        let frames = &Frames::here();
        let vpid = s.id + 1; // VPID 0 belongs to the host (SDM Vol. 3C 29.1)
        require(vpid <= 0xffff, "a free VPID")?;
        let frame = frames.alloc_zeroed(Order::BASE).ok_or(BackendError::NoMemory)?;
        let vmcs = match Vmcs::new(frame, self.revision).and_then(|v| v.load().map(|()| v)) {
            Ok(v) => v,
            Err(e) => {
                frames.free(frame, Order::BASE);
                return Err(BackendError::Failed("VMCLEAR/VMPTRLD", e.code()));
            }
        };
        self.current = Some(frame);
        // EPTP: WB memory type in 2:0, page-walk length - 1 in 5:3 (SDM Vol. 3C 25.6.11).
        let eptp = s.second_level_root.as_u64() | 6 | ((4 - 1) << 3);
        let mut vcpu = Vcpu {
            vmcs,
            eptp,
            regs: Regs { rip: s.rip, rsp: s.rsp, rdi: s.rdi, rsi: s.rsi, ..Regs::default() },
            fpu: FpuState::initial(),
            launched: false,
            flush: true,
            kernel_gs_base: 0,
            rflags: 0x202,
            interruptibility: 0,
            idtr_limit: 0,
            inject: (0, 0, 0),
            window: false,
            exceptions: 0,
            written: (u64::MAX, u64::MAX),
        };
        if let Err(e) = self.init_vmcs(s, vpid as u64, eptp) {
            self.destroy_vcpu_inner(&mut vcpu);
            frames.free(vcpu.vmcs.pa(), Order::BASE);
            return Err(e);
        }
        Ok(vcpu)
    }

    // Inlined into the vCPU loop (`sched::enter`) whatever codegen unit it lands in: called,
    // it cost 27 Bochs ticks per null exit (`cargo xtask bench exits`).
    #[inline]
    fn run(&mut self, vcpu: &mut Vcpu, budget_us: u64) -> Exit {
        if let Err(e) = self.make_current(vcpu) {
            log::error!(target: "vmx", "VMPTRLD failed: {e}");
            return Exit::EntryFailed { code: e.code(), qualification: 0 };
        }
        if vcpu.flush {
            self.invept(vcpu.eptp);
            vcpu.flush = false;
        }
        let timer = self.timer_rate.map(|rate| ((budget_us * crate::platform::time::tsc_per_us()) >> rate).clamp(1, u32::MAX as u64));
        let prepared = write(GUEST_RIP, vcpu.regs.rip)
            .and_then(|()| write(GUEST_RSP, vcpu.regs.rsp))
            .and_then(|()| timer.map_or(Ok(()), |t| write(PREEMPTION_TIMER_VALUE, t)))
            .and_then(|()| self.write_events(vcpu));
        if let Err(e) = prepared {
            log::error!(target: "vmx", "VMWRITE before entry failed: {e}");
            return Exit::EntryFailed { code: e.code(), qualification: 0 };
        }
        // SAFETY: IA32_KERNEL_GS_BASE exists on every x86-64 CPU; the host never uses it
        // (no SWAPGS), so it may hold the guest's value while the guest runs.
        unsafe { x86::msr::wrmsr(IA32_KERNEL_GS_BASE, vcpu.kernel_gs_base) };
        // SAFETY: the VMCS is current and was set up by create_vcpu (host state, guest state,
        // an EPT that maps only the guest's memory); `launched` tracks its launch state.
        crate::probe::mark(7);
        let status = unsafe { switch::run(&mut vcpu.regs, vcpu.launched, &mut vcpu.fpu, &mut self.host_fpu) };
        crate::probe::mark(8);
        // SAFETY: as above; the host's value is 0.
        unsafe {
            vcpu.kernel_gs_base = x86::msr::rdmsr(IA32_KERNEL_GS_BASE);
            x86::msr::wrmsr(IA32_KERNEL_GS_BASE, 0);
        }
        match status {
            switch::EXITED => {}
            switch::FAIL_VALID => {
                let error = read(VM_INSTRUCTION_ERROR);
                log::error!(target: "vmx", "{} failed: VM-instruction error {error} (SDM Vol. 3C 31.4)",
                    if vcpu.launched { "VMRESUME" } else { "VMLAUNCH" });
                return Exit::EntryFailed { code: error, qualification: 0 };
            }
            _ => {
                log::error!(target: "vmx", "VM entry failed: no current VMCS (VMfailInvalid)");
                return Exit::EntryFailed { code: u64::MAX, qualification: 0 };
            }
        }
        let reason = read(EXIT_REASON);
        let qualification = read(EXIT_QUALIFICATION);
        if reason & EXIT_REASON_ENTRY_FAILURE != 0 {
            // Invalid guest state (33), MSR loading (34) or machine check (41): the guest
            // never ran (SDM Vol. 3C 27.8).
            log::error!(target: "vmx", "VM entry failed: exit reason {reason:#x}, qualification {qualification:#x}");
            return Exit::EntryFailed { code: reason, qualification };
        }
        vcpu.launched = true;
        vcpu.rflags = read(GUEST_RFLAGS);
        vcpu.interruptibility = read(GUEST_INTERRUPTIBILITY);
        if vcpu.idtr_limit == 0 {
            vcpu.idtr_limit = read(GUEST_IDTR_LIMIT);
        }
        // An event whose delivery the exit interrupted goes in again at the next entry (SDM
        // Vol. 3C 28.2.4, 27.6.1.1: IDT-vectoring information has the entry format).
        let vectoring = read(IDT_VECTORING_INFO);
        vcpu.inject = match vectoring & INTR_INFO_VALID != 0 {
            true => (vectoring & 0x8000_0fff, read(IDT_VECTORING_ERROR_CODE), read(EXIT_INSTRUCTION_LEN)),
            false => (0, 0, 0),
        };
        vcpu.regs.rip = read(GUEST_RIP);
        vcpu.regs.rsp = read(GUEST_RSP);
        let resume = Resume::At(vcpu.regs.rip + read(EXIT_INSTRUCTION_LEN));
        let basic = (reason & 0xffff) as u32;
        match basic {
            // CPL = SS.DPL, access-rights bits 6:5 (SDM Vol. 3C 25.4.1).
            EXIT_VMCALL => Exit::Hypercall { resume, cpl: ((read(GUEST_SS_AR) >> 5) & 3) as u8 },
            EXIT_CPUID => Exit::Cpuid { resume },
            EXIT_HLT => Exit::Halt { resume, interrupts: read(GUEST_RFLAGS) & RFLAGS_IF != 0 },
            EXIT_PREEMPTION_TIMER => Exit::Preempted,
            EXIT_INTERRUPT_WINDOW => {
                vcpu.window = false;
                Exit::InterruptWindow
            }
            EXIT_EXTERNAL_INTERRUPT => {
                // Not acknowledged on exit: open a one-instruction window so the host's
                // handler takes it (and sends EOI), then close it again.
                // SAFETY: the host's IDT handles every vector on IST stacks.
                unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
                // The LAPIC slice timer (no preemption timer) or an IPI: the scheduler tells.
                Exit::Interrupt
            }
            // Qualification bits 0-2: read/write/fetch, 3-5: what the entry allowed; the
            // guest-physical address field holds the address (SDM Vol. 3C 28.2.1, table 28-7).
            EXIT_EPT_VIOLATION => Exit::SecondLevelFault {
                gpa: read(GUEST_PHYSICAL_ADDRESS),
                write: qualification & (1 << 1) != 0,
                fetch: qualification & (1 << 2) != 0,
                present: qualification & (0b111 << 3) != 0,
            },
            EXIT_EXCEPTION_OR_NMI => {
                let info = read(EXIT_INTERRUPTION_INFO);
                if (info >> 8) & 0x7 == INTR_INFO_TYPE_NMI {
                    Exit::Preempted
                } else {
                    let error_code = if info & INTR_INFO_ERROR_VALID != 0 {
                        read(EXIT_INTERRUPTION_ERROR_CODE) as u32
                    } else {
                        0
                    };
                    // A #PF's exit qualification is its linear address (SDM Vol. 3C 28.2.1).
                    let address = if info as u8 == 14 { qualification } else { 0 };
                    Exit::Exception { vector: info as u8, error_code, address }
                }
            }
            EXIT_TRIPLE_FAULT => Exit::TripleFault,
            // Qualification bit 3: 1 = IN; bits 31:16: the port (SDM Vol. 3C 28.2.1, table 28-5).
            EXIT_IO => Exit::Io { port: (qualification >> 16) as u16, write: qualification & (1 << 3) == 0 },
            EXIT_RDMSR | EXIT_WRMSR => Exit::Msr { msr: vcpu.regs.rcx as u32, write: basic == EXIT_WRMSR },
            EXIT_INVD | EXIT_VMX_FIRST..=EXIT_VMX_LAST | EXIT_INVEPT | EXIT_INVVPID | EXIT_CR_ACCESS
            | EXIT_MOV_DR | EXIT_XSETBV => Exit::Forbidden { code: basic as u64 },
            EXIT_EPT_MISCONFIG => Exit::Other { code: basic as u64 },
            _ => Exit::Other { code: reason },
        }
    }

    fn regs(vcpu: &mut Vcpu) -> &mut Regs {
        &mut vcpu.regs
    }

    fn guest_cr3(vcpu: &mut Vcpu) -> Option<u64> {
        // Only ever asked after an exit of this vCPU, whose VMCS is then current.
        let _ = vcpu;
        let long_paging = read(GUEST_EFER) & EFER_LMA != 0 && read(GUEST_CR0) & CR0_PG != 0;
        (long_paging && read(GUEST_CR4) & CR4_LA57 == 0).then(|| read(GUEST_CR3))
    }

    fn flush_second_level(&mut self, vcpu: &mut Vcpu) {
        self.invept(vcpu.eptp);
    }

    fn interruptible(vcpu: &mut Vcpu) -> bool {
        vcpu.rflags & RFLAGS_IF != 0 && vcpu.interruptibility & INTERRUPTIBILITY_STI_MOV_SS == 0 && vcpu.inject.0 == 0
    }

    fn has_idt(vcpu: &mut Vcpu) -> bool {
        vcpu.idtr_limit != 0
    }

    fn inject_interrupt(vcpu: &mut Vcpu, vector: u8) {
        vcpu.inject = (INTR_INFO_VALID | vector as u64, 0, 0); // type 0: external interrupt
    }

    fn interrupt_window(vcpu: &mut Vcpu, on: bool) {
        vcpu.window = on;
    }

    fn guest_exceptions(vcpu: &mut Vcpu, mask: u32) {
        vcpu.exceptions = mask;
    }

    fn destroy_vcpu(&mut self, mut vcpu: Vcpu) {
        let frames = &Frames::here();
        self.destroy_vcpu_inner(&mut vcpu);
        frames.free(vcpu.vmcs.pa(), Order::BASE);
    }
}

impl Vmx {
    /// VMPTRLD `vcpu`'s VMCS unless it is already current.
    fn make_current(&mut self, vcpu: &Vcpu) -> Result<(), VmFail> {
        if self.current != Some(vcpu.vmcs.pa()) {
            vcpu.vmcs.load()?;
            self.current = Some(vcpu.vmcs.pa());
        }
        Ok(())
    }

    /// Writes what the vCPU's events ask of the next entry into its (current) VMCS: the
    /// event to inject, interrupt-window exiting, the exception bitmap (SDM Vol. 3C 26.6).
    /// Only what changed is written (every VMWRITE counts on each entry): the event only
    /// where there is one, since every VM exit clears the valid bit of ENTRY_INTERRUPTION_INFO
    /// (SDM Vol. 3C, "VM-Entry Controls for Event Injection") and the setup wrote it 0; the
    /// controls and the bitmap where they differ from what this VMCS last got (`written`).
    // Inlined (every entry runs it): LLVM's own choice put it out of line once the VM layer
    // grew (branch `slicegate`), which cost 5-6 Bochs ticks per null exit (`cargo xtask
    // bench exits`).
    #[inline]
    fn write_events(&self, vcpu: &mut Vcpu) -> Result<(), VmFail> {
        let (info, error, len) = vcpu.inject;
        if info != 0 {
            write(ENTRY_INTERRUPTION_INFO, info)?;
            write(ENTRY_EXCEPTION_ERROR_CODE, error)?;
            if (info >> 8) & 7 >= INTR_INFO_TYPE_SOFTWARE_FIRST {
                write(ENTRY_INSTRUCTION_LEN, len)?;
            }
        }
        // VM entry delivers it or the exit reports it again as IDT-vectoring information.
        vcpu.inject = (0, 0, 0);
        let window = if vcpu.window { formats::vmx_caps::PROC_INTERRUPT_WINDOW_EXITING } else { 0 };
        let want = ((self.proc | window) as u64, !vcpu.exceptions as u64);
        if want.0 != vcpu.written.0 {
            write(PROC_CONTROLS, want.0)?;
        }
        if want.1 != vcpu.written.1 {
            write(EXCEPTION_BITMAP, want.1)?;
        }
        vcpu.written = want;
        Ok(())
    }

    /// VMCLEAR: the CPU lets go of the VMCS before its frame is freed (SDM Vol. 3C 25.11.1).
    fn destroy_vcpu_inner(&mut self, vcpu: &mut Vcpu) {
        if let Err(e) = vcpu.vmcs.clear() {
            log::error!(target: "vmx", "VMCLEAR of VMCS {:#x}: {e}", vcpu.vmcs.pa().as_u64());
        }
        if self.current == Some(vcpu.vmcs.pa()) {
            self.current = None;
        }
    }

    /// INVEPT for this EPTP (single-context), or for all (SDM Vol. 3C 29.4.3.1).
    fn invept(&self, eptp: u64) {
        let descriptor: [u64; 2] = [eptp, 0];
        let (cf, zf): (u8, u8);
        // SAFETY: INVEPT only drops cached translations; the descriptor is 16 readable bytes.
        unsafe {
            asm!("invept {t}, [{d}]", "setc {cf}", "setz {zf}", t = in(reg) self.invept_type,
                d = in(reg) descriptor.as_ptr(), cf = out(reg_byte) cf, zf = out(reg_byte) zf,
                options(nostack))
        };
        if let Err(e) = check(cf, zf) {
            log::error!(target: "vmx", "INVEPT type {} for EPTP {eptp:#x}: {e}", self.invept_type);
        }
    }

}
