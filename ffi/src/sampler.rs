//! The sampler-only API, for callers that run the U-Net in their own engine (GPU, NPU):
//! esddpm keeps the schedule, the timesteps and the seeded noise; the caller reads the
//! model input and timestep, runs its model, and hands the output back. Built in every
//! configuration, without tract.
//!
//! ```c
//! esd_sampler_init(s, prior_image, len);          // or NULL for pure noise
//! EsdModelCall call;
//! while (esd_sampler_next(s, &call) == ESD_STATUS_OK && !call.done) {
//!     esd_sampler_sample(s, input, len);           // the model's input x_t
//!     my_unet(input, call.timestep, output);       // the caller's engine
//!     esd_sampler_step(s, output, len);
//! }
//! esd_sampler_sample(s, image, len);              // the result, [-1, 1] (unclipped)
//! ```

use crate::status::{
    guard, guard_void, init_params, memory_limit_or_default, non_null, read_params, slice,
    write_out, CallResult, EsdStatus, Failure,
};
use esddpm_core::{
    BetaSchedule, ImageShape, Init, NoiseSchedule, PredictionType, Sampler, SamplerConfig,
    SamplerKind, SamplerProgress, ScheduleConfig, StartAt, TimestepSpacing, VarianceType,
    X0Options,
};

/// The reverse sampler (`EsdSamplerParams.sampler`, `EsdGenerateParams.sampler`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EsdSamplerKind {
    /// DDPM ancestral sampling with the scheduler's variance type (ES-DDPM's).
    Ddpm = 0,
    /// DDIM with `eta` (0 = deterministic).
    Ddim = 1,
    /// DPM-Solver++(2M), deterministic.
    DpmSolver = 2,
}

/// Where a run starts (`EsdSamplerParams.start`, `EsdGenerateParams.start`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EsdStart {
    /// ES-DDPM: a clean image (the prior's) diffused to `T'` (`t_prime`), then `steps`
    /// reverse steps over `[0, T')`.
    EarlyStop = 0,
    /// img2img: `steps` steps over the whole chain, the last `floor(steps * strength)`
    /// of which run.
    Strength = 1,
    /// Pure noise over the whole chain (the plain DDPM baseline).
    Noise = 2,
}

/// `beta_schedule` of diffusers.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EsdBetaSchedule {
    /// `linear`.
    Linear = 0,
    /// `scaled_linear`.
    ScaledLinear = 1,
    /// `squaredcos_cap_v2` (cosine).
    SquaredcosCapV2 = 2,
    /// `sigmoid`.
    Sigmoid = 3,
}

/// `variance_type` of diffusers.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EsdVarianceType {
    /// `fixed_small`.
    FixedSmall = 0,
    /// `fixed_small_log`.
    FixedSmallLog = 1,
    /// `fixed_large`.
    FixedLarge = 2,
    /// `fixed_large_log`.
    FixedLargeLog = 3,
    /// `learned` (the model outputs 2C channels).
    Learned = 4,
    /// `learned_range` (the model outputs 2C channels).
    LearnedRange = 5,
}

/// `prediction_type` of diffusers.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EsdPredictionType {
    /// `epsilon`.
    Epsilon = 0,
    /// `sample`.
    Sample = 1,
    /// `v_prediction`.
    VPrediction = 2,
}

/// `timestep_spacing` of diffusers.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EsdTimestepSpacing {
    /// `leading`.
    Leading = 0,
    /// `trailing`.
    Trailing = 1,
    /// `linspace`.
    Linspace = 2,
}

