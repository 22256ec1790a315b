//! ONNX models through tract: loading from a path or bytes, reading the signature,
//! and one optimised plan per batch size, made once and reused.

use crate::cache::{KeyCheck, Meta, PlanCache};
use crate::error::{Error, ModelRole, Result};
use crate::memory::{self, PlanMemory};
use crate::onnx_file::OnnxFile;
use crate::{
    attention, codegen, direct_conv, group_norm, pointwise_conv, rewrite, small_map_conv, winograd,
};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// One input or output as the ONNX file declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct IoDesc {
    /// The name in the graph.
    pub name: String,
    /// The element type, if declared.
    pub dtype: Option<DatumType>,
    /// The dimensions, if the rank is known; `None` for a symbolic dimension (batch).
    pub dims: Option<Vec<Option<i64>>>,
}

impl IoDesc {
    /// The rank, if known.
    pub fn rank(&self) -> Option<usize> {
        self.dims.as_ref().map(Vec::len)
    }
}

impl std::fmt::Display for IoDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = self.dtype.map_or("?".to_string(), |d| format!("{d:?}"));
        match &self.dims {
            None => write!(f, "{} {dtype} [?]", self.name),
            Some(d) => {
                let dims: Vec<String> = d
                    .iter()
                    .map(|x| x.map_or("N".to_string(), |v| v.to_string()))
                    .collect();
                write!(f, "{} {dtype} [{}]", self.name, dims.join(", "))
            }
        }
    }
}

/// Decodes an ONNX protobuf straight from `bytes` (tract's reader would copy them first).
fn decode(role: ModelRole, bytes: &[u8]) -> Result<pb::ModelProto> {
    use prost::Message;
    guarded(role, "parse", || Ok(pb::ModelProto::decode(bytes)?))
}

/// Runs `f`, turning a panic inside tract into an error.
pub(crate) fn guarded<T>(
    role: ModelRole,
    what: &str,
    f: impl FnOnce() -> TractResult<T>,
) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error_for(role, what, format!("{e:#}"))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            Err(error_for(role, what, format!("tract panicked: {msg}")))
        }
    }
}

