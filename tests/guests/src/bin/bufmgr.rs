//! Scenario exmap_buffer_manager: the workload ExMap exists for. A keyed data set on the NVMe
//! pattern disk (64 MiB) is served under a budget of 256 resident pages (1 MiB), far below
//! its 34 MiB of data and index:
//! - data: pages 0..8192 (32 MiB) of the disk as they are, 65536 records of 512 bytes; the
//!   key of record r is its first word (the pattern makes keys distinct);
//! - index: a hash table of 512 bucket pages (2 MiB, disk pages 8192..8704), built by this
//!   guest with READ (scan, 64 pages per call) and WRITE, in passes that fit the budget;
//! - lookups of random keys (present: the record must be the one whose key it is, every one
//!   of its 64 words checked against the pattern; absent: must not be found), paging in with
//!   READ and evicting FIFO with FREE (32 pages per call) under the budget;
//! - at the end the index pages get the pattern back (WRITE), so the scenario's disk check
//!   proves that nothing else on the disk was written.
//!
//! arg 0: that owner; arg 1: a second guest that opens the pool read-only, waits for the
//! buckets the owner pins for it, looks keys up there and checks them, and is refused READ.
#![no_std]
#![no_main]

use guest_lib::abi::{self, exmap_entry, Error};
use guest_lib::exmap::{ExMap, Range};
use guest_lib::{morsel, println, BootInfo};

guest_lib::entry!(main);

const DATA_PAGES: u64 = 8192;
const RECORDS: u64 = DATA_PAGES * 8;
const INDEX: u64 = DATA_PAGES;
const BUCKETS: u64 = 512;
/// (key, record) pairs per bucket page; word 0 is the bucket's fill.
const SLOTS: usize = 255;
const BUDGET: usize = 256;
/// Buckets pinned for the read-only guest (a plain morsel 'bm-pinned' says they are there).
const PINNED: u64 = 8;
/// Evictable pages: the budget less the pinned ones.
const CAP: usize = BUDGET - PINNED as usize;
const LOOKUPS: u64 = 4000;

fn main(info: &BootInfo) -> i32 {
    match info.arg {
        0 => owner(),
        1 => reader(),
        _ => 2,
    }
}

fn pattern(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0d15_c0de_5eed
}
fn key(r: u64) -> u64 {
    pattern(r * 64)
}
fn bucket(k: u64) -> u64 {
    (k ^ k >> 29).wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 40 & (BUCKETS - 1)
}
fn word(pool: *const u8, page: u64, i: usize) -> u64 {
    // SAFETY: callers only pass pages that are populated now; i < 512.
    unsafe { ((pool as u64 + page * 4096) as *const u64).add(i).read_volatile() }
}

/// A bucket page: the record of `k`, if it holds it.
fn find(pool: *const u8, b: u64, k: u64) -> Option<u64> {
    let fill = word(pool, INDEX + b, 0) as usize;
    (0..fill.min(SLOTS)).find(|&s| word(pool, INDEX + b, 1 + 2 * s) == k).map(|s| word(pool, INDEX + b, 2 + 2 * s))
}

/// Resident pages under the budget, evicted FIFO in batches.
struct Frames {
    ring: [u64; CAP],
    head: usize,
    len: usize,
    /// Resident flag per page of the data and index.
    resident: [bool; (INDEX + BUCKETS) as usize],
    misses: u64,
    hits: u64,
}

impl Frames {
    /// Makes `page` resident (READ), evicting the 32 oldest with one FREE when full.
    fn fix(&mut self, x: &mut ExMap, page: u64) -> bool {
        if self.resident[page as usize] {
            self.hits += 1;
            return true;
        }
        self.misses += 1;
        if self.len == CAP {
            let mut out = [Range::new(0, 1); 32];
            for r in out.iter_mut() {
                let p = self.ring[self.head];
                self.head = (self.head + 1) % CAP;
                self.len -= 1;
                self.resident[p as usize] = false;
                *r = Range::new(p, 1);
            }
            if x.free(&out) != Ok(0) {
                return false;
            }
        }
        if x.read(&[Range::new(page, 1)]) != Ok(0) {
            return false;
        }
        self.ring[(self.head + self.len) % CAP] = page;
        self.len += 1;
        self.resident[page as usize] = true;
        true
    }
}

