//! Load-time work on two threads (issue 6, lever 26 in `docs/PERFORMANCE.md`).
//!
//! A start from the plan cache is memory work, one step after another: read the
//! tensors, rearrange the kernels of esddpm's convolutions, pack tract's weights. Each
//! step is many independent pieces (a tensor, a block of kernels, a weight to pack),
//! and the second core had nothing to do but the graph's parse. [`map`] runs such
//! pieces on the calling thread and one scoped thread, each taking the next piece
//! not yet taken, and gives the results in the pieces' order, so what a piece computes
//! does not depend on which thread ran it.
//!
//! It uses at most two threads, whatever the pipeline's thread count (which is the
//! sampling's): the load is short, and the NNEF reader ([`crate::nnef_file`]) already
//! parses on a second thread. On a machine of one core, and for work under
//! [`MIN_BYTES`], it runs everything on the calling thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Below this much memory to go through, the pieces run on the calling thread: a
/// thread's start and join (~30-60 µs on the 2-core VM) would cost more than half
/// the work saves (a pass over memory runs at a few GB/s here).
pub(crate) const MIN_BYTES: usize = 1 << 20;

/// Whether this machine has a second core for the load.
fn two_cores() -> bool {
    static TWO: OnceLock<bool> = OnceLock::new();
    *TWO.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2))
}

/// `f` of every item, in the items' order: on this thread and a second one, each
/// taking the next item not yet taken, when `bytes` (how much memory the whole work
/// goes through) is at least [`MIN_BYTES`] and the machine has two cores; else all on
/// this thread. A panic in `f` is resumed here once both threads are done.
pub(crate) fn map<I: Send, O: Send>(
    items: Vec<I>,
    bytes: usize,
    f: impl Fn(I) -> O + Sync,
) -> Vec<O> {
    if items.len() < 2 || bytes < MIN_BYTES || !two_cores() {
        return items.into_iter().map(f).collect();
    }
    let count = items.len();
    let items: Vec<Mutex<Option<I>>> = items.into_iter().map(|i| Mutex::new(Some(i))).collect();
    let outs: Vec<Mutex<Option<O>>> = (0..count).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(item) = items.get(i) else {
            return;
        };
        let item = lock(item).take().expect("each item is taken once");
        let out = f(item);
        *lock(&outs[i]) = Some(out);
    };
    std::thread::scope(|s| {
        // Where no thread can be started, this one does all the work.
        let _helper = std::thread::Builder::new()
            .name("esddpm-load".into())
            .spawn_scoped(s, work);
        work();
    });
    outs.into_iter()
        .map(|o| {
            o.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every item was mapped")
        })
        .collect()
}

/// `f` on every chunk of `chunk` values of `data` (the last may be shorter), through
/// [`map`].
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(&mut [T]) + Sync,
) {
    let bytes = std::mem::size_of_val(data);
    map(data.chunks_mut(chunk.max(1)).collect(), bytes, f);
}

/// The value behind `m`, also when a panicking thread held it (the panic is resumed
/// by the scope).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_every_result_in_order_on_both_paths() {
        let items: Vec<u64> = (0..1000).collect();
        let want: Vec<u64> = items.iter().map(|i| i * i + 1).collect();
        // Above the threshold (two threads where there are two cores), and below it.
        assert_eq!(map(items.clone(), MIN_BYTES, |i| i * i + 1), want);
        assert_eq!(map(items, 0, |i| i * i + 1), want);
        assert!(map(Vec::<u8>::new(), MIN_BYTES, |i| i).is_empty());
    }

    #[test]
    fn both_threads_take_work_when_there_are_two_cores() {
        if !two_cores() {
            return;
        }
        let main = std::thread::current().id();
        // Each item waits a little, so that the helper has started before they run out.
        let on = map((0..64).collect(), MIN_BYTES, |_: u32| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            std::thread::current().id() == main
        });
        assert!(on.iter().any(|&here| here), "the calling thread took none");
        assert!(on.iter().any(|&here| !here), "the helper took none");
    }

    #[test]
    fn chunks_are_each_seen_once() {
        let mut data: Vec<u32> = (0..(MIN_BYTES as u32)).collect();
        for_each_chunk_mut(&mut data, 1000, |c| c.iter_mut().for_each(|v| *v += 1));
        assert!(data.iter().enumerate().all(|(i, &v)| v == i as u32 + 1));
    }

    #[test]
    fn a_panic_is_resumed_after_both_threads_are_done() {
        let done = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            map((0..32).collect(), MIN_BYTES, |i: u32| {
                if i == 5 {
                    panic!("item 5");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(result.is_err());
        // The panicking thread stops taking items; the other, where there is one,
        // takes the rest.
        if two_cores() {
            assert_eq!(done.load(Ordering::Relaxed), 31);
        }
    }
}