/// The noise schedule and the model's conventions: the keys of diffusers'
/// `scheduler_config.json`. Fill with `esd_scheduler_params_init` (diffusers'
/// `DDPMScheduler` defaults), then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EsdSchedulerParams {
    /// `sizeof(EsdSchedulerParams)`, set by the init function.
    pub struct_size: u32,
    /// `num_train_timesteps` (T).
    pub num_train_timesteps: u32,
    /// `beta_start`.
    pub beta_start: f64,
    /// `beta_end`.
    pub beta_end: f64,
    /// `beta_schedule`, an `EsdBetaSchedule`.
    pub beta_schedule: u32,
    /// `variance_type`, an `EsdVarianceType`.
    pub variance_type: u32,
    /// `prediction_type`, an `EsdPredictionType`.
    pub prediction_type: u32,
    /// `clip_sample` (0 or 1).
    pub clip_sample: u32,
    /// `clip_sample_range`.
    pub clip_sample_range: f64,
    /// `timestep_spacing`, an `EsdTimestepSpacing`.
    pub timestep_spacing: u32,
    /// `steps_offset`.
    pub steps_offset: u32,
    /// `set_alpha_to_one` (0 or 1).
    pub set_alpha_to_one: u32,
    /// `rescale_betas_zero_snr` (0 or 1).
    pub rescale_betas_zero_snr: u32,
}

impl Default for EsdSchedulerParams {
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: EsdBetaSchedule::Linear as u32,
            variance_type: EsdVarianceType::FixedSmall as u32,
            prediction_type: EsdPredictionType::Epsilon as u32,
            clip_sample: 1,
            clip_sample_range: 1.0,
            timestep_spacing: EsdTimestepSpacing::Leading as u32,
            steps_offset: 0,
            set_alpha_to_one: 1,
            rescale_betas_zero_snr: 0,
        }
    }
}

/// One run of the sampler-only API. Fill with `esd_sampler_params_init`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EsdSamplerParams {
    /// `sizeof(EsdSamplerParams)`, set by the init function.
    pub struct_size: u32,
    /// An `EsdSamplerKind` (default DDPM).
    pub sampler: u32,
    /// An `EsdStart` (default early stop).
    pub start: u32,
    /// `T'` of an early-stop start (default 100).
    pub t_prime: u32,
    /// Reverse steps (model calls); 0 = the default: `T'` for DDPM, `min(T', 10)` for
    /// DDIM/DPM-Solver from an early stop; T (DDPM) or 50 over the whole chain.
    pub steps: u32,
    /// img2img strength in (0, 1] for `ESD_START_STRENGTH`.
    pub strength: f64,
    /// DDIM's eta.
    pub eta: f64,
    /// Seed of all noise.
    pub seed: u64,
    /// Index of the first image of the batch in the seed's stream (image `i` of a batch
    /// equals image 0 of a run with `first_image = i`).
    pub first_image: u64,
    /// Images in the batch.
    pub batch: u32,
    /// Channels of one image.
    pub channels: u32,
    /// Height.
    pub height: u32,
    /// Width.
    pub width: u32,
    /// The most memory, in bytes, the sampler's buffers and tables may take (checked
    /// before allocating; over it -> `ESD_STATUS_MEMORY_LIMIT`). 0 = the default,
    /// 4 GiB; `UINT64_MAX` = no limit.
    pub memory_limit: u64,
}

impl Default for EsdSamplerParams {
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            sampler: EsdSamplerKind::Ddpm as u32,
            start: EsdStart::EarlyStop as u32,
            t_prime: 100,
            steps: 0,
            strength: 0.5,
            eta: 0.0,
            seed: 0,
            first_image: 0,
            batch: 1,
            channels: 1,
            height: 32,
            width: 32,
            memory_limit: 0,
        }
    }
}

/// The next model call of a sampler run.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EsdModelCall {
    /// 1 when the run is finished (no call is due; the other fields are 0).
    pub done: u32,
    /// Index of this step in the run (0 = first).
    pub step: u32,
    /// Steps (model calls) in the whole run.
    pub total: u32,
    /// The training timestep to give the model.
    pub timestep: u32,
}

