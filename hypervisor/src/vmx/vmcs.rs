//! The VMCS (Intel SDM Vol. 3C chapter 25): a 4 KiB region the CPU owns while it is
//! current, accessed only through VMREAD/VMWRITE by field encoding (SDM Vol. 3D appendix B).
//! Here: the encodings used, the control and exit-reason bits, and one small wrapper for
//! VMCLEAR/VMPTRLD/VMREAD/VMWRITE that turns VMfail into a `VmFail`.

use core::arch::asm;
use core::fmt;
use morsel::HostPhysAddr;

/// A VMCS field encoding (SDM Vol. 3D B.1-B.4; bits 14:13 give the width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field(pub u32);

// 16-bit fields (SDM Vol. 3D B.1).
pub const VPID: Field = Field(0x0000);
pub const GUEST_ES_SEL: Field = Field(0x0800);
pub const GUEST_CS_SEL: Field = Field(0x0802);
pub const GUEST_SS_SEL: Field = Field(0x0804);
pub const GUEST_DS_SEL: Field = Field(0x0806);
pub const GUEST_FS_SEL: Field = Field(0x0808);
pub const GUEST_GS_SEL: Field = Field(0x080a);
pub const GUEST_LDTR_SEL: Field = Field(0x080c);
pub const GUEST_TR_SEL: Field = Field(0x080e);
pub const HOST_ES_SEL: Field = Field(0x0c00);
pub const HOST_CS_SEL: Field = Field(0x0c02);
pub const HOST_SS_SEL: Field = Field(0x0c04);
pub const HOST_DS_SEL: Field = Field(0x0c06);
pub const HOST_FS_SEL: Field = Field(0x0c08);
pub const HOST_GS_SEL: Field = Field(0x0c0a);
pub const HOST_TR_SEL: Field = Field(0x0c0c);

// 64-bit fields (SDM Vol. 3D B.2).
pub const EPT_POINTER: Field = Field(0x201a);
pub const GUEST_PHYSICAL_ADDRESS: Field = Field(0x2400);
pub const VMCS_LINK_POINTER: Field = Field(0x2800);
pub const GUEST_DEBUGCTL: Field = Field(0x2802);
pub const GUEST_PAT: Field = Field(0x2804);
pub const GUEST_EFER: Field = Field(0x2806);
pub const HOST_PAT: Field = Field(0x2c00);
pub const HOST_EFER: Field = Field(0x2c02);

