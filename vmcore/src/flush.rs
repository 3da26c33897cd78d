//! What an unmount, an ExMap FREE or a device mount still has to invalidate, as a value the
//! compiler makes its caller use: [`Flush`] names the CPUs whose cached second-level
//! translations must go (a TLB shootdown) and the device domains whose IOTLB must be
//! invalidated. Operations merge theirs per call or batch and [`Flush::commit`] it once
//! (`x86_64`'s `MapperFlush`, with merging); dropping one that names something is a bug.
//!
//! The frames an unmount emptied are not in the value: they wait in the calling CPU's
//! [`crate::shootdown::Owed`] (room reserved ahead, no allocation on the path), and that record
//! gives them back after the acknowledgments the commit asked for. So a `Flush` must be
//! committed before the hypervisor settles its `Owed` (when it lets go of the world lock):
//! dropped instead, those frames would go back with no shootdown behind them.
//!
//! Generic over the domain's name `D` (the hypervisor: a PCI function, each has its own
//! domain) and over what does the work ([`Invalidate`]), so it is tested here on the host
//! (`tests.rs`, debug and `--release`). Mutations tried by hand, each caught:
//!
//! | mutation | tests that fail |
//! | --- | --- |
//! | `merge` keeps a domain twice | `merge_is_one_shootdown_of_the_union_and_each_domain_once` |
//! | `Drop` neither asserts nor counts | both `dropping_*` tests in debug, the release one |
//! | `commit` leaves the value owing (its drop then fires) | every commit test in debug, the release one |
//! | `merge` loses "every CPU that ran a guest" | `every_guest_cpu_is_read_at_the_commit` |

use core::sync::atomic::{AtomicU64, Ordering};

#[cfg(all(test, not(loom)))]
mod tests;

/// Device domains a [`Flush`] names one by one; past that it names every domain. The
/// hypervisor drives two DMA devices (edu, NVMe), one domain each.
pub const DOMAINS: usize = 4;

/// Flushes dropped without a commit so far (release builds go on; debug builds assert).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How many flushes that named something were dropped uncommitted so far (a bug each).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// What does the invalidation, for [`Flush::commit`].
pub trait Invalidate<D> {
    /// The CPUs that ran any guest's vCPU so far (read at the commit: after the entries
    /// were cleared, so a CPU that started meanwhile is counted).
    fn every_guest_cpu(&self) -> u64;
    /// One TLB shootdown of second-level translations on every CPU of `cpus`; this CPU
    /// flushes locally even where `cpus` is empty (the hypervisor's `shootdown::cpus`).
    fn shoot(&mut self, cpus: u64);
    /// Invalidates the IOTLB of `domain`; false if the IOMMU failed to.
    fn iotlb(&mut self, domain: D) -> bool;
    /// Invalidates the IOTLB of every domain there is (more than [`DOMAINS`] were named):
    /// how many were invalidated and how many failed.
    fn iotlb_all(&mut self) -> (u32, u32);
}

/// Cached translations that an operation removed and that must still be invalidated: a TLB
/// shootdown on some CPUs and the IOTLB of some device domains. Merge several with
/// [`Flush::merge`], then [`Flush::commit`] once. An empty one ([`Flush::none`]) may be
/// dropped; one that names something may not (`#[must_use]`, and a debug assertion).
#[must_use = "cleared entries stay cached until the flush is committed (`Flush::commit`)"]
#[derive(Debug, PartialEq, Eq)]
pub struct Flush<D: Copy + Eq> {
    /// A shootdown is owed (of `cpus`, and of every CPU that ran a guest if `every_guest_cpu`).
    shoot: bool,
    cpus: u64,
    every_guest_cpu: bool,
    /// Distinct domains, `None` past the last; `every_domain` once more were named.
    domains: [Option<D>; DOMAINS],
    every_domain: bool,
}

/// What [`Flush::commit`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// The CPUs shot down (one shootdown), or None if no shootdown was owed.
    pub shot: Option<u64>,
    /// Domains whose IOTLB was invalidated, and those where the IOMMU failed.
    pub domains: u32,
    pub failed: u32,
}

impl Committed {
    /// True if no IOTLB invalidation failed.
    pub fn ok(&self) -> bool {
        self.failed == 0
    }
}