fn fail(what: &str) -> i32 {
    println!("bufmgr: FAILED: {what}");
    1
}

fn owner() -> i32 {
    let Ok(mut x) = ExMap::create("bm", 64 << 20, false) else { return fail("create") };
    let pool = x.addr() as *const u8;
    // Build: passes of 128 buckets (128 resident bucket pages + 64 data pages in flight).
    const PASS: u64 = 128;
    let mut inserted = 0;
    for first in (0..BUCKETS).step_by(PASS as usize) {
        if x.alloc(&[Range::new(INDEX + first, PASS)]) != Ok(0) {
            return fail("alloc buckets");
        }
        for b in first..first + PASS {
            // SAFETY: populated just now; frames of this region are not zeroed for it.
            unsafe { x.page_mut(INDEX + b).fill(0) };
        }
        for chunk in (0..DATA_PAGES).step_by(64) {
            let ranges: [Range; 64] = core::array::from_fn(|k| Range::new(chunk + k as u64, 1));
            if x.read(&ranges) != Ok(0) {
                return fail("scan read");
            }
            for p in chunk..chunk + 64 {
                for rec in 0..8 {
                    let k = word(pool, p, rec * 64);
                    let b = bucket(k);
                    if b < first || b >= first + PASS {
                        continue;
                    }
                    // SAFETY: bucket page populated for this pass.
                    let page = unsafe { x.page_mut(INDEX + b) };
                    let w = |i: usize| u64::from_le_bytes(page[8 * i..8 * i + 8].try_into().unwrap());
                    let fill = w(0) as usize;
                    if fill == SLOTS {
                        return fail("bucket full");
                    }
                    page[8 + 16 * fill..16 + 16 * fill].copy_from_slice(&k.to_le_bytes());
                    page[16 + 16 * fill..24 + 16 * fill].copy_from_slice(&(p * 8 + rec as u64).to_le_bytes());
                    page[..8].copy_from_slice(&(fill as u64 + 1).to_le_bytes());
                    inserted += 1;
                }
            }
            if x.free(&ranges) != Ok(0) {
                return fail("scan free");
            }
        }
        if x.write(&[Range::new(INDEX + first, PASS)]) != Ok(0) || x.free(&[Range::new(INDEX + first, PASS)]) != Ok(0) {
            return fail("write buckets");
        }
    }
    println!("bufmgr: index of {inserted} keys in {BUCKETS} bucket pages built on disk (budget {BUDGET} pages, data {DATA_PAGES} pages)");
    if inserted != RECORDS {
        return fail("every record indexed");
    }
    // Pin buckets 0..PINNED for the reader, and say so.
    if x.read(&[Range::new(INDEX, PINNED)]) != Ok(0) {
        return fail("pin");
    }
    let Ok(_pinned) = morsel::create("bm-pinned", 2 << 20, morsel::PageSize::Size4K, false) else { return fail("signal") };

    // Lookups under the budget (the pinned pages count against it too).
    let mut f = Frames { ring: [0; CAP], head: 0, len: 0, resident: [false; (INDEX + BUCKETS) as usize], misses: 0, hits: 0 };
    for b in 0..PINNED {
        f.resident[(INDEX + b) as usize] = true;
    }
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let (mut found, mut absent) = (0, 0);
    let calls0 = x.info(abi::EXMAP_INFO_CALLS).unwrap_or(0);
    // SAFETY: RDTSC has no side effects.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    for n in 0..LOOKUPS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let r = rng % RECORDS;
        // Every fourth lookup: a key that is not in the set (word 64r + 1 is no record's key).
        let (k, present) = if n % 4 == 3 { (pattern(r * 64 + 1), false) } else { (key(r), true) };
        let b = bucket(k);
        if b >= PINNED && !f.fix(&mut x, INDEX + b) {
            return fail("fix bucket");
        }
        match (find(pool, b, k), present) {
            (Some(got), true) if got == r => {
                if !f.fix(&mut x, r / 8) {
                    return fail("fix data");
                }
                let at = (r % 8) as usize * 64;
                if !(0..64).all(|i| word(pool, r / 8, at + i) == pattern(r * 64 + i as u64)) {
                    println!("bufmgr: FAILED: record {r} does not hold the pattern");
                    return 1;
                }
                found += 1;
            }
            (None, false) => absent += 1,
            (got, _) => {
                println!("bufmgr: FAILED: key {k:#x} (record {r}, present {present}): index says {got:?}");
                return 1;
            }
        }
        if f.len > CAP || x.populated() > BUDGET as u64 {
            return fail("over budget");
        }
    }
    // SAFETY: as above.
    let cycles = unsafe { core::arch::x86_64::_rdtsc() } - t0;
    let calls = x.info(abi::EXMAP_INFO_CALLS).unwrap_or(0) - calls0;
    println!("bufmgr: {LOOKUPS} lookups answered correctly ({found} found and checked, {absent} absent), {} misses, {} hits, {calls} ExMap calls, at most {BUDGET} pages resident, {} TSC cycles per lookup",
        f.misses, f.hits, cycles / LOOKUPS);
    if x.populated() > BUDGET as u64 {
        return fail("populated within the budget");
    }
    // Let the reader look at the pinned buckets.
    for _ in 0..300 {
        guest_lib::yield_now();
    }
    // Give the index area its pattern back, 64 pages per WRITE.
    let all: [Range; 5] = core::array::from_fn(|k| Range::new(k as u64 * 4000, 4000.min(16384 - k as u64 * 4000)));
    if x.free(&all) != Ok(0) {
        return fail("evict all");
    }
    for first in (INDEX..INDEX + BUCKETS).step_by(64) {
        if x.alloc(&[Range::new(first, 64)]) != Ok(0) {
            return fail("alloc for restore");
        }
        for p in first..first + 64 {
            // SAFETY: populated just now.
            let page = unsafe { x.page_mut(p) };
            for (i, w) in page.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&pattern(p * 512 + i as u64).to_le_bytes());
            }
        }
        if x.write(&[Range::new(first, 64)]) != Ok(0) || x.free(&[Range::new(first, 64)]) != Ok(0) {
            return fail("restore write");
        }
    }
    println!("bufmgr: index area restored; {} pages read, {} written, {} NVMe commands", x.info(abi::EXMAP_INFO_READ).unwrap_or(0),
        x.info(abi::EXMAP_INFO_WRITTEN).unwrap_or(0), x.info(abi::EXMAP_INFO_COMMANDS).unwrap_or(0));
    if x.populated() != 0 {
        return fail("all evicted");
    }
    println!("bufmgr: done");
    0
}

