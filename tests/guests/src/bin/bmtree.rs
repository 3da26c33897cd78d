//! A vmcache-style buffer manager on ExMap (scenario exmap_btree_buffer_manager, `cargo xtask
//! bench bufmgr`): a B+-tree of 131,072 records (8-byte key, 120-byte payload: vmcache's
//! RNDREAD configuration) in 4,247 pages (16.6 MiB), served from a pool of at most 512
//! resident pages (2 MiB, 1/8.3 of the data) that all vCPUs of the guest share, as vmcache's
//! threads share one pool; uniform random lookups, each result checked (the payload is a
//! function of the key; one lookup in 8 asks for an absent key, which must not be found).
//!
//! - Pages: one state word each (version << 8 | tag: Evicted, Unlocked, Marked, Locked), as
//!   atomics in a shared control morsel `bm-ctl`. Lookups read nodes optimistically (state,
//!   node, state again: same version and not Locked) and never block; a missing page ends the
//!   attempt, the vCPU loads it (CAS Evicted -> Locked, one ExMap READ, or ALLOC + the node
//!   written by the generator below in `alloc` mode; Unlocked with version + 1) and retries.
//! - Eviction: a clock over the state words (Unlocked -> Marked, Marked -> Locked), 64
//!   victims, then one ExMap FREE of the 64, Evicted with version + 1. Unlike Linux's exmap,
//!   touching a freed page here stops the guest, so an optimistic reader must never touch one:
//!   each participant has an epoch slot (odd while inside a lookup) and the evictor waits, after
//!   locking its victims and before FREE, until every slot that was odd has moved on.
//! - The tree is bulk-loaded and each node is a pure function of its page number
//!   (`generate`), so the load phase writes it to the disk with ALLOC + WRITE in batches of
//!   64, and `alloc` mode (no disk: Bochs) makes each node on a miss instead of reading it.
//!
//! arg = role + 10 * lookups per vCPU (0: 2,000). Roles: 0 owner, pages READ from the NVMe
//! disk (built there first; the disk gets its pattern back at the end); 2 owner, pages made
//! by ALLOC + the generator; 1 a second guest that opens the pool read-only and `bm-ctl`
//! read-write (for its epoch slot and the mark bits), looks keys up in resident pages, checks
//! every one, and is refused READ.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guest_lib::abi::{self, Error};
use guest_lib::exmap::{ExMap, Iovec, Range, Region};
use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, yield_now, BootInfo};

guest_lib::entry!(main, vcpu_main);

/// Records and their keys: key(i) = KEY0 + 4 i; key(i) + 2 is in no record.
const RECORDS: u64 = 131_072;
const KEY0: u64 = 0x1000;
/// Payload words (120 bytes).
const PAYLOAD: usize = 15;
/// Leaf: header (8 words), 31 keys from word 8, 31 payloads from word 39.
const LEAF_CAP: u64 = 31;
const LEAF_KEYS: usize = 8;
const LEAF_DATA: usize = LEAF_KEYS + LEAF_CAP as usize;
/// Inner node: header, 250 separators (the first key below each child) from word 8, 250
/// children (page numbers) from word 258.
const INNER_CAP: u64 = 250;
const INNER_KEYS: usize = 8;
const INNER_KIDS: usize = INNER_KEYS + INNER_CAP as usize;
const LEAVES: u64 = RECORDS.div_ceil(LEAF_CAP);
const INNER: u64 = LEAVES.div_ceil(INNER_CAP);
/// Page 0 the root (level 2), 1..=INNER level 1, then the leaves.
const ROOT: u64 = 0;
const FIRST_LEAF: u64 = 1 + INNER;
const PAGES: u64 = FIRST_LEAF + LEAVES;
const _: () = assert!(INNER <= INNER_CAP && LEAF_DATA + PAYLOAD * LEAF_CAP as usize <= 512 && INNER_KIDS + INNER_CAP as usize <= 512);
/// Header word 0 of page p: MAGIC ^ p.
const MAGIC: u64 = 0xb7ee_0000_0000_0000;

/// Resident pages at most (the memory budget) and the eviction batch.
const BUDGET: u64 = 512;
const BATCH: usize = 64;
const _: () = assert!(PAGES >= 8 * BUDGET);

