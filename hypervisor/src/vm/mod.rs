//! Everything above the vendor backends: the `Backend` trait with the one exit enum both
//! backends translate into, guest setup, the round-robin vCPU loop and the hypercalls.
//! Nothing here tests the vendor; `main` picks VMX or SVM once from CPUID.

pub mod console;
pub mod fpu;
pub mod guest;
pub mod hypercall;
pub mod loader;
pub mod memory;
pub mod notify;
mod report;
pub mod runqueue;
pub mod sched;
pub mod shootdown;
pub mod switch;

use crate::arch::cpu::CpuFacts;
use crate::mm::frames::Frames;
use core::fmt;
use morsel::{Format, GuestPhysAddr, HostPhysAddr};

/// The drivers the hypercalls reach, owned by the vCPU loop's context and passed down from
/// `main`: there are no driver globals above the platform layer.
pub struct Drivers {
    /// The devices behind the IOMMU (None without one).
    pub devices: Option<crate::devices::Devices>,
    /// The persistent-memory region (None without an NVDIMM).
    pub pmem: Option<&'static crate::mm::pmem::Pmem>,
    /// `bench=on`: the `bench_frames` hypercall is answered (else `Denied`).
    pub bench: bool,
}

/// Guest general registers as the world switches save and load them. `rsp` and `rip`
/// live in the VMCB/VMCS; backends copy them in and out around a run.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rsp: u64,
    pub rip: u64,
}

/// Initial state of a vCPU: 64-bit mode, paging on with `cr3`, at `rip` with `rsp`, `rdi`
/// holding the boot information and `rsi` the vCPU's index in its guest.
#[derive(Clone, Copy)]
pub struct VcpuSetup {
    pub rip: u64,
    pub rsp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub cr3: u64,
    pub second_level_root: HostPhysAddr,
    /// Small guest number, unique among running guests (ASID / VPID source).
    pub id: u32,
}

/// Where the guest goes on after an instruction the hypervisor emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The CPU reported the next RIP (VMX exit instruction length, SVM next-RIP save).
    At(u64),
    /// The CPU did not say (SVM without next-RIP save): the instruction at RIP is decoded
    /// from guest memory (`formats::decode`), prefixes included.
    Decode,
}

/// Why a guest stopped running, in vendor-neutral terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// VMCALL / VMMCALL from privilege level `cpl`.
    Hypercall { resume: Resume, cpl: u8 },
    /// CPUID (VMX exits on it unconditionally); emulated.
    Cpuid { resume: Resume },
    /// HLT; `interrupts` is the guest's RFLAGS.IF (with IF = 0 it could never wake).
    Halt { resume: Resume, interrupts: bool },
    /// The time slice ended (VMX preemption timer; the scheduler also turns an `Interrupt`
    /// that the slice timer caused, or that came at or after the slice's end, into this).
    Preempted,
    /// A physical interrupt made the guest leave (SVM INTR intercept, VMX external-interrupt
    /// exiting): the host's handler has run. An IPI (a shootdown, a wake-up, a kick) before
    /// the slice's end resumes the same vCPU (`vm/sched.rs`).
    Interrupt,
    /// An access the second-level table does not allow.
    SecondLevelFault { gpa: u64, write: bool, fetch: bool, present: bool },
    /// A guest exception (all are intercepted: guests have no IDT). `address`: for #PF the
    /// faulting linear address, which the guest's CR2 would have held; 0 for other vectors.
    Exception { vector: u8, error_code: u32, address: u64 },
    /// Triple fault / shutdown.
    TripleFault,
    /// Port I/O (not allowed for guests).
    Io { port: u16, write: bool },
    /// MSR access (not allowed for guests).
    Msr { msr: u32, write: bool },
    /// An instruction the guest may not use (VMX/SVM instructions, INVD, ...).
    Forbidden { code: u64 },
    /// VM entry failed: the backend's state is inconsistent (a hypervisor bug).
    EntryFailed { code: u64, qualification: u64 },
    /// The guest can take an interrupt now (VMX interrupt-window exiting, SVM VINTR): asked
    /// for with `Backend::interrupt_window` while a virtual interrupt waits for RFLAGS.IF.
    InterruptWindow,
    /// Any other exit, with the raw vendor code.
    Other { code: u64 },
    /// The exit came back with the host's own state where the guest's belongs (`code`: the
    /// vendor's exit code it carried, `host_rip`: the RIP it held, the host's), again after
    /// every re-entry from the state saved before it: the emulator's (or the hypervisor's)
    /// fault, never the guest's (`svm::leaked_host_state`).
    HostStateLost { code: u64, host_rip: u64 },
}

impl Exit {
    /// Short name for the per-guest exit statistics.
    pub fn kind(&self) -> ExitKind {
        match self {
            Exit::Hypercall { .. } => ExitKind::Hypercall,
            Exit::Cpuid { .. } => ExitKind::Cpuid,
            Exit::Halt { .. } => ExitKind::Halt,
            Exit::Preempted => ExitKind::Preempted,
            Exit::Interrupt => ExitKind::Interrupt,
            Exit::SecondLevelFault { .. } => ExitKind::SecondLevelFault,
            Exit::Exception { .. } => ExitKind::Exception,
            Exit::TripleFault => ExitKind::TripleFault,
            Exit::Io { .. } | Exit::Msr { .. } | Exit::Forbidden { .. } => ExitKind::Forbidden,
            Exit::InterruptWindow => ExitKind::InterruptWindow,
            Exit::EntryFailed { .. } | Exit::Other { .. } | Exit::HostStateLost { .. } => ExitKind::Other,
        }
    }
}

