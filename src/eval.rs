//! The sample-quality benchmark behind `esddpm eval`: FID in the shipped classifier's
//! feature space between `N` generated images and the 10 000 Fashion-MNIST test images,
//! for the prior alone, the plain DDPM/DDIM from noise, and ES-DDPM at several `T'`.
//!
//! Every row uses the same seed and image indices `0..N`, so the priors' rows and the
//! ES-DDPM rows start from the same latents, and a row's numbers are reproducible bit
//! for bit. Images are made one at a time (batch 1, one thread each) by `workers`
//! threads sharing one [`Pipeline`]; the results of each chunk of images are cached on
//! disk, so an interrupted run resumes where it stopped.

use crate::classifier::Classifier;
use crate::error::{Error, Result};
use crate::fid::{frechet_distance, FeatureStats};
use crate::pipeline::{GenerateOptions, Pipeline, SamplerChoice, Start};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// How a row's images are made.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Real training images `0..N`: the FID a perfect generator would get at this `N`.
    Real,
    /// The prior alone (ES-DDPM's `x0'`).
    Prior {
        /// The prior's name in `esddpm.json`.
        name: String,
    },
    /// A diffusion run (from noise, or ES-DDPM from a prior).
    Diffusion {
        /// Where the run starts.
        start: Start,
        /// The reverse sampler.
        sampler: SamplerChoice,
        /// Reverse steps (`None`: every step of the start).
        steps: Option<usize>,
        /// The prior, for an early-stop start.
        prior: Option<String>,
    },
}

/// One row of the benchmark table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Short identifier (`gan`, `ddpm-1000`, `es-gan-ddpm-100`, ...), used by `--rows`
    /// and as the cache folder.
    pub id: String,
    /// What the table says.
    pub label: String,
    /// How the images are made.
    pub method: Method,
}

impl Row {
    fn diffusion(
        id: String,
        label: String,
        start: Start,
        sampler: SamplerChoice,
        steps: Option<usize>,
        prior: Option<&str>,
    ) -> Self {
        Row {
            id,
            label,
            method: Method::Diffusion {
                start,
                sampler,
                steps,
                prior: prior.map(str::to_string),
            },
        }
    }

    /// The generation options of image range `first..first + count`.
    pub fn options(&self, seed: u64, first: u64, count: usize) -> GenerateOptions {
        let mut o = GenerateOptions {
            seed,
            batch: count,
            first_image: first,
            ..Default::default()
        };
        match &self.method {
            Method::Real => {}
            Method::Prior { name } => o.prior = Some(name.clone()),
            Method::Diffusion {
                start,
                sampler,
                steps,
                prior,
            } => {
                o.start = *start;
                o.sampler = *sampler;
                o.steps = *steps;
                o.prior = prior.clone();
            }
        }
        o
    }

    /// U-Net calls per image (0 for the prior and real rows).
    pub fn unet_calls(&self, pipeline: &Pipeline) -> Result<usize> {
        match self.method {
            Method::Diffusion { .. } => Ok(pipeline.session(&self.options(0, 0, 1))?.num_steps()),
            _ => Ok(0),
        }
    }
}

/// The table: the real-data floor, each prior alone, DDPM with 1000 and 100
/// steps and DDIM with 10 and 50 steps from noise, and ES-DDPM with each prior at
/// `T'` in {50, 100, 200, 300}, with the DDPM chain (`T'` calls) and with DDIM (10 steps
/// over `[0, T')`, eta 0).
pub fn standard_rows(pipeline: &Pipeline) -> Vec<Row> {
    let t = pipeline.scheduler_config().num_train_timesteps;
    let ddim = SamplerChoice::Ddim { eta: 0.0 };
    let mut rows = vec![Row {
        id: "real".into(),
        label: "Fashion-MNIST train images (the floor)".into(),
        method: Method::Real,
    }];
    let priors: Vec<&str> = pipeline.prior_names().collect();
    for p in &priors {
        rows.push(Row {
            id: (*p).to_string(),
            label: format!("{} prior alone", p.to_uppercase()),
            method: Method::Prior {
                name: (*p).to_string(),
            },
        });
    }
    rows.push(Row::diffusion(
        format!("ddpm-{t}"),
        format!("DDPM, {t} steps from noise"),
        Start::Noise,
        SamplerChoice::Ddpm,
        None,
        None,
    ));
    rows.push(Row::diffusion(
        "ddpm-100".into(),
        "DDPM respaced to 100 steps, from noise".into(),
        Start::Noise,
        SamplerChoice::Ddpm,
        Some(100),
        None,
    ));
    for steps in [10, 50] {
        rows.push(Row::diffusion(
            format!("ddim-{steps}"),
            format!("DDIM, {steps} steps from noise"),
            Start::Noise,
            ddim,
            Some(steps),
            None,
        ));
    }
    for p in &priors {
        for tp in [50, 100, 200, 300] {
            let start = Start::EarlyStop { t_prime: Some(tp) };
            rows.push(Row::diffusion(
                format!("es-{p}-ddpm-{tp}"),
                format!("ES-DDPM, {} prior, T'={tp}, DDPM chain", p.to_uppercase()),
                start,
                SamplerChoice::Ddpm,
                None,
                Some(p),
            ));
            rows.push(Row::diffusion(
                format!("es-{p}-ddim10-{tp}"),
                format!(
                    "ES-DDPM, {} prior, T'={tp}, DDIM 10 steps",
                    p.to_uppercase()
                ),
                start,
                ddim,
                Some(10),
                Some(p),
            ));
        }
    }
    rows
}

