//! The pipeline API: load a model folder (from disk or from memory), generate a batch
//! into a caller buffer, progress callbacks, cancellation, latents and interpolation.

use crate::sampler::{sampler_of, start_of, EsdSamplerKind, EsdStart};
use crate::status::{
    c_str, guard, guard_void, init_params, memory_limit_or_default, non_null, read_params, slice,
    write_out, CallResult, EsdStatus, Failure,
};
use esddpm_runtime::{
    slerp, GenerateOptions, Images, LoadOptions, MemoryFolder, Pipeline, Progress, SamplerChoice,
    Start,
};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a pipeline is loaded. Fill with `esd_load_params_init`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EsdLoadParams {
    /// `sizeof(EsdLoadParams)`, set by the init function.
    pub struct_size: u32,
    /// Threads of the model runs; 0 = the physical cores. (Loading uses up to two
    /// threads for its memory work whatever this is.)
    pub threads: u32,
    /// The most memory, in bytes, that loading a model or one generation may need
    /// (model files, declared weights, inputs, planned activations, the run's buffers:
    /// estimated and checked before allocating; over it -> `ESD_STATUS_MEMORY_LIMIT`).
    /// 0 = the default, 4 GiB; `UINT64_MAX` = no limit.
    pub memory_limit: u64,
    /// A directory (UTF-8 path) for the plan cache: the first start saves tract's
    /// decluttered models there, later starts skip parsing and most of the
    /// optimisation (a cifar-size U-Net starts in 0.62 s instead of 0.85 s, at a peak
    /// memory of 198 MB for 143 MB of weights). Created if missing; keep it private to the
    /// application. Read during the call only. NULL (default) = no cache.
    pub plan_cache: *const c_char,
}

impl Default for EsdLoadParams {
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            threads: 0,
            memory_limit: 0,
            plan_cache: std::ptr::null(),
        }
    }
}

/// One file of an in-memory model folder (a game's asset pack).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EsdFile {
    /// The file name as `esddpm.json` names it (NUL-terminated UTF-8).
    pub name: *const c_char,
    /// The bytes.
    pub data: *const u8,
    /// Their number.
    pub len: usize,
}

/// Everything that defines one generation. Fill with `esd_generate_params_init`, then
/// change fields. Caller buffers (latents, labels, images, mask) are copied during the
/// call and may be freed after it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EsdGenerateParams {
    /// `sizeof(EsdGenerateParams)`, set by the init function.
    pub struct_size: u32,
    /// 1: pick a random seed (reported through `seed_used`); 0: use `seed`.
    pub random_seed: u32,
    /// Seed of all noise: the same seed and parameters give the same bytes.
    pub seed: u64,
    /// Index of the first image in the seed's streams (image `i` of a batch equals image
    /// 0 of a batch with `first_image = i`).
    pub first_image: u64,
    /// Images to generate (>= 1).
    pub batch: u32,
    /// An `EsdStart`: early stop from the prior (default), img2img strength, or noise.
    pub start: u32,
    /// `T'` of an early stop; 0 = the folder's recommended start.
    pub t_prime: u32,
    /// Reverse steps (U-Net calls); 0 = the default (`T'` for DDPM, 10 for DDIM/DPM
    /// from an early stop).
    pub steps: u32,
    /// An `EsdSamplerKind` (default DDPM).
    pub sampler: u32,
    /// -1: the scheduler config's `clip_sample`; 0: off; 1: on.
    pub clip_sample: i32,
    /// DDIM's eta (0 = deterministic).
    pub eta: f64,
    /// img2img strength in (0, 1] for `ESD_START_STRENGTH`.
    pub strength: f64,
    /// Name of the prior (NUL-terminated); NULL = the folder's default.
    pub prior: *const c_char,
    /// Caller latents, `batch * latent_len` floats (see `esd_pipeline_latent_len`);
    /// NULL = seeded normals.
    pub latents: *const f32,
    /// Number of floats at `latents`.
    pub latents_len: usize,
    /// One class label per image for a class-conditional prior; NULL = none.
    pub class_labels: *const i64,
    /// Number of labels.
    pub class_labels_len: usize,
    /// Start image(s) in [-1, 1], NCHW (one image or the batch): img2img, or the known
    /// image of inpainting; NULL = the prior's images.
    pub init_image: *const f32,
    /// Number of floats at `init_image`.
    pub init_image_len: usize,
    /// Inpainting mask, `H*W` (or `C*H*W`) floats: 1 = keep the known pixel, 0 =
    /// generate; NULL = no inpainting.
    pub inpaint_mask: *const f32,
    /// Number of floats at `inpaint_mask`.
    pub inpaint_mask_len: usize,
}

