//! What the samplers must do beyond matching diffusers step by step: converge with an
//! ideal denoiser, start where ES-DDPM says, keep batches and seeds independent, honour
//! masks, and expose x0.

use esddpm_core::*;

fn linear_schedule(buf: &mut Vec<f64>) -> NoiseSchedule<'_> {
    buf.resize(1000, 0.0);
    NoiseSchedule::new(&ScheduleConfig::default(), buf).unwrap()
}

fn full_chain(buf: &mut Vec<u32>, spec: &str) -> usize {
    let r = Respacing::parse(spec).unwrap();
    buf.resize(r.len(), 0);
    r.fill(1000, buf).unwrap().len()
}

/// The exact MMSE noise prediction when the data is the single image `mu`:
/// `eps = (x - sqrt(abar) mu) / sqrt(1 - abar)`, in the requested parameterization.
fn ideal_model(x: &[f32], mu: &[f32], abar: f64, prediction: PredictionType, out: &mut [f32]) {
    let (a, s) = (abar.sqrt(), (1.0 - abar).sqrt());
    for ((o, &xv), &m) in out.iter_mut().zip(x).zip(mu.iter().cycle()) {
        let (xv, m) = (f64::from(xv), f64::from(m));
        let eps = (xv - a * m) / s;
        *o = match prediction {
            PredictionType::Epsilon => eps,
            PredictionType::Sample => m,
            PredictionType::VPrediction => a * eps - s * m,
        } as f32;
    }
}

/// A non-ideal stand-in whose output depends on x, so the noise matters.
fn smooth_model(x: &[f32], t: u32, out: &mut [f32]) {
    for (o, &xv) in out.iter_mut().zip(x.iter().cycle()) {
        *o = (0.7 * xv + t as f32 / 1000.0).tanh();
    }
}

struct Run {
    x: Vec<f32>,
    x0_trace: Vec<Vec<f32>>,
    calls: usize,
}

#[allow(clippy::too_many_arguments)]
fn run(
    kind: SamplerKind,
    prediction: PredictionType,
    spec: &str,
    start: StartAt,
    init: Option<&[f32]>,
    shape: ImageShape,
    seed: u64,
    offset: u64,
    mu: &[f32],
) -> Run {
    let mut abar = Vec::new();
    let schedule = linear_schedule(&mut abar);
    let mut chain = Vec::new();
    full_chain(&mut chain, spec);
    let config = SamplerConfig {
        kind,
        x0: X0Options {
            prediction_type: prediction,
            ..Default::default()
        },
        set_alpha_to_one: true,
    };
    let mut s = Sampler::new(schedule, &chain, start, config, shape, seed)
        .unwrap()
        .with_image_offset(offset);
    let mut x = vec![0.0; shape.len()];
    s.init(&mut x, init.map_or(Init::Noise, Init::Image))
        .unwrap();
    let mut out = vec![0.0; s.model_output_len()];
    let mut work = vec![0.0; s.workspace_len()];
    let mut calls = 0;
    let mut x0_trace = Vec::new();
    while let Some(call) = s.next_call() {
        if mu.is_empty() {
            smooth_model(&x, call.timestep, &mut out);
        } else {
            ideal_model(
                &x,
                mu,
                schedule.alpha_cumprod(call.timestep as usize),
                prediction,
                &mut out,
            );
        }
        let info = s.step(&mut x, &out, &mut work).unwrap();
        assert_eq!(info.step, calls);
        calls += 1;
        x0_trace.push(s.pred_original_sample(&work).to_vec());
    }
    Run { x, x0_trace, calls }
}

fn template(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 % 13) as f32 / 6.0) - 1.0)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b.iter().cycle())
        .fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

const KINDS: [SamplerKind; 4] = [
    SamplerKind::Ddpm {
        variance_type: VarianceType::FixedSmall,
    },
    SamplerKind::Ddpm {
        variance_type: VarianceType::FixedLarge,
    },
    SamplerKind::Ddim {
        eta: 0.0,
        use_clipped_model_output: false,
    },
    SamplerKind::DpmSolverPlusPlus2M,
];

