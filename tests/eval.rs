//! The FID benchmark's parts: the IDX reader, the classifier's features (against
//! onnxruntime), and the evaluator's determinism and cache, on the shipped models with a
//! few images (the full benchmark is `esddpm eval`, never a test).

mod common;

use common::{f32s, max_diff};
use esddpm::classifier::Classifier;
use esddpm::dataset::{load_fashion_mnist, pad_to_32, parse_idx_images, Split};
use esddpm::eval::{markdown_table, standard_rows, EvalConfig, Evaluator, Method, Row};
use esddpm::*;
use std::io::Write;
use std::path::{Path, PathBuf};

fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fashion")
}

fn classifier(p: &Pipeline) -> Classifier {
    let text = std::fs::read_to_string(folder().join("esddpm.json")).unwrap();
    let entry = EsddpmConfig::from_json(&text).unwrap().classifier.unwrap();
    Classifier::from_folder(&folder(), &entry, p.image_shape()).unwrap()
}

fn idx(n: u32, h: u32, w: u32, data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

#[test]
fn idx_files_parse_and_bad_ones_are_named() {
    let p = Path::new("x.idx");
    let (n, h, w, px) =
        parse_idx_images(p, &idx(2, 2, 3, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])).unwrap();
    assert_eq!((n, h, w, px.len(), px[11]), (2, 2, 3, 12, 12));
    let cases: [(Vec<u8>, &str); 4] = [
        (
            vec![1, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "magic",
        ),
        (
            idx(1, 1, 1, &[0])
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 2 { 0x0d } else { b })
                .collect(),
            "element type",
        ),
        (idx(2, 2, 2, &[0; 7]), "need 8 bytes"),
        (
            vec![0, 0, 8, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            "dimensions",
        ),
    ];
    for (bytes, want) in cases {
        let e = parse_idx_images(p, &bytes).unwrap_err();
        assert!(matches!(e, Error::Dataset { .. }), "{e}");
        assert!(e.to_string().contains(want), "{e} lacks {want:?}");
    }
}

#[test]
fn fashion_mnist_reads_plain_and_gzip_and_pads_to_32() {
    let mut px = vec![0u8; 2 * 784];
    px[0] = 255; // image 0, (0, 0) -> (2, 2)
    px[784 + 27 * 28 + 27] = 51; // image 1, (27, 27) -> (29, 29)
    let bytes = idx(2, 28, 28, &px);
    let plain = tempfile::tempdir().unwrap();
    std::fs::write(plain.path().join("t10k-images-idx3-ubyte"), &bytes).unwrap();
    let gz = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(gz.path().join("t10k-images-idx3-ubyte.gz")).unwrap();
    let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    enc.write_all(&bytes).unwrap();
    enc.finish().unwrap();
    let a = load_fashion_mnist(plain.path(), Split::Test).unwrap();
    let b = load_fashion_mnist(gz.path(), Split::Test).unwrap();
    assert_eq!(a, b);
    let (n, x) = a;
    assert_eq!((n, x.len()), (2, 2 * 1024));
    assert_eq!(x[2 * 32 + 2], 1.0);
    assert_eq!(x[1024 + 29 * 32 + 29], 51.0 / 255.0 * 2.0 - 1.0);
    assert_eq!(x[0], -1.0);
    assert_eq!(x.iter().filter(|&&v| v != -1.0).count(), 2);
    assert_eq!(pad_to_32(&px, 2), x);
    // Missing files and a 32x32 set are errors that say what is wrong.
    let e = load_fashion_mnist(plain.path(), Split::Train).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    std::fs::write(
        plain.path().join("t10k-images-idx3-ubyte"),
        idx(1, 32, 32, &[0; 1024]),
    )
    .unwrap();
    let e = load_fashion_mnist(plain.path(), Split::Test).unwrap_err();
    assert!(e.to_string().contains("28x28"), "{e}");
    let bad_gz = tempfile::tempdir().unwrap();
    std::fs::write(bad_gz.path().join("t10k-images-idx3-ubyte.gz"), b"not gzip").unwrap();
    let e = load_fashion_mnist(bad_gz.path(), Split::Test).unwrap_err();
    assert!(e.to_string().contains("gzip"), "{e}");
}

#[test]
fn classifier_features_match_onnxruntime() {
    let p = Pipeline::from_folder(
        folder(),
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let c = classifier(&p);
    assert_eq!(c.dim(), 128);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder().join("reference.json")).unwrap())
            .unwrap();
    let m = &r["models"]["classifier"];
    let x = f32s(&m["inputs"]["image"]["data"]);
    let expect = f32s(&m["outputs"]["features"]["data"]);
    for batch in [1, 2] {
        let got = c.features(&x, batch).unwrap();
        let d = max_diff(&got, &expect);
        assert!(d <= 1e-4, "batch {batch}: max abs diff {d}");
    }
    // A wrong output name and a wrong image size are signature errors.
    let model = esddpm::model::OnnxModel::from_path(
        ModelRole::Classifier,
        &folder().join("classifier.onnx"),
        esddpm::memory::DEFAULT_MEMORY_LIMIT,
    )
    .unwrap();
    let e = Classifier::new(model, "penultimate", p.image_shape()).unwrap_err();
    assert!(
        matches!(e, Error::ModelSignature { .. }) && e.to_string().contains("features"),
        "{e}"
    );
    let e = c.features(&x[..100], 1).unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }), "{e}");
}

