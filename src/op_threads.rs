//! Threads for esddpm's own operators at batch 1 (issue 6, lever 9 in
//! `docs/PERFORMANCE.md`).
//!
//! A lone image of a small U-Net runs on tract's single-threaded executor
//! ([`crate::unet::Unet::threads_pay_at_batch_1`]): tract's executor parallelises only
//! its matrix products, and on that U-Net its hand-offs cost more than they gain.
//! esddpm's direct convolutions ([`crate::direct_conv::DirectConv`]) split evenly by
//! blocks of output channels, so [`scope`] lends them the caller's thread pool while
//! tract keeps one thread, and [`for_each`] runs the parts there: the first on the
//! calling thread, the others on the pool.
//!
//! A hand-off to a sleeping pool thread costs its wake-up (tens of µs on the 2-core VM
//! this was measured on), which is as long as the half of a convolution it would take
//! over: measured, two threads were then slower than one. So for the length of a
//! scope (one U-Net call) one other thread of the pool ([`SPINNING_HELPERS`]) is kept
//! awake, spinning, and takes its part as soon as it is handed over. The price is that
//! this thread keeps its core busy for the whole call, also while tract runs its own
//! operators. The parts go over through a slot of esddpm's own that the helper polls,
//! not through rayon's queues: a split cost 0.9-3.7 µs beyond its parts through
//! rayon, 0.4-2.5 µs through the slot (lever 21; `cargo bench --bench unet_forward --
//! split`).
//!
//! [`on_pool`] runs a U-Net call in such a scope from one of the pool's threads, with
//! the helper spinning beside it: for a large U-Net, whose matrix products tract splits
//! itself, and for a small one too (tract on one thread there): handed in from outside
//! the pool, each operator's parts also woke the pool's idle thread, a third thread on
//! two cores (lever 20 in `docs/PERFORMANCE.md`).
//!
//! Outside a scope, [`for_each`] uses tract's current executor (with a large U-Net,
//! the pool tract's matrix products use), without the spinning.

mod handoff;

use handoff::Handoff;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tract_linalg::multithread::{current_tract_executor, Executor};

/// What [`scope`] lends to esddpm's operators on its thread.
struct Lent {
    /// The executor.
    executor: Executor,
    /// How many threads the operators split their work across.
    threads: usize,
    /// The slot the spinning helper polls, when there is one.
    handoff: Option<Arc<Handoff>>,
}

thread_local! {
    /// What [`scope`] lent on this thread, if anything.
    static LENT: RefCell<Option<Lent>> = const { RefCell::new(None) };
}

/// Runs `f` with `executor` lent to esddpm's operators on this thread (tract's own
/// operators keep whatever tract's executor is). Where `executor` is a pool, up to
/// [`SPINNING_HELPERS`] of its threads spin until `f` returns (module docs).
pub fn scope<R>(executor: &Executor, f: impl FnOnce() -> R) -> R {
    let helpers = match executor {
        Executor::MultiThread(pool) => pool.current_num_threads().saturating_sub(1),
        _ => 0,
    }
    .min(SPINNING_HELPERS);
    let handoff = (helpers > 0).then(|| Arc::new(Handoff::default()));
    let previous = LENT.replace(Some(Lent {
        executor: executor.clone(),
        threads: 1 + helpers,
        handoff: handoff.clone(),
    }));
    let awake = Arc::new(AtomicBool::new(true));
    // Inside `on_pool` this thread is one of the pool's: should it pick the helper's
    // job up itself (while waiting in a join), the helper returns at once.
    let owner = rayon::current_thread_index();
    if let (Executor::MultiThread(pool), Some(handoff)) = (executor, &handoff) {
        for _ in 0..helpers {
            let (awake, handoff) = (awake.clone(), handoff.clone());
            pool.spawn(move || {
                if owner.is_some() && rayon::current_thread_index() == owner {
                    return;
                }
                // esddpm's parts as soon as they are posted; tract's rayon jobs (a
                // large U-Net's matrix products) every few polls.
                let mut polls = 0u32;
                while awake.load(Ordering::Acquire) {
                    if handoff.poll() {
                        continue;
                    }
                    polls = polls.wrapping_add(1);
                    if !polls.is_multiple_of(RAYON_EVERY)
                        || rayon::yield_now() != Some(rayon::Yield::Executed)
                    {
                        std::hint::spin_loop();
                    }
                }
            });
        }
    }
    // Restored on the way out, also when `f` unwinds.
    struct Restore(Option<Lent>, Arc<AtomicBool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.1.store(false, Ordering::Release);
            LENT.set(self.0.take());
        }
    }
    let _restore = Restore(previous, awake);
    f()
}

