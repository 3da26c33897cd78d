//! SVM: what the backend needs, decided from a snapshot of CPUID leaf 8000_000A and VM_CR
//! (AMD APM Vol. 2 15.4, 15.30.1) as a pure function, host-tested with the snapshots of the
//! emulators' CPU models. `hypervisor/src/svm/caps.rs` takes the snapshot.

/// VM_CR bit 4: SVMDIS, SVM disabled by the firmware (APM Vol. 2 15.30.1).
pub const VM_CR_SVMDIS: u64 = 1 << 4;
/// CPUID 8000_000A EDX bits (APM Vol. 3 appendix E.4.9).
pub const EDX_NESTED_PAGING: u32 = 1 << 0;
pub const EDX_NRIP_SAVE: u32 = 1 << 3;

/// CPUID 8000_000A and VM_CR as read on one CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// CPUID 8000_000A EBX: the number of ASIDs.
    pub asids: u32,
    /// CPUID 8000_000A EDX: feature bits.
    pub features: u32,
    pub vm_cr: u64,
}

/// What `svm::enable` works with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// ASIDs including the host's ASID 0.
    pub asids: u32,
    /// The CPU saves the next RIP on intercepts; without it the hypervisor decodes.
    pub nrip_save: bool,
}

pub use crate::vmx_caps::Refusal;

impl Snapshot {
    pub fn nested_paging(&self) -> bool {
        self.features & EDX_NESTED_PAGING != 0
    }

    pub fn nrip_save(&self) -> bool {
        self.features & EDX_NRIP_SAVE != 0
    }

    /// The capabilities this hypervisor runs guests with, or why this CPU cannot.
    pub fn caps(&self) -> Result<Caps, Refusal> {
        if !self.nested_paging() {
            return Err(Refusal::Missing("nested paging (CPUID 8000_000A EDX bit 0)"));
        }
        if self.asids < 2 {
            return Err(Refusal::Missing("ASIDs for guests"));
        }
        if self.vm_cr & VM_CR_SVMDIS != 0 {
            return Err(Refusal::Disabled("SVM (VM_CR.SVMDIS)"));
        }
        Ok(Caps { asids: self.asids, nrip_save: self.nrip_save() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2 TCG `-cpu max,+svm,+npt` (no next-RIP save), from `log=debug`'s `svm: snapshot`.
    const QEMU_MAX: Snapshot = Snapshot { asids: 16, features: 0x1001_0001, vm_cr: 0 };
    /// Bochs 2.7 `ryzen`.
    const BOCHS_RYZEN: Snapshot = Snapshot { asids: 0x8000, features: 0x44f, vm_cr: 0 };
    /// QEMU with NPT off (config qemu-svm-nonpt).
    const QEMU_NO_NPT: Snapshot = Snapshot { asids: 16, features: 0, vm_cr: 0 };

    #[test]
    fn emulators_run_the_backend() {
        assert_eq!(QEMU_MAX.caps(), Ok(Caps { asids: 16, nrip_save: false }));
        assert_eq!(BOCHS_RYZEN.caps(), Ok(Caps { asids: 0x8000, nrip_save: true }));
    }

    #[test]
    fn missing_nested_paging_asids_or_a_firmware_lock_is_named() {
        assert_eq!(QEMU_NO_NPT.caps(), Err(Refusal::Missing("nested paging (CPUID 8000_000A EDX bit 0)")));
        let one = Snapshot { asids: 1, ..QEMU_MAX };
        assert_eq!(one.caps(), Err(Refusal::Missing("ASIDs for guests")));
        let locked = Snapshot { vm_cr: VM_CR_SVMDIS, ..QEMU_MAX };
        assert_eq!(locked.caps(), Err(Refusal::Disabled("SVM (VM_CR.SVMDIS)")));
    }
}