// 32-bit fields (SDM Vol. 3D B.3).
pub const PIN_CONTROLS: Field = Field(0x4000);
pub const PROC_CONTROLS: Field = Field(0x4002);
pub const EXCEPTION_BITMAP: Field = Field(0x4004);
pub const PF_ERROR_CODE_MASK: Field = Field(0x4006);
pub const PF_ERROR_CODE_MATCH: Field = Field(0x4008);
pub const CR3_TARGET_COUNT: Field = Field(0x400a);
pub const EXIT_CONTROLS: Field = Field(0x400c);
pub const EXIT_MSR_STORE_COUNT: Field = Field(0x400e);
pub const EXIT_MSR_LOAD_COUNT: Field = Field(0x4010);
pub const ENTRY_CONTROLS: Field = Field(0x4012);
pub const ENTRY_MSR_LOAD_COUNT: Field = Field(0x4014);
pub const ENTRY_INTERRUPTION_INFO: Field = Field(0x4016);
pub const ENTRY_EXCEPTION_ERROR_CODE: Field = Field(0x4018);
pub const ENTRY_INSTRUCTION_LEN: Field = Field(0x401a);
pub const PROC_CONTROLS2: Field = Field(0x401e);
pub const VM_INSTRUCTION_ERROR: Field = Field(0x4400);
pub const EXIT_REASON: Field = Field(0x4402);
pub const EXIT_INTERRUPTION_INFO: Field = Field(0x4404);
pub const EXIT_INTERRUPTION_ERROR_CODE: Field = Field(0x4406);
pub const IDT_VECTORING_INFO: Field = Field(0x4408);
pub const IDT_VECTORING_ERROR_CODE: Field = Field(0x440a);
pub const EXIT_INSTRUCTION_LEN: Field = Field(0x440c);
pub const GUEST_ES_LIMIT: Field = Field(0x4800);
pub const GUEST_CS_LIMIT: Field = Field(0x4802);
pub const GUEST_SS_LIMIT: Field = Field(0x4804);
pub const GUEST_DS_LIMIT: Field = Field(0x4806);
pub const GUEST_FS_LIMIT: Field = Field(0x4808);
pub const GUEST_GS_LIMIT: Field = Field(0x480a);
pub const GUEST_LDTR_LIMIT: Field = Field(0x480c);
pub const GUEST_TR_LIMIT: Field = Field(0x480e);
pub const GUEST_GDTR_LIMIT: Field = Field(0x4810);
pub const GUEST_IDTR_LIMIT: Field = Field(0x4812);
pub const GUEST_ES_AR: Field = Field(0x4814);
pub const GUEST_CS_AR: Field = Field(0x4816);
pub const GUEST_SS_AR: Field = Field(0x4818);
pub const GUEST_DS_AR: Field = Field(0x481a);
pub const GUEST_FS_AR: Field = Field(0x481c);
pub const GUEST_GS_AR: Field = Field(0x481e);
pub const GUEST_LDTR_AR: Field = Field(0x4820);
pub const GUEST_TR_AR: Field = Field(0x4822);
pub const GUEST_INTERRUPTIBILITY: Field = Field(0x4824);
pub const GUEST_ACTIVITY_STATE: Field = Field(0x4826);
pub const GUEST_SYSENTER_CS: Field = Field(0x482a);
pub const PREEMPTION_TIMER_VALUE: Field = Field(0x482e);
pub const HOST_SYSENTER_CS: Field = Field(0x4c00);

// Natural-width fields (SDM Vol. 3D B.4).
pub const CR0_GUEST_HOST_MASK: Field = Field(0x6000);
pub const CR4_GUEST_HOST_MASK: Field = Field(0x6002);
pub const CR0_READ_SHADOW: Field = Field(0x6004);
pub const CR4_READ_SHADOW: Field = Field(0x6006);
pub const EXIT_QUALIFICATION: Field = Field(0x6400);
pub const GUEST_CR0: Field = Field(0x6800);
pub const GUEST_CR3: Field = Field(0x6802);
pub const GUEST_CR4: Field = Field(0x6804);
pub const GUEST_ES_BASE: Field = Field(0x6806);
pub const GUEST_CS_BASE: Field = Field(0x6808);
pub const GUEST_SS_BASE: Field = Field(0x680a);
pub const GUEST_DS_BASE: Field = Field(0x680c);
pub const GUEST_FS_BASE: Field = Field(0x680e);
pub const GUEST_GS_BASE: Field = Field(0x6810);
pub const GUEST_LDTR_BASE: Field = Field(0x6812);
pub const GUEST_TR_BASE: Field = Field(0x6814);
pub const GUEST_GDTR_BASE: Field = Field(0x6816);
pub const GUEST_IDTR_BASE: Field = Field(0x6818);
pub const GUEST_DR7: Field = Field(0x681a);
pub const GUEST_RSP: Field = Field(0x681c);
pub const GUEST_RIP: Field = Field(0x681e);
pub const GUEST_RFLAGS: Field = Field(0x6820);
pub const GUEST_PENDING_DEBUG: Field = Field(0x6822);
pub const GUEST_SYSENTER_ESP: Field = Field(0x6824);
pub const GUEST_SYSENTER_EIP: Field = Field(0x6826);
pub const HOST_CR0: Field = Field(0x6c00);
pub const HOST_CR3: Field = Field(0x6c02);
pub const HOST_CR4: Field = Field(0x6c04);
pub const HOST_FS_BASE: Field = Field(0x6c06);
pub const HOST_GS_BASE: Field = Field(0x6c08);
pub const HOST_TR_BASE: Field = Field(0x6c0a);
pub const HOST_GDTR_BASE: Field = Field(0x6c0c);
pub const HOST_IDTR_BASE: Field = Field(0x6c0e);
pub const HOST_SYSENTER_ESP: Field = Field(0x6c10);
pub const HOST_SYSENTER_EIP: Field = Field(0x6c12);
/// Written by the world switch right before VMLAUNCH/VMRESUME.
pub const HOST_RSP: Field = Field(0x6c14);
/// Written by the world switch: the label after VMLAUNCH/VMRESUME.
pub const HOST_RIP: Field = Field(0x6c16);

