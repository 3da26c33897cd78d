//! Mount + unmount of a morsel versus mapping the same object page by page into a fresh table
//! (what a conventional hypervisor does to give a guest memory), over simulated memory: only
//! the tables are real. `cargo run --release -p morsel --example bench [OPS] [--sizes 2M,1G,64G]`
//! (sizes are multiples of 2 MiB, suffix M or G; `cargo xtask bench morsel` asks for more).

use std::hint::black_box;
use std::time::Instant;

use morsel::{Ept, GuestPhysAddr, HostPhysAddr, Morsel, PageSize, Perm, SecondLevelTable, SimMem};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Windows mounted per round (each into its own slot of the same target).
const WINDOWS: u64 = 256;

struct Row {
    size: u64,
    pages: u64,
    tables: u32,
    mount_ns: f64,
    unmount_ns: f64,
    mount_writes: u64,
    unmount_writes: u64,
    map_ns: f64,
    teardown_ns: f64,
    map_writes: u64,
}

fn bench(size: u64, target_ops: u64) -> Row {
    let mem = SimMem::new(256 * GIB);
    let page = PageSize::Size2M;
    let m = Morsel::<Ept>::create(size, page, &mem, &mem).expect("create");
    let pages = m.len() / page.bytes();

    // Mount into WINDOWS slots of one target; a first round creates the path tables.
    let mut t = SecondLevelTable::<Ept>::new(&mem, &mem).expect("table");
    let window = |i: u64| GuestPhysAddr::new((i + 1) * m.window_size());
    for i in 0..WINDOWS {
        m.mount(&mut t, window(i), Perm::RW, &mem, &mem)
            .expect("mount");
    }
    for i in 0..WINDOWS {
        m.unmount(&mut t, window(i), &mem, &mem).expect("unmount");
    }
    let rounds = (target_ops / WINDOWS).max(1);
    let (mut mount_t, mut unmount_t) = (0u128, 0u128);
    let (mut mount_w, mut unmount_w) = (0, 0);
    for _ in 0..rounds {
        let w0 = mem.writes();
        let s = Instant::now();
        for i in 0..WINDOWS {
            black_box(
                m.mount(&mut t, window(i), Perm::RW, &mem, &mem)
                    .expect("mount"),
            );
        }
        let mid = Instant::now();
        let w1 = mem.writes();
        for i in 0..WINDOWS {
            black_box(m.unmount(&mut t, window(i), &mem, &mem).expect("unmount"));
        }
        unmount_t += mid.elapsed().as_nanos();
        mount_t += (mid - s).as_nanos();
        mount_w += w1 - w0;
        unmount_w += mem.writes() - w1;
    }
    let ops = rounds * WINDOWS;
    t.destroy(&mem, &mem).expect("destroy table");

    // Conventional: map every 2 MiB page of the object into a fresh table, then tear it down.
    let frames: Vec<HostPhysAddr> = (0..pages)
        .map(|p| m.data_frame(p * page.bytes(), &mem).expect("frame"))
        .collect();
    let reps = (target_ops / 8 / pages).clamp(5, 100_000);
    let (mut map_t, mut down_t) = (0u128, 0u128);
    let writes0 = mem.writes();
    for _ in 0..reps {
        let s = Instant::now();
        let mut g = SecondLevelTable::<Ept>::new(&mem, &mem).expect("table");
        for (p, &f) in frames.iter().enumerate() {
            let at = GuestPhysAddr::new(512 * GIB + p as u64 * page.bytes());
            g.map(at, f, page, Perm::RW, &mem, &mem).expect("map");
        }
        let mid = Instant::now();
        black_box(&g);
        g.destroy(&mem, &mem).expect("destroy");
        map_t += (mid - s).as_nanos();
        down_t += mid.elapsed().as_nanos();
    }
    let map_writes = (mem.writes() - writes0) / reps;

    let row = Row {
        size,
        pages,
        tables: m.table_count(),
        mount_ns: mount_t as f64 / ops as f64,
        unmount_ns: unmount_t as f64 / ops as f64,
        mount_writes: mount_w / ops,
        unmount_writes: unmount_w / ops,
        map_ns: map_t as f64 / reps as f64,
        teardown_ns: down_t as f64 / reps as f64,
        map_writes,
    };
    m.destroy(&mem, &mem).expect("destroy morsel");
    assert_eq!(mem.allocated_frames(), 0);
    row
}

fn human(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

/// `2M`, `1G`: a morsel size.
fn size_arg(v: &str) -> u64 {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().expect("--sizes: numbers with suffix M or G");
    match unit {
        "M" => n * MIB,
        "G" => n * GIB,
        _ => panic!("--sizes: suffix M or G"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut target_ops = 4 << 20;
    let mut sizes = vec![2 * MIB, GIB, 64 * GIB];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sizes" => sizes = it.next().expect("--sizes LIST").split(',').map(size_arg).collect(),
            n => target_ops = n.parse().expect("OPS: a number of mount+unmount pairs"),
        }
    }
    println!("morsel bench: EPT format, 2 MiB pages, simulated memory (only tables are real)");
    println!("mount/unmount: ns per operation; page-by-page: ns per whole object (map every page into a fresh table, then tear the table down)");
    println!();
    println!(
        "| {:>7} | {:>6} | {:>6} | {:>8} | {:>10} | {:>11} | {:>12} | {:>14} | {:>11} | {:>16} |",
        "size",
        "pages",
        "tables",
        "mount ns",
        "unmount ns",
        "PTE writes",
        "map-all ns",
        "teardown ns",
        "PTE writes",
        "ratio"
    );
    println!(
        "|{:-<9}|{:-<8}|{:-<8}|{:-<10}|{:-<12}|{:-<13}|{:-<14}|{:-<16}|{:-<13}|{:-<18}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    for size in sizes {
        let r = bench(size, target_ops);
        let ratio = (r.map_ns + r.teardown_ns) / (r.mount_ns + r.unmount_ns);
        println!(
            "| {:>7} | {:>6} | {:>6} | {:>8.1} | {:>10.1} | {:>11} | {:>12.0} | {:>14.0} | {:>11} | {:>15.0}x |",
            human(r.size),
            r.pages,
            r.tables,
            r.mount_ns,
            r.unmount_ns,
            format!("{} + {}", r.mount_writes, r.unmount_writes),
            r.map_ns,
            r.teardown_ns,
            r.map_writes,
            ratio
        );
    }
    println!();
    println!("ratio = (map-all + teardown) / (mount + unmount); PTE writes: per mount + per unmount, and per object mapped page by page");
}