#[test]
fn every_sampler_converges_to_the_data_with_an_ideal_denoiser() {
    let shape = ImageShape::new(2, 1, 4, 4).unwrap();
    let mu = template(16);
    for kind in KINDS {
        for prediction in [
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ] {
            for spec in ["1000", "100", "ddim10"] {
                let r = run(
                    kind,
                    prediction,
                    spec,
                    StartAt::Full,
                    None,
                    shape,
                    3,
                    0,
                    &mu,
                );
                let err = max_abs_diff(&r.x, &mu);
                // FixedLarge adds sqrt(beta_1) noise at the last noisy step.
                let tol = if matches!(
                    kind,
                    SamplerKind::Ddpm {
                        variance_type: VarianceType::FixedLarge
                    }
                ) {
                    0.1
                } else {
                    1e-3
                };
                assert!(err < tol, "{kind:?} {prediction:?} {spec}: error {err}");
            }
        }
    }
}

#[test]
fn early_stop_from_a_prior_reaches_the_data_in_few_steps() {
    // ES-DDPM: a corrupted prior sample, diffused to T' = 100 and denoised in 100 steps
    // (or 10 DDIM steps), ends on the data.
    let shape = ImageShape::new(1, 1, 4, 4).unwrap();
    let mu = template(16);
    let prior: Vec<f32> = mu
        .iter()
        .enumerate()
        .map(|(i, v)| v + 0.2 * ((i % 3) as f32 - 1.0))
        .collect();
    let prior_err = max_abs_diff(&prior, &mu);
    let es = run(
        KINDS[0],
        PredictionType::Epsilon,
        "1000",
        StartAt::EarlyStop { steps: 100 },
        Some(&prior),
        shape,
        1,
        0,
        &mu,
    );
    assert_eq!(es.calls, 100);
    assert!(max_abs_diff(&es.x, &mu) < 1e-3 && prior_err > 0.19);
    // DDIM: 10 steps over [0, T'].
    let mut chain = Vec::new();
    full_chain(&mut chain, "ddim100");
    let ddim = run(
        KINDS[2],
        PredictionType::Epsilon,
        "ddim100",
        StartAt::Timestep(99),
        Some(&prior),
        shape,
        1,
        0,
        &mu,
    );
    assert_eq!(ddim.calls, 10);
    assert!(max_abs_diff(&ddim.x, &mu) < 1e-3);
}

#[test]
fn es_ddpm_start_indices() {
    let mut abar = Vec::new();
    let schedule = linear_schedule(&mut abar);
    let shape = ImageShape::new(1, 1, 2, 2).unwrap();
    for (spec, k, start) in [
        ("1000", 100, 99),
        ("250", 25, 96),
        ("1000", 1000, 999),
        ("100", 1, 0),
    ] {
        let mut chain = Vec::new();
        full_chain(&mut chain, spec);
        let s = Sampler::new(
            schedule,
            &chain,
            StartAt::EarlyStop { steps: k },
            SamplerConfig::default(),
            shape,
            0,
        )
        .unwrap();
        assert_eq!(s.start_timestep(), start, "{spec} k={k}");
        assert_eq!(s.num_steps(), k);
    }
}

#[test]
fn init_is_the_forward_diffusion_of_the_prior() {
    let mut abar = Vec::new();
    let schedule = linear_schedule(&mut abar);
    let mut chain = Vec::new();
    full_chain(&mut chain, "1000");
    let shape = ImageShape::new(2, 1, 3, 3).unwrap();
    let prior = template(9);
    for k in [1usize, 100, 300, 1000] {
        let mut s = Sampler::new(
            schedule,
            &chain,
            StartAt::EarlyStop { steps: k },
            SamplerConfig::default(),
            shape,
            11,
        )
        .unwrap();
        let mut x = vec![0.0; 18];
        s.init(&mut x, Init::Image(&prior)).unwrap();
        let ab = schedule.alpha_cumprod(k - 1);
        for n in 0..2 {
            let mut eps = [0.0f32; 9];
            NoiseSource::new(11).fill(n as u64, Draw::Start, &mut eps);
            let mut expect = [0.0f32; 9];
            add_noise(&prior, &eps, ab, &mut expect).unwrap();
            assert_eq!(&x[n * 9..(n + 1) * 9], &expect, "k={k} image {n}");
            if k == 1000 {
                // T' = T: within sqrt(abar_999) ~ 0.0064 of pure noise.
                assert!(max_abs_diff(&x[n * 9..(n + 1) * 9], &eps) < 0.0064 * 1.01 + 1e-6);
            }
        }
        // Init::Noise is exactly the noise of the same draw.
        s.init(&mut x, Init::Noise).unwrap();
        let mut eps = [0.0f32; 9];
        NoiseSource::new(11).fill(1, Draw::Start, &mut eps);
        assert_eq!(&x[9..], &eps);
    }
}