#[test]
fn evaluator_is_deterministic_and_resumes_from_its_cache() {
    let p = Pipeline::from_folder(
        folder(),
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let c = classifier(&p);
    let rows = standard_rows(&p);
    assert_eq!(rows.len(), 1 + 2 + 4 + 2 * 8);
    let calls = |id: &str| {
        rows.iter()
            .find(|r| r.id == id)
            .unwrap()
            .unet_calls(&p)
            .unwrap()
    };
    assert_eq!(calls("ddpm-1000"), 1000);
    assert_eq!(calls("ddpm-100"), 100);
    assert_eq!(calls("ddim-50"), 50);
    assert_eq!(calls("es-gan-ddpm-200"), 200);
    assert_eq!(calls("es-vae-ddim10-300"), 10);
    assert_eq!(calls("gan"), 0);
    // The reference set: 40 GAN images of other seeds (no dataset needed in CI).
    let reference = p
        .prior_images(&GenerateOptions {
            seed: 99,
            batch: 40,
            ..Default::default()
        })
        .unwrap()
        .data;
    let real = Row {
        id: "real".into(),
        label: "real".into(),
        method: Method::Real,
    };
    let pick = |id: &str| rows.iter().find(|r| r.id == id).unwrap().clone();
    let run = |workers: usize, cache: Option<PathBuf>| {
        let cfg = EvalConfig {
            n: 6,
            seed: 3,
            workers,
            chunk: 4,
            cache_dir: cache,
        };
        let ev = Evaluator::new(&p, &c, &reference, &reference, cfg).unwrap();
        [real.clone(), pick("gan"), pick("es-gan-ddim10-100")]
            .iter()
            .map(|r| ev.run_row(r, &|_| {}).unwrap())
            .collect::<Vec<_>>()
    };
    let one = run(1, None);
    let two = run(2, None);
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a.fid.to_bits(), b.fid.to_bits(), "{}: 1 vs 2 workers", a.id);
    }
    assert!(one
        .iter()
        .all(|r| r.fid.is_finite() && r.fid >= 0.0 && r.n == 6));
    assert_eq!(one[0].seconds_per_image, 0.0);
    assert!(one[2].seconds_per_image > one[1].seconds_per_image);
    assert_eq!(one[2].unet_calls, 10);
    // The prior row and the ES-DDPM row differ (the U-Net changed the images).
    assert_ne!(one[1].fid, one[2].fid);
    // With a cache: the first run writes chunks of 4 + 2, the second reads them.
    let dir = tempfile::tempdir().unwrap();
    let first = run(2, Some(dir.path().to_path_buf()));
    let chunk = dir.path().join("es-gan-ddim10-100").join("seed3-4-2.json");
    assert!(chunk.is_file());
    let second = run(1, Some(dir.path().to_path_buf()));
    for (a, b) in first.iter().zip(&second).chain(first.iter().zip(&one)) {
        assert_eq!(
            a.fid.to_bits(),
            b.fid.to_bits(),
            "{}: cached vs fresh",
            a.id
        );
    }
    assert_eq!(first[2].seconds_per_image, second[2].seconds_per_image);
    let table = markdown_table(&first);
    assert!(
        table.contains("| ES-DDPM, GAN prior, T'=100, DDIM 10 steps | 10 |"),
        "{table}"
    );
    // Bad settings are errors.
    let cfg = EvalConfig {
        n: 1,
        seed: 0,
        workers: 1,
        chunk: 1,
        cache_dir: None,
    };
    assert!(matches!(
        Evaluator::new(&p, &c, &reference, &reference, cfg),
        Err(Error::InvalidParameter { .. })
    ));
}