impl Default for EsdGenerateParams {
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            random_seed: 0,
            seed: 0,
            first_image: 0,
            batch: 1,
            start: EsdStart::EarlyStop as u32,
            t_prime: 0,
            steps: 0,
            sampler: 0,
            clip_sample: -1,
            eta: 0.0,
            strength: 0.5,
            prior: std::ptr::null(),
            latents: std::ptr::null(),
            latents_len: 0,
            class_labels: std::ptr::null(),
            class_labels_len: 0,
            init_image: std::ptr::null(),
            init_image_len: 0,
            inpaint_mask: std::ptr::null(),
            inpaint_mask_len: 0,
        }
    }
}

/// What a progress callback sees after each step. Valid during the callback only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EsdProgress {
    /// Steps done (1 after the first step).
    pub step: u32,
    /// Steps in the run.
    pub total: u32,
    /// The timestep of the step just taken.
    pub timestep: u32,
    /// The predicted clean images (NCHW floats in [-1, 1]) when the preview was asked
    /// for in `esd_pipeline_set_progress`; NULL otherwise.
    pub preview: *const f32,
    /// Number of floats at `preview` (0 without a preview).
    pub preview_len: usize,
}

/// A progress callback: called on the generating thread after each step.
pub type EsdProgressCallback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, progress: *const EsdProgress)>;

#[derive(Clone, Copy)]
struct Hook {
    callback: unsafe extern "C" fn(*mut c_void, *const EsdProgress),
    user_data: *mut c_void,
    preview: bool,
}

// SAFETY: the caller promises (header) that the callback and its user data may be used
// from the threads that generate.
unsafe impl Send for Hook {}

/// A loaded pipeline (opaque). Shareable by threads.
pub struct EsdPipeline {
    pub(crate) pipeline: Arc<Pipeline>,
    hook: Mutex<Option<Hook>>,
    cancel_epoch: AtomicU64,
}

fn random_seed() -> u64 {
    // A fresh SipHash key per call: random enough for picking a seed.
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        & (i64::MAX as u64)
}

/// The generation options of `p`, with the seed that will be used.
///
/// # Safety
/// The pointers in `p` must be valid for their lengths.
pub(crate) unsafe fn options(p: &EsdGenerateParams) -> Result<GenerateOptions, Failure> {
    if p.batch == 0 {
        return Err(Failure::invalid("batch must be at least 1"));
    }
    let seed = match p.random_seed {
        0 => p.seed,
        1 => random_seed(),
        v => {
            return Err(Failure::invalid(format!(
                "random_seed = {v}; expected 0 or 1"
            )))
        }
    };
    let start = match start_of(p.start)? {
        EsdStart::EarlyStop => Start::EarlyStop {
            t_prime: (p.t_prime != 0).then_some(p.t_prime as usize),
        },
        EsdStart::Strength => Start::Strength(p.strength),
        EsdStart::Noise => Start::Noise,
    };
    let sampler = match sampler_of(p.sampler)? {
        EsdSamplerKind::Ddpm => SamplerChoice::Ddpm,
        EsdSamplerKind::Ddim => SamplerChoice::Ddim { eta: p.eta },
        EsdSamplerKind::DpmSolver => SamplerChoice::DpmSolver,
    };
    let clip_sample = match p.clip_sample {
        -1 => None,
        0 => Some(false),
        1 => Some(true),
        v => {
            return Err(Failure::invalid(format!(
                "clip_sample = {v}; expected -1, 0 or 1"
            )))
        }
    };
    let opt_vec = |ptr: *const f32, len: usize, name: &str| -> Result<Option<Vec<f32>>, Failure> {
        if ptr.is_null() {
            if len != 0 {
                return Err(Failure::invalid(format!(
                    "{name} is NULL but its length is {len}"
                )));
            }
            return Ok(None);
        }
        Ok(Some(slice(ptr, len, name)?.to_vec()))
    };
    let class_labels = if p.class_labels.is_null() {
        None
    } else {
        Some(slice(p.class_labels, p.class_labels_len, "class_labels")?.to_vec())
    };
    let prior = if p.prior.is_null() {
        None
    } else {
        Some(c_str(p.prior, "prior")?.to_string())
    };
    Ok(GenerateOptions {
        seed,
        batch: p.batch as usize,
        first_image: p.first_image,
        start,
        sampler,
        steps: (p.steps != 0).then_some(p.steps as usize),
        clip_sample,
        clip_sample_range: None,
        prior,
        latents: opt_vec(p.latents, p.latents_len, "latents")?,
        class_labels,
        init_image: opt_vec(p.init_image, p.init_image_len, "init_image")?,
        paste: None,
        inpaint_mask: opt_vec(p.inpaint_mask, p.inpaint_mask_len, "inpaint_mask")?,
    })
}

