//! Doorbells on morsels, waiting and timers (issue 16): a `Doorbell` on a mount rings every
//! vCPU of the guests that subscribed to the same morsel (the caller's own other vCPUs too,
//! where its guest subscribed); `wait` blocks the calling vCPU until bits arrive (the
//! scheduler does not run a waiting vCPU; the guest's others run on), `sleep` for a time,
//! `timer` raises a virtual interrupt in the calling vCPU later. Bits of all subscribed
//! morsels land in one pending set per vCPU: give each morsel its own bits where a guest
//! listens to several.

use crate::abi::{self, Error};
use crate::hypercall::call;

/// How long `wait` blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// Not at all: take what is pending.
    Poll,
    /// At most this many microseconds (1..=`abi::WAIT_MAX_US`).
    Micros(u64),
    /// Until bits or an interrupt arrive.
    Forever,
}

/// Event bits (a doorbell's payload, `wait`'s mask and result).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event(pub u64);

/// The doorbell of a mounted morsel: its guest-physical address (`MorselRef::addr`,
/// `MorselMut::addr`).
#[derive(Clone, Copy, Debug)]
pub struct Doorbell {
    mount: u64,
}

impl Doorbell {
    /// The doorbell of the morsel mounted at `mount`.
    pub fn new(mount: u64) -> Doorbell {
        Doorbell { mount }
    }

    /// Asks for the bits others ring here; with `vector`, also a virtual interrupt with
    /// that vector (32..=255; install a handler first: `interrupts::set_handler`).
    pub fn subscribe(&self, vector: Option<u8>) -> Result<(), Error> {
        call(abi::HC_NOTIFY_SUBSCRIBE, [self.mount, vector.map_or(0, u64::from), 0, 0, 0, 0]).map(|_| ())
    }

    /// Rings `bits` for every subscriber but the calling vCPU; returns how many guests it
    /// reached (`NoReceiver` if none).
    pub fn ring(&self, bits: Event) -> Result<u64, Error> {
        call(abi::HC_NOTIFY, [self.mount, bits.0, 0, 0, 0, 0])
    }
}

impl Doorbell {
    /// The subscriber's side of "subscribe before the peer rings": subscribes (bits only),
    /// then returns as soon as `ready()` holds, checking it after the subscription and after
    /// every wake-up on `bits`, so a ring that came before the subscription is not lost as
    /// long as the ringer made `ready()` true before it rang. Returns the wake-ups it took.
    pub fn wait_until(&self, bits: Event, mut ready: impl FnMut() -> bool) -> Result<u64, Error> {
        self.subscribe(None)?;
        let mut wakeups = 0;
        while !ready() {
            wait(bits, Timeout::Forever)?;
            wakeups += 1;
        }
        Ok(wakeups)
    }

    /// The ringer's side: rings `bits`; nobody subscribed yet (`NoReceiver`) is no error
    /// here (a later subscriber checks the state before it waits: `wait_until`).
    pub fn announce(&self, bits: Event) -> Result<u64, Error> {
        match self.ring(bits) {
            Err(Error::NoReceiver) => Ok(0),
            other => other,
        }
    }
}

/// Sets `bits` in the calling vCPU's pending set as soon as a morsel or ExMap region named
/// `name` is in the directory: returns true if it is there now (the bits are set already),
/// else false and the bits come when a create enters it (`wait` for them). One watch per
/// vCPU; `Event(0)` cancels it. `morsel::await_name` and `morsel::open_when_created` wrap it.
pub fn watch_name(name: &str, bits: Event) -> Result<bool, Error> {
    call(abi::HC_NAME_WATCH, [name.as_ptr() as u64, name.len() as u64, bits.0, 0, 0, 0]).map(|n| n == 1)
}

/// Blocks until a pending bit in `mask` is set, an interrupt is pending, or `timeout`
/// passed; returns the bits taken (0: timeout or interrupt).
pub fn wait(mask: Event, timeout: Timeout) -> Result<Event, Error> {
    let t = match timeout {
        Timeout::Poll => 0,
        Timeout::Micros(us) => us.max(1),
        Timeout::Forever => abi::WAIT_FOREVER,
    };
    call(abi::HC_WAIT, [mask.0, t, 0, 0, 0, 0]).map(Event)
}

/// Blocks for at least `us` microseconds (1..=`abi::WAIT_MAX_US`).
pub fn sleep(us: u64) -> Result<(), Error> {
    call(abi::HC_SLEEP, [us, 0, 0, 0, 0, 0]).map(|_| ())
}

/// Arms the one-shot timer: a virtual interrupt with `vector` after at least `us`
/// microseconds (a new one replaces it); `cancel_timer` disarms it. For periodic work, arm
/// it again from the handler.
pub fn timer(us: u64, vector: u8) -> Result<(), Error> {
    call(abi::HC_TIMER, [us, vector as u64, 0, 0, 0, 0]).map(|_| ())
}

/// Disarms the one-shot timer.
pub fn cancel_timer() -> Result<(), Error> {
    call(abi::HC_TIMER, [0, 0, 0, 0, 0, 0]).map(|_| ())
}

/// Microseconds since an arbitrary start, from the TSC at the rate the hypervisor measured.
pub fn micros() -> u64 {
    static PER_US: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    let mut per_us = PER_US.load(core::sync::atomic::Ordering::Relaxed);
    if per_us == 0 {
        per_us = crate::info(abi::INFO_TSC_PER_US).unwrap_or(1).max(1);
        PER_US.store(per_us, core::sync::atomic::Ordering::Relaxed);
    }
    // SAFETY: RDTSC has no side effects (not intercepted for guests).
    unsafe { core::arch::x86_64::_rdtsc() / per_us }
}
