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
use core::fmt;
use morsel::{Format, GuestPhysAddr, HostPhysAddr};

/// The exit enum both backends translate into, the registers the world switches save, and
/// the exit arms that need no hardware: `vmcore::vcpu`, host-tested there.
pub use vmcore::vcpu::{Exit, ExitKind, Regs, Resume};

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
    fn enable(caps: &Self::Caps) -> Result<Self, BackendError>;
    /// Creates a vCPU in the state `setup` describes.
    fn create_vcpu(&mut self, setup: &VcpuSetup) -> Result<Self::Vcpu, BackendError>;
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
    /// Whether the guest has loaded an IDT (its limit is not 0, as it is at the first entry;
    /// valid between runs). A vCPU starts with RFLAGS.IF = 1, so before its first LIDT it is
    /// `interruptible`, but a vector injected then is a #GP (IDT limit): none goes in before.
    fn has_idt(vcpu: &mut Self::Vcpu) -> bool;
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
    fn destroy_vcpu(&mut self, vcpu: Self::Vcpu);
}