/// `bm-ctl` words: flags and counters, the epoch slots, then one state per page.
const C_READY: usize = 0;
const C_RESIDENT: usize = 1;
const C_HAND: usize = 2;
const C_EVICTING: usize = 3;
const C_READER_DONE: usize = 4;
const C_BATCHES: usize = 5;
const C_EVICTED: usize = 6;
const SLOTS: usize = 8;
/// vCPUs 0..16, the reader guest in the last.
const NSLOTS: usize = 17;
const READER_SLOT: usize = NSLOTS - 1;
const STATES: usize = 32;
const CTL_BYTES: u64 = ((STATES as u64 + PAGES) * 8).div_ceil(4096) * 4096;
/// Set in `C_READY` once the pool is ready.
const READY: u64 = 0x600d;

/// State tags (the low byte; a fresh `bm-ctl` reads 0: every page Evicted).
const EVICTED: u64 = 0;
const UNLOCKED: u64 = 1;
const MARKED: u64 = 2;
const LOCKED: u64 = 3;
fn tag(s: u64) -> u64 {
    s & 0xff
}
fn version(s: u64) -> u64 {
    s >> 8
}
fn with(s: u64, tag: u64) -> u64 {
    s & !0xff | tag
}
fn bumped(s: u64, tag: u64) -> u64 {
    (version(s) + 1) << 8 | tag
}

fn key(i: u64) -> u64 {
    KEY0 + 4 * i
}
/// Payload word j of the record with key k.
fn payload(k: u64, j: usize) -> u64 {
    let x = (k ^ (j as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ x >> 31
}
/// The disk's fresh pattern (tests/scenarios/README.md), word w of page p.
fn pattern(p: u64, w: u64) -> u64 {
    (p * 512 + w).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0d15_c0de_5eed
}

/// Word w of node `page`, as the bulk load lays it out.
fn generate(page: u64, w: usize) -> u64 {
    let (level, first, count, step) = match page {
        ROOT => (2, 0, INNER, INNER_CAP * LEAF_CAP),
        p if p < FIRST_LEAF => {
            let first = (p - 1) * INNER_CAP;
            (1, first, INNER_CAP.min(LEAVES - first), LEAF_CAP)
        }
        p => {
            let first = (p - FIRST_LEAF) * LEAF_CAP;
            (0, first, LEAF_CAP.min(RECORDS - first), 1)
        }
    };
    // For an inner node `first` counts children of the level below, in records `step` each.
    match w {
        0 => MAGIC ^ page,
        1 => level,
        2 => count,
        w if level == 0 && (LEAF_KEYS..LEAF_KEYS + count as usize).contains(&w) => key(first + (w - LEAF_KEYS) as u64),
        w if level == 0 && (LEAF_DATA..LEAF_DATA + PAYLOAD * count as usize).contains(&w) => {
            let s = (w - LEAF_DATA) / PAYLOAD;
            payload(key(first + s as u64), (w - LEAF_DATA) % PAYLOAD)
        }
        w if level > 0 && (INNER_KEYS..INNER_KEYS + count as usize).contains(&w) => key((first + (w - INNER_KEYS) as u64) * step),
        w if level > 0 && (INNER_KIDS..INNER_KIDS + count as usize).contains(&w) => {
            let c = first + (w - INNER_KIDS) as u64;
            if level == 2 { 1 + c } else { FIRST_LEAF + c }
        }
        _ => 0,
    }
}

/// One vCPU's (or the reader's) counters, summed by vCPU 0.
#[derive(Default, Clone, Copy)]
struct Counts {
    lookups: u64,
    found: u64,
    absent: u64,
    loads: u64,
    retries: u64,
    busy: u64,
    /// ExMap calls (Busy refusals not counted) and the TSC ticks spent in them (with the
    /// Busy refusals and back-offs before each).
    calls: u64,
    call_ticks: u64,
}

/// One iovec page per vCPU (`iov_of`).
struct Iovs([UnsafeCell<Iovec>; 16]);
// SAFETY: slot v is only ever used by vCPU v (`iov_of`), so no two CPUs touch one page.
unsafe impl Sync for Iovs {}
static IOVS: Iovs = Iovs([const { UnsafeCell::new(Iovec::new()) }; 16]);

/// vCPU `vcpu`'s iovec page; each vCPU calls this once (its `worker`).
fn iov_of(vcpu: u32) -> &'static mut Iovec {
    // SAFETY: vCPU indices are unique in a guest and each vCPU takes its own slot once, so
    // this is the only reference to that page; the reader guest has its own memory.
    unsafe { &mut *IOVS.0[vcpu as usize % 16].get() }
}

/// Per-vCPU counters of the measured phase and the end flags.
static COUNTS: [[AtomicU64; 8]; 16] = [const { [const { AtomicU64::new(0) }; 8] }; 16];
static POOL: AtomicU64 = AtomicU64::new(0);
static CTL: AtomicU64 = AtomicU64::new(0);
/// vCPUs past the warm-up, vCPUs done, and vCPU 0's go for the measured phase.
static WARM: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);
static GO: AtomicU64 = AtomicU64::new(0);
/// A vCPU found a wrong answer or an ExMap error: everyone stops.
static FAILED: AtomicU64 = AtomicU64::new(0);

