//! Heap allocation that a guest's call may cause, without the allocation panic: stable Rust
//! has no `Box::try_new`, so `TryBox` holds its value in a one-element boxed array, reserved
//! with `try_reserve_exact` (no `unsafe`).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ops::{Deref, DerefMut};

/// A `T` on the heap whose allocation may fail (`try_new`): what a guest makes the hypervisor
/// keep, answered `NoMemory` instead of stopping the machine.
pub struct TryBox<T>(Box<[T; 1]>);

impl<T> TryBox<T> {
    /// Moves `value` to the heap; gives it back if the heap cannot hold it.
    pub fn try_new(value: T) -> Result<Self, T> {
        let mut v = Vec::new();
        if v.try_reserve_exact(1).is_err() {
            return Err(value);
        }
        v.push(value);
        // One element and a capacity of exactly one: `into_boxed_slice` does not reallocate.
        match v.into_boxed_slice().try_into() {
            Ok(b) => Ok(TryBox(b)),
            // Unreachable: the slice has one element.
            Err(b) => {
                let b: Box<[T]> = b;
                match Vec::from(b).pop() {
                    Some(value) => Err(value),
                    None => unreachable!("one element was pushed"),
                }
            }
        }
    }
}

impl<T> Deref for TryBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0[0]
    }
}

impl<T> DerefMut for TryBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    /// Counts its drops.
    struct Tracked<'a>(&'a Cell<u32>, [u64; 64]);

    impl Drop for Tracked<'_> {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn holds_the_value_and_drops_it_once() {
        let drops = Cell::new(0);
        let mut b = TryBox::try_new(Tracked(&drops, [7; 64])).ok().expect("a host heap holds it");
        assert_eq!(b.1[63], 7);
        b.1[0] = 9;
        assert_eq!((b.1[0], b.1[1]), (9, 7), "written through DerefMut, read through Deref");
        assert_eq!(drops.get(), 0);
        drop(b);
        assert_eq!(drops.get(), 1, "dropped once, with the box");
    }

    #[test]
    fn keeps_the_alignment() {
        #[repr(align(128))]
        struct Aligned(u8);
        let b = TryBox::try_new(Aligned(1)).ok().expect("a host heap holds it");
        assert_eq!(&*b as *const Aligned as usize % 128, 0);
        assert_eq!((*b).0, 1);
    }
}
