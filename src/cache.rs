//! The plan cache: tract's decluttered model per batch size, saved as NNEF, so that a
//! second start skips parsing the ONNX file and most of tract's optimisation.
//!
//! A cache is a directory ([`crate::LoadOptions::plan_cache`], C
//! `EsdLoadParams.plan_cache`). For a model whose bytes have the key `K` (`KeyHasher`:
//! xxh3-128 of each half of the bytes, with the cache format and esddpm's version) it
//! holds
//!
//! - `K.json`: what loading learns from the ONNX file (inputs, outputs, declared weight
//!   bytes), so that a second start need not parse it;
//! - `K-b{batch}-{F}.nnef.tar`: the model with that batch's concrete input facts (hash
//!   `F`) after tract's `declutter`, in NNEF with tract's extensions;
//! - `id-{I}.key`: `K` for the file as it was when last hashed, by its identity `I`
//!   (`PlanCache::identity_of`: path, inode, length, modification and change times).
//!
//! A start with the cache does not parse the ONNX file. It finds `K` by the file's
//! identity, or else hashes the file (on two threads); the plan comes from the NNEF
//! file (its graph parsed and its tensors read on two threads, `nnef_file`)
//! and tract's codegen pass. A key found by identity is still checked against the
//! file's bytes, on a thread of its own while tract's codegen runs (`KeyCheck`),
//! before the first plan is used. On the cifar-size U-Net a second start's
//! load-to-first-step is ~0.3 s against ~0.85 s without the cache, at a peak RSS of
//! 1.33x the weights (docs/PERFORMANCE.md, lever 26); a first start pays ~0.2 s to
//! write the entry. The outputs are the same bits as without the cache (tested).
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
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use xxhash_rust::xxh3::Xxh3;

/// Bumped whenever what an entry holds, or how it is read, changes.
const FORMAT: u32 = 2;

/// The block size of [`PlanCache::key_of_file`]'s reads. Hashing the 143 MB cifar-size
/// U-Net from the page cache on one thread took 77-111 ms with blocks of 256 KiB to
/// 4 MiB and 25-28 ms with 64 KiB blocks (first read of the file in a process, AVX2 VM;
/// later reads in the same process were ~25 ms at any size; the cause of the slow first
/// pass with large blocks was not pinned down); its two halves on two threads, 15-19 ms
/// (Intel Xeon VM, lever 26). `tools/bench/run.sh`'s cached start counts this hash
/// where the file's identity has no key recorded.
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

    /// The key of a model file ([`KeyHasher`]), its two halves hashed on two threads,
    /// each read in blocks of [`HASH_BLOCK`] bytes (the file is never whole in memory).
    pub(crate) fn key_of_file(path: &Path) -> Result<String> {
        key_of_file_on(path, true)
    }

    /// The key of a model given as bytes (same as [`Self::key_of_file`] of a file with
    /// these bytes).
    pub(crate) fn key_of_bytes(bytes: &[u8]) -> String {
        let mut hasher = KeyHasher::new(bytes.len() as u64);
        hasher.update(bytes);
        hasher.finish()
    }

    /// What tells a model file's bytes apart without reading them, where the platform
    /// says (Unix): xxh3-128 of its path, device, inode, length, and modification and
    /// status-change times to the nanosecond. Any write to the file changes its status
    /// change time, which no program can set back, and a file put in its place is
    /// another inode; so the same identity means the same bytes, except on file systems
    /// whose times are coarse. That is why a key found by identity
    /// ([`Self::known_key`]) is still checked against the bytes ([`KeyCheck`]).
    pub(crate) fn identity_of(path: &Path) -> Option<String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(path).ok()?;
            let text = format!(
                "{} {} {} {}.{} {}.{} {}",
                m.dev(),
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                path.display()
            );
            Some(format!(
                "{:032x}",
                xxhash_rust::xxh3::xxh3_128(text.as_bytes())
            ))
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            None
        }
    }

    fn known_key_path(&self, identity: &str) -> PathBuf {
        self.dir.join(format!("id-{identity}.key"))
    }

    /// The key recorded for a file of this identity ([`Self::identity_of`]), if any.
    pub(crate) fn known_key(&self, identity: &str) -> Option<String> {
        let key = std::fs::read_to_string(self.known_key_path(identity)).ok()?;
        let ok = key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then_some(key)
    }

    /// Records `key` for a file of this identity. A failure is ignored: the record only
    /// saves the next start its hash (a read-only cache directory keeps working).
    pub(crate) fn remember_key(&self, identity: &str, key: &str) {
        let _ = self.write_atomic(&self.known_key_path(identity), |w| {
            w.write_all(key.as_bytes()).map_err(TractError::from)
        });
    }

    /// Removes the record of this identity (its key proved wrong).
    pub(crate) fn forget_key(&self, identity: &str) {
        let _ = std::fs::remove_file(self.known_key_path(identity));
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
            let proto = crate::model::timed(role, "NNEF read", || crate::nnef_file::read(path))?;
            let mut model = match proto {
                Some(proto) => crate::model::timed(role, "NNEF translation", || {
                    self.nnef().model_for_proto_model(&proto)
                })?,
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

/// xxh3-128 state over exactly `len` bytes of `file` from where it stands, read in
/// blocks of [`HASH_BLOCK`]; an error if the file ends first.
fn hash_exactly(file: &mut std::fs::File, len: u64) -> std::io::Result<Xxh3> {
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; HASH_BLOCK];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).map_or(HASH_BLOCK, |l| l.min(HASH_BLOCK));
        file.read_exact(&mut buf[..want])?;
        hasher.update(&buf[..want]);
        left -= want as u64;
    }
    Ok(hasher)
}

