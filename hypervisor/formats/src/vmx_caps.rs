//! VMX: what the backend needs, decided from a snapshot of the capability MSRs (Intel SDM
//! Vol. 3D appendix A) as a pure function, so that the decision is tested on the host with
//! the snapshots of real and emulated CPU models. `hypervisor/src/vmx/caps.rs` takes the
//! snapshot; `vmx/mod.rs` turns VMX on with the result.

use core::fmt;

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

// Pin-based controls (SDM Vol. 3C 25.6.1, table 25-5).
pub const PIN_EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
pub const PIN_NMI_EXITING: u32 = 1 << 3;
pub const PIN_PREEMPTION_TIMER: u32 = 1 << 6;

// Primary processor-based controls (SDM Vol. 3C 25.6.2, table 25-6).
/// Interrupt-window exiting (bit 2): exit at the first instruction boundary where RFLAGS.IF
/// = 1 and no STI / MOV SS blocking (SDM Vol. 3C 26.2, 26.6.5). Required (every VMX CPU has
/// it), off in the words decided here, turned on per vCPU while a virtual interrupt waits.
pub const PROC_INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
pub const PROC_HLT_EXITING: u32 = 1 << 7;
/// MOV to / from CR8 exit: without it a guest writes the host's task priority (TPR).
pub const PROC_CR8_LOAD_EXITING: u32 = 1 << 19;
pub const PROC_CR8_STORE_EXITING: u32 = 1 << 20;
/// MOV to / from DR0-DR7 exit: debug registers are not switched per guest.
pub const PROC_MOV_DR_EXITING: u32 = 1 << 23;
pub const PROC_UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
pub const PROC_USE_IO_BITMAPS: u32 = 1 << 25;
pub const PROC_USE_MSR_BITMAPS: u32 = 1 << 28;
pub const PROC_SECONDARY_CONTROLS: u32 = 1 << 31;

// Secondary processor-based controls (SDM Vol. 3C 25.6.2, table 25-7).
pub const PROC2_ENABLE_EPT: u32 = 1 << 1;
pub const PROC2_ENABLE_VPID: u32 = 1 << 5;
pub const PROC2_UNRESTRICTED_GUEST: u32 = 1 << 7;

// VM-exit controls (SDM Vol. 3C 25.7.1, table 25-13).
pub const EXIT_HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
pub const EXIT_ACK_INTERRUPT: u32 = 1 << 15;
pub const EXIT_SAVE_PAT: u32 = 1 << 18;
pub const EXIT_LOAD_PAT: u32 = 1 << 19;
pub const EXIT_SAVE_EFER: u32 = 1 << 20;
pub const EXIT_LOAD_EFER: u32 = 1 << 21;
pub const EXIT_SAVE_PREEMPTION_TIMER: u32 = 1 << 22;

// VM-entry controls (SDM Vol. 3C 25.8.1, table 25-15).
pub const ENTRY_IA32E_MODE_GUEST: u32 = 1 << 9;
pub const ENTRY_LOAD_PAT: u32 = 1 << 14;
pub const ENTRY_LOAD_EFER: u32 = 1 << 15;

/// The capability MSRs as read on one CPU (the TRUE_* ones read as 0 where IA32_VMX_BASIC
/// bit 55 says they do not exist).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub feature_control: u64,
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// 0 where the primary controls cannot enable secondary controls.
    pub procbased2: u64,
    pub ept_vpid: u64,
    pub true_pinbased: u64,
    pub true_procbased: u64,
    pub true_exit: u64,
    pub true_entry: u64,
}

/// Everything `vmx::enable` programs, decided from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    pub revision: u32,
    pub pin: u32,
    pub proc: u32,
    pub proc2: u32,
    pub exit: u32,
    pub entry: u32,
    pub cr0_fixed: (u64, u64),
    pub cr4_fixed: (u64, u64),
    /// Preemption timer rate: it counts down once per 2^rate TSC ticks; None without it.
    pub timer_rate: Option<u32>,
    /// INVEPT single-context (else all-context).
    pub invept_single: bool,
    /// IA32_FEATURE_CONTROL is unlocked: lock it with VMX outside SMX on before VMXON.
    pub lock_feature_control: bool,
}

/// Why the backend cannot run on a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A required feature is missing (named with where the CPU reports it).
    Missing(&'static str),
    /// The firmware locked the feature off.
    Disabled(&'static str),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Refusal::Missing(what) => write!(f, "the CPU lacks {what}"),
            Refusal::Disabled(what) => write!(f, "{what} is disabled by the firmware"),
        }
    }
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