#[test]
fn batch_images_equal_single_runs_and_seeds_are_reproducible() {
    let mu: [f32; 0] = []; // the smooth, non-ideal model
    let batch = ImageShape::new(3, 3, 2, 2).unwrap();
    let single = ImageShape::new(1, 3, 2, 2).unwrap();
    let prior: Vec<f32> = template(36).iter().map(|v| v * 0.5).collect();
    for kind in KINDS {
        let b = run(
            kind,
            PredictionType::Epsilon,
            "100",
            StartAt::EarlyStop { steps: 30 },
            Some(&prior),
            batch,
            99,
            0,
            &mu,
        );
        let again = run(
            kind,
            PredictionType::Epsilon,
            "100",
            StartAt::EarlyStop { steps: 30 },
            Some(&prior),
            batch,
            99,
            0,
            &mu,
        );
        assert_eq!(b.x, again.x, "{kind:?}: same seed, same bits");
        for i in 0..3 {
            let one = run(
                kind,
                PredictionType::Epsilon,
                "100",
                StartAt::EarlyStop { steps: 30 },
                Some(&prior[i * 12..(i + 1) * 12]),
                single,
                99,
                i as u64,
                &mu,
            );
            assert_eq!(&b.x[i * 12..(i + 1) * 12], &one.x[..], "{kind:?} image {i}");
        }
        let other = run(
            kind,
            PredictionType::Epsilon,
            "100",
            StartAt::EarlyStop { steps: 30 },
            Some(&prior),
            batch,
            100,
            0,
            &mu,
        );
        assert_ne!(b.x, other.x, "{kind:?}: another seed must differ");
    }
}

#[test]
fn x0_is_exposed_every_step() {
    // With sample prediction and no clipping, x0 is the model output itself; clipped
    // to [-1, 1] otherwise.
    let shape = ImageShape::new(1, 1, 2, 2).unwrap();
    let mu = [3.0f32, -0.5, 0.25, -2.0];
    let r = run(
        KINDS[2],
        PredictionType::Sample,
        "ddim10",
        StartAt::Full,
        None,
        shape,
        5,
        0,
        &mu,
    );
    assert_eq!(r.x0_trace.len(), 10);
    for x0 in &r.x0_trace {
        assert_eq!(x0, &[1.0, -0.5, 0.25, -1.0]);
    }
}

