//! Reads CPUID 8000_000A and VM_CR into a `formats::svm_caps::Snapshot`, whose `caps()`
//! decides (host-tested) whether and how the backend runs. Read only when CPUID says SVM
//! exists: VM_CR raises #GP elsewhere.

pub use formats::svm_caps::*;

const VM_CR: u32 = 0xc001_0114;

/// CPUID 8000_000A and VM_CR of this CPU; the caller has checked CPUID 8000_0001 ECX.SVM.
pub fn snapshot() -> Snapshot {
    let leaf = core::arch::x86_64::__cpuid(0x8000_000a);
    // SAFETY: VM_CR exists on CPUs with SVM (APM 15.30.1); reading has no side effects.
    let vm_cr = unsafe { x86::msr::rdmsr(VM_CR) };
    let s = Snapshot { asids: leaf.ebx, features: leaf.edx, vm_cr };
    log::debug!(target: "svm", "capabilities {s:x?}");
    s
}

/// The vendor part of the boot log's `cpu:` line.
pub fn summary(s: &Snapshot) -> alloc::string::String {
    let yn = |b: bool| if b { "yes" } else { "no" };
    alloc::format!("svm=yes npt={} asids={} nrip-save={}", yn(s.nested_paging()), s.asids, yn(s.nrip_save()))
}
