//! A step-wise generation: one U-Net call per [`Session::step`], so that a game can
//! spend one step per frame. The session owns every buffer and reuses it across steps.

use crate::error::{Error, ModelRole, Result};
use crate::images::Images;
use crate::pipeline::{GenerateOptions, Pipeline, SamplerChoice, Start};
use crate::unet::UnetState;
use esddpm_core::{
    ImageShape, Init, Mask, NoiseSchedule, Sampler, SamplerConfig, SamplerProgress, StartAt,
    StepInfo, TimestepSpacing,
};

/// A generation in progress. Borrows its [`Pipeline`]; many sessions can run on one
/// pipeline from several threads. `Send`: a session can move to another thread (one
/// thread at a time).
#[derive(Debug)]
pub struct Session<'p> {
    pipeline: &'p Pipeline,
    schedule: NoiseSchedule<'p>,
    chain: Vec<u32>,
    start: StartAt,
    config: SamplerConfig,
    shape: ImageShape,
    seed: u64,
    first_image: u64,
    /// Known image and keep mask, for inpainting.
    mask: Option<(Vec<f32>, Vec<f32>)>,
    x: Vec<f32>,
    out: Vec<f32>,
    work: Vec<f32>,
    progress: SamplerProgress,
    num_steps: usize,
    /// One U-Net run state per worker: the images of a batch are split across
    /// `min(threads, batch)` OS threads, each running the batch-1 plan on one core.
    unet_states: Vec<UnetState>,
}

/// The core sampler of a run, rebuilt from a session's fields (it borrows them, so a
/// session stores the sampler's progress instead of the sampler).
fn build_sampler<'a>(
    schedule: NoiseSchedule<'a>,
    chain: &'a [u32],
    start: StartAt,
    config: SamplerConfig,
    shape: ImageShape,
    (seed, first_image): (u64, u64),
    mask: &'a Option<(Vec<f32>, Vec<f32>)>,
) -> Result<Sampler<'a>> {
    let mut s =
        Sampler::new(schedule, chain, start, config, shape, seed)?.with_image_offset(first_image);
    if let Some((known, keep)) = mask {
        s = s.with_mask(Mask::new(known, keep, shape)?)?;
    }
    Ok(s)
}

/// Batch-1 run states (worker threads) a session uses for `batch` images on `threads`
/// threads: one per thread, at most one per image ([`crate::unet::Unet::run_images`]).
pub fn workers(threads: usize, batch: usize) -> usize {
    if batch < 2 {
        1
    } else {
        threads.clamp(1, batch)
    }
}

fn bad(name: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidParameter {
        name,
        message: message.into(),
    }
}

