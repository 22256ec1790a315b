//! Every kind of bad input gets its own typed error, never a panic, and a failed step
//! leaves the caller's sample untouched.

use esddpm_core::*;

fn abar() -> Vec<f64> {
    let mut v = vec![0.0; 1000];
    ScheduleConfig::default()
        .fill_alphas_cumprod(&mut v)
        .unwrap();
    v
}

fn chain(n: usize) -> Vec<u32> {
    let mut v = vec![0; n];
    TimestepSpacing::Leading.fill(1000, n, 0, &mut v).unwrap();
    v
}

#[test]
fn schedule_errors() {
    let mut buf = vec![0.0; 1000];
    let bad = |cfg: ScheduleConfig<'_>, buf: &mut [f64]| cfg.fill_alphas_cumprod(buf).unwrap_err();
    let e = bad(
        ScheduleConfig {
            beta_start: 0.02,
            beta_end: 1e-4,
            ..Default::default()
        },
        &mut buf,
    );
    assert!(matches!(e, Error::BetaRange { .. }), "{e}");
    assert!(e.to_string().contains("beta_end"));
    let e = bad(
        ScheduleConfig {
            num_train_timesteps: 0,
            ..Default::default()
        },
        &mut buf,
    );
    assert_eq!(e, Error::NoTrainTimesteps);
    let e = bad(
        ScheduleConfig {
            beta_start: f64::NAN,
            ..Default::default()
        },
        &mut buf,
    );
    assert!(
        matches!(
            e,
            Error::InvalidParameter {
                name: "beta_start",
                ..
            }
        ),
        "{e}"
    );
    let e = bad(
        ScheduleConfig {
            beta_start: 0.0,
            ..Default::default()
        },
        &mut buf,
    );
    assert!(
        matches!(
            e,
            Error::InvalidParameter {
                name: "beta_start",
                ..
            }
        ),
        "{e}"
    );
    let trained = [0.1, 0.2];
    let e = bad(
        ScheduleConfig {
            trained_betas: Some(&trained),
            ..Default::default()
        },
        &mut buf,
    );
    assert_eq!(
        e,
        Error::TrainedBetasLength {
            expected: 1000,
            got: 2
        }
    );
    let trained = [0.1, 1.5, 0.2];
    let e = bad(
        ScheduleConfig {
            num_train_timesteps: 3,
            trained_betas: Some(&trained),
            ..Default::default()
        },
        &mut buf,
    );
    assert!(matches!(e, Error::InvalidBeta { timestep: 1, .. }), "{e}");
    let e = bad(
        ScheduleConfig {
            num_train_timesteps: 1,
            rescale_betas_zero_snr: true,
            ..Default::default()
        },
        &mut buf,
    );
    assert_eq!(e, Error::ZeroSnrNeedsTwoTimesteps);
    let e = ScheduleConfig::default()
        .fill_alphas_cumprod(&mut buf[..10])
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BufferTooSmall {
                needed: 1000,
                got: 10,
                ..
            }
        ),
        "{e}"
    );
    let e = NoiseSchedule::from_alphas_cumprod(&[0.9, 0.95]).unwrap_err();
    assert!(
        matches!(e, Error::InvalidAlphasCumprod { timestep: 1, .. }),
        "{e}"
    );
    let e = NoiseSchedule::from_alphas_cumprod(&[]).unwrap_err();
    assert_eq!(e, Error::NoTrainTimesteps);
    // Schedules of any length from 1 to 4000 (and beyond) work.
    for t in [1usize, 2, 3, 999, 4000, 10_000] {
        let mut b = vec![0.0; t];
        let cfg = ScheduleConfig {
            num_train_timesteps: t,
            ..Default::default()
        };
        let s = NoiseSchedule::new(&cfg, &mut b).unwrap();
        assert!(s.alpha_cumprod(t - 1) > 0.0 && s.alpha_cumprod(t - 1) < 1.0);
    }
}

