//! Parity with diffusers 0.42.1 (and improved-diffusion's respacing), on the vectors in
//! `tests/data` made by `tools/reference/make_core_vectors.py`.
//!
//! Tolerances: f64 schedule values agree within 1e-10 relative; f32 sampler outputs
//! within 1e-5 normwise relative (`max |a - b| / max(1, max |ref|)`).

mod common;

use common::*;
use esddpm_core::*;
use serde_json::Value;

const F64_TOL: f64 = 1e-10;
const F32_TOL: f64 = 1e-5;

fn schedule_config(case: &Value, trained: &[f64]) -> ScheduleConfig<'static> {
    // The trained betas slice is leaked per case: tests only.
    let trained: Option<&'static [f64]> = if case["trained_betas"].is_null() {
        None
    } else {
        Some(Box::leak(trained.to_vec().into_boxed_slice()))
    };
    ScheduleConfig {
        num_train_timesteps: usize_of(&case["num_train_timesteps"]),
        beta_start: case["beta_start"].as_f64().unwrap(),
        beta_end: case["beta_end"].as_f64().unwrap(),
        beta_schedule: BetaSchedule::from_name(case["beta_schedule"].as_str().unwrap()).unwrap(),
        trained_betas: trained,
        rescale_betas_zero_snr: case["rescale_betas_zero_snr"].as_bool().unwrap(),
    }
}

#[test]
fn schedules_match_diffusers_f64() {
    let data = load("schedules.json");
    let cases = data["cases"].as_array().unwrap();
    assert!(cases.len() >= 14);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let trained = if case["trained_betas"].is_null() {
            vec![]
        } else {
            f64s(&case["trained_betas"])
        };
        let cfg = schedule_config(case, &trained);
        let t = cfg.num_train_timesteps;
        let mut betas = vec![0.0; t];
        cfg.fill_betas(&mut betas).unwrap();
        let mut abar = vec![0.0; t];
        let schedule = NoiseSchedule::new(&cfg, &mut abar).unwrap();
        let indices: Vec<usize> = u32s(&case["indices"])
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let ref_betas = f64s(&case["betas"]);
        let ref_abar = f64s(&case["alphas_cumprod"]);
        let ref_f32 = f64s(&case["diffusers_f32_alphas_cumprod"]);
        for (k, &i) in indices.iter().enumerate() {
            assert_close_f64(
                betas[i],
                ref_betas[k],
                F64_TOL,
                &format!("{name} beta[{i}]"),
            );
            assert_close_f64(
                schedule.alpha_cumprod(i),
                ref_abar[k],
                F64_TOL,
                &format!("{name} alphas_cumprod[{i}]"),
            );
            // diffusers' own float32 object: equal to f32 precision.
            assert!(
                (schedule.alpha_cumprod(i) - ref_f32[k]).abs() < 2e-6,
                "{name}: f32 alphas_cumprod[{i}] {} vs {}",
                ref_f32[k],
                schedule.alpha_cumprod(i)
            );
        }
        if case.get("posterior_variance").is_some_and(|v| !v.is_null()) {
            let keys = [
                "posterior_variance",
                "posterior_log_variance_clipped",
                "posterior_mean_coef1",
                "posterior_mean_coef2",
            ];
            let refs: Vec<Vec<Value>> = keys
                .iter()
                .map(|k| case[*k].as_array().unwrap().clone())
                .collect();
            for (k, &i) in indices.iter().enumerate() {
                let p = schedule.posterior(i);
                let ours = [
                    p.variance,
                    schedule.posterior_log_variance_clipped(i),
                    p.mean_coef_x0,
                    p.mean_coef_xt,
                ];
                for (j, key) in keys.iter().enumerate() {
                    if let Some(r) = refs[j][k].as_f64() {
                        assert_close_f64(ours[j], r, F64_TOL, &format!("{name} {key}[{i}]"));
                    }
                }
            }
        }
    }
}

#[test]
fn diffusers_spacings_match() {
    let data = load("timesteps.json");
    let cases = data["diffusers"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let spacing = TimestepSpacing::from_name(case["spacing"].as_str().unwrap()).unwrap();
        let t = usize_of(&case["num_train_timesteps"]);
        let n = usize_of(&case["num_inference_steps"]);
        let offset = usize_of(&case["steps_offset"]) as u32;
        let mut buf = vec![0u32; spacing.max_len(n)];
        let expected = u32s(&case["timesteps"]);
        let got = spacing.fill(t, n, offset, &mut buf);
        match got {
            Ok(ts) => assert_eq!(ts, &expected[..], "{case}"),
            // diffusers happily emits timesteps >= T (leading + offset at N = T); we refuse.
            Err(Error::TimestepOutOfRange { .. }) => {
                assert!(expected.iter().any(|&v| v as usize >= t), "{case}")
            }
            Err(e) => panic!("{case}: {e}"),
        }
        // DDIM's set_timesteps gives the same lists.
        assert_eq!(u32s(&case["ddim_timesteps"]), expected);
    }
}

