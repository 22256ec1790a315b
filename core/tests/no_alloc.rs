//! Proves that a whole sampling loop allocates nothing: a counting global allocator
//! wraps the system one, and every sampler kind runs a full ES-DDPM loop (schedule,
//! spacing, start, steps, mask, thresholding) inside the counted window.
//!
//! `harness = false`: this file is its own `main`, so no test-harness thread allocates
//! while the window is open.

use esddpm_core::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: usize = 2 * 3 * 16 * 16;

/// Buffers, allocated before the counted window.
struct Buffers {
    abar: Vec<f64>,
    chain: Vec<u32>,
    prior: Vec<f32>,
    x: Vec<f32>,
    out: Vec<f32>,
    work: Vec<f32>,
    keep: Vec<f32>,
}

fn run(kind: SamplerKind, thresholding: bool, masked: bool, b: &mut Buffers) -> Result<f32> {
    let cfg = ScheduleConfig {
        beta_schedule: BetaSchedule::SquaredcosCapV2,
        ..Default::default()
    };
    let schedule = NoiseSchedule::new(&cfg, &mut b.abar)?;
    let chain = Respacing::parse("250")?.fill(1000, &mut b.chain)?;
    let shape = ImageShape::new(2, 3, 16, 16)?;
    let config = SamplerConfig {
        kind,
        x0: X0Options {
            thresholding: thresholding.then(Thresholding::default),
            ..Default::default()
        },
        set_alpha_to_one: true,
    };
    let mut sampler = Sampler::new(
        schedule,
        chain,
        StartAt::EarlyStop { steps: 25 },
        config,
        shape,
        7,
    )?;
    if masked {
        sampler = sampler.with_mask(Mask::new(&b.prior, &b.keep, shape)?)?;
    }
    sampler.init(&mut b.x, Init::Image(&b.prior))?;
    let out_len = sampler.model_output_len();
    while let Some(call) = sampler.next_call() {
        // Stand-in model: a smooth function of x and t.
        let tt = call.timestep as f32 / 1000.0;
        for (o, &xv) in b.out[..out_len].iter_mut().zip(b.x.iter().cycle()) {
            *o = (0.5 * xv + tt).tanh();
        }
        sampler.step(&mut b.x, &b.out[..out_len], &mut b.work)?;
    }
    Ok(b.x.iter().sum())
}

fn main() {
    let mut b = Buffers {
        abar: vec![0.0; 1000],
        chain: vec![0; 250],
        prior: (0..N).map(|i| ((i % 17) as f32 / 8.0) - 1.0).collect(),
        x: vec![0.0; N],
        out: vec![0.0; 2 * N],
        work: vec![0.0; 3 * N],
        keep: (0..16 * 16)
            .map(|i| if i < 128 { 1.0 } else { 0.0 })
            .collect(),
    };
    let kinds = [
        SamplerKind::Ddpm {
            variance_type: VarianceType::FixedLarge,
        },
        SamplerKind::Ddpm {
            variance_type: VarianceType::LearnedRange,
        },
        SamplerKind::Ddim {
            eta: 0.5,
            use_clipped_model_output: true,
        },
        SamplerKind::DpmSolverPlusPlus2M,
    ];
    let mut runs = 0;
    for kind in kinds {
        for thresholding in [false, true] {
            for masked in [false, true] {
                ALLOCATIONS.store(0, Ordering::SeqCst);
                COUNTING.store(true, Ordering::SeqCst);
                let result = run(kind, thresholding, masked, &mut b);
                COUNTING.store(false, Ordering::SeqCst);
                let sum = result.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
                assert!(sum.is_finite());
                let n = ALLOCATIONS.load(Ordering::SeqCst);
                assert_eq!(
                    n, 0,
                    "{kind:?} thresholding={thresholding} masked={masked}: {n} allocations"
                );
                runs += 1;
            }
        }
    }
    // Sanity: the counter does count.
    COUNTING.store(true, Ordering::SeqCst);
    let v = std::hint::black_box(vec![1u8; 16]);
    COUNTING.store(false, Ordering::SeqCst);
    drop(v);
    assert_eq!(
        ALLOCATIONS.load(Ordering::SeqCst),
        1,
        "the counting allocator is broken"
    );
    println!("no_alloc: {runs} passed, 0 failed");
}