#[test]
fn spacing_errors() {
    let mut buf = vec![0u32; 2000];
    for n in [0usize, 1001] {
        let e = TimestepSpacing::Linspace
            .fill(1000, n, 0, &mut buf)
            .unwrap_err();
        assert_eq!(
            e,
            Error::InvalidStepCount {
                steps: n,
                max: 1000
            }
        );
    }
    let e = TimestepSpacing::Leading
        .fill(1000, 10, 0, &mut buf[..5])
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BufferTooSmall {
                needed: 10,
                got: 5,
                ..
            }
        ),
        "{e}"
    );
    let e = TimestepSpacing::Leading
        .fill(1000, 1000, 1, &mut buf)
        .unwrap_err();
    assert!(
        matches!(e, Error::TimestepOutOfRange { timestep: 1000, .. }),
        "{e}"
    );
    for spec in ["", "abc", "10,,5", "ddim", "-5", "1.5"] {
        let e = Respacing::parse(spec).unwrap_err();
        assert_eq!(
            e,
            Error::InvalidRespacing(RespacingError::Syntax),
            "{spec:?}"
        );
    }
    let e = Respacing::parse("ddim7")
        .unwrap()
        .fill(10, &mut buf)
        .unwrap_err();
    assert_eq!(
        e,
        Error::InvalidRespacing(RespacingError::NoExactStride { steps: 7 })
    );
    let e = Respacing::parse("11")
        .unwrap()
        .fill(10, &mut buf)
        .unwrap_err();
    assert!(matches!(
        e,
        Error::InvalidRespacing(RespacingError::SectionTooSmall { .. })
    ));
    let e = Respacing::parse("0")
        .unwrap()
        .fill(10, &mut buf)
        .unwrap_err();
    assert_eq!(e, Error::InvalidRespacing(RespacingError::Empty));
    assert!(matches!(
        check_timesteps(&[5, 5, 1], 10),
        Err(Error::TimestepsNotDescending { index: 1 })
    ));
    assert!(matches!(
        check_timesteps(&[10, 5], 10),
        Err(Error::TimestepOutOfRange { timestep: 10, .. })
    ));
    assert!(matches!(
        check_timesteps(&[], 10),
        Err(Error::InvalidStepCount { .. })
    ));
}

#[test]
fn start_errors() {
    let c = chain(50);
    for k in [0usize, 51] {
        assert_eq!(
            StartAt::EarlyStop { steps: k }.skip(&c),
            Err(Error::StartBeyondChain {
                steps: k,
                chain_len: 50
            })
        );
    }
    for s in [0.0, -0.1, 1.5, f64::NAN, 0.01] {
        assert!(
            matches!(
                StartAt::Strength(s).skip(&c),
                Err(Error::InvalidStrength(_))
            ),
            "{s}"
        );
    }
    let c = chain(10); // 900, ..., 0 -- every t >= 0 is fine; use an offset chain
    assert_eq!(StartAt::Timestep(0).skip(&c), Ok(9));
    let mut off = vec![0u32; 10];
    TimestepSpacing::Leading
        .fill(1000, 10, 1, &mut off)
        .unwrap();
    assert_eq!(
        StartAt::Timestep(0).skip(&off),
        Err(Error::StartTimestepBelowChain {
            timestep: 0,
            smallest: 1
        })
    );
}

