//! The runtime on the random-weight test models (`tests/models`, made by
//! `tools/models/make_test_models.py`): tract against onnxruntime, determinism,
//! progress and cancellation, control, and one clear error per kind of bad input.

mod common;

use common::{f32s, max_diff};
use esddpm::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/models")
}

fn tiny() -> PathBuf {
    models().join("tiny")
}

fn load_tiny() -> Pipeline {
    Pipeline::from_folder(
        tiny(),
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .expect("tiny models load")
}

/// Copies the tiny folder into a temp dir, applying `edit` to it.
fn tiny_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    edit(dir.path());
    dir
}

#[test]
fn tract_matches_onnxruntime() {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(models().join("reference.json")).unwrap())
            .unwrap();
    let p = load_tiny();
    let exec = tract_linalg_executor();
    // U-Net at batch 2, timesteps [10, 500]: one call per image.
    let sample = f32s(&r["unet"]["sample"]);
    let expect = f32s(&r["unet"]["noise_pred"]);
    let ts: Vec<u32> = r["unet"]["timestep"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let il = sample.len() / 2;
    let mut out = vec![0.0f32; il];
    for i in 0..2 {
        p.unet()
            .run(1, &sample[i * il..(i + 1) * il], ts[i], &mut out, &exec)
            .unwrap();
        let d = max_diff(&out, &expect[i * il..(i + 1) * il]);
        assert!(d <= 1e-4, "U-Net image {i}: max abs diff {d}");
    }
    // Priors at batch 2.
    for (name, key) in [("mlp", "prior"), ("mlp_cond", "prior_cond")] {
        let z = f32s(&r[key]["z"]);
        let expect = f32s(&r[key]["image"]);
        let labels: Option<Vec<i64>> = r[key].get("class_label").map(|l| {
            l.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        });
        let mut out = vec![0.0f32; expect.len()];
        p.prior(name)
            .unwrap()
            .run(2, &z, labels.as_deref(), &mut out, &exec)
            .unwrap();
        let d = max_diff(&out, &expect);
        assert!(d <= 1e-4, "prior {name}: max abs diff {d}");
    }
}

fn tract_linalg_executor() -> tract_linalg::multithread::Executor {
    tract_linalg::multithread::Executor::SingleThread
}

fn opts(seed: u64, batch: usize) -> GenerateOptions {
    GenerateOptions {
        seed,
        batch,
        start: Start::EarlyStop { t_prime: Some(20) },
        ..Default::default()
    }
}

