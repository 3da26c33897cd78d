//! A single-producer / single-consumer byte channel on a shared morsel with doorbells (issue
//! 16): the first page holds the producer's `head` and the consumer's `tail` (bytes moved so
//! far, each written by one side only), the rest is the ring. A side that finds the ring full
//! (empty) waits for the other's doorbell bit; bits stay pending until taken, so a ring that
//! comes between the check and the `wait` is not lost.

use crate::abi::Error;
use crate::morsel::{self, MorselMut, PageSize};
use crate::notify::{self, Doorbell, Event, Timeout};
use core::sync::atomic::{AtomicU64, Ordering};

/// Rung by the producer: there is data.
pub const DATA: Event = Event(1 << 0);
/// Rung by the consumer: there is room.
pub const SPACE: Event = Event(1 << 1);
const HEADER: usize = 4096;

/// One end of a channel.
pub struct Channel {
    m: MorselMut,
    bell: Doorbell,
}

impl Channel {
    /// The producer's end: creates the morsel `name` of `size` bytes (a header page and the
    /// ring), shared read-write, and subscribes to the consumer's bit.
    pub fn create(name: &str, size: u64) -> Result<Channel, Error> {
        let m = morsel::create(name, size, PageSize::Size4K, true)?;
        Channel::attach(m)
    }

    /// The consumer's end: opens `name` read-write and subscribes to the producer's bit.
    pub fn open(name: &str) -> Result<Channel, Error> {
        Channel::attach(morsel::open_mut(name)?)
    }

    fn attach(m: MorselMut) -> Result<Channel, Error> {
        if m.len() <= HEADER {
            return Err(Error::Invalid);
        }
        let bell = Doorbell::new(m.addr());
        bell.subscribe(None)?;
        Ok(Channel { m, bell })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: the header page is inside the mount, 8-aligned; both sides use it atomically.
        unsafe { &*(self.m.as_ptr() as *const AtomicU64).add(i) }
    }

    fn capacity(&self) -> u64 {
        (self.m.len() - HEADER) as u64
    }

    /// Rings `bit` for the other side; `NoReceiver` only means it has not subscribed yet (it
    /// looks at the ring before it waits).
    fn ring(&self, bit: Event) -> Result<(), Error> {
        match self.bell.ring(bit) {
            Ok(_) | Err(Error::NoReceiver) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sends all of `data`, waiting for room as needed.
    pub fn send(&mut self, mut data: &[u8]) -> Result<(), Error> {
        let cap = self.capacity();
        while !data.is_empty() {
            let head = self.word(0).load(Ordering::Relaxed);
            let tail = self.word(1).load(Ordering::Acquire);
            let free = cap - (head - tail);
            if free == 0 {
                notify::wait(SPACE, Timeout::Forever)?;
                continue;
            }
            let at = (head % cap) as usize;
            let n = (free as usize).min(data.len()).min(cap as usize - at);
            self.m[HEADER + at..HEADER + at + n].copy_from_slice(&data[..n]);
            self.word(0).store(head + n as u64, Ordering::Release);
            data = &data[n..];
            self.ring(DATA)?;
        }
        Ok(())
    }

    /// Waits until the consumer has read everything sent (before the producer lets go).
    pub fn flush(&mut self) -> Result<(), Error> {
        while self.word(1).load(Ordering::Acquire) != self.word(0).load(Ordering::Relaxed) {
            notify::wait(SPACE, Timeout::Forever)?;
        }
        Ok(())
    }

    /// Receives up to `buf.len()` bytes (at least one), waiting for data as needed.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let cap = self.capacity();
        loop {
            let tail = self.word(1).load(Ordering::Relaxed);
            let head = self.word(0).load(Ordering::Acquire);
            if head == tail {
                notify::wait(DATA, Timeout::Forever)?;
                continue;
            }
            let at = (tail % cap) as usize;
            let n = ((head - tail) as usize).min(buf.len()).min(cap as usize - at);
            buf[..n].copy_from_slice(&self.m[HEADER + at..HEADER + at + n]);
            self.word(1).store(tail + n as u64, Ordering::Release);
            self.ring(SPACE)?;
            return Ok(n);
        }
    }
}