fn require(ok: bool, what: &'static str) -> Result<(), Refusal> {
    if ok { Ok(()) } else { Err(Refusal::Missing(what)) }
}

impl Snapshot {
    /// EPT, VPID and unrestricted guest as the secondary controls allow them (for the log).
    pub fn features(&self) -> (bool, bool, bool) {
        let may = |bit| allowed1(self.procbased2, bit);
        (may(PROC2_ENABLE_EPT), may(PROC2_ENABLE_VPID), may(PROC2_UNRESTRICTED_GUEST))
    }

    /// The controls this hypervisor runs guests with, or why this CPU cannot.
    pub fn controls(&self) -> Result<Controls, Refusal> {
        let (ept_ok, vpid_ok, _) = self.features();
        require(ept_ok, "EPT (IA32_VMX_PROCBASED_CTLS2 bit 1)")?;
        require(vpid_ok, "VPID (IA32_VMX_PROCBASED_CTLS2 bit 5)")?;
        let fc = self.feature_control;
        let lock_feature_control = fc & FEATURE_CONTROL_LOCK == 0;
        if !lock_feature_control && fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
            return Err(Refusal::Disabled("VMX outside SMX (IA32_FEATURE_CONTROL bit 2)"));
        }

        // VMCS layout and memory type (SDM Vol. 3D A.1).
        let basic = self.basic;
        require((basic >> 32) & 0x1fff <= 4096, "a VMCS that fits in 4 KiB (IA32_VMX_BASIC[44:32])")?;
        require(basic & BASIC_32BIT_ADDRESSES == 0, "64-bit VMCS addresses (IA32_VMX_BASIC bit 48)")?;
        require((basic >> 50) & 0xf == 6, "write-back VMCS memory (IA32_VMX_BASIC[53:50])")?;
        let true_ctls = basic & BASIC_TRUE_CONTROLS != 0;
        let pick = |plain, true_msr| if true_ctls { true_msr } else { plain };
        let pin_cap = pick(self.pinbased, self.true_pinbased);
        let proc_cap = pick(self.procbased, self.true_procbased);
        let exit_cap = pick(self.exit, self.true_exit);
        let entry_cap = pick(self.entry, self.true_entry);
        let proc2_cap = self.procbased2;

        // EPT as the morsel tables are built: 4 levels, write-back, 2 MiB leaves (SDM Vol. 3D A.10).
        let ept = self.ept_vpid;
        require(ept & EPT_WALK_4 != 0, "4-level EPT (IA32_VMX_EPT_VPID_CAP bit 6)")?;
        require(ept & EPT_MEMTYPE_WB != 0, "write-back EPT (IA32_VMX_EPT_VPID_CAP bit 14)")?;
        require(ept & EPT_2M_PAGES != 0, "2 MiB EPT pages (IA32_VMX_EPT_VPID_CAP bit 16)")?;
        require(ept & EPT_INVEPT != 0 && ept & (EPT_INVEPT_SINGLE | EPT_INVEPT_ALL) != 0,
            "INVEPT (IA32_VMX_EPT_VPID_CAP bits 20, 25, 26)")?;
        let invept_single = ept & EPT_INVEPT_SINGLE != 0;

