//! Creates the morsel "dataset" (1 GiB of 2 MiB pages, or `arg` bytes), fills it with a
//! pattern, and publishes it: a header with the size and checksum, the magic written last,
//! then its doorbell (`dataset::PUBLISHED`) for the consumers that wait.
#![no_std]
#![no_main]

use guest_lib::morsel::{self, PageSize};
use guest_lib::{println, BootInfo};
use guests::dataset;

guest_lib::entry!(main);

fn main(info: &BootInfo) -> i32 {
    let size = if info.arg != 0 { info.arg } else { 1 << 30 };
    let mut m = match morsel::create(dataset::NAME, size, PageSize::Size2M, false) {
        Ok(m) => m,
        Err(e) => {
            println!("producer: cannot create the morsel: {e}");
            return 1;
        }
    };
    println!("producer: morsel of {} MiB mounted at {:#x}", size >> 20, m.addr());
    let sum = dataset::fill(&mut m);
    dataset::publish(&mut m, sum);
    // Consumers that subscribed wake; one that subscribes later sees the header first.
    let reached = guest_lib::notify::Doorbell::new(m.addr()).announce(dataset::PUBLISHED).unwrap_or(0);
    println!("producer: filled {} MiB, checksum {sum:#018x}, published ({reached} subscribers rung)", size >> 20);
    0
}