/// A model's key as its bytes go by: xxh3-128 of each half of the bytes (the first
/// [`Self::split_of`]`(len)` bytes, then the rest), then xxh3-128 of the cache's
/// prefix (esddpm's version and [`FORMAT`]), the length and the two digests, as 32
/// hex digits. Two halves so that [`PlanCache::key_of_file`] can hash them on two
/// threads: on the 143 MB cifar-size U-Net the key took 0.025-0.03 s on one
/// (docs/PERFORMANCE.md, lever 26); the ONNX reader ([`crate::onnx_file`]) feeds it
/// the bytes as it decodes them.
pub(crate) struct KeyHasher {
    len: u64,
    seen: u64,
    first: Xxh3,
    second: Xxh3,
}

impl KeyHasher {
    /// A hasher for `len` bytes.
    pub(crate) fn new(len: u64) -> Self {
        Self {
            len,
            seen: 0,
            first: Xxh3::new(),
            second: Xxh3::new(),
        }
    }

    /// Where the second half of `len` bytes starts.
    fn split_of(len: u64) -> u64 {
        len / 2
    }

    /// The next bytes (past the `len` given to [`Self::new`], they go to the second
    /// half; the key then differs from that of `len` bytes).
    pub(crate) fn update(&mut self, mut bytes: &[u8]) {
        let split = Self::split_of(self.len);
        if self.seen < split {
            let n = usize::try_from(split - self.seen).map_or(bytes.len(), |n| n.min(bytes.len()));
            self.first.update(&bytes[..n]);
            self.seen += n as u64;
            bytes = &bytes[n..];
        }
        self.second.update(bytes);
        self.seen += bytes.len() as u64;
    }

    /// The key.
    pub(crate) fn finish(self) -> String {
        Self::combine(self.seen, &self.first, &self.second)
    }

    fn combine(len: u64, first: &Xxh3, second: &Xxh3) -> String {
        let mut h = Xxh3::new();
        h.update(format!("esddpm {} plan cache {FORMAT}\n", env!("CARGO_PKG_VERSION")).as_bytes());
        h.update(&len.to_le_bytes());
        h.update(&first.digest128().to_le_bytes());
        h.update(&second.digest128().to_le_bytes());
        format!("{:032x}", h.digest128())
    }
}

/// The check of a key that a start took on trust from the file's identity
/// ([`PlanCache::known_key`]): the file's bytes hashed on a thread of their own while
/// the plan is made from the cache, the result compared before the plan is used
/// ([`Self::finish`]). It is started after the plan cache entry is read, which keeps
/// both cores busy: then the second core is otherwise idle (tract's translation and
/// codegen run on one), and the hash takes its place on the second start's critical
/// path off it (docs/PERFORMANCE.md, lever 26). Dropped unfinished, it waits for its
/// thread.
pub(crate) struct KeyCheck {
    path: PathBuf,
    key: String,
    identity: String,
    thread: Option<std::thread::JoinHandle<Result<String>>>,
}

