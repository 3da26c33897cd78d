//! Crash-injection points. Every atomic step of an operation is followed by `point()`; in the
//! crate's own test build a thread-local callback runs there (it snapshots the metadata as a
//! crash at that instant would leave it). In every other build `point()` is empty.

#[cfg(all(test, not(loom)))]
mod imp {
    use std::cell::RefCell;

    type Hook = Box<dyn FnMut()>;

    std::thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Installs `f` as this thread's crash hook (`None` removes it).
    pub fn set(f: Option<Hook>) {
        HOOK.with(|h| *h.borrow_mut() = f);
    }

    pub fn point() {
        // Take the hook out while it runs, so it may itself use an allocator (recovery of a
        // snapshot) without re-entering itself.
        let hook = HOOK.with(|h| h.borrow_mut().take());
        if let Some(mut f) = hook {
            f();
            HOOK.with(|h| {
                let mut slot = h.borrow_mut();
                if slot.is_none() {
                    *slot = Some(f);
                }
            });
        }
    }
}

#[cfg(all(test, not(loom)))]
pub use imp::set;

/// A point between two atomic steps where a crash may happen.
#[inline(always)]
pub fn point() {
    #[cfg(all(test, not(loom)))]
    imp::point();
}
