//! The plan cache: tract's decluttered model per batch size, saved as NNEF, so that a
//! second start skips parsing the ONNX file and most of tract's optimisation.
//!
//! A cache is a directory ([`crate::LoadOptions::plan_cache`], C
//! `EsdLoadParams.plan_cache`). For a model whose bytes hash to `K` (xxh3-128) it holds
//!
//! - `K.json`: what loading learns from the ONNX file (inputs, outputs, declared weight
//!   bytes), so that a second start need not parse it;
//! - `K-b{batch}-{F}.nnef.tar`: the model with that batch's concrete input facts (hash
//!   `F`) after tract's `declutter`, in NNEF with tract's extensions.
//!
//! A start with the cache reads the ONNX file only to hash it; the plan comes from the
//! NNEF file (its graph parsed on a second thread beside the tensor reads)
//! and tract's codegen pass. On the cifar-size U-Net that takes load-to-first-
//! step from 0.85 s to 0.62 s, at a peak RSS of 1.39x the weights (1.41x without the
//! cache; docs/PERFORMANCE.md); a first start pays ~0.2 s to write the entry. The outputs are
//! the same bits as without the cache (tested).
//!
//! Entries are keyed by the model's bytes, the cache format and esddpm's version, so a
//! changed model or a new esddpm never reads a stale entry. A missing, truncated or
//! otherwise unreadable entry is rebuilt from the ONNX file and rewritten; entries are
//! written to a temporary file and renamed, so concurrent writers and crashes leave
//! either the old entry or the new one. The directory is trusted like the model files:
//! keep it private to the application.

use crate::error::{Error, ModelRole, Result};
use crate::model::IoDesc;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use xxhash_rust::xxh3::Xxh3;

/// Bumped whenever what an entry holds, or how it is read, changes.
const FORMAT: u32 = 1;

/// The block size of [`PlanCache::key_of_file`]'s reads. Hashing the 143 MB cifar-size
/// U-Net from the page cache took 77-111 ms with blocks of 256 KiB to 4 MiB and 25-28 ms
/// with 64 KiB blocks (first read of the file in a process, AVX2 VM; later reads in the
/// same process were ~25 ms at any size; the cause of the slow first pass with large
/// blocks was not pinned down). `tools/bench/run.sh`'s cached start counts this hash.
const HASH_BLOCK: usize = 1 << 16;

/// A plan cache directory (created on first write). Clones share tract's NNEF framework
/// (its operator registries take ~8 ms to build), built on first use and freed with the
/// last clone: one build per pipeline load, not one per model.
#[derive(Clone)]
pub struct PlanCache {
    dir: PathBuf,
    nnef: Arc<OnceLock<tract_nnef::framework::Nnef>>,
}

impl std::fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanCache").field("dir", &self.dir).finish()
    }
}

/// What loading learnt from a model's ONNX file, kept in `K.json`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Meta {
    pub inputs: Vec<IoDesc>,
    pub outputs: Vec<IoDesc>,
    pub declared_weights: u64,
}

