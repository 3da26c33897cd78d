//! Vendor-neutral CPU facts from CPUID: vendor, which virtualization extension exists, 1 GiB
//! pages. What an extension offers is each backend's business (`vmx/caps.rs`, `svm/caps.rs`).

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

/// Vendor-neutral facts from CPUID; each backend's `probe` reads what it needs beyond these.
#[derive(Clone, Copy, Debug)]
pub struct CpuFacts {
    pub vendor: [u8; 12],
    /// Which extension CPUID reports (VMX: CPUID.1:ECX bit 5, SVM: 8000_0001 ECX bit 2).
    pub extension: Extension,
    pub gib_pages: bool,
}

impl CpuFacts {
    pub fn vendor(&self) -> &str {
        core::str::from_utf8(&self.vendor).unwrap_or("?")
    }

    pub fn detect() -> CpuFacts {
        let cpuid = CpuId::new();
        let mut vendor = [b'?'; 12];
        if let Some(v) = cpuid.get_vendor_info() {
            vendor.copy_from_slice(&v.as_str().as_bytes()[..12]);
        }
        let ext = cpuid.get_extended_processor_and_feature_identifiers();
        let extension = if cpuid.get_feature_info().is_some_and(|f| f.has_vmx()) {
            Extension::Vmx
        } else if ext.as_ref().is_some_and(|e| e.has_svm()) {
            Extension::Svm
        } else {
            Extension::None
        };
        CpuFacts { vendor, extension, gib_pages: ext.as_ref().is_some_and(|e| e.has_1gib_pages()) }
    }

    /// Logs the facts with the backend's own `summary` (`vmx=yes ept=yes ...`); the first
    /// words are what the test scenarios check.
    pub fn log(&self, summary: &str) {
        let yn = |b: bool| if b { "yes" } else { "no" };
        match self.extension {
            Extension::None => log::warn!(target: "cpu", "vendor {} {summary}: this CPU cannot run guests", self.vendor()),
            _ => log::info!(target: "cpu", "vendor {} {summary} 1g-pages={}", self.vendor(), yn(self.gib_pages)),
        }
        if let Some(brand) = CpuId::new().get_processor_brand_string() {
            log::info!(target: "cpu", "model {}", brand.as_str().trim());
        }
    }
}
