//! CPU facts from CPUID and the VMX capability MSRs: vendor, which virtualization
//! extension exists and what it offers (second-level paging, tagged TLBs, large pages).

use raw_cpuid::CpuId;

/// Hardware virtualization the CPU offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extension {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
    None,
}

/// What the backends need to know about this CPU.
#[derive(Clone, Copy, Debug)]
pub struct CpuFacts {
    pub vendor: [u8; 12],
    pub extension: Extension,
    /// EPT (VMX) or NPT (SVM).
    pub second_level: bool,
    /// VPID (VMX) or the number of ASIDs > 1 (SVM).
    pub tagged_tlb: bool,
    pub asids: u32,
    /// SVM: the CPU saves the next RIP on intercepts (CPUID 8000_000A EDX bit 3).
    pub nrip_save: bool,
    pub gib_pages: bool,
    pub unrestricted_guest: bool,
}

impl CpuFacts {
    pub fn vendor(&self) -> &str {
        core::str::from_utf8(&self.vendor).unwrap_or("?")
    }

    /// Reads CPUID and, where VMX exists, its capability MSRs.
    pub fn detect() -> CpuFacts {
        let cpuid = CpuId::new();
        let mut vendor = [b'?'; 12];
        if let Some(v) = cpuid.get_vendor_info() {
            vendor.copy_from_slice(&v.as_str().as_bytes()[..12]);
        }
        let ext = cpuid.get_extended_processor_and_feature_identifiers();
        let gib_pages = ext.as_ref().is_some_and(|e| e.has_1gib_pages());
        let vmx = cpuid.get_feature_info().is_some_and(|f| f.has_vmx());
        let svm = ext.as_ref().is_some_and(|e| e.has_svm());
        let mut facts = CpuFacts {
            vendor,
            extension: Extension::None,
            second_level: false,
            tagged_tlb: false,
            asids: 0,
            nrip_save: false,
            gib_pages,
            unrestricted_guest: false,
        };
        if vmx {
            facts.extension = Extension::Vmx;
            let procbased = crate::vmx::caps::read(crate::vmx::caps::IA32_VMX_PROCBASED_CTLS);
            // Allowed-1 settings live in the high half (Intel SDM Vol. 3D A.3.2, A.3.3).
            if procbased & (1 << (32 + 31)) != 0 {
                let secondary = crate::vmx::caps::read(crate::vmx::caps::IA32_VMX_PROCBASED_CTLS2);
                facts.second_level = secondary & (1 << (32 + 1)) != 0;
                facts.tagged_tlb = secondary & (1 << (32 + 5)) != 0;
                facts.unrestricted_guest = secondary & (1 << (32 + 7)) != 0;
            }
        } else if svm {
            facts.extension = Extension::Svm;
            if let Some(s) = cpuid.get_svm_info() {
                facts.second_level = s.has_nested_paging();
                facts.asids = s.supported_asids();
                facts.tagged_tlb = facts.asids > 1;
                facts.nrip_save = s.has_nrip();
            }
        }
        facts
    }

    /// Logs the facts; the first words are what the test scenarios check.
    pub fn log(&self) {
        let yn = |b: bool| if b { "yes" } else { "no" };
        match self.extension {
            Extension::Vmx => log::info!(target: "cpu",
                "vendor {} vmx=yes ept={} vpid={} unrestricted-guest={} 1g-pages={}",
                self.vendor(), yn(self.second_level), yn(self.tagged_tlb),
                yn(self.unrestricted_guest), yn(self.gib_pages)),
            Extension::Svm => log::info!(target: "cpu",
                "vendor {} svm=yes npt={} asids={} nrip-save={} 1g-pages={}",
                self.vendor(), yn(self.second_level), self.asids, yn(self.nrip_save),
                yn(self.gib_pages)),
            Extension::None => log::warn!(target: "cpu",
                "vendor {} vmx=no svm=no: this CPU cannot run guests", self.vendor()),
        }
        if let Some(brand) = CpuId::new().get_processor_brand_string() {
            log::info!(target: "cpu", "model {}", brand.as_str().trim());
        }
    }
}
