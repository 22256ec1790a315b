//! Samplers as explicit state machines.
//!
//! The caller owns every buffer and runs the model however it likes (tract, a GPU, an
//! NPU). A run reads top to bottom:
//!
//! ```text
//! sampler = Sampler::new(schedule, chain, start, config, shape, seed)
//! sampler.init(x, Init::Image(prior_x0))        // x = sqrt(abar) x0' + sqrt(1-abar) eps
//! while let Some(call) = sampler.next_call() {  // which timestep the model must see
//!     out = model(x, call.timestep)             // the model input is x itself
//!     sampler.step(x, out, work)                // x <- x_prev, in place
//!     preview(sampler.pred_original_sample(work))
//! }
//! ```
//!
//! Every step uses `abar_t` of the current timestep and `abar_prev` of the next one in
//! the run (or, after the last, 1 — or `abar_0` when `set_alpha_to_one` is false), so a
//! respaced chain gets `beta = 1 - abar_t / abar_prev` as improved-diffusion and diffusers
//! compute it, and the model is called with the original timestep.

use crate::error::{Error, Result};
use crate::mask::Mask;
use crate::noise::{Draw, NoiseSource, NormalStream};
use crate::predict::{self, Parameterization, X0Options};
use crate::schedule::{NoiseSchedule, Posterior};
use crate::shape::ImageShape;
use crate::spacing::check_timesteps;
use crate::start::StartAt;

/// The variance of DDPM's ancestral step (diffusers' `variance_type`). With
/// `var~ = (1 - abar_prev) / (1 - abar_t) * beta` (clamped to >= 1e-20) and
/// `beta = 1 - abar_t / abar_prev`, the noise added is `std * eps` with:
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VarianceType {
    /// `std = sqrt(var~)`, the posterior variance (diffusers' default).
    #[default]
    FixedSmall,
    /// `std = exp(0.5 * ln var~)`: the same value, computed through the log.
    FixedSmallLog,
    /// `std = sqrt(beta)` (Ho et al.'s sigma^2 = beta; google/ddpm-cifar10-32).
    FixedLarge,
    /// `std = exp(0.5 * ln beta)`, GLIDE's `max_log`: the same value as `FixedLarge`.
    /// (diffusers 0.42 takes the square root of the log here and yields NaN.)
    FixedLargeLog,
    /// The model outputs 2C channels; the last C are the variance itself,
    /// `std = sqrt(v)`, as diffusers reads them.
    Learned,
    /// The model outputs 2C channels; the last C are `v` in [-1, 1] and
    /// `ln std^2 = f ln beta + (1 - f) ln var~`, `f = (v + 1) / 2` (improved-diffusion,
    /// ES-DDPM's official code).
    LearnedRange,
}

impl VarianceType {
    /// Parses diffusers' name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "fixed_small" => Some(Self::FixedSmall),
            "fixed_small_log" => Some(Self::FixedSmallLog),
            "fixed_large" => Some(Self::FixedLarge),
            "fixed_large_log" => Some(Self::FixedLargeLog),
            "learned" => Some(Self::Learned),
            "learned_range" => Some(Self::LearnedRange),
            _ => None,
        }
    }

    /// diffusers' name.
    pub fn name(self) -> &'static str {
        match self {
            Self::FixedSmall => "fixed_small",
            Self::FixedSmallLog => "fixed_small_log",
            Self::FixedLarge => "fixed_large",
            Self::FixedLargeLog => "fixed_large_log",
            Self::Learned => "learned",
            Self::LearnedRange => "learned_range",
        }
    }

    /// Whether the model outputs 2C channels (the variance after the prediction).
    pub fn is_learned(self) -> bool {
        matches!(self, Self::Learned | Self::LearnedRange)
    }
}

