//! The README's guest: run two, `guests=readme:arg=0,readme:arg=1`. The writer shares a
//! morsel and rings its doorbell; the reader waits for the ring and reads; the writer pages
//! an ExMap region in and out. The README quotes this file (checked by `cargo xtask test doc`).
#![no_std]
#![no_main]
use guest_lib::exmap::{ExMap, Range};
use guest_lib::morsel::{self, PageSize};
use guest_lib::notify::{wait, Doorbell, Event, Timeout};
use guest_lib::{println, yield_now, BootInfo, Error};
guest_lib::entry!(main);

const HELLO: Event = Event(1);

fn main(info: &BootInfo) -> i32 {
    if info.arg == 0 {
        // Writer: a 2 MiB morsel others may open read-only; mounting it anywhere is one entry.
        let mut m = morsel::create("greeting", 2 << 20, PageSize::Size2M, false).unwrap();
        m[..5].copy_from_slice(b"hello");
        let bell = Doorbell::new(m.addr());
        while bell.ring(HELLO) == Err(Error::NoReceiver) {
            yield_now(); // the reader has not subscribed yet
        }
        // ExMap: a 1 GiB region with no memory behind it; populate 16 pages in one call.
        let mut pool = ExMap::create("pool", 1 << 30, false).unwrap();
        pool.alloc(&[Range::new(0, 16)]).unwrap();
        // SAFETY: page 3 is populated until the free below.
        unsafe { pool.page_mut(3)[0] = 42 };
        let populated = pool.populated();
        let failed = pool.free(&[Range::new(0, 16)]).unwrap(); // one TLB flush for all 16
        println!("writer: rang; {populated} pages populated, then freed ({failed} failed)");
    } else {
        // Reader: open the morsel (retry until the writer made it), subscribe, wait.
        let m = loop {
            match morsel::open("greeting") {
                Err(Error::NotFound) => yield_now(),
                other => break other.unwrap(),
            }
        };
        Doorbell::new(m.addr()).subscribe(None).unwrap();
        let bits = wait(HELLO, Timeout::Forever).unwrap();
        println!("reader: bits {:#x}, read {:?}", bits.0, core::str::from_utf8(&m[..5]));
    }
    0
}