/// What one attempt of a lookup ended with.
enum Step {
    Found([u64; PAYLOAD]),
    Absent,
    /// The page is not resident: load it (or, read-only, give up on this key).
    Miss(u64),
    /// A page was locked or changed under the reader.
    Retry,
}

/// The shared pool as one participant sees it.
struct Pool<'a> {
    base: u64,
    ctl: &'a [AtomicU64],
    slot: usize,
    /// Lookups this participant entered (its slot is 2 * epoch + 1 while inside).
    epoch: u64,
    /// ExMap calls (None: a read-only participant).
    region: Option<Region>,
    alloc_mode: bool,
    counts: Counts,
    /// TSC ticks between a leaf's state check and the reads of its words, in every fourth
    /// lookup: 0 for the owner's vCPUs; the read-only guest dwells (20 ms) so that
    /// evictions meet its lookups (a FREE that did not wait for its epoch slot would then
    /// stop it at a freed page).
    dwell: u64,
    /// This participant's iovec page (`IOVS`: the vCPU stacks are 64 KiB, too small for
    /// copies of 4 KiB pages in every frame).
    iov: &'a mut Iovec,
}

impl<'a> Pool<'a> {
    fn state(&self, page: u64) -> &'a AtomicU64 {
        &self.ctl[STATES + page as usize]
    }

    /// Word w of a resident page.
    fn word(&self, page: u64, w: usize) -> u64 {
        // SAFETY: callers read only pages whose state said resident while their epoch slot
        // was odd: an evictor waits for that slot before it frees the page (module doc);
        // page < PAGES lies in the region, w < 512 in the page. Volatile: other CPUs write
        // the pages as they load them, never while they are resident.
        unsafe { ((self.base + page * 4096) as *const u64).add(w & 511).read_volatile() }
    }

    /// One optimistic descent from the root; `Err` is a node that validated but is wrong.
    fn descend(&self, k: u64) -> Result<Step, &'static str> {
        let (mut page, mut level) = (ROOT, 2);
        loop {
            let st = self.state(page);
            let mut s = st.load(SeqCst);
            match tag(s) {
                EVICTED => return Ok(Step::Miss(page)),
                LOCKED => return Ok(Step::Retry),
                MARKED if self.region.is_some() => {
                    // Used again: out of the clock's hand (vmcache does this in its guards).
                    // The read-only guest leaves the owner's replacement alone.
                    if st.compare_exchange(s, with(s, UNLOCKED), SeqCst, SeqCst).is_ok() {
                        s = with(s, UNLOCKED);
                    }
                }
                _ => {}
            }
            if level == 0 && self.dwell > 0 && self.epoch % 4 == 0 {
                let t = rdtsc();
                while rdtsc() - t < self.dwell {
                    core::hint::spin_loop();
                }
            }
            let (head, lvl, count) = (self.word(page, 0), self.word(page, 1), self.word(page, 2));
            let mut out = Step::Absent;
            let mut child = 0;
            if level == 0 {
                let keys = count.min(LEAF_CAP) as usize;
                let (mut lo, mut hi) = (0, keys);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if self.word(page, LEAF_KEYS + mid) < k { lo = mid + 1 } else { hi = mid }
                }
                if lo < keys && self.word(page, LEAF_KEYS + lo) == k {
                    let mut p = [0; PAYLOAD];
                    for (j, w) in p.iter_mut().enumerate() {
                        *w = self.word(page, LEAF_DATA + lo * PAYLOAD + j);
                    }
                    out = Step::Found(p);
                }
            } else {
                // The last child whose separator is <= k (the first if none).
                let kids = count.clamp(1, INNER_CAP) as usize;
                let (mut lo, mut hi) = (1, kids);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if self.word(page, INNER_KEYS + mid) <= k { lo = mid + 1 } else { hi = mid }
                }
                child = self.word(page, INNER_KIDS + lo - 1);
            }
            let again = st.load(SeqCst);
            if version(again) != version(s) || !matches!(tag(again), UNLOCKED | MARKED) {
                return Ok(Step::Retry);
            }
            if head != MAGIC ^ page || lvl != level {
                return Err("a node that validated is not the page it should be");
            }
            if level == 0 {
                return Ok(out);
            }
            if child >= PAGES {
                return Err("an inner node names a page past the tree");
            }
            page = child;
            level -= 1;
        }
    }

    /// One lookup of record r (or of the absent key after it), checked; loads what it misses.
    /// Ok(false): a read-only participant met a page that is not resident.
    fn lookup(&mut self, r: u64, present: bool) -> Result<bool, &'static str> {
        let k = if present { key(r) } else { key(r) + 2 };
        loop {
            self.epoch += 1;
            self.ctl[SLOTS + self.slot].store(2 * self.epoch + 1, SeqCst);
            let step = self.descend(k);
            self.ctl[SLOTS + self.slot].store(2 * self.epoch + 2, SeqCst);
            match step? {
                Step::Found(p) => {
                    if !present || p.iter().enumerate().any(|(j, &w)| w != payload(k, j)) {
                        return Err("a key found with a wrong payload, or an absent key found");
                    }
                    self.counts.found += 1;
                    break;
                }
                Step::Absent => {
                    if present {
                        return Err("a present key not found");
                    }
                    self.counts.absent += 1;
                    break;
                }
                Step::Miss(page) => {
                    if self.region.is_none() {
                        return Ok(false);
                    }
                    self.load(page)?;
                }
                Step::Retry => {
                    self.counts.retries += 1;
                    core::hint::spin_loop();
                }
            }
        }
        self.counts.lookups += 1;
        Ok(true)
    }

    /// An ExMap call over single pages that must each change one page; Busy (another vCPU's
    /// READ holds the region) is waited out.
    fn exmap(&mut self, op: u64, pages: &[u64]) -> Result<(), &'static str> {
        let iov = &mut *self.iov;
        let region = self.region.ok_or("no region")?;
        let mut ranges = [Range::new(0, 1); BATCH];
        for (r, &p) in ranges.iter_mut().zip(pages) {
            *r = Range::new(p, 1);
        }
        let ranges = &ranges[..pages.len()];
        let mut wait = 200;
        let t0 = rdtsc();
        self.counts.calls += 1;
        loop {
            let r = match op {
                abi::EXMAP_READ => region.read(iov, ranges),
                abi::EXMAP_ALLOC => region.alloc(iov, ranges),
                _ => region.free(iov, ranges),
            };
            match r {
                Err(Error::Busy) => {
                    // The region is pinned for the NVMe batch of another vCPU (one batch in
                    // flight per region): back off, doubling up to ~25,600 PAUSEs.
                    self.counts.busy += 1;
                    for _ in 0..wait {
                        core::hint::spin_loop();
                    }
                    wait = (wait * 2).min(25_600);
                }
                Ok(0) if iov.results(pages.len()).all(|r| r == Ok(1)) => {
                    self.counts.call_ticks += rdtsc() - t0;
                    return Ok(());
                }
                _ => {
                    println!("bmtree: FAILED: ExMap op {op} on {} page(s) from {}: {r:?}", pages.len(), pages[0]);
                    return Err("an ExMap call failed");
                }
            }
        }
    }

    /// Makes `page` resident (unless another participant loads it meanwhile), evicting first
    /// while the pool is at its budget.
    fn load(&mut self, page: u64) -> Result<(), &'static str> {
        loop {
            let n = self.ctl[C_RESIDENT].load(SeqCst);
            if n < BUDGET {
                if self.ctl[C_RESIDENT].compare_exchange(n, n + 1, SeqCst, SeqCst).is_ok() {
                    break;
                }
            } else {
                self.evict()?;
            }
        }
        let st = self.state(page);
        let s = st.load(SeqCst);
        if tag(s) != EVICTED || st.compare_exchange(s, with(s, LOCKED), SeqCst, SeqCst).is_err() {
            self.ctl[C_RESIDENT].fetch_sub(1, SeqCst);
            return Ok(());
        }
        if self.alloc_mode {
            self.exmap(abi::EXMAP_ALLOC, &[page])?;
            for w in 0..512 {
                // SAFETY: the page was populated just now and is Locked by this vCPU: no one
                // else reads or writes it until the store below.
                unsafe { ((self.base + page * 4096) as *mut u64).add(w).write_volatile(generate(page, w)) };
            }
        } else {
            self.exmap(abi::EXMAP_READ, &[page])?;
        }
        st.store(bumped(s, UNLOCKED), SeqCst);
        self.counts.loads += 1;
        Ok(())
    }

    /// One batch of the clock: up to 64 victims locked, every participant's lookup that may
    /// have seen them finished, one FREE. Returns at once if another vCPU is evicting.
    fn evict(&mut self) -> Result<(), &'static str> {
        if self.ctl[C_EVICTING].swap(1, SeqCst) == 1 {
            backoff(64);
            return Ok(());
        }
        let mut victims = [0u64; BATCH];
        let mut n = 0;
        for _ in 0..3 * PAGES {
            if n == BATCH {
                break;
            }
            let page = self.ctl[C_HAND].fetch_add(1, SeqCst) % PAGES;
            let st = self.state(page);
            let s = st.load(SeqCst);
            match tag(s) {
                MARKED if st.compare_exchange(s, with(s, LOCKED), SeqCst, SeqCst).is_ok() => {
                    victims[n] = page;
                    n += 1;
                }
                UNLOCKED => {
                    let _ = st.compare_exchange(s, with(s, MARKED), SeqCst, SeqCst);
                }
                _ => {}
            }
        }
        if n > 0 {
            let quiet = self.quiesce();
            // Without the wait no FREE: a page may still be read (the victims stay Locked).
            quiet?;
            let r = self.exmap(abi::EXMAP_FREE, &victims[..n]);
            for &page in &victims[..n] {
                let st = self.state(page);
                st.store(bumped(st.load(SeqCst), EVICTED), SeqCst);
            }
            self.ctl[C_RESIDENT].fetch_sub(n as u64, SeqCst);
            self.ctl[C_BATCHES].fetch_add(1, SeqCst);
            self.ctl[C_EVICTED].fetch_add(n as u64, SeqCst);
            r?;
        }
        self.ctl[C_EVICTING].store(0, SeqCst);
        Ok(())
    }

    /// Waits until every other participant that was inside a lookup has left it (a lookup
    /// never blocks; Err after 10 s: a participant died inside one).
    fn quiesce(&self) -> Result<(), &'static str> {
        let limit = 10_000_000 * info_u64(abi::INFO_TSC_PER_US).max(1);
        let t = rdtsc();
        for i in 0..NSLOTS {
            let slot = &self.ctl[SLOTS + i];
            let seen = slot.load(SeqCst);
            if i == self.slot || seen % 2 == 0 {
                continue;
            }
            let mut spins = 0u64;
            while slot.load(SeqCst) == seen {
                if FAILED.load(SeqCst) != 0 {
                    return Err("another vCPU failed");
                }
                if rdtsc() - t > limit {
                    return Err("a participant stayed inside one lookup for 10 s");
                }
                spins += 1;
                if spins % 64 == 0 {
                    // It may be waiting for this CPU (several vCPUs per CPU).
                    yield_now();
                } else {
                    core::hint::spin_loop();
                }
            }
        }
        Ok(())
    }
}

