//! The hypervisor's ExMap path on the host, over real memory: the LLFree allocator
//! (`allocator`), the per-vCPU frame cache, the iovec validation and the table writes of a
//! sparse NPT region, with real zeroing. ns per 4 KiB page for ALLOC + FREE of batches of
//! 1, 64 and 512 single-page entries, 1 and 2 threads (each thread its own region and cache,
//! one shared allocator), beside the per-page path without a cache (an allocator get and put
//! per page). The TLB invalidation that the hypervisor adds once per FREE batch is not in
//! these figures (it is one instruction on one CPU, counted in the emulator scenarios).
//!
//! `cargo run --release -p exmap --example bench` (also `cargo xtask bench exmap`);
//! `-- --quick` for a short run, `-- --runs N` for N interleaved runs (default 5).

use std::alloc::{alloc_zeroed, Layout};
use std::sync::Barrier;
use std::time::Instant;

use allocator::{Allocator, Init, Order, Pfn};
use exmap::{encode, FrameCache, Validator};
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

/// ns per page for ALLOC + FREE of `batch`-entry calls, on this thread.
fn run(mem: HostMem, frames: &Frames, batch: u64, pages: u64, cached: bool) -> f64 {
    let m = Morsel::<Npt>::create_sparse(REGION_PAGES * 4096, frames, &mem).expect("region");
    let (mut v, mut cache) = (Validator::new(), FrameCache::new());
    let (mut out, mut changed) = (Vec::with_capacity(512), Vec::with_capacity(512));
    // The iovec page the guest fills: `batch` single-page entries, a stride apart so that
    // they spread over the region's tables.
    let mut iov = vec![0u64; batch as usize];
    let calls = (pages / batch).max(1);
    let mut base = 0;
    let start = Instant::now();
    for _ in 0..calls {
        for (k, e) in iov.iter_mut().enumerate() {
            *e = encode((base + k as u64 * 7) % REGION_PAGES, 1);
        }
        base = (base + batch * 7 + 1) % REGION_PAGES;
        let checked = v.validate(&iov, m.pages());
        changed.clear();
        if cached {
            exmap::alloc(&m, 1, checked, &mut out, &mut cache, frames, &mem, &mut changed);
            let checked = v.validate(&iov, m.pages());
            exmap::free(&m, 1, checked, &mut out, &mut cache, &mem, &mut changed);
            cache.trim(frames);
        } else {
            // The per-page path: an allocator call, a zeroing and a table walk per page.
            for c in checked.iter().flatten() {
                m.edit_leaves(c.first, 1, &mem, |_, _| {
                    let f = frames.alloc(0).expect("frame");
                    mem.zero_data(f, 0);
                    LeafEdit::Map(f)
                })
                .unwrap();
            }
            for c in checked.iter().flatten() {
                m.edit_leaves(c.first, 1, &mem, |_, cur| {
                    frames.free(cur.expect("mapped"), 0);
                    LeafEdit::Clear
                })
                .unwrap();
            }
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / (calls * batch) as f64;
    cache.drain(frames);
    m.destroy(frames, &mem).expect("destroy");
    ns
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let memory = 512 * MIB;
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
    let pages = if quick { 200_000 } else { 2_000_000 };
    // `--runs N`: how many interleaved runs (`cargo xtask bench` passes 1 and interleaves rounds itself).
    let runs_arg = std::env::args().skip_while(|a| a != "--runs").nth(1).and_then(|n| n.parse::<usize>().ok()).filter(|&n| n >= 1);
    let rounds = runs_arg.unwrap_or(if quick { 3 } else { 5 });
    println!("exmap host benchmark: {} MiB of real memory, LLFree + per-vCPU cache (bundles of {}), sparse NPT region of {} pages per thread, median of {rounds} interleaved runs",
        memory / MIB, exmap::BUNDLE, REGION_PAGES);
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let cases: Vec<(u64, usize, bool)> = vec![(1, 1, true), (64, 1, true), (512, 1, true), (1, 2, true), (64, 2, true), (512, 2, true), (512, 1, false), (512, 2, false)];
    for _ in 0..rounds {
        for (i, &(batch, threads, cached)) in cases.iter().enumerate() {
            let barrier = Barrier::new(threads);
            let ns: Vec<f64> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            pin(t);
                            let f = Frames(a, t);
                            barrier.wait();
                            run(mem, &f, batch, pages, cached)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let avg = ns.iter().sum::<f64>() / ns.len() as f64;
            let name = if cached {
                format!("exmap alloc+free batch {batch}, {threads} thread{}", if threads > 1 { "s" } else { "" })
            } else {
                format!("per-page path (allocator call + zeroing per page, no cache) batch {batch}, {threads} thread{}", if threads > 1 { "s" } else { "" })
            };
            if rows.len() <= i {
                rows.push((name, Vec::new()));
            }
            rows[i].1.push(avg);
        }
    }
    for (name, mut v) in rows {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{name}: {:.1} ns/page (per thread; runs {:.1}..{:.1})", v[v.len() / 2], v[0], v[v.len() - 1]);
    }
    assert_eq!(a.free_frames(), frames, "every frame back in the allocator");
}