#[test]
fn respacing_matches_improved_diffusion() {
    let data = load("timesteps.json");
    let cases = data["respacing"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let t = usize_of(&case["num_train_timesteps"]);
        let spec = case["spec"].as_str().unwrap();
        let result = Respacing::parse(spec).and_then(|r| {
            let mut buf = vec![0u32; r.len()];
            r.fill(t, &mut buf).map(|ts| ts.to_vec())
        });
        if case.get("error").is_some_and(|e| e.as_bool() == Some(true)) {
            assert!(result.is_err(), "{spec} on T={t} must fail, got {result:?}");
        } else {
            let mut ours = result.unwrap_or_else(|e| panic!("{spec}: {e}"));
            ours.reverse(); // improved-diffusion lists the kept set ascending
            assert_eq!(ours, u32s(&case["timesteps"]), "{spec} on T={t}");
        }
    }
}

#[test]
fn strength_matches_img2img_and_early_stop() {
    let data = load("timesteps.json");
    let cases = data["strength"].as_array().unwrap();
    for case in cases {
        let spacing = TimestepSpacing::from_name(case["spacing"].as_str().unwrap()).unwrap();
        let n = usize_of(&case["num_inference_steps"]);
        let mut buf = vec![0u32; spacing.max_len(n)];
        let t = usize_of(&case["num_train_timesteps"]);
        let chain = match spacing.fill(t, n, usize_of(&case["steps_offset"]) as u32, &mut buf) {
            Ok(chain) => chain,
            // leading + steps_offset at N = T reaches timestep T, which diffusers lets
            // through (and then indexes out of range); we refuse it up front.
            Err(Error::TimestepOutOfRange { timestep, .. }) => {
                assert_eq!(timestep as usize, t, "{case}");
                assert_eq!(n, t, "{case}");
                continue;
            }
            Err(e) => panic!("{case}: {e}"),
        };
        let strength = case["strength"].as_f64().unwrap();
        let expected = u32s(&case["timesteps"]);
        match StartAt::Strength(strength).skip(chain) {
            Ok(skip) => {
                assert_eq!(skip, usize_of(&case["t_start"]), "{case}");
                assert_eq!(&chain[skip..], &expected[..], "{case}");
                // The same run written the ES-DDPM way: k = number of steps.
                let k = chain.len() - skip;
                assert_eq!(StartAt::EarlyStop { steps: k }.skip(chain).unwrap(), skip);
            }
            Err(Error::InvalidStrength(_)) => assert!(expected.is_empty(), "{case}"),
            Err(e) => panic!("{case}: {e}"),
        }
    }
}

fn x0_options(case: &Value) -> X0Options {
    X0Options {
        prediction_type: PredictionType::from_name(case["prediction_type"].as_str().unwrap())
            .unwrap(),
        clip_sample: case["clip_sample"].as_bool().unwrap(),
        clip_sample_range: case["clip_sample_range"].as_f64().unwrap(),
        thresholding: if case["thresholding"].as_bool().unwrap() {
            Some(Thresholding {
                ratio: case["dynamic_thresholding_ratio"].as_f64().unwrap(),
                max_value: case["sample_max_value"].as_f64().unwrap(),
            })
        } else {
            None
        },
    }
}

fn linear_1000() -> Vec<f64> {
    let mut abar = vec![0.0; 1000];
    ScheduleConfig::default()
        .fill_alphas_cumprod(&mut abar)
        .unwrap();
    abar
}

fn shape_of(case: &Value) -> ImageShape {
    let s: Vec<usize> = u32s(&case["shape"])
        .into_iter()
        .map(|v| v as usize)
        .collect();
    ImageShape::new(s[0], s[1], s[2], s[3]).unwrap()
}

/// Runs one step of `kind` at the case's timestep with the case's inputs and noise.
fn run_single_step(
    case: &Value,
    kind: SamplerKind,
    set_alpha_to_one: bool,
) -> (Vec<f32>, Vec<f32>) {
    let abar = linear_1000();
    let schedule = NoiseSchedule::from_alphas_cumprod(&abar).unwrap();
    let chain = u32s(&case["timesteps"]);
    let t = usize_of(&case["timestep"]) as u32;
    let config = SamplerConfig {
        kind,
        x0: x0_options(case),
        set_alpha_to_one,
    };
    let shape = shape_of(case);
    let mut sampler =
        Sampler::new(schedule, &chain, StartAt::Timestep(t), config, shape, 0).unwrap();
    assert_eq!(sampler.start_timestep(), t);
    let mut x = vec![0.0f32; shape.len()];
    sampler.init(&mut x, Init::Noise).unwrap();
    x.copy_from_slice(&f32s(&case["sample"]));
    let out = f32s(&case["model_output"]);
    let noise = f32s(&case["noise"]);
    let noise = if noise.is_empty() {
        vec![0.0; shape.len()]
    } else {
        noise
    };
    let mut work = vec![0.0f32; sampler.workspace_len()];
    sampler
        .step_with_noise(&mut x, &out, &mut work, &noise)
        .unwrap();
    let x0 = sampler.pred_original_sample(&work).to_vec();
    (x, x0)
}