fn backoff(spins: u32) {
    for _ in 0..spins {
        core::hint::spin_loop();
    }
    yield_now();
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Per-participant random numbers (xorshift).
fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

fn lookups_of(info: &BootInfo) -> u64 {
    match info.arg / 10 {
        0 => 2000,
        n => n,
    }
}

fn main(info: &BootInfo) -> i32 {
    match info.arg % 10 {
        0 => owner(info, false),
        2 => owner(info, true),
        1 => reader(info),
        _ => 2,
    }
}

fn vcpu_main(info: &BootInfo, vcpu: u32) -> i32 {
    if info.arg % 10 == 1 {
        return 0;
    }
    while GO.load(SeqCst) == 0 {
        if FAILED.load(SeqCst) != 0 {
            return 1;
        }
        yield_now();
    }
    match worker(info, vcpu) {
        Ok(()) => 0,
        Err(e) => {
            FAILED.store(1, SeqCst);
            println!("bmtree vcpu {vcpu}: FAILED: {e}");
            1
        }
    }
}

fn fail(what: &str) -> i32 {
    FAILED.store(1, SeqCst);
    println!("bmtree: FAILED: {what}");
    1
}

/// vCPU 0's readings at the start and the end of the measured phase: TSC, guest exits,
/// region invalidations, pages read or allocated, pages evicted, FREE batches.
static MARKS: [[AtomicU64; 6]; 2] = [const { [const { AtomicU64::new(0) }; 6] }; 2];

fn mark(m: usize, region: Region, ctl: &[AtomicU64], alloc_mode: bool) {
    let loaded = region.info(if alloc_mode { abi::EXMAP_INFO_ALLOCATED } else { abi::EXMAP_INFO_READ }).unwrap_or(0);
    let v = [rdtsc(), info_u64(abi::INFO_EXITS), region.info(abi::EXMAP_INFO_INVALIDATIONS).unwrap_or(0), loaded,
        ctl[C_EVICTED].load(SeqCst), ctl[C_BATCHES].load(SeqCst)];
    for (a, v) in MARKS[m].iter().zip(v) {
        a.store(v, SeqCst);
    }
}

/// Waits (spinning, yielding now and then) until `cond`; Err if a vCPU failed.
fn wait_until(cond: impl Fn() -> bool) -> Result<(), &'static str> {
    let mut spins = 0u64;
    while !cond() {
        if FAILED.load(SeqCst) != 0 {
            return Err("another vCPU failed");
        }
        spins += 1;
        if spins % 4096 == 0 {
            yield_now();
        } else {
            core::hint::spin_loop();
        }
    }
    Ok(())
}

