//! The full ES-DDPM loop of `esddpm-core`, end to end, with a **stand-in denoiser**
//! instead of a trained U-Net (the ONNX runtime lands with the runtime issue).
//!
//! The "data" is a set of eight 32x32 template images. For such data the best possible
//! denoiser is known in closed form, so it stands in for a perfectly trained U-Net:
//!
//! ```text
//! w_k  = softmax_k( -|x_t - sqrt(abar) mu_k|^2 / (2 (1 - abar)) )
//! x0^  = sum_k w_k mu_k,        eps^ = (x_t - sqrt(abar) x0^) / sqrt(1 - abar)
//! ```
//!
//! The "prior" is a cheap generator that picks a template from its latent and damages
//! it (a shift, a contrast change, noise), like a weak GAN. The example runs
//!
//! 1. the prior alone,
//! 2. ES-DDPM: the prior's sample diffused to T' and denoised in T' DDPM steps,
//! 3. ES-DDPM with 10 DDIM steps over [0, T'],
//! 4. plain DDPM, 1000 steps from pure noise,
//!
//! prints the distance of each to the nearest template and the denoiser calls per
//! image, and writes a PNG grid (rows in the order above, same latents per column).
//!
//! `cargo run --release --example standin -- --out standin.png`

use clap::Parser;
use esddpm::esddpm_core::*;
use std::path::PathBuf;

const SIZE: usize = 32;
const PIXELS: usize = SIZE * SIZE;
const TEMPLATES: usize = 8;

#[derive(Parser)]
#[command(about = "ES-DDPM with a stand-in (closed-form) denoiser")]
struct Args {
    /// Where to write the PNG grid.
    #[arg(long, default_value = "standin.png")]
    out: PathBuf,
    /// Seed of all noise (the prior's latent, the start noise, the step noise).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per row.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// T': reverse steps of the early-stopped DDPM chain.
    #[arg(long, default_value_t = 100)]
    start: usize,
}

/// Eight procedural shapes in [-1, 1].
fn templates() -> Vec<Vec<f32>> {
    (0..TEMPLATES)
        .map(|k| {
            (0..PIXELS)
                .map(|p| {
                    let (y, x) = ((p / SIZE) as f32 - 15.5, (p % SIZE) as f32 - 15.5);
                    let r = (x * x + y * y).sqrt();
                    let on = match k {
                        0 => r < 10.0,
                        1 => x.abs() < 9.0 && y.abs() < 9.0,
                        2 => x.abs() < 3.0 || y.abs() < 3.0,
                        3 => ((y + 16.0) as usize / 4).is_multiple_of(2),
                        4 => ((x + 16.0) as usize / 4).is_multiple_of(2),
                        5 => (x - y).abs() < 4.0,
                        6 => (7.0..12.0).contains(&r),
                        _ => (((x + 16.0) as usize / 8) + ((y + 16.0) as usize / 8))
                            .is_multiple_of(2),
                    };
                    if on {
                        1.0
                    } else {
                        -1.0
                    }
                })
                .collect()
        })
        .collect()
}

/// The cheap prior: template chosen by the latent, shifted, contrast-reduced, noisy.
fn prior_sample(z: &[f32], templates: &[Vec<f32>]) -> Vec<f32> {
    let k = ((z[0].abs() * 1000.0) as usize) % TEMPLATES;
    let (dx, dy) = ((z[1] * 2.0).round() as i64, (z[2] * 2.0).round() as i64);
    let contrast = 0.6 + 0.2 * z[3].tanh();
    (0..PIXELS)
        .map(|p| {
            let (y, x) = ((p / SIZE) as i64 - dy, (p % SIZE) as i64 - dx);
            let v = if (0..SIZE as i64).contains(&x) && (0..SIZE as i64).contains(&y) {
                templates[k][y as usize * SIZE + x as usize]
            } else {
                -1.0
            };
            (contrast * v + 0.25 * z[4 + p % 60]).clamp(-1.0, 1.0)
        })
        .collect()
}