// The control bits live with the capability decision (formats::vmx_caps).

/// Guest segment access rights: descriptor bits 40-47 in 7:0, 52-55 in 15:12, bit 16
/// "unusable" (SDM Vol. 3C 25.4.1, table 25-2).
pub const AR_CODE64: u32 = 0xa09b; // present, code r/x accessed, L, G
pub const AR_DATA: u32 = 0xc093; // present, data r/w accessed, D/B, G
pub const AR_TSS64_BUSY: u32 = 0x008b; // present, busy 64-bit TSS
pub const AR_UNUSABLE: u32 = 1 << 16;

// Basic exit reasons (SDM Vol. 3D appendix C).
pub const EXIT_EXCEPTION_OR_NMI: u32 = 0;
pub const EXIT_EXTERNAL_INTERRUPT: u32 = 1;
pub const EXIT_TRIPLE_FAULT: u32 = 2;
pub const EXIT_INTERRUPT_WINDOW: u32 = 7;
pub const EXIT_CPUID: u32 = 10;
pub const EXIT_HLT: u32 = 12;
/// Control-register access (here: CR8, with CR8 load/store exiting).
pub const EXIT_CR_ACCESS: u32 = 28;
pub const EXIT_MOV_DR: u32 = 29;
/// XSETBV exits unconditionally (SDM Vol. 3C 26.1.2).
pub const EXIT_XSETBV: u32 = 55;
pub const EXIT_INVD: u32 = 13;
pub const EXIT_VMCALL: u32 = 18;
/// VMCLEAR (19) through VMXON (27): every VMX instruction except VMCALL.
pub const EXIT_VMX_FIRST: u32 = 19;
pub const EXIT_VMX_LAST: u32 = 27;
pub const EXIT_IO: u32 = 30;
pub const EXIT_RDMSR: u32 = 31;
pub const EXIT_WRMSR: u32 = 32;
pub const EXIT_EPT_VIOLATION: u32 = 48;
pub const EXIT_EPT_MISCONFIG: u32 = 49;
pub const EXIT_INVEPT: u32 = 50;
pub const EXIT_PREEMPTION_TIMER: u32 = 52;
pub const EXIT_INVVPID: u32 = 53;
/// Exit reason bit 31: VM-entry failure (SDM Vol. 3C 25.9.1, table 25-17).
pub const EXIT_REASON_ENTRY_FAILURE: u64 = 1 << 31;

/// Exit interruption information (SDM Vol. 3C 25.9.2, table 25-19): vector in 7:0, type in
/// 10:8 (2 = NMI), error code valid in bit 11.
pub const INTR_INFO_TYPE_NMI: u64 = 2;
pub const INTR_INFO_ERROR_VALID: u64 = 1 << 11;
/// Bit 31: the information is valid; the VM-entry and IDT-vectoring information fields have
/// the same format (SDM Vol. 3C 25.8.3, 25.9.3). Types 4-6 (software interrupt, privileged
/// and software exception) need the instruction length at entry.
pub const INTR_INFO_VALID: u64 = 1 << 31;
pub const INTR_INFO_TYPE_SOFTWARE_FIRST: u64 = 4;
/// GUEST_INTERRUPTIBILITY bits 0-1: blocking by STI, by MOV SS (SDM Vol. 3C 25.4.2).
pub const INTERRUPTIBILITY_STI_MOV_SS: u64 = 0b11;

