//! AMD-V backend: EFER.SVME, one VMCB per guest, nested paging (NPT), ASIDs, VMMCALL.
//! Preemption: the host's LAPIC timer interrupt is intercepted (INTR exit).
//! References: AMD APM Vol. 2 chapter 15.

pub mod caps;
mod switch;
mod vmcb;

use allocator::Order;
use crate::arch::cpu::{CpuFacts, Extension};
use caps::Caps;
use alloc::vec;
use alloc::vec::Vec;
use crate::mm::frames::Frames;
use crate::vm::fpu::FpuState;
use crate::vm::{Backend, BackendError, Exit, Regs, Resume, VcpuSetup};
use morsel::{HostPhysAddr, Npt};
use vmcb::*;

const EFER_MSR: u32 = 0xc000_0080;
const EFER_SVME: u64 = 1 << 12;
const VM_HSAVE_PA: u32 = 0xc001_0117;
const EFER_LMA: u64 = 1 << 10;
const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;

/// SVM enabled on this CPU, with the shared I/O and MSR permission maps.
pub struct Svm {
    nrip_save: bool,
    asids: u32,
    /// By ASID: the guest whose translations the TLB may hold under it. With more guests than
    /// ASIDs they share (guest id modulo), and a guest whose ASID another guest used last
    /// runs after a flush of that ASID.
    asid_user: Vec<u32>,
    iopm: HostPhysAddr,
    msrpm: HostPhysAddr,
    /// VMSAVE/VMLOAD area for the host's FS, GS, TR, LDTR (with their hidden parts),
    /// KERNEL_GS_BASE, STAR/LSTAR/CSTAR/SFMASK and SYSENTER_*: VMRUN and #VMEXIT switch
    /// none of these (APM Vol. 2 15.5.2), so the world switch saves the host's here and
    /// loads the guest's from its VMCB, and back after the exit.
    host_state: HostPhysAddr,
    /// Exits whose VMCB held the host's state instead of the guest's (QEMU multi-threaded
    /// TCG, see `leaked_host_state`), each re-entered from the copy taken before VMRUN.
    host_state_exits: u64,
    /// VMRUNs on this CPU (for `test=svm-host-state`).
    runs: u64,
    /// The host's FPU/SSE state while a guest runs on this CPU.
    host_fpu: alloc::boxed::Box<FpuState>,
}

/// A guest's VMCB and its saved registers.
pub struct Vcpu {
    guest: u32,
    asid: u32,
    vmcb: Vmcb,
    regs: Regs,
    fpu: FpuState,
}

/// Segment attributes in VMCB form (descriptor bits 40-47 in 0-7, 52-55 in 8-11).
const CODE64: u16 = 0x09b | (1 << 9) | (1 << 11); // present, code r/x accessed, L, G
const DATA: u16 = 0x093 | (1 << 10) | (1 << 11); // present, data r/w accessed, D/B, G
const TSS64: u16 = 0x08b; // present, busy 64-bit TSS
const LDT: u16 = 0x082;

impl Backend for Svm {
    type Format = Npt;
    type Vcpu = Vcpu;
    const NAME: &'static str = "svm";

    type Caps = Caps;

    fn probe(facts: &CpuFacts) -> Result<Caps, BackendError> {
        if facts.extension != Extension::Svm {
            return Err(BackendError::Missing("SVM (CPUID 8000_0001 ECX bit 2)"));
        }
        caps::snapshot().caps().map_err(BackendError::from)
    }