impl KeyCheck {
    /// Starts hashing `path`, whose key was taken to be `key` from `identity`.
    pub(crate) fn start(path: &Path, key: &str, identity: &str) -> Self {
        let for_thread = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("esddpm-key-check".into())
            .spawn(move || key_of_file_on(&for_thread, false))
            .ok();
        Self {
            path: path.to_path_buf(),
            key: key.to_string(),
            identity: identity.to_string(),
            thread,
        }
    }

    /// Whether the file's bytes have the key taken; where they have not, the record
    /// that gave it is removed from `cache`, so that the next start hashes the file.
    pub(crate) fn finish(mut self, cache: &PlanCache) -> Result<bool> {
        let computed = match self.thread.take() {
            Some(handle) => handle.join().map_err(|_| Error::Io {
                path: self.path.clone(),
                source: std::io::Error::other("the key check's thread panicked"),
            })?,
            // No thread could be started: the hash here.
            None => key_of_file_on(&self.path, false),
        }?;
        let same = computed == self.key;
        if !same {
            cache.forget_key(&self.identity);
        }
        Ok(same)
    }
}

impl Drop for KeyCheck {
    fn drop(&mut self) {
        if let Some(handle) = self.thread.take() {
            let _ = handle.join();
        }
    }
}

/// [`PlanCache::key_of_file`], the second half on a thread of its own where
/// `two_threads` (and a thread can be started), else after the first on this one.
fn key_of_file_on(path: &Path, two_threads: bool) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let split = KeyHasher::split_of(len);
    let second = two_threads
        .then(|| {
            let path = path.to_path_buf();
            std::thread::Builder::new()
                .name("esddpm-hash".into())
                .spawn(move || -> std::io::Result<Xxh3> {
                    let mut file = std::fs::File::open(path)?;
                    file.seek(std::io::SeekFrom::Start(split))?;
                    hash_exactly(&mut file, len - split)
                })
                .ok()
        })
        .flatten();
    let first = hash_exactly(&mut file, split).map_err(io)?;
    let second = match second {
        Some(handle) => handle
            .join()
            .map_err(|_| io(std::io::Error::other("the hashing thread panicked")))?,
        None => hash_exactly(&mut file, len - split),
    }
    .map_err(io)?;
    // The file grew while it was read: not one model's bytes.
    file.seek(std::io::SeekFrom::Start(len)).map_err(io)?;
    let mut probe = [0u8; 1];
    if file.read(&mut probe).map_err(io)? != 0 {
        return Err(io(std::io::Error::other(
            "the file grew while it was hashed",
        )));
    }
    Ok(KeyHasher::combine(len, &first, &second))
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
        std::fs::write(
            &path,
            text.replace(&format!("\"format\": {FORMAT}"), "\"format\": 99"),
        )
        .unwrap();
        assert_eq!(cache.read_meta("k"), None);
        std::fs::write(&path, "{ not json").unwrap();
        assert_eq!(cache.read_meta("k"), None);
    }

    #[test]
    fn keys_follow_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        // Odd and even lengths, and none: the halves split where both keys split them.
        for len in [3_000_001usize, 3_000_000, 1, 0] {
            let bytes: Vec<u8> = (0..len as u32).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            let k = PlanCache::key_of_file(&path).unwrap();
            assert_eq!(k, PlanCache::key_of_bytes(&bytes), "{len} bytes");
            // The key check's hash, on one thread, is the same.
            assert_eq!(key_of_file_on(&path, false).unwrap(), k);
            assert_eq!(k.len(), 32);
            // A byte changed in either half gives another key.
            for at in [len / 4, len / 2, len.saturating_sub(1)] {
                if at < len {
                    let mut other = bytes.clone();
                    other[at] ^= 1;
                    assert_ne!(k, PlanCache::key_of_bytes(&other), "{len} bytes, at {at}");
                }
            }
            // The same bytes fed in pieces across the split.
            let mut h = KeyHasher::new(len as u64);
            for piece in bytes.chunks(4099) {
                h.update(piece);
            }
            assert_eq!(h.finish(), k);
        }
        // Moving bytes from one half to the other changes the key (the digests do not
        // commute), and so does the length.
        let a = PlanCache::key_of_bytes(b"abcdef");
        assert_ne!(a, PlanCache::key_of_bytes(b"defabc"));
        assert_ne!(a, PlanCache::key_of_bytes(b"abcdefg"));
        assert!(PlanCache::key_of_file(&dir.path().join("missing.onnx")).is_err());
    }
}
