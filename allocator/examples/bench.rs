//! Allocator benchmark with the LLFree paper's patterns (bulk, repeat, random), against a
//! spinlock-protected bitmap allocator as a baseline. Frames are not touched (metadata only);
//! threads are pinned to CPUs.
//!
//! `cargo run --release -p allocator --example bench -- --threads 1,2 --order 0 --memory 8 --pattern bulk`
//!
//! Side by side with upstream LLFree (llfree-rs, not part of this repository): built with
//! `--cfg llfree_upstream` in a harness crate outside the repository that depends on both
//! (`cargo xtask bench allocator --upstream PATH` makes and builds it), this file prints a third
//! line per thread count, `llfree-rs`, measured with the same loops in the same process.

use allocator::{Allocator, Init, Order, Pfn};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::Instant;

/// What the patterns need from an allocator.
trait Frames: Sync {
    fn get(&self, core: usize, order: Order) -> Option<usize>;
    fn put(&self, core: usize, pfn: usize, order: Order);
}

impl Frames for Allocator<'_> {
    #[inline]
    fn get(&self, core: usize, order: Order) -> Option<usize> {
        Allocator::get(self, core, order).ok().map(|p| p.0)
    }
    #[inline]
    fn put(&self, core: usize, pfn: usize, order: Order) {
        Allocator::put(self, core, Pfn(pfn), order).expect("put");
    }
}

/// Baseline: one bitmap behind one test-and-test-and-set spinlock, next-fit search (one cursor
/// for 4 KiB and one for 2 MiB frames).
struct Spin {
    lock: AtomicBool,
    inner: UnsafeCell<(Vec<u64>, usize, usize)>,
}

// SAFETY: `inner` is only accessed with `lock` held.
unsafe impl Sync for Spin {}

impl Spin {
    fn new(frames: usize) -> Self {
        Spin {
            lock: AtomicBool::new(false),
            inner: UnsafeCell::new((vec![0; frames / 64], 0, 0)),
        }
    }
    fn with<R>(&self, f: impl FnOnce(&mut (Vec<u64>, usize, usize)) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.lock.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        }
        // SAFETY: the lock is held.
        let r = f(unsafe { &mut *self.inner.get() });
        self.lock.store(false, Ordering::Release);
        r
    }
}

impl Frames for Spin {
    fn get(&self, _core: usize, order: Order) -> Option<usize> {
        self.with(|(bits, next, next_huge)| {
            let n = bits.len();
            if order == Order::BASE {
                for k in 0..n {
                    let w = (*next + k) % n;
                    if bits[w] != u64::MAX {
                        let b = (!bits[w]).trailing_zeros() as usize;
                        bits[w] |= 1 << b;
                        *next = w;
                        return Some(w * 64 + b);
                    }
                }
            } else {
                let areas = n / 8;
                for k in 0..areas {
                    let a = (*next_huge + k) % areas;
                    if bits[a * 8..a * 8 + 8].iter().all(|&w| w == 0) {
                        bits[a * 8..a * 8 + 8].fill(u64::MAX);
                        *next_huge = a;
                        return Some(a * 512);
                    }
                }
            }
            None
        })
    }
    fn put(&self, _core: usize, pfn: usize, order: Order) {
        self.with(|(bits, _, _)| {
            if order == Order::BASE {
                assert!(bits[pfn / 64] & (1 << (pfn % 64)) != 0);
                bits[pfn / 64] &= !(1 << (pfn % 64));
            } else {
                bits[pfn / 64..pfn / 64 + 8].fill(0);
            }
        })
    }
}

/// Upstream llfree-rs (`Classing::simple`: one small and one huge reservation per core, as
/// upstream's own benchmarks use it), over page-aligned metadata leaked for the run.
#[cfg(llfree_upstream)]
mod upstream {
    use super::{Frames, Order};
    use llfree::{Alloc, Class, Classing, FrameId, Init, LLFree, MetaData, Request};

