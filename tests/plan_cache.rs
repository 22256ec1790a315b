//! The plan cache (`LoadOptions::plan_cache`, `esddpm::cache`): a second start is served
//! from the cache without parsing the ONNX files and gives the same bits; bad entries
//! are rebuilt; a changed model file or an unusable directory is a clear error.

use esddpm::cache::PlanCache;
use esddpm::model::OnnxModel;
use esddpm::unet::Unet;
use esddpm::*;
use std::path::{Path, PathBuf};

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fashion")
}

fn load(cache: Option<&Path>) -> Pipeline {
    Pipeline::from_folder(
        shipped(),
        &LoadOptions {
            threads: Some(1),
            plan_cache: cache.map(Path::to_path_buf),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Two ES-DDPM images (GAN prior, T' = 30, 5 DDIM steps), as bits.
fn generate(p: &Pipeline) -> Vec<u32> {
    let images = p
        .generate(&GenerateOptions {
            seed: 11,
            batch: 2,
            start: Start::EarlyStop { t_prime: Some(30) },
            sampler: SamplerChoice::Ddim { eta: 0.0 },
            steps: Some(5),
            ..Default::default()
        })
        .unwrap();
    (0..images.len())
        .flat_map(|i| images.image(i).iter().map(|v| v.to_bits()))
        .collect()
}

fn entries(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

#[test]
fn a_second_start_comes_from_the_cache_with_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("plans");
    let expect = generate(&load(None));

    let first = load(Some(&cache));
    assert!(first.unet().model().is_parsed());
    assert_eq!(generate(&first), expect);
    drop(first);
    // One meta per model (U-Net, GAN, VAE); one NNEF per model and batch used.
    assert_eq!(entries(&cache, ".json").len(), 3);
    let plans = entries(&cache, ".nnef.tar");
    assert!(plans.len() >= 2, "{plans:?}");

    let second = load(Some(&cache));
    assert_eq!(generate(&second), expect);
    assert!(
        !second.unet().model().is_parsed(),
        "the second start parsed the U-Net's ONNX file"
    );
    let gan = second.prior("gan").unwrap();
    assert!(!gan.model().is_parsed());
    // Nothing new was written.
    assert_eq!(entries(&cache, ".nnef.tar"), plans);
}

#[test]
fn broken_entries_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("plans");
    let expect = generate(&load(Some(&cache)));
    let plans = entries(&cache, ".nnef.tar");
    let sizes: Vec<u64> = plans
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    // Truncate every plan, garble every meta.
    for p in &plans {
        let bytes = std::fs::read(p).unwrap();
        std::fs::write(p, &bytes[..bytes.len() / 3]).unwrap();
    }
    for m in entries(&cache, ".json") {
        std::fs::write(m, "{ \"format\": 1, \"inputs\": 3 }").unwrap();
    }
    let p = load(Some(&cache));
    assert_eq!(generate(&p), expect);
    let rebuilt: Vec<u64> = plans
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(rebuilt, sizes);
    // A garbled meta made that start parse the files and write the metas again: the
    // next start needs no parse.
    let again = load(Some(&cache));
    assert!(!again.unet().model().is_parsed());
    assert_eq!(generate(&again), expect);
}

#[test]
fn a_model_file_changed_after_a_cached_start_is_an_error_not_a_stale_plan() {
    let dir = tempfile::tempdir().unwrap();
    let cache = PlanCache::new(dir.path().join("plans"));
    let file = dir.path().join("unet.onnx");
    std::fs::copy(shipped().join("unet.onnx"), &file).unwrap();
    let limit = memory::DEFAULT_MEMORY_LIMIT;
    let load = || {
        let m = OnnxModel::from_path_cached(ModelRole::Unet, &file, limit, Some(&cache)).unwrap();
        Unet::new(m, [1, 32, 32]).unwrap()
    };
    drop(load());
    let unet = load();
    assert!(!unet.model().is_parsed());
    // Another model in its place, then a plan the cache does not have (batch 2).
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/models/tiny/unet.onnx"),
        &file,
    )
    .unwrap();
    match unet.plan(2) {
        Err(Error::ModelLoad { role, message }) => {
            assert_eq!(role, ModelRole::Unet);
            assert!(message.contains("changed since it was loaded"), "{message}");
        }
        other => panic!("expected a ModelLoad error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn the_memory_limit_holds_on_a_plan_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = PlanCache::new(dir.path().join("plans"));
    let file = shipped().join("unet.onnx");
    let unlimited =
        OnnxModel::from_path_cached(ModelRole::Unet, &file, memory::UNLIMITED, Some(&cache))
            .unwrap();
    let needed = Unet::new(unlimited, [1, 32, 32])
        .unwrap()
        .memory(1)
        .unwrap()
        .total();
    // A limit of the file's size passes the file check and the declared weights, so
    // only the batch-1 plan, read from the cache this time, can be over it.
    let limit = std::fs::metadata(&file).unwrap().len();
    assert!(needed > limit, "plan {needed} bytes, file {limit} bytes");
    let m = OnnxModel::from_path_cached(ModelRole::Unet, &file, limit, Some(&cache)).unwrap();
    assert!(!m.is_parsed());
    match Unet::new(m, [1, 32, 32]) {
        Err(Error::MemoryLimit {
            what,
            needed: n,
            limit: l,
        }) => {
            assert!(what.contains("at batch 1"), "{what}");
            assert_eq!((n, l), (needed, limit));
        }
        other => panic!("expected MemoryLimit, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn an_unusable_cache_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let err = Pipeline::from_folder(
        shipped(),
        &LoadOptions {
            threads: Some(1),
            plan_cache: Some(not_a_dir.join("plans")),
            ..Default::default()
        },
    )
    .unwrap_err();
    match err {
        Error::Io { path, .. } => assert!(path.starts_with(&not_a_dir), "{}", path.display()),
        other => panic!("expected an Io error, got {other}"),
    }
}

#[test]
fn a_plan_from_the_cache_has_esddpms_operators_like_one_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = PlanCache::new(dir.path().join("plans"));
    let file = shipped().join("unet.onnx");
    let limit = memory::DEFAULT_MEMORY_LIMIT;
    let ops = |cache: Option<&PlanCache>| -> Vec<(String, usize)> {
        let m = OnnxModel::from_path_cached(ModelRole::Unet, &file, limit, cache).unwrap();
        let unet = Unet::new(m, [1, 32, 32]).unwrap();
        let plan = unet.plan(1).unwrap();
        ["EsddpmAttention", "EsddpmGroupNorm", "EsddpmDirectConv"]
            .iter()
            .map(|name| {
                let n = plan
                    .model()
                    .nodes()
                    .iter()
                    .filter(|n| n.op.name() == *name)
                    .count();
                (name.to_string(), n)
            })
            .collect()
    };
    let direct = ops(None);
    assert_eq!(direct[0], ("EsddpmAttention".to_string(), 4), "{direct:?}");
    // Group norms always; direct convolutions only on x86-64 with AVX2 and FMA.
    assert!(direct[1].1 > 0, "{direct:?}");
    drop(ops(Some(&cache)));
    assert_eq!(ops(Some(&cache)), direct, "second start, from the cache");
}

/// A start finds the file's key by its identity (`PlanCache::identity_of`) without
/// hashing it first, and checks it against the bytes while the plan is made: a record
/// naming another model's key (as a file system with coarse times could leave behind)
/// is found out, removed, and that load is an error, not that model's plan.
#[test]
fn a_key_found_by_the_files_identity_is_checked_against_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("plans");
    let cache = PlanCache::new(&cache_dir);
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/models");
    let (file, other) = (dir.path().join("unet.onnx"), dir.path().join("nan.onnx"));
    std::fs::copy(models.join("tiny/unet.onnx"), &file).unwrap();
    std::fs::copy(models.join("broken/unet_nan.onnx"), &other).unwrap();
    let limit = memory::DEFAULT_MEMORY_LIMIT;
    let load = |path: &Path| -> Result<Unet> {
        let m = OnnxModel::from_path_cached(ModelRole::Unet, path, limit, Some(&cache))?;
        Unet::new(m, [1, 16, 16])
    };
    let forward = |unet: &Unet| -> Vec<u32> {
        let x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut out = vec![0.0; 256];
        let executor = tract_linalg::multithread::Executor::SingleThread;
        unet.run(1, &x, 500, &mut out, &executor).unwrap();
        out.iter().map(|v| v.to_bits()).collect()
    };
    let want = forward(&load(&file).unwrap());
    // The first start recorded the key for the file's identity; the second finds it.
    let records = entries(&cache_dir, ".key");
    assert_eq!(records.len(), 1, "{records:?}");
    let second = load(&file).unwrap();
    assert!(!second.model().is_parsed());
    assert_eq!(forward(&second), want);
    drop(second);

    // Another model of the same signature in the cache, and the record made to name it.
    drop(load(&other).unwrap());
    let theirs = entries(&cache_dir, ".key")
        .into_iter()
        .find(|r| *r != records[0])
        .unwrap();
    std::fs::copy(&theirs, &records[0]).unwrap();
    match load(&file) {
        Err(Error::ModelLoad { role, message }) => {
            assert_eq!(role, ModelRole::Unet);
            assert!(message.contains("changed since it was loaded"), "{message}");
        }
        other => panic!("expected a ModelLoad error, got {:?}", other.map(|_| ())),
    }
    // The wrong record is gone: the next start hashes the file, and records it again.
    assert!(!records[0].exists());
    let again = load(&file).unwrap();
    assert_eq!(forward(&again), want);
    assert!(records[0].exists());
    // A record naming a key with no meta is passed over.
    std::fs::write(&records[0], "0123456789abcdef0123456789abcdef").unwrap();
    assert_eq!(forward(&load(&file).unwrap()), want);
}
