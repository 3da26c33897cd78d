//! The hypervisor's ExMap path on the host, over real memory: the LLFree allocator
//! (`allocator`), the per-vCPU frame cache, the iovec validation and the table writes of a
//! sparse NPT region, with real zeroing. ns per 4 KiB page for ALLOC + FREE of batches of
//! 1, 64 and 512 single-page entries, 1 and 2 threads (each thread its own region and cache,
//! one shared allocator), beside the per-page path without a cache (an allocator get and put
//! per page). The TLB invalidation that the hypervisor adds once per FREE batch is not in
//! these figures (it is one instruction on one CPU, counted in the emulator scenarios).
//!
//! `cargo run --release -p exmap --example bench` (also `cargo xtask bench exmap`);
//! `-- --quick` for a short run, `-- --rounds N` for N interleaved runs (default 5; `cargo xtask bench --rounds N` passes N).

use std::alloc::{alloc_zeroed, Layout};
use std::sync::Barrier;
use std::time::Instant;

use allocator::{Allocator, Init, Order, Pfn};
use exmap::{encode, EntryError, FrameCache, Region, Validator};
use morsel::{FrameAlloc, HostPhysAddr, LeafEdit, Morsel, Npt, PhysMem};

const MIB: usize = 1 << 20;

/// "Physical memory": a host buffer; frame addresses are offsets into it.
#[derive(Clone, Copy)]
struct HostMem(*mut u8);
// SAFETY: threads touch disjoint frames (the allocator hands each out once).
unsafe impl Sync for HostMem {}
unsafe impl Send for HostMem {}

impl HostMem {
    fn at(&self, a: HostPhysAddr) -> *mut u8 {
        // SAFETY: every address comes from the allocator, which covers only the buffer.
        unsafe { self.0.add(a.as_u64() as usize) }
    }
}

impl PhysMem for HostMem {
    #[inline]
    fn read(&self, t: HostPhysAddr, i: usize) -> u64 {
        // SAFETY: a table frame inside the buffer, i < 512.
        unsafe { (self.at(t) as *const u64).add(i).read_volatile() }
    }
    #[inline]
    fn write(&self, t: HostPhysAddr, i: usize, v: u64) {
        // SAFETY: as read.
        unsafe { (self.at(t) as *mut u64).add(i).write_volatile(v) }
    }
    #[inline]
    fn compare_exchange(&self, t: HostPhysAddr, i: usize, current: u64, new: u64) -> Result<u64, u64> {
        // SAFETY: as read; an aligned u64 every thread reaches atomically or by volatile access.
        let e = unsafe { std::sync::atomic::AtomicU64::from_ptr((self.at(t) as *mut u64).add(i)) };
        e.compare_exchange(current, new, std::sync::atomic::Ordering::AcqRel, std::sync::atomic::Ordering::Acquire)
    }
    #[inline]
    fn swap(&self, t: HostPhysAddr, i: usize, new: u64) -> u64 {
        // SAFETY: as compare_exchange.
        let e = unsafe { std::sync::atomic::AtomicU64::from_ptr((self.at(t) as *mut u64).add(i)) };
        e.swap(new, std::sync::atomic::Ordering::AcqRel)
    }
    fn zero_table(&self, t: HostPhysAddr) {
        // SAFETY: a 4 KiB frame inside the buffer.
        unsafe { std::ptr::write_bytes(self.at(t), 0, 4096) }
    }
    fn zero_data(&self, f: HostPhysAddr, order: u32) {
        // SAFETY: as zero_table.
        unsafe { std::ptr::write_bytes(self.at(f), 0, 4096 << order) }
    }
}

/// One CPU's handle on the shared allocator.
struct Frames<'a>(&'a Allocator<'a>, usize);

