//! A device's memory-mapped register window as a safe type: the one place where the drivers
//! (VT-d, edu, NVMe) turn an address into a volatile access.

/// A window of device registers at `base..base + len`.
#[derive(Clone, Copy, Debug)]
pub struct Mmio {
    base: u64,
    len: u64,
}

/// The boot page tables identity-map the first 4 GiB for the life of the program (the
/// firmware's MTRRs make the MMIO hole in it uncached); windows must lie below.
const IDENTITY_MAPPED_END: u64 = 4 << 30;

impl Mmio {
    /// The window, or `None` where it is empty or not below 4 GiB.
    ///
    /// # Safety
    /// `base..base + len` is device register space (a BAR or a fixed MMIO page such as a
    /// VT-d unit's), no memory that Rust owns. With the checks here, any aligned access
    /// inside it is then sound.
    pub unsafe fn new(base: u64, len: u64) -> Option<Mmio> {
        let fits = len > 0 && base.checked_add(len).is_some_and(|end| end <= IDENTITY_MAPPED_END);
        fits.then_some(Mmio { base, len })
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// The address of register `off` of `size` bytes; panics on an access outside the window
    /// or one not aligned to its size (a driver bug, caught before it reaches the bus).
    fn at(&self, off: u64, size: u64) -> u64 {
        assert!(off.is_multiple_of(size) && off.checked_add(size).is_some_and(|end| end <= self.len),
            "MMIO access of {size} bytes at offset {off:#x} misaligned or outside the {:#x}-byte window at {:#x}", self.len, self.base);
        self.base + off
    }

    pub fn read32(&self, off: u64) -> u32 {
        let a = self.at(off, 4);
        // SAFETY: inside the window and aligned (checked by `at`); the window is MMIO (`new`).
        unsafe { (a as *const u32).read_volatile() }
    }

    pub fn write32(&self, off: u64, value: u32) {
        let a = self.at(off, 4);
        // SAFETY: as for read32.
        unsafe { (a as *mut u32).write_volatile(value) }
    }

    /// One 64-bit access (for registers that take them; NVMe's need two 32-bit halves).
    pub fn read64(&self, off: u64) -> u64 {
        let a = self.at(off, 8);
        // SAFETY: as for read32.
        unsafe { (a as *const u64).read_volatile() }
    }

    pub fn write64(&self, off: u64, value: u64) {
        let a = self.at(off, 8);
        // SAFETY: as for read32.
        unsafe { (a as *mut u64).write_volatile(value) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Mmio {
        // SAFETY: never accessed: the tests only compute addresses.
        unsafe { Mmio::new(0xfed9_0000, 0x1000) }.unwrap()
    }

    #[test]
    fn windows_must_lie_below_4_gib() {
        // SAFETY (all): never accessed.
        assert!(unsafe { Mmio::new(0xffff_f000, 0x1000) }.is_some());
        assert!(unsafe { Mmio::new(0xffff_f000, 0x1001) }.is_none());
        assert!(unsafe { Mmio::new(0x1_0000_0000, 0x1000) }.is_none());
        assert!(unsafe { Mmio::new(u64::MAX - 0xfff, 0x1000) }.is_none());
        assert!(unsafe { Mmio::new(0xfed9_0000, 0) }.is_none());
    }

    #[test]
    fn accesses_inside_the_window_resolve() {
        let w = window();
        assert_eq!(w.at(0, 4), 0xfed9_0000);
        assert_eq!(w.at(0xffc, 4), 0xfed9_0ffc);
        assert_eq!(w.at(0xff8, 8), 0xfed9_0ff8);
    }

    #[test]
    #[should_panic(expected = "outside the 0x1000-byte window")]
    fn an_access_past_the_end_panics() {
        window().at(0xffc, 8);
    }

    #[test]
    #[should_panic(expected = "outside the 0x1000-byte window")]
    fn a_misaligned_access_panics() {
        window().at(0x2, 4);
    }

    #[test]
    #[should_panic(expected = "outside the 0x1000-byte window")]
    fn an_offset_that_overflows_panics() {
        window().at(u64::MAX - 3, 4);
    }
}