/// What every vCPU runs once the pool is ready: a warm-up until the pool is nearly full, a
/// barrier, the measured lookups (vCPU 0 takes the readings around them).
#[inline(never)]
fn worker(info: &BootInfo, vcpu: u32) -> Result<(), &'static str> {
    let vcpus = info.vcpu_count.clamp(1, 16);
    let ctl = morsel::atomics_at(CTL.load(SeqCst)).ok_or("bm-ctl not mounted")?;
    let region = Region::at(POOL.load(SeqCst));
    let alloc_mode = info.arg % 10 == 2;
    let mut pool = Pool { base: region.addr(), ctl, slot: vcpu as usize, epoch: 0, region: Some(region), alloc_mode, counts: Counts::default(), dwell: 0, iov: iov_of(vcpu) };
    let mut rng = 0x2545_f491_4f6c_dd1d ^ (vcpu as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut one = |pool: &mut Pool, n: u64| {
        let r = next(&mut rng) % RECORDS;
        pool.lookup(r, n % 8 != 7).map(|_| ())
    };
    let mut n = 0;
    while ctl[C_RESIDENT].load(SeqCst) + BATCH as u64 <= BUDGET && n < 4 * BUDGET {
        one(&mut pool, n)?;
        n += 1;
    }
    WARM.fetch_add(1, SeqCst);
    if vcpu == 0 {
        wait_until(|| WARM.load(SeqCst) == vcpus)?;
        mark(0, region, ctl, alloc_mode);
        GO.store(2, SeqCst);
    } else {
        wait_until(|| GO.load(SeqCst) == 2)?;
    }
    pool.counts = Counts::default();
    for n in 0..lookups_of(info) {
        if FAILED.load(SeqCst) != 0 {
            return Err("another vCPU failed");
        }
        one(&mut pool, n)?;
    }
    let c = pool.counts;
    for (a, v) in COUNTS[vcpu as usize].iter().zip([c.lookups, c.found, c.absent, c.loads, c.retries, c.busy, c.calls, c.call_ticks]) {
        a.store(v, SeqCst);
    }
    DONE.fetch_add(1, SeqCst);
    if vcpu != 0 {
        return Ok(());
    }
    wait_until(|| DONE.load(SeqCst) == vcpus)?;
    mark(1, region, ctl, alloc_mode);
    // vCPU 0 keeps the pool busy while the read-only guest looks (its lookups then overlap
    // loads and evictions), at most 50,000 lookups more.
    if info_u64(abi::INFO_GUEST_COUNT) > 1 {
        let mut spare = 0;
        while ctl[C_READER_DONE].load(SeqCst) == 0 && spare < 50_000 {
            one(&mut pool, spare)?;
            spare += 1;
        }
    }
    Ok(())
}

