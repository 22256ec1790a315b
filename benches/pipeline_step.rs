//! The pipeline's own cost per step beside the U-Net forward, at batch 1.
//!
//! `cargo bench --bench pipeline_step [-- MODEL_FOLDER]` (default: the shipped models,
//! else the random-weight test models). Prints the medians of 30 rounds of:
//! the U-Net forward alone (tract, batch 1, the pipeline's thread count), one full
//! `Session::step` (forward + tensors + sampler + buffer copies), and the share of the
//! step that is not the forward.

use esddpm::{GenerateOptions, LoadOptions, Pipeline, SamplerChoice, Start};
use std::path::PathBuf;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let folder = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let shipped = root.join("models/fashion");
            if shipped.join("esddpm.json").is_file() {
                shipped
            } else {
                root.join("tests/models/tiny")
            }
        });
    let threads = 1;
    let p = Pipeline::from_folder(
        &folder,
        &LoadOptions {
            threads: Some(threads),
        },
    )
    .expect("load");
    let [c, h, w] = p.image_shape();
    let executor = tract_linalg::multithread::Executor::SingleThread;
    let rounds = 30;
    println!("model folder: {}", folder.display());
    println!("| sampler | U-Net forward (ms) | full step (ms) | pipeline share |");
    println!("|---|---|---|---|");
    for (name, sampler) in [
        ("DDPM", SamplerChoice::Ddpm),
        ("DDIM eta=0", SamplerChoice::Ddim { eta: 0.0 }),
        ("DPM-Solver++", SamplerChoice::DpmSolver),
    ] {
        let o = GenerateOptions {
            seed: 1,
            batch: 1,
            start: Start::EarlyStop {
                t_prime: Some(1000),
            },
            sampler,
            steps: Some(rounds * 2 + 1),
            ..Default::default()
        };
        let mut s = p.session(&o).expect("session");
        s.step().expect("warm-up step");
        let x = s.sample().to_vec();
        let mut out = vec![0.0f32; p.unet().out_channels() * h * w];
        let mut fwd = Vec::new();
        let mut step = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            p.unet()
                .run(1, &x, 500, &mut out, &executor)
                .expect("forward");
            fwd.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            s.step().expect("step");
            step.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (f, st) = (median(fwd), median(step));
        println!(
            "| {name} | {f:.3} | {st:.3} | {:.2}% |",
            100.0 * (st - f).max(0.0) / st
        );
    }
    println!("(batch 1, {c}x{h}x{w}, {threads} thread, medians of {rounds})");
}