    pub struct Up(pub LLFree<'static>);

    fn buf(size: usize) -> &'static mut [u8] {
        let layout = std::alloc::Layout::from_size_align(size.max(1), 4096).unwrap();
        // SAFETY: a fresh zeroed allocation of `size` bytes (at least 1), never freed.
        unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc_zeroed(layout), size) }
    }

    impl Up {
        pub fn new(cores: usize, frames: usize) -> Up {
            let (classing, _) = Classing::simple(cores);
            let ms = LLFree::metadata_size(&classing, frames);
            let meta = MetaData { local: buf(ms.local), trees: buf(ms.trees), lower: buf(ms.lower) };
            Up(LLFree::new(frames, Init::FreeAll, &classing, meta).expect("llfree-rs init"))
        }
        pub fn meta_bytes(cores: usize, frames: usize) -> usize {
            let (classing, _) = Classing::simple(cores);
            let ms = LLFree::metadata_size(&classing, frames);
            ms.local + ms.trees + ms.lower
        }
    }

    #[inline]
    fn req(core: usize, order: Order) -> Request {
        Request::new(order.0 as usize, Class((order.0 >= 9) as u8), Some(core))
    }

    impl Frames for Up {
        #[inline]
        fn get(&self, core: usize, order: Order) -> Option<usize> {
            self.0.get(None, req(core, order)).ok().map(|(f, _)| f.0)
        }
        #[inline]
        fn put(&self, core: usize, pfn: usize, order: Order) {
            self.0.put(FrameId(pfn), req(core, order)).expect("llfree-rs put");
        }
    }
}