/// Settings of a benchmark run.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalConfig {
    /// Generated images per row (the same for every row).
    pub n: usize,
    /// The seed of every row.
    pub seed: u64,
    /// Threads making images at once (each runs batch-1 forwards on one core).
    pub workers: usize,
    /// Images per cached chunk.
    pub chunk: usize,
    /// Where chunks are cached (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
}

/// One measured row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowResult {
    /// The row's id.
    pub id: String,
    /// The row's label.
    pub label: String,
    /// U-Net calls per image.
    pub unet_calls: usize,
    /// Images compared with the test set.
    pub n: usize,
    /// FID against the test images.
    pub fid: f64,
    /// Seconds per image on one core (sum of the chunks' generation times / N), the
    /// prior's forward included, the classifier's not.
    pub seconds_per_image: f64,
}

/// Features of one chunk and the seconds its images took.
struct Chunk {
    features: Vec<f32>,
    seconds: f64,
}

/// Runs the benchmark rows against the statistics of the reference images.
pub struct Evaluator<'a> {
    pipeline: &'a Pipeline,
    classifier: &'a Classifier,
    reference: FeatureStats,
    train: &'a [f32],
    config: EvalConfig,
}

impl<'a> Evaluator<'a> {
    /// `reference`: the test images (`[M, C, H, W]` in [-1, 1]); `train`: real images for
    /// the [`Method::Real`] row (at least `config.n` of them).
    pub fn new(
        pipeline: &'a Pipeline,
        classifier: &'a Classifier,
        reference: &[f32],
        train: &'a [f32],
        config: EvalConfig,
    ) -> Result<Self> {
        if config.n < 2 || config.workers == 0 || config.chunk == 0 {
            return Err(Error::InvalidParameter {
                name: "eval",
                message: format!(
                    "n must be >= 2, workers and chunk >= 1 (got n {}, workers {}, chunk {})",
                    config.n, config.workers, config.chunk
                ),
            });
        }
        let features = classifier.features(reference, 100)?;
        let reference = FeatureStats::new(&features, classifier.dim())?;
        Ok(Self {
            pipeline,
            classifier,
            reference,
            train,
            config,
        })
    }

    /// The cache file of a chunk.
    fn chunk_path(&self, row: &Row, first: usize, count: usize) -> Option<PathBuf> {
        self.config.cache_dir.as_ref().map(|d| {
            d.join(&row.id)
                .join(format!("seed{}-{first}-{count}.json", self.config.seed))
        })
    }

    fn load_chunk(&self, path: &Path, count: usize) -> Option<Chunk> {
        let text = std::fs::read_to_string(path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let features: Vec<f32> = v
            .get("features")?
            .as_array()?
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<_>>()?;
        (features.len() == count * self.classifier.dim()).then_some(Chunk {
            features,
            seconds: v.get("seconds")?.as_f64()?,
        })
    }

    fn save_chunk(&self, path: &Path, chunk: &Chunk) -> Result<()> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let doc = serde_json::json!({ "seconds": chunk.seconds, "features": chunk.features });
        // Write then rename, so that an interrupted run never leaves a half chunk.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn make_chunk(&self, row: &Row, first: usize, count: usize) -> Result<Chunk> {
        let t0 = Instant::now();
        let il: usize = self.pipeline.image_shape().iter().product();
        let opts = row.options(self.config.seed, first as u64, count);
        let images = match &row.method {
            Method::Real => {
                let end = (first + count) * il;
                if self.train.len() < end {
                    return Err(Error::InvalidParameter {
                        name: "n",
                        message: format!("only {} real images", self.train.len() / il),
                    });
                }
                self.train[first * il..end].to_vec()
            }
            Method::Prior { .. } => self.pipeline.prior_images(&opts)?.data,
            Method::Diffusion { .. } => self.pipeline.generate(&opts)?.data,
        };
        let seconds = match row.method {
            Method::Real => 0.0,
            _ => t0.elapsed().as_secs_f64(),
        };
        let features = self.classifier.features(&images, count.min(50))?;
        Ok(Chunk { features, seconds })
    }