        // Pin-based: external interrupts and NMIs exit; the preemption timer ends the slice.
        require(allowed1(pin_cap, PIN_EXTERNAL_INTERRUPT_EXITING), "external-interrupt exiting")?;
        let has_timer = allowed1(pin_cap, PIN_PREEMPTION_TIMER);
        let mut pin = PIN_EXTERNAL_INTERRUPT_EXITING | PIN_NMI_EXITING;
        if has_timer {
            pin |= PIN_PREEMPTION_TIMER;
        }
        let pin = adjust(pin_cap, pin);
        // Primary: HLT and every port exit, no I/O or MSR bitmaps (so every RDMSR/WRMSR
        // exits), secondary controls on (SDM Vol. 3C 26.1.3). CR8 and debug-register moves
        // exit too: the TPR and DR0-DR3/DR6 are CPU state that entry and exit do not switch.
        let want = PROC_HLT_EXITING | PROC_UNCONDITIONAL_IO_EXITING | PROC_SECONDARY_CONTROLS
            | PROC_CR8_LOAD_EXITING | PROC_CR8_STORE_EXITING | PROC_MOV_DR_EXITING;
        require(allowed1(proc_cap, want),
            "HLT, unconditional I/O, CR8 and MOV-DR exiting and secondary controls")?;
        require(allowed0(proc_cap, PROC_USE_IO_BITMAPS | PROC_USE_MSR_BITMAPS), "VMX without I/O and MSR bitmaps")?;
        require(allowed1(proc_cap, PROC_INTERRUPT_WINDOW_EXITING) && allowed0(proc_cap, PROC_INTERRUPT_WINDOW_EXITING),
            "interrupt-window exiting (primary processor-based controls bit 2)")?;
        // Bits not asked for (CR3 load/store exiting among them) stay 0 where allowed.
        let proc = adjust(proc_cap, want);
        let proc2 = PROC2_ENABLE_EPT | PROC2_ENABLE_VPID;
        require(allowed1(proc2_cap, proc2), "EPT and VPID secondary controls")?;
        let proc2 = adjust(proc2_cap, proc2);
        // Exit: return to 64-bit mode, swap EFER (and PAT where possible); no interrupt
        // acknowledge, so a pending interrupt stays with the APIC for the host's handler.
        let want = EXIT_HOST_ADDRESS_SPACE_SIZE | EXIT_SAVE_EFER | EXIT_LOAD_EFER;
        require(allowed1(exit_cap, want), "64-bit host and EFER switching on VM exit")?;
        let pat = allowed1(exit_cap, EXIT_SAVE_PAT | EXIT_LOAD_PAT) && allowed1(entry_cap, ENTRY_LOAD_PAT);
        let mut exit = want;
        if pat {
            exit |= EXIT_SAVE_PAT | EXIT_LOAD_PAT;
        }
        if has_timer && allowed1(exit_cap, EXIT_SAVE_PREEMPTION_TIMER) {
            exit |= EXIT_SAVE_PREEMPTION_TIMER;
        }
        require(allowed0(exit_cap, EXIT_ACK_INTERRUPT), "VM exits without interrupt acknowledge")?;
        let exit = adjust(exit_cap, exit);
        // Entry: IA-32e mode guest with its own EFER (SDM Vol. 3C 27.3.1.1).
        let want = ENTRY_IA32E_MODE_GUEST | ENTRY_LOAD_EFER;
        require(allowed1(entry_cap, want), "IA-32e mode guests and EFER loading on VM entry")?;
        let entry = adjust(entry_cap, want | if pat { ENTRY_LOAD_PAT } else { 0 });