/// Exit classes counted per guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum ExitKind {
    Hypercall,
    Cpuid,
    Halt,
    Preempted,
    SecondLevelFault,
    Exception,
    TripleFault,
    Forbidden,
    InterruptWindow,
    Interrupt,
    Other,
}

impl ExitKind {
    pub const COUNT: usize = 11;
    pub const ALL: [ExitKind; Self::COUNT] = [
        ExitKind::Hypercall,
        ExitKind::Cpuid,
        ExitKind::Halt,
        ExitKind::Preempted,
        ExitKind::SecondLevelFault,
        ExitKind::Exception,
        ExitKind::TripleFault,
        ExitKind::Forbidden,
        ExitKind::InterruptWindow,
        ExitKind::Interrupt,
        ExitKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Hypercall => "hypercall",
            ExitKind::Cpuid => "cpuid",
            ExitKind::Halt => "hlt",
            ExitKind::Preempted => "preempted",
            ExitKind::SecondLevelFault => "second-level-fault",
            ExitKind::Exception => "exception",
            ExitKind::TripleFault => "triple-fault",
            ExitKind::Forbidden => "forbidden",
            ExitKind::InterruptWindow => "interrupt-window",
            ExitKind::Interrupt => "interrupt",
            ExitKind::Other => "other",
        }
    }
}

/// Why a backend cannot run on this CPU.
#[derive(Debug)]
pub enum BackendError {
    /// A required feature is missing (named).
    Missing(&'static str),
    /// The firmware locked the feature off.
    Disabled(&'static str),
    /// Frames for control structures could not be allocated.
    NoMemory,
    /// The hardware refused an instruction (named) with a status.
    Failed(&'static str, u64),
}

impl From<formats::vmx_caps::Refusal> for BackendError {
    fn from(r: formats::vmx_caps::Refusal) -> Self {
        match r {
            formats::vmx_caps::Refusal::Missing(what) => BackendError::Missing(what),
            formats::vmx_caps::Refusal::Disabled(what) => BackendError::Disabled(what),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            BackendError::Missing(what) => write!(f, "the CPU lacks {what}"),
            BackendError::Disabled(what) => write!(f, "{what} is disabled by the firmware"),
            BackendError::NoMemory => write!(f, "out of memory for control structures"),
            BackendError::Failed(what, status) => write!(f, "{what} failed (status {status:#x})"),
        }
    }
}

/// A vendor's hardware virtualization: VMX with EPT, or SVM with NPT.
pub trait Backend: Sized + 'static {
    /// The second-level table format of this vendor.
    type Format: Format<Input = GuestPhysAddr>;
    /// Per-guest control state (VMCS or VMCB).
    type Vcpu;
    /// "vmx" or "svm" (also the log target).
    const NAME: &'static str;

    /// What `probe` found: the controls and features every CPU enables the backend with.
    type Caps;

    /// Checks that this CPU offers what the backend needs (a pure decision over a snapshot of
    /// its CPUID leaves and capability MSRs, host-tested in `formats`); changes nothing.
    fn probe(facts: &CpuFacts) -> Result<Self::Caps, BackendError>;
    /// Turns the extension on with what `probe` decided.
    fn enable(caps: &Self::Caps, frames: &Frames) -> Result<Self, BackendError>;
    /// Creates a vCPU in the state `setup` describes.
    fn create_vcpu(&mut self, setup: &VcpuSetup, frames: &Frames) -> Result<Self::Vcpu, BackendError>;
    /// Runs the vCPU until its next exit, for at most `budget_us` microseconds (what is left
    /// of its time slice).
    fn run(&mut self, vcpu: &mut Self::Vcpu, budget_us: u64) -> Exit;
    /// The guest's registers (valid between runs).
    fn regs(vcpu: &mut Self::Vcpu) -> &mut Regs;
    /// The guest's CR3 if it runs in 64-bit mode with 4-level paging (valid between runs):
    /// what decoding an instruction at a guest-virtual RIP needs.
    fn guest_cr3(vcpu: &mut Self::Vcpu) -> Option<u64>;
    /// Drops cached second-level translations of this vCPU (after an unmount).
    fn flush_second_level(&mut self, vcpu: &mut Self::Vcpu);
    /// Whether the guest can take an external interrupt at its next entry: RFLAGS.IF = 1, no
    /// STI / MOV SS shadow, and no event already queued for that entry (valid between runs).
    fn interruptible(vcpu: &mut Self::Vcpu) -> bool;
    /// Queues external interrupt `vector` (32..=255) for delivery through the guest's IDT at
    /// the next entry (VMX VM-entry interruption information, SVM EVENTINJ); only when
    /// `interruptible`.
    fn inject_interrupt(vcpu: &mut Self::Vcpu, vector: u8);
    /// Exit with `Exit::InterruptWindow` as soon as the guest can take an interrupt (`on`),
    /// or not.
    fn interrupt_window(vcpu: &mut Self::Vcpu, on: bool);
    /// The exception vectors (bit N = vector N) the guest takes through its own IDT; every
    /// other exception exits (and stops the guest).
    fn guest_exceptions(vcpu: &mut Self::Vcpu, mask: u32);
    /// Gives the vCPU's control structures back.
    fn destroy_vcpu(&mut self, vcpu: Self::Vcpu, frames: &Frames);
}