/// Which reverse update the sampler applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerKind {
    /// DDPM ancestral sampling (Ho et al.; diffusers' `DDPMScheduler.step`):
    /// `x_prev = c_x0 * x0 + c_xt * x_t + std * eps`, with the posterior coefficients of
    /// [`Posterior`]; no noise is added at the last step of the run.
    Ddpm {
        /// The variance of the added noise.
        variance_type: VarianceType,
    },
    /// DDIM (Song et al.; diffusers' `DDIMScheduler.step`):
    /// `std = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))`,
    /// `x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std * z`
    /// (the square root is clamped at 0 for `eta > 1`).
    Ddim {
        /// 0 is deterministic, 1 matches the DDPM posterior variance.
        eta: f64,
        /// Recompute `eps` from the clipped `x0` (diffusers' `use_clipped_model_output`).
        use_clipped_model_output: bool,
    },
    /// DPM-Solver++(2M) (Lu et al. 2022; diffusers' `DPMSolverMultistepScheduler` with
    /// `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`,
    /// `final_sigmas_type="zero"`). With `lambda = ln(sqrt(abar) / sqrt(1 - abar))`,
    /// `h = lambda_prev - lambda_t`, `alpha = sqrt(abar_prev)`:
    /// `x_prev = (sigma_prev / sigma_t) x_t - alpha (e^-h - 1) (D0 + D1 / 2)` with
    /// `D0 = x0_t`, `D1 = (x0_t - x0_last) h / h_last`; the first step of a run (no
    /// history) and the last step use `D1 = 0`. Deterministic.
    DpmSolverPlusPlus2M,
}

impl SamplerKind {
    fn uses_history(&self) -> bool {
        matches!(self, SamplerKind::DpmSolverPlusPlus2M)
    }

    fn output_channel_factor(&self) -> usize {
        match self {
            SamplerKind::Ddpm { variance_type } if variance_type.is_learned() => 2,
            _ => 1,
        }
    }
}

/// Everything that defines a sampler besides the schedule, chain and shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// The reverse update.
    pub kind: SamplerKind,
    /// How `x0` is predicted and bounded.
    pub x0: X0Options,
    /// After the last step, `abar_prev = 1` (true, diffusers' `set_alpha_to_one`
    /// default, and DDPM's `one`) or `abar_0` (false).
    pub set_alpha_to_one: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            kind: SamplerKind::Ddpm {
                variance_type: VarianceType::FixedSmall,
            },
            x0: X0Options::default(),
            set_alpha_to_one: true,
        }
    }
}

impl SamplerConfig {
    /// Checks the numeric parameters.
    pub fn validate(&self) -> Result<()> {
        self.x0.validate()?;
        if let SamplerKind::Ddim { eta, .. } = self.kind {
            if !(eta.is_finite() && eta >= 0.0) {
                return Err(Error::InvalidEta(eta));
            }
        }
        Ok(())
    }
}

/// What the model must be run on next: the sampler's current `x` at `timestep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelCall {
    /// Index of the step within the run (0 = first reverse step).
    pub step: usize,
    /// The original training timestep to pass to the model.
    pub timestep: u32,
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepInfo {
    /// Index of the step just taken within the run.
    pub step: usize,
    /// Its timestep.
    pub timestep: u32,
    /// The timestep `x` is now at (`None` after the last step: `x` is the sample).
    pub prev_timestep: Option<u32>,
    /// Whether the run is finished.
    pub done: bool,
}

/// How `x` is initialised before the first reverse step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init<'i> {
    /// Pure Gaussian noise `x = eps` (plain DDPM from `x_T`; diffusers'
    /// `init_noise_sigma = 1`).
    Noise,
    /// The early-stop start from a clean image (the prior's sample, or a user's image
    /// for img2img): `x = sqrt(abar_start) * image + sqrt(1 - abar_start) * eps`. One
    /// image (`C*H*W`, used for every image of the batch) or the whole batch.
    Image(&'i [f32]),
}

/// Where a run stands: enough to rebuild a [`Sampler`] and continue exactly (the noise
/// is a pure function of seed, image, draw and element, and DPM-Solver++'s history lives
/// in the caller's workspace). Lets a caller that cannot keep the borrowing `Sampler`
/// alive (a session object, a C handle) store the progress instead.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplerProgress {
    step: usize,
    initialized: bool,
    has_history: bool,
    last_lambda: f64,
}

impl SamplerProgress {
    /// Steps taken.
    pub fn steps_done(&self) -> usize {
        self.step
    }
}

enum NoiseIn<'n> {
    Seeded,
    Given(&'n [f32]),
}

/// The sampler state machine. Holds no buffer of its own: `x`, the model output and
/// the workspace are passed to each call, so it works without an allocator and
/// allocates nothing.
#[derive(Debug, Clone)]
pub struct Sampler<'a> {
    schedule: NoiseSchedule<'a>,
    timesteps: &'a [u32],
    config: SamplerConfig,
    shape: ImageShape,
    noise: NoiseSource,
    image_offset: u64,
    mask: Option<Mask<'a>>,
    step: usize,
    initialized: bool,
    has_history: bool,
    last_lambda: f64,
}