    fn enable(caps: &Caps) -> Result<Self, BackendError> {
        let frames = &Frames::here();
        let hsave = frames.alloc_zeroed(Order::BASE).ok_or(BackendError::NoMemory)?;
        let host_state = frames.alloc_zeroed(Order::BASE).ok_or(BackendError::NoMemory)?;
        // The I/O permission map is 12 KiB, the MSR permission map 8 KiB (APM 15.10, 15.11):
        // all ones intercepts every port and MSR. A 2 MiB frame holds both contiguously.
        let maps = frames.alloc_zeroed(Order::HUGE).ok_or(BackendError::NoMemory)?;
        let iopm = maps;
        let msrpm = HostPhysAddr::new(maps.as_u64() + 0x4000);
        // SAFETY: the 2 MiB frame is ours and identity-mapped; 0x6000 bytes lie inside it.
        unsafe { core::ptr::write_bytes(maps.as_u64() as *mut u8, 0xff, 0x6000) };
        // SAFETY: SVM exists and is not disabled (checked above); the host save area is a
        // page we own for the rest of the run.
        unsafe {
            x86::msr::wrmsr(EFER_MSR, x86::msr::rdmsr(EFER_MSR) | EFER_SVME);
            x86::msr::wrmsr(VM_HSAVE_PA, hsave.as_u64());
        }
        register_host_page(hsave);
        register_host_page(host_state);
        crate::arch::apic::start_periodic_timer_us(crate::vm::sched::SLICE_US);
        log::info!(target: "svm", "SVM enabled: {} ASIDs, NPT, next-RIP save {}",
            caps.asids, if caps.nrip_save { "yes" } else { "no (instructions are decoded)" });
        Ok(Svm {
            nrip_save: caps.nrip_save,
            asids: caps.asids,
            asid_user: vec![u32::MAX; caps.asids as usize],
            iopm,
            msrpm,
            host_state,
            host_state_exits: 0,
            runs: 0,
            host_fpu: alloc::boxed::Box::new(FpuState::initial()),
        })
    }

    fn create_vcpu(&mut self, s: &VcpuSetup) -> Result<Vcpu, BackendError> {
        let frames = &Frames::here();
        // ASID 0 belongs to the host.
        let asid = 1 + s.id % (self.asids - 1);
        let mut vmcb = Vmcb::new(frames.alloc_zeroed(Order::BASE).ok_or(BackendError::NoMemory)?);
        let Area { control: c, save: v } = vmcb.get_mut();
        // Intercept every exception (each stops the guest) until the guest says which it
        // handles itself (`guest_exceptions`).
        c.intercept_exceptions = 0xffff_ffff;
        // CPU state that VMRUN does not switch and a guest could otherwise write: debug
        // registers, XCR0 (XSETBV), CR4 (which would enable PKRU); INVLPGA would reach
        // other ASIDs. Each of these exits and stops the guest.
        c.intercept_cr = CR_WRITE_CR4;
        c.intercept_dr = 0xffff_ffff;
        c.intercept_misc1 = MISC1_INTR | MISC1_NMI | MISC1_INVD | MISC1_HLT | MISC1_INVLPGA
            | MISC1_IOIO | MISC1_MSR | MISC1_SHUTDOWN;
        c.intercept_misc2 = MISC2_ALL_SVM | MISC2_XSETBV;
        c.iopm_base_pa = self.iopm.as_u64();
        c.msrpm_base_pa = self.msrpm.as_u64();
        c.guest_asid = asid;
        c.vintr = VINTR_MASKING;
        c.np_enable = 1;
        c.n_cr3 = s.second_level_root.as_u64();
        c.clean_bits = 0;

        // 64-bit mode, paging with the guest's identity map (APM 15.5: VMRUN checks).
        v.cs = Segment::new(0x08, CODE64, 0xffff_ffff, 0);
        for seg in [&mut v.ds, &mut v.es, &mut v.ss, &mut v.fs, &mut v.gs] {
            *seg = Segment::new(0x10, DATA, 0xffff_ffff, 0);
        }
        v.tr = Segment::new(0x18, TSS64, 0x67, 0);
        v.ldtr = Segment::new(0, LDT, 0, 0);
        v.gdtr = Segment::default();
        v.idtr = Segment::default();
        v.cpl = 0;
        v.efer = (1 << 8) | (1 << 10) | EFER_SVME; // LME, LMA, SVME (required)
        v.cr0 = 0x8000_0033; // PG, NE, ET, MP, PE
        v.cr3 = s.cr3;
        v.cr4 = (1 << 5) | (1 << 9) | (1 << 10); // PAE, OSFXSR, OSXMMEXCPT
        v.dr6 = 0xffff_0ff0;
        v.dr7 = 0x400;
        // IF = 1: with V_INTR_MASKING the guest's IF gates only virtual interrupts (AMD APM
        // Vol. 2 15.21.1), which are injected only while it is 1; Bochs 2.7 instead masks
        // physical interrupts while the guest's IF is 0, and a guest entered with IF = 0
        // could not be preempted there.
        v.rflags = 0x202;
        v.g_pat = 0x0007_0406_0007_0406;
        let regs = Regs { rip: s.rip, rsp: s.rsp, rdi: s.rdi, rsi: s.rsi, ..Regs::default() };
        Ok(Vcpu { guest: s.id, asid, vmcb, regs, fpu: FpuState::initial() })
    }