fn info_u64(what: u64) -> u64 {
    guest_lib::info(what).unwrap_or(0)
}

#[inline(never)]
fn owner(info: &BootInfo, alloc_mode: bool) -> i32 {
    let vcpus = info.vcpu_count.clamp(1, 16);
    let Ok(mut x) = ExMap::create("bm", PAGES * 4096, false) else { return fail("create the pool") };
    let Ok(ctl_m) = morsel::create("bm-ctl", CTL_BYTES, PageSize::Size4K, true) else { return fail("create bm-ctl") };
    POOL.store(x.addr(), SeqCst);
    CTL.store(ctl_m.addr(), SeqCst);
    let ctl = ctl_m.atomics();
    if !alloc_mode {
        if let Err(e) = fill(&mut x, generate) {
            return fail(e);
        }
        println!("bmtree: B+-tree of {RECORDS} records (8-byte keys, 120-byte payloads) in {PAGES} pages ({INNER} inner, {LEAVES} leaves) written to the disk");
    }
    println!("bmtree: pool of {BUDGET} pages for {PAGES} pages of tree ({}.{}x), {vcpus} vCPU(s), pages by {}, evicted by FREE in batches of {BATCH}",
        PAGES / BUDGET, PAGES * 10 / BUDGET % 10, if alloc_mode { "ALLOC + generator" } else { "READ from NVMe" });
    ctl[C_READY].store(READY, SeqCst);
    GO.store(1, SeqCst);
    if let Err(e) = worker(info, 0).and_then(|()| report(info, &x, alloc_mode)) {
        return fail(e);
    }
    if info_u64(abi::INFO_GUEST_COUNT) > 1 {
        let limit = 60_000_000 * info_u64(abi::INFO_TSC_PER_US).max(1);
        let t = rdtsc();
        if wait_until(|| ctl[C_READER_DONE].load(SeqCst) != 0 || rdtsc() - t > limit).is_err() || ctl[C_READER_DONE].load(SeqCst) == 0 {
            return fail("the read-only guest did not finish within 60 s");
        }
    }
    let all = [Range::new(0, PAGES.min(4000)), Range::new(4000, PAGES - 4000)];
    if x.free(&all) != Ok(0) || x.populated() != 0 {
        return fail("evict all");
    }
    if !alloc_mode {
        // The disk gets its pattern back, so the scenario's disk check proves that nothing
        // past the tree was written.
        if let Err(e) = fill(&mut x, |p, w| pattern(p, w as u64)) {
            return fail(e);
        }
        println!("bmtree: disk pattern restored");
    }
    println!("bmtree: done");
    0
}

