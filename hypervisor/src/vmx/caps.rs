//! Reads the VMX capability MSRs into a `formats::vmx_caps::Snapshot`, whose `controls()`
//! decides (host-tested) what the backend programs. Read only when CPUID says VMX exists:
//! on other CPUs these MSRs raise #GP.

pub use formats::vmx_caps::*;

/// Reads a VMX capability MSR; the caller has checked CPUID.1:ECX.VMX.
fn read(msr: u32) -> u64 {
    // SAFETY: RDMSR of an architectural VMX MSR on a CPU with VMX has no side effects.
    unsafe { x86::msr::rdmsr(msr) }
}

/// The capability MSRs of this CPU; the caller has checked CPUID.1:ECX.VMX.
pub fn snapshot() -> Snapshot {
    let basic = read(IA32_VMX_BASIC);
    let procbased = read(IA32_VMX_PROCBASED_CTLS);
    let has_true = basic & BASIC_TRUE_CONTROLS != 0;
    let true_read = |msr| if has_true { read(msr) } else { 0 };
    // The secondary controls exist only where the primary ones may enable them (SDM Vol. 3D A.3.3).
    let procbased2 = if allowed1(procbased, PROC_SECONDARY_CONTROLS) { read(IA32_VMX_PROCBASED_CTLS2) } else { 0 };
    let ept_vpid = if procbased2 != 0 { read(IA32_VMX_EPT_VPID_CAP) } else { 0 };
    let s = Snapshot {
        feature_control: read(IA32_FEATURE_CONTROL),
        basic,
        pinbased: read(IA32_VMX_PINBASED_CTLS),
        procbased,
        exit: read(IA32_VMX_EXIT_CTLS),
        entry: read(IA32_VMX_ENTRY_CTLS),
        misc: read(IA32_VMX_MISC),
        cr0_fixed0: read(IA32_VMX_CR0_FIXED0),
        cr0_fixed1: read(IA32_VMX_CR0_FIXED1),
        cr4_fixed0: read(IA32_VMX_CR4_FIXED0),
        cr4_fixed1: read(IA32_VMX_CR4_FIXED1),
        procbased2,
        ept_vpid,
        true_pinbased: true_read(IA32_VMX_TRUE_PINBASED_CTLS),
        true_procbased: true_read(IA32_VMX_TRUE_PROCBASED_CTLS),
        true_exit: true_read(IA32_VMX_TRUE_EXIT_CTLS),
        true_entry: true_read(IA32_VMX_TRUE_ENTRY_CTLS),
    };
    log::debug!(target: "vmx", "capabilities {s:x?}");
    s
}

/// The vendor part of the boot log's `cpu:` line.
pub fn summary(s: &Snapshot) -> alloc::string::String {
    let yn = |b: bool| if b { "yes" } else { "no" };
    let (ept, vpid, unrestricted) = s.features();
    alloc::format!("vmx=yes ept={} vpid={} unrestricted-guest={}", yn(ept), yn(vpid), yn(unrestricted))
}