    /// The budget is kept by the host's periodic LAPIC timer (an INTR exit every slice) and
    /// by the scheduler's own deadline check between exits.
    fn run(&mut self, vcpu: &mut Vcpu, _budget_us: u64) -> Exit {
        let user = &mut self.asid_user[vcpu.asid as usize];
        let Area { control: c, save: v } = vcpu.vmcb.get_mut();
        v.rip = vcpu.regs.rip;
        v.rsp = vcpu.regs.rsp;
        v.rax = vcpu.regs.rax;
        // Also the first run: no ASID starts with a user.
        if *user != vcpu.guest {
            c.tlb_control = 3; // flush this guest's ASID
            *user = vcpu.guest;
        }
        // The guest's state as VMRUN will load it, kept for the one case where the exit
        // comes back with the host's state in its place (`leaked_host_state`).
        let entry = Entry::take(vcpu);
        self.runs += 1;
        // VMRUN writes the host's state into the host save area before it loads the guest's
        // from the VMCB: were they one page, the guest would "run" the host's state.
        if is_host_page(vcpu.vmcb.pa()) {
            log::error!(target: "svm", "guest {}: its VMCB {:#x} is a CPU's host save or VMSAVE page (a frame handed out twice)",
                vcpu.guest, vcpu.vmcb.pa().as_u64());
            return Exit::EntryFailed { code: EXIT_INVALID, qualification: vcpu.vmcb.pa().as_u64() };
        }
        let mut tries = 0;
        loop {
            match INJECT_HOST_STATE.load(core::sync::atomic::Ordering::Relaxed) {
                INJECT_SOMETIMES if tries == 0 && self.runs.is_multiple_of(64) => self.inject_host_state(vcpu),
                INJECT_ALWAYS if self.runs > 1 => self.inject_host_state(vcpu),
                _ => {}
            }
            // SAFETY: the VMCB was set up by create_vcpu with a nested table that maps only
            // the guest's memory, and SVM is enabled; host_state is a page of ours.
            unsafe {
                switch::run(&mut vcpu.regs, vcpu.vmcb.pa().as_u64(), self.host_state.as_u64(), &mut vcpu.fpu, &mut self.host_fpu)
            };
            if !leaked_host_state(&vcpu.vmcb, self.host_state) {
                break;
            }
            self.host_state_exits += 1;
            tries += 1;
            let c = &vcpu.vmcb.get().control;
            let v = &vcpu.vmcb.get().save;
            let (a, b) = (&vcpu.regs, &entry.regs);
            let moved = [a.rbx, a.rcx, a.rdx, a.rsi, a.rdi, a.rbp, a.r8, a.r9, a.r10, a.r11, a.r12, a.r13, a.r14, a.r15]
                != [b.rbx, b.rcx, b.rdx, b.rsi, b.rdi, b.rbp, b.r8, b.r9, b.r10, b.r11, b.r12, b.r13, b.r14, b.r15];
            // Re-entering from the copy is only sound if the guest did not run between VMRUN
            // and this exit: VMRUN itself loaded the host's state and the exit came before the
            // first instruction (`did_not_run`), with the registers it was entered with. If the
            // save area was instead written by a second #VMEXIT after the host's state was back
            // (`written_after_exit`), the guest ran before the first one and the state it reached
            // is lost; re-running it from the copy would repeat its instructions against newer
            // memory, silently (seen in a simulation: a consumer then failed its own checksum
            // check). Stop it and say why (docs/src/notes/worldswitch.md, "Is re-entering safe").
            let after_exit = written_after_exit(&vcpu.vmcb);
            if moved || after_exit || !did_not_run(&vcpu.vmcb) {
                log::error!(target: "svm",
                    "guest {}: #VMEXIT {:#x} (info {:#x} / {:#x}, intinfo {:#x}) came back with the host's state (RIP {:#x}, CR3 {:#x}, RSP {:#x}) where the guest may have run since VMRUN at RIP {:#x} (registers {}, {}): its state is lost, it cannot be resumed; an emulator fault (QEMU TCG SVM), not the guest's",
                    vcpu.guest, c.exitcode, c.exitinfo1, c.exitinfo2, c.exitintinfo, v.rip, v.cr3, v.rsp, entry.rip(),
                    if moved { "changed" } else { "unchanged" },
                    if after_exit { "saved by a second #VMEXIT after the host's state was back (V_INTR_MASKING cleared)" } else { "not an exit before the first instruction" });
                let (code, host_rip) = (c.exitcode, v.rip);
                entry.restore(vcpu);
                return Exit::HostStateLost { code, host_rip };
            }
            log::warn!(target: "svm",
                "guest {}: #VMEXIT {:#x} (info {:#x} / {:#x}, intinfo {:#x}) came back with the host's state (RIP {:#x}, CR3 {:#x}, RSP {:#x}) instead of the guest's (RIP {:#x}, registers unchanged: it did not run): an emulator fault (QEMU TCG SVM); re-entering from the state before VMRUN (try {tries}, {} on this CPU)",
                vcpu.guest, c.exitcode, c.exitinfo1, c.exitinfo2, c.exitintinfo, v.rip, v.cr3, v.rsp, entry.rip(),
                self.host_state_exits);
            if tries >= ENTRY_RETRIES {
                // Reported by `vm/report.rs` as the emulator's fault, not the guest's; the
                // VMCB keeps the guest's state from before the run.
                let (code, host_rip) = (vcpu.vmcb.get().control.exitcode, vcpu.vmcb.get().save.rip);
                entry.restore(vcpu);
                return Exit::HostStateLost { code, host_rip };
            }
            entry.restore(vcpu);
        }
        let Area { control: c, save: v } = vcpu.vmcb.get_mut();
        c.tlb_control = 0;
        // An event whose delivery the exit interrupted goes in again at the next entry (APM
        // Vol. 2 15.7.2: EXITINTINFO has EVENTINJ's format); otherwise nothing is queued.
        c.eventinj = if c.exitintinfo & EVENT_VALID != 0 { c.exitintinfo } else { 0 };
        vcpu.regs.rip = v.rip;
        vcpu.regs.rsp = v.rsp;
        vcpu.regs.rax = v.rax;
        let (code, info1, info2) = (c.exitcode, c.exitinfo1, c.exitinfo2);
        // Next RIP: from the VMCB where the CPU saves it, else decoded from guest memory (an
        // instruction may carry prefixes: `66 0f 01 d9` is a 4-byte VMMCALL).
        let resume = if self.nrip_save { Resume::At(c.nrip) } else { Resume::Decode };
        match code {
            EXIT_VMMCALL => Exit::Hypercall { resume, cpl: v.cpl & 3 },
            EXIT_CPUID => Exit::Cpuid { resume },
            EXIT_HLT => Exit::Halt { resume, interrupts: v.rflags & RFLAGS_IF != 0 },
            // The host took the interrupt after the exit (STGI in `switch`): the slice timer
            // or an IPI; the scheduler tells which (`vm/sched.rs`).
            EXIT_INTR => Exit::Interrupt,
            EXIT_NMI => Exit::Preempted,
            EXIT_VINTR => {
                Self::interrupt_window(vcpu, false);
                Exit::InterruptWindow
            }
            // EXITINFO1: #PF-style error code, EXITINFO2: guest-physical address (APM 15.25.6).
            EXIT_NPF => Exit::SecondLevelFault {
                gpa: info2,
                write: info1 & 2 != 0,
                fetch: info1 & 0x10 != 0,
                present: info1 & 1 != 0,
            },
            // EXITINFO2 of an intercepted #PF: the faulting address; CR2 is not written (APM Vol. 2, 15.12 Exception Intercepts).
            c if (EXIT_EXCEPTION_0..EXIT_EXCEPTION_0 + 32).contains(&c) => {
                let vector = (c - EXIT_EXCEPTION_0) as u8;
                Exit::Exception { vector, error_code: info1 as u32, address: if vector == 14 { info2 } else { 0 } }
            }
            EXIT_SHUTDOWN => Exit::TripleFault,
            EXIT_IOIO => Exit::Io { port: (info1 >> 16) as u16, write: info1 & 1 == 0 },
            EXIT_MSR => Exit::Msr { msr: vcpu.regs.rcx as u32, write: info1 & 1 != 0 },
            EXIT_INVD | EXIT_INVLPGA | EXIT_VMRUN..=0x86 | EXIT_XSETBV | EXIT_CR4_WRITE
            | EXIT_DR_FIRST..=EXIT_DR_LAST => Exit::Forbidden { code },
            EXIT_INVALID => Exit::EntryFailed { code, qualification: 0 },
            _ => Exit::Other { code },
        }
    }