fn png_bytes(images: &Images) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.png");
    images.save_png_grid(&path, 4).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn same_seed_same_bytes_twice_and_across_batch_sizes() {
    let p = load_tiny();
    let a = p.generate(&opts(7, 3)).unwrap();
    let b = p.generate(&opts(7, 3)).unwrap();
    assert_eq!(a.data, b.data);
    assert_eq!(png_bytes(&a), png_bytes(&b));
    for i in 0..3 {
        let one = p
            .generate(&GenerateOptions {
                first_image: i as u64,
                ..opts(7, 1)
            })
            .unwrap();
        assert_eq!(a.image(i), &one.data[..], "image {i} of the batch vs alone");
    }
    let other = p.generate(&opts(8, 3)).unwrap();
    assert_ne!(a.data, other.data);
    // A multithreaded pipeline gives the same images here too.
    let p2 = Pipeline::from_folder(
        tiny(),
        &LoadOptions {
            threads: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p2.generate(&opts(7, 3)).unwrap().data, a.data);
}

#[test]
fn es_ddpm_changes_the_prior_image_and_stays_in_range() {
    let p = load_tiny();
    let o = opts(1, 2);
    let prior = p.prior_images(&o).unwrap();
    let out = p.generate(&o).unwrap();
    assert_eq!(out.shape, prior.shape);
    assert!(max_diff(&out.data, &prior.data) > 0.05);
    assert!(out
        .data
        .iter()
        .all(|v| v.is_finite() && (-1.0..=1.0).contains(v)));
    // Every sampler and start runs.
    for (sampler, start) in [
        (
            SamplerChoice::Ddim { eta: 0.0 },
            Start::EarlyStop { t_prime: Some(50) },
        ),
        (SamplerChoice::Ddim { eta: 1.0 }, Start::Strength(0.5)),
        (SamplerChoice::DpmSolver, Start::EarlyStop { t_prime: None }),
        (SamplerChoice::DpmSolver, Start::Noise),
    ] {
        // Strength 0.5 of 10 steps runs 5 of them.
        let steps = if matches!(start, Start::Strength(_)) {
            10
        } else {
            5
        };
        let o = GenerateOptions {
            sampler,
            start,
            steps: Some(steps),
            ..opts(2, 1)
        };
        let mut calls = 0;
        let img = p.generate_with(&o, |_| calls += 1, None).unwrap();
        assert_eq!(calls, 5, "{sampler:?} {start:?}");
        assert!(img.data.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn progress_once_per_step_with_preview_and_cancellation() {
    let p = load_tiny();
    let o = opts(3, 2);
    let mut seen = Vec::new();
    p.generate_with(
        &o,
        |pr| {
            assert_eq!(pr.preview.len(), 2 * 256);
            seen.push((pr.info.step, pr.info.timestep, pr.total));
        },
        None,
    )
    .unwrap();
    assert_eq!(seen.len(), 20);
    assert_eq!(seen[0], (0, 19, 20));
    assert_eq!(seen[19], (19, 0, 20));

    let cancel = AtomicBool::new(false);
    let mut steps = 0;
    let r = p.generate_with(
        &o,
        |pr| {
            steps += 1;
            if pr.info.step == 4 {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        Some(&cancel),
    );
    assert!(
        matches!(r, Err(Error::Cancelled { steps_done: 5 })),
        "{r:?}"
    );
    assert_eq!(steps, 5);
    // The pipeline is still usable and gives the same result as before.
    assert_eq!(p.generate(&o).unwrap().data, p.generate(&o).unwrap().data);
}

#[test]
fn step_wise_session_equals_generate() {
    let p = load_tiny();
    let o = opts(5, 2);
    let mut s = p.session(&o).unwrap();
    assert_eq!(s.num_steps(), 20);
    assert_eq!(s.timesteps().first(), Some(&19));
    let mut n = 0;
    while let Some(info) = s.step().unwrap() {
        assert_eq!(info.step, n);
        n += 1;
    }
    assert!(s.is_done());
    assert!(s.step().unwrap().is_none());
    assert_eq!(s.into_images().data, p.generate(&o).unwrap().data);
}

#[test]
fn memory_folder_equals_path_folder() {
    let read = |f: &str| std::fs::read(tiny().join(f)).unwrap();
    let (unet, prior, cond) = (
        read("unet.onnx"),
        read("prior.onnx"),
        read("prior_cond.onnx"),
    );
    let sched = std::fs::read_to_string(tiny().join("scheduler_config.json")).unwrap();
    let cfg = std::fs::read_to_string(tiny().join("esddpm.json")).unwrap();
    let mut files = std::collections::BTreeMap::new();
    files.insert("unet.onnx".to_string(), &unet[..]);
    files.insert("prior.onnx".to_string(), &prior[..]);
    files.insert("prior_cond.onnx".to_string(), &cond[..]);
    let m = Pipeline::from_memory(
        &MemoryFolder {
            scheduler_config: &sched,
            esddpm_config: &cfg,
            files,
        },
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        m.generate(&opts(9, 1)).unwrap().data,
        load_tiny().generate(&opts(9, 1)).unwrap().data
    );
}

#[test]
fn control_latents_interpolation_labels_img2img_inpaint_paste() {
    let p = load_tiny();
    // Caller latents equal the seeded ones when they are the same values.
    let o = opts(4, 2);
    let z = p.latents(&o).unwrap();
    let with_z = p
        .generate(&GenerateOptions {
            latents: Some(z.clone()),
            ..o.clone()
        })
        .unwrap();
    assert_eq!(with_z.data, p.generate(&o).unwrap().data);
    // slerp between two latents: the ends are the latents.
    let z2 = p.latents(&opts(5, 2)).unwrap();
    assert_eq!(slerp(&z[..8], &z2[..8], 0.0).unwrap(), z[..8].to_vec());
    // Class labels: needed by the conditional prior, and they matter.
    let cond = |label| GenerateOptions {
        prior: Some("mlp_cond".into()),
        class_labels: Some(vec![label]),
        ..opts(6, 1)
    };
    assert_ne!(
        p.prior_images(&cond(1)).unwrap().data,
        p.prior_images(&cond(2)).unwrap().data
    );
    let e = p
        .prior_images(&GenerateOptions {
            class_labels: Some(vec![10]),
            ..cond(0)
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidParameter {
                name: "class_labels",
                ..
            }
        ),
        "{e}"
    );
    let e = p
        .prior_images(&GenerateOptions {
            class_labels: None,
            ..cond(0)
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidParameter {
                name: "class_labels",
                ..
            }
        ),
        "{e}"
    );
    // img2img from a caller image: low strength stays close to it.
    let init: Vec<f32> = (0..256)
        .map(|i| if (i / 16) % 4 < 2 { 0.8 } else { -0.8 })
        .collect();
    let img = p
        .generate(&GenerateOptions {
            init_image: Some(init.clone()),
            start: Start::Strength(0.02),
            sampler: SamplerChoice::Ddim { eta: 0.0 },
            steps: Some(50),
            ..opts(1, 1)
        })
        .unwrap();
    let d = max_diff(&img.data, &init);
    assert!(d < 0.5, "img2img at strength 0.02 moved a pixel by {d}");
    // Inpainting keeps the known pixels exactly where the mask is 1.
    let keep: Vec<f32> = (0..256).map(|i| if i < 128 { 1.0 } else { 0.0 }).collect();
    let out = p
        .generate(&GenerateOptions {
            init_image: Some(init.clone()),
            inpaint_mask: Some(keep),
            ..opts(2, 2)
        })
        .unwrap();
    for n in 0..2 {
        assert_eq!(&out.image(n)[..128], &init[..128]);
        assert_ne!(&out.image(n)[128..], &init[128..]);
    }
    // Paste: the prior's image carries the pasted region before diffusion.
    let paste = Paste {
        image: vec![1.0; 256],
        keep: (0..256)
            .map(|i| if i % 16 < 4 { 1.0 } else { 0.0 })
            .collect(),
    };
    let pasted = p
        .prior_images(&GenerateOptions {
            paste: Some(paste),
            ..opts(2, 1)
        })
        .unwrap();
    assert!((0..16).all(|r| pasted.data[r * 16] == 1.0));
}

#[test]
fn images_convert_to_u8() {
    let p = load_tiny();
    let img = p.generate(&opts(1, 2)).unwrap();
    let g = img.to_u8(0);
    assert_eq!(g.len(), 256);
    assert_eq!(img.to_rgba8(1).len(), 1024);
    assert_eq!(g[0], esddpm::images::to_u8(img.data[0]));
    let (w, h, px) = img.grid(2);
    assert_eq!((w, h, px.len()), (2 * 18 + 2, 18 + 2, (2 * 18 + 2) * 20));
}

#[test]
fn diffusers_layout_loads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("scheduler")).unwrap();
    std::fs::create_dir(dir.path().join("unet")).unwrap();
    std::fs::copy(
        tiny().join("scheduler_config.json"),
        dir.path().join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    // The tiny U-Net declares C, H and W, so no esddpm.json is needed.
    std::fs::copy(tiny().join("unet.onnx"), dir.path().join("unet/model.onnx")).unwrap();
    match Pipeline::from_folder(
        dir.path(),
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    ) {
        Ok(p) => {
            let e = p.generate(&opts(1, 1)).unwrap_err();
            assert!(
                matches!(e, Error::InvalidParameter { name: "prior", .. }),
                "{e}"
            );
            let img = p
                .generate(&GenerateOptions {
                    start: Start::Noise,
                    sampler: SamplerChoice::DpmSolver,
                    steps: Some(3),
                    ..opts(1, 1)
                })
                .unwrap();
            assert_eq!(img.data.len(), 256);
        }
        Err(e) => panic!("diffusers layout must load: {e}"),
    }
}

fn load_err(dir: &Path) -> Error {
    Pipeline::from_folder(
        dir,
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap_err()
}

#[test]
fn each_bad_input_has_its_own_error() {
    let broken = models().join("broken");
    let with_unet = |file: &str| {
        let src = broken.join(file);
        tiny_copy(move |d| {
            std::fs::copy(&src, d.join("unet.onnx")).unwrap();
        })
    };
    // A missing file.
    let d = tiny_copy(|d| std::fs::remove_file(d.join("unet.onnx")).unwrap());
    let e = load_err(d.path());
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("unet.onnx"));
    // A missing folder.
    assert!(matches!(
        load_err(Path::new("/nonexistent/esddpm")),
        Error::Folder { .. }
    ));
    // A truncated ONNX file.
    let d = tiny_copy(|d| {
        let bytes = std::fs::read(d.join("unet.onnx")).unwrap();
        std::fs::write(d.join("unet.onnx"), &bytes[..bytes.len() / 3]).unwrap();
    });
    let e = load_err(d.path());
    assert!(
        matches!(
            e,
            Error::ModelLoad {
                role: ModelRole::Unet,
                ..
            }
        ),
        "{e}"
    );
    // Not ONNX at all.
    let e = load_err(with_unet("not_onnx.onnx").path());
    assert!(
        matches!(
            e,
            Error::ModelLoad {
                role: ModelRole::Unet,
                ..
            }
        ),
        "{e}"
    );
    // Wrong input rank, wrong dtype, wrong output channels.
    for file in ["unet_rank3.onnx", "unet_f64.onnx", "unet_wrong_out.onnx"] {
        let e = load_err(with_unet(file).path());
        assert!(
            matches!(
                e,
                Error::ModelSignature {
                    role: ModelRole::Unet,
                    ..
                }
            ),
            "{file}: {e}"
        );
    }
    // A learned-variance U-Net with a fixed-variance config.
    let e = load_err(with_unet("unet_learned.onnx").path());
    assert!(e.to_string().contains("variance_type"), "{e}");
    // A prior whose output does not fit the U-Net.
    let d = tiny_copy(|d| {
        std::fs::copy(
            models().join("broken/prior_wrong_shape.onnx"),
            d.join("prior.onnx"),
        )
        .unwrap();
    });
    let e = load_err(d.path());
    assert!(
        matches!(
            e,
            Error::ModelSignature {
                role: ModelRole::Prior,
                ..
            }
        ),
        "{e}"
    );
    // A config with a bad value names the key.
    let d = tiny_copy(|d| {
        let path = d.join("scheduler_config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"linear\"", "\"cubic\"")).unwrap();
    });
    match load_err(d.path()) {
        Error::Config { key, .. } => assert_eq!(key, "beta_schedule"),
        e => panic!("{e}"),
    }
    // A model that outputs NaN: the error names the U-Net and the step.
    let d = with_unet("unet_nan.onnx");
    let p = Pipeline::from_folder(
        d.path(),
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let e = p.generate(&opts(1, 1)).unwrap_err();
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
    // Invalid generation parameters.
    let p = load_tiny();
    for (o, name) in [
        (
            GenerateOptions {
                batch: 0,
                ..opts(1, 1)
            },
            "batch",
        ),
        (
            GenerateOptions {
                start: Start::EarlyStop {
                    t_prime: Some(1001),
                },
                ..opts(1, 1)
            },
            "start",
        ),
        (
            GenerateOptions {
                steps: Some(21),
                ..opts(1, 1)
            },
            "steps",
        ),
        (
            GenerateOptions {
                prior: Some("nope".into()),
                ..opts(1, 1)
            },
            "prior",
        ),
        (
            GenerateOptions {
                latents: Some(vec![0.0; 3]),
                ..opts(1, 1)
            },
            "latents",
        ),
        (
            GenerateOptions {
                init_image: Some(vec![0.0; 5]),
                ..opts(1, 1)
            },
            "init_image",
        ),
    ] {
        match p.generate(&o) {
            Err(Error::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    let e = p
        .generate(&GenerateOptions {
            sampler: SamplerChoice::Ddim { eta: -1.0 },
            ..opts(1, 1)
        })
        .unwrap_err();
    assert!(
        matches!(e, Error::Core(esddpm_core::Error::InvalidEta(_))),
        "{e}"
    );
    let e = p
        .generate(&GenerateOptions {
            clip_sample_range: Some(0.0),
            ..opts(1, 1)
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Core(esddpm_core::Error::InvalidParameter {
                name: "clip_sample_range",
                ..
            })
        ),
        "{e}"
    );
    let e = p
        .generate(&GenerateOptions {
            start: Start::Strength(1.5),
            ..opts(1, 1)
        })
        .unwrap_err();
    assert!(
        matches!(e, Error::Core(esddpm_core::Error::InvalidStrength(_))),
        "{e}"
    );
}

#[test]
fn prior_output_ranges_are_mapped() {
    // The same network scaled to [0, 1] and [0, 255] gives [-1, 1] images once the config
    // declares the range.
    for (file, range) in [("prior_01.onnx", "[0, 1]"), ("prior_255.onnx", "[0, 255]")] {
        let d = tiny_copy(|d| {
            std::fs::copy(models().join("broken").join(file), d.join("prior.onnx")).unwrap();
            let path = d.join("esddpm.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let mut v: Value = serde_json::from_str(&text).unwrap();
            v["priors"]["mlp"]["output_range"] = serde_json::from_str(range).unwrap();
            std::fs::write(&path, v.to_string()).unwrap();
        });
        let p = Pipeline::from_folder(
            d.path(),
            &LoadOptions {
                threads: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        let img = p.prior_images(&opts(1, 2)).unwrap();
        assert!(img.data.iter().all(|v| (-1.0..=1.0).contains(v)), "{file}");
        assert!(img.data.iter().any(|v| *v < -0.2) || img.data.iter().any(|v| *v > 0.2));
    }
}

#[test]
fn a_pipeline_is_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Pipeline>();
    fn send<T: Send>() {}
    send::<Session<'static>>();
    let p = load_tiny();
    let alone: Vec<Vec<f32>> = (0..3)
        .map(|s| p.generate(&opts(s, 1)).unwrap().data)
        .collect();
    let threaded: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|s| {
                let p = &p;
                scope.spawn(move || p.generate(&opts(s, 1)).unwrap().data)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, threaded);
}
