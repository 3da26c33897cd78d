//! The VMCS contents of a new vCPU: controls from the probed capabilities, the host state a
//! VM exit returns to (this CPU's own GDT, TSS, IDT, page tables, segment bases, EFER and
//! PAT), and the guest's initial state: 64-bit mode with paging through its identity map
//! (Intel SDM Vol. 3C 25.4-25.8, checked as in 27.2-27.3).

use super::caps::{fix_cr, ENTRY_LOAD_PAT};
use super::vmcs::*;
use super::{Vmx, CR4_VMXE, IA32_EFER, IA32_FS_BASE, IA32_GS_BASE, IA32_PAT};
use crate::arch::gdt;
use crate::vm::{BackendError, VcpuSetup};
use core::arch::asm;

impl Vmx {
    /// Writes controls, host state and the guest's initial state into the current VMCS.
    pub(super) fn init_vmcs(&self, s: &VcpuSetup, vpid: u64, eptp: u64) -> Result<(), BackendError> {
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
            // Every CR4 bit is host-owned: a guest's MOV to CR4 that changes one exits and
            // stops the guest (CR4 would enable state that VM exits do not switch: PKRU
            // with PKE). CR4.VMXE is hidden by the shadow.
            (CR4_GUEST_HOST_MASK, u64::MAX),
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
            // IF = 1 (as under SVM): no interrupt is ever injected, so the guest's IF only
            // matters to HLT (IF = 0 would never wake) and to Bochs, which does not take the
            // external-interrupt exit while a guest has IF = 0.
            (GUEST_RFLAGS, 0x202),
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

pub(super) fn read_cr0() -> u64 {
    let v;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

pub(super) fn read_cr3() -> u64 {
    let v;
    // SAFETY: as for read_cr0.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

pub(super) fn read_cr4() -> u64 {
    let v;
    // SAFETY: as for read_cr0.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}
