//! VMX capability MSRs (Intel SDM Vol. 3D appendix A) and the allowed-0/allowed-1
//! adjustment of control words. Read only when CPUID says VMX exists: on other CPUs these
//! MSRs raise #GP. `cpu.rs` reads them too, to report what the CPU offers.

pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
pub const IA32_VMX_BASIC: u32 = 0x480;
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
pub const IA32_VMX_MISC: u32 = 0x485;
pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

// IA32_FEATURE_CONTROL bits (SDM Vol. 3C 24.7).
pub const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
pub const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;

// IA32_VMX_BASIC (SDM Vol. 3D A.1).
/// Bits 30:0: VMCS revision identifier.
pub const BASIC_REVISION_MASK: u64 = 0x7fff_ffff;
/// Bit 48: VMXON region and VMCS addresses limited to 32 bits.
pub const BASIC_32BIT_ADDRESSES: u64 = 1 << 48;
/// Bit 55: the TRUE_* control MSRs exist.
pub const BASIC_TRUE_CONTROLS: u64 = 1 << 55;

// IA32_VMX_EPT_VPID_CAP (SDM Vol. 3D A.10).
pub const EPT_WALK_4: u64 = 1 << 6;
pub const EPT_MEMTYPE_WB: u64 = 1 << 14;
pub const EPT_2M_PAGES: u64 = 1 << 16;
pub const EPT_INVEPT: u64 = 1 << 20;
pub const EPT_INVEPT_SINGLE: u64 = 1 << 25;
pub const EPT_INVEPT_ALL: u64 = 1 << 26;

/// IA32_VMX_MISC bits 4:0: the preemption timer counts at TSC >> this (SDM Vol. 3D A.6).
pub const MISC_TIMER_RATE_MASK: u64 = 0x1f;

/// Reads a VMX capability MSR; the caller has checked CPUID.1:ECX.VMX.
pub fn read(msr: u32) -> u64 {
    // SAFETY: RDMSR of an architectural VMX MSR on a CPU with VMX has no side effects.
    unsafe { x86::msr::rdmsr(msr) }
}

/// A control word as the capability MSR `cap` allows it: bits 31:0 of `cap` must be 1
/// (allowed-0 settings), bits 63:32 may be 1 (allowed-1 settings) (SDM Vol. 3D A.3-A.5).
/// Returns `want` with the forced bits set and the forbidden ones cleared.
pub fn adjust(cap: u64, want: u32) -> u32 {
    (want | cap as u32) & (cap >> 32) as u32
}

/// Whether `bits` may be 1 under the capability MSR `cap`.
pub fn allowed1(cap: u64, bits: u32) -> bool {
    (cap >> 32) as u32 & bits == bits
}

/// Whether `bits` may be 0 under the capability MSR `cap`.
pub fn allowed0(cap: u64, bits: u32) -> bool {
    cap as u32 & bits == 0
}

/// Applies the VMX fixed bits of CR0 or CR4: bits set in `fixed0` must be 1, bits clear in
/// `fixed1` must be 0 (SDM Vol. 3D A.7, A.8).
pub fn fix_cr(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

