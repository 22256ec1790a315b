//! End-to-end smoke test on the shipped Fashion-MNIST models (`models/fashion`, trained
//! and exported by `tools/train/`): tract agrees with onnxruntime on the exported
//! reference inputs, and ES-DDPM runs with each prior.

mod common;

use common::{f32s, max_diff};
use esddpm::*;
use serde_json::Value;
use std::path::PathBuf;

fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fashion")
}

fn load(threads: usize) -> Pipeline {
    Pipeline::from_folder(
        folder(),
        &LoadOptions {
            threads: Some(threads),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn tract_matches_onnxruntime_on_the_shipped_models() {
    let p = load(1);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(folder().join("reference.json")).unwrap())
            .unwrap();
    let exec = tract_linalg::multithread::Executor::SingleThread;
    let unet = &r["models"]["unet"];
    let sample = f32s(&unet["inputs"]["sample"]["data"]);
    let ts: Vec<u32> = unet["inputs"]["timestep"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let expect = f32s(&unet["outputs"]["noise_pred"]["data"]);
    let il = sample.len() / ts.len();
    let mut out = vec![0.0f32; il];
    for (i, &t) in ts.iter().enumerate() {
        p.unet()
            .run(1, &sample[i * il..(i + 1) * il], t, &mut out, &exec)
            .unwrap();
        let d = max_diff(&out, &expect[i * il..(i + 1) * il]);
        assert!(d <= 1e-4, "U-Net image {i}: max abs diff {d}");
    }
    for (model, prior) in [("gan_generator", "gan"), ("vae_decoder", "vae")] {
        let m = &r["models"][model];
        let z = f32s(&m["inputs"]["z"]["data"]);
        let expect = f32s(&m["outputs"]["image"]["data"]);
        let batch = m["inputs"]["z"]["shape"][0].as_u64().unwrap() as usize;
        let mut out = vec![0.0f32; expect.len()];
        p.prior(prior)
            .unwrap()
            .run(batch, &z, None, &mut out, &exec)
            .unwrap();
        let d = max_diff(&out, &expect);
        assert!(d <= 1e-4, "{model}: max abs diff {d}");
    }
}

#[test]
fn es_ddpm_runs_with_each_shipped_prior() {
    let p = load(1);
    assert_eq!(p.image_shape(), [1, 32, 32]);
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
    for prior in ["gan", "vae"] {
        let o = GenerateOptions {
            seed: 3,
            batch: 2,
            prior: Some(prior.into()),
            start: Start::EarlyStop { t_prime: Some(100) },
            sampler: SamplerChoice::Ddim { eta: 0.0 },
            steps: Some(10),
            ..Default::default()
        };
        let x0 = p.prior_images(&o).unwrap();
        let img = p.generate(&o).unwrap();
        assert!(img
            .data
            .iter()
            .all(|v| v.is_finite() && (-1.0..=1.0).contains(v)));
        let d = max_diff(&img.data, &x0.data);
        assert!(
            d > 0.05,
            "{prior}: ES-DDPM left the prior's image unchanged ({d})"
        );
    }
}

#[test]
fn the_shipped_unet_is_too_small_for_threads_at_batch_1() {
    let p = load(2);
    // tract counts 0.224 GFLOP per forward (docs/PERFORMANCE.md's profile).
    let flops = p.unet().forward_flops();
    assert!((2.0e8..2.5e8).contains(&flops), "{flops}");
    assert!(!p.unet().threads_pay_at_batch_1());
    // A lone image on two threads (tract on one, esddpm's direct convolutions split
    // across both: `op_threads`) is the same bits as on one.
    let one = load(1);
    let o = GenerateOptions {
        seed: 3,
        steps: Some(3),
        sampler: SamplerChoice::Ddim { eta: 0.0 },
        ..Default::default()
    };
    let bits = |images: Images| images.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(p.generate(&o).unwrap()),
        bits(one.generate(&o).unwrap())
    );
}

#[test]
fn tracts_threads_from_inside_the_pool_give_the_same_bits() {
    // `op_threads::on_pool` (a large U-Net's lone image): tract's matrix products split
    // across two pool threads, started from one of them, against one thread.
    let p = load(1);
    let [c, h, w] = p.unet().sample_shape();
    let x: Vec<f32> = (0..c * h * w)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let run = |exec: &tract_linalg::multithread::Executor| {
        let mut out = vec![0.0f32; c * h * w];
        esddpm::op_threads::on_pool(exec, || p.unet().run(1, &x, 500, &mut out, exec)).unwrap();
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let single = run(&tract_linalg::multithread::Executor::SingleThread);
    let pool = tract_linalg::multithread::Executor::multithread(2);
    for _ in 0..3 {
        assert_eq!(run(&pool), single);
    }
}
