//! The VMCB (AMD APM Vol. 2 appendix B): a 4 KiB page, control area at 0x000, state save
//! area at 0x400, as `repr(C)` structs whose offsets are checked against the APM at compile
//! time; intercept bits and exit codes beside them.

use core::mem::offset_of;
use morsel::HostPhysAddr;
use static_assertions::const_assert_eq;

// MISC1 intercept bits (APM Vol. 2 table B-1, offset 0x0c).
pub const MISC1_INTR: u32 = 1 << 0;
pub const MISC1_NMI: u32 = 1 << 1;
/// VINTR (bit 4): exit when a pending V_IRQ could be taken (APM Vol. 2 15.21.4).
pub const MISC1_VINTR: u32 = 1 << 4;
pub const MISC1_INVD: u32 = 1 << 22;
pub const MISC1_HLT: u32 = 1 << 24;
pub const MISC1_INVLPGA: u32 = 1 << 26;
pub const MISC1_IOIO: u32 = 1 << 27;
pub const MISC1_MSR: u32 = 1 << 28;
pub const MISC1_SHUTDOWN: u32 = 1 << 31;
// MISC2 intercept bits (offset 0x10): VMRUN must be intercepted (APM 15.5.1).
pub const MISC2_ALL_SVM: u32 = 0x7f; // VMRUN VMMCALL VMLOAD VMSAVE STGI CLGI SKINIT
/// XSETBV (bit 13): XCR0 is not switched by VMRUN.
pub const MISC2_XSETBV: u32 = 1 << 13;
/// CR4 write intercept (bit 16 + 4): CR4 enables state that VMRUN does not switch (PKRU).
pub const CR_WRITE_CR4: u32 = 1 << 20;

/// VINTR bit 24: V_INTR_MASKING, so physical interrupts follow the host's RFLAGS.IF.
pub const VINTR_MASKING: u64 = 1 << 24;
/// VINTR bit 8: V_IRQ, a virtual interrupt is pending; bit 20: V_IGN_TPR (APM Vol. 2 15.21.1).
/// Used only as a window request with the VINTR intercept: the interrupt itself goes in
/// through EVENTINJ.
pub const VINTR_IRQ: u64 = 1 << 8;
pub const VINTR_IGN_TPR: u64 = 1 << 20;
/// EVENTINJ / EXITINTINFO: vector 7:0, type 10:8 (0 = external interrupt), error code valid
/// bit 11, valid bit 31, error code 63:32 (APM Vol. 2 15.20).
pub const EVENT_VALID: u64 = 1 << 31;
/// Interrupt shadow bit 0 (after STI / MOV SS, APM Vol. 2 15.21.5).
pub const INTERRUPT_SHADOW: u64 = 1;

pub const RFLAGS_IF: u64 = 1 << 9;

// Exit codes (APM Vol. 2 appendix C).
pub const EXIT_CR4_WRITE: u64 = 0x14;
pub const EXIT_DR_FIRST: u64 = 0x20;
pub const EXIT_DR_LAST: u64 = 0x3f;
pub const EXIT_EXCEPTION_0: u64 = 0x40;
pub const EXIT_INTR: u64 = 0x60;
pub const EXIT_NMI: u64 = 0x61;
pub const EXIT_VINTR: u64 = 0x64;
pub const EXIT_CPUID: u64 = 0x72;
pub const EXIT_INVD: u64 = 0x76;
pub const EXIT_HLT: u64 = 0x78;
pub const EXIT_INVLPGA: u64 = 0x7a;
pub const EXIT_IOIO: u64 = 0x7b;
pub const EXIT_MSR: u64 = 0x7c;
pub const EXIT_SHUTDOWN: u64 = 0x7f;
pub const EXIT_VMRUN: u64 = 0x80;
pub const EXIT_VMMCALL: u64 = 0x81;
pub const EXIT_VMSAVE: u64 = 0x83;
pub const EXIT_XSETBV: u64 = 0x8d;
pub const EXIT_NPF: u64 = 0x400;
pub const EXIT_INVALID: u64 = u64::MAX;

/// Control area (APM Vol. 2 appendix B, table B-1), at offset 0 of the VMCB.
#[repr(C)]
pub struct Control {
    /// CR reads (bits 0-15) and writes (bits 16-31).
    pub intercept_cr: u32,
    /// DR reads (bits 0-15) and writes (bits 16-31).
    pub intercept_dr: u32,
    /// Exception vectors 0-31.
    pub intercept_exceptions: u32,
    pub intercept_misc1: u32,
    pub intercept_misc2: u32,
    pub intercept_misc3: u32,
    _reserved_018: [u8; 0x24],
    pub pause_filter_threshold: u16,
    pub pause_filter_count: u16,
    pub iopm_base_pa: u64,
    pub msrpm_base_pa: u64,
    pub tsc_offset: u64,
    pub guest_asid: u32,
    /// 0: nothing, 1: flush all ASIDs, 3: flush this guest's ASID (APM 15.16.1).
    pub tlb_control: u8,
    _reserved_05d: [u8; 3],
    /// V_TPR, V_IRQ, V_INTR_MASKING (bit 24), V_INTR_VECTOR (bits 32-39).
    pub vintr: u64,
    pub interrupt_shadow: u64,
    pub exitcode: u64,
    pub exitinfo1: u64,
    pub exitinfo2: u64,
    pub exitintinfo: u64,
    /// Bit 0: nested paging.
    pub np_enable: u64,
    pub avic_apic_bar: u64,
    pub ghcb_pa: u64,
    pub eventinj: u64,
    pub n_cr3: u64,
    pub lbr_virtualization: u64,
    /// VMCB clean bits: 0 = everything reloaded on VMRUN.
    pub clean_bits: u64,
    /// Next RIP, with next-RIP save (CPUID 8000_000A EDX bit 3).
    pub nrip: u64,
    pub bytes_fetched: u8,
    pub instruction_bytes: [u8; 15],
    _reserved_0e0: [u8; 0x400 - 0xe0],
}