/// Reads the generation params (NULL = defaults).
unsafe fn generate_params(p: *const EsdGenerateParams) -> Result<EsdGenerateParams, Failure> {
    let size = std::mem::size_of::<EsdGenerateParams>();
    read_params(p, EsdGenerateParams::default(), size, "params")
}

fn load_options(params: *const EsdLoadParams) -> Result<LoadOptions, Failure> {
    // Callers built before memory_limit existed pass the shorter struct.
    let size = std::mem::offset_of!(EsdLoadParams, memory_limit);
    // SAFETY: the caller passes NULL or a valid struct (header contract).
    let p = unsafe { read_params(params, EsdLoadParams::default(), size, "params")? };
    let plan_cache = if p.plan_cache.is_null() {
        None
    } else {
        // SAFETY: non-NULL, a NUL-terminated string (header contract).
        Some(unsafe { c_str(p.plan_cache, "params.plan_cache")? }.into())
    };
    Ok(LoadOptions {
        threads: (p.threads != 0).then_some(p.threads as usize),
        memory_limit: memory_limit_or_default(p.memory_limit),
        plan_cache,
    })
}

fn new_handle(pipeline: Pipeline) -> *mut EsdPipeline {
    Box::into_raw(Box::new(EsdPipeline {
        pipeline: Arc::new(pipeline),
        hook: Mutex::new(None),
        cancel_epoch: AtomicU64::new(0),
    }))
}

/// Fills `params` with the defaults (threads 0 = the physical cores).
///
/// # Safety
/// `params` must point to a writable `EsdLoadParams`.
#[no_mangle]
pub unsafe extern "C" fn esd_load_params_init(params: *mut EsdLoadParams) -> EsdStatus {
    init_params(params)
}

/// Fills `params` with the defaults: seed 0, one image, ES-DDPM from the default prior
/// at the folder's recommended T', DDPM, the config's clipping.
///
/// # Safety
/// `params` must point to a writable `EsdGenerateParams`.
#[no_mangle]
pub unsafe extern "C" fn esd_generate_params_init(params: *mut EsdGenerateParams) -> EsdStatus {
    init_params(params)
}

/// Loads a model folder (`esddpm.json` + `scheduler_config.json` + ONNX files, or the
/// diffusers layout). `params` may be NULL (defaults). `*out` is set only on success.
///
/// # Safety
/// `folder` must be a NUL-terminated string; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_new(
    folder: *const c_char,
    params: *const EsdLoadParams,
    out: *mut *mut EsdPipeline,
) -> EsdStatus {
    guard(|| {
        let folder = c_str(folder, "folder")?;
        non_null(out, "out")?;
        let p = Pipeline::from_folder(folder, &load_options(params)?)?;
        out.write(new_handle(p));
        Ok(())
    })
}

/// Loads a pipeline from memory: the texts of `scheduler_config.json` and
/// `esddpm.json` and the files they name (the bytes are copied; free them after the
/// call). `params` may be NULL. `*out` is set only on success.
///
/// # Safety
/// The buffers must be readable for their lengths; `files` must hold `files_len`
/// entries; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_new_from_memory(
    scheduler_config: *const u8,
    scheduler_config_len: usize,
    esddpm_config: *const u8,
    esddpm_config_len: usize,
    files: *const EsdFile,
    files_len: usize,
    params: *const EsdLoadParams,
    out: *mut *mut EsdPipeline,
) -> EsdStatus {
    guard(|| {
        non_null(scheduler_config, "scheduler_config")?;
        non_null(esddpm_config, "esddpm_config")?;
        non_null(files, "files")?;
        non_null(out, "out")?;
        let text = |p, len, name: &str| {
            std::str::from_utf8(slice(p, len, name)?)
                .map_err(|e| Failure::new(EsdStatus::InvalidUtf8, format!("{name}: {e}")))
        };
        let scheduler_config = text(scheduler_config, scheduler_config_len, "scheduler_config")?;
        let esddpm_config = text(esddpm_config, esddpm_config_len, "esddpm_config")?;
        let mut map = BTreeMap::new();
        for (i, f) in slice(files, files_len, "files")?.iter().enumerate() {
            let name = c_str(f.name, &format!("files[{i}].name"))?.to_string();
            non_null(f.data, &format!("files[{i}].data"))?;
            map.insert(name, slice(f.data, f.len, "files[].data")?);
        }
        let folder = MemoryFolder {
            scheduler_config,
            esddpm_config,
            files: map,
        };
        let p = Pipeline::from_memory(&folder, &load_options(params)?)?;
        out.write(new_handle(p));
        Ok(())
    })
}

