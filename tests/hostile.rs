//! Hostile models and inputs (`tests/models/broken`, made by
//! `tools/models/make_test_models.py`): each gives its own typed error, the process
//! keeps running (a good generation follows), and memory stays bounded: the memory
//! limit is enforced before anything is allocated.

use esddpm::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/models")
}

fn opts(limit: u64) -> LoadOptions {
    LoadOptions {
        threads: Some(1),
        memory_limit: limit,
        ..Default::default()
    }
}

/// The tiny folder copied to a temp dir, with `edit` applied.
fn tiny_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(models().join("tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    edit(dir.path());
    dir
}

fn with_unet(file: &str) -> tempfile::TempDir {
    let src = models().join("broken").join(file);
    tiny_copy(move |d| {
        std::fs::copy(&src, d.join("unet.onnx")).unwrap();
    })
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn generate_one(p: &Pipeline) -> Result<Images> {
    p.generate(&GenerateOptions {
        seed: 3,
        start: Start::EarlyStop { t_prime: Some(20) },
        steps: Some(4),
        ..Default::default()
    })
}

/// The process's peak resident memory (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[test]
fn a_u_net_that_outputs_infinity_is_non_finite() {
    let d = with_unet("unet_inf.onnx");
    let p = Pipeline::from_folder(d.path(), &opts(memory::DEFAULT_MEMORY_LIMIT)).unwrap();
    let e = generate_one(&p).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NonFiniteOutput {
                role: ModelRole::Unet,
                step: Some(0)
            }
        ),
        "{e}"
    );
    // The pipeline and the process go on: the tiny U-Net still generates.
    let good =
        Pipeline::from_folder(models().join("tiny"), &opts(memory::DEFAULT_MEMORY_LIMIT)).unwrap();
    assert!(generate_one(&good).is_ok());
}

#[test]
fn a_u_net_with_a_float64_output_is_a_signature_error() {
    let e = Pipeline::from_folder(
        with_unet("unet_out_f64.onnx").path(),
        &opts(memory::DEFAULT_MEMORY_LIMIT),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ModelSignature {
                role: ModelRole::Unet,
                ..
            }
        ) && e.to_string().contains("F64"),
        "{e}"
    );
}

#[test]
fn a_prior_outside_its_declared_range_is_refused() {
    // A [0, 255] decoder declared as [-1, 1] (the tiny folder's default).
    let d = tiny_copy(|d| {
        std::fs::copy(models().join("broken/prior_255.onnx"), d.join("prior.onnx")).unwrap();
    });
    let p = Pipeline::from_folder(d.path(), &opts(memory::DEFAULT_MEMORY_LIMIT)).unwrap();
    let e = generate_one(&p).unwrap_err();
    match e {
        Error::PriorOutputRange { min, max, lo, hi } => {
            assert_eq!((lo, hi), (-1.0, 1.0));
            assert!(max > 1.05 && min >= 0.0, "[{min}, {max}]");
        }
        e => panic!("{e}"),
    }
    let e = p
        .prior_images(&GenerateOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("output_range"), "{e}");
    // Declared right, the same file works.
    edit_json(&d.path().join("esddpm.json"), |v| {
        v["priors"]["mlp"]["output_range"] = serde_json::json!([0, 255]);
    });
    let p = Pipeline::from_folder(d.path(), &opts(memory::DEFAULT_MEMORY_LIMIT)).unwrap();
    assert!(generate_one(&p).is_ok());
}

