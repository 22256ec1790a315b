//! `esddpm`: ES-DDPM image generation from the command line.

use clap::{Args, Parser, Subcommand, ValueEnum};
use esddpm::{slerp, GenerateOptions, Images, LoadOptions, Pipeline, SamplerChoice, Start};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The shipped models, and the random-weight test models as a fallback.
const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fashion");
const TEST_MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/models/tiny");

#[derive(Parser)]
#[command(
    name = "esddpm",
    version,
    about = "ES-DDPM: a cheap prior plus a short diffusion chain"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images: the prior's samples, diffused to T' and denoised (ES-DDPM).
    Generate(GenerateArgs),
    /// Start from your image instead of the prior's (SDEdit / img2img).
    Img2img {
        #[command(flatten)]
        common: GenerateArgs,
        /// The input image (PNG of the model's size).
        #[arg(long)]
        init: PathBuf,
        /// img2img strength in (0, 1] (diffusers' convention) instead of --start.
        #[arg(long)]
        strength: Option<f64>,
    },
    /// Keep the pixels of an image where the mask is black and generate the white part.
    Inpaint {
        #[command(flatten)]
        common: GenerateArgs,
        /// The known image (PNG of the model's size).
        #[arg(long)]
        init: PathBuf,
        /// Mask PNG: white = generate, black = keep (diffusers' convention).
        #[arg(long)]
        mask: PathBuf,
    },
    /// Walk between the prior latents of two seeds (slerp) and denoise each frame.
    Interpolate {
        #[command(flatten)]
        common: GenerateArgs,
        /// The second seed (the first is --seed).
        #[arg(long)]
        seed_b: u64,
        /// Frames, including both ends.
        #[arg(long, default_value_t = 8)]
        frames: usize,
    },
    /// The FID benchmark: prior alone, DDPM/DDIM from noise and ES-DDPM, N images
    /// each, FID in the folder's classifier features against the Fashion-MNIST test set.
    Eval(EvalArgs),
    /// Describe a model folder.
    Info {
        /// Model folder (default: the shipped models).
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct EvalArgs {
    /// Model folder with a classifier entry (default: the shipped models).
    #[arg(long, default_value = SHIPPED)]
    model: PathBuf,
    /// Folder of the Fashion-MNIST IDX files (gzip'd or not).
    #[arg(long, default_value = esddpm::dataset::DEFAULT_DIR)]
    data: PathBuf,
    /// Generated images per row (the same for every row).
    #[arg(long, default_value_t = 2000)]
    n: usize,
    /// Seed of every row.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images made at once, one core each (default: physical cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Images per cached chunk.
    #[arg(long, default_value_t = 25)]
    chunk: usize,
    /// Only these rows (ids from --list), comma-separated.
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// List the rows and their U-Net calls, then stop.
    #[arg(long)]
    list: bool,
    /// Chunk cache (a subfolder per model-folder fingerprint): an interrupted run
    /// resumes from it.
    #[arg(long, default_value = "target/eval-cache")]
    cache: PathBuf,
    /// Recompute everything, ignoring and not writing the cache.
    #[arg(long)]
    no_cache: bool,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the figure: each prior's samples beside ES-DDPM (T' = 100, DDPM
    /// chain) from the same latents.
    #[arg(long)]
    figure: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SamplerArg {
    Ddpm,
    Ddim,
    Dpm,
}

#[derive(Args, Clone)]
struct GenerateArgs {
    /// Model folder (default: the shipped models).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Seed; negative or absent picks a random one (printed).
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<i64>,
    /// Number of images.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// T': reverse steps of the full chain to run (default: the folder's recommendation).
    #[arg(long)]
    start: Option<usize>,
    /// Start from pure noise over the whole chain (the vanilla DDPM baseline).
    #[arg(long, conflicts_with = "start")]
    from_noise: bool,
    /// The reverse sampler.
    #[arg(long, value_enum, default_value = "ddpm")]
    sampler: SamplerArg,
    /// DDIM's eta.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Reverse steps (U-Net calls); default: T' for DDPM, 10 for DDIM/DPM.
    #[arg(long)]
    steps: Option<usize>,
    /// Which prior (see `esddpm info`).
    #[arg(long)]
    prior: Option<String>,
    /// Class label for a class-conditional prior (all images).
    #[arg(long)]
    class: Option<i64>,
    /// Threads (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Plan cache directory: the first run saves tract's decluttered models there, later
    /// runs start faster and with less memory (created if missing).
    #[arg(long)]
    plan_cache: Option<PathBuf>,
    /// Output PNG grid.
    #[arg(long, default_value = "esddpm.png")]
    out: PathBuf,
    /// Also write the prior's images (before diffusion) to this PNG.
    #[arg(long)]
    prior_out: Option<PathBuf>,
    /// Grid columns.
    #[arg(long, default_value_t = 8)]
    cols: usize,
    /// Don't clip the predicted x0 (overrides the config).
    #[arg(long)]
    no_clip: bool,
}

fn pick_seed(seed: Option<i64>) -> u64 {
    match seed {
        Some(s) if s >= 0 => s as u64,
        _ => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            (t ^ (u64::from(std::process::id()) << 32)) & (i64::MAX as u64)
        }
    }
}

fn load(
    model: &Option<PathBuf>,
    threads: Option<usize>,
    plan_cache: Option<PathBuf>,
) -> esddpm::Result<Pipeline> {
    let folder = match model {
        Some(m) => m.clone(),
        None if Path::new(SHIPPED).join("esddpm.json").is_file() => PathBuf::from(SHIPPED),
        None => {
            eprintln!("note: shipped models not found; using the random-weight test models in {TEST_MODELS}");
            PathBuf::from(TEST_MODELS)
        }
    };
    let p = Pipeline::from_folder(
        &folder,
        &LoadOptions {
            threads,
            plan_cache,
            ..Default::default()
        },
    )?;
    for w in p.warnings() {
        eprintln!("warning: {w}");
    }
    Ok(p)
}

fn options(a: &GenerateArgs, seed: u64) -> GenerateOptions {
    GenerateOptions {
        seed,
        batch: a.batch,
        start: if a.from_noise {
            Start::Noise
        } else {
            Start::EarlyStop { t_prime: a.start }
        },
        sampler: match a.sampler {
            SamplerArg::Ddpm => SamplerChoice::Ddpm,
            SamplerArg::Ddim => SamplerChoice::Ddim { eta: a.eta },
            SamplerArg::Dpm => SamplerChoice::DpmSolver,
        },
        steps: a.steps,
        clip_sample: a.no_clip.then_some(false),
        prior: a.prior.clone(),
        class_labels: a.class.map(|c| vec![c; a.batch]),
        ..Default::default()
    }
}

/// Reads a PNG of the model's size into [-1, 1], C channels.
fn read_png(path: &Path, [c, h, w]: [usize; 3]) -> Result<Vec<f32>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or("PNG too large")?];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if (info.width as usize, info.height as usize) != (w, h) {
        return Err(format!(
            "{} is {}x{}; the model needs {w}x{h}",
            path.display(),
            info.width,
            info.height
        ));
    }
    let src_c = info.color_type.samples();
    let mut out = vec![0.0f32; c * h * w];
    for p in 0..h * w {
        let px = &buf[p * src_c..(p + 1) * src_c];
        let gray = if src_c >= 3 {
            (u32::from(px[0]) + u32::from(px[1]) + u32::from(px[2])) as f32 / 3.0
        } else {
            f32::from(px[0])
        };
        for ch in 0..c {
            let v = if c == 1 || src_c < 3 {
                gray
            } else {
                f32::from(px[ch.min(2)])
            };
            out[ch * h * w + p] = v / 255.0 * 2.0 - 1.0;
        }
    }
    Ok(out)
}