impl<'a> Sampler<'a> {
    /// A sampler that runs `chain` (decreasing training timesteps, see
    /// [`crate::spacing`]) from `start`, on a batch of `shape`, drawing noise from
    /// `seed`.
    pub fn new(
        schedule: NoiseSchedule<'a>,
        chain: &'a [u32],
        start: StartAt,
        config: SamplerConfig,
        shape: ImageShape,
        seed: u64,
    ) -> Result<Self> {
        check_timesteps(chain, schedule.num_train_timesteps())?;
        config.validate()?;
        shape.validate()?;
        let skip = start.skip(chain)?;
        Ok(Self {
            schedule,
            timesteps: &chain[skip..],
            config,
            shape,
            noise: NoiseSource::new(seed),
            image_offset: 0,
            mask: None,
            step: 0,
            initialized: false,
            has_history: false,
            last_lambda: 0.0,
        })
    }

    /// Image `n` of the batch draws from stream `offset + n` (so a batch can be split:
    /// image `i` of a batch equals a batch of one with offset `i`), wrapping modulo
    /// 2^64 (any `u64` offset is valid).
    pub fn with_image_offset(mut self, offset: u64) -> Self {
        self.image_offset = offset;
        self
    }

    /// Keeps the masked pixels of a known image after every step (inpainting).
    pub fn with_mask(mut self, mask: Mask<'a>) -> Result<Self> {
        if mask.shape() != self.shape {
            return Err(Error::BufferLength {
                what: "mask shape (batch size)",
                expected: self.shape.len(),
                got: mask.shape().len(),
            });
        }
        self.mask = Some(mask);
        Ok(self)
    }