/// The closed-form epsilon prediction for the template mixture.
fn ideal_eps(x: &[f32], abar: f64, templates: &[Vec<f32>], out: &mut [f32]) {
    let (a, s2) = (abar.sqrt(), 1.0 - abar);
    for (img, o) in x.chunks(PIXELS).zip(out.chunks_mut(PIXELS)) {
        let logits: Vec<f64> = templates
            .iter()
            .map(|mu| {
                let d: f64 = img
                    .iter()
                    .zip(mu)
                    .map(|(&xv, &m)| (f64::from(xv) - a * f64::from(m)).powi(2))
                    .sum();
                -d / (2.0 * s2)
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = w.iter().sum();
        for (p, ov) in o.iter_mut().enumerate() {
            let x0: f64 = w
                .iter()
                .zip(templates)
                .map(|(wk, mu)| wk * f64::from(mu[p]))
                .sum::<f64>()
                / total;
            *ov = ((f64::from(img[p]) - a * x0) / s2.sqrt()) as f32;
        }
    }
}

/// Index of the nearest template of each image.
fn nearest(images: &[f32], templates: &[Vec<f32>]) -> Vec<usize> {
    images
        .chunks(PIXELS)
        .map(|img| {
            let d = |mu: &Vec<f32>| -> f64 {
                img.iter()
                    .zip(mu)
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum()
            };
            (0..templates.len())
                .min_by(|&i, &j| d(&templates[i]).total_cmp(&d(&templates[j])))
                .unwrap_or(0)
        })
        .collect()
}

/// Share of images whose nearest template is the one the prior drew.
fn kept(images: &[f32], classes: &[usize], templates: &[Vec<f32>]) -> f64 {
    let n = nearest(images, templates);
    n.iter().zip(classes).filter(|(a, b)| a == b).count() as f64 / classes.len() as f64
}

/// Root-mean-square distance of each image to its nearest template, averaged.
fn distance_to_data(images: &[f32], templates: &[Vec<f32>]) -> f64 {
    let per: Vec<f64> = images
        .chunks(PIXELS)
        .map(|img| {
            templates
                .iter()
                .map(|mu| {
                    let d: f64 = img
                        .iter()
                        .zip(mu)
                        .map(|(a, b)| f64::from(a - b).powi(2))
                        .sum();
                    (d / PIXELS as f64).sqrt()
                })
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    per.iter().sum::<f64>() / per.len() as f64
}

/// What every run shares.
struct Setup<'a> {
    schedule: NoiseSchedule<'a>,
    shape: ImageShape,
    seed: u64,
    templates: &'a [Vec<f32>],
}

/// Runs one sampler over the batch; returns the images and the denoiser calls.
fn sample(
    setup: &Setup<'_>,
    kind: SamplerKind,
    chain: &[u32],
    start: StartAt,
    init: Init<'_>,
) -> Result<(Vec<f32>, usize)> {
    let Setup {
        schedule,
        shape,
        seed,
        templates,
    } = *setup;
    let config = SamplerConfig {
        kind,
        ..Default::default()
    };
    let mut sampler = Sampler::new(schedule, chain, start, config, shape, seed)?;
    let mut x = vec![0.0f32; shape.len()];
    let mut out = vec![0.0f32; sampler.model_output_len()];
    let mut work = vec![0.0f32; sampler.workspace_len()];
    sampler.init(&mut x, init)?;
    while let Some(call) = sampler.next_call() {
        // The model sees x at the original training timestep.
        ideal_eps(
            &x,
            schedule.alpha_cumprod(call.timestep as usize),
            templates,
            &mut out,
        );
        sampler.step(&mut x, &out, &mut work)?;
    }
    Ok((x, sampler.num_steps()))
}

fn write_grid(path: &PathBuf, rows: &[&[f32]], cols: usize) -> std::io::Result<()> {
    let (w, h) = (cols * (SIZE + 2), rows.len() * (SIZE + 2));
    let mut pixels = vec![255u8; w * h];
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.chunks(PIXELS).enumerate() {
            for (p, &v) in img.iter().enumerate() {
                let (y, x) = (r * (SIZE + 2) + 1 + p / SIZE, c * (SIZE + 2) + 1 + p % SIZE);
                pixels[y * w + x] = (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
            }
        }
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, w as u32, h as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&pixels)?;
    Ok(())
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let templates = templates();
    let shape = ImageShape::new(args.batch, 1, SIZE, SIZE)?;

    // prior -> start -> sampler steps -> image
    let mut abar = vec![0.0f64; 1000];
    let schedule = NoiseSchedule::new(&ScheduleConfig::default(), &mut abar)?;
    let noise = NoiseSource::new(args.seed);
    let mut prior = Vec::with_capacity(shape.len());
    let mut classes = Vec::with_capacity(args.batch);
    for n in 0..args.batch {
        let mut z = [0.0f32; 64];
        noise.fill(n as u64, Draw::Latent, &mut z);
        classes.push(((z[0].abs() * 1000.0) as usize) % TEMPLATES);
        prior.extend(prior_sample(&z, &templates));
    }

    let mut full = vec![0u32; 1000];
    let full = Respacing::parse("1000")?.fill(1000, &mut full)?;
    let mut ddim = vec![0u32; 100];
    let ddim = Respacing::parse("ddim100")?.fill(1000, &mut ddim)?;
    let ddpm = SamplerKind::Ddpm {
        variance_type: VarianceType::FixedSmall,
    };
    let ddim_kind = SamplerKind::Ddim {
        eta: 0.0,
        use_clipped_model_output: false,
    };
    let setup = Setup {
        schedule,
        shape,
        seed: args.seed,
        templates: &templates,
    };
    let t_prime = args.start;
    let (es, es_calls) = sample(
        &setup,
        ddpm,
        full,
        StartAt::EarlyStop { steps: t_prime },
        Init::Image(&prior),
    )?;
    let (es_ddim, es_ddim_calls) = sample(
        &setup,
        ddim_kind,
        ddim,
        StartAt::Timestep(t_prime as u32 - 1),
        Init::Image(&prior),
    )?;
    let (plain, plain_calls) = sample(&setup, ddpm, full, StartAt::Full, Init::Noise)?;

    println!(
        "stand-in denoiser (closed form), {} images of 32x32, seed {}",
        args.batch, args.seed
    );
    println!("| run | denoiser calls / image | RMS distance to nearest template | keeps the prior's template |");
    println!("|---|---|---|---|");
    let rows: [(String, usize, &[f32]); 4] = [
        ("prior alone".into(), 0, &prior),
        (format!("ES-DDPM, DDPM from T'={t_prime}"), es_calls, &es),
        (
            format!("ES-DDPM, DDIM over [0, {t_prime})"),
            es_ddim_calls,
            &es_ddim,
        ),
        ("DDPM from noise, 1000 steps".into(), plain_calls, &plain),
    ];
    for (name, calls, images) in rows {
        println!(
            "| {name} | {calls} | {:.4} | {:.0}% |",
            distance_to_data(images, &templates),
            100.0 * kept(images, &classes, &templates)
        );
    }
    write_grid(&args.out, &[&prior, &es, &es_ddim, &plain], args.batch)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
