//! ALLOC / FREE batches of several threads (vCPUs) on ONE region at once, each with its own
//! frame cache and validator, as the hypervisor runs them under the region's shared lock
//! (branch `sharedcas`): every leaf is changed by compare-and-swap (`Leaves::try_map`,
//! `Leaves::take`). Checked: every frame the allocator handed out is in exactly one place at
//! the end (a leaf, one cache, or back in the allocator: none lost, none mapped twice, none in
//! two caches, none freed twice), and the entries' results add up to what the region holds
//! (pages mapped minus pages cleared = pages populated).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};

use exmap::{encode, FrameCache, Region, Validator};
use morsel::{FrameAlloc, HostPhysAddr, Morsel, Npt, PhysMem};

/// Table frames: a fixed arena of atomics from `TABLES` up; data frames (not backed) from
/// `DATA` up, handed out and taken back under a mutex that refuses a double free.
struct SharedMem {
    tables: Vec<[AtomicU64; 512]>,
    next_table: AtomicU64,
    data: Mutex<Data>,
}

#[derive(Default)]
struct Data {
    next: u64,
    free: Vec<u64>,
    out: HashSet<u64>,
}

const TABLES: u64 = 1 << 30;
const DATA: u64 = 1 << 32;

impl SharedMem {
    fn new(tables: usize) -> Self {
        SharedMem {
            tables: (0..tables).map(|_| std::array::from_fn(|_| AtomicU64::new(0))).collect(),
            next_table: AtomicU64::new(0),
            data: Mutex::new(Data { next: DATA, ..Default::default() }),
        }
    }
    fn entry(&self, t: HostPhysAddr, i: usize) -> &AtomicU64 {
        &self.tables[((t.as_u64() - TABLES) / 4096) as usize][i]
    }
    fn out(&self) -> HashSet<u64> {
        self.data.lock().unwrap().out.clone()
    }
}

impl PhysMem for SharedMem {
    fn read(&self, t: HostPhysAddr, i: usize) -> u64 {
        self.entry(t, i).load(Ordering::Acquire)
    }
    fn write(&self, t: HostPhysAddr, i: usize, v: u64) {
        self.entry(t, i).store(v, Ordering::Release)
    }
    fn zero_table(&self, t: HostPhysAddr) {
        for e in &self.tables[((t.as_u64() - TABLES) / 4096) as usize] {
            e.store(0, Ordering::Relaxed);
        }
    }
    fn zero_data(&self, f: HostPhysAddr, _: u32) {
        assert!(self.data.lock().unwrap().out.contains(&f.as_u64()), "zeroing {f:?}, not handed out");
    }
    fn compare_exchange(&self, t: HostPhysAddr, i: usize, current: u64, new: u64) -> Result<u64, u64> {
        self.entry(t, i).compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
    }
    fn swap(&self, t: HostPhysAddr, i: usize, new: u64) -> u64 {
        self.entry(t, i).swap(new, Ordering::AcqRel)
    }
}

/// Table frames for `create_sparse` (never freed here).
struct TableAlloc<'a>(&'a SharedMem);
impl FrameAlloc for TableAlloc<'_> {
    fn alloc(&self, order: u32) -> Option<HostPhysAddr> {
        assert_eq!(order, 0);
        let k = self.0.next_table.fetch_add(1, Ordering::Relaxed);
        ((k as usize) < self.0.tables.len()).then(|| HostPhysAddr::new(TABLES + k * 4096))
    }
    fn free(&self, _: HostPhysAddr, _: u32) {}
}

impl FrameAlloc for SharedMem {
    fn alloc(&self, order: u32) -> Option<HostPhysAddr> {
        assert_eq!(order, 0);
        let mut d = self.data.lock().unwrap();
        let f = d.free.pop().unwrap_or_else(|| {
            d.next += 4096;
            d.next
        });
        assert!(d.out.insert(f), "frame {f:#x} handed out twice");
        Some(HostPhysAddr::new(f))
    }
    fn free(&self, f: HostPhysAddr, _: u32) {
        let mut d = self.data.lock().unwrap();
        assert!(d.out.remove(&f.as_u64()), "frame {f:?} freed twice (or never handed out)");
        d.free.push(f.as_u64());
    }
}