#[test]
fn ddpm_steps_match_diffusers() {
    let cases = load("ddpm_steps.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let variance_type =
            VarianceType::from_name(case["variance_type"].as_str().unwrap()).unwrap();
        let (x, x0) = run_single_step(case, SamplerKind::Ddpm { variance_type }, true);
        let e_x0 = rel_err(&x0, &f64s(&case["pred_original_sample"]));
        let e_x = rel_err(&x, &f64s(&case["prev_sample"]));
        assert!(
            e_x0 < F32_TOL,
            "{name}: pred_original_sample rel err {e_x0:e}"
        );
        assert!(e_x < F32_TOL, "{name}: prev_sample rel err {e_x:e}");
    }
}

#[test]
fn fixed_large_log_equals_fixed_large() {
    // diffusers 0.42 yields NaN for fixed_large_log; GLIDE's max_log is the same std as
    // fixed_large, so the fixed_large vectors are its reference.
    let cases = load("ddpm_steps.json");
    for case in cases.as_array().unwrap() {
        if case["variance_type"] != "fixed_large" {
            continue;
        }
        let kind = SamplerKind::Ddpm {
            variance_type: VarianceType::FixedLargeLog,
        };
        let (x, _) = run_single_step(case, kind, true);
        let e = rel_err(&x, &f64s(&case["prev_sample"]));
        assert!(e < F32_TOL, "{}: {e:e}", case["name"]);
    }
}

#[test]
fn ddim_steps_match_diffusers() {
    let cases = load("ddim_steps.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 14);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let kind = SamplerKind::Ddim {
            eta: case["eta"].as_f64().unwrap(),
            use_clipped_model_output: case["use_clipped_model_output"].as_bool().unwrap(),
        };
        let (x, x0) = run_single_step(case, kind, case["set_alpha_to_one"].as_bool().unwrap());
        let e_x0 = rel_err(&x0, &f64s(&case["pred_original_sample"]));
        let e_x = rel_err(&x, &f64s(&case["prev_sample"]));
        assert!(
            e_x0 < F32_TOL,
            "{name}: pred_original_sample rel err {e_x0:e}"
        );
        assert!(e_x < F32_TOL, "{name}: prev_sample rel err {e_x:e}");
    }
}

#[test]
fn dpm_solver_trajectories_match_diffusers() {
    let cases = load("dpmsolver_trajectories.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5);
    let abar = linear_1000();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let schedule = NoiseSchedule::from_alphas_cumprod(&abar).unwrap();
        let chain = u32s(&case["timesteps"]);
        let config = SamplerConfig {
            kind: SamplerKind::DpmSolverPlusPlus2M,
            x0: X0Options {
                prediction_type: PredictionType::from_name(
                    case["prediction_type"].as_str().unwrap(),
                )
                .unwrap(),
                clip_sample: false,
                ..Default::default()
            },
            set_alpha_to_one: true,
        };
        let shape = shape_of(case);
        let mut sampler = Sampler::new(schedule, &chain, StartAt::Full, config, shape, 0).unwrap();
        let mut x = vec![0.0f32; shape.len()];
        sampler.init(&mut x, Init::Noise).unwrap();
        x.copy_from_slice(&f32s(&case["initial_sample"]));
        let mut work = vec![0.0f32; sampler.workspace_len()];
        for (k, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let call = sampler.next_call().unwrap();
            assert_eq!(
                call.timestep,
                usize_of(&step["timestep"]) as u32,
                "{name} step {k}"
            );
            let out = f32s(&step["model_output"]);
            sampler.step(&mut x, &out, &mut work).unwrap();
            let e = rel_err(&x, &f64s(&step["prev_sample"]));
            assert!(e < F32_TOL, "{name} step {k}: rel err {e:e}");
        }
        assert!(sampler.is_done());
    }
}

#[test]
fn add_noise_matches_diffusers() {
    let data = load("add_noise.json");
    for case in data["cases"].as_array().unwrap() {
        let cfg = ScheduleConfig {
            num_train_timesteps: usize_of(&case["num_train_timesteps"]),
            beta_start: case["beta_start"].as_f64().unwrap(),
            beta_end: case["beta_end"].as_f64().unwrap(),
            beta_schedule: BetaSchedule::from_name(case["beta_schedule"].as_str().unwrap())
                .unwrap(),
            ..Default::default()
        };
        let mut abar = vec![0.0; cfg.num_train_timesteps];
        let schedule = NoiseSchedule::new(&cfg, &mut abar).unwrap();
        let original = f32s(&case["original"]);
        let noise = f32s(&case["noise"]);
        let timesteps = u32s(&case["timesteps"]);
        let per = original.len() / timesteps.len();
        let mut out = vec![0.0f32; original.len()];
        for (i, &t) in timesteps.iter().enumerate() {
            let r = i * per..(i + 1) * per;
            add_noise(
                &original[r.clone()],
                &noise[r.clone()],
                schedule.get(t).unwrap(),
                &mut out[r],
            )
            .unwrap();
        }
        let e = rel_err(&out, &f64s(&case["noisy"]));
        assert!(e < F32_TOL, "{}: {e:e}", case["beta_schedule"]);
    }
}
