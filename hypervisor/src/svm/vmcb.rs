//! The VMCB (AMD APM Vol. 2 appendix B): a 4 KiB page, control area at 0x000, state save
//! area at 0x400. Fields are accessed by offset through one typed wrapper.

use morsel::HostPhysAddr;

// Control area (APM Vol. 2 table B-1).
/// CR reads (bits 0-15) and writes (bits 16-31).
pub const INTERCEPT_CR: usize = 0x000;
/// DR reads (bits 0-15) and writes (bits 16-31).
pub const INTERCEPT_DR: usize = 0x004;
pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
pub const INTERCEPT_MISC1: usize = 0x00c;
pub const INTERCEPT_MISC2: usize = 0x010;
pub const IOPM_BASE: usize = 0x040;
pub const MSRPM_BASE: usize = 0x048;
pub const GUEST_ASID: usize = 0x058;
pub const TLB_CONTROL: usize = 0x05c;
pub const VINTR: usize = 0x060;
pub const EXITCODE: usize = 0x070;
pub const EXITINFO1: usize = 0x078;
pub const EXITINFO2: usize = 0x080;
pub const NP_ENABLE: usize = 0x090;
pub const N_CR3: usize = 0x0b0;
pub const CLEAN_BITS: usize = 0x0c0;
pub const NRIP: usize = 0x0c8;

// MISC1 intercept bits (APM Vol. 2 table B-1, offset 0x0c).
pub const MISC1_INTR: u32 = 1 << 0;
pub const MISC1_NMI: u32 = 1 << 1;
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

// State save area (APM Vol. 2 table B-2).
pub const ES: usize = 0x400;
pub const CS: usize = 0x410;
pub const SS: usize = 0x420;
pub const DS: usize = 0x430;
pub const FS: usize = 0x440;
pub const GS: usize = 0x450;
pub const GDTR: usize = 0x460;
pub const LDTR: usize = 0x470;
pub const IDTR: usize = 0x480;
pub const TR: usize = 0x490;
pub const CPL: usize = 0x4cb;
pub const EFER: usize = 0x4d0;
pub const CR4: usize = 0x548;
pub const CR3: usize = 0x550;
pub const CR0: usize = 0x558;
pub const DR7: usize = 0x560;
pub const DR6: usize = 0x568;
pub const RFLAGS: usize = 0x570;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RIP: usize = 0x578;
pub const RSP: usize = 0x5d8;
pub const RAX: usize = 0x5f8;
pub const G_PAT: usize = 0x668;

// Exit codes (APM Vol. 2 appendix C).
pub const EXIT_CR4_WRITE: u64 = 0x14;
pub const EXIT_DR_FIRST: u64 = 0x20;
pub const EXIT_DR_LAST: u64 = 0x3f;
pub const EXIT_EXCEPTION_0: u64 = 0x40;
pub const EXIT_INTR: u64 = 0x60;
pub const EXIT_NMI: u64 = 0x61;
pub const EXIT_CPUID: u64 = 0x72;
pub const EXIT_INVD: u64 = 0x76;
pub const EXIT_HLT: u64 = 0x78;
pub const EXIT_INVLPGA: u64 = 0x7a;
pub const EXIT_IOIO: u64 = 0x7b;
pub const EXIT_MSR: u64 = 0x7c;
pub const EXIT_SHUTDOWN: u64 = 0x7f;
pub const EXIT_VMRUN: u64 = 0x80;
pub const EXIT_VMMCALL: u64 = 0x81;
pub const EXIT_XSETBV: u64 = 0x8d;
pub const EXIT_NPF: u64 = 0x400;
pub const EXIT_INVALID: u64 = u64::MAX;

/// A VMCB page, owned by one vCPU.
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

    fn ptr(&self, off: usize) -> *mut u8 {
        (self.pa.as_u64() as usize + off) as *mut u8
    }

    pub fn write64(&mut self, off: usize, v: u64) {
        // SAFETY: the VMCB frame is identity-mapped and exclusively ours; off < 4096.
        unsafe { (self.ptr(off) as *mut u64).write_volatile(v) }
    }

    pub fn read64(&self, off: usize) -> u64 {
        // SAFETY: as for write64.
        unsafe { (self.ptr(off) as *const u64).read_volatile() }
    }

    pub fn write32(&mut self, off: usize, v: u32) {
        // SAFETY: as for write64.
        unsafe { (self.ptr(off) as *mut u32).write_volatile(v) }
    }

    pub fn read8(&self, off: usize) -> u8 {
        // SAFETY: as for write64.
        unsafe { self.ptr(off).read_volatile() }
    }

    pub fn write8(&mut self, off: usize, v: u8) {
        // SAFETY: as for write64.
        unsafe { self.ptr(off).write_volatile(v) }
    }

    /// A segment register: selector, attributes (descriptor bits 40-47 and 52-55), limit, base.
    pub fn segment(&mut self, off: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
        let word = selector as u64 | (attrib as u64) << 16 | (limit as u64) << 32;
        self.write64(off, word);
        self.write64(off + 8, base);
    }
}
