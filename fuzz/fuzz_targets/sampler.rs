//! The sampler state machine of `esddpm-core`, driven with arbitrary schedules, chains,
//! starts, sampler configs, masks, init images and model outputs (NaN, infinities and
//! huge values included), in arbitrary call order (init, step, restore, out-of-order
//! steps).
//!
//! Invariants checked: no panic; a failed `step` leaves `x` unchanged (the core's
//! contract); the buffers the core asks for are the lengths it reports.
#![no_main]
use arbitrary::{Arbitrary, Result, Unstructured};
use esddpm_core::*;
use libfuzzer_sys::fuzz_target;

fn f64_any(u: &mut Unstructured<'_>) -> Result<f64> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => f64::from_bits(u64::arbitrary(u)?),
        _ => f64::from(u.int_in_range(0u32..=2000)?) / 1000.0,
    })
}

fn f32_any(u: &mut Unstructured<'_>) -> Result<f32> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 => f32::from_bits(u32::arbitrary(u)?),
        1 => f32::NAN,
        2 => f32::INFINITY,
        _ => f32::from(u.int_in_range(-3000i16..=3000)?) / 1000.0,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    // The training schedule.
    let num_train_timesteps = u.int_in_range(0usize..=1200)?;
    let mut betas = [0.0f64; 64];
    let trained = if u.ratio(1, 8)? {
        let n = num_train_timesteps.min(64);
        for b in betas.iter_mut().take(n) {
            *b = f64_any(u)?;
        }
        Some(&betas[..n])
    } else {
        None
    };
    let config = ScheduleConfig {
        num_train_timesteps,
        beta_start: f64_any(u)?,
        beta_end: f64_any(u)?,
        beta_schedule: *u.choose(&[
            BetaSchedule::Linear,
            BetaSchedule::ScaledLinear,
            BetaSchedule::SquaredcosCapV2,
            BetaSchedule::Sigmoid,
        ])?,
        trained_betas: trained,
        rescale_betas_zero_snr: bool::arbitrary(u)?,
    };
    let mut abar = vec![0.0f64; num_train_timesteps];
    let Ok(schedule) = NoiseSchedule::new(&config, &mut abar) else {
        return Ok(());
    };
    // The chain: a diffusers spacing, a respacing string, or an explicit list.
    let mut chain = vec![0u32; 1201];
    let chain: &[u32] = match u.int_in_range(0u8..=2)? {
        0 => {
            let spacing = *u.choose(&[
                TimestepSpacing::Leading,
                TimestepSpacing::Trailing,
                TimestepSpacing::Linspace,
            ])?;
            let steps = u.int_in_range(0usize..=1200)?;
            let offset = u.int_in_range(0u32..=3)?;
            match spacing.fill(num_train_timesteps, steps, offset, &mut chain) {
                Ok(c) => c,
                Err(_) => return Ok(()),
            }
        }
        1 => {
            let spec: &str = <&str>::arbitrary(u)?;
            let Ok(r) = Respacing::parse(spec) else {
                return Ok(());
            };
            if r.len() > chain.len() {
                return Ok(());
            }
            match r.fill(num_train_timesteps, &mut chain) {
                Ok(c) => c,
                Err(_) => return Ok(()),
            }
        }
        _ => {
            let n = u.int_in_range(0usize..=40)?;
            for v in chain.iter_mut().take(n) {
                *v = u32::arbitrary(u)? % 1300;
            }
            &chain[..n]
        }
    };
    let start = match u.int_in_range(0u8..=3)? {
        0 => StartAt::Full,
        1 => StartAt::EarlyStop {
            steps: u.int_in_range(0usize..=1300)?,
        },
        2 => StartAt::Strength(f64_any(u)?),
        _ => StartAt::Timestep(u32::arbitrary(u)?),
    };
    let variance_type = *u.choose(&[
        VarianceType::FixedSmall,
        VarianceType::FixedSmallLog,
        VarianceType::FixedLarge,
        VarianceType::FixedLargeLog,
        VarianceType::Learned,
        VarianceType::LearnedRange,
    ])?;
    let kind = match u.int_in_range(0u8..=2)? {
        0 => SamplerKind::Ddpm { variance_type },
        1 => SamplerKind::Ddim {
            eta: f64_any(u)?,
            use_clipped_model_output: bool::arbitrary(u)?,
        },
        _ => SamplerKind::DpmSolverPlusPlus2M,
    };
    let sampler_config = SamplerConfig {
        kind,
        x0: X0Options {
            prediction_type: *u.choose(&[
                PredictionType::Epsilon,
                PredictionType::Sample,
                PredictionType::VPrediction,
            ])?,
            clip_sample: bool::arbitrary(u)?,
            clip_sample_range: f64_any(u)?,
            thresholding: if bool::arbitrary(u)? {
                Some(Thresholding {
                    ratio: f64_any(u)?,
                    max_value: f64_any(u)?,
                })
            } else {
                None
            },
        },
        set_alpha_to_one: bool::arbitrary(u)?,
    };
    let shape = ImageShape {
        batch: u.int_in_range(0usize..=3)?,
        channels: u.int_in_range(0usize..=3)?,
        height: u.int_in_range(0usize..=4)?,
        width: u.int_in_range(0usize..=4)?,
    };
    let seed = u64::arbitrary(u)?;
    let Ok(sampler) = Sampler::new(schedule, chain, start, sampler_config, shape, seed) else {
        return Ok(());
    };
    let mut sampler = sampler.with_image_offset(u64::arbitrary(u)?);
    let n = shape.len();
    let known: Vec<f32> = (0..shape.image_len())
        .map(|_| f32_any(u))
        .collect::<Result<_>>()?;
    let keep: Vec<f32> = (0..shape.plane_len())
        .map(|_| f32_any(u))
        .collect::<Result<_>>()?;
    if bool::arbitrary(u)? {
        if let Ok(mask) = Mask::new(&known, &keep, shape) {
            sampler = match sampler.with_mask(mask) {
                Ok(s) => s,
                Err(_) => return Ok(()),
            };
        }
    }
    // Buffer lengths: usually right, sometimes not.
    let pick_len = |u: &mut Unstructured<'_>, right: usize| -> Result<usize> {
        Ok(if u.ratio(1, 10)? {
            u.int_in_range(0usize..=right + 2)?
        } else {
            right
        })
    };
    let mut x = vec![0.0f32; pick_len(u, n)?];
    let mut work = vec![0.0f32; pick_len(u, sampler.workspace_len())?];
    let init_image: Vec<f32> = (0..shape.image_len())
        .map(|_| f32_any(u))
        .collect::<Result<_>>()?;
    // Drive it: a sequence of operations chosen by the input.
    for _ in 0..u.int_in_range(0usize..=64)? {
        match u.int_in_range(0u8..=9)? {
            0 => {
                let _ = sampler.init(&mut x, Init::Noise);
            }
            1 => {
                let _ = sampler.init(&mut x, Init::Image(&init_image));
            }
            2 => {
                let p = SamplerProgress::default();
                let _ = sampler.restore(p);
            }
            _ => {
                let _ = sampler.next_call();
                let len = pick_len(u, sampler.model_output_len())?;
                let mut out = vec![0.0f32; len];
                for v in out.iter_mut() {
                    *v = f32_any(u)?;
                }
                let before = x.clone();
                let r = if u.ratio(1, 6)? {
                    let noise: Vec<f32> = (0..pick_len(u, n)?)
                        .map(|_| f32_any(u))
                        .collect::<Result<_>>()?;
                    sampler.step_with_noise(&mut x, &out, &mut work, &noise)
                } else {
                    sampler.step(&mut x, &out, &mut work)
                };
                if r.is_err() {
                    assert!(
                        before
                            .iter()
                            .zip(&x)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "a failed step wrote to x: {r:?}"
                    );
                }
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