    fn regs(vcpu: &mut Vcpu) -> &mut Regs {
        &mut vcpu.regs
    }

    fn guest_cr3(vcpu: &mut Vcpu) -> Option<u64> {
        let v = &vcpu.vmcb.get().save;
        let long_paging = v.efer & EFER_LMA != 0 && v.cr0 & CR0_PG != 0;
        (long_paging && v.cr4 & CR4_LA57 == 0).then_some(v.cr3)
    }

    fn flush_second_level(&mut self, vcpu: &mut Vcpu) {
        vcpu.vmcb.get_mut().control.tlb_control = 3; // flush this guest's ASID on the next VMRUN
    }

    fn interruptible(vcpu: &mut Vcpu) -> bool {
        let Area { control: c, save: v } = vcpu.vmcb.get_mut();
        v.rflags & RFLAGS_IF != 0 && c.interrupt_shadow & INTERRUPT_SHADOW == 0 && c.eventinj & EVENT_VALID == 0
    }

    fn has_idt(vcpu: &mut Vcpu) -> bool {
        vcpu.vmcb.get().save.idtr.limit != 0
    }

    fn inject_interrupt(vcpu: &mut Vcpu, vector: u8) {
        vcpu.vmcb.get_mut().control.eventinj = EVENT_VALID | vector as u64; // type 0: INTR
    }