fn pin(cpu: usize) {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned here.
    unsafe {
        let n = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % n, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    Bulk,
    Repeat,
    Random,
}

/// Per-thread result: ns per get, ns per put (or per get+put pair for `repeat`), operations.
#[derive(Default, Clone, Copy)]
struct Res {
    get: f64,
    put: f64,
    ops: f64,
    secs: f64,
}

fn run<A: Frames>(
    a: &A,
    threads: usize,
    order: Order,
    frames: usize,
    pattern: Pattern,
    ops: usize,
) -> Res {
    let per = frames / order.frames() / threads / 2;
    let barrier = Barrier::new(threads);
    let results: Vec<Res> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    pin(t);
                    let mut held = Vec::with_capacity(per);
                    let mut r = Res::default();
                    match pattern {
                        Pattern::Bulk => {
                            barrier.wait();
                            let t0 = Instant::now();
                            for _ in 0..per {
                                held.push(a.get(t, order).expect("out of memory"));
                            }
                            let t1 = Instant::now();
                            barrier.wait();
                            let t2 = Instant::now();
                            for &f in &held {
                                a.put(t, f, order);
                            }
                            let t3 = Instant::now();
                            r.get = (t1 - t0).as_nanos() as f64 / per as f64;
                            r.put = (t3 - t2).as_nanos() as f64 / per as f64;
                            r.ops = 2.0 * per as f64;
                            r.secs = (t1 - t0 + (t3 - t2)).as_secs_f64();
                        }
                        Pattern::Repeat => {
                            for _ in 0..per {
                                held.push(a.get(t, order).expect("out of memory"));
                            }
                            barrier.wait();
                            let t0 = Instant::now();
                            for _ in 0..ops {
                                let f = a.get(t, order).expect("out of memory");
                                a.put(t, std::hint::black_box(f), order);
                            }
                            let d = t0.elapsed();
                            r.get = d.as_nanos() as f64 / ops as f64; // per pair
                            r.ops = 2.0 * ops as f64;
                            r.secs = d.as_secs_f64();
                            barrier.wait();
                        }
                        Pattern::Random => {
                            for _ in 0..per {
                                held.push(a.get(t, order).expect("out of memory"));
                            }
                            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                            // Batches: pick random own frames (untimed), free them (timed),
                            // allocate as many (timed), store them back (untimed). A timer per
                            // call would cost more than the call; the random picks miss the
                            // cache and are not the allocator's cost.
                            let batch = 256.min(per);
                            let mut slots = Vec::with_capacity(batch);
                            let mut frames = Vec::with_capacity(batch);
                            let (mut tg, mut tp) = (0u128, 0u128);
                            barrier.wait();
                            let rounds = ops.div_ceil(batch);
                            for _ in 0..rounds {
                                slots.clear();
                                frames.clear();
                                for _ in 0..batch {
                                    let i = rng.below(per);
                                    if held[i] != usize::MAX {
                                        frames.push(held[i]);
                                        held[i] = usize::MAX;
                                        slots.push(i);
                                    }
                                }
                                let t0 = Instant::now();
                                for &f in &frames {
                                    a.put(t, f, order);
                                }
                                let t1 = Instant::now();
                                for f in frames.iter_mut() {
                                    *f = a.get(t, order).expect("out of memory");
                                }
                                let t2 = Instant::now();
                                for (&i, &f) in slots.iter().zip(&frames) {
                                    held[i] = f;
                                }
                                tp += (t1 - t0).as_nanos();
                                tg += (t2 - t1).as_nanos();
                                r.ops += 2.0 * slots.len() as f64;
                            }
                            r.get = tg as f64 / (r.ops / 2.0);
                            r.put = tp as f64 / (r.ops / 2.0);
                            r.secs = (tg + tp) as f64 / 1e9;
                            barrier.wait();
                        }
                    }
                    for &f in &held {
                        if f != usize::MAX && pattern != Pattern::Bulk {
                            a.put(t, f, order);
                        }
                    }
                    r
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let n = threads as f64;
    Res {
        get: results.iter().map(|r| r.get).sum::<f64>() / n,
        put: results.iter().map(|r| r.put).sum::<f64>() / n,
        ops: results.iter().map(|r| r.ops).sum(),
        secs: results.iter().map(|r| r.secs).fold(0.0, f64::max),
    }
}

fn median(mut v: Vec<Res>) -> Res {
    v.sort_by(|a, b| (a.get + a.put).total_cmp(&(b.get + b.put)));
    v[v.len() / 2]
}

pub fn main() {
    let mut threads = vec![1, 2];
    let mut order = 0u8;
    let mut gib = 8usize;
    let mut pattern = Pattern::Bulk;
    let mut runs = 5;
    let mut ops = 0usize;
    let mut baseline = true;
    let mut calls = 0usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--threads" => {
                threads = v
                    .split(',')
                    .map(|x| x.parse().expect("--threads"))
                    .collect()
            }
            "--order" => order = v.parse().expect("--order 0|9"),
            "--memory" => gib = v.parse().expect("--memory GIB"),
            "--runs" => runs = v.parse().expect("--runs N"),
            "--ops" => ops = v.parse().expect("--ops N"),
            "--pattern" => {
                pattern = match v.as_str() {
                    "bulk" => Pattern::Bulk,
                    "repeat" => Pattern::Repeat,
                    "random" => Pattern::Random,
                    _ => panic!("--pattern bulk|repeat|random"),
                }
            }
            "--no-baseline" => {
                baseline = false;
                i -= 1;
            }
            "--calls" => {
                // Instruction counts (callgrind): one thread, `N` get+put pairs, no timing.
                calls = v.parse().expect("--calls N");
            }
            a => panic!("unknown argument {a}; see the file header"),
        }
        i += 2;
    }
    let order = Order(order);
    assert!(order == Order::BASE || order == Order::HUGE, "--order 0|9");
    if ops == 0 {
        ops = if order == Order::BASE {
            4_000_000
        } else {
            1_000_000
        };
    }
    let frames = gib << 18;
    let name = match pattern {
        Pattern::Bulk => "bulk",
        Pattern::Repeat => "repeat",
        Pattern::Random => "random",
    };
    let max_t = *threads.iter().max().unwrap();
    let size = Allocator::metadata_size(max_t, frames);
    println!(
        "pattern {name}, order {}, {gib} GiB ({frames} frames), metadata {} bytes = {:.1} KiB per GiB ({} CPUs)",
        order.0,
        size,
        size as f64 / gib as f64 / 1024.0,
        max_t
    );
    let what = if pattern == Pattern::Repeat {
        "get+put ns"
    } else {
        "get ns    put ns"
    };
    println!(
        "threads  allocator  {what}   Mops/s total   (median of {runs} runs, ns per op per thread)"
    );
    #[cfg(llfree_upstream)]
    println!(
        "llfree-rs (upstream, same loops, same process): metadata {} bytes ({} CPUs)",
        upstream::Up::meta_bytes(max_t, frames),
        max_t
    );
    #[repr(C, align(4096))]
    struct Page([u8; 4096]);
    let mut buf: Vec<Page> = (0..size.div_ceil(4096)).map(|_| Page([0; 4096])).collect();
    if calls > 0 {
        return count_calls(&mut buf, size, frames, order, pattern, calls);
    }
    for &t in &threads {
        let mut ours = Vec::new();
        let mut base = Vec::new();
        #[cfg(llfree_upstream)]
        let mut up = Vec::new();
        for _ in 0..runs {
            // Interleaved: upstream, ours, spinlock in every run.
            #[cfg(llfree_upstream)]
            up.push(run(&upstream::Up::new(t, frames), t, order, frames, pattern, ops));
            // SAFETY: `buf` holds `size` bytes, page aligned, and outlives the allocator.
            let meta =
                unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), size) };
            let a = Allocator::new(t, Pfn(0), frames, meta, Init::Free).expect("init");
            ours.push(run(&a, t, order, frames, pattern, ops));
            if baseline {
                base.push(run(&Spin::new(frames), t, order, frames, pattern, ops / 4));
            }
        }
        let line = |who: &str, r: Res| {
            let mops = r.ops / r.secs / 1e6;
            if pattern == Pattern::Repeat {
                println!("{t:>7}  {who:<9}  {:>10.1}   {mops:>12.1}", r.get);
            } else {
                println!(
                    "{t:>7}  {who:<9}  {:>6.1}  {:>8.1}   {mops:>12.1}",
                    r.get, r.put
                );
            }
        };
        let o = median(ours);
        line("llfree-pp", o);
        #[cfg(llfree_upstream)]
        {
            let u = median(up);
            line("llfree-rs", u);
            if pattern == Pattern::Repeat {
                println!("{t:>7}  ratio      llfree-rs / ours: {:.2}x per pair", u.get / o.get);
            } else {
                println!(
                    "{t:>7}  ratio      llfree-rs / ours: get {:.2}x, put {:.2}x",
                    u.get / o.get,
                    u.put / o.put
                );
            }
        }
        if baseline {
            let b = median(base);
            line("spinlock", b);
            if pattern == Pattern::Repeat {
                println!(
                    "{t:>7}  ratio      spinlock / ours: {:.2}x per pair",
                    b.get / o.get
                );
            } else {
                println!(
                    "{t:>7}  ratio      spinlock / ours: get {:.2}x, put {:.2}x",
                    b.get / o.get,
                    b.put / o.put
                );
            }
        }
    }
}