#[test]
fn a_huge_declared_input_hits_the_memory_limit_before_allocation() {
    // [N, 1, 65536, 65536] f32: 16 GiB for one image. With esddpm.json declaring the
    // same shape, and in diffusers' layout (the shape read from the model).
    let d = with_unet("unet_huge_input.onnx");
    edit_json(&d.path().join("esddpm.json"), |v| {
        v["unet"]["sample_shape"] = serde_json::json!([1, 65536, 65536]);
        v["priors"] = serde_json::json!({});
        v.as_object_mut().unwrap().remove("default_prior");
    });
    let diffusers = tempfile::tempdir().unwrap();
    std::fs::create_dir(diffusers.path().join("scheduler")).unwrap();
    std::fs::create_dir(diffusers.path().join("unet")).unwrap();
    std::fs::copy(
        models().join("tiny/scheduler_config.json"),
        diffusers.path().join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    std::fs::copy(
        models().join("broken/unet_huge_input.onnx"),
        diffusers.path().join("unet/model.onnx"),
    )
    .unwrap();
    for dir in [d.path(), diffusers.path()] {
        let e = Pipeline::from_folder(dir, &opts(memory::DEFAULT_MEMORY_LIMIT)).unwrap_err();
        match &e {
            Error::MemoryLimit {
                needed,
                limit,
                what,
            } => {
                assert_eq!(*limit, memory::DEFAULT_MEMORY_LIMIT);
                assert_eq!(*needed, 65536 * 65536 * 4 + 8, "{what}");
                assert!(what.contains("U-Net") && what.contains("inputs"), "{what}");
            }
            e => panic!("{e}"),
        }
        assert!(e.to_string().contains("memory limit"), "{e}");
    }
    if let Some(peak) = peak_rss() {
        assert!(
            peak < 2 << 30,
            "peak RSS {peak} bytes: something was allocated"
        );
    }
}

#[test]
fn the_memory_limit_bounds_loading_and_generation() {
    let tiny = models().join("tiny");
    // Below the tiny U-Net's declared weights (~0.7 MB), loaded from memory (no file
    // to size first): refused after parsing, before tract builds the weights.
    let read = |f: &str| std::fs::read(tiny.join(f)).unwrap();
    let (sched, manifest) = (read("scheduler_config.json"), read("esddpm.json"));
    let (unet, prior, prior_cond) = (
        read("unet.onnx"),
        read("prior.onnx"),
        read("prior_cond.onnx"),
    );
    let folder = MemoryFolder {
        scheduler_config: std::str::from_utf8(&sched).unwrap(),
        esddpm_config: std::str::from_utf8(&manifest).unwrap(),
        files: [
            ("unet.onnx".to_string(), &unet[..]),
            ("prior.onnx".to_string(), &prior[..]),
            ("prior_cond.onnx".to_string(), &prior_cond[..]),
        ]
        .into_iter()
        .collect(),
    };
    match Pipeline::from_memory(&folder, &opts(100_000)).unwrap_err() {
        Error::MemoryLimit { what, needed, .. } => {
            assert_eq!(what, "the U-Net model's declared weights");
            assert!(needed > 600_000 && needed < unet.len() as u64, "{needed}");
        }
        e => panic!("{e}"),
    }
    assert!(Pipeline::from_memory(&folder, &opts(64 << 20)).is_ok());
    // The file itself is checked before it is read.
    match Pipeline::from_folder(&tiny, &opts(1000)).unwrap_err() {
        Error::MemoryLimit { what, .. } => assert!(what.contains("file"), "{what}"),
        e => panic!("{e}"),
    }
    // Loads under 64 MiB; the estimate of one image is reported and within the limit.
    let p = Pipeline::from_folder(&tiny, &opts(64 << 20)).unwrap();
    assert_eq!(p.memory_limit(), 64 << 20);
    let prior = p.prior("mlp").unwrap();
    let one = p.generation_memory(1, Some(prior)).unwrap();
    assert!(one > 600_000 && one < 64 << 20, "{one}");
    let unet = p.unet().memory(1).unwrap();
    assert!(
        unet.weights > 600_000 && unet.activations >= 16 * 16 * 4,
        "{unet:?}"
    );
    // A batch whose buffers alone are over the limit fails before they exist, with the
    // pipeline usable afterwards.
    for batch in [20_000, usize::MAX / 4] {
        let e = p
            .generate(&GenerateOptions {
                batch,
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(e, Error::MemoryLimit { .. }), "{batch}: {e}");
    }
    assert!(generate_one(&p).is_ok());
    // UNLIMITED turns the checks off (the tiny models load either way).
    assert!(Pipeline::from_folder(&tiny, &opts(memory::UNLIMITED)).is_ok());
}

#[test]
fn hostile_configs_are_refused_before_they_allocate() {
    // A training chain of 10^12 steps: the tables would take 8 TB.
    let d = tiny_copy(|d| {
        edit_json(&d.join("scheduler_config.json"), |v| {
            v["num_train_timesteps"] = serde_json::json!(1_000_000_000_000u64);
        })
    });
    match Pipeline::from_folder(d.path(), &opts(memory::DEFAULT_MEMORY_LIMIT)).unwrap_err() {
        Error::Config { key, .. } => assert_eq!(key, "num_train_timesteps"),
        e => panic!("{e}"),
    }
    // A prior latent of 2^40 values: its input alone is over the limit.
    let d = tiny_copy(|d| {
        edit_json(&d.join("esddpm.json"), |v| {
            v["priors"]["mlp"]["latent_shape"] = serde_json::json!([1u64 << 40]);
        })
    });
    match Pipeline::from_folder(d.path(), &opts(memory::DEFAULT_MEMORY_LIMIT)).unwrap_err() {
        Error::MemoryLimit { what, .. } => assert!(what.contains("prior"), "{what}"),
        e => panic!("{e}"),
    }
}
