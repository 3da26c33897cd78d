//! Intel VT-x backend: VMXON, one VMCS per guest, EPT, VPIDs, VMCALL.
//! Preemption: the VMX-preemption timer (or, where the CPU lacks it, the host's LAPIC timer
//! with external-interrupt exiting).
//! References: Intel SDM Vol. 3C chapters 24-31, Vol. 3D appendices A-C.

pub mod caps;
mod switch;
mod vmcs;

use crate::arch::gdt;
use crate::cpu::{CpuFacts, Extension};
use crate::frames::Frames;
use crate::vm::fpu::FpuState;
use crate::vm::{Backend, BackendError, Exit, Regs, VcpuSetup};
use caps::{
    adjust, allowed0, allowed1, fix_cr, BASIC_32BIT_ADDRESSES, BASIC_REVISION_MASK, BASIC_TRUE_CONTROLS,
    EPT_2M_PAGES, EPT_INVEPT, EPT_INVEPT_ALL, EPT_INVEPT_SINGLE, EPT_MEMTYPE_WB, EPT_WALK_4,
    FEATURE_CONTROL_LOCK, FEATURE_CONTROL_VMX_OUTSIDE_SMX, IA32_FEATURE_CONTROL, IA32_VMX_BASIC,
    IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1, IA32_VMX_CR4_FIXED0, IA32_VMX_CR4_FIXED1, IA32_VMX_ENTRY_CTLS,
    IA32_VMX_EPT_VPID_CAP, IA32_VMX_EXIT_CTLS, IA32_VMX_MISC, IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS,
    IA32_VMX_PROCBASED_CTLS2, IA32_VMX_TRUE_ENTRY_CTLS, IA32_VMX_TRUE_EXIT_CTLS, IA32_VMX_TRUE_PINBASED_CTLS,
    IA32_VMX_TRUE_PROCBASED_CTLS, MISC_TIMER_RATE_MASK,
};
use core::arch::asm;
use morsel::{Ept, FrameAlloc, HostPhysAddr};
use vmcs::*;

const IA32_EFER: u32 = 0xc000_0080;
const IA32_FS_BASE: u32 = 0xc000_0100;
const IA32_GS_BASE: u32 = 0xc000_0101;
const IA32_PAT: u32 = 0x277;
const CR4_VMXE: u64 = 1 << 13;

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
}

/// Says which control a capability MSR does not allow.
fn require(ok: bool, what: &'static str) -> Result<(), BackendError> {
    if ok { Ok(()) } else { Err(BackendError::Missing(what)) }
}

impl Backend for Vmx {
    type Format = Ept;
    type Vcpu = Vcpu;
    const NAME: &'static str = "vmx";

    fn enable(facts: &CpuFacts, frames: &Frames) -> Result<Self, BackendError> {
        require(facts.extension == Extension::Vmx, "VMX (CPUID.1:ECX bit 5)")?;
        require(facts.second_level, "EPT (IA32_VMX_PROCBASED_CTLS2 bit 1)")?;
        require(facts.tagged_tlb, "VPID (IA32_VMX_PROCBASED_CTLS2 bit 5)")?;
        // IA32_FEATURE_CONTROL: lock it with VMX on if the firmware left it open (SDM Vol. 3C 24.7).
        let fc = caps::read(IA32_FEATURE_CONTROL);
        if fc & FEATURE_CONTROL_LOCK == 0 {
            // SAFETY: the MSR exists with VMX (checked) and is unlocked; setting the enable
            // and lock bits has no other effect.
            unsafe {
                x86::msr::wrmsr(IA32_FEATURE_CONTROL, fc | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX)
            };
        } else if fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
            return Err(BackendError::Disabled("VMX outside SMX (IA32_FEATURE_CONTROL bit 2)"));
        }

