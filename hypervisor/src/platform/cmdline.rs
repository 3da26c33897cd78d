//! The hypervisor command line: space-separated `key=value` words.
//! * `guests=SPEC,SPEC,...` runs these guests from the boot archive (a name may repeat);
//!   a SPEC is `name[:mem=SIZE][:slices=N][:arg=N][:vcpus=N][:cpu=K][:code=N|:stopped]`
//!   (vCPUs, default 1, at most 16; `cpu=K` runs every vCPU of the guest on CPU K): memory (`16M`,
//!   `1G`; default 16 MiB), a CPU budget of N time slices after which the guest is stopped,
//!   a number for the guest (its boot information's `arg`; sizes like `256M` allowed), and
//!   how the guest is expected to end (default: exit code 0). The run succeeds only if
//!   every guest ends as expected.
//! * `log=error|warn|info|debug|trace`
//! * `test=fault`: a deliberate hypervisor fault after boot (proves the exception path).
//! * `test=svm-host-state`: every 64th VMRUN on each CPU gets the host's state in the VMCB,
//!   as QEMU's multi-threaded TCG sometimes leaves it (proves the SVM backend's re-entry);
//!   `test=svm-host-state:always`: every VMRUN, re-entries too (proves the report when the
//!   backend gives up).
//! * `test=dma-fault`: edu DMAs to an address its IOMMU domain does not map (proves the
//!   fault is reported and a canary page stays unchanged).
//! * `test=dma-nodomain` (AMD-Vi): edu's device-table entry is set to the one every device
//!   without a domain has, edu DMAs to a canary page, and the block and its report are checked.
//! * `test=sharept`: an EPT-format morsel's own subtree mounted into edu's and the NVMe
//!   controller's VT-d domains, DMA through it checked (`devices::selftest`).
//! * `iommu=register`: VT-d register-based invalidation even where the unit has a queue.
//! * `iommu=sharept`: on VT-d, an NPT morsel's device mounts go through an EPT twin (the
//!   morsel in the EPT format over the same data frames), whose subtree is mounted itself,
//!   as a VMX guest's EPT morsel is (`iommu::mount`); default: a VT-d view.
//! * `bench=on`: guests may call `bench_frames` (the allocator measured from inside the
//!   hypervisor, `cargo xtask bench smp`); without it the call is `Denied`.
//! * `cpus=N`: bring at most N CPUs online (the boot CPU counts; N >= 1).
//! * `pmem=format`: format the persistent-memory region even if it holds something other
//!   than a fresh (all-zero) region or ours.
//! * `pmem=drop:N[,N...]`, `pmem=drop:damaged`: recovery removes these directory records
//!   (slot numbers as the boot log prints them), or every record that does not restore; their
//!   frames are freed. Repeatable, and combines with `pmem=format`.
//! * `test=pmem-crash:format|magic`: stop the machine right after a format's first write, or
//!   right after its superblock magic (a power loss there; the crash scenarios use it).

use crate::mm::pmem::{self, CrashPoint};
use crate::vm::guest::{Expect, GuestSpec};
use alloc::vec::Vec;
use formats::units::parse_size;

/// A deliberate misbehaviour for the test scenarios.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Test {
    /// Read an unmapped address after boot: proves the exception path.
    Fault,
    /// Let a device DMA outside its domain: proves the IOMMU blocks and reports it.
    DmaFault,
    /// Give edu the blocked device-table entry and let it DMA (AMD-Vi).
    DmaNoDomain,
    /// Mount an EPT-format morsel's own subtree into VT-d domains and DMA through it.
    SharePt,
    /// Put the host's state into a VMCB before some VMRUNs (`svm::INJECT_HOST_STATE`).
    SvmHostState,
    /// The same before every VMRUN.
    SvmHostStateAlways,
}

/// The words this parser understands, for error messages.
pub const VALID: &str = "guests=NAME[:mem=SIZE][:slices=N][:arg=N][:vcpus=N][:cpu=K][:code=N|:stopped],... \
    log=error|warn|info|debug|trace test=fault|dma-fault|dma-nodomain|sharept|svm-host-state|svm-host-state:always|pmem-crash:format|pmem-crash:magic \
    pmem=format|drop:N[,N...]|drop:damaged iommu=register|sharept nvme=poll cpus=N bench=on (SIZE: bytes or K, M, G)";

/// Default guest memory.
/// How the IOMMU is driven (`iommu=...`).
#[derive(Clone, Copy, Debug, Default)]
pub struct IommuOptions {
    /// `iommu=register`: VT-d register-based invalidation even where the unit has a queue.
    pub register_invalidation: bool,
    /// `iommu=sharept`: NPT morsels reach VT-d domains through their EPT twin's own subtree.
    pub share_ept: bool,
}

pub const DEFAULT_GUEST_MEMORY: u64 = 16 << 20;