/// `--calls N`: for instruction counts under callgrind, set up as the pattern does (half the
/// memory allocated for `repeat` and `random`), then `N` gets and `N` puts (random own frames
/// for `random`) in `bench_get` / `bench_put`, which callgrind reports per function
/// (`--toggle-collect`). Ours, or upstream's with `--cfg llfree_upstream` and `LLFREE_UPSTREAM=1`.
fn count_calls(buf: &mut [impl Sized], size: usize, frames: usize, order: Order, pattern: Pattern, n: usize) {
    // SAFETY: `buf` holds `size` bytes, page aligned, and outlives the allocator.
    let meta = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), size) };
    let ours = Allocator::new(1, Pfn(0), frames, meta, Init::Free).expect("init");
    #[cfg(llfree_upstream)]
    if std::env::var_os("LLFREE_UPSTREAM").is_some() {
        return calls_on(&upstream::Up::new(1, frames), frames, order, pattern, n);
    }
    calls_on(&ours, frames, order, pattern, n)
}

#[inline(never)]
fn bench_get<A: Frames>(a: &A, order: Order, out: &mut [usize]) {
    for f in out.iter_mut() {
        *f = a.get(0, order).expect("out of memory");
    }
}

#[inline(never)]
fn bench_put<A: Frames>(a: &A, order: Order, frames: &[usize]) {
    for &f in frames {
        a.put(0, f, order);
    }
}

fn calls_on<A: Frames>(a: &A, frames: usize, order: Order, pattern: Pattern, n: usize) {
    let per = frames / order.frames() / 2;
    let mut held: Vec<usize> = (0..if pattern == Pattern::Bulk { 0 } else { per })
        .map(|_| a.get(0, order).expect("out of memory"))
        .collect();
    let mut batch = vec![0usize; n];
    match pattern {
        Pattern::Random => {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut slots = Vec::with_capacity(n);
            let mut victims = Vec::with_capacity(n);
            while victims.len() < n.min(per) {
                let i = rng.below(per);
                if held[i] != usize::MAX {
                    victims.push(held[i]);
                    held[i] = usize::MAX;
                    slots.push(i);
                }
            }
            bench_put(a, order, &victims);
            bench_get(a, order, &mut batch[..victims.len()]);
        }
        _ => {
            bench_get(a, order, &mut batch);
            bench_put(a, order, &batch);
        }
    }
    std::hint::black_box(&held);
}