/// What defines a run: the storage the core sampler borrows.
struct RunSpec {
    alphas_cumprod: Vec<f64>,
    chain: Vec<u32>,
    start: StartAt,
    config: SamplerConfig,
    shape: ImageShape,
    seed: u64,
    first_image: u64,
}

impl RunSpec {
    /// The core sampler at `progress`, rebuilt over this storage (allocation-free).
    fn sampler(&self, progress: SamplerProgress) -> Result<Sampler<'_>, Failure> {
        let schedule = NoiseSchedule::from_alphas_cumprod(&self.alphas_cumprod)?;
        let mut s = Sampler::new(
            schedule,
            &self.chain,
            self.start,
            self.config,
            self.shape,
            self.seed,
        )?
        .with_image_offset(self.first_image);
        s.restore(progress)?;
        Ok(s)
    }
}

/// A sampler run (opaque).
pub struct EsdSampler {
    spec: RunSpec,
    x: Vec<f32>,
    work: Vec<f32>,
    output_len: usize,
    progress: SamplerProgress,
    initialised: bool,
    from_noise: bool,
}

fn pick<T: Copy>(value: u32, options: &[T], name: &str) -> Result<T, Failure> {
    options.get(value as usize).copied().ok_or_else(|| {
        Failure::invalid(format!(
            "{name} = {value} is not one of 0..{}",
            options.len()
        ))
    })
}

fn flag(value: u32, name: &str) -> Result<bool, Failure> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(Failure::invalid(format!("{name} = {v}; expected 0 or 1"))),
    }
}

/// The `EsdSamplerKind` of a `uint32_t` field (an error for an unknown value).
pub(crate) fn sampler_of(value: u32) -> Result<EsdSamplerKind, Failure> {
    use EsdSamplerKind::*;
    pick(value, &[Ddpm, Ddim, DpmSolver], "sampler")
}

/// The `EsdStart` of a `uint32_t` field (an error for an unknown value).
pub(crate) fn start_of(value: u32) -> Result<EsdStart, Failure> {
    use EsdStart::*;
    pick(value, &[EarlyStop, Strength, Noise], "start")
}

/// The core sampler kind, with the variance type for DDPM.
fn sampler_kind(sampler: EsdSamplerKind, eta: f64, variance_type: VarianceType) -> SamplerKind {
    match sampler {
        EsdSamplerKind::Ddpm => SamplerKind::Ddpm { variance_type },
        EsdSamplerKind::Ddim => SamplerKind::Ddim {
            eta,
            use_clipped_model_output: false,
        },
        EsdSamplerKind::DpmSolver => SamplerKind::DpmSolverPlusPlus2M,
    }
}