/// Parsed command line.
pub struct Args {
    pub guests: Vec<GuestSpec>,
    pub log_level: log::LevelFilter,
    pub test: Option<Test>,
    /// `pmem=format`, `pmem=drop:...`, `test=pmem-crash:...`.
    pub pmem: pmem::Options,
    /// `cpus=N`: at most N CPUs online (None: every enabled CPU of the MADT).
    pub cpus: Option<usize>,
    /// `iommu=register`, `iommu=sharept`.
    pub iommu: IommuOptions,
    /// `nvme=poll`: NVMe completions are polled even where the device offers MSI-X.
    pub nvme_poll: bool,
    /// `bench=on`: the `bench_frames` hypercall is answered.
    pub bench: bool,
    /// Words that were not understood, with the reason.
    pub errors: Vec<(&'static str, &'static str)>,
}

impl Args {
    pub fn parse(line: &'static str) -> Args {
        let mut a = Args { guests: Vec::new(), log_level: log::LevelFilter::Info, test: None, pmem: pmem::Options::default(), cpus: None, iommu: IommuOptions::default(), nvme_poll: false, bench: false, errors: Vec::new() };
        for word in line.split_ascii_whitespace() {
            match word.split_once('=') {
                Some(("guests", list)) => {
                    for spec in list.split(',').filter(|g| !g.is_empty()) {
                        match guest_spec(spec) {
                            Ok(g) => a.guests.push(g),
                            Err(why) => a.errors.push((spec, why)),
                        }
                    }
                }
                Some(("log", level)) => match level.parse() {
                    Ok(l) => a.log_level = l,
                    Err(_) => a.errors.push((word, "unknown log level")),
                },
                Some(("test", "fault")) => a.test = Some(Test::Fault),
                Some(("test", "dma-fault")) => a.test = Some(Test::DmaFault),
                Some(("test", "dma-nodomain")) => a.test = Some(Test::DmaNoDomain),
                Some(("test", "sharept")) => a.test = Some(Test::SharePt),
                Some(("test", "svm-host-state")) => a.test = Some(Test::SvmHostState),
                Some(("test", "svm-host-state:always")) => a.test = Some(Test::SvmHostStateAlways),
                Some(("pmem", "format")) => a.pmem.format = true,
                Some(("pmem", "drop:damaged")) => a.pmem.drop.damaged = true,
                Some(("pmem", drop)) if drop.starts_with("drop:") => match drop_slots(&drop[5..]) {
                    Some(slots) => a.pmem.drop.slots |= slots,
                    None => a.errors.push((word, "pmem=drop: wants slot numbers 0-63 (`pmem=drop:1,5`) or `damaged`")),
                },
                Some(("test", "pmem-crash:format")) => a.pmem.crash = Some(CrashPoint::Format),
                Some(("test", "pmem-crash:magic")) => a.pmem.crash = Some(CrashPoint::Magic),
                Some(("iommu", "register")) => a.iommu.register_invalidation = true,
                Some(("iommu", "sharept")) => a.iommu.share_ept = true,
                Some(("nvme", "poll")) => a.nvme_poll = true,
                Some(("bench", "on")) => a.bench = true,
                Some(("cpus", n)) => match n.parse::<usize>() {
                    Ok(n) if n >= 1 => a.cpus = Some(n),
                    _ => a.errors.push((word, "cpus wants a number of CPUs, at least 1")),
                },
                _ => a.errors.push((word, "unknown option")),
            }
        }
        a
    }
}

/// `1,5,7`: one bit per slot; `None` for anything else (a slot beyond the directory's 64).
fn drop_slots(list: &str) -> Option<u64> {
    list.split(',').try_fold(0u64, |bits, n| {
        let n: u32 = n.parse().ok()?;
        (n < 64).then(|| bits | 1 << n)
    })
}

fn guest_spec(spec: &'static str) -> Result<GuestSpec, &'static str> {
    let mut parts = spec.split(':');
    let name = parts.next().filter(|n| !n.is_empty()).ok_or("empty guest name")?;
    let mut g = GuestSpec { name, memory: DEFAULT_GUEST_MEMORY, max_slices: None, arg: 0, expect: Expect::Code(0), vcpus: 1, cpu: None };
    for part in parts {
        match part.split_once('=') {
            Some(("mem", size)) => g.memory = parse_size(size).ok_or("bad memory size")?,
            Some(("arg", n)) => g.arg = parse_size(n).ok_or("bad guest argument")?,
            Some(("slices", n)) => g.max_slices = Some(n.parse().map_err(|_| "bad slice count")?),
            Some(("vcpus", n)) => match n.parse::<u32>() {
                Ok(n) if (1..=crate::vm::guest::MAX_VCPUS).contains(&n) => g.vcpus = n,
                _ => return Err("vcpus wants 1 to 16"),
            },
            Some(("cpu", n)) => g.cpu = Some(n.parse().map_err(|_| "bad CPU index")?),
            Some(("code", n)) => g.expect = Expect::Code(n.parse().map_err(|_| "bad exit code")?),
            None if part == "stopped" => g.expect = Expect::Stopped,
            _ => return Err("unknown guest option"),
        }
    }
    Ok(g)
}