#[test]
fn sampler_construction_errors() {
    let a = abar();
    let s = NoiseSchedule::from_alphas_cumprod(&a).unwrap();
    let c = chain(50);
    let shape = ImageShape::new(1, 1, 2, 2).unwrap();
    let ddim = |eta| SamplerConfig {
        kind: SamplerKind::Ddim {
            eta,
            use_clipped_model_output: false,
        },
        ..Default::default()
    };
    for eta in [-0.1, f64::NAN, f64::INFINITY] {
        let e = Sampler::new(s, &c, StartAt::Full, ddim(eta), shape, 0).unwrap_err();
        assert!(matches!(e, Error::InvalidEta(_)), "{e}");
    }
    let e = Sampler::new(s, &c, StartAt::EarlyStop { steps: 51 }, ddim(0.0), shape, 0).unwrap_err();
    assert!(matches!(e, Error::StartBeyondChain { .. }));
    let cfg = SamplerConfig {
        x0: X0Options {
            clip_sample_range: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = Sampler::new(s, &c, StartAt::Full, cfg, shape, 0).unwrap_err();
    assert!(matches!(
        e,
        Error::InvalidParameter {
            name: "clip_sample_range",
            ..
        }
    ));
    let cfg = SamplerConfig {
        x0: X0Options {
            thresholding: Some(Thresholding {
                ratio: 1.5,
                max_value: 1.0,
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let e = Sampler::new(s, &c, StartAt::Full, cfg, shape, 0).unwrap_err();
    assert!(matches!(
        e,
        Error::InvalidParameter {
            name: "dynamic_thresholding_ratio",
            ..
        }
    ));
    assert_eq!(ImageShape::new(0, 1, 1, 1), Err(Error::InvalidShape));
    assert_eq!(
        ImageShape::new(usize::MAX, 2, 1, 1),
        Err(Error::InvalidShape)
    );
    let bad_chain = [5u32, 7];
    let e = Sampler::new(
        s,
        &bad_chain,
        StartAt::Full,
        SamplerConfig::default(),
        shape,
        0,
    )
    .unwrap_err();
    assert!(matches!(e, Error::TimestepsNotDescending { index: 1 }));
    // Masks
    let e = Mask::new(&[0.0; 4], &[0.5, 2.0, 0.0, 0.0], shape).unwrap_err();
    assert_eq!(
        e,
        Error::InvalidMask {
            index: 1,
            value: 2.0
        }
    );
    let e = Mask::new(&[0.0; 3], &[1.0; 4], shape).unwrap_err();
    assert!(matches!(
        e,
        Error::BufferLength {
            what: "mask known image",
            ..
        }
    ));
    let e = Mask::new(&[0.0; 4], &[1.0; 3], shape).unwrap_err();
    assert!(matches!(e, Error::BufferLength { what: "mask", .. }));
}

#[test]
fn step_errors_leave_x_untouched() {
    let a = abar();
    let s = NoiseSchedule::from_alphas_cumprod(&a).unwrap();
    let c = chain(10);
    let shape = ImageShape::new(2, 1, 2, 2).unwrap();
    let learned = SamplerConfig {
        kind: SamplerKind::Ddpm {
            variance_type: VarianceType::Learned,
        },
        ..Default::default()
    };
    let mut sampler = Sampler::new(s, &c, StartAt::Full, learned, shape, 0).unwrap();
    let mut x = vec![0.25f32; 8];
    let mut work = vec![0.0f32; sampler.workspace_len()];
    let good = vec![0.1f32; 16];
    // before init
    let e = sampler.step(&mut x, &good, &mut work).unwrap_err();
    assert!(matches!(e, Error::InvalidState(_)), "{e}");
    // init with a wrong-length image
    let e = sampler.init(&mut x, Init::Image(&[0.0; 3])).unwrap_err();
    assert!(matches!(
        e,
        Error::BufferLength {
            what: "init image",
            ..
        }
    ));
    let e = sampler.init(&mut x[..7], Init::Noise).unwrap_err();
    assert!(matches!(e, Error::BufferLength { what: "sample", .. }));
    let e = sampler
        .init(&mut x, Init::Image(&[f32::NAN; 4]))
        .unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }));
    sampler.init(&mut x, Init::Noise).unwrap();
    let snapshot = x.clone();
    type Check = Box<dyn Fn(&Error) -> bool>;
    let cases: Vec<(Vec<f32>, usize, Check)> = vec![
        // model output of C channels where 2C are needed
        (
            vec![0.1; 8],
            work.len(),
            Box::new(|e| {
                matches!(
                    e,
                    Error::BufferLength {
                        what: "model output",
                        expected: 16,
                        got: 8
                    }
                )
            }),
        ),
        // workspace too small
        (
            good.clone(),
            work.len() - 1,
            Box::new(|e| {
                matches!(
                    e,
                    Error::BufferTooSmall {
                        what: "workspace",
                        ..
                    }
                )
            }),
        ),
        // NaN at element 5
        (
            {
                let mut v = good.clone();
                v[5] = f32::NAN;
                v
            },
            work.len(),
            Box::new(|e| {
                matches!(
                    e,
                    Error::NonFiniteModelOutput {
                        step: 0,
                        timestep: 900,
                        index: 5
                    }
                )
            }),
        ),
        // infinity
        (
            {
                let mut v = good.clone();
                v[0] = f32::INFINITY;
                v
            },
            work.len(),
            Box::new(|e| matches!(e, Error::NonFiniteModelOutput { index: 0, .. })),
        ),
        // negative learned variance (second half of image 0: elements 4..8)
        (
            {
                let mut v = good.clone();
                v[6] = -1.0;
                v
            },
            work.len(),
            Box::new(|e| matches!(e, Error::NegativeLearnedVariance { step: 0, index: 6 })),
        ),
    ];
    for (out, wlen, check) in cases {
        let e = sampler.step(&mut x, &out, &mut work[..wlen]).unwrap_err();
        assert!(check(&e), "unexpected error {e:?}");
        assert!(!e.to_string().is_empty());
        assert_eq!(x, snapshot, "x changed on error {e}");
    }
    let e = sampler
        .step_with_noise(&mut x, &good, &mut work, &[0.0; 3])
        .unwrap_err();
    assert!(matches!(e, Error::BufferLength { what: "noise", .. }));
    assert_eq!(x, snapshot);
    // Run to the end, then one step too many; a NaN later in the run names its step.
    for _ in 0..3 {
        sampler.step(&mut x, &good, &mut work).unwrap();
    }
    let mut nan = good.clone();
    nan[1] = f32::NAN;
    let e = sampler.step(&mut x, &nan, &mut work).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NonFiniteModelOutput {
                step: 3,
                timestep: 600,
                index: 1
            }
        ),
        "{e}"
    );
    while sampler.next_call().is_some() {
        sampler.step(&mut x, &good, &mut work).unwrap();
    }
    let e = sampler.step(&mut x, &good, &mut work).unwrap_err();
    assert!(matches!(e, Error::InvalidState(_)), "{e}");
}

#[test]
fn epsilon_at_zero_snr_is_an_error_not_nan() {
    let cfg = ScheduleConfig {
        rescale_betas_zero_snr: true,
        ..Default::default()
    };
    let mut a = vec![0.0; 1000];
    let s = NoiseSchedule::new(&cfg, &mut a).unwrap();
    let mut c = vec![0u32; 10];
    let c = TimestepSpacing::Trailing.fill(1000, 10, 0, &mut c).unwrap();
    assert_eq!(c[0], 999);
    let shape = ImageShape::new(1, 1, 1, 2).unwrap();
    let mut sampler =
        Sampler::new(s, c, StartAt::Full, SamplerConfig::default(), shape, 0).unwrap();
    let mut x = [0.5f32, -0.5];
    let mut work = [0.0f32; 2];
    sampler.init(&mut x, Init::Noise).unwrap();
    let before = x;
    let e = sampler.step(&mut x, &[0.1, 0.2], &mut work).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NonFinitePrediction {
                step: 0,
                timestep: 999
            }
        ),
        "{e}"
    );
    assert_eq!(x, before);
    // v-prediction is fine there.
    let v = SamplerConfig {
        x0: X0Options {
            prediction_type: PredictionType::VPrediction,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut sampler = Sampler::new(s, c, StartAt::Full, v, shape, 0).unwrap();
    sampler.init(&mut x, Init::Noise).unwrap();
    sampler.step(&mut x, &[0.1, 0.2], &mut work).unwrap();
    assert!(x.iter().all(|v| v.is_finite()));
}

#[cfg(feature = "alloc")]
#[test]
fn vec_conveniences_agree_with_buffers() {
    let cfg = ScheduleConfig::default();
    let mut buf = vec![0.0; 1000];
    cfg.fill_alphas_cumprod(&mut buf).unwrap();
    assert_eq!(cfg.alphas_cumprod_vec().unwrap(), buf);
    assert_eq!(cfg.betas_vec().unwrap().len(), 1000);
    assert_eq!(
        TimestepSpacing::Trailing
            .timesteps_vec(1000, 10, 0)
            .unwrap(),
        vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    );
    assert_eq!(
        Respacing::parse("ddim4").unwrap().timesteps_vec(8).unwrap(),
        vec![6, 4, 2, 0]
    );
    assert!(ScheduleConfig {
        num_train_timesteps: 0,
        ..cfg
    }
    .alphas_cumprod_vec()
    .is_err());
}
