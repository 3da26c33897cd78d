//! The hypercall instruction: VMCALL on Intel, VMMCALL on AMD, picked once from CPUID.

use crate::abi::Error;
use core::arch::asm;
use core::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const INTEL: u8 = 1;
const AMD: u8 = 2;
static VENDOR: AtomicU8 = AtomicU8::new(UNKNOWN);

fn vendor() -> u8 {
    match VENDOR.load(Ordering::Relaxed) {
        UNKNOWN => {
            // CPUID leaf 0: vendor string in ebx, edx, ecx; "AuthenticAMD" has ebx "Auth".
            let ebx = core::arch::x86_64::__cpuid(0).ebx;
            let v = if ebx == u32::from_le_bytes(*b"Auth") { AMD } else { INTEL };
            VENDOR.store(v, Ordering::Relaxed);
            v
        }
        v => v,
    }
}

/// Issues hypercall `nr` with up to six arguments; returns the value or the error.
pub fn call(nr: u64, args: [u64; 6]) -> Result<u64, Error> {
    let (status, value) = call_raw(nr, args);
    if status >= 0 {
        Ok(value)
    } else {
        Err(Error::from_status(status).unwrap_or(Error::Invalid))
    }
}

/// A call that mounts a morsel (`morsel_create`, `morsel_open`, `exmap_create`): its
/// guest-physical address and size (the hypervisor answers the size as the status).
pub fn call_mount(nr: u64, args: [u64; 6]) -> Result<(u64, u64), Error> {
    let (status, value) = call_raw(nr, args);
    if status >= 0 {
        Ok((value, status as u64))
    } else {
        Err(Error::from_status(status).unwrap_or(Error::Invalid))
    }
}

/// The same, returning the raw status (rax) and value (rdx): for tests that check that the
/// hypervisor answers only with statuses the ABI defines.
pub fn call_raw(nr: u64, args: [u64; 6]) -> (i64, u64) {
    let (status, value): (i64, u64);
    // SAFETY: the hypercall instruction transfers control to the hypervisor, which reads
    // the argument registers and writes rax and rdx only; memory it writes on our behalf
    // is named by pointer arguments the caller passed.
    unsafe {
        if vendor() == AMD {
            asm!("vmmcall", inout("rax") nr as i64 => status, inout("rdi") args[0] => _,
                 inout("rsi") args[1] => _, inout("rdx") args[2] => value, inout("r10") args[3] => _,
                 inout("r8") args[4] => _, inout("r9") args[5] => _, options(nostack));
        } else {
            asm!("vmcall", inout("rax") nr as i64 => status, inout("rdi") args[0] => _,
                 inout("rsi") args[1] => _, inout("rdx") args[2] => value, inout("r10") args[3] => _,
                 inout("r8") args[4] => _, inout("r9") args[5] => _, options(nostack));
        }
    }
    (status, value)
}