/// Runs `f` on one of `executor`'s pool threads, in a [`scope`] of that pool (lever 10
/// in `docs/PERFORMANCE.md`). tract's matrix products split their work with rayon:
/// called from outside the pool, each one hands its parts to sleeping pool threads and
/// waits, paying a wake-up per product. From inside, the calling thread takes parts
/// itself and the spinning helper takes the others at once. Same bits either way.
/// Without a pool of two or more threads, `f` runs here.
pub fn on_pool<R: Send>(executor: &Executor, f: impl FnOnce() -> R + Send) -> R {
    match executor {
        Executor::MultiThread(pool) if pool.current_num_threads() > 1 => {
            pool.install(|| scope(executor, f))
        }
        _ => f(),
    }
}

/// How many of a lent pool's threads [`scope`] keeps spinning: one, beside the calling
/// thread. Measured on 2 cores only; with more, the other threads stay asleep rather
/// than burn their cores for gains not measured.
pub const SPINNING_HELPERS: usize = 1;

/// The spinning helper looks for tract's rayon jobs once in this many polls of
/// esddpm's hand-over slot (a look at rayon's queues costs more than a poll).
const RAYON_EVERY: u32 = 8;

/// The executor esddpm's operators use here: the one [`scope`] lent, else tract's.
fn executor() -> Executor {
    LENT.with_borrow(|lent| lent.as_ref().map(|l| l.executor.clone()))
        .unwrap_or_else(current_tract_executor)
}

/// How many threads esddpm's operators should split their work across here: in a
/// [`scope`], the calling thread and its spinning helpers; outside one, the size of
/// tract's current pool (1 without one).
pub fn threads() -> usize {
    if let Some(n) = LENT.with_borrow(|lent| lent.as_ref().map(|l| l.threads)) {
        return n;
    }
    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.current_num_threads().max(1),
        _ => 1,
    }
}

/// Calls `f(item)` for each item: in a [`scope`] with a spinning helper, on this
/// thread and the helper through their hand-over slot (lever 21); else at once on
/// the pool where there is one (one task per item), else in order on this thread. `f`
/// must not depend on the order.
pub fn for_each<I>(items: I, f: impl Fn(I::Item) + Sync)
where
    I: IntoIterator,
    I::IntoIter: Send,
    I::Item: Send,
{
    let items = items.into_iter();
    if let Some(handoff) = LENT.with_borrow(|lent| lent.as_ref().and_then(|l| l.handoff.clone())) {
        return handoff.for_each(items, &f);
    }
    match executor() {
        // The first item on this thread, the others handed to the pool meanwhile.
        Executor::MultiThread(pool) => pool.in_place_scope(|s| {
            let f = &f;
            let mut items = items;
            let first = items.next();
            for item in items {
                s.spawn(move |_| f(item));
            }
            if let Some(item) = first {
                f(item);
            }
        }),
        _ => items.for_each(f),
    }
}