    fn interrupt_window(vcpu: &mut Vcpu, on: bool) {
        let c = &mut vcpu.vmcb.get_mut().control;
        if on {
            c.vintr |= VINTR_IRQ | VINTR_IGN_TPR;
            c.intercept_misc1 |= MISC1_VINTR;
        } else {
            c.vintr &= !(VINTR_IRQ | VINTR_IGN_TPR);
            c.intercept_misc1 &= !MISC1_VINTR;
        }
    }

    fn guest_exceptions(vcpu: &mut Vcpu, mask: u32) {
        vcpu.vmcb.get_mut().control.intercept_exceptions = !mask;
    }

    fn destroy_vcpu(&mut self, vcpu: Vcpu) {
        let frames = &Frames::here();
        frames.free(vcpu.vmcb.pa(), Order::BASE);
    }
}

/// How often one run re-enters after an exit that came back with the host's state before it
/// gives up (the exit is then reported as the emulator's fault, `vm/report.rs`).
const ENTRY_RETRIES: u32 = 8;

/// Bytes of the state save area that VMRUN loads and #VMEXIT stores (up to and including
/// DBGCTL, APM Vol. 2 table B-2); the rest is reserved or VMLOAD/VMSAVE's.
const SAVE_SWITCHED: usize = 0x280;