    /// The timesteps of this run, in the order they are visited.
    pub fn timesteps(&self) -> &'a [u32] {
        self.timesteps
    }

    /// The timestep the run starts at (`T'`).
    pub fn start_timestep(&self) -> u32 {
        self.timesteps[0]
    }

    /// Number of reverse steps (model calls) of the run.
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Whether every step has been taken.
    pub fn is_done(&self) -> bool {
        self.step >= self.timesteps.len()
    }

    /// The batch shape.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// The configuration.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// The noise source (its seed).
    pub fn noise(&self) -> NoiseSource {
        self.noise
    }

    /// Elements the model output must have: `N*C*H*W`, or twice that for learned
    /// variance.
    pub fn model_output_len(&self) -> usize {
        self.shape.len() * self.config.kind.output_channel_factor()
    }

    /// Elements the workspace passed to [`Self::step`] must have: the predicted `x0`
    /// (`N*C*H*W`), plus the previous `x0` for DPM-Solver++ (`N*C*H*W`), plus one image
    /// of scratch for dynamic thresholding. Pass the same workspace to every step.
    pub fn workspace_len(&self) -> usize {
        let n = self.shape.len();
        let mut len = n;
        if self.config.kind.uses_history() {
            len += n;
        }
        if self.config.x0.thresholding.is_some() {
            len += self.shape.image_len();
        }
        len
    }

    /// The predicted `x0` of the last step (from the workspace given to it).
    pub fn pred_original_sample<'w>(&self, work: &'w [f32]) -> &'w [f32] {
        &work[..self.shape.len().min(work.len())]
    }

    /// Initialises `x` (`N*C*H*W`) at the run's start timestep, with noise from
    /// [`Draw::Start`], and rewinds the run to its first step.
    pub fn init(&mut self, x: &mut [f32], init: Init<'_>) -> Result<()> {
        let len = self.shape.len();
        let il = self.shape.image_len();
        if x.len() != len {
            return Err(Error::BufferLength {
                what: "sample",
                expected: len,
                got: x.len(),
            });
        }
        let abar = self.schedule.get(self.timesteps[0])?;
        let (a, s) = (libm::sqrt(abar), libm::sqrt(1.0 - abar));
        match init {
            Init::Noise => {
                for (n, img) in x.chunks_exact_mut(il).enumerate() {
                    self.noise
                        .fill(self.image_offset.wrapping_add(n as u64), Draw::Start, img);
                }
            }
            Init::Image(image) => {
                if image.len() != il && image.len() != len {
                    return Err(Error::BufferLength {
                        what: "init image",
                        expected: il,
                        got: image.len(),
                    });
                }
                if let Some(index) = image.iter().position(|v| !v.is_finite()) {
                    return Err(Error::InvalidParameter {
                        name: "init image value",
                        value: f64::from(image[index]),
                    });
                }
                for (n, img) in x.chunks_exact_mut(il).enumerate() {
                    let src = if image.len() == il {
                        image
                    } else {
                        &image[n * il..(n + 1) * il]
                    };
                    let mut eps = self
                        .noise
                        .stream(self.image_offset.wrapping_add(n as u64), Draw::Start);
                    for (v, &x0) in img.iter_mut().zip(src) {
                        *v = (a * f64::from(x0) + s * f64::from(eps.next_normal())) as f32;
                    }
                }
            }
        }
        self.step = 0;
        self.initialized = true;
        self.has_history = false;
        Ok(())
    }

    /// The progress of the run, to [`Self::restore`] later on an equal sampler.
    pub fn progress(&self) -> SamplerProgress {
        SamplerProgress {
            step: self.step,
            initialized: self.initialized,
            has_history: self.has_history,
            last_lambda: self.last_lambda,
        }
    }

    /// Continues a run from `progress`, taken from a sampler built with the same
    /// arguments (pass the same `x` and workspace to the next step).
    pub fn restore(&mut self, progress: SamplerProgress) -> Result<()> {
        if progress.step > self.timesteps.len() {
            return Err(Error::InvalidState("progress beyond the end of this run"));
        }
        self.step = progress.step;
        self.initialized = progress.initialized;
        self.has_history = progress.has_history && self.config.kind.uses_history();
        self.last_lambda = progress.last_lambda;
        Ok(())
    }

    /// The model call the next step needs, or `None` when the run is finished.
    pub fn next_call(&self) -> Option<ModelCall> {
        self.timesteps.get(self.step).map(|&t| ModelCall {
            step: self.step,
            timestep: t,
        })
    }

    /// Takes one reverse step: reads the model's output for the current timestep,
    /// writes the predicted `x0` into `work` and updates `x` in place. Noise comes from
    /// the seeded source ([`Draw::Step`]). On error nothing is written to `x`.
    pub fn step(
        &mut self,
        x: &mut [f32],
        model_output: &[f32],
        work: &mut [f32],
    ) -> Result<StepInfo> {
        self.step_impl(x, model_output, work, NoiseIn::Seeded)
    }

    /// [`Self::step`] with the noise given by the caller (`N*C*H*W` values, read only
    /// by steps that add noise), for instance to reproduce another implementation's
    /// random stream.
    pub fn step_with_noise(
        &mut self,
        x: &mut [f32],
        model_output: &[f32],
        work: &mut [f32],
        noise: &[f32],
    ) -> Result<StepInfo> {
        self.step_impl(x, model_output, work, NoiseIn::Given(noise))
    }

    fn final_alpha_cumprod(&self) -> f64 {
        if self.config.set_alpha_to_one {
            1.0
        } else {
            self.schedule.alpha_cumprod(0)
        }
    }

    fn step_impl(
        &mut self,
        x: &mut [f32],
        model_output: &[f32],
        work: &mut [f32],
        noise_in: NoiseIn<'_>,
    ) -> Result<StepInfo> {
        if !self.initialized {
            return Err(Error::InvalidState("step called before init"));
        }
        let Some(call) = self.next_call() else {
            return Err(Error::InvalidState("step called after the last step"));
        };
        let len = self.shape.len();
        let il = self.shape.image_len();
        if x.len() != len {
            return Err(Error::BufferLength {
                what: "sample",
                expected: len,
                got: x.len(),
            });
        }
        if model_output.len() != self.model_output_len() {
            return Err(Error::BufferLength {
                what: "model output",
                expected: self.model_output_len(),
                got: model_output.len(),
            });
        }
        if work.len() < self.workspace_len() {
            return Err(Error::BufferTooSmall {
                what: "workspace",
                needed: self.workspace_len(),
                got: work.len(),
            });
        }
        if let Some(index) = model_output.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteModelOutput {
                step: call.step,
                timestep: call.timestep,
                index,
            });
        }
        let factor = self.config.kind.output_channel_factor();
        if let SamplerKind::Ddpm {
            variance_type: VarianceType::Learned,
        } = self.config.kind
        {
            for n in 0..self.shape.batch {
                let var = &model_output[(2 * n + 1) * il..(2 * n + 2) * il];
                if let Some(j) = var.iter().position(|&v| v < 0.0) {
                    return Err(Error::NegativeLearnedVariance {
                        step: call.step,
                        index: (2 * n + 1) * il + j,
                    });
                }
            }
        }

        let t = call.timestep;
        let prev_t = self.timesteps.get(self.step + 1).copied();
        let last = prev_t.is_none();
        let abar_t = self.schedule.get(t)?;
        let abar_prev = match prev_t {
            Some(p) => self.schedule.get(p)?,
            None => self.final_alpha_cumprod(),
        };
        let param = Parameterization::new(abar_t, self.config.x0.prediction_type);
        let adds_noise = match self.config.kind {
            SamplerKind::Ddpm { .. } => !last,
            SamplerKind::Ddim { eta, .. } => eta > 0.0,
            SamplerKind::DpmSolverPlusPlus2M => false,
        };
        if let (NoiseIn::Given(noise), true) = (&noise_in, adds_noise) {
            if noise.len() != len {
                return Err(Error::BufferLength {
                    what: "noise",
                    expected: len,
                    got: noise.len(),
                });
            }
        }

        // 1. The predicted x0, bounded, into the workspace.
        let (x0_buf, rest) = work.split_at_mut(len);
        let (hist, scratch) = if self.config.kind.uses_history() {
            rest.split_at_mut(len)
        } else {
            rest.split_at_mut(0)
        };
        for n in 0..self.shape.batch {
            let m = &model_output[factor * n * il..(factor * n + 1) * il];
            let xs = &x[n * il..(n + 1) * il];
            let x0 = &mut x0_buf[n * il..(n + 1) * il];
            for ((d, &xv), &mv) in x0.iter_mut().zip(xs).zip(m) {
                *d = param.x0(f64::from(xv), f64::from(mv)) as f32;
            }
            // Checked before clipping, which would turn an infinity into a bound.
            if x0.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinitePrediction {
                    step: call.step,
                    timestep: t,
                });
            }
            if let Some(th) = self.config.x0.thresholding {
                predict::threshold(x0, th, scratch)?;
            } else if self.config.x0.clip_sample {
                predict::clip(x0, self.config.x0.clip_sample_range);
            }
        }

        // 2. The update of x, image by image.
        let step_u32 = u32::try_from(self.step).unwrap_or(u32::MAX);
        for n in 0..self.shape.batch {
            let range = n * il..(n + 1) * il;
            let m = &model_output[factor * n * il..(factor * n + 1) * il];
            let var_out = if factor == 2 {
                &model_output[(2 * n + 1) * il..(2 * n + 2) * il]
            } else {
                &[][..]
            };
            let mut noise = match noise_in {
                NoiseIn::Seeded => StepNoise::Stream(self.noise.stream(
                    self.image_offset.wrapping_add(n as u64),
                    Draw::Step(step_u32),
                )),
                NoiseIn::Given(buf) if adds_noise => StepNoise::Given(&buf[range.clone()]),
                NoiseIn::Given(_) => StepNoise::Given(&[]),
            };
            let xs = &mut x[range.clone()];
            let x0 = &x0_buf[range.clone()];
            match self.config.kind {
                SamplerKind::Ddpm { variance_type } => ddpm_update(
                    xs,
                    x0,
                    var_out,
                    variance_type,
                    abar_t,
                    abar_prev,
                    adds_noise,
                    &mut noise,
                ),
                SamplerKind::Ddim {
                    eta,
                    use_clipped_model_output,
                } => ddim_update(
                    xs,
                    x0,
                    m,
                    &param,
                    eta,
                    use_clipped_model_output,
                    abar_t,
                    abar_prev,
                    &mut noise,
                ),
                SamplerKind::DpmSolverPlusPlus2M => {
                    let second = self.has_history && !last;
                    dpm_update(
                        xs,
                        x0,
                        &hist[range.clone()],
                        second,
                        abar_t,
                        abar_prev,
                        self.last_lambda,
                    )
                }
            }
        }
        if self.config.kind.uses_history() {
            hist.copy_from_slice(x0_buf);
            self.has_history = true;
            self.last_lambda = lambda(abar_t);
        }

        // 3. Masked pixels: the known image at the new noise level.
        if let Some(mask) = &self.mask {
            mask.apply(
                x,
                abar_prev,
                &self.noise,
                self.image_offset,
                Draw::Mask(step_u32),
            );
            mask.blend_x0(x0_buf);
        }

        self.step += 1;
        Ok(StepInfo {
            step: call.step,
            timestep: t,
            prev_timestep: prev_t,
            done: last,
        })
    }
}