impl<'p> Session<'p> {
    /// Prepares a run: picks the chain, runs the prior (or takes the init image) and
    /// diffuses it to the start.
    pub fn new(pipeline: &'p Pipeline, o: &GenerateOptions) -> Result<Self> {
        if o.batch == 0 {
            return Err(bad("batch", "must be at least 1"));
        }
        let kind = pipeline.sampler_kind(o.sampler)?;
        let t_train = pipeline.scheduler.num_train_timesteps;
        let ddpm = matches!(o.sampler, SamplerChoice::Ddpm);
        let sched = &pipeline.scheduler;
        let (chain, start) = match o.start {
            Start::EarlyStop { t_prime } => {
                let tp = t_prime.unwrap_or(pipeline.recommended_start);
                if tp == 0 || tp > t_train {
                    return Err(bad("start", format!("T' = {tp} must be in 1..={t_train}")));
                }
                let steps = o.steps.unwrap_or(if ddpm { tp } else { tp.min(10) });
                if steps == 0 || steps > tp {
                    return Err(bad(
                        "steps",
                        format!("{steps} steps over [0, {tp}): must be in 1..={tp}"),
                    ));
                }
                let chain = TimestepSpacing::Linspace.timesteps_vec(tp, steps, 0)?;
                (chain, StartAt::Full)
            }
            Start::Strength(_) | Start::Noise => {
                let steps = o
                    .steps
                    .unwrap_or(if ddpm { t_train } else { 50.min(t_train) });
                let chain =
                    sched
                        .timestep_spacing
                        .timesteps_vec(t_train, steps, sched.steps_offset)?;
                let start = match o.start {
                    Start::Strength(s) => StartAt::Strength(s),
                    _ => StartAt::Full,
                };
                (chain, start)
            }
        };
        let [c, h, w] = pipeline.image_shape();
        // Checked against the memory limit before any buffer of the run is allocated.
        let prior = match (&o.start, &o.init_image) {
            (Start::Noise, _) | (_, Some(_)) => None,
            _ => Some(pipeline.prior_for(o)?),
        };
        pipeline.generation_memory(o.batch, prior)?;
        let shape = ImageShape::new(o.batch, c, h, w)?;
        let mut x0_opts = sched.x0_options();
        if let Some(clip) = o.clip_sample {
            x0_opts.clip_sample = clip;
        }
        if let Some(range) = o.clip_sample_range {
            x0_opts.clip_sample_range = range;
        }
        let config = SamplerConfig {
            kind,
            x0: x0_opts,
            set_alpha_to_one: sched.set_alpha_to_one,
        };

        // The clean image the run starts from: none (noise), the caller's, or the prior's.
        let init_image: Option<Vec<f32>> = match (&o.start, &o.init_image) {
            (Start::Noise, Some(_)) => {
                return Err(bad(
                    "init_image",
                    "a run from pure noise takes no init image",
                ))
            }
            (Start::Noise, None) => None,
            (_, Some(img)) => {
                if img.len() != shape.image_len() && img.len() != shape.len() {
                    return Err(bad(
                        "init_image",
                        format!(
                            "{} values; expected one image ({}) or the batch ({})",
                            img.len(),
                            shape.image_len(),
                            shape.len()
                        ),
                    ));
                }
                if img.iter().any(|v| !v.is_finite()) {
                    return Err(bad("init_image", "NaN or infinity"));
                }
                let mut img = img.clone();
                if let Some(p) = &o.paste {
                    p.apply(&mut img, c)?;
                }
                Some(img)
            }
            (_, None) => Some(pipeline.prior_images(o)?.data),
        };
        let mask = match &o.inpaint_mask {
            None => None,
            Some(keep) => {
                let known = init_image.clone().ok_or_else(|| {
                    bad(
                        "inpaint_mask",
                        "inpainting needs a known image (an init image or a prior)",
                    )
                })?;
                Some((known, keep.clone()))
            }
        };

        let schedule = NoiseSchedule::from_alphas_cumprod(&pipeline.alphas_cumprod)?;
        let mut session = Self {
            pipeline,
            schedule,
            chain,
            start,
            config,
            shape,
            seed: o.seed,
            first_image: o.first_image,
            mask,
            x: vec![0.0; shape.len()],
            out: Vec::new(),
            work: Vec::new(),
            progress: SamplerProgress::default(),
            num_steps: 0,
            unet_states: (0..workers(pipeline.threads(), o.batch))
                .map(|_| pipeline.unet.state(1))
                .collect::<Result<_>>()?,
        };
        let mut sampler = build_sampler(
            session.schedule,
            &session.chain,
            session.start,
            session.config,
            session.shape,
            (session.seed, session.first_image),
            &session.mask,
        )?;
        session.out = vec![0.0; sampler.model_output_len()];
        session.work = vec![0.0; sampler.workspace_len()];
        session.num_steps = sampler.num_steps();
        let init = match &init_image {
            Some(img) => Init::Image(img),
            None => Init::Noise,
        };
        sampler.init(&mut session.x, init)?;
        session.progress = sampler.progress();
        Ok(session)
    }

    /// Runs the U-Net once and takes one reverse step. `Ok(None)` once finished.
    pub fn step(&mut self) -> Result<Option<StepInfo>> {
        let mut sampler = build_sampler(
            self.schedule,
            &self.chain,
            self.start,
            self.config,
            self.shape,
            (self.seed, self.first_image),
            &self.mask,
        )?;
        sampler.restore(self.progress)?;
        let Some(call) = sampler.next_call() else {
            return Ok(None);
        };
        // Image by image with the batch-1 plan (bit-identical results whatever the batch
        // size; faster in tract than one batched call, see docs/PERFORMANCE.md), the
        // images split across the workers' run states.
        self.pipeline.unet.run_images(
            &mut self.unet_states,
            &self.x,
            call.timestep,
            &mut self.out,
            &self.pipeline.executor,
        )?;
        let info = sampler
            .step(&mut self.x, &self.out, &mut self.work)
            .map_err(|e| match e {
                esddpm_core::Error::NonFiniteModelOutput { step, .. } => Error::NonFiniteOutput {
                    role: ModelRole::Unet,
                    step: Some(step),
                },
                other => Error::Core(other),
            })?;
        self.progress = sampler.progress();
        Ok(Some(info))
    }

    /// Steps taken.
    pub fn steps_done(&self) -> usize {
        self.progress.steps_done()
    }

    /// Steps of the run (U-Net calls).
    pub fn num_steps(&self) -> usize {
        self.num_steps
    }

    /// Whether every step has been taken.
    pub fn is_done(&self) -> bool {
        self.steps_done() >= self.num_steps
    }

    /// The timesteps of the run, in order.
    pub fn timesteps(&self) -> &[u32] {
        let skip = self.start.skip(&self.chain).unwrap_or(0);
        &self.chain[skip..]
    }

    /// The predicted clean images of the last step (NCHW, [-1, 1]); before the first
    /// step, zeros.
    pub fn preview(&self) -> &[f32] {
        &self.work[..self.shape.len()]
    }

    /// The current sample `x_t` (the final images once done).
    pub fn sample(&self) -> &[f32] {
        &self.x
    }

    /// The batch shape.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// The images (the current sample if not done).
    pub fn into_images(self) -> Images {
        Images {
            shape: self.shape,
            data: self.x,
        }
    }
}