        // VMCS layout and memory type (SDM Vol. 3D A.1).
        let basic = caps::read(IA32_VMX_BASIC);
        let revision = (basic & BASIC_REVISION_MASK) as u32;
        require((basic >> 32) & 0x1fff <= 4096, "a VMCS that fits in 4 KiB (IA32_VMX_BASIC[44:32])")?;
        require(basic & BASIC_32BIT_ADDRESSES == 0, "64-bit VMCS addresses (IA32_VMX_BASIC bit 48)")?;
        require((basic >> 50) & 0xf == 6, "write-back VMCS memory (IA32_VMX_BASIC[53:50])")?;
        let true_ctls = basic & BASIC_TRUE_CONTROLS != 0;
        let cap = |plain, true_msr| caps::read(if true_ctls { true_msr } else { plain });
        let pin_cap = cap(IA32_VMX_PINBASED_CTLS, IA32_VMX_TRUE_PINBASED_CTLS);
        let proc_cap = cap(IA32_VMX_PROCBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS);
        let exit_cap = cap(IA32_VMX_EXIT_CTLS, IA32_VMX_TRUE_EXIT_CTLS);
        let entry_cap = cap(IA32_VMX_ENTRY_CTLS, IA32_VMX_TRUE_ENTRY_CTLS);
        let proc2_cap = caps::read(IA32_VMX_PROCBASED_CTLS2);

        // EPT as the morsel tables are built: 4 levels, write-back, 2 MiB leaves (SDM Vol. 3D A.10).
        let ept = caps::read(IA32_VMX_EPT_VPID_CAP);
        require(ept & EPT_WALK_4 != 0, "4-level EPT (IA32_VMX_EPT_VPID_CAP bit 6)")?;
        require(ept & EPT_MEMTYPE_WB != 0, "write-back EPT (IA32_VMX_EPT_VPID_CAP bit 14)")?;
        require(ept & EPT_2M_PAGES != 0, "2 MiB EPT pages (IA32_VMX_EPT_VPID_CAP bit 16)")?;
        require(ept & EPT_INVEPT != 0 && ept & (EPT_INVEPT_SINGLE | EPT_INVEPT_ALL) != 0,
            "INVEPT (IA32_VMX_EPT_VPID_CAP bits 20, 25, 26)")?;
        let invept_type = if ept & EPT_INVEPT_SINGLE != 0 { INVEPT_SINGLE } else { INVEPT_ALL };

        // Pin-based: external interrupts and NMIs exit; the preemption timer ends the slice.
        require(allowed1(pin_cap, PIN_EXTERNAL_INTERRUPT_EXITING), "external-interrupt exiting")?;
        let has_timer = allowed1(pin_cap, PIN_PREEMPTION_TIMER);
        let mut pin = PIN_EXTERNAL_INTERRUPT_EXITING | PIN_NMI_EXITING;
        if has_timer {
            pin |= PIN_PREEMPTION_TIMER;
        }
        let pin = adjust(pin_cap, pin);
        // Primary: HLT and every port exit, no I/O or MSR bitmaps (so every RDMSR/WRMSR
        // exits), secondary controls on (SDM Vol. 3C 26.1.3).
        let want = PROC_HLT_EXITING | PROC_UNCONDITIONAL_IO_EXITING | PROC_SECONDARY_CONTROLS;
        require(allowed1(proc_cap, want), "HLT exiting, unconditional I/O exiting and secondary controls")?;
        require(allowed0(proc_cap, PROC_USE_IO_BITMAPS | PROC_USE_MSR_BITMAPS), "VMX without I/O and MSR bitmaps")?;
        // Bits not asked for (CR3 load/store exiting among them) stay 0 where allowed.
        let proc = adjust(proc_cap, want);
        let proc2 = PROC2_ENABLE_EPT | PROC2_ENABLE_VPID;
        require(allowed1(proc2_cap, proc2), "EPT and VPID secondary controls")?;
        let proc2 = adjust(proc2_cap, proc2);
        // Exit: return to 64-bit mode, swap EFER (and PAT where possible); no interrupt
        // acknowledge, so a pending interrupt stays with the APIC for the host's handler.
        let want = EXIT_HOST_ADDRESS_SPACE_SIZE | EXIT_SAVE_EFER | EXIT_LOAD_EFER;
        require(allowed1(exit_cap, want), "64-bit host and EFER switching on VM exit")?;
        let pat = allowed1(exit_cap, EXIT_SAVE_PAT | EXIT_LOAD_PAT) && allowed1(entry_cap, ENTRY_LOAD_PAT);
        let mut exit = want;
        if pat {
            exit |= EXIT_SAVE_PAT | EXIT_LOAD_PAT;
        }
        if has_timer && allowed1(exit_cap, EXIT_SAVE_PREEMPTION_TIMER) {
            exit |= EXIT_SAVE_PREEMPTION_TIMER;
        }
        require(allowed0(exit_cap, EXIT_ACK_INTERRUPT), "VM exits without interrupt acknowledge")?;
        let exit = adjust(exit_cap, exit);
        // Entry: IA-32e mode guest with its own EFER (SDM Vol. 3C 27.3.1.1).
        let want = ENTRY_IA32E_MODE_GUEST | ENTRY_LOAD_EFER;
        require(allowed1(entry_cap, want), "IA-32e mode guests and EFER loading on VM entry")?;
        let entry = adjust(entry_cap, want | if pat { ENTRY_LOAD_PAT } else { 0 });

