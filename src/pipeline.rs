//! The ES-DDPM pipeline: prior -> early-stop start -> sampler steps -> image.

use crate::cache::PlanCache;
use crate::config::{EsddpmConfig, PriorEntry, SchedulerConfig};
use crate::control::Paste;
use crate::error::{Error, ModelRole, Result};
use crate::images::Images;
use crate::model::OnnxModel;
use crate::prior::Prior;
use crate::session::Session;
use crate::unet::Unet;
use esddpm_core::{Draw, ImageShape, NoiseSource, SamplerKind, StepInfo};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use tract_linalg::multithread::Executor;

/// How a pipeline is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads: a batch's images are split across them (one core each); a lone image
    /// uses them in tract's matrix products when the U-Net is large enough for that to
    /// pay ([`crate::unet::Unet::threads_pay_at_batch_1`]). `None` = the number of
    /// physical cores. Loading itself uses up to two threads for its memory work
    /// (reading a plan cache entry, hashing the model file, arranging and packing
    /// weights), whatever this is.
    pub threads: Option<usize>,
    /// The most memory, in bytes, that loading a model or running one generation may
    /// need: model files, declared weights, inputs and planned activations are
    /// estimated and checked before they are allocated, and a request over the limit
    /// fails with [`Error::MemoryLimit`] (a hostile model declaring a huge input, or a
    /// huge batch, cannot exhaust memory). Default [`crate::memory::DEFAULT_MEMORY_LIMIT`]
    /// (4 GiB); [`crate::memory::UNLIMITED`] turns the checks off. See
    /// [`crate::memory`] for what is counted.
    pub memory_limit: u64,
    /// A directory for the plan cache ([`crate::cache`]): tract's decluttered models,
    /// saved on the first start, make later starts skip parsing the ONNX files and most
    /// of the optimisation (cifar-size U-Net: load-to-first-step 0.85 -> 0.62 s, at a
    /// peak RSS of 1.39x the weights). Created if missing; keep it private to the
    /// application. `None` (default) = no cache.
    pub plan_cache: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            threads: None,
            memory_limit: crate::memory::DEFAULT_MEMORY_LIMIT,
            plan_cache: None,
        }
    }
}

/// A model folder's files, given in memory (for instance from a game's asset pack).
#[derive(Debug, Clone, Default)]
pub struct MemoryFolder<'a> {
    /// The text of `scheduler_config.json`.
    pub scheduler_config: &'a str,
    /// The text of `esddpm.json`.
    pub esddpm_config: &'a str,
    /// File name (as `esddpm.json` names it) to bytes.
    pub files: BTreeMap<String, &'a [u8]>,
}

/// The reverse sampler to use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerChoice {
    /// DDPM ancestral sampling with the config's `variance_type` (the ES-DDPM paper's).
    Ddpm,
    /// DDIM; `eta` 0 is deterministic, 1 is DDPM-like.
    Ddim {
        /// DDIM's eta.
        eta: f64,
    },
    /// DPM-Solver++(2M), deterministic.
    DpmSolver,
}

/// Where generation starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Start {
    /// ES-DDPM: the prior's (or init image's) sample diffused to `T'` (the reverse
    /// steps of the full training chain; `None` = the folder's `recommended_start`),
    /// then `steps` reverse steps spread over `[0, T')` (`round(linspace(0, T'-1,
    /// steps))`).
    EarlyStop {
        /// `T'`.
        t_prime: Option<usize>,
    },
    /// diffusers img2img: `steps` steps over the whole chain with the config's
    /// `timestep_spacing`, of which the last `floor(steps * strength)` are run.
    Strength(f64),
    /// Plain sampling from pure noise over the whole chain: the vanilla baseline.
    Noise,
}