#[test]
fn masked_pixels_come_back_exactly() {
    let mut abar = Vec::new();
    let schedule = linear_schedule(&mut abar);
    let mut chain = Vec::new();
    full_chain(&mut chain, "1000");
    let shape = ImageShape::new(2, 2, 2, 2).unwrap();
    let known: Vec<f32> = (0..8).map(|i| i as f32 / 8.0 - 0.5).collect();
    let keep = [1.0f32, 0.0, 1.0, 0.0]; // one plane, both channels
    let mu = [0.9f32; 8];
    for kind in KINDS {
        let mut s = Sampler::new(
            schedule,
            &chain,
            StartAt::EarlyStop { steps: 200 },
            SamplerConfig {
                kind,
                ..Default::default()
            },
            shape,
            4,
        )
        .unwrap()
        .with_mask(Mask::new(&known, &keep, shape).unwrap())
        .unwrap();
        let mut x = vec![0.0; 16];
        s.init(&mut x, Init::Image(&known)).unwrap();
        let mut out = vec![0.0; 16];
        let mut work = vec![0.0; s.workspace_len()];
        while let Some(call) = s.next_call() {
            ideal_model(
                &x,
                &mu,
                schedule.alpha_cumprod(call.timestep as usize),
                PredictionType::Epsilon,
                &mut out,
            );
            s.step(&mut x, &out, &mut work).unwrap();
            // The preview shows the known pixels too.
            let x0 = s.pred_original_sample(&work);
            assert_eq!(x0[0], known[0]);
        }
        for n in 0..2 {
            for c in 0..2 {
                for (p, &kp) in keep.iter().enumerate() {
                    let j = c * 4 + p;
                    let v = x[n * 8 + j];
                    if kp == 1.0 {
                        assert!(
                            (v - known[j]).abs() < 1e-6,
                            "{kind:?}: kept pixel {j} = {v}"
                        );
                    } else {
                        assert!(
                            (v - 0.9).abs() < 0.05,
                            "{kind:?}: generated pixel {j} = {v}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn ddim_eta_zero_is_deterministic_and_eta_one_is_not() {
    let shape = ImageShape::new(1, 1, 2, 2).unwrap();
    let mu: [f32; 0] = []; // the smooth, non-ideal model
    let prior = [0.0f32; 4];
    let a = |eta, seed| {
        run(
            SamplerKind::Ddim {
                eta,
                use_clipped_model_output: false,
            },
            PredictionType::Epsilon,
            "ddim50",
            StartAt::EarlyStop { steps: 10 },
            Some(&prior),
            shape,
            seed,
            0,
            &mu,
        )
        .x
    };
    // Same start noise (same seed) -> with eta = 0 nothing else is random.
    assert_eq!(a(0.0, 1), a(0.0, 1));
    assert_ne!(a(1.0, 1), a(0.0, 1));
    assert_ne!(a(1.0, 1), a(1.0, 2));
    // eta = 0 reads no step noise at all: any supplied noise gives the seeded result.
    let mut abar = Vec::new();
    let schedule = linear_schedule(&mut abar);
    let mut chain = Vec::new();
    full_chain(&mut chain, "ddim50");
    let kind = SamplerKind::Ddim {
        eta: 0.0,
        use_clipped_model_output: false,
    };
    let config = SamplerConfig {
        kind,
        ..Default::default()
    };
    let make = || {
        Sampler::new(
            schedule,
            &chain,
            StartAt::EarlyStop { steps: 10 },
            config,
            shape,
            1,
        )
        .unwrap()
    };
    let (mut s1, mut s2) = (make(), make());
    let (mut x1, mut x2) = (vec![0.0f32; 4], vec![0.0f32; 4]);
    let mut work = vec![0.0f32; s1.workspace_len()];
    let mut out = [0.0f32; 4];
    s1.init(&mut x1, Init::Image(&prior)).unwrap();
    s2.init(&mut x2, Init::Image(&prior)).unwrap();
    while let Some(call) = s1.next_call() {
        smooth_model(&x1, call.timestep, &mut out);
        s1.step(&mut x1, &out, &mut work).unwrap();
        s2.step_with_noise(&mut x2, &out, &mut work, &[9.0; 4])
            .unwrap();
    }
    assert_eq!(x1, x2);
    assert_eq!(x1, a(0.0, 1));
}

#[test]
fn a_rebuilt_sampler_continues_exactly_from_its_progress() {
    let mut abar = Vec::new();
    let schedule = linear_schedule(&mut abar);
    let mut chain = Vec::new();
    full_chain(&mut chain, "ddim50");
    let shape = ImageShape::new(2, 1, 3, 3).unwrap();
    let prior = template(18);
    for kind in KINDS {
        let config = SamplerConfig {
            kind,
            ..Default::default()
        };
        let make = || {
            Sampler::new(
                schedule,
                &chain,
                StartAt::EarlyStop { steps: 20 },
                config,
                shape,
                8,
            )
            .unwrap()
        };
        let mut out = vec![0.0f32; 18];
        // One sampler all the way.
        let mut a = make();
        let mut xa = vec![0.0f32; 18];
        let mut wa = vec![0.0f32; a.workspace_len()];
        a.init(&mut xa, Init::Image(&prior)).unwrap();
        while a.next_call().is_some() {
            smooth_model(&xa, a.next_call().unwrap().timestep, &mut out);
            a.step(&mut xa, &out, &mut wa).unwrap();
        }
        // A new sampler for every step, carrying only the progress.
        let mut xb = vec![0.0f32; 18];
        let mut wb = vec![0.0f32; wa.len()];
        let mut first = make();
        first.init(&mut xb, Init::Image(&prior)).unwrap();
        let mut progress = first.progress();
        loop {
            let mut s = make();
            s.restore(progress).unwrap();
            let Some(call) = s.next_call() else { break };
            smooth_model(&xb, call.timestep, &mut out);
            s.step(&mut xb, &out, &mut wb).unwrap();
            progress = s.progress();
        }
        assert_eq!(progress.steps_done(), 20);
        assert_eq!(xa, xb, "{kind:?}");
    }
}