/// Noise for one image of one step (lives on the stack; no allocator to box with).
#[allow(clippy::large_enum_variant)]
enum StepNoise<'n> {
    Stream(NormalStream),
    Given(&'n [f32]),
}

impl StepNoise<'_> {
    #[inline]
    fn at(&mut self, j: usize) -> f64 {
        match self {
            StepNoise::Stream(s) => f64::from(s.next_normal()),
            StepNoise::Given(b) => f64::from(b[j]),
        }
    }
}

/// `lambda = ln(sqrt(abar) / sqrt(1 - abar)) = (ln abar - ln(1 - abar)) / 2`.
fn lambda(abar: f64) -> f64 {
    0.5 * (libm::log(abar) - libm::log(1.0 - abar))
}

#[allow(clippy::too_many_arguments)]
fn ddpm_update(
    x: &mut [f32],
    x0: &[f32],
    var_out: &[f32],
    variance_type: VarianceType,
    abar_t: f64,
    abar_prev: f64,
    adds_noise: bool,
    noise: &mut StepNoise<'_>,
) {
    let post = Posterior::between(abar_t, abar_prev);
    let var_small = post.variance.max(1e-20);
    let fixed_std = match variance_type {
        VarianceType::FixedSmall => libm::sqrt(var_small),
        VarianceType::FixedSmallLog => libm::exp(0.5 * libm::log(var_small)),
        VarianceType::FixedLarge => libm::sqrt(post.beta),
        VarianceType::FixedLargeLog => libm::exp(0.5 * libm::log(post.beta)),
        VarianceType::Learned | VarianceType::LearnedRange => 0.0,
    };
    let (min_log, max_log) = (libm::log(var_small), libm::log(post.beta));
    for (j, (xv, &x0v)) in x.iter_mut().zip(x0).enumerate() {
        let mean = post.mean_coef_x0 * f64::from(x0v) + post.mean_coef_xt * f64::from(*xv);
        let out = if adds_noise {
            let std = match variance_type {
                VarianceType::Learned => libm::sqrt(f64::from(var_out[j])),
                VarianceType::LearnedRange => {
                    let frac = (f64::from(var_out[j]) + 1.0) / 2.0;
                    libm::exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
                }
                _ => fixed_std,
            };
            mean + std * noise.at(j)
        } else {
            mean
        };
        *xv = out as f32;
    }
}