/// The guest's state as the next VMRUN loads it: the switched part of the save area, the
/// event and interrupt controls, and the general registers.
struct Entry {
    save: [u64; SAVE_SWITCHED / 8],
    eventinj: u64,
    vintr: u64,
    interrupt_shadow: u64,
    regs: Regs,
}

impl Entry {
    fn take(vcpu: &Vcpu) -> Entry {
        let area = vcpu.vmcb.get();
        let mut save = [0u64; SAVE_SWITCHED / 8];
        // SAFETY: the save area is SAVE_SWITCHED bytes and more of plain integers in a page
        // only this vCPU uses; `save` is a local array of the same size.
        unsafe { core::ptr::copy_nonoverlapping(&raw const area.save as *const u64, save.as_mut_ptr(), save.len()) };
        let c = &area.control;
        Entry { save, eventinj: c.eventinj, vintr: c.vintr, interrupt_shadow: c.interrupt_shadow, regs: vcpu.regs }
    }

    fn rip(&self) -> u64 {
        self.save[core::mem::offset_of!(Save, rip) / 8]
    }

    /// Puts the guest's state back as it was before the run, with its ASID flushed.
    fn restore(&self, vcpu: &mut Vcpu) {
        let area = vcpu.vmcb.get_mut();
        // SAFETY: as in `take`, the other way round; `&mut` makes the VMCB ours.
        unsafe { core::ptr::copy_nonoverlapping(self.save.as_ptr(), &raw mut area.save as *mut u64, self.save.len()) };
        let c = &mut area.control;
        c.eventinj = self.eventinj;
        c.vintr = self.vintr;
        c.interrupt_shadow = self.interrupt_shadow;
        c.tlb_control = 3;
        c.exitcode = 0;
        vcpu.regs = self.regs;
    }
}

/// True if the #VMEXIT stored the host's state where the guest's belongs: the VMCB's RIP
/// is the host's own return address from VMRUN, its CR3 and RSP the host's. Seen under
/// QEMU 7.2's multi-threaded TCG in about one demo run in ten (issue 20 item 6, cause not
/// pinned down: docs/src/notes/worldswitch.md); real hardware never should. A guest cannot cause it for another guest: its own VMCB
/// is the only one it can make look like this, and then it only re-runs itself.
fn leaked_host_state(vmcb: &Vmcb, host_state: HostPhysAddr) -> bool {
    let v = &vmcb.get().save;
    // SAFETY: reading CR3 has no side effects.
    let host_cr3 = unsafe { x86::controlregs::cr3() };
    // SAFETY: the host's VMSAVE page is ours, identity-mapped, and the slot is an aligned
    // u64 that only this CPU's world switch writes (before VMRUN, not concurrently).
    let host_rsp = unsafe { core::ptr::read_volatile((host_state.as_u64() + switch::HOST_RSP_SLOT) as *const u64) };
    v.rip == switch::vmrun_return() && v.cr3 == host_cr3 && v.rsp == host_rsp
}

/// True if an exit that carries the host's state (`leaked_host_state`) came before the first
/// instruction at the host's RIP ran: a nested page fault during the page-table walk of that
/// fetch (EXITINFO1 bit 33, APM Vol. 2 15.25.6; the walk starts at the host's PML4, outside the
/// guest's memory), a page fault on the fetch at that RIP (a guest whose memory covers the
/// host's PML4 address), the intercepted VMSAVE that the host's code has there (fetched, never
/// executed), or an interrupt or NMI taken at the instruction boundary right after VMRUN.
fn did_not_run(vmcb: &Vmcb) -> bool {
    let Area { control: c, save: v } = vmcb.get();
    v.rip == switch::vmrun_return()
        && match c.exitcode {
            EXIT_NPF => c.exitinfo1 & NPF_IN_WALK != 0,
            code if code == EXIT_EXCEPTION_0 + 14 => c.exitinfo2 == v.rip,
            EXIT_VMSAVE | EXIT_INTR | EXIT_NMI | EXIT_VINTR => true,
            _ => false,
        }
}