impl EsdSampler {
    fn new(sp: &EsdSchedulerParams, p: &EsdSamplerParams) -> Result<Self, Failure> {
        let t = sp.num_train_timesteps as usize;
        let beta_schedule = pick(
            sp.beta_schedule,
            &[
                BetaSchedule::Linear,
                BetaSchedule::ScaledLinear,
                BetaSchedule::SquaredcosCapV2,
                BetaSchedule::Sigmoid,
            ],
            "beta_schedule",
        )?;
        let variance_type = pick(
            sp.variance_type,
            &[
                VarianceType::FixedSmall,
                VarianceType::FixedSmallLog,
                VarianceType::FixedLarge,
                VarianceType::FixedLargeLog,
                VarianceType::Learned,
                VarianceType::LearnedRange,
            ],
            "variance_type",
        )?;
        let prediction_type = pick(
            sp.prediction_type,
            &[
                PredictionType::Epsilon,
                PredictionType::Sample,
                PredictionType::VPrediction,
            ],
            "prediction_type",
        )?;
        let spacing = pick(
            sp.timestep_spacing,
            &[
                TimestepSpacing::Leading,
                TimestepSpacing::Trailing,
                TimestepSpacing::Linspace,
            ],
            "timestep_spacing",
        )?;
        let alphas_cumprod = ScheduleConfig {
            num_train_timesteps: t,
            beta_start: sp.beta_start,
            beta_end: sp.beta_end,
            beta_schedule,
            trained_betas: None,
            rescale_betas_zero_snr: flag(sp.rescale_betas_zero_snr, "rescale_betas_zero_snr")?,
        }
        .alphas_cumprod_vec()?;
        let kind = sampler_kind(sampler_of(p.sampler)?, p.eta, variance_type);
        let ddpm = matches!(kind, SamplerKind::Ddpm { .. });
        let start_kind = start_of(p.start)?;
        let steps = p.steps as usize;
        let (chain, start) = match start_kind {
            EsdStart::EarlyStop => {
                let tp = p.t_prime as usize;
                if tp == 0 || tp > t {
                    return Err(Failure::invalid(format!(
                        "t_prime = {tp} must be in 1..={t}"
                    )));
                }
                let steps = if steps == 0 {
                    if ddpm {
                        tp
                    } else {
                        tp.min(10)
                    }
                } else {
                    steps
                };
                if steps > tp {
                    return Err(Failure::invalid(format!(
                        "{steps} steps over [0, {tp}): at most {tp}"
                    )));
                }
                (
                    TimestepSpacing::Linspace.timesteps_vec(tp, steps, 0)?,
                    StartAt::Full,
                )
            }
            EsdStart::Strength | EsdStart::Noise => {
                let steps = if steps == 0 {
                    if ddpm {
                        t
                    } else {
                        50.min(t)
                    }
                } else {
                    steps
                };
                let chain = spacing.timesteps_vec(t, steps, sp.steps_offset)?;
                let start = if start_kind == EsdStart::Strength {
                    StartAt::Strength(p.strength)
                } else {
                    StartAt::Full
                };
                (chain, start)
            }
        };
        let shape = ImageShape::new(
            p.batch as usize,
            p.channels as usize,
            p.height as usize,
            p.width as usize,
        )?;
        // The buffers this sampler will hold (sample, workspace of up to 2 samples and
        // an image, the caller's model output of up to 2C channels) and its tables,
        // checked before any is allocated.
        let limit = memory_limit_or_default(p.memory_limit);
        let needed = (shape.len() as u128 * 6 + shape.image_len() as u128) * 4
            + alphas_cumprod.len() as u128 * 8
            + chain.len() as u128 * 4;
        if needed > u128::from(limit) {
            return Err(Failure::new(
                EsdStatus::MemoryLimit,
                format!(
                    "a sampler for {}x{}x{}x{} needs about {needed} bytes, over the memory limit of {limit} bytes (memory_limit)",
                    shape.batch, shape.channels, shape.height, shape.width
                ),
            ));
        }
        let config = SamplerConfig {
            kind,
            x0: X0Options {
                prediction_type,
                clip_sample: flag(sp.clip_sample, "clip_sample")?,
                clip_sample_range: sp.clip_sample_range,
                thresholding: None,
            },
            set_alpha_to_one: flag(sp.set_alpha_to_one, "set_alpha_to_one")?,
        };
        let mut s = Self {
            spec: RunSpec {
                alphas_cumprod,
                chain,
                start,
                config,
                shape,
                seed: p.seed,
                first_image: p.first_image,
            },
            x: vec![0.0; shape.len()],
            work: Vec::new(),
            output_len: 0,
            progress: SamplerProgress::default(),
            initialised: false,
            from_noise: start_kind == EsdStart::Noise,
        };
        let sampler = s.spec.sampler(SamplerProgress::default())?;
        s.work = vec![0.0; sampler.workspace_len()];
        s.output_len = sampler.model_output_len();
        Ok(s)
    }

    fn require_init(&self) -> CallResult {
        if self.initialised {
            Ok(())
        } else {
            Err(Failure::new(
                EsdStatus::InvalidState,
                "call esd_sampler_init first",
            ))
        }
    }
}