/// Why a VMX instruction failed (SDM Vol. 3C 31.2: VMfailInvalid sets CF, VMfailValid
/// sets ZF and stores an error number, listed in 31.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// No current VMCS (or no VMX operation) to record an error in.
    Invalid,
    /// The VM-instruction error number.
    Valid(u64),
}

impl fmt::Display for VmFail {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            VmFail::Invalid => write!(f, "VMfailInvalid"),
            VmFail::Valid(n) => write!(f, "VM-instruction error {n}"),
        }
    }
}

impl VmFail {
    /// The status word for `BackendError::Failed`: the error number, or `u64::MAX`.
    pub fn code(self) -> u64 {
        match self {
            VmFail::Invalid => u64::MAX,
            VmFail::Valid(n) => n,
        }
    }
}

/// Turns the CF/ZF results of a VMX instruction into a status.
pub fn check(cf: u8, zf: u8) -> Result<(), VmFail> {
    if cf != 0 {
        Err(VmFail::Invalid)
    } else if zf != 0 {
        Err(VmFail::Valid(read(VM_INSTRUCTION_ERROR)))
    } else {
        Ok(())
    }
}

/// Reads a field of the current VMCS (0 if there is none or the field does not exist).
pub fn read(field: Field) -> u64 {
    let value: u64;
    // SAFETY: VMREAD only reads the current VMCS into a register; in VMX root operation
    // a missing VMCS or field only sets the flags.
    unsafe {
        asm!("xor {v:e}, {v:e}", "vmread {v}, {f}", f = in(reg) field.0 as u64, v = out(reg) value,
            options(nostack))
    };
    value
}

/// Writes a field of the current VMCS. Host RSP and RIP are the world switch's to write.
pub fn write(field: Field, value: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: VMWRITE changes only the current VMCS, which takes effect at the next VM entry
    // that this module controls; a bad field or value only sets the flags.
    unsafe {
        asm!("vmwrite {f}, {v}", "setc {cf}", "setz {zf}", f = in(reg) field.0 as u64,
            v = in(reg) value, cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack))
    };
    check(cf, zf)
}

/// A vCPU's VMCS region, owned by one vCPU.
pub struct Vmcs {
    pa: HostPhysAddr,
}

impl Vmcs {
    /// Wraps a zeroed, identity-mapped 4 KiB frame that nothing else uses and stamps it with
    /// the VMCS revision identifier (SDM Vol. 3C 25.2), then VMCLEARs it (launch state clear).
    pub fn new(pa: HostPhysAddr, revision: u32) -> Result<Vmcs, VmFail> {
        // SAFETY: the frame is ours and identity-mapped; bits 30:0 of the first dword hold
        // the revision, bit 31 (shadow VMCS) stays 0.
        unsafe { (pa.as_u64() as *mut u32).write_volatile(revision & 0x7fff_ffff) };
        let vmcs = Vmcs { pa };
        vmcs.clear()?;
        Ok(vmcs)
    }

    pub fn pa(&self) -> HostPhysAddr {
        self.pa
    }

    /// VMCLEAR: writes the CPU's cached state back into the region and marks it clear and
    /// not current (SDM Vol. 3C 25.11.3).
    pub fn clear(&self) -> Result<(), VmFail> {
        let pa = self.pa.as_u64();
        let (cf, zf): (u8, u8);
        // SAFETY: the operand is the address of a u64 holding the region's physical address,
        // a 4 KiB-aligned frame this VMCS owns.
        unsafe {
            asm!("vmclear [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &raw const pa,
                cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack))
        };
        check(cf, zf)
    }

    /// VMPTRLD: makes this VMCS the current one; `read`/`write` then act on it.
    pub fn load(&self) -> Result<(), VmFail> {
        let pa = self.pa.as_u64();
        let (cf, zf): (u8, u8);
        // SAFETY: as for `clear`; the region carries the right revision identifier.
        unsafe {
            asm!("vmptrld [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &raw const pa,
                cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack))
        };
        check(cf, zf)
    }
}