impl PlanCache {
    /// A cache in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            nnef: Arc::default(),
        }
    }

    /// tract's NNEF with its core (on by default) and ONNX-operator extensions (what a
    /// decluttered ONNX model can hold).
    fn nnef(&self) -> &tract_nnef::framework::Nnef {
        use tract_onnx::WithOnnx;
        self.nnef.get_or_init(|| tract_nnef::nnef().with_onnx())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of a model file: xxh3-128 of its bytes, the format and esddpm's version,
    /// read in blocks of [`HASH_BLOCK`] bytes (the file is never whole in memory).
    pub(crate) fn key_of_file(path: &Path) -> Result<String> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut hasher = Self::hasher();
        let mut buf = vec![0u8; HASH_BLOCK];
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(format!("{:032x}", hasher.digest128()))
    }

    /// The key of a model given as bytes (same as [`Self::key_of_file`] of a file with
    /// these bytes).
    pub(crate) fn key_of_bytes(bytes: &[u8]) -> String {
        let mut hasher = Self::hasher();
        hasher.update(bytes);
        format!("{:032x}", hasher.digest128())
    }

    pub(crate) fn hasher() -> Xxh3 {
        // The version and format go in as a seed-like prefix: a new esddpm or format
        // gets new keys.
        let mut h = Xxh3::new();
        h.update(format!("esddpm {} plan cache {FORMAT}\n", env!("CARGO_PKG_VERSION")).as_bytes());
        h
    }

    fn meta_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The NNEF file of `key` for `batch` with input `facts`.
    pub(crate) fn plan_path(&self, key: &str, batch: usize, facts: &[InferenceFact]) -> PathBuf {
        let facts = Self::key_of_bytes(format!("{facts:?}").as_bytes());
        self.dir
            .join(format!("{key}-b{batch}-{}.nnef.tar", &facts[..16]))
    }

    /// The meta of `key`, if present and readable.
    pub(crate) fn read_meta(&self, key: &str) -> Option<Meta> {
        let text = std::fs::read_to_string(self.meta_path(key)).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        if v["format"].as_u64()? != u64::from(FORMAT) {
            return None;
        }
        let list = |k: &str| -> Option<Vec<IoDesc>> {
            v[k].as_array()?.iter().map(io_from_json).collect()
        };
        Some(Meta {
            inputs: list("inputs")?,
            outputs: list("outputs")?,
            declared_weights: v["declared_weights"].as_u64()?,
        })
    }

    /// Writes the meta of `key` (skipped when a type has no name here: the next start
    /// then parses the ONNX file, as without a cache).
    pub(crate) fn write_meta(&self, key: &str, meta: &Meta) -> Result<()> {
        let list = |l: &[IoDesc]| l.iter().map(io_to_json).collect::<Option<Vec<_>>>();
        let (Some(inputs), Some(outputs)) = (list(&meta.inputs), list(&meta.outputs)) else {
            return Ok(());
        };
        let v = json!({
            "format": FORMAT,
            "esddpm": env!("CARGO_PKG_VERSION"),
            "inputs": inputs,
            "outputs": outputs,
            "declared_weights": meta.declared_weights,
        });
        self.write_atomic(&self.meta_path(key), |w| {
            w.write_all(
                serde_json::to_string_pretty(&v)
                    .unwrap_or_default()
                    .as_bytes(),
            )
            .map_err(TractError::from)
        })
    }

    /// The decluttered model at `path`, if present, readable, no larger than
    /// `memory_limit` bytes and with exactly the input `facts` asked for; `None`
    /// otherwise (the caller rebuilds it).
    pub(crate) fn read_model(
        &self,
        role: ModelRole,
        path: &Path,
        facts: &[InferenceFact],
        memory_limit: u64,
    ) -> Option<TypedModel> {
        let size = std::fs::metadata(path).ok()?.len();
        if size > memory_limit {
            return None;
        }
        // The NNEF reader's casts of values to their own type go, so the model is the
        // graph the ONNX path declutters (and esddpm's load-time rewrites match it).
        let model = crate::model::guarded(role, "cache", || {
            let mut model = match crate::nnef_file::read(path)? {
                Some(proto) => self.nnef().model_for_proto_model(&proto)?,
                None => self.nnef().model_for_path(path)?,
            };
            crate::rewrite::remove_identity_casts(&mut model)?;
            Ok(model)
        })
        .ok()?;
        let inputs = model.input_outlets().ok()?;
        if inputs.len() != facts.len() {
            return None;
        }
        for (outlet, want) in inputs.iter().zip(facts) {
            let got = model.outlet_fact(*outlet).ok()?;
            let want_shape = want.shape.as_concrete_finite().ok()??;
            let want_dt = want.datum_type.concretize()?;
            if got.datum_type != want_dt || got.shape.as_concrete()? != &*want_shape {
                return None;
            }
        }
        Some(model)
    }

    /// Saves a decluttered model to `path`.
    pub(crate) fn write_model(&self, path: &Path, model: &TypedModel) -> Result<()> {
        self.write_atomic(path, |w| self.nnef().write_to_tar(model, w).map(drop))
    }

    /// Writes through a temporary file in the cache directory, then renames it over
    /// `path`.
    fn write_atomic(
        &self,
        path: &Path,
        write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> TractResult<()>,
    ) -> Result<()> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| Error::Io { path: p, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        // Unique per process and write (not `thread::current()`, whose lazily made handle
        // of the main thread Valgrind reports as lost).
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let tmp = path.with_extension(format!(
            "tmp{}-{}",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            let mut w = std::io::BufWriter::new(file);
            write(&mut w).map_err(|e| Error::Io {
                path: tmp.clone(),
                source: std::io::Error::other(format!("{e:#}")),
            })?;
            w.flush().map_err(io(&tmp))?;
            std::fs::rename(&tmp, path).map_err(io(path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// An element type as a meta file names it: tract's own name (`F32`, `I64`, ...), kept
/// only when tract parses it back to the same type.
fn dtype_name(dt: DatumType) -> Option<String> {
    let name = format!("{dt:?}");
    (name.parse::<DatumType>().ok()? == dt).then_some(name)
}

fn io_to_json(d: &IoDesc) -> Option<Value> {
    let dtype = match d.dtype {
        None => Value::Null,
        Some(dt) => Value::from(dtype_name(dt)?),
    };
    Some(json!({ "name": d.name, "dtype": dtype, "dims": d.dims }))
}

fn io_from_json(v: &Value) -> Option<IoDesc> {
    let dtype = match &v["dtype"] {
        Value::Null => None,
        Value::String(s) => Some(s.parse::<DatumType>().ok()?),
        _ => return None,
    };
    let dims = match &v["dims"] {
        Value::Null => None,
        Value::Array(a) => Some(
            a.iter()
                .map(|d| match d {
                    Value::Null => Some(None),
                    d => d.as_i64().map(Some),
                })
                .collect::<Option<Vec<_>>>()?,
        ),
        _ => return None,
    };
    Some(IoDesc {
        name: v["name"].as_str()?.to_string(),
        dtype,
        dims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_rejects_other_formats() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PlanCache::new(dir.path().join("c"));
        let meta = Meta {
            inputs: vec![
                IoDesc {
                    name: "sample".into(),
                    dtype: Some(DatumType::F32),
                    dims: Some(vec![None, Some(1), Some(32), Some(32)]),
                },
                IoDesc {
                    name: "timestep".into(),
                    dtype: None,
                    dims: None,
                },
            ],
            outputs: vec![IoDesc {
                name: "out".into(),
                dtype: Some(DatumType::F64),
                dims: Some(vec![Some(1)]),
            }],
            declared_weights: 1234,
        };
        assert_eq!(cache.read_meta("k"), None);
        cache.write_meta("k", &meta).unwrap();
        assert_eq!(cache.read_meta("k"), Some(meta));
        let path = cache.meta_path("k");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"format\": 1", "\"format\": 99")).unwrap();
        assert_eq!(cache.read_meta("k"), None);
        std::fs::write(&path, "{ not json").unwrap();
        assert_eq!(cache.read_meta("k"), None);
    }

    #[test]
    fn keys_follow_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let k = PlanCache::key_of_file(&path).unwrap();
        assert_eq!(k, PlanCache::key_of_bytes(&bytes));
        assert_eq!(k.len(), 32);
        let mut other = bytes.clone();
        other[2_500_000] ^= 1;
        assert_ne!(k, PlanCache::key_of_bytes(&other));
    }
}
