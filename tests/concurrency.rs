//! One pipeline shared by threads: what `Send`/`Sync` promise (README, "Threads"),
//! threads generating at once give exactly the sequential bytes, and cancellation from
//! another thread stops a run within one step and leaves the pipeline usable.

use esddpm::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

fn tiny(threads: usize) -> Pipeline {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/models/tiny");
    Pipeline::from_folder(
        dir,
        &LoadOptions {
            threads: Some(threads),
            ..Default::default()
        },
    )
    .unwrap()
}

fn opts(seed: u64, sampler: SamplerChoice) -> GenerateOptions {
    GenerateOptions {
        seed,
        batch: 2,
        start: Start::EarlyStop { t_prime: Some(40) },
        sampler,
        steps: Some(8),
        ..Default::default()
    }
}

/// The compile-time half of the contract, stated once: a pipeline is shared (`Sync`),
/// sessions and images move between threads (`Send`).
#[test]
fn send_and_sync_are_what_the_docs_say() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Pipeline>();
    send_sync::<Images>();
    send_sync::<Error>();
    send::<Session<'static>>();
    send::<GenerateOptions>();
}

#[test]
fn threads_generating_at_once_give_the_sequential_bytes() {
    for tract_threads in [1, 2] {
        let p = tiny(tract_threads);
        let jobs: Vec<GenerateOptions> = (0..8u64)
            .map(|s| {
                let sampler = match s % 3 {
                    0 => SamplerChoice::Ddpm,
                    1 => SamplerChoice::Ddim { eta: 0.5 },
                    _ => SamplerChoice::DpmSolver,
                };
                opts(100 + s, sampler)
            })
            .collect();
        let sequential: Vec<Vec<u32>> =
            jobs.iter().map(|o| bits(&p.generate(o).unwrap())).collect();
        // Eight threads at once, twice, each job also through a step-wise session.
        for round in 0..2 {
            let concurrent: Vec<Vec<u32>> = std::thread::scope(|scope| {
                let handles: Vec<_> = jobs
                    .iter()
                    .enumerate()
                    .map(|(i, o)| {
                        let p = &p;
                        scope.spawn(move || {
                            if (i + round) % 2 == 0 {
                                bits(&p.generate(o).unwrap())
                            } else {
                                let mut s = p.session(o).unwrap();
                                while s.step().unwrap().is_some() {}
                                bits(&s.into_images())
                            }
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(
                concurrent, sequential,
                "tract threads {tract_threads}, round {round}"
            );
        }
    }
}

fn bits(images: &Images) -> Vec<u32> {
    images.data.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn cancelling_from_another_thread_stops_within_one_step() {
    let p = Arc::new(tiny(1));
    let long = GenerateOptions {
        seed: 5,
        start: Start::Noise,
        steps: Some(1000),
        ..Default::default()
    };
    for cancel_after in [1usize, 3, 10] {
        let cancel = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<usize>();
        let worker = {
            let (p, cancel, done, long) = (p.clone(), cancel.clone(), done.clone(), long.clone());
            std::thread::spawn(move || {
                p.generate_with(
                    &long,
                    |progress| {
                        done.store(progress.info.step + 1, Ordering::SeqCst);
                        let _ = tx.send(progress.info.step + 1);
                    },
                    Some(&cancel),
                )
            })
        };
        // Wait for `cancel_after` steps, then cancel from this thread.
        while rx.recv().unwrap() < cancel_after {}
        let at_cancel = done.load(Ordering::SeqCst);
        cancel.store(true, Ordering::SeqCst);
        match worker.join().unwrap() {
            Err(Error::Cancelled { steps_done }) => {
                // The step running when the flag was set may finish; no other does.
                assert!(
                    steps_done >= at_cancel && steps_done <= at_cancel + 1,
                    "cancelled at {at_cancel}, stopped after {steps_done}"
                );
            }
            other => panic!("expected Cancelled, got {other:?}"),
        }
    }
    // The pipeline is usable, and gives what a fresh pipeline gives.
    let o = opts(9, SamplerChoice::Ddpm);
    assert_eq!(
        bits(&p.generate(&o).unwrap()),
        bits(&tiny(1).generate(&o).unwrap())
    );
}