fn run_with_bar(p: &Pipeline, o: &GenerateOptions) -> esddpm::Result<Images> {
    let bar = ProgressBar::no_length();
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps, t={msg} [{elapsed_precise}]")
            .expect("valid template"),
    );
    let images = p.generate_with(
        o,
        |progress| {
            bar.set_length(progress.total as u64);
            bar.set_message(progress.info.timestep.to_string());
            bar.inc(1);
        },
        None,
    )?;
    bar.finish();
    Ok(images)
}

fn generate_cmd(p: &Pipeline, a: &GenerateArgs, o: GenerateOptions) -> Result<(), String> {
    println!("seed: {}", o.seed);
    if let Some(path) = &a.prior_out {
        if o.init_image.is_none() && !matches!(o.start, Start::Noise) {
            p.prior_images(&o)
                .map_err(|e| e.to_string())?
                .save_png_grid(path, a.cols)
                .map_err(|e| e.to_string())?;
            println!("prior images: {}", path.display());
        }
    }
    let images = run_with_bar(p, &o).map_err(|e| e.to_string())?;
    images
        .save_png_grid(&a.out, a.cols)
        .map_err(|e| e.to_string())?;
    println!("wrote {} ({} images)", a.out.display(), images.len());
    Ok(())
}

/// A hash of every file of the model folder (names and bytes), so that the eval cache
/// of one set of models is never read for another.
fn folder_fingerprint(folder: &Path) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let mut h = DefaultHasher::new();
    for f in files.iter().filter(|f| f.is_file()) {
        f.file_name().hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn eval_cmd(a: &EvalArgs) -> Result<(), String> {
    use esddpm::classifier::Classifier;
    use esddpm::dataset::{load_fashion_mnist, Split};
    use esddpm::eval::{self, EvalConfig, Evaluator};
    let err = |e: esddpm::Error| e.to_string();
    // One tract thread per pipeline call: the workers are the parallelism.
    let p = load(&Some(a.model.clone()), Some(1), None).map_err(err)?;
    let mut rows = eval::standard_rows(&p);
    if !a.rows.is_empty() {
        for r in &a.rows {
            if !rows.iter().any(|x| &x.id == r) {
                return Err(format!("no row {r:?}; see --list"));
            }
        }
        rows.retain(|x| a.rows.contains(&x.id));
    }
    if a.list {
        for r in &rows {
            println!(
                "{:<22} {:>5} U-Net calls  {}",
                r.id,
                r.unet_calls(&p).map_err(err)?,
                r.label
            );
        }
        return Ok(());
    }
    if let Some(path) = &a.figure {
        eval::prior_vs_esddpm_figure(&p, a.seed, 8, 100, path).map_err(err)?;
        println!("wrote {}", path.display());
    }
    let text = std::fs::read_to_string(a.model.join("esddpm.json"))
        .map_err(|e| format!("{}: {e}", a.model.join("esddpm.json").display()))?;
    let entry = esddpm::EsddpmConfig::from_json(&text)
        .map_err(err)?
        .classifier
        .ok_or_else(|| format!("{}/esddpm.json has no classifier entry", a.model.display()))?;
    let classifier = Classifier::from_folder(&a.model, &entry, p.image_shape()).map_err(err)?;
    let (_, test) = load_fashion_mnist(&a.data, Split::Test).map_err(err)?;
    let train = if rows.iter().any(|r| r.method == eval::Method::Real) {
        load_fashion_mnist(&a.data, Split::Train).map_err(err)?.1
    } else {
        Vec::new()
    };
    let workers = a.workers.unwrap_or_else(num_cpus::get_physical).max(1);
    let config = EvalConfig {
        n: a.n,
        seed: a.seed,
        workers,
        chunk: a.chunk,
        cache_dir: (!a.no_cache).then(|| a.cache.join(folder_fingerprint(&a.model))),
    };
    eprintln!(
        "{} rows x {} images, seed {}, {workers} workers; cache: {}",
        rows.len(),
        a.n,
        a.seed,
        if a.no_cache {
            "off".to_string()
        } else {
            a.cache.display().to_string()
        }
    );
    let ev = Evaluator::new(&p, &classifier, &test, &train, config).map_err(err)?;
    let mut results = Vec::new();
    let started = std::time::Instant::now();
    for row in &rows {
        let bar = ProgressBar::new(a.n as u64).with_style(
            ProgressStyle::with_template("{msg:<22} [{bar:30}] {pos}/{len} images, eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(row.id.clone());
        let r = ev
            .run_row(row, &|k| bar.set_position(k as u64))
            .map_err(err)?;
        bar.finish_and_clear();
        eprintln!(
            "{:<22} calls {:>5}  FID {:>8.2}  {:.4} s/image",
            r.id, r.unet_calls, r.fid, r.seconds_per_image
        );
        results.push(r);
    }
    println!(
        "N = {} generated images per row, seed {}, FID against the {} test images\n",
        a.n,
        a.seed,
        test.len() / 1024
    );
    print!("{}", eval::markdown_table(&results));
    eprintln!("total {:.1} min", started.elapsed().as_secs_f64() / 60.0);
    if let Some(path) = &a.json {
        let doc =
            serde_json::json!({"n": a.n, "seed": a.seed, "rows": eval::json_results(&results)});
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn real_main() -> Result<(), String> {
    let cli = Cli::parse();
    match cli.command {
        Command::Eval(a) => eval_cmd(&a)?,
        Command::Info { model } => {
            let p = load(&model, None, None).map_err(|e| e.to_string())?;
            print!("{}", p.describe());
        }
        Command::Generate(a) => {
            let p = load(&a.model, a.threads, a.plan_cache.clone()).map_err(|e| e.to_string())?;
            let o = options(&a, pick_seed(a.seed));
            generate_cmd(&p, &a, o)?;
        }
        Command::Img2img {
            common: a,
            init,
            strength,
        } => {
            let p = load(&a.model, a.threads, a.plan_cache.clone()).map_err(|e| e.to_string())?;
            let mut o = options(&a, pick_seed(a.seed));
            o.init_image = Some(read_png(&init, p.image_shape())?);
            if let Some(s) = strength {
                o.start = Start::Strength(s);
            }
            generate_cmd(&p, &a, o)?;
        }
        Command::Inpaint {
            common: a,
            init,
            mask,
        } => {
            let p = load(&a.model, a.threads, a.plan_cache.clone()).map_err(|e| e.to_string())?;
            let mut o = options(&a, pick_seed(a.seed));
            let [_, h, w] = p.image_shape();
            o.init_image = Some(read_png(&init, p.image_shape())?);
            let m = read_png(&mask, [1, h, w])?;
            // white (1) = generate, black (-1) = keep
            o.inpaint_mask = Some(m.iter().map(|v| (1.0 - v) / 2.0).collect());
            generate_cmd(&p, &a, o)?;
        }
        Command::Interpolate {
            common: a,
            seed_b,
            frames,
        } => {
            if frames < 2 {
                return Err("--frames must be at least 2".into());
            }
            let p = load(&a.model, a.threads, a.plan_cache.clone()).map_err(|e| e.to_string())?;
            let seed_a = pick_seed(a.seed);
            let one = |seed| {
                let mut o = options(&a, seed);
                o.batch = 1;
                p.latents(&o).map_err(|e| e.to_string())
            };
            let (za, zb) = (one(seed_a)?, one(seed_b)?);
            println!("seeds: {seed_a} -> {seed_b}");
            // Every frame is image 0 of its own run, so all frames share the start and
            // step noise and only the latent moves.
            let mut data = Vec::new();
            let mut shape = None;
            for k in 0..frames {
                let mut o = options(&a, seed_a);
                o.batch = 1;
                o.latents = Some(
                    slerp(&za, &zb, k as f32 / (frames - 1) as f32).map_err(|e| e.to_string())?,
                );
                o.class_labels = a.class.map(|c| vec![c]);
                let img = p.generate(&o).map_err(|e| e.to_string())?;
                shape = Some(img.shape);
                data.extend(img.data);
            }
            let mut shape = shape.expect("frames >= 2");
            shape.batch = frames;
            let images = Images { shape, data };
            images
                .save_png_grid(&a.out, a.cols)
                .map_err(|e| e.to_string())?;
            println!("wrote {} ({frames} frames)", a.out.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
