//! The pipeline's own cost per step beside the U-Net forward, at batch 1.
//!
//! `cargo bench --bench pipeline_step [-- MODEL_FOLDER]` (default: the shipped models,
//! else the random-weight test models). Prints the medians of 100 interleaved rounds of:
//! the U-Net forward alone (tract, batch 1, one thread, reused run state), one full
//! `Session::step` (forward + input tensors + sampler + copies), and the sampler step
//! alone (`esddpm_core`, same shape and config). The pipeline's share is the sampler
//! step over the full step; the difference of the two medians is printed beside it as
//! a cross-check (it is within the forward's run-to-run noise).

use esddpm::esddpm_core as core;
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
            ..Default::default()
        },
    )
    .expect("load");
    let [c, h, w] = p.image_shape();
    let executor = tract_linalg::multithread::Executor::SingleThread;
    let rounds = 100;
    println!("model folder: {}", folder.display());
    println!("| sampler | U-Net forward (ms) | full step (ms) | sampler step alone (ms) | pipeline share | step - forward |");
    println!("|---|---|---|---|---|---|");
    let variance_type = p.scheduler_config().variance_type;
    for (name, sampler, kind) in [
        (
            "DDPM",
            SamplerChoice::Ddpm,
            core::SamplerKind::Ddpm { variance_type },
        ),
        (
            "DDIM eta=0",
            SamplerChoice::Ddim { eta: 0.0 },
            core::SamplerKind::Ddim {
                eta: 0.0,
                use_clipped_model_output: false,
            },
        ),
        (
            "DPM-Solver++",
            SamplerChoice::DpmSolver,
            core::SamplerKind::DpmSolverPlusPlus2M,
        ),
    ] {
        // The core sampler alone, on the same shape.
        let schedule =
            core::NoiseSchedule::from_alphas_cumprod(p.alphas_cumprod()).expect("schedule");
        let chain: Vec<u32> = (0..1000u32).rev().collect();
        let shape = core::ImageShape::new(1, c, h, w).expect("shape");
        let config = core::SamplerConfig {
            kind,
            x0: p.scheduler_config().x0_options(),
            set_alpha_to_one: true,
        };
        let mut base = core::Sampler::new(schedule, &chain, core::StartAt::Full, config, shape, 1)
            .expect("sampler");
        let mut cx = vec![0.1f32; shape.len()];
        base.init(&mut cx, core::Init::Noise).expect("init");
        let cout = vec![0.05f32; base.model_output_len()];
        let mut cwork = vec![0.0f32; base.workspace_len()];
        base.step(&mut cx, &cout, &mut cwork).expect("step");
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
        // The forward alone, with a reused run state as the session has.
        let mut state = p.unet().state(1).expect("state");
        let mut fwd = Vec::new();
        let mut step = Vec::new();
        let mut samp = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            p.unet()
                .run_in(&mut state, &x, 500, &mut out, &executor)
                .expect("forward");
            fwd.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            s.step().expect("step");
            step.push(t.elapsed().as_secs_f64() * 1e3);
            let mut one = base.clone();
            let t = Instant::now();
            one.step(&mut cx, &cout, &mut cwork).expect("sampler step");
            samp.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (f, st, sa) = (median(fwd), median(step), median(samp));
        println!(
            "| {name} | {f:.3} | {st:.3} | {sa:.4} | {:.2}% | {:+.3} ms |",
            100.0 * sa / st,
            st - f
        );
    }
    println!("(batch 1, {c}x{h}x{w}, {threads} thread, medians of {rounds})");
}