/// Everything that defines one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Seed of all noise (prior latents, start noise, step noise).
    pub seed: u64,
    /// Images to generate.
    pub batch: usize,
    /// Image `i` of the batch uses noise stream `first_image + i`, so a batch can be
    /// split across calls and give the same images.
    pub first_image: u64,
    /// Where to start.
    pub start: Start,
    /// The reverse sampler.
    pub sampler: SamplerChoice,
    /// Reverse steps (U-Net calls). `None`: `T'` (DDPM, early stop), the whole chain
    /// (DDPM from noise or strength), 10 (DDIM and DPM-Solver++, early stop) or 50
    /// (DDIM and DPM-Solver++ otherwise).
    pub steps: Option<usize>,
    /// Override the config's `clip_sample`.
    pub clip_sample: Option<bool>,
    /// Override the config's `clip_sample_range`.
    pub clip_sample_range: Option<f64>,
    /// Which prior (a name of `esddpm.json`); `None` = the default prior.
    pub prior: Option<String>,
    /// The prior's latents (`batch * latent_len` values) instead of seeded ones.
    pub latents: Option<Vec<f32>>,
    /// Class labels for a class-conditional prior, one per image.
    pub class_labels: Option<Vec<i64>>,
    /// Start from this image (one `C*H*W` image or the batch, in [-1, 1]) instead of
    /// the prior's (SDEdit / img2img).
    pub init_image: Option<Vec<f32>>,
    /// Paste a region into the prior's image before diffusion.
    pub paste: Option<Paste>,
    /// Keep the pixels of `init_image` (or of the prior's image) where this `H*W` (or
    /// `C*H*W`) mask is 1 while the rest is generated (inpainting).
    pub inpaint_mask: Option<Vec<f32>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            batch: 1,
            first_image: 0,
            start: Start::EarlyStop { t_prime: None },
            sampler: SamplerChoice::Ddpm,
            steps: None,
            clip_sample: None,
            clip_sample_range: None,
            prior: None,
            latents: None,
            class_labels: None,
            init_image: None,
            paste: None,
            inpaint_mask: None,
        }
    }
}

/// What a progress callback sees after each step.
#[derive(Debug)]
pub struct Progress<'a> {
    /// The step just taken.
    pub info: StepInfo,
    /// Total steps of the run.
    pub total: usize,
    /// The predicted clean images of this step (NCHW, [-1, 1]): a cheap preview.
    pub preview: &'a [f32],
}