/// Writes `word(page, w)` to the disk's first PAGES pages, 64 per ALLOC / WRITE / FREE (the
/// load phase, and the pattern back at the end). Kept out of `owner`'s frame.
#[inline(never)]
fn fill(x: &mut ExMap, word: impl Fn(u64, usize) -> u64) -> Result<(), &'static str> {
    for first in (0..PAGES).step_by(BATCH) {
        let n = BATCH.min((PAGES - first) as usize) as u64;
        if x.alloc(&[Range::new(first, n)]) != Ok(0) {
            return Err("fill: alloc");
        }
        for p in first..first + n {
            // SAFETY: populated just now; no other vCPU works on the pool now.
            let page = unsafe { x.page_mut(p) };
            for (w, b) in page.chunks_exact_mut(8).enumerate() {
                b.copy_from_slice(&word(p, w).to_le_bytes());
            }
        }
        if x.write(&[Range::new(first, n)]) != Ok(0) || x.free(&[Range::new(first, n)]) != Ok(0) {
            return Err("fill: write");
        }
    }
    Ok(())
}

/// The measured phase's figures, summed over the vCPUs, and their checks.
#[inline(never)]
fn report(info: &BootInfo, x: &ExMap, alloc_mode: bool) -> Result<(), &'static str> {
    let vcpus = info.vcpu_count.clamp(1, 16);
    let mut c = [0u64; 8];
    for v in 0..vcpus as usize {
        for (s, a) in c.iter_mut().zip(&COUNTS[v]) {
            *s += a.load(SeqCst);
        }
    }
    let d = |k: usize| MARKS[1][k].load(SeqCst).wrapping_sub(MARKS[0][k].load(SeqCst));
    let (ticks, exits, invs, loaded, evicted, batches) = (d(0), d(1), d(2), d(3), d(4), d(5));
    let lookups = c[0].max(1);
    let tsc_us = info_u64(abi::INFO_TSC_PER_US).max(1);
    let per_s = |n: u64| (n as u128 * tsc_us as u128 * 1_000_000 / ticks.max(1) as u128) as u64;
    let milli = |n: u64| {
        let m = n * 1000 * 100 / lookups;
        (m / 100, m % 100)
    };
    let ((ex, exf), (inv, invf), (ld, ldf)) = (milli(exits), milli(invs), milli(loaded));
    println!("bmtree: {vcpus} vCPU(s): {} lookups checked ({} found with their payload, {} absent), {loaded} pages {}, {evicted} evicted in {batches} FREE batches, {} retries, {} Busy",
        c[0], c[1], c[2], if alloc_mode { "allocated and generated" } else { "read" }, c[4], c[5]);
    println!("bmtree result: vcpus={vcpus} mode={} lookups={} ticks={ticks} ticks/lookup={} lookups/s={} pages/s={} exits/1k={ex}.{exf:02} invalidations/1k={inv}.{invf:02} pages/1k={ld}.{ldf:02} exmap-calls={} exmap-ticks/call={} exmap-ticks/lookup={}",
        if alloc_mode { "alloc" } else { "read" }, c[0], ticks / lookups, per_s(c[0]), per_s(loaded), c[6], c[7] / c[6].max(1), c[7] / lookups);
    if c[0] != vcpus * lookups_of(info) || c[1] + c[2] != c[0] || c[3] != loaded {
        return Err("the counts do not add up (lookups, found + absent, loads vs the region's counter)");
    }
    if x.populated() > BUDGET {
        return Err("more pages resident than the budget");
    }
    Ok(())
}

