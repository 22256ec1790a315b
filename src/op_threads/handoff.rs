//! The hand-over of an operator's parts to the spinning helper of a
//! [`scope`](super::scope) (lever 21 in `docs/PERFORMANCE.md`).
//!
//! Handed over through rayon (a scope, a spawned job the helper steals from the
//! caller's deque, a latch), a split into two parts cost 0.9-3.7 µs beyond the parts
//! on the 2-core VM this was measured on (`cargo bench --bench unet_forward -- split`,
//! parts of 2-20 µs), a good share of the half of a small U-Net's convolution that the
//! helper takes over; through this slot, 0.4-2.5 µs, less in every case measured.
//!
//! The caller puts its parts in a list on its stack and one pointer to it in a slot
//! ([`Handoff`]) that the helper polls; both threads then take parts from the list by
//! an atomic counter, and the caller waits for the helper only if the helper took the
//! list. The same parts run through the same function either way, so the results are
//! the same bits.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use tract_onnx::prelude::TVec;

/// The slot the caller of a scope posts its parts in and its helper polls.
#[derive(Default)]
pub struct Handoff {
    /// The posted list (a [`Header`] at the start of a [`Parts`]), null when none.
    posted: AtomicPtr<Header>,
}

/// What the helper needs to run a posted list whatever its types.
struct Header {
    /// Takes parts from the list and runs them until none is left.
    run: unsafe fn(*const Header),
    /// Set by the helper, last, when it is done with the list.
    done: AtomicBool,
    /// A panic of a part the helper ran, for the caller to resume.
    panic: UnsafeCell<Option<Box<dyn Any + Send>>>,
}

/// A list of parts on the caller's stack; the header first, so that a pointer to it is
/// one to the list.
#[repr(C)]
struct Parts<'a, T, F> {
    header: Header,
    /// The next part to take.
    next: AtomicUsize,
    /// The parts, each taken once (by the index `next` gave).
    items: TVec<UnsafeCell<Option<T>>>,
    f: &'a F,
}

impl<T: Send, F: Fn(T) + Sync> Parts<'_, T, F> {
    /// Takes parts and runs them until none is left.
    fn run_all(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = self.items.get(i) else {
                return;
            };
            // SAFETY: index `i` was given to this thread alone.
            if let Some(item) = unsafe { (*slot.get()).take() } {
                (self.f)(item);
            }
        }
    }

    /// [`Header::run`] for this list's types.
    ///
    /// # Safety
    /// `header` points to the header of a live `Parts<T, F>`.
    unsafe fn run_erased(header: *const Header) {
        let parts = &*(header as *const Self);
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| parts.run_all())) {
            *parts.header.panic.get() = Some(panic);
        }
    }
}

// SAFETY: the helper reaches a list only through `Handoff`; its parts are `Send` and
// each runs on one thread, `f` is `Sync`, and the header's panic slot is written by the
// helper before `done` and read by the caller after it.
unsafe impl<T: Send, F: Sync> Sync for Parts<'_, T, F> {}

impl Handoff {
    /// Runs `f` on each of `items`: on this thread and, if it polls in time, on the
    /// helper. Returns when every part has run. A part's panic is resumed here, after
    /// the helper is done with the list.
    pub fn for_each<T: Send, F: Fn(T) + Sync>(&self, items: impl Iterator<Item = T>, f: &F) {
        let parts = Parts {
            header: Header {
                run: Parts::<T, F>::run_erased,
                done: AtomicBool::new(false),
                panic: UnsafeCell::new(None),
            },
            next: AtomicUsize::new(0),
            items: items.map(|x| UnsafeCell::new(Some(x))).collect(),
            f,
        };
        let header = &parts.header as *const Header as *mut Header;
        // One part is not worth a hand-over; a part that splits its own work finds the
        // slot taken. Either way the parts run here.
        if parts.items.len() < 2
            || self
                .posted
                .compare_exchange(ptr::null_mut(), header, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            parts.run_all();
            return;
        }
        // Taken back on the way out, also when a part unwinds here: the list must not
        // leave this frame while the helper may read it.
        struct Retract<'h>(&'h Handoff, *mut Header);
        impl Drop for Retract<'_> {
            fn drop(&mut self) {
                let (handoff, header) = (self.0, self.1);
                let retracted = handoff
                    .posted
                    .compare_exchange(header, ptr::null_mut(), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if !retracted {
                    // SAFETY: the helper took the list and sets `done` last.
                    while !unsafe { &*header }.done.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        let retract = Retract(self, header);
        parts.run_all();
        drop(retract);
        if let Some(panic) = parts.header.panic.into_inner() {
            resume_unwind(panic);
        }
    }

    /// The helper's poll: runs a posted list's remaining parts, if there is one.
    /// Returns whether there was.
    pub fn poll(&self) -> bool {
        let header = self.posted.load(Ordering::Acquire);
        if header.is_null()
            || self
                .posted
                .compare_exchange(header, ptr::null_mut(), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        // SAFETY: taken from the slot, the list lives until `done` is set: its caller
        // waits for that before it returns.
        unsafe {
            ((*header).run)(header);
            (*header).done.store(true, Ordering::Release);
        }
        true
    }
}