impl FrameAlloc for Frames<'_> {
    #[inline]
    fn alloc(&self, order: u32) -> Option<HostPhysAddr> {
        self.0.get(self.1, Order(order as u8)).ok().map(|p| HostPhysAddr::new(p.0 as u64 * 4096))
    }
    #[inline]
    fn free(&self, f: HostPhysAddr, order: u32) {
        self.0.put(self.1, Pfn((f.as_u64() / 4096) as usize), Order(order as u8)).expect("put");
    }
}

fn pin(cpu: usize) {
    // SAFETY: plain libc calls on this thread with a zeroed, then filled, cpu set.
    unsafe {
        let n = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % n, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Region pages per thread (64 MiB).
const REGION_PAGES: u64 = 16384;

/// One case: entries per call, threads, entry order, path.
#[derive(Clone, Copy, PartialEq)]
struct Case {
    batch: u64,
    threads: usize,
    /// Entries in ascending page order (never wrapping around the region's end).
    sorted: bool,
    /// The ExMap path (cache, batch); false: the per-page path.
    cached: bool,
}

impl Case {
    fn name(&self) -> String {
        let t = if self.threads > 1 { "s" } else { "" };
        let order = if self.sorted { "sorted" } else { "wrapping" };
        if self.cached {
            format!("exmap alloc+free {order} batch {}, {} thread{t}", self.batch, self.threads)
        } else {
            format!("per-page path (allocator call + zeroing per page, no cache) {order} batch {}, {} thread{t}", self.batch, self.threads)
        }
    }
    /// `B,T,sorted|wrapping,exmap|per-page`.
    fn parse(s: &str) -> Option<Case> {
        let w: Vec<&str> = s.split(',').collect();
        let [b, t, o, p] = w[..] else { return None };
        Some(Case {
            batch: b.parse().ok().filter(|b| (1..=512).contains(b))?,
            threads: t.parse().ok().filter(|t| (1..=2).contains(t))?,
            sorted: match o { "sorted" => true, "wrapping" => false, _ => return None },
            cached: match p { "exmap" => true, "per-page" => false, _ => return None },
        })
    }
}

/// The iovec page the guest fills for call number `call`: `batch` single-page entries, a
/// stride of 7 pages apart so that they spread over the region's tables. Wrapping: the
/// entries run on from where the last call stopped and wrap around the region's end (one
/// call in about 4.6 at batch 512 wraps, then its entries are not in page order). Sorted:
/// they start over at page 0 instead of wrapping.
fn fill(iov: &mut [u64], base: &mut u64, sorted: bool) {
    let batch = iov.len() as u64;
    if sorted && *base + batch * 7 > REGION_PAGES {
        *base %= 7;
    }
    for (k, e) in iov.iter_mut().enumerate() {
        *e = encode((*base + k as u64 * 7) % REGION_PAGES, 1);
    }
    *base = (*base + batch * 7 + 1) % REGION_PAGES;
}

/// ns per page for ALLOC + FREE of `batch`-entry calls, on this thread.
fn run(mem: HostMem, frames: &Frames, case: Case, pages: u64) -> f64 {
    let m = Morsel::<Npt>::create_sparse(REGION_PAGES * 4096, frames, &mem).expect("region");
    let (mut v, mut cache) = (Validator::new(), FrameCache::new());
    let region = Region { morsel: &m, origin: 1, mem: &mem };
    let mut iov = vec![0u64; case.batch as usize];
    let calls = (pages / case.batch).max(1);
    let mut base = 0;
    let start = Instant::now();
    for _ in 0..calls {
        let b = base;
        fill(&mut iov, &mut base, case.sorted);
        if case.cached {
            // Results overwrite the entries, as in the guest's iovec page; no device view.
            exmap::alloc(&region, &mut iov, &mut v, &mut cache, frames, &mut |_, _| {}, code);
            // The guest refills its iovec page for the FREE.
            base = b;
            fill(&mut iov, &mut base, case.sorted);
            exmap::free(&region, &mut iov, &mut v, &mut cache, &mut |_, _| {}, code);
            cache.trim(frames);
        } else {
            // The per-page path: an allocator call, a zeroing and a table walk per page.
            for &e in &iov {
                let Ok(c) = exmap::check(e, m.pages()) else { continue };
                m.edit_leaves(c.first, 1, &mem, |_, _| {
                    let f = frames.alloc(0).expect("frame");
                    mem.zero_data(f, 0);
                    LeafEdit::Map(f)
                })
                .unwrap();
            }
            for &e in &iov {
                let Ok(c) = exmap::check(e, m.pages()) else { continue };
                m.edit_leaves(c.first, 1, &mem, |_, cur| {
                    frames.free(cur.expect("mapped"), 0);
                    LeafEdit::Clear
                })
                .unwrap();
            }
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / (calls * case.batch) as f64;
    cache.drain(frames);
    m.destroy(frames, &mem).expect("destroy");
    ns
}

/// The result code of a failed entry (the hypervisor's are its ABI's error numbers).
fn code(e: EntryError) -> u64 {
    (-(e as i64) - 1) as u64
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Usage: `bench [--quick] [--case B,T,sorted|wrapping,exmap|per-page] [--pages N]
/// [--rounds R] [--memory MIB]`. Without `--case`: every case, interleaved.
fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let memory = arg("--memory").map(|m| m.parse::<usize>().expect("--memory MIB")).unwrap_or(512) * MIB;
    let layout = Layout::from_size_align(memory, 2 * MIB).unwrap();
    // SAFETY: non-zero size; the buffer lives until the process ends.
    let buf = unsafe { alloc_zeroed(layout) };
    assert!(!buf.is_null());
    let mem = HostMem(buf);
    let frames = memory / 4096;
    let meta_layout = Layout::from_size_align(Allocator::metadata_size(2, frames), 4096).unwrap();
    // SAFETY: as above; used only as the allocator's metadata.
    let meta = unsafe { std::slice::from_raw_parts_mut(alloc_zeroed(meta_layout), meta_layout.size()) };
    let a = Allocator::new(2, Pfn(0), frames, meta, Init::Free).expect("allocator");
    let a = &a;
    let pages = arg("--pages").map(|p| p.parse().expect("--pages N")).unwrap_or(if quick { 200_000 } else { 2_000_000 });
    let rounds = arg("--rounds").map(|p| p.parse().expect("--rounds N")).unwrap_or(if quick { 3 } else { 5 });
    let cases: Vec<Case> = match arg("--case") {
        Some(c) => vec![Case::parse(&c).expect("--case B,T,sorted|wrapping,exmap|per-page")],
        None => {
            let mut v = Vec::new();
            for sorted in [false, true] {
                for threads in [1, 2] {
                    for batch in [1, 64, 512] {
                        v.push(Case { batch, threads, sorted, cached: true });
                    }
                    v.push(Case { batch: 512, threads, sorted, cached: false });
                }
            }
            v
        }
    };
    println!("exmap host benchmark: {} MiB of real memory, LLFree + per-vCPU cache (bundles of {}), sparse NPT region of {} pages per thread, median of {rounds} interleaved runs",
        memory / MIB, exmap::BUNDLE, REGION_PAGES);
    let mut rows: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, &case) in cases.iter().enumerate() {
            let barrier = Barrier::new(case.threads);
            let ns: Vec<f64> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..case.threads)
                    .map(|t| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            pin(t);
                            let f = Frames(a, t);
                            barrier.wait();
                            run(mem, &f, case, pages)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            rows[i].push(ns.iter().sum::<f64>() / ns.len() as f64);
        }
    }
    for (case, mut v) in cases.iter().zip(rows) {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{}: {:.1} ns/page (per thread; runs {:.1}..{:.1})", case.name(), v[v.len() / 2], v[0], v[v.len() - 1]);
    }
    assert_eq!(a.free_frames(), frames, "every frame back in the allocator");
}