/// Fills `params` with diffusers' `DDPMScheduler` defaults (T = 1000, linear betas
/// 1e-4..0.02, fixed_small, epsilon, clip_sample 1 in [-1, 1], leading spacing).
///
/// # Safety
/// `params` must be NULL or point to a writable `EsdSchedulerParams`.
#[no_mangle]
pub unsafe extern "C" fn esd_scheduler_params_init(params: *mut EsdSchedulerParams) -> EsdStatus {
    init_params(params)
}

/// Fills `params` with the defaults: DDPM, early stop at T' = 100 (100 steps), seed 0,
/// one 1x32x32 image.
///
/// # Safety
/// `params` must be NULL or point to a writable `EsdSamplerParams`.
#[no_mangle]
pub unsafe extern "C" fn esd_sampler_params_init(params: *mut EsdSamplerParams) -> EsdStatus {
    init_params(params)
}

/// Creates a sampler run. `*out` is set only on success; free it with
/// `esd_sampler_free`.
///
/// # Safety
/// The params must be valid (or NULL for the defaults); `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn esd_sampler_new(
    scheduler: *const EsdSchedulerParams,
    params: *const EsdSamplerParams,
    out: *mut *mut EsdSampler,
) -> EsdStatus {
    guard(|| {
        non_null(out, "out")?;
        let size = std::mem::size_of::<EsdSchedulerParams>();
        let sp = read_params(scheduler, EsdSchedulerParams::default(), size, "scheduler")?;
        // Callers built before memory_limit existed pass the shorter struct.
        let size = std::mem::offset_of!(EsdSamplerParams, memory_limit);
        let p = read_params(params, EsdSamplerParams::default(), size, "params")?;
        let s = EsdSampler::new(&sp, &p)?;
        out.write(Box::into_raw(Box::new(s)));
        Ok(())
    })
}

/// Frees a sampler (NULL is ignored).
///
/// # Safety
/// `sampler` must be NULL or from `esd_sampler_new`, freed once.
#[no_mangle]
pub unsafe extern "C" fn esd_sampler_free(sampler: *mut EsdSampler) {
    guard_void(|| {
        if !sampler.is_null() {
            drop(Box::from_raw(sampler));
        }
    })
}

/// The lengths (in floats) of the sample (the model's input, and the result) and of
/// the model output the sampler expects (2C channels for learned variances).
///
/// # Safety
/// `sampler` must be valid; the outputs writable.
#[no_mangle]
pub unsafe extern "C" fn esd_sampler_lengths(
    sampler: *const EsdSampler,
    sample_len: *mut usize,
    model_output_len: *mut usize,
) -> EsdStatus {
    guard(|| {
        non_null(sampler, "sampler")?;
        non_null(sample_len, "sample_len")?;
        non_null(model_output_len, "model_output_len")?;
        let s = &*sampler;
        sample_len.write(s.x.len());
        model_output_len.write(s.output_len);
        Ok(())
    })
}

/// Starts the run: from `image` (`len` floats in [-1, 1]: one image for the whole batch,
/// or the batch; the prior's sample for ES-DDPM, the input for img2img), diffused to the
/// start with the seeded noise, or from pure noise when `image` is NULL (required for
/// `ESD_START_NOISE`). May be called again to restart.
///
/// # Safety
/// `sampler` must be valid; `image` NULL or `len` readable floats.
#[no_mangle]
pub unsafe extern "C" fn esd_sampler_init(
    sampler: *mut EsdSampler,
    image: *const f32,
    len: usize,
) -> EsdStatus {
    guard(|| {
        non_null(sampler, "sampler")?;
        let s = &mut *sampler;
        if s.from_noise && !image.is_null() {
            return Err(Failure::invalid(
                "a run from pure noise (ESD_START_NOISE) takes no image; pass NULL",
            ));
        }
        let init = if image.is_null() {
            Init::Noise
        } else {
            Init::Image(slice(image, len, "image")?)
        };
        let mut core = s.spec.sampler(SamplerProgress::default())?;
        // The core writes x only on success.
        core.init(&mut s.x, init)?;
        s.progress = core.progress();
        s.initialised = true;
        Ok(())
    })
}