/// The read-only guest: lookups in the pages that happen to be resident, each checked.
#[inline(never)]
fn reader(info: &BootInfo) -> i32 {
    // The owner's control morsel, then a warm pool (lookups of an empty one would meet only
    // pages that are not resident).
    let mut ctl_m = None;
    for _ in 0..2_000_000 {
        if let Ok(m) = morsel::open_mut("bm-ctl") {
            ctl_m = Some(m);
            break;
        }
        yield_now();
    }
    let warm = |c: &[AtomicU64]| c[C_READY].load(SeqCst) == READY && c[C_RESIDENT].load(SeqCst) + BATCH as u64 >= BUDGET;
    let ready = ctl_m.as_ref().is_some_and(|m| (0..2_000_000).any(|_| warm(m.atomics()) || { yield_now(); false }));
    let (Some(ctl_m), true, Ok(pool_m)) = (ctl_m, ready, morsel::open("bm")) else {
        println!("bmtree reader: FAILED: the pool never became ready");
        return 1;
    };
    let ctl = ctl_m.atomics();
    let mut pool = Pool { base: pool_m.addr(), ctl, slot: READER_SLOT, epoch: 0, region: None, alloc_mode: false, counts: Counts::default(), dwell: 20_000 * info_u64(abi::INFO_TSC_PER_US), iov: iov_of(0) };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let batches0 = ctl[C_BATCHES].load(SeqCst);
    let (mut checked, mut missed) = (0, 0);
    // Keys until `lookups` were answered from resident pages (at most 50 tries each).
    let want = lookups_of(info);
    for n in 0..50 * want {
        if checked == want {
            break;
        }
        match pool.lookup(next(&mut rng) % RECORDS, n % 8 != 7) {
            Ok(true) => checked += 1,
            Ok(false) => missed += 1,
            Err(e) => {
                ctl[C_READER_DONE].store(1, SeqCst);
                println!("bmtree reader: FAILED: {e}");
                return 1;
            }
        }
    }
    let batches = ctl[C_BATCHES].load(SeqCst) - batches0;
    #[repr(C, align(4096))]
    struct P([u64; 512]);
    let iov = P([abi::exmap_entry(FIRST_LEAF, 1); 512]);
    let rd = guest_lib::hypercall::call(abi::HC_EXMAP_ACTION, [pool_m.addr(), iov.0.as_ptr() as u64, 1, abi::EXMAP_READ, 0, 0]);
    ctl[C_READER_DONE].store(1, SeqCst);
    // Two lines: the hypervisor breaks a console line at 160 bytes, and the first one's
    // length moves with its numbers (the scenario once missed `READ` broken as `R` / `EAD`).
    println!("bmtree reader: {checked} lookups in resident pages checked read-only ({} found, {} absent), {missed} met a page not resident, {batches} FREE batches of the owner meanwhile",
        pool.counts.found, pool.counts.absent);
    println!("bmtree reader: READ through the read-only mount: {rd:?}");
    if rd != Err(Error::Denied) || checked == 0 {
        println!("bmtree reader: FAILED");
        return 1;
    }
    0
}