/// Frees a pipeline (NULL is ignored). Sessions begun on it stay valid (they keep the
/// models alive) until freed. No generation may be running on it.
///
/// # Safety
/// `pipeline` must be NULL or from `esd_pipeline_new*`, freed once.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_free(pipeline: *mut EsdPipeline) {
    guard_void(|| {
        if !pipeline.is_null() {
            drop(Box::from_raw(pipeline));
        }
    })
}

/// The image shape: channels, height, width.
///
/// # Safety
/// `pipeline` must be valid; the outputs writable.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_image_shape(
    pipeline: *const EsdPipeline,
    channels: *mut u32,
    height: *mut u32,
    width: *mut u32,
) -> EsdStatus {
    guard(|| {
        non_null(pipeline, "pipeline")?;
        non_null(channels, "channels")?;
        non_null(height, "height")?;
        non_null(width, "width")?;
        let [c, h, w] = (*pipeline).pipeline.image_shape();
        channels.write(c as u32);
        height.write(h as u32);
        width.write(w as u32);
        Ok(())
    })
}

/// The length of one image's prior latent (`prior` NULL = the default prior).
///
/// # Safety
/// `pipeline` must be valid; `prior` NULL or a NUL-terminated string; `len` writable.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_latent_len(
    pipeline: *const EsdPipeline,
    prior: *const c_char,
    len: *mut usize,
) -> EsdStatus {
    guard(|| {
        non_null(pipeline, "pipeline")?;
        non_null(len, "len")?;
        let p = &(*pipeline).pipeline;
        let name = if prior.is_null() {
            p.default_prior()
                .ok_or_else(|| Failure::invalid("the folder has no prior"))?
                .to_string()
        } else {
            c_str(prior, "prior")?.to_string()
        };
        let prior = p
            .prior(&name)
            .ok_or_else(|| Failure::invalid(format!("no prior named {name:?}")))?;
        len.write(prior.latent_len());
        Ok(())
    })
}

/// Sets (or, with a NULL callback, removes) the pipeline's progress callback, called
/// after every step of every generation on this pipeline, on the generating thread,
/// with `user_data`. `preview` 1 passes the predicted clean images (x0) too.
///
/// # Safety
/// `pipeline` must be valid; the callback and user data must stay usable from the
/// generating threads until replaced or the pipeline is freed.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_set_progress(
    pipeline: *mut EsdPipeline,
    callback: EsdProgressCallback,
    user_data: *mut c_void,
    preview: u32,
) -> EsdStatus {
    guard(|| {
        non_null(pipeline, "pipeline")?;
        let hook = callback.map(|callback| Hook {
            callback,
            user_data,
            preview: preview != 0,
        });
        *(*pipeline).hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
        Ok(())
    })
}

/// Cancels every generation running on this pipeline now (from any thread, a progress
/// callback included): each stops within one step with `ESD_STATUS_CANCELLED`, writing
/// nothing. Later generations are not affected.
///
/// # Safety
/// `pipeline` must be valid.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_cancel(pipeline: *const EsdPipeline) -> EsdStatus {
    guard(|| {
        non_null(pipeline, "pipeline")?;
        (*pipeline).cancel_epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    })
}