/// The next model call: its timestep, or `done = 1` when the run is finished.
///
/// # Safety
/// `sampler` must be valid; `call` writable.
#[no_mangle]
pub unsafe extern "C" fn esd_sampler_next(
    sampler: *const EsdSampler,
    call: *mut EsdModelCall,
) -> EsdStatus {
    guard(|| {
        non_null(sampler, "sampler")?;
        non_null(call, "call")?;
        let s = &*sampler;
        s.require_init()?;
        let core = s.spec.sampler(s.progress)?;
        let c = match core.next_call() {
            None => EsdModelCall {
                done: 1,
                total: core.num_steps() as u32,
                ..Default::default()
            },
            Some(c) => EsdModelCall {
                done: 0,
                step: c.step as u32,
                total: core.num_steps() as u32,
                timestep: c.timestep,
            },
        };
        call.write(c);
        Ok(())
    })
}

/// Copies the current sample `x_t` (the next model input; after the last step, the
/// result) into `out` (`esd_sampler_lengths`' sample_len floats, NCHW).
///
/// # Safety
/// `sampler` must be valid; `out` must hold `len` floats.
#[no_mangle]
pub unsafe extern "C" fn esd_sampler_sample(
    sampler: *const EsdSampler,
    out: *mut f32,
    len: usize,
) -> EsdStatus {
    guard(|| {
        non_null(sampler, "sampler")?;
        let s = &*sampler;
        s.require_init()?;
        write_out(&s.x, out, len, "out")
    })
}

/// Takes the model's output for the current call (`model_output_len` floats) and
/// steps the sample to the next timestep. On failure (a NaN in the output, a wrong
/// length) the run is unchanged.
///
/// # Safety
/// `sampler` must be valid; `model_output` must hold `len` floats.
#[no_mangle]
pub unsafe extern "C" fn esd_sampler_step(
    sampler: *mut EsdSampler,
    model_output: *const f32,
    len: usize,
) -> EsdStatus {
    guard(|| {
        non_null(sampler, "sampler")?;
        non_null(model_output, "model_output")?;
        let s = &mut *sampler;
        s.require_init()?;
        let out = slice(model_output, len, "model_output")?;
        if len != s.output_len {
            return Err(Failure::invalid(format!(
                "model_output has {len} floats; expected {}",
                s.output_len
            )));
        }
        let mut core = s.spec.sampler(s.progress)?;
        if core.next_call().is_none() {
            return Err(Failure::new(EsdStatus::InvalidState, "the run is finished"));
        }
        // A failed step leaves x unchanged (the core's guarantee); no allocation here.
        core.step(&mut s.x, out, &mut s.work)?;
        s.progress = core.progress();
        Ok(())
    })
}

/// Copies the prediction of the clean image `x0` made by the last step (a preview)
/// into `out` (sample_len floats).
///
/// # Safety
/// `sampler` must be valid; `out` must hold `len` floats.
#[no_mangle]
pub unsafe extern "C" fn esd_sampler_preview(
    sampler: *const EsdSampler,
    out: *mut f32,
    len: usize,
) -> EsdStatus {
    guard(|| {
        non_null(sampler, "sampler")?;
        let s = &*sampler;
        s.require_init()?;
        if s.progress.steps_done() == 0 {
            return Err(Failure::new(
                EsdStatus::InvalidState,
                "no step has been taken yet",
            ));
        }
        let core = s.spec.sampler(s.progress)?;
        write_out(core.pred_original_sample(&s.work), out, len, "out")
    })
}
