//! The sampler maths pinned bit for bit, so that the same seed gives the same image on
//! every platform wherever the model's output is the same: whole runs of each sampler
//! with a stand-in model made of IEEE basic operations (exactly rounded everywhere),
//! hashed over the bits of every value. The hashes are golden values: they were
//! computed on x86_64 and are checked on aarch64 by CI (`.ci/run` runs these tests
//! under qemu-aarch64), so a change in any operation order, in libm, or in the noise
//! shows up as a different hash.
//!
//! The core does its arithmetic in f64 with `libm` (a pure-Rust port of musl's libm,
//! not the platform's), with no fused multiply-add (Rust does not contract `a * b + c`),
//! which is why its results do not depend on the CPU.

use esddpm_core::*;

/// FNV-1a over the bit patterns.
fn fnv(values: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// A stand-in model: basic operations only.
fn model(x: &[f32], t: u32, channels_factor: usize, out: &mut [f32]) {
    let n = x.len();
    for k in 0..channels_factor {
        for (i, o) in out[k * n..(k + 1) * n].iter_mut().enumerate() {
            let v = x[i] * 0.3 - (i % 7) as f32 * 0.05 + t as f32 * 1e-4;
            *o = if k == 0 { v } else { v * 0.5 - 0.25 };
        }
    }
}

fn run(kind: SamplerKind, x0: X0Options, start: StartAt, chain_steps: usize, mask: bool) -> u64 {
    let mut abar = [0.0f64; 1000];
    let config = ScheduleConfig {
        beta_schedule: BetaSchedule::ScaledLinear,
        beta_start: 0.00085,
        beta_end: 0.012,
        ..Default::default()
    };
    let schedule = NoiseSchedule::new(&config, &mut abar).unwrap();
    let mut chain = [0u32; 1000];
    let chain = TimestepSpacing::Leading
        .fill(1000, chain_steps, 1, &mut chain)
        .unwrap();
    let shape = ImageShape::new(2, 3, 4, 5).unwrap();
    let sconfig = SamplerConfig {
        kind,
        x0,
        set_alpha_to_one: false,
    };
    let known: Vec<f32> = (0..shape.image_len())
        .map(|i| (i as f32 * 0.37).fract() * 2.0 - 1.0)
        .collect();
    let keep: Vec<f32> = (0..shape.plane_len()).map(|i| (i % 2) as f32).collect();
    let mut sampler = Sampler::new(schedule, chain, start, sconfig, shape, 20260127)
        .unwrap()
        .with_image_offset(3);
    if mask {
        sampler = sampler
            .with_mask(Mask::new(&known, &keep, shape).unwrap())
            .unwrap();
    }
    let mut x = vec![0.0f32; shape.len()];
    let mut out = vec![0.0f32; sampler.model_output_len()];
    let mut work = vec![0.0f32; sampler.workspace_len()];
    let factor = sampler.model_output_len() / shape.len();
    sampler.init(&mut x, Init::Image(&known)).unwrap();
    let mut all = x.clone();
    while let Some(call) = sampler.next_call() {
        model(&x, call.timestep, factor, &mut out);
        sampler.step(&mut x, &out, &mut work).unwrap();
        all.extend_from_slice(&x);
    }
    fnv(&all)
}

#[test]
fn whole_runs_hash_to_the_golden_values() {
    let eps = X0Options::default();
    let v = X0Options {
        prediction_type: PredictionType::VPrediction,
        clip_sample: false,
        ..Default::default()
    };
    let thresh = X0Options {
        prediction_type: PredictionType::Sample,
        thresholding: Some(Thresholding::default()),
        ..Default::default()
    };
    let cases: [(&str, u64); 7] = [
        (
            "ddpm fixed_small, early stop 25 of 50",
            run(
                SamplerKind::Ddpm {
                    variance_type: VarianceType::FixedSmall,
                },
                eps,
                StartAt::EarlyStop { steps: 25 },
                50,
                false,
            ),
        ),
        (
            "ddpm learned_range, full 30",
            run(
                SamplerKind::Ddpm {
                    variance_type: VarianceType::LearnedRange,
                },
                eps,
                StartAt::Full,
                30,
                false,
            ),
        ),
        (
            "ddpm fixed_large_log, v-prediction, masked",
            run(
                SamplerKind::Ddpm {
                    variance_type: VarianceType::FixedLargeLog,
                },
                v,
                StartAt::Strength(0.6),
                40,
                true,
            ),
        ),
        (
            "ddim eta 0",
            run(
                SamplerKind::Ddim {
                    eta: 0.0,
                    use_clipped_model_output: false,
                },
                eps,
                StartAt::Full,
                20,
                false,
            ),
        ),
        (
            "ddim eta 0.7, clipped model output, thresholding",
            run(
                SamplerKind::Ddim {
                    eta: 0.7,
                    use_clipped_model_output: true,
                },
                thresh,
                StartAt::Timestep(600),
                20,
                false,
            ),
        ),
        (
            "dpm-solver++ 2M",
            run(
                SamplerKind::DpmSolverPlusPlus2M,
                eps,
                StartAt::Full,
                15,
                false,
            ),
        ),
        (
            "dpm-solver++ 2M, v-prediction, masked",
            run(
                SamplerKind::DpmSolverPlusPlus2M,
                v,
                StartAt::EarlyStop { steps: 9 },
                15,
                true,
            ),
        ),
    ];
    for (name, h) in &cases {
        println!("{name}: {h:#018x}");
    }
    let got: Vec<u64> = cases.iter().map(|c| c.1).collect();
    assert_eq!(got, GOLDEN, "see the hashes printed above");
}

/// Computed on x86_64 (AMD EPYC, debug and release builds alike).
const GOLDEN: [u64; 7] = [
    0x0d1b_7aeb_bc51_7902,
    0x2dc1_d056_7314_b0c1,
    0x08f5_4ed4_e2e5_b910,
    0xd331_3589_d01b_0981,
    0x7194_54ed_64cf_e800,
    0xf5cb_541f_353c_e23b,
    0x6ad6_8151_9612_b2ed,
];