        Ok(Controls {
            revision: (basic & BASIC_REVISION_MASK) as u32,
            pin,
            proc,
            proc2,
            exit,
            entry,
            cr0_fixed: (self.cr0_fixed0, self.cr0_fixed1),
            cr4_fixed: (self.cr4_fixed0, self.cr4_fixed1),
            timer_rate: has_timer.then_some((self.misc & MISC_TIMER_RATE_MASK) as u32),
            invept_single,
            lock_feature_control,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bochs 2.7 `corei7_skylake_x`, as the hypervisor logs it (`log=debug`, `vmx: snapshot`).
    pub const BOCHS_SKYLAKE_X: Snapshot = Snapshot {
        feature_control: 0x5,
        basic: 0x00d8_1000_0000_002b,
        pinbased: 0x7f_0000_0016,
        procbased: 0xf7f9_fffe_0401_e172,
        exit: 0x7f_ffff_0003_6dff,
        entry: 0xffff_0000_11ff,
        misc: 0x6004_01e0,
        cr0_fixed0: 0x8000_0021,
        cr0_fixed1: 0xffff_ffff,
        cr4_fixed0: 0x2000,
        cr4_fixed1: 0x37_27ff,
        procbased2: 0x0217_7fff_0000_0000,
        ept_vpid: 0xf01_0633_4141,
        true_pinbased: 0x7f_0000_0016,
        true_procbased: 0xf7f9_fffe_0400_6172,
        true_exit: 0x7f_ffff_0003_6dfb,
        true_entry: 0xffff_0000_11fb,
    };

    #[test]
    fn adjust_forces_and_clears() {
        // allowed-0 = 0b0001 (bit 0 forced), allowed-1 = 0b0111 (bit 3 forbidden)
        let cap = (0b0111u64 << 32) | 0b0001;
        assert_eq!(adjust(cap, 0b1010), 0b0011);
        assert!(allowed1(cap, 0b0110) && !allowed1(cap, 0b1000));
        assert!(allowed0(cap, 0b0110) && !allowed0(cap, 0b0001));
    }

    #[test]
    fn skylake_x_runs_with_every_exit_we_need() {
        let c = BOCHS_SKYLAKE_X.controls().expect("Bochs skylake-x runs the VMX backend");
        assert_eq!(c.revision, 0x2b);
        // What the backend logged on Bochs before the decision moved here.
        assert_eq!((c.pin, c.proc, c.proc2, c.exit, c.entry), (0x5f, 0x8598_61f2, 0x22, 0x7f_6ffb, 0xd3fb));
        assert_eq!(c.timer_rate, Some(0));
        assert!(c.pin & PIN_EXTERNAL_INTERRUPT_EXITING != 0 && c.pin & PIN_NMI_EXITING != 0);
        let exits = PROC_HLT_EXITING | PROC_UNCONDITIONAL_IO_EXITING | PROC_CR8_LOAD_EXITING
            | PROC_CR8_STORE_EXITING | PROC_MOV_DR_EXITING | PROC_SECONDARY_CONTROLS;
        assert_eq!(c.proc & exits, exits);
        assert_eq!(c.proc & (PROC_USE_IO_BITMAPS | PROC_USE_MSR_BITMAPS), 0);
        // Interrupt-window exiting is allowed but off until a vCPU asks for a window.
        assert_eq!(c.proc & PROC_INTERRUPT_WINDOW_EXITING, 0);
        assert!(allowed1(BOCHS_SKYLAKE_X.true_procbased, PROC_INTERRUPT_WINDOW_EXITING));
        assert_eq!(c.proc2 & (PROC2_ENABLE_EPT | PROC2_ENABLE_VPID), PROC2_ENABLE_EPT | PROC2_ENABLE_VPID);
        assert_eq!(c.exit & EXIT_ACK_INTERRUPT, 0);
        assert!(c.entry & ENTRY_IA32E_MODE_GUEST != 0);
        assert!(!c.lock_feature_control);
        // Each control word respects its capability MSR (the TRUE ones: basic bit 55).
        for (word, cap) in [(c.pin, BOCHS_SKYLAKE_X.true_pinbased), (c.proc, BOCHS_SKYLAKE_X.true_procbased),
            (c.exit, BOCHS_SKYLAKE_X.true_exit), (c.entry, BOCHS_SKYLAKE_X.true_entry),
            (c.proc2, BOCHS_SKYLAKE_X.procbased2)]
        {
            assert_eq!(adjust(cap, word), word, "{word:#x} against {cap:#x}");
        }
    }

    #[test]
    fn a_cpu_without_ept_or_vpid_is_refused_by_name() {
        let mut s = BOCHS_SKYLAKE_X;
        s.procbased2 &= !((PROC2_ENABLE_EPT as u64) << 32);
        assert_eq!(s.controls(), Err(Refusal::Missing("EPT (IA32_VMX_PROCBASED_CTLS2 bit 1)")));
        let mut s = BOCHS_SKYLAKE_X;
        s.procbased2 &= !((PROC2_ENABLE_VPID as u64) << 32);
        assert_eq!(s.controls(), Err(Refusal::Missing("VPID (IA32_VMX_PROCBASED_CTLS2 bit 5)")));
        let s = Snapshot::default();
        assert!(matches!(s.controls(), Err(Refusal::Missing(_))));
    }

    #[test]
    fn firmware_lock_without_vmx_is_disabled_and_an_open_lock_is_taken() {
        let mut s = BOCHS_SKYLAKE_X;
        s.feature_control = FEATURE_CONTROL_LOCK;
        assert_eq!(s.controls(), Err(Refusal::Disabled("VMX outside SMX (IA32_FEATURE_CONTROL bit 2)")));
        s.feature_control = 0;
        assert!(s.controls().expect("unlocked: we lock it").lock_feature_control);
    }

    #[test]
    fn without_the_preemption_timer_the_lapic_timer_is_used() {
        let mut s = BOCHS_SKYLAKE_X;
        s.true_pinbased &= !((PIN_PREEMPTION_TIMER as u64) << 32);
        let c = s.controls().expect("still runs");
        assert_eq!(c.timer_rate, None);
        assert_eq!(c.pin & PIN_PREEMPTION_TIMER, 0);
        assert_eq!(c.exit & EXIT_SAVE_PREEMPTION_TIMER, 0);
    }

    #[test]
    fn cr8_exiting_is_required() {
        let mut s = BOCHS_SKYLAKE_X;
        s.true_procbased &= !((PROC_CR8_LOAD_EXITING as u64) << 32);
        assert!(matches!(s.controls(), Err(Refusal::Missing(m)) if m.contains("CR8")));
    }
}