    /// Runs `row`: makes (or reads from the cache) its `N` images' features and computes
    /// the FID. `done(k)` is called with the number of images finished so far.
    pub fn run_row(&self, row: &Row, done: &(dyn Fn(usize) + Sync)) -> Result<RowResult> {
        let (n, chunk) = (self.config.n, self.config.chunk);
        let chunks = n.div_ceil(chunk);
        let results: Mutex<Vec<Option<Chunk>>> = Mutex::new((0..chunks).map(|_| None).collect());
        let next = AtomicUsize::new(0);
        let finished = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let error: Mutex<Option<Error>> = Mutex::new(None);
        let work = || {
            while !failed.load(Ordering::Relaxed) {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= chunks {
                    break;
                }
                let first = k * chunk;
                let count = chunk.min(n - first);
                let path = self.chunk_path(row, first, count);
                let cached = path.as_deref().and_then(|p| self.load_chunk(p, count));
                let made = match cached {
                    Some(c) => Ok(c),
                    None => self.make_chunk(row, first, count).and_then(|c| {
                        if let Some(p) = &path {
                            self.save_chunk(p, &c)?;
                        }
                        Ok(c)
                    }),
                };
                match made {
                    Ok(c) => {
                        results.lock().unwrap_or_else(|p| p.into_inner())[k] = Some(c);
                        done(finished.fetch_add(count, Ordering::Relaxed) + count);
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 0..self.config.workers.min(chunks) {
                s.spawn(work);
            }
        });
        if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let mut features = Vec::with_capacity(n * self.classifier.dim());
        let mut seconds = 0.0;
        for c in results
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .flatten()
        {
            features.extend_from_slice(&c.features);
            seconds += c.seconds;
        }
        let stats = FeatureStats::new(&features, self.classifier.dim())?;
        Ok(RowResult {
            id: row.id.clone(),
            label: row.label.clone(),
            unet_calls: row.unet_calls(self.pipeline)?,
            n,
            fid: frechet_distance(&stats, &self.reference)?,
            seconds_per_image: seconds / n as f64,
        })
    }
}

/// The results as a Markdown table.
pub fn markdown_table(results: &[RowResult]) -> String {
    let mut s = String::from(
        "| method | U-Net calls / image | FID | s / image (1 core) |\n|---|---:|---:|---:|\n",
    );
    for r in results {
        let secs = match r.id.as_str() {
            "real" => "-".to_string(),
            _ if r.seconds_per_image < 0.1 => format!("{:.4}", r.seconds_per_image),
            _ => format!("{:.2}", r.seconds_per_image),
        };
        s.push_str(&format!(
            "| {} | {} | {:.2} | {} |\n",
            r.label, r.unet_calls, r.fid, secs
        ));
    }
    s
}

/// The results as JSON (one object per row).
pub fn json_results(results: &[RowResult]) -> serde_json::Value {
    serde_json::Value::Array(
        results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "label": r.label, "unet_calls": r.unet_calls, "n": r.n,
                    "fid": r.fid, "seconds_per_image": r.seconds_per_image,
                })
            })
            .collect(),
    )
}

/// Writes the figure of the README: for each prior, one line of `count` prior samples
/// and, beside it, ES-DDPM (`T'`, DDPM chain) started from the same latents.
pub fn prior_vs_esddpm_figure(
    pipeline: &Pipeline,
    seed: u64,
    count: usize,
    t_prime: usize,
    path: &Path,
) -> Result<()> {
    const GAP: usize = 8;
    let mut blocks = Vec::new();
    for name in pipeline.prior_names() {
        let opts = GenerateOptions {
            seed,
            batch: count,
            prior: Some(name.to_string()),
            start: Start::EarlyStop {
                t_prime: Some(t_prime),
            },
            sampler: SamplerChoice::Ddpm,
            ..Default::default()
        };
        let prior = pipeline.prior_images(&opts)?.grid(count);
        let es = pipeline.generate(&opts)?.grid(count);
        blocks.push((prior, es));
    }
    let c = pipeline.image_shape()[0].min(3);
    let c = if c == 3 { 3 } else { 1 };
    let Some(((w, h, _), _)) = blocks.first() else {
        return Err(Error::InvalidParameter {
            name: "figure",
            message: "the model folder has no prior".into(),
        });
    };
    let (bw, bh) = (*w, *h);
    let (width, height) = (2 * bw + GAP, blocks.len() * bh);
    let mut px = vec![255u8; width * height * c];
    for (b, ((_, _, left), (_, _, right))) in blocks.iter().enumerate() {
        for y in 0..bh {
            let row = (b * bh + y) * width * c;
            px[row..row + bw * c].copy_from_slice(&left[y * bw * c..(y + 1) * bw * c]);
            let r0 = row + (bw + GAP) * c;
            px[r0..r0 + bw * c].copy_from_slice(&right[y * bw * c..(y + 1) * bw * c]);
        }
    }
    crate::images::write_png(path, width, height, c, &px)
}