fn reader() -> i32 {
    let open = |name: &str, tries: u32| {
        for _ in 0..tries {
            if let Ok(m) = morsel::open(name) {
                return Some(m);
            }
            guest_lib::yield_now();
        }
        None
    };
    // The pinned buckets are populated once 'bm-pinned' exists, until this guest is done.
    let (Some(_signal), Some(pool)) = (open("bm-pinned", 5_000_000), open("bm", 1)) else {
        println!("bufmgr reader: FAILED: pinned buckets never ready");
        return 1;
    };
    let base = pool.as_ptr();
    let mut checked = 0;
    for r in 0..RECORDS {
        let b = bucket(key(r));
        if b < PINNED {
            if find(base, b, key(r)) != Some(r) {
                println!("bufmgr reader: FAILED: record {r} not found in pinned bucket {b}");
                return 1;
            }
            checked += 1;
        }
    }
    #[repr(C, align(4096))]
    struct P([u64; 512]);
    let iov = P([exmap_entry(INDEX + 100, 1); 512]);
    let rd = guest_lib::hypercall::call(abi::HC_EXMAP_ACTION, [pool.addr(), iov.0.as_ptr() as u64, 1, abi::EXMAP_READ, 0, 0]);
    println!("bufmgr reader: {checked} keys of the {PINNED} pinned buckets found read-only; READ through the read-only mount: {rd:?}");
    if rd != Err(Error::Denied) || checked == 0 {
        println!("bufmgr reader: FAILED");
        return 1;
    }
    0
}