/// A loaded ES-DDPM pipeline: U-Net, priors, schedule. `Send + Sync`: one pipeline can
/// serve several threads, each with its own [`Session`].
#[derive(Debug)]
pub struct Pipeline {
    pub(crate) scheduler: SchedulerConfig,
    pub(crate) alphas_cumprod: Vec<f64>,
    pub(crate) unet: Unet,
    pub(crate) priors: BTreeMap<String, Prior>,
    pub(crate) default_prior: Option<String>,
    pub(crate) recommended_start: usize,
    pub(crate) executor: Executor,
    pub(crate) memory_limit: u64,
    threads: usize,
    warnings: Vec<String>,
    source: String,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn executor_for(threads: Option<usize>) -> Result<(Executor, usize)> {
    let n = threads.unwrap_or_else(num_cpus::get_physical);
    if n == 0 {
        return Err(Error::InvalidParameter {
            name: "threads",
            message: "must be at least 1".into(),
        });
    }
    Ok(if n == 1 {
        (Executor::SingleThread, 1)
    } else {
        (Executor::multithread(n), n)
    })
}

impl Pipeline {
    /// Loads a model folder: `esddpm.json` + `scheduler_config.json` (esddpm layout),
    /// or diffusers' layout (`scheduler/scheduler_config.json`, `unet/model.onnx`; no
    /// prior, so only noise and img2img starts).
    pub fn from_folder(folder: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let folder = folder.as_ref();
        if !folder.is_dir() {
            return Err(Error::Folder {
                folder: folder.to_path_buf(),
                message: "not a directory".into(),
            });
        }
        let sched_path = [
            folder.join("scheduler_config.json"),
            folder.join("scheduler").join("scheduler_config.json"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Folder {
            folder: folder.to_path_buf(),
            message: "no scheduler_config.json (nor scheduler/scheduler_config.json)".into(),
        })?;
        let scheduler = SchedulerConfig::from_json(&read_text(&sched_path)?)?;
        let esddpm_path = folder.join("esddpm.json");
        let esddpm = if esddpm_path.is_file() {
            Some(EsddpmConfig::from_json(&read_text(&esddpm_path)?)?)
        } else {
            None
        };
        let unet_path: PathBuf = match &esddpm {
            Some(c) => folder.join(&c.unet.file),
            None => folder.join("unet").join("model.onnx"),
        };
        let cache = options.plan_cache.as_ref().map(PlanCache::new);
        let unet_model = OnnxModel::from_path_cached(
            ModelRole::Unet,
            &unet_path,
            options.memory_limit,
            cache.as_ref(),
        )?;
        let mut priors = Vec::new();
        if let Some(c) = &esddpm {
            for (name, entry) in &c.priors {
                let m = OnnxModel::from_path_cached(
                    ModelRole::Prior,
                    &folder.join(&entry.file),
                    options.memory_limit,
                    cache.as_ref(),
                )?;
                priors.push((name.clone(), entry.clone(), m));
            }
        }
        Self::assemble(
            scheduler,
            esddpm,
            unet_model,
            priors,
            options,
            folder.display().to_string(),
        )
    }

    /// Loads a pipeline from files in memory.
    pub fn from_memory(folder: &MemoryFolder<'_>, options: &LoadOptions) -> Result<Self> {
        let scheduler = SchedulerConfig::from_json(folder.scheduler_config)?;
        let esddpm = EsddpmConfig::from_json(folder.esddpm_config)?;
        let get = |name: &str| {
            folder
                .files
                .get(name)
                .copied()
                .ok_or_else(|| Error::Folder {
                    folder: PathBuf::from("(memory)"),
                    message: format!("no file named {name:?} was given"),
                })
        };
        let cache = options.plan_cache.as_ref().map(PlanCache::new);
        let unet_model = OnnxModel::from_bytes_cached(
            ModelRole::Unet,
            get(&esddpm.unet.file)?,
            options.memory_limit,
            cache.as_ref(),
        )?;
        let mut priors = Vec::new();
        for (name, entry) in &esddpm.priors {
            let m = OnnxModel::from_bytes_cached(
                ModelRole::Prior,
                get(&entry.file)?,
                options.memory_limit,
                cache.as_ref(),
            )?;
            priors.push((name.clone(), entry.clone(), m));
        }
        Self::assemble(
            scheduler,
            Some(esddpm),
            unet_model,
            priors,
            options,
            "(memory)".into(),
        )
    }

    fn assemble(
        scheduler: SchedulerConfig,
        esddpm: Option<EsddpmConfig>,
        unet_model: OnnxModel,
        priors: Vec<(String, PriorEntry, OnnxModel)>,
        options: &LoadOptions,
        source: String,
    ) -> Result<Self> {
        let (executor, threads) = executor_for(options.threads)?;
        let sample_shape = match &esddpm {
            Some(c) => c.unet.sample_shape,
            None => {
                let s = unet_model
                    .inputs()
                    .iter()
                    .find(|i| i.rank() == Some(4))
                    .and_then(|i| i.dims.clone())
                    .ok_or_else(|| Error::ModelSignature {
                        role: ModelRole::Unet,
                        message: "no rank-4 sample input to read the image size from".into(),
                    })?;
                let dim = |k: usize| {
                    s[k].filter(|&v| v > 0).map(|v| v as usize).ok_or_else(|| Error::ModelSignature {
                        role: ModelRole::Unet,
                        message: "the sample input's C, H, W are not fixed; add an esddpm.json with sample_shape".into(),
                    })
                };
                [dim(1)?, dim(2)?, dim(3)?]
            }
        };
        let unet = Unet::new(unet_model, sample_shape)?;
        let learned = scheduler.variance_type.is_learned();
        let c = sample_shape[0];
        if learned != (unet.out_channels() == 2 * c) {
            return Err(Error::ModelSignature {
                role: ModelRole::Unet,
                message: format!(
                    "the U-Net outputs {} channels but variance_type {} needs {}",
                    unet.out_channels(),
                    scheduler.variance_type.name(),
                    if learned { 2 * c } else { c }
                ),
            });
        }
        let mut prior_map = BTreeMap::new();
        for (name, entry, model) in priors {
            prior_map.insert(name, Prior::new(model, &entry, sample_shape)?);
        }
        let alphas_cumprod = scheduler.schedule().alphas_cumprod_vec()?;
        let mut warnings = scheduler.warnings.clone();
        if let Some(c) = &esddpm {
            warnings.extend(c.warnings.iter().cloned());
        }
        let default_prior = esddpm.as_ref().and_then(|c| {
            c.default_prior
                .clone()
                .or_else(|| c.priors.keys().next().cloned())
        });
        let recommended_start = esddpm
            .as_ref()
            .map_or(100, |c| c.recommended_start)
            .min(scheduler.num_train_timesteps);
        Ok(Self {
            scheduler,
            alphas_cumprod,
            unet,
            priors: prior_map,
            default_prior,
            recommended_start,
            executor,
            memory_limit: options.memory_limit,
            threads,
            warnings,
            source,
        })
    }

    /// The memory limit it was loaded with, in bytes ([`LoadOptions::memory_limit`]).
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    /// What one generation of `batch` images with `prior` (or none, for a start from
    /// noise or an init image) is estimated to need, in bytes: the session's buffers
    /// (`(9 N C H W + N D) * 4`) plus the U-Net's and the prior's batch-1 plans (the
    /// U-Net's activations once per worker thread of the batch). It is
    /// checked against the limit before anything is allocated.
    pub fn generation_memory(&self, batch: usize, prior: Option<&Prior>) -> Result<u64> {
        let [c, h, w] = self.image_shape();
        let latent = prior.map_or(0, Prior::latent_len);
        let buffers = crate::memory::bytes([batch, c, h, w], 4 * 9)
            .saturating_add(crate::memory::bytes([batch, latent], 4));
        crate::memory::check(self.memory_limit, buffers, || {
            format!("a generation of {batch} images")
        })?;
        // One U-Net run state (its activations) per worker thread of the batch.
        let unet = self.unet.memory(1)?;
        let workers = crate::session::workers(self.threads, batch) as u128;
        let mut needed = buffers
            .saturating_add(u128::from(unet.weights))
            .saturating_add(u128::from(unet.activations).saturating_mul(workers));
        if let Some(p) = prior {
            needed = needed.saturating_add(u128::from(p.memory(1)?.total()));
        }
        crate::memory::check(self.memory_limit, needed, || {
            format!("a generation of {batch} images")
        })?;
        Ok(u64::try_from(needed).unwrap_or(u64::MAX))
    }

    /// The scheduler config.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// `alphas_cumprod` of the training chain.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// `[C, H, W]` of the images.
    pub fn image_shape(&self) -> [usize; 3] {
        self.unet.sample_shape()
    }

    /// The names of the priors.
    pub fn prior_names(&self) -> impl Iterator<Item = &str> {
        self.priors.keys().map(String::as_str)
    }

    /// The prior used when none is named.
    pub fn default_prior(&self) -> Option<&str> {
        self.default_prior.as_deref()
    }

    /// A prior by name.
    pub fn prior(&self, name: &str) -> Option<&Prior> {
        self.priors.get(name)
    }

    /// The U-Net.
    pub fn unet(&self) -> &Unet {
        &self.unet
    }

    /// The folder's recommended `T'`.
    pub fn recommended_start(&self) -> usize {
        self.recommended_start
    }

    /// Threads tract uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Warnings from loading (unknown config keys).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// A human-readable description (the CLI's `info`).
    pub fn describe(&self) -> String {
        let s = &self.scheduler;
        let [c, h, w] = self.image_shape();
        let mut out = format!(
            "model folder: {}\nimages: {c}x{h}x{w} in [-1, 1]\nschedule: {} steps, {} ({} .. {}), variance {}, prediction {}, clip_sample {}, spacing {}\nU-Net: {} -> {} channels\n",
            self.source,
            s.num_train_timesteps,
            s.beta_schedule.name(),
            s.beta_start,
            s.beta_end,
            s.variance_type.name(),
            s.prediction_type.name(),
            s.clip_sample,
            s.timestep_spacing.name(),
            self.unet
                .model()
                .inputs()
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.unet.out_channels(),
        );
        for (name, p) in &self.priors {
            out += &format!(
                "prior {name}{}: latent {:?}, output range {:?}{}\n",
                if Some(name) == self.default_prior.as_ref() {
                    " (default)"
                } else {
                    ""
                },
                p.latent_shape(),
                p.output_range(),
                p.num_classes()
                    .map_or(String::new(), |n| format!(", {n} classes")),
            );
        }
        out += &format!(
            "recommended start T' = {}\nthreads: {}\n",
            self.recommended_start, self.threads
        );
        out
    }

    /// The sampler kind for a choice, with the config's variance type for DDPM.
    pub(crate) fn sampler_kind(&self, choice: SamplerChoice) -> Result<SamplerKind> {
        let kind = match choice {
            SamplerChoice::Ddpm => {
                return Ok(SamplerKind::Ddpm {
                    variance_type: self.scheduler.variance_type,
                })
            }
            SamplerChoice::Ddim { eta } => SamplerKind::Ddim {
                eta,
                use_clipped_model_output: false,
            },
            SamplerChoice::DpmSolver => SamplerKind::DpmSolverPlusPlus2M,
        };
        if self.scheduler.variance_type.is_learned() {
            return Err(Error::InvalidParameter {
                name: "sampler",
                message: format!(
                    "{choice:?} needs a U-Net with C output channels; this one learns its variance (use DDPM)"
                ),
            });
        }
        Ok(kind)
    }

    /// The prior's latents for a batch: the caller's, or standard normals from
    /// [`Draw::Latent`] of each image's stream.
    pub fn latents(&self, options: &GenerateOptions) -> Result<Vec<f32>> {
        let prior = self.prior_for(options)?;
        let n = prior.latent_len();
        if let Some(z) = &options.latents {
            if z.len() != options.batch * n {
                return Err(Error::InvalidParameter {
                    name: "latents",
                    message: format!("{} values, expected {} x {n}", z.len(), options.batch),
                });
            }
            if z.iter().any(|v| !v.is_finite()) {
                return Err(Error::InvalidParameter {
                    name: "latents",
                    message: "NaN or infinity".into(),
                });
            }
            return Ok(z.clone());
        }
        let noise = NoiseSource::new(options.seed);
        let mut z = vec![0.0; options.batch * n];
        for (i, chunk) in z.chunks_mut(n).enumerate() {
            noise.fill(
                options.first_image.wrapping_add(i as u64),
                Draw::Latent,
                chunk,
            );
        }
        Ok(z)
    }

    pub(crate) fn prior_for(&self, options: &GenerateOptions) -> Result<&Prior> {
        let name = options
            .prior
            .as_deref()
            .or(self.default_prior.as_deref())
            .ok_or_else(|| Error::InvalidParameter {
                name: "prior",
                message: "this model folder has no prior; start from noise or from an init image"
                    .into(),
            })?;
        self.priors
            .get(name)
            .ok_or_else(|| Error::InvalidParameter {
                name: "prior",
                message: format!(
                    "no prior named {name:?}; available: {}",
                    self.priors.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })
    }

    /// Runs the prior alone (ES-DDPM's `x0'`), images in [-1, 1].
    pub fn prior_images(&self, options: &GenerateOptions) -> Result<Images> {
        let prior = self.prior_for(options)?;
        let z = self.latents(options)?;
        let [c, h, w] = self.image_shape();
        let shape = ImageShape::new(options.batch, c, h, w)?;
        let mut data = vec![0.0; shape.len()];
        if let Some(labels) = &options.class_labels {
            if labels.len() != options.batch {
                return Err(Error::InvalidParameter {
                    name: "class_labels",
                    message: format!("{} labels for {} images", labels.len(), options.batch),
                });
            }
        }
        // Image by image (batch-1 plan), so that a batch equals its images made alone.
        let zl = prior.latent_len();
        for (i, (zi, out)) in z
            .chunks(zl)
            .zip(data.chunks_mut(shape.image_len()))
            .enumerate()
        {
            let label = options.class_labels.as_ref().map(|l| &l[i..i + 1]);
            prior.run(1, zi, label, out, &self.executor)?;
        }
        if let Some(p) = &options.paste {
            p.apply(&mut data, c)?;
        }
        Ok(Images { shape, data })
    }

    /// A step-wise session (one step per call, for a frame budget).
    pub fn session(&self, options: &GenerateOptions) -> Result<Session<'_>> {
        Session::new(self, options)
    }

    /// Generates a batch.
    pub fn generate(&self, options: &GenerateOptions) -> Result<Images> {
        self.generate_with(options, |_| {}, None)
    }

    /// Generates a batch, calling `progress` after each step and stopping with
    /// [`Error::Cancelled`] within one step once `cancel` is set.
    pub fn generate_with(
        &self,
        options: &GenerateOptions,
        mut progress: impl FnMut(&Progress<'_>),
        cancel: Option<&AtomicBool>,
    ) -> Result<Images> {
        let mut session = self.session(options)?;
        loop {
            if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
                return Err(Error::Cancelled {
                    steps_done: session.steps_done(),
                });
            }
            match session.step()? {
                Some(info) => progress(&Progress {
                    info,
                    total: session.num_steps(),
                    preview: session.preview(),
                }),
                None => break,
            }
        }
        Ok(session.into_images())
    }
}
