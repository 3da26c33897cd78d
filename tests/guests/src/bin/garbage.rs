//! Issues garbage hypercalls (unknown numbers, pointers outside its memory, huge and
//! wrapping lengths) and checks that each one returns the right error code.
#![no_std]
#![no_main]

use guest_lib::abi::{self, Error};
use guest_lib::hypercall::call;
use guest_lib::{println, BootInfo};

guest_lib::entry!(main);

/// What is tried, hypercall number, arguments, the answer it must get.
type Case = (&'static str, u64, [u64; 6], Result<u64, Error>);

fn main(info: &BootInfo) -> i32 {
    let mem = info.memory_size;
    let msg = b"a good line\n";
    let good = msg.as_ptr() as u64;
    let names = b"a name\0nul\x07bell-and-a-name-of-33-bytes-long!";
    let n = names.as_ptr() as u64;
    let create = |ptr: u64, len: u64| [ptr, len, 4096, 0, 0, 0];
    let cases: [Case; 16] = [
        // First, so that the hypervisor's reasons are among the refusals it logs at INFO.
        ("morsel size not a multiple of its page", abi::HC_MORSEL_CREATE, [n + 2, 4, 3 << 20, abi::MORSEL_HUGE_PAGES, 0, 0], Err(Error::Invalid)),
        // 64 GiB on a 2 GiB machine: refused before any frame is taken.
        ("morsel larger than free memory", abi::HC_MORSEL_CREATE, [n + 2, 4, 64 << 30, abi::MORSEL_HUGE_PAGES, 0, 0], Err(Error::NoMemory)),
        ("unknown number", 0x9999, [0; 6], Err(Error::NoSuchCall)),
        ("negative number", u64::MAX, [0; 6], Err(Error::NoSuchCall)),
        ("unknown info selector", abi::HC_INFO, [999, 0, 0, 0, 0, 0], Err(Error::NoSuchCall)),
        ("console ptr outside memory", abi::HC_CONSOLE_WRITE, [mem + 4096, 8, 0, 0, 0, 0], Err(Error::BadAddress)),
        ("console range crossing the end", abi::HC_CONSOLE_WRITE, [mem - 8, 64, 0, 0, 0, 0], Err(Error::BadAddress)),
        ("console huge length", abi::HC_CONSOLE_WRITE, [good, 1 << 40, 0, 0, 0, 0], Err(Error::TooLarge)),
        ("console wrapping range", abi::HC_CONSOLE_WRITE, [u64::MAX - 2, 16, 0, 0, 0, 0], Err(Error::BadAddress)),
        ("console ptr in the morsel window", abi::HC_CONSOLE_WRITE, [info.morsel_window, 8, 0, 0, 0, 0], Err(Error::BadAddress)),
        ("console good line", abi::HC_CONSOLE_WRITE, [good, msg.len() as u64, 0, 0, 0, 0], Ok(msg.len() as u64)),
        ("morsel name with a space", abi::HC_MORSEL_CREATE, create(n, 6), Err(Error::Invalid)),
        ("morsel name with a NUL", abi::HC_MORSEL_CREATE, create(n + 6, 4), Err(Error::Invalid)),
        ("morsel name with a control byte", abi::HC_MORSEL_CREATE, create(n + 10, 5), Err(Error::Invalid)),
        ("morsel name of 33 bytes", abi::HC_MORSEL_CREATE, create(n + 11, 33), Err(Error::Invalid)),
        ("morsel name empty", abi::HC_MORSEL_CREATE, create(n + 11, 0), Err(Error::Invalid)),
    ];
    let mut failures = 0;
    for (what, nr, args, want) in cases {
        let got = call(nr, args);
        let verdict = if got == want { "ok" } else { failures += 1; "WRONG" };
        println!("{what}: got {got:?}, want {want:?}: {verdict}");
    }
    // The calls that mount answer the morsel's size as their status (not 0), the address
    // as their value; `morsel_size` agrees.
    let sz = b"sz-check";
    let (st, gpa) = guest_lib::hypercall::call_raw(abi::HC_MORSEL_CREATE, [sz.as_ptr() as u64, 8, 12288, 0, 0, 0]);
    let size = call(abi::HC_MORSEL_SIZE, [gpa, 0, 0, 0, 0, 0]);
    let (xst, _) = guest_lib::hypercall::call_raw(abi::HC_EXMAP_CREATE, [sz.as_ptr() as u64, 7, 8192, 0, 0, 0]);
    let verdict = if st == 12288 && size == Ok(12288) && xst == 8192 { "ok" } else { failures += 1; "WRONG" };
    println!("mount answers: morsel_create status {st}, morsel_size {size:?}, exmap_create status {xst}: {verdict}");
    println!("garbage hypercalls: {failures} wrong answers");
    if failures == 0 { 0 } else { 1 }
}