        // CR0/CR4 fixed bits, CR4.VMXE, then VMXON (SDM Vol. 3C 24.8).
        let cr0_fixed = (caps::read(IA32_VMX_CR0_FIXED0), caps::read(IA32_VMX_CR0_FIXED1));
        let cr4_fixed = (caps::read(IA32_VMX_CR4_FIXED0), caps::read(IA32_VMX_CR4_FIXED1));
        let cr0 = fix_cr(read_cr0(), cr0_fixed.0, cr0_fixed.1);
        let cr4 = fix_cr(read_cr4() | CR4_VMXE, cr4_fixed.0, cr4_fixed.1);
        // SAFETY: the fixed bits only force what VMX operation requires of a host that
        // already runs in 64-bit paged mode (PE, PG, NE; VMXE).
        unsafe {
            asm!("mov cr0, {}", in(reg) cr0, options(nostack));
            asm!("mov cr4, {}", in(reg) cr4, options(nostack));
        }
        let region = frames.alloc_zeroed(0).ok_or(BackendError::NoMemory)?;
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
            frames.free(region, 0);
            return Err(BackendError::Failed("VMXON", if cf != 0 { u64::MAX } else { 0 }));
        }

        let misc = caps::read(IA32_VMX_MISC);
        let timer_rate = has_timer.then_some((misc & MISC_TIMER_RATE_MASK) as u32);
        match timer_rate {
            Some(rate) => log::info!(target: "vmx",
                "VMX enabled: VMCS revision {revision:#x}, EPT 4-level WB, VPID, preemption timer at TSC/2^{rate}, INVEPT {}",
                if invept_type == INVEPT_SINGLE { "single-context" } else { "all-context" }),
            None => {
                // External-interrupt exiting then ends the slice. Bochs 2.7 leaves INTR masked
                // in a guest entered with RFLAGS.IF = 0 (as ours are) although the SDM says IF
                // does not block it (26.3): this path was seen to work there only with IF = 1.
                crate::apic::start_periodic_timer_us(crate::vm::sched::SLICE_US);
                log::info!(target: "vmx",
                    "VMX enabled: VMCS revision {revision:#x}, EPT 4-level WB, VPID, no preemption timer (LAPIC timer slices)")
            }
        }
        log::info!(target: "vmx", "controls: pin {pin:#x} proc {proc:#x} proc2 {proc2:#x} exit {exit:#x} entry {entry:#x}");
        Ok(Vmx { revision, pin, proc, proc2, exit, entry, cr0_fixed, cr4_fixed, timer_rate, invept_type, current: None })
    }

    fn create_vcpu(&mut self, s: &VcpuSetup, frames: &Frames) -> Result<Vcpu, BackendError> {
        let vpid = s.id + 1; // VPID 0 belongs to the host (SDM Vol. 3C 29.1)
        require(vpid <= 0xffff, "a free VPID")?;
        let frame = frames.alloc_zeroed(0).ok_or(BackendError::NoMemory)?;
        let vmcs = match Vmcs::new(frame, self.revision).and_then(|v| v.load().map(|()| v)) {
            Ok(v) => v,
            Err(e) => {
                frames.free(frame, 0);
                return Err(BackendError::Failed("VMCLEAR/VMPTRLD", e.code()));
            }
        };
        self.current = Some(frame);
        // EPTP: WB memory type in 2:0, page-walk length - 1 in 5:3 (SDM Vol. 3C 25.6.11).
        let eptp = s.second_level_root.as_u64() | 6 | ((4 - 1) << 3);
        let mut vcpu = Vcpu {
            vmcs,
            eptp,
            regs: Regs { rip: s.rip, rsp: s.rsp, rdi: s.rdi, ..Regs::default() },
            fpu: FpuState::initial(),
            launched: false,
            flush: true,
        };
        if let Err(e) = self.init_vmcs(s, vpid as u64, eptp) {
            self.destroy_vcpu_inner(&mut vcpu);
            frames.free(vcpu.vmcs.pa(), 0);
            return Err(e);
        }
        Ok(vcpu)
    }

    fn run(&mut self, vcpu: &mut Vcpu, slice_us: u64) -> Exit {
        if let Err(e) = self.make_current(vcpu) {
            log::error!(target: "vmx", "VMPTRLD failed: {e}");
            return Exit::EntryFailed { code: e.code(), qualification: 0 };
        }
        if vcpu.flush {
            self.invept(vcpu.eptp);
            vcpu.flush = false;
        }
        let timer = self.timer_rate.map(|rate| ((slice_us * crate::time::tsc_per_us()) >> rate).clamp(1, u32::MAX as u64));
        let prepared = write(GUEST_RIP, vcpu.regs.rip)
            .and_then(|()| write(GUEST_RSP, vcpu.regs.rsp))
            .and_then(|()| timer.map_or(Ok(()), |t| write(PREEMPTION_TIMER_VALUE, t)));
        if let Err(e) = prepared {
            log::error!(target: "vmx", "VMWRITE before entry failed: {e}");
            return Exit::EntryFailed { code: e.code(), qualification: 0 };
        }
        // SAFETY: the VMCS is current and was set up by create_vcpu (host state, guest state,
        // an EPT that maps only the guest's memory); `launched` tracks its launch state.
        let status = unsafe { switch::run(&mut vcpu.regs, vcpu.launched, &mut vcpu.fpu) };
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
        vcpu.regs.rip = read(GUEST_RIP);
        vcpu.regs.rsp = read(GUEST_RSP);
        let next_rip = vcpu.regs.rip + read(EXIT_INSTRUCTION_LEN);
        let basic = (reason & 0xffff) as u32;
        match basic {
            EXIT_VMCALL => Exit::Hypercall { next_rip },
            EXIT_CPUID => Exit::Cpuid { next_rip },
            EXIT_HLT => Exit::Halt { next_rip },
            EXIT_PREEMPTION_TIMER => Exit::Preempted,
            EXIT_EXTERNAL_INTERRUPT => {
                // Not acknowledged on exit: open a one-instruction window so the host's
                // handler takes it (and sends EOI), then close it again.
                // SAFETY: the host's IDT handles every vector on IST stacks.
                unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
                Exit::Preempted
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
            EXIT_INVD | EXIT_VMX_FIRST..=EXIT_VMX_LAST | EXIT_INVEPT | EXIT_INVVPID => Exit::Forbidden { code: basic as u64 },
            EXIT_EPT_MISCONFIG => Exit::Other { code: basic as u64 },
            _ => Exit::Other { code: reason },
        }
    }

    fn regs(vcpu: &mut Vcpu) -> &mut Regs {
        &mut vcpu.regs
    }

    fn flush_second_level(&mut self, vcpu: &mut Vcpu) {
        self.invept(vcpu.eptp);
    }

    fn destroy_vcpu(&mut self, mut vcpu: Vcpu, frames: &Frames) {
        self.destroy_vcpu_inner(&mut vcpu);
        frames.free(vcpu.vmcs.pa(), 0);
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

    /// Writes controls, host state and the guest's initial state into the current VMCS.
    fn init_vmcs(&self, s: &VcpuSetup, vpid: u64, eptp: u64) -> Result<(), BackendError> {
        // Host state (SDM Vol. 3C 25.5, checked as in 27.2.2-27.2.3). RSP and RIP: switch.rs.
        let mut idtr = [0u8; 10];
        // SAFETY: SIDT stores 10 bytes into the buffer.
        unsafe { asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack)) };
        let idt_base = u64::from_le_bytes(idtr[2..10].try_into().unwrap_or([0; 8]));
        // SAFETY: these MSRs exist on every x86-64 CPU (PAT since P6); reads have no side effects.
        let (efer, fs_base, gs_base, pat) = unsafe {
            use x86::msr::rdmsr;
            (rdmsr(IA32_EFER), rdmsr(IA32_FS_BASE), rdmsr(IA32_GS_BASE), rdmsr(IA32_PAT))
        };
        let host = [
            (HOST_CR0, read_cr0()),
            (HOST_CR3, read_cr3()),
            (HOST_CR4, read_cr4()),
            (HOST_CS_SEL, gdt::KERNEL_CS as u64),
            (HOST_SS_SEL, gdt::KERNEL_DS as u64),
            (HOST_DS_SEL, gdt::KERNEL_DS as u64),
            (HOST_ES_SEL, gdt::KERNEL_DS as u64),
            (HOST_FS_SEL, gdt::KERNEL_DS as u64),
            (HOST_GS_SEL, gdt::KERNEL_DS as u64),
            (HOST_TR_SEL, gdt::TSS_SEL as u64),
            (HOST_FS_BASE, fs_base),
            (HOST_GS_BASE, gs_base),
            (HOST_TR_BASE, gdt::tss_base()),
            (HOST_GDTR_BASE, gdt::gdt_base()),
            (HOST_IDTR_BASE, idt_base),
            (HOST_SYSENTER_CS, 0),
            (HOST_SYSENTER_ESP, 0),
            (HOST_SYSENTER_EIP, 0),
            (HOST_EFER, efer),
        ];
        // Controls (SDM Vol. 3C 25.6-25.8). Every exception exits: guests have no IDT.
        let controls = [
            (PIN_CONTROLS, self.pin as u64),
            (PROC_CONTROLS, self.proc as u64),
            (PROC_CONTROLS2, self.proc2 as u64),
            (EXIT_CONTROLS, self.exit as u64),
            (ENTRY_CONTROLS, self.entry as u64),
            (EXCEPTION_BITMAP, 0xffff_ffff),
            (PF_ERROR_CODE_MASK, 0),
            (PF_ERROR_CODE_MATCH, 0),
            (CR3_TARGET_COUNT, 0),
            (EXIT_MSR_STORE_COUNT, 0),
            (EXIT_MSR_LOAD_COUNT, 0),
            (ENTRY_MSR_LOAD_COUNT, 0),
            (ENTRY_INTERRUPTION_INFO, 0),
            (VPID, vpid),
            (EPT_POINTER, eptp),
            (VMCS_LINK_POINTER, u64::MAX),
        ];
        // Guest state: 64-bit mode with paging through the guest's identity map (SDM Vol. 3C
        // 25.4, checked as in 27.3.1). CR4.VMXE is forced by the fixed bits; the guest
        // reads its CR4 through a shadow without it.
        let cr0 = fix_cr(0x8000_0033, self.cr0_fixed.0, self.cr0_fixed.1); // PG, NE, ET, MP, PE
        let cr4_visible = (1 << 5) | (1 << 9) | (1 << 10); // PAE, OSFXSR, OSXMMEXCPT
        let cr4 = fix_cr(cr4_visible, self.cr4_fixed.0, self.cr4_fixed.1);
        let guest = [
            (GUEST_CR0, cr0),
            (GUEST_CR3, s.cr3),
            (GUEST_CR4, cr4),
            (CR0_GUEST_HOST_MASK, 0),
            (CR0_READ_SHADOW, cr0),
            (CR4_GUEST_HOST_MASK, CR4_VMXE),
            (CR4_READ_SHADOW, cr4 & !CR4_VMXE),
            (GUEST_EFER, (1 << 8) | (1 << 10)), // LME, LMA
            (GUEST_CS_SEL, 0x08),
            (GUEST_CS_AR, AR_CODE64 as u64),
            (GUEST_CS_LIMIT, 0xffff_ffff),
            (GUEST_CS_BASE, 0),
            (GUEST_TR_SEL, 0x18),
            (GUEST_TR_AR, AR_TSS64_BUSY as u64),
            (GUEST_TR_LIMIT, 0x67),
            (GUEST_TR_BASE, 0),
            (GUEST_LDTR_SEL, 0),
            (GUEST_LDTR_AR, AR_UNUSABLE as u64),
            (GUEST_LDTR_LIMIT, 0),
            (GUEST_LDTR_BASE, 0),
            (GUEST_GDTR_BASE, 0),
            (GUEST_GDTR_LIMIT, 0),
            (GUEST_IDTR_BASE, 0),
            (GUEST_IDTR_LIMIT, 0),
            (GUEST_DR7, 0x400),
            (GUEST_DEBUGCTL, 0),
            (GUEST_RFLAGS, 0x2),
            (GUEST_RSP, s.rsp),
            (GUEST_RIP, s.rip),
            (GUEST_PENDING_DEBUG, 0),
            (GUEST_INTERRUPTIBILITY, 0),
            (GUEST_ACTIVITY_STATE, 0),
            (GUEST_SYSENTER_CS, 0),
            (GUEST_SYSENTER_ESP, 0),
            (GUEST_SYSENTER_EIP, 0),
        ];
        let data_segments = [
            (GUEST_SS_SEL, GUEST_SS_AR, GUEST_SS_LIMIT, GUEST_SS_BASE),
            (GUEST_DS_SEL, GUEST_DS_AR, GUEST_DS_LIMIT, GUEST_DS_BASE),
            (GUEST_ES_SEL, GUEST_ES_AR, GUEST_ES_LIMIT, GUEST_ES_BASE),
            (GUEST_FS_SEL, GUEST_FS_AR, GUEST_FS_LIMIT, GUEST_FS_BASE),
            (GUEST_GS_SEL, GUEST_GS_AR, GUEST_GS_LIMIT, GUEST_GS_BASE),
        ];
        let segments = data_segments.iter().flat_map(|&(sel, ar, limit, base)| {
            [(sel, 0x10), (ar, AR_DATA as u64), (limit, 0xffff_ffff), (base, 0)]
        });
        // PAT fields only where the controls that use them are on (the reset value for the guest).
        let pat_fields = (self.entry & ENTRY_LOAD_PAT != 0)
            .then_some([(GUEST_PAT, 0x0007_0406_0007_0406), (HOST_PAT, pat)])
            .into_iter()
            .flatten();
        for (field, value) in host.into_iter().chain(controls).chain(guest).chain(segments).chain(pat_fields) {
            write(field, value).map_err(|e| {
                log::error!(target: "vmx", "VMWRITE of field {:#x}: {e}", field.0);
                BackendError::Failed("VMWRITE", e.code())
            })?;
        }
        Ok(())
    }
}

fn read_cr0() -> u64 {
    let v;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

fn read_cr3() -> u64 {
    let v;
    // SAFETY: as for read_cr0.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

fn read_cr4() -> u64 {
    let v;
    // SAFETY: as for read_cr0.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}