/// Where a drained cache's frames go: a list.
struct Collect(Mutex<Vec<u64>>);
impl FrameAlloc for Collect {
    fn alloc(&self, _: u32) -> Option<HostPhysAddr> {
        None
    }
    fn free(&self, f: HostPhysAddr, _: u32) {
        self.0.lock().unwrap().push(f.as_u64());
    }
}

fn code(_: exmap::EntryError) -> u64 {
    1 << 63
}

const PAGES: u64 = 1024;
const THREADS: usize = 4;
const ROUNDS: u64 = 20_000;

/// A thread's batches: `rounds` of one ALLOC and one FREE of random entries (single pages in
/// page order, or runs of up to 8 pages) in the region's first 128 pages, which all threads
/// hammer, half
/// of the FREEs trimming the cache back to the allocator (as after a shootdown). Returns
/// pages mapped minus pages cleared by its entries, and its cache's frames.
fn vcpu(k: u64, r: &Region<Npt, SharedMem>, mem: &SharedMem) -> (i64, Vec<u64>) {
    let (mut cache, mut v) = (FrameCache::new(), Validator::new());
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (k + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut rng = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut net = 0i64;
    for round in 0..ROUNDS {
        for free in [false, true] {
            let base = rng() % 64;
            let entries: Vec<u64> = match rng() % 2 {
                0 => (0..(rng() % 64 + 1)).map(|p| encode(base + p, 1)).collect(),
                _ => (0..8).map(|j| encode(base + j * 8, rng() % 8 + 1)).collect(),
            };
            let mut iov = entries.clone();
            if free {
                cache.reserve(entries.iter().map(|&e| exmap::decode(e).1 as usize).sum()).unwrap();
                exmap::free(r, &mut iov, &mut v, &mut cache, &mut |_, _| {}, code);
            } else {
                exmap::alloc(r, &mut iov, &mut v, &mut cache, mem, &mut |_, _| {}, code);
            }
            let done: i64 = iov.iter().filter(|&&e| e >> 63 == 0).map(|&e| e as i64).sum();
            net += if free { -done } else { done };
            if free && round % 2 == 0 {
                cache.trim(mem);
            }
        }
    }
    let held = Collect(Mutex::new(Vec::new()));
    cache.drain(&held);
    (net, held.0.into_inner().unwrap())
}

#[test]
fn concurrent_alloc_and_free_on_one_region_account_for_every_frame() {
    let mem = SharedMem::new(8);
    let m = Morsel::<Npt>::create_sparse(PAGES * 4096, &TableAlloc(&mem), &mem).unwrap();
    let r = Region { morsel: &m, origin: 3, mem: &mem };
    let start = Barrier::new(THREADS);
    let results: Vec<(i64, Vec<u64>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS as u64).map(|k| {
            let (r, mem, start) = (&r, &mem, &start);
            s.spawn(move || {
                start.wait();
                vcpu(k, r, mem)
            })
        }).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut places = HashSet::new();
    let mut populated = 0i64;
    for p in 0..PAGES {
        if let Some(f) = m.translate(p * 4096, &mem) {
            assert!(places.insert(f.as_u64()), "frame {f:?} mapped twice");
            populated += 1;
        }
    }
    for (_, frames) in &results {
        for &f in frames {
            assert!(places.insert(f), "frame {f:#x} in a cache and mapped, or in two caches");
        }
    }
    let out = mem.out();
    let lost = out.difference(&places).count();
    let unknown = places.difference(&out).count();
    assert_eq!((lost, unknown), (0, 0), "frames handed out but neither mapped nor in a cache (lost), and the reverse");
    let net: i64 = results.iter().map(|(n, _)| n).sum();
    assert_eq!(net, populated, "the entries' results add up to the pages the region holds");
}