/// Runs `f` and records how long it took as a debug record of target `esddpm::load`
/// (`the {role} model, {what}: {ms} ms`), so that a start's stages can be timed by any
/// logger: `RUST_LOG=esddpm::load=debug` with the bench binaries (docs/PERFORMANCE.md).
pub(crate) fn timed<T>(role: ModelRole, what: &str, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    log::debug!(
        target: "esddpm::load",
        "the {role} model, {what}: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    out
}

fn error_for(role: ModelRole, what: &str, message: String) -> Error {
    match what {
        "run" => Error::Inference { role, message },
        _ => Error::ModelLoad {
            role,
            message: format!("{what}: {message}"),
        },
    }
}

/// An ONNX model; optimised plans are made per batch size on demand and cached (and,
/// with a [`PlanCache`], saved for the next start). A model read from a file keeps no
/// parsed copy (its weights live in its plans only): a plan for a new batch size reads
/// the file again.
pub struct OnnxModel {
    role: ModelRole,
    source: Mutex<Source>,
    inputs: Vec<IoDesc>,
    outputs: Vec<IoDesc>,
    memory_limit: u64,
    declared_weights: u64,
    cache: Option<(PlanCache, String)>,
    /// The identity a cached start took the key from ([`PlanCache::known_key`]), until
    /// the first plan checks it against the file's bytes ([`KeyCheck`]).
    unchecked: Mutex<Option<String>>,
    plans: Mutex<HashMap<usize, (Arc<TypedSimplePlan>, PlanMemory)>>,
}

/// Where plans are made from.
enum Source {
    /// A model loaded from bytes: parsed once and kept, since it cannot be read again.
    Bytes(Box<InferenceModel>),
    /// A model loaded from a file. Its parsed form is not kept: the first plan takes
    /// it (`parsed`), and a later plan (another batch size, or a plan missing from the
    /// plan cache) reads the file again, so the weights live in the plans only.
    File {
        path: PathBuf,
        /// The hash of the file's bytes when loaded ([`PlanCache::key_of_file`]): a
        /// file changed since is an error, not another model.
        key: String,
        /// The parsed model until a plan takes it.
        parsed: Option<Box<InferenceModel>>,
        /// Whether the file has been parsed in this process.
        was_parsed: bool,
    },
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("role", &self.role)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

fn describe(fact: &InferenceFact, name: String) -> IoDesc {
    let dtype = fact.datum_type.concretize();
    let dims = fact.shape.rank().concretize().map(|_| {
        fact.shape
            .dims()
            .map(|d| d.concretize().and_then(|t| t.to_i64().ok()))
            .collect()
    });
    IoDesc { name, dtype, dims }
}

impl OnnxModel {
    /// Reads and parses an ONNX file; `memory_limit` (bytes) bounds the file, its
    /// declared weights and every plan made from it (see [`crate::memory`]).
    pub fn from_path(role: ModelRole, path: &Path, memory_limit: u64) -> Result<Self> {
        Self::from_path_cached(role, path, memory_limit, None)
    }

    /// [`Self::from_path`] with a plan cache: when the cache knows this file (by its
    /// bytes' hash) the file is not parsed, and plans come from the cache's NNEF files
    /// (see [`crate::cache`]).
    pub fn from_path_cached(
        role: ModelRole,
        path: &Path,
        memory_limit: u64,
        cache: Option<&PlanCache>,
    ) -> Result<Self> {
        let cache = match cache {
            Some(c) => {
                Self::check_file_size(role, path, memory_limit)?;
                let identity = PlanCache::identity_of(path);
                // A key the cache recorded for the file as it is now: taken on trust
                // until the first plan, which checks it (`KeyCheck`).
                let known = identity.as_ref().and_then(|id| {
                    let key = c.known_key(id)?;
                    Some((c.read_meta(&key)?, key, id.clone()))
                });
                if let Some((meta, key, id)) = known {
                    let model = Self::cached(role, path, memory_limit, c, meta, key)?;
                    *model.unchecked.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
                    return Ok(model);
                }
                let key = timed(role, "plan cache key (hash)", || {
                    PlanCache::key_of_file(path)
                })?;
                Some((c.clone(), key, identity))
            }
            None => None,
        };
        // The key is recorded for the file's identity where the file was the same
        // before and after its bytes were read.
        let remember = |c: &PlanCache, key: &str, identity: Option<String>| {
            if let Some(id) =
                identity.filter(|id| PlanCache::identity_of(path).as_ref() == Some(id))
            {
                c.remember_key(&id, key);
            }
        };
        if let Some((c, key, identity)) = &cache {
            if let Some(meta) = c.read_meta(key) {
                remember(c, key, identity.clone());
                return Self::cached(role, path, memory_limit, c, meta, key.clone());
            }
        }
        let (parsed, meta, key) = Self::parse_file(role, path, memory_limit)?;
        let cache = match cache {
            Some((c, cache_key, identity)) => {
                if cache_key != key {
                    return Err(Self::changed(role, path));
                }
                c.write_meta(&cache_key, &meta)?;
                remember(&c, &key, identity);
                Some((c, cache_key))
            }
            None => None,
        };
        let source = Source::File {
            path: path.to_path_buf(),
            key,
            parsed: Some(Box::new(parsed)),
            was_parsed: true,
        };
        Ok(Self::new(role, source, meta, memory_limit, cache))
    }

    /// A model of the file at `path` whose meta came from `cache` under `key`.
    fn cached(
        role: ModelRole,
        path: &Path,
        memory_limit: u64,
        cache: &PlanCache,
        meta: Meta,
        key: String,
    ) -> Result<Self> {
        memory::check(memory_limit, u128::from(meta.declared_weights), || {
            format!("the {role} model's declared weights")
        })?;
        let source = Source::File {
            path: path.to_path_buf(),
            key: key.clone(),
            parsed: None,
            was_parsed: false,
        };
        Ok(Self::new(
            role,
            source,
            meta,
            memory_limit,
            Some((cache.clone(), key)),
        ))
    }

    /// Parses an ONNX model from memory (a game's asset pack, say), under
    /// `memory_limit` bytes. The parsed model is kept to plan other batch sizes (the
    /// bytes cannot be read again), so the weights are held twice while a plan is
    /// made: [`Self::from_path`] holds them once.
    pub fn from_bytes(role: ModelRole, bytes: &[u8], memory_limit: u64) -> Result<Self> {
        Self::from_bytes_cached(role, bytes, memory_limit, None)
    }

    /// [`Self::from_bytes`] with a plan cache: the bytes are parsed (they are not kept),
    /// the plans come from the cache when present.
    pub fn from_bytes_cached(
        role: ModelRole,
        bytes: &[u8],
        memory_limit: u64,
        cache: Option<&PlanCache>,
    ) -> Result<Self> {
        let (parsed, meta) = Self::parse(
            role,
            &tract_onnx::onnx(),
            decode(role, bytes)?,
            None,
            memory_limit,
        )?;
        let cache = cache.map(|c| (c.clone(), PlanCache::key_of_bytes(bytes)));
        let source = Source::Bytes(Box::new(parsed));
        Ok(Self::new(role, source, meta, memory_limit, cache))
    }

    fn new(
        role: ModelRole,
        source: Source,
        meta: Meta,
        memory_limit: u64,
        cache: Option<(PlanCache, String)>,
    ) -> Self {
        Self {
            role,
            source: Mutex::new(source),
            inputs: meta.inputs,
            outputs: meta.outputs,
            memory_limit,
            declared_weights: meta.declared_weights,
            cache,
            unchecked: Mutex::new(None),
            plans: Mutex::new(HashMap::new()),
        }
    }

    fn check_file_size(role: ModelRole, path: &Path, memory_limit: u64) -> Result<u64> {
        let size = std::fs::metadata(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        memory::check(memory_limit, u128::from(size), || {
            format!("reading the {role} model file {}", path.display())
        })?;
        Ok(size)
    }

    fn changed(role: ModelRole, path: &Path) -> Error {
        Error::ModelLoad {
            role,
            message: format!(
                "{} changed since it was loaded; load it again",
                path.display()
            ),
        }
    }

    /// Reads and parses `path` with its weights in memory once at a time
    /// ([`OnnxFile`]); also returns the file's key.
    fn parse_file(
        role: ModelRole,
        path: &Path,
        memory_limit: u64,
    ) -> Result<(InferenceModel, Meta, String)> {
        let size = Self::check_file_size(role, path, memory_limit)?;
        let file = OnnxFile::read(role, path, size)?;
        let mut onnx = tract_onnx::onnx();
        onnx.provider = file.resolver;
        let dir = file.model_dir.as_deref();
        let (model, meta) = Self::parse(role, &onnx, file.proto, dir, memory_limit)?;
        // The protobuf's buffers are freed: give them back before the plan's weights.
        codegen::return_free_memory();
        Ok((model, meta, file.key))
    }

    /// Builds tract's model from `pb` (`model_dir`: where external data lives).
    fn parse(
        role: ModelRole,
        onnx: &tract_onnx::Onnx,
        pb: pb::ModelProto,
        model_dir: Option<&str>,
        memory_limit: u64,
    ) -> Result<(InferenceModel, Meta)> {
        // The weights as declared, before tract builds a tensor of any of them.
        let declared = memory::declared_weight_bytes(&pb);
        memory::check(memory_limit, declared, || {
            format!("the {role} model's declared weights")
        })?;
        let declared_weights = u64::try_from(declared).unwrap_or(u64::MAX);
        let proto = guarded(role, "parse", || {
            let parsed = onnx.parse(&pb, model_dir)?;
            if !parsed.unresolved_inputs.is_empty() {
                tract_onnx::tract_core::internal::bail!(
                    "could not resolve inputs at top level: {:?}",
                    parsed.unresolved_inputs
                );
            }
            Ok(parsed.model)
        })?;
        drop(pb);
        let inputs = proto
            .input_outlets()
            .map_err(|e| error_for(role, "inputs", e.to_string()))?
            .iter()
            .map(|o| {
                let fact = proto.outlet_fact(*o).expect("input outlet has a fact");
                describe(fact, proto.node(o.node).name.clone())
            })
            .collect();
        let outputs = proto
            .output_outlets()
            .map_err(|e| error_for(role, "outputs", e.to_string()))?
            .iter()
            .map(|o| {
                let fact = proto.outlet_fact(*o).expect("output outlet has a fact");
                // The ONNX output name is the outlet's label; the node is its producer.
                let name = proto
                    .outlet_label(*o)
                    .map_or_else(|| proto.node(o.node).name.clone(), str::to_string);
                describe(fact, name)
            })
            .collect();
        let meta = Meta {
            inputs,
            outputs,
            declared_weights,
        };
        Ok((proto, meta))
    }

    /// The parsed model for a plan: taken from a file's load (not kept), read from the
    /// file again when already taken, or a copy of a model loaded from bytes.
    fn parsed(&self) -> Result<InferenceModel> {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *source {
            Source::Bytes(m) => Ok((**m).clone()),
            Source::File {
                path,
                key,
                parsed,
                was_parsed,
            } => {
                if let Some(m) = parsed.take() {
                    return Ok(*m);
                }
                let (m, _, read_key) = Self::parse_file(self.role, path, self.memory_limit)?;
                if read_key != *key {
                    return Err(Self::changed(self.role, path));
                }
                *was_parsed = true;
                Ok(m)
            }
        }
    }

    /// Whether the ONNX file has been parsed in this process: false after a start whose
    /// plans all came from the plan cache ([`crate::cache`]).
    pub fn is_parsed(&self) -> bool {
        let source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        match &*source {
            Source::Bytes(_) => true,
            Source::File { was_parsed, .. } => *was_parsed,
        }
    }

    /// The memory limit this model was loaded with, in bytes.
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    /// What the plan for `batch` needs (made and cached on first use, like
    /// [`Self::plan`]).
    pub fn plan_memory(
        &self,
        batch: usize,
        facts: impl FnOnce(usize) -> Vec<InferenceFact>,
    ) -> Result<PlanMemory> {
        self.plan_with_memory(batch, facts).map(|(_, m)| m)
    }

    /// The declared inputs.
    pub fn inputs(&self) -> &[IoDesc] {
        &self.inputs
    }

    /// The declared outputs.
    pub fn outputs(&self) -> &[IoDesc] {
        &self.outputs
    }

    /// The optimised plan for `batch`, made with `facts(batch)` as the input facts on
    /// first use and cached.
    ///
    /// Fails with [`Error::MemoryLimit`] before optimising when the inputs alone are
    /// over the limit, and before the first run when the plan's estimate
    /// ([`memory::PlanMemory`]) is.
    pub fn plan(
        &self,
        batch: usize,
        facts: impl FnOnce(usize) -> Vec<InferenceFact>,
    ) -> Result<Arc<TypedSimplePlan>> {
        self.plan_with_memory(batch, facts).map(|(p, _)| p)
    }

    fn plan_with_memory(
        &self,
        batch: usize,
        facts: impl FnOnce(usize) -> Vec<InferenceFact>,
    ) -> Result<(Arc<TypedSimplePlan>, PlanMemory)> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = plans.get(&batch) {
            return Ok(p.clone());
        }
        let facts = facts(batch);
        let role = self.role;
        let input_bytes = facts
            .iter()
            .map(|f| {
                let elem = f.datum_type.concretize().map_or(8, |d| d.size_of());
                match f.shape.as_concrete_finite() {
                    Ok(Some(shape)) => memory::bytes(shape, elem),
                    _ => 0,
                }
            })
            .fold(0u128, u128::saturating_add);
        memory::check(self.memory_limit, input_bytes, || {
            format!("the {role} model's inputs at batch {batch}")
        })?;
        let plan = self.make_plan(batch, facts)?;
        let mut needed = memory::plan_memory(&plan);
        // tract keeps most weights inside its optimised operators (packed), not as
        // `Const` nodes: count at least what the file declares.
        needed.weights = needed.weights.max(self.declared_weights);
        memory::check(self.memory_limit, u128::from(needed.total()), || {
            format!("running the {role} model at batch {batch}")
        })?;
        plans.insert(batch, (plan.clone(), needed));
        Ok((plan, needed))
    }

    /// Optimises the model for `facts`: from the plan cache's decluttered model when it
    /// has one, else from the ONNX model (saving the decluttered model to the cache).
    fn make_plan(&self, batch: usize, facts: Vec<InferenceFact>) -> Result<Arc<TypedSimplePlan>> {
        let role = self.role;
        let entry = self
            .cache
            .as_ref()
            .map(|(c, key)| (c, c.plan_path(key, batch, &facts)));
        let from_cache = entry.as_ref().and_then(|(c, path)| {
            timed(role, "plan cache read", || {
                c.read_model(role, path, &facts, self.memory_limit)
            })
        });
        let decluttered = match from_cache {
            Some(model) => model,
            None => {
                let proto = self.parsed()?;
                let model = guarded(role, "optimise", move || {
                    let mut m = proto;
                    for (i, f) in facts.into_iter().enumerate() {
                        m = m.with_input_fact(i, f)?;
                    }
                    m.into_typed()?.into_decluttered()
                })?;
                if let Some((c, path)) = &entry {
                    c.write_model(path, &model)?;
                }
                model
            }
        };
        // Both sources are decluttered already: what is left is tract's codegen.
        let mut m = guarded(role, "optimise", move || {
            let mut m = decluttered;
            timed(role, "group norms", || group_norm::fuse_group_norms(&mut m))?;
            timed(role, "attention", || attention::fuse_attention(&mut m))?;
            timed(role, "Winograd", || winograd::use_winograd(&mut m))?;
            timed(role, "small maps", || {
                small_map_conv::use_small_map_convs(&mut m)
            })?;
            timed(role, "direct convolutions", || {
                direct_conv::use_direct_convs(&mut m)
            })?;
            timed(role, "1x1 convolutions", || {
                pointwise_conv::fuse_pointwise_convs(&mut m)
            })?;
            Ok(m)
        })?;
        // A key taken on trust is checked while tract's codegen runs (`KeyCheck`): the
        // steps before it keep both cores busy.
        let check = self.start_key_check();
        let plan = guarded(role, "optimise", move || {
            timed(role, "tract's codegen", || codegen::optimize(&mut m))?;
            rewrite::natural_const_strides(&mut m)?;
            m.into_runnable()
        });
        // Finished whether or not the plan was made: a later plan relies on it.
        if let (Some(check), Some((c, _))) = (check, &self.cache) {
            if !timed(role, "key check's wait", || check.finish(c))? {
                return Err(Self::changed(role, &self.path_or_default()));
            }
        }
        plan
    }

    /// The check of a key taken on trust, started (once: the first plan's).
    fn start_key_check(&self) -> Option<KeyCheck> {
        let identity = self
            .unchecked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        match &*source {
            Source::File { path, key, .. } => Some(KeyCheck::start(path, key, &identity)),
            Source::Bytes(_) => None,
        }
    }

    /// The model file's path (empty for a model loaded from bytes).
    fn path_or_default(&self) -> PathBuf {
        let source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        match &*source {
            Source::File { path, .. } => path.clone(),
            Source::Bytes(_) => PathBuf::new(),
        }
    }
}

/// FLOPs of one node of `model` as tract counts them: 2 per multiply-add
/// (`TypedOp::cost`); 0 when its cost is symbolic or unknown.
pub fn node_flops(model: &TypedModel, node: &TypedNode) -> f64 {
    let Ok(facts) = model.node_input_facts(node.id) else {
        return 0.0;
    };
    let Ok(costs) = node.op.cost(&facts) else {
        return 0.0;
    };
    let fma: i64 = costs
        .iter()
        .filter(|(c, _)| matches!(c, tract_onnx::tract_core::ops::Cost::FMA(_)))
        .filter_map(|(_, n)| n.to_i64().ok())
        .sum();
    2.0 * fma as f64
}

/// FLOPs of one run of `plan`: [`node_flops`] summed over its nodes.
pub fn plan_flops(plan: &TypedSimplePlan) -> f64 {
    let model = plan.model();
    model.nodes().iter().map(|n| node_flops(model, n)).sum()
}

/// The concrete output shape of a plan's first output.
pub(crate) fn output_shape(role: ModelRole, plan: &TypedSimplePlan) -> Result<Vec<usize>> {
    output_shape_at(role, plan, 0)
}

/// The concrete output shape of a plan's output number `index` (f32 required).
pub(crate) fn output_shape_at(
    role: ModelRole,
    plan: &TypedSimplePlan,
    index: usize,
) -> Result<Vec<usize>> {
    let fact = plan
        .model()
        .output_fact(index)
        .map_err(|e| error_for(role, "outputs", e.to_string()))?;
    let dtype = fact.datum_type;
    if dtype != DatumType::F32 {
        return Err(Error::ModelSignature {
            role,
            message: format!("output is {dtype:?}, expected f32"),
        });
    }
    fact.shape
        .as_concrete()
        .map(|s| s.to_vec())
        .ok_or_else(|| Error::ModelSignature {
            role,
            message: format!("output shape {:?} is not concrete", fact.shape),
        })
}

/// Runs `state` (a plan's reusable state: tract keeps its scratch between calls) on
/// `inputs` inside `executor` and copies the first output (f32) into `out`, which must
/// have exactly its length.
pub(crate) fn run_into(
    role: ModelRole,
    state: &mut TypedSimpleState,
    executor: &tract_linalg::multithread::Executor,
    inputs: TVec<TValue>,
    out: &mut [f32],
) -> Result<()> {
    run_output_into(role, state, executor, inputs, 0, out)
}

/// [`run_into`] for output number `index`.
pub(crate) fn run_output_into(
    role: ModelRole,
    state: &mut TypedSimpleState,
    executor: &tract_linalg::multithread::Executor,
    inputs: TVec<TValue>,
    index: usize,
    out: &mut [f32],
) -> Result<()> {
    let outputs = guarded(role, "run", || {
        tract_linalg::multithread::multithread_tract_scope(executor.clone(), || state.run(inputs))
    })?;
    let first = outputs.get(index).ok_or_else(|| Error::Inference {
        role,
        message: format!(
            "the model returned {} outputs, no output {index}",
            outputs.len()
        ),
    })?;
    let view = first.try_as_plain_ram().map_err(|e| Error::Inference {
        role,
        message: e.to_string(),
    })?;
    let values = view.as_slice::<f32>().map_err(|e| Error::Inference {
        role,
        message: e.to_string(),
    })?;
    if values.len() != out.len() {
        return Err(Error::ModelSignature {
            role,
            message: format!("output has {} values, expected {}", values.len(), out.len()),
        });
    }
    out.copy_from_slice(values);
    Ok(())
}

/// A plan's run state, kept between calls so that tract reuses its buffers.
pub(crate) fn new_state(role: ModelRole, plan: &Arc<TypedSimplePlan>) -> Result<TypedSimpleState> {
    guarded(role, "state", || TypedSimpleState::new(plan))
}
