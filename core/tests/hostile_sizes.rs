//! Sizes that come from callers (config files, the C API) are validated before anything
//! is allocated: found by reviewing the paths the fuzz targets drive (`fuzz/`).

use esddpm_core::*;

#[test]
fn a_huge_training_chain_is_refused_before_any_table_is_allocated() {
    let config = ScheduleConfig {
        num_train_timesteps: usize::MAX / 8,
        ..Default::default()
    };
    // Before the fix this allocated num_train_timesteps f64 values and aborted.
    assert!(matches!(
        config.alphas_cumprod_vec(),
        Err(Error::InvalidParameter {
            name: "num_train_timesteps",
            ..
        })
    ));
    let at_cap = ScheduleConfig {
        num_train_timesteps: MAX_TRAIN_TIMESTEPS,
        ..Default::default()
    };
    assert!(at_cap.validate().is_ok());
    let over = ScheduleConfig {
        num_train_timesteps: MAX_TRAIN_TIMESTEPS + 1,
        ..Default::default()
    };
    assert!(over.validate().is_err());
}

#[test]
fn a_huge_step_count_is_refused_before_the_chain_is_allocated() {
    for spacing in [
        TimestepSpacing::Leading,
        TimestepSpacing::Trailing,
        TimestepSpacing::Linspace,
    ] {
        // Before the fix this allocated `steps` u32 values first.
        let e = spacing.timesteps_vec(1000, usize::MAX / 2, 0).unwrap_err();
        assert!(
            matches!(e, Error::InvalidStepCount { max: 1000, .. }),
            "{e}"
        );
        assert!(matches!(
            spacing.timesteps_vec(0, 10, 0),
            Err(Error::NoTrainTimesteps)
        ));
    }
}

#[test]
fn a_respacing_string_cannot_overflow_or_over_allocate() {
    // The section counts used to be summed with `+` (an overflow panic in debug builds).
    let spec = format!("{m},{m}", m = usize::MAX);
    let r = Respacing::parse(&spec).unwrap();
    assert_eq!(r.len(), usize::MAX);
    assert!(matches!(
        r.timesteps_vec(1000),
        Err(Error::InvalidStepCount { max: 1000, .. })
    ));
    let r = Respacing::parse("999999999").unwrap();
    assert!(matches!(
        r.timesteps_vec(1000),
        Err(Error::InvalidStepCount { max: 1000, .. })
    ));
}

#[test]
fn image_offsets_near_u64_max_wrap_instead_of_overflowing() {
    // Found by `fuzz/run.sh` (target `sampler`): `image_offset + n` overflowed, a panic
    // in debug builds. Stream indices wrap modulo 2^64.
    let mut abar = [0.0f64; 1000];
    let chain: Vec<u32> = (0..10).rev().map(|t| t * 100).collect();
    let shape = ImageShape::new(3, 1, 2, 2).unwrap();
    let mut s = Sampler::new(
        schedule(&mut abar),
        &chain,
        StartAt::Full,
        SamplerConfig::default(),
        shape,
        1,
    )
    .unwrap()
    .with_image_offset(u64::MAX - 1);
    let mut x = vec![0.0f32; shape.len()];
    let mut work = vec![0.0f32; s.workspace_len()];
    let out = vec![0.1f32; s.model_output_len()];
    s.init(&mut x, Init::Noise).unwrap();
    while s.next_call().is_some() {
        s.step(&mut x, &out, &mut work).unwrap();
    }
    // Image 2 of the batch is stream u64::MAX + 1 = 0: image 0 of an offset-0 run.
    let mut first = vec![0.0f32; 4];
    NoiseSource::new(1).fill(0, Draw::Start, &mut first);
    let mut again = vec![0.0f32; shape.len()];
    let mut s2 = Sampler::new(
        schedule(&mut abar),
        &chain,
        StartAt::Full,
        SamplerConfig::default(),
        shape,
        1,
    )
    .unwrap()
    .with_image_offset(u64::MAX - 1);
    s2.init(&mut again, Init::Noise).unwrap();
    assert_eq!(&again[8..12], &first[..]);
    assert!(x.iter().all(|v| v.is_finite()));
}

fn schedule(abar: &mut [f64; 1000]) -> NoiseSchedule<'_> {
    NoiseSchedule::new(&ScheduleConfig::default(), abar).unwrap()
}