#[allow(clippy::too_many_arguments)]
fn ddim_update(
    x: &mut [f32],
    x0: &[f32],
    m: &[f32],
    param: &Parameterization,
    eta: f64,
    use_clipped_model_output: bool,
    abar_t: f64,
    abar_prev: f64,
    noise: &mut StepNoise<'_>,
) {
    let variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev);
    let std = eta * libm::sqrt(variance);
    let dir = libm::sqrt((1.0 - abar_prev - std * std).max(0.0));
    let a_prev = libm::sqrt(abar_prev);
    for (j, ((xv, &x0v), &mv)) in x.iter_mut().zip(x0).zip(m).enumerate() {
        let xf = f64::from(*xv);
        let eps = if use_clipped_model_output {
            param.eps_from_x0(xf, f64::from(x0v))
        } else {
            param.eps(xf, f64::from(mv))
        };
        let mut out = a_prev * f64::from(x0v) + dir * eps;
        if eta > 0.0 {
            out += std * noise.at(j);
        }
        *xv = out as f32;
    }
}

fn dpm_update(
    x: &mut [f32],
    x0: &[f32],
    last_x0: &[f32],
    second_order: bool,
    abar_t: f64,
    abar_prev: f64,
    last_lambda: f64,
) {
    let sigma_prev = libm::sqrt(1.0 - abar_prev);
    if sigma_prev == 0.0 {
        // Step to sigma = 0: the first-order update is exactly x0.
        x.copy_from_slice(x0);
        return;
    }
    let alpha_prev = libm::sqrt(abar_prev);
    let sigma_t = libm::sqrt(1.0 - abar_t);
    let lambda_t = lambda(abar_t);
    let h = lambda(abar_prev) - lambda_t;
    let ratio = sigma_prev / sigma_t;
    let c0 = -alpha_prev * libm::expm1(-h);
    if second_order {
        let r0 = (lambda_t - last_lambda) / h;
        let c1 = 0.5 * c0 / r0;
        for ((xv, &d0), &m1) in x.iter_mut().zip(x0).zip(last_x0) {
            let d0 = f64::from(d0);
            let d1 = d0 - f64::from(m1);
            *xv = (ratio * f64::from(*xv) + c0 * d0 + c1 * d1) as f32;
        }
    } else {
        for (xv, &d0) in x.iter_mut().zip(x0) {
            *xv = (ratio * f64::from(*xv) + c0 * f64::from(d0)) as f32;
        }
    }
}