impl<D: Copy + Eq> Flush<D> {
    /// Nothing to invalidate.
    pub const fn none() -> Self {
        Flush { shoot: false, cpus: 0, every_guest_cpu: false, domains: [None; DOMAINS], every_domain: false }
    }

    /// A shootdown on the CPUs of `cpus` (this one flushes locally in any case).
    pub const fn cpus(cpus: u64) -> Self {
        Flush { shoot: true, cpus, every_guest_cpu: false, domains: [None; DOMAINS], every_domain: false }
    }

    /// A shootdown on every CPU that ran any guest (read at the commit): where guests other
    /// than the caller may cache the entries.
    pub const fn every_guest_cpu() -> Self {
        Flush { shoot: true, cpus: 0, every_guest_cpu: true, domains: [None; DOMAINS], every_domain: false }
    }

    /// The IOTLB of `domain`.
    pub fn domain(domain: D) -> Self {
        let mut f = Self::none();
        f.domains[0] = Some(domain);
        f
    }

    /// True if nothing is owed.
    pub fn is_empty(&self) -> bool {
        !self.shoot && !self.every_domain && self.domains[0].is_none()
    }

    /// The shootdown owed, if any: (CPUs, and whether every CPU that ran a guest too).
    pub fn shootdown(&self) -> Option<(u64, bool)> {
        self.shoot.then_some((self.cpus, self.every_guest_cpu))
    }

    /// The domains named one by one (each once), and whether every domain is owed.
    pub fn domains(&self) -> (impl Iterator<Item = D> + '_, bool) {
        (self.domains.iter().map_while(|d| *d), self.every_domain)
    }

    /// Adds what `other` owes: one shootdown of the union of the CPUs, each domain once.
    pub fn merge(&mut self, mut other: Self) {
        self.shoot |= other.shoot;
        self.cpus |= other.cpus;
        self.every_guest_cpu |= other.every_guest_cpu;
        self.every_domain |= other.every_domain;
        for d in other.domains.iter().map_while(|d| *d) {
            self.add_domain(d);
        }
        other.forget();
    }

    fn add_domain(&mut self, d: D) {
        if self.every_domain {
            return;
        }
        for slot in self.domains.iter_mut() {
            match slot {
                Some(x) if *x == d => return,
                Some(_) => {}
                None => {
                    *slot = Some(d);
                    return;
                }
            }
        }
        // More distinct domains than named one by one: every domain, the list dropped.
        self.every_domain = true;
        self.domains = [None; DOMAINS];
    }

    /// Owes nothing any more (without invalidating). Field by field: assigning a new value
    /// would drop the old one, which still owes.
    fn forget(&mut self) {
        self.shoot = false;
        self.cpus = 0;
        self.every_guest_cpu = false;
        self.domains = [None; DOMAINS];
        self.every_domain = false;
    }

    /// Invalidates what is owed, once: one shootdown of every CPU named (first), then each
    /// domain's IOTLB (or every domain's). With no lock held but the caller's, and before
    /// the calling CPU settles its `Owed`.
    pub fn commit(mut self, hw: &mut impl Invalidate<D>) -> Committed {
        let mut done = Committed::default();
        if self.shoot {
            let mut cpus = self.cpus;
            if self.every_guest_cpu {
                cpus |= hw.every_guest_cpu();
            }
            hw.shoot(cpus);
            done.shot = Some(cpus);
        }
        if self.every_domain {
            (done.domains, done.failed) = hw.iotlb_all();
        } else {
            for d in self.domains.iter().map_while(|d| *d) {
                if hw.iotlb(d) {
                    done.domains += 1;
                } else {
                    done.failed += 1;
                }
            }
        }
        self.forget();
        done
    }
}

impl<D: Copy + Eq> Default for Flush<D> {
    fn default() -> Self {
        Self::none()
    }
}

impl<D: Copy + Eq> Drop for Flush<D> {
    /// A flush that names something and was not committed: counted ([`dropped`]), and a
    /// failed assertion in debug builds (not while a panic unwinds already).
    fn drop(&mut self) {
        if self.is_empty() {
            return;
        }
        DROPPED.fetch_add(1, Ordering::Relaxed);
        #[cfg(any(test, feature = "std"))]
        if std::thread::panicking() {
            return;
        }
        debug_assert!(false, "a Flush that names cached translations was dropped uncommitted (shootdown {:?})", self.shootdown());
    }
}