/// A segment register in the save area: selector, attributes (descriptor bits 40-47 in 0-7,
/// 52-55 in 8-11), limit, base (APM Vol. 2 table B-2).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

impl Segment {
    pub const fn new(selector: u16, attrib: u16, limit: u32, base: u64) -> Segment {
        Segment { selector, attrib, limit, base }
    }
}

/// State save area (APM Vol. 2 appendix B, table B-2), at offset 0x400 of the VMCB.
/// FS, GS, TR, LDTR, KERNEL_GS_BASE, STAR..SFMASK and SYSENTER_* are loaded by VMLOAD and
/// stored by VMSAVE, the rest by VMRUN and #VMEXIT.
#[repr(C)]
pub struct Save {
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub gdtr: Segment,
    pub ldtr: Segment,
    pub idtr: Segment,
    pub tr: Segment,
    _reserved_0a0: [u8; 0x2b],
    pub cpl: u8,
    _reserved_0cc: u32,
    pub efer: u64,
    _reserved_0d8: [u8; 0x148 - 0xd8],
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    _reserved_180: [u8; 0x1d8 - 0x180],
    pub rsp: u64,
    _reserved_1e0: [u8; 0x1f8 - 0x1e0],
    pub rax: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    _reserved_248: [u8; 0x268 - 0x248],
    pub g_pat: u64,
    pub dbgctl: u64,
    _reserved_278: [u8; 0xc00 - 0x278],
}

/// The whole 4 KiB VMCB.
#[repr(C, align(4096))]
pub struct Area {
    pub control: Control,
    pub save: Save,
}

// Offsets from APM Vol. 2 tables B-1 and B-2.
const_assert_eq!(size_of::<Area>(), 4096);
const_assert_eq!(size_of::<Control>(), 0x400);
const_assert_eq!(offset_of!(Control, iopm_base_pa), 0x040);
const_assert_eq!(offset_of!(Control, guest_asid), 0x058);
const_assert_eq!(offset_of!(Control, tlb_control), 0x05c);
const_assert_eq!(offset_of!(Control, vintr), 0x060);
const_assert_eq!(offset_of!(Control, exitcode), 0x070);
const_assert_eq!(offset_of!(Control, np_enable), 0x090);
const_assert_eq!(offset_of!(Control, eventinj), 0x0a8);
const_assert_eq!(offset_of!(Control, n_cr3), 0x0b0);
const_assert_eq!(offset_of!(Control, clean_bits), 0x0c0);
const_assert_eq!(offset_of!(Control, nrip), 0x0c8);
const_assert_eq!(offset_of!(Area, save), 0x400);
const_assert_eq!(offset_of!(Save, tr), 0x090);
const_assert_eq!(offset_of!(Save, cpl), 0x0cb);
const_assert_eq!(offset_of!(Save, efer), 0x0d0);
const_assert_eq!(offset_of!(Save, cr4), 0x148);
const_assert_eq!(offset_of!(Save, rip), 0x178);
const_assert_eq!(offset_of!(Save, rsp), 0x1d8);
const_assert_eq!(offset_of!(Save, rax), 0x1f8);
const_assert_eq!(offset_of!(Save, star), 0x200);
const_assert_eq!(offset_of!(Save, kernel_gs_base), 0x220);
const_assert_eq!(offset_of!(Save, cr2), 0x240);
const_assert_eq!(offset_of!(Save, g_pat), 0x268);

/// A VMCB page, owned by one vCPU. The CPU reads and writes it only inside VMRUN (and
/// VMLOAD/VMSAVE), which the world switch reaches through the physical address alone, so
/// between runs the hypervisor may hold ordinary references to it.
pub struct Vmcb {
    pa: HostPhysAddr,
}

impl Vmcb {
    /// Wraps a zeroed, identity-mapped 4 KiB frame that nothing else uses.
    pub fn new(pa: HostPhysAddr) -> Vmcb {
        Vmcb { pa }
    }

    pub fn pa(&self) -> HostPhysAddr {
        self.pa
    }

    pub fn get(&self) -> &Area {
        // SAFETY: the frame is identity-mapped, 4 KiB-aligned, exclusively this VMCB's, and
        // all-zero bytes are a valid Area (plain integers).
        unsafe { &*(self.pa.as_u64() as *const Area) }
    }

    pub fn get_mut(&mut self) -> &mut Area {
        // SAFETY: as for get; &mut self makes the reference unique.
        unsafe { &mut *(self.pa.as_u64() as *mut Area) }
    }
}
