//! Measures what differs across CPUs: writes the shipped models' outputs on fixed
//! inputs on one machine, and compares two such folders.
//!
//! ```text
//! cargo run --release --example determinism -- write OUT_DIR [MODEL_DIR]
//! cargo run --release --example determinism -- compare DIR_A DIR_B
//! ```
//!
//! `write` records, with one tract thread: the U-Net's output at t = 10, 500, 999 on
//! seeded inputs (`unet.f32`), the GAN's and the VAE's images on seeded latents
//! (`gan.f32`, `vae.f32`), an ES-DDPM run (T' = 100, 10 DDIM steps, 4 images;
//! `es_ddim.f32`, `es_ddim.u8`) and an ES-DDPM run with the DDPM chain (T' = 100, 100
//! steps, 1 image; `es_ddpm.f32`, `es_ddpm.u8`), plus `cpu.txt`. `compare` prints, per
//! file, how many values differ and the largest absolute difference; README.md
//! ("Determinism") quotes its output for two x86_64 CPUs and aarch64.

use esddpm::esddpm_core::{Draw, NoiseSource};
use esddpm::{GenerateOptions, LoadOptions, Pipeline, SamplerChoice, Start};
use std::path::{Path, PathBuf};

fn write_f32(path: &Path, v: &[f32]) -> std::io::Result<()> {
    std::fs::write(
        path,
        v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
    )
}

fn read_f32(path: &Path) -> std::io::Result<Vec<f32>> {
    Ok(std::fs::read(path)?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn cpu_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("CPU implementer"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    format!(
        "{} {} ({name})",
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

fn write(out: &Path, models: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(out)?;
    let p = Pipeline::from_folder(
        models,
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )?;
    let [c, h, w] = p.image_shape();
    let n = c * h * w;
    let noise = NoiseSource::new(7);
    let executor = tract_linalg::multithread::Executor::SingleThread;
    let mut unet = Vec::new();
    for (i, t) in [10u32, 500, 999].into_iter().enumerate() {
        let mut x = vec![0.0f32; n];
        noise.fill(i as u64, Draw::Start, &mut x);
        let mut o = vec![0.0f32; n * p.unet().out_channels() / c];
        p.unet().run(1, &x, t, &mut o, &executor)?;
        unet.extend_from_slice(&o);
    }
    write_f32(&out.join("unet.f32"), &unet)?;
    for prior in ["gan", "vae"] {
        if p.prior(prior).is_none() {
            continue;
        }
        let images = p.prior_images(&GenerateOptions {
            seed: 11,
            batch: 4,
            prior: Some(prior.into()),
            ..Default::default()
        })?;
        write_f32(&out.join(format!("{prior}.f32")), &images.data)?;
    }
    for (name, sampler, steps, batch) in [
        ("es_ddim", SamplerChoice::Ddim { eta: 0.0 }, 10, 4),
        ("es_ddpm", SamplerChoice::Ddpm, 100, 1),
    ] {
        let images = p.generate(&GenerateOptions {
            seed: 0,
            batch,
            start: Start::EarlyStop { t_prime: Some(100) },
            sampler,
            steps: Some(steps),
            ..Default::default()
        })?;
        write_f32(&out.join(format!("{name}.f32")), &images.data)?;
        let u8s: Vec<u8> = (0..batch).flat_map(|i| images.to_u8(i)).collect();
        std::fs::write(out.join(format!("{name}.u8")), u8s)?;
    }
    std::fs::write(out.join("cpu.txt"), cpu_name() + "\n")?;
    println!("wrote {} on {}", out.display(), cpu_name());
    Ok(())
}

fn compare(a: &Path, b: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let cpu = |d: &Path| std::fs::read_to_string(d.join("cpu.txt")).unwrap_or_default();
    println!("A: {}", cpu(a).trim());
    println!("B: {}", cpu(b).trim());
    println!("| output | values | differing | max abs difference |");
    println!("|---|---|---|---|");
    for f in ["unet", "gan", "vae", "es_ddim", "es_ddpm"] {
        let (pa, pb) = (a.join(format!("{f}.f32")), b.join(format!("{f}.f32")));
        if !pa.exists() || !pb.exists() {
            continue;
        }
        let (va, vb) = (read_f32(&pa)?, read_f32(&pb)?);
        let differing = va
            .iter()
            .zip(&vb)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        let max = va
            .iter()
            .zip(&vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        println!("| {f} (f32) | {} | {differing} | {max:.3e} |", va.len());
        let (ua, ub) = (a.join(format!("{f}.u8")), b.join(format!("{f}.u8")));
        if ua.exists() && ub.exists() {
            let (ba, bb) = (std::fs::read(ua)?, std::fs::read(ub)?);
            let differing = ba.iter().zip(&bb).filter(|(x, y)| x != y).count();
            let max = ba
                .iter()
                .zip(&bb)
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap_or(0);
            println!(
                "| {f} (8-bit pixels) | {} | {differing} | {max} |",
                ba.len()
            );
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match args.first().map(String::as_str) {
        Some("write") if args.len() >= 2 => {
            let models = args
                .get(2)
                .map_or_else(|| root.join("models/fashion"), PathBuf::from);
            write(Path::new(&args[1]), &models)
        }
        Some("compare") if args.len() == 3 => compare(Path::new(&args[1]), Path::new(&args[2])),
        _ => {
            eprintln!(
                "usage: determinism write OUT_DIR [MODEL_DIR] | determinism compare DIR_A DIR_B"
            );
            std::process::exit(2);
        }
    }
}