/// [`for_each`] for parts that can fail: every part runs, and the first error met is
/// returned.
pub fn try_for_each<I>(
    items: I,
    f: impl Fn(I::Item) -> tract_onnx::prelude::TractResult<()> + Sync,
) -> tract_onnx::prelude::TractResult<()>
where
    I: IntoIterator,
    I::IntoIter: Send,
    I::Item: Send,
{
    let failed = std::sync::OnceLock::new();
    for_each(items, |item| {
        if let Err(e) = f(item) {
            let _ = failed.set(e);
        }
    });
    failed.into_inner().map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::AssertUnwindSafe;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[test]
    fn every_part_runs_once_with_and_without_a_pool() {
        for executor in [Executor::SingleThread, Executor::multithread(2)] {
            let seen = Mutex::new(Vec::new());
            scope(&executor, || {
                for_each(0..5, |p| seen.lock().unwrap().push(p));
            });
            let mut seen = seen.into_inner().unwrap();
            seen.sort();
            assert_eq!(seen, [0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn on_pool_runs_on_the_pool_and_nested_joins_finish() {
        let pool = Executor::multithread(2);
        // Many short joins: the calling pool thread may pick the helper's own job up
        // while it waits in one; that job must return at once rather than spin.
        let (index, sum) = on_pool(&pool, || {
            let mut sum = 0u64;
            for i in 0..2000u64 {
                let (a, b) = rayon::join(|| i, || i + 1);
                sum += a + b;
            }
            (rayon::current_thread_index(), sum)
        });
        assert!(index.is_some(), "f did not run on the pool");
        assert_eq!(sum, 2000 * 2000);
        assert_eq!(
            on_pool(&Executor::SingleThread, rayon::current_thread_index),
            None
        );
        assert_eq!(
            on_pool(&Executor::multithread(1), rayon::current_thread_index),
            None
        );
    }

    /// A part's panic reaches the caller, whichever thread ran the part, and the scope
    /// goes on. Which thread runs which part is up to timing: each case is tried until
    /// the thread it needs ran a part.
    #[test]
    fn a_part_that_panics_panics_the_caller_and_the_scope_goes_on() {
        on_pool(&Executor::multithread(2), || {
            let caller = std::thread::current().id();
            for on_caller in [true, false] {
                let expected = format!("a part on the caller's thread: {on_caller}");
                let seen = (0..500).any(|_| {
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        for_each(0..2, |_| {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            let here = std::thread::current().id() == caller;
                            assert!(here != on_caller, "a part on the caller's thread: {here}");
                        })
                    }));
                    match result {
                        Ok(()) => false,
                        Err(message) => {
                            assert_eq!(message.downcast_ref::<String>(), Some(&expected));
                            true
                        }
                    }
                });
                assert!(
                    seen,
                    "no part panicked (on the caller's thread: {on_caller})"
                );
            }
            // The slot is free again: both threads take parts.
            let ids = Mutex::new(std::collections::HashSet::new());
            for_each(0..64, |_| {
                ids.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(std::time::Duration::from_millis(1));
            });
            assert_eq!(ids.into_inner().unwrap().len(), 2);
        });
    }

    #[test]
    fn a_failing_part_is_an_error_and_the_others_still_run() {
        for executor in [Executor::SingleThread, Executor::multithread(2)] {
            let ran = AtomicUsize::new(0);
            let result = on_pool(&executor, || {
                try_for_each(0..4, |p| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    match p {
                        2 => Err(tract_onnx::prelude::TractError::msg(format!(
                            "part {p} failed"
                        ))),
                        _ => Ok(()),
                    }
                })
            });
            assert_eq!(result.unwrap_err().to_string(), "part 2 failed");
            assert_eq!(ran.into_inner(), 4);
            assert!(on_pool(&executor, || try_for_each(0..4, |_| Ok(()))).is_ok());
        }
    }

    #[test]
    fn a_part_that_splits_its_own_work_finishes() {
        let sum = AtomicUsize::new(0);
        on_pool(&Executor::multithread(2), || {
            for _ in 0..200 {
                for_each(0..3, |p| {
                    for_each(0..3, |q| {
                        sum.fetch_add(10 * p + q, Ordering::Relaxed);
                    })
                });
            }
        });
        assert_eq!(sum.into_inner(), 200 * (10 * 3 * 3 + 3 * 3));
    }

    #[test]
    fn a_larger_pool_is_split_across_the_caller_and_one_spinning_helper() {
        scope(&Executor::multithread(4), || {
            assert_eq!(threads(), 1 + SPINNING_HELPERS)
        });
        scope(&Executor::SingleThread, || assert_eq!(threads(), 1));
    }

    #[test]
    fn a_scope_lends_its_pool_and_gives_it_back() {
        assert_eq!(threads(), 1);
        scope(&Executor::multithread(2), || {
            assert_eq!(threads(), 2);
            let threads_seen = AtomicUsize::new(0);
            let ids = Mutex::new(std::collections::HashSet::new());
            for_each(0..64, |_| {
                threads_seen.fetch_add(1, Ordering::Relaxed);
                ids.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(std::time::Duration::from_millis(1));
            });
            assert_eq!(threads_seen.into_inner(), 64);
            assert!(
                ids.into_inner().unwrap().len() >= 2,
                "one thread did every part"
            );
        });
        assert_eq!(threads(), 1);
    }
}