/// Runs one generation with the pipeline's hook and cancellation: the images and the
/// seed used.
unsafe fn run(
    handle: &EsdPipeline,
    params: *const EsdGenerateParams,
    out_len: usize,
) -> Result<(Images, u64), Failure> {
    let o = options(&generate_params(params)?)?;
    let [c, h, w] = handle.pipeline.image_shape();
    let need = o.batch * c * h * w;
    if out_len < need {
        return Err(Failure::new(
            EsdStatus::BufferTooSmall,
            format!("out holds {out_len} values; {} images need {need}", o.batch),
        ));
    }
    let epoch = handle.cancel_epoch.load(Ordering::SeqCst);
    let hook = *handle.hook.lock().unwrap_or_else(|p| p.into_inner());
    let cancelled = AtomicBool::new(false);
    let images = handle.pipeline.generate_with(
        &o,
        |p: &Progress<'_>| {
            if let Some(hook) = hook {
                let (preview, preview_len) = if hook.preview {
                    (p.preview.as_ptr(), p.preview.len())
                } else {
                    (std::ptr::null(), 0)
                };
                let info = EsdProgress {
                    step: p.info.step as u32 + 1,
                    total: p.total as u32,
                    timestep: p.info.timestep,
                    preview,
                    preview_len,
                };
                // SAFETY: the caller's callback, per esd_pipeline_set_progress.
                unsafe { (hook.callback)(hook.user_data, &info) };
            }
            if handle.cancel_epoch.load(Ordering::SeqCst) != epoch {
                cancelled.store(true, Ordering::SeqCst);
            }
        },
        Some(&cancelled),
    )?;
    Ok((images, o.seed))
}

/// Generates `params->batch` images into `out` as 8-bit pixels: image after image,
/// rows top to bottom, `C` interleaved bytes per pixel (1 for gray), `batch * C * H *
/// W` bytes. `params` NULL = defaults; `seed_used` (may be NULL) receives the seed.
/// Nothing is written on failure.
///
/// # Safety
/// `pipeline` must be valid; `out` must hold `out_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_generate_u8(
    pipeline: *const EsdPipeline,
    params: *const EsdGenerateParams,
    out: *mut u8,
    out_len: usize,
    seed_used: *mut u64,
) -> EsdStatus {
    guard(|| {
        non_null(pipeline, "pipeline")?;
        non_null(out, "out")?;
        let (images, seed) = run(&*pipeline, params, out_len)?;
        let bytes: Vec<u8> = (0..images.len()).flat_map(|i| images.to_u8(i)).collect();
        write_out(&bytes, out, out_len, "out")?;
        write_seed(seed_used, seed)
    })
}

/// Generates into `out` as floats in [-1, 1], NCHW, `batch * C * H * W` values;
/// otherwise as `esd_pipeline_generate_u8`.
///
/// # Safety
/// `pipeline` must be valid; `out` must hold `out_len` floats.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_generate_f32(
    pipeline: *const EsdPipeline,
    params: *const EsdGenerateParams,
    out: *mut f32,
    out_len: usize,
    seed_used: *mut u64,
) -> EsdStatus {
    guard(|| {
        non_null(pipeline, "pipeline")?;
        non_null(out, "out")?;
        let (images, seed) = run(&*pipeline, params, out_len)?;
        write_out(&images.data, out, out_len, "out")?;
        write_seed(seed_used, seed)
    })
}

pub(crate) unsafe fn write_seed(seed_used: *mut u64, seed: u64) -> CallResult {
    if !seed_used.is_null() {
        seed_used.write(seed);
    }
    Ok(())
}

/// The prior latents a generation with `params` would use (`batch * latent_len`
/// floats): the seeded normals, for interpolation or editing; then pass them back in
/// `params->latents`.
///
/// # Safety
/// `pipeline` must be valid; `out` must hold `out_len` floats.
#[no_mangle]
pub unsafe extern "C" fn esd_pipeline_latents(
    pipeline: *const EsdPipeline,
    params: *const EsdGenerateParams,
    out: *mut f32,
    out_len: usize,
) -> EsdStatus {
    guard(|| {
        non_null(pipeline, "pipeline")?;
        non_null(out, "out")?;
        let o = options(&generate_params(params)?)?;
        let z = (*pipeline).pipeline.latents(&o)?;
        write_out(&z, out, out_len, "out")
    })
}

/// Spherical interpolation between latents `a` and `b` (`len` floats each) at `t` in
/// [0, 1]: `sin((1-t) w) / sin(w) a + sin(t w) / sin(w) b`, `w` the angle between them
/// (linear when they are nearly parallel). Writes `len` floats to `out`.
///
/// # Safety
/// `a`, `b` must hold `len` floats; `out` `out_len` floats.
#[no_mangle]
pub unsafe extern "C" fn esd_slerp(
    a: *const f32,
    b: *const f32,
    len: usize,
    t: f32,
    out: *mut f32,
    out_len: usize,
) -> EsdStatus {
    guard(|| {
        non_null(a, "a")?;
        non_null(b, "b")?;
        let v = slerp(slice(a, len, "a")?, slice(b, len, "b")?, t)?;
        write_out(&v, out, out_len, "out")
    })
}