/// True if the save area was written by a #VMEXIT taken while the host's state was already
/// back, not by one taken in guest mode: our VMCBs always have V_INTR_MASKING set, a #VMEXIT
/// stores the CPU's interrupt control back (QEMU 7.2.22 `target/i386/tcg/sysemu/svm_helper.c:794`)
/// and clears it once the host's state is back (`:817`), so a second #VMEXIT without a VMRUN
/// in between stores it with V_INTR_MASKING clear. Bochs keeps the bit (scenario
/// `svm_host_state_exit_is_re_entered` re-enters there); hardware writes back only the virtual
/// TPR and interrupt state (APM Vol. 2 15.21) and never takes such an exit.
fn written_after_exit(vmcb: &Vmcb) -> bool {
    vmcb.get().control.vintr & VINTR_MASKING == 0
}

/// EXITINFO1 of a nested page fault: during the guest's own page-table walk (APM Vol. 2 15.25.6).
const NPF_IN_WALK: u64 = 1 << 33;

/// Host save areas and host VMSAVE pages of every CPU that enabled SVM (0: free slot).
static HOST_PAGES: [core::sync::atomic::AtomicU64; 2 * 256] = [const { core::sync::atomic::AtomicU64::new(0) }; 2 * 256];

fn register_host_page(pa: HostPhysAddr) {
    use core::sync::atomic::Ordering::Relaxed;
    // A full table (over 256 CPUs) leaves the page unchecked, nothing worse.
    let _ = HOST_PAGES.iter().find(|s| s.compare_exchange(0, pa.as_u64(), Relaxed, Relaxed).is_ok());
}

/// True if `pa` is a CPU's host save area or host VMSAVE page.
fn is_host_page(pa: HostPhysAddr) -> bool {
    use core::sync::atomic::Ordering::Relaxed;
    HOST_PAGES.iter().map(|s| s.load(Relaxed)).take_while(|&p| p != 0).any(|p| p == pa.as_u64())
}

/// `test=svm-host-state`: before some VMRUNs, `Svm::inject_host_state` makes the VMCB look
/// as QEMU's multi-threaded TCG sometimes leaves it after an exit.
/// `INJECT_SOMETIMES` (every 64th VMRUN of each CPU) or `INJECT_ALWAYS` (every VMRUN after the
/// CPU's first, re-entries included, so that the backend gives up); 0: off.
pub static INJECT_HOST_STATE: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);
pub const INJECT_SOMETIMES: u8 = 1;
pub const INJECT_ALWAYS: u8 = 2;

impl Svm {
    /// Writes the host's RIP after VMRUN, CR3 and RSP (the world switch's, from the last run)
    /// into the VMCB: the guest then "runs" host code under its own nested table and exits
    /// with a nested page fault at the host's PML4, the fault seen in issue 20 item 6. The
    /// backend must recognise it and re-enter from the state it kept.
    fn inject_host_state(&mut self, vcpu: &mut Vcpu) {
        // SAFETY: as in `leaked_host_state`: our page, a slot only this CPU writes.
        let host_rsp = unsafe { core::ptr::read_volatile((self.host_state.as_u64() + switch::HOST_RSP_SLOT) as *const u64) };
        if host_rsp == 0 {
            return;
        }
        let v = &mut vcpu.vmcb.get_mut().save;
        v.rip = switch::vmrun_return();
        // SAFETY: reading CR3 has no side effects.
        v.cr3 = unsafe { x86::controlregs::cr3() };
        v.rsp = host_rsp;
    }
}
