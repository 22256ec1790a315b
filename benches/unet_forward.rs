//! U-Net forwards through esddpm (tract), for the benchmark against ONNX Runtime and
//! PyTorch (issue 6). Driven by `tools/bench/run.sh`; every mode prints one JSON line on
//! stdout (human-readable notes and tables go to stderr).
//!
//! ```text
//! cargo bench --bench unet_forward -- [forward] MODEL C H W BATCH THREADS REPS
//!     [--warmup N] [--t T] [--input FILE] [--output FILE]
//!     [--path batched|per-image] [--plan-cache DIR]
//!     [--tract-thresholds PANELS,MACS,ELEMENTS]
//! cargo bench --bench unet_forward -- profile MODEL C H W BATCH REPS [--warmup N] [--t T]
//!     [--rewrite off|strides|all] [--direct-max-channels N] [--direct-min-width N]
//!     [--direct-tiles wide,wide16,rows,narrow,wide16x6|none] [--group-norm fused|off]
//!     [--attention fused|off] [--pointwise fused|off] [--winograd on|off|large|all]
//! cargo bench --bench unet_forward -- e2e FOLDER MODE BATCH THREADS ROUNDS
//!     MODE: es-ddpm100 | es-ddim10 | ddpm1000
//! cargo bench --bench unet_forward -- split [WORK_US ...] [--reps N] [--rounds R]
//! ```
//!
//! `forward`: loads MODEL through esddpm's public API (`OnnxModel::from_path`,
//! `Unet::new`, `Unet::state`, `Unet::run_in`) and reports the load-to-first-step time
//! from `main` (file read, parse, optimise, first forward, and each part), the median,
//! min, mean and max of REPS forwards after the warm-up, the CPU cores kept busy in the
//! timed loop (process CPU time from `getrusage` over wall time), the peak RSS (`VmHWM`)
//! and the weights. `--input` reads BATCH*C*H*W little-endian f32 (else a seeded normal
//! sample), `--output` writes the first forward's output the same way; the timestep is
//! `--t` (default 500) for every sample. `--plan-cache DIR` loads through esddpm's plan
//! cache (`OnnxModel::from_path_cached`): the first run fills DIR, the next starts from it.
//! `--tract-thresholds P,M,E` sets tract's process-wide threading gates first (matmul
//! panels, matmul multiply-adds, elementwise elements; tract's defaults 64, 2^21, 32768),
//! to see whether any setting makes its executor pay.
//!
//! `profile`: one thread; times every node of the optimised plan (REPS profiled
//! forwards after the warm-up) and aggregates by operator type, with the FLOPs tract
//! counts for each node (`TypedOp::cost`, 2 FLOP per FMA). `--rewrite off` profiles
//! tract's own plan for the same inputs, without esddpm's load-time rewrites;
//! `--rewrite strides` esddpm's plan without its direct convolutions
//! (`esddpm::direct_conv`); `all` (the default) esddpm's plan. The `--direct-*` options
//! give the direct convolutions another `Policy` (channel and width limits, tiles), to
//! re-measure where they win; `--group-norm off` leaves tract's decomposition of each
//! group norm in place (`esddpm::group_norm`), to measure what the fused op gains;
//! `--attention off` likewise tract's attention (`esddpm::attention`),
//! `--pointwise off` tract's 1 × 1 convolutions (`esddpm::pointwise_conv`),
//! `--winograd off` leaves the 3 × 3 convolutions of 8 × 8 maps or more to the direct
//! kernels and tract (`esddpm::winograd`), `--winograd large` Winograd on the maps of 32 × 32 or more only
//! (the default before the nineteenth lever), and `--winograd all` on every map, 4 × 4
//! and 2 × 2 too.
//!
//! `e2e`: images per second of `Pipeline::generate` on a model folder: ES-DDPM from the
//! default prior at `T' = 100` with 100 DDPM steps (`es-ddpm100`) or 10 DDIM steps
//! (`es-ddim10`), or 1000 DDPM steps from noise (`ddpm1000`); ROUNDS timed calls of
//! BATCH images after a warm-up call that makes the plans.
//!
//! `split`: what one split of an operator's work into two parts costs beyond the parts
//! (lever 21 in `docs/PERFORMANCE.md`). From a pool thread of a 2-thread pool with the
//! helper spinning (`op_threads::on_pool`), REPS splits of two parts that each
//! busy-wait WORK_US µs (default 2, 5, 10, 20), through esddpm's hand-over
//! (`op_threads::for_each`) and through rayon's scope on the same pool (what
//! `for_each` used before the lever), alternated ROUNDS times (default 3); the median
//! µs per split beyond WORK_US of each.

use esddpm::attention::fuse_attention;
use esddpm::cache::PlanCache;
use esddpm::direct_conv::{use_direct_convs_with, Policy, Tile};
use esddpm::group_norm::fuse_group_norms;
use esddpm::memory::DEFAULT_MEMORY_LIMIT;
use esddpm::model::{node_flops, OnnxModel};
use esddpm::pointwise_conv::fuse_pointwise_convs_with;
use esddpm::unet::Unet;
use esddpm::winograd::use_winograd_with;
use esddpm::{GenerateOptions, LoadOptions, ModelRole, Pipeline, SamplerChoice, Start};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{EvalContext, OpState};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn usage() -> ! {
    eprintln!(
        "usage:\n  unet_forward [forward] MODEL C H W BATCH THREADS REPS [--warmup N] [--t T] \
         [--input FILE] [--output FILE] [--path batched|per-image] [--plan-cache DIR] \
         [--tract-thresholds P,M,E]\n  unet_forward profile MODEL C H W BATCH REPS \
         [--warmup N] [--t T] [--rewrite off|strides|all] [--direct-max-channels N] \
         [--direct-min-width N] [--direct-tiles wide,wide16,rows,narrow,wide16x6|none] [--group-norm fused|off] [--attention fused|off] [--pointwise fused|off] [--winograd on|off|large|all] [--small-maps on|off]\n  unet_forward e2e FOLDER MODE BATCH THREADS \
         ROUNDS (MODE: es-ddpm100 | es-ddim10 | ddpm1000)\n  unet_forward split [WORK_US ...] \
         [--reps N] [--rounds R]"
    );
    std::process::exit(2)
}

/// Positional arguments and `--key value` options.
struct Args {
    pos: Vec<String>,
    opts: BTreeMap<String, String>,
}

impl Args {
    fn parse(raw: impl Iterator<Item = String>) -> Self {
        let mut pos = Vec::new();
        let mut opts = BTreeMap::new();
        let mut it = raw.peekable();
        while let Some(a) = it.next() {
            // `cargo bench` passes `--bench` to a harness-less bench.
            if a == "--bench" {
                continue;
            }
            if let Some(key) = a.strip_prefix("--") {
                let v = it.next().unwrap_or_else(|| usage());
                opts.insert(key.to_string(), v);
            } else {
                pos.push(a);
            }
        }
        Self { pos, opts }
    }

    fn num<T: std::str::FromStr>(&self, i: usize) -> T {
        self.pos
            .get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage())
    }

    fn opt<T: std::str::FromStr>(&self, key: &str, default: T) -> T {
        self.opts
            .get(key)
            .map(|s| s.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(default)
    }
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Process CPU time (user + system, all threads), seconds.
#[cfg(target_os = "linux")]
fn cpu_time() -> f64 {
    #[repr(C)]
    struct Timeval {
        sec: i64,
        usec: i64,
    }
    #[repr(C)]
    struct Rusage {
        utime: Timeval,
        stime: Timeval,
        rest: [i64; 14],
    }
    unsafe extern "C" {
        fn getrusage(who: i32, usage: *mut Rusage) -> i32;
    }
    let mut u = Rusage {
        utime: Timeval { sec: 0, usec: 0 },
        stime: Timeval { sec: 0, usec: 0 },
        rest: [0; 14],
    };
    // SAFETY: RUSAGE_SELF (0) and a struct with the layout of Linux's `struct rusage`
    // on 64-bit targets (two timevals of two longs, fourteen longs).
    let rc = unsafe { getrusage(0, &mut u) };
    if rc != 0 {
        return f64::NAN;
    }
    let t = |v: &Timeval| v.sec as f64 + v.usec as f64 * 1e-6;
    t(&u.utime) + t(&u.stime)
}

#[cfg(not(target_os = "linux"))]
fn cpu_time() -> f64 {
    f64::NAN
}

/// A field of /proc/self/status in MB (`VmHWM` = peak RSS), NaN where unavailable.
fn proc_status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb * 1024.0 / 1e6)
}

fn executor(threads: usize) -> Executor {
    if threads <= 1 {
        Executor::SingleThread
    } else {
        Executor::multithread(threads)
    }
}

/// A seeded standard-normal sample (SplitMix64 + Box-Muller), for runs without `--input`.
fn normal_sample(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(1e-300), next());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

fn read_f32(path: &Path, n: usize) -> Res<Vec<f32>> {
    let bytes = std::fs::read(path)?;
    if bytes.len() != 4 * n {
        return Err(format!(
            "{}: {} bytes, expected {}",
            path.display(),
            bytes.len(),
            4 * n
        )
        .into());
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn write_f32(path: &Path, v: &[f32]) -> Res<()> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes)?;
    Ok(())
}

fn model_name(path: &Path) -> String {
    path.file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned())
}

fn forward(t_main: Instant, a: &Args) -> Res<Value> {
    if a.pos.len() < 7 {
        usage()
    }
    let path = PathBuf::from(&a.pos[0]);
    let shape: [usize; 3] = [a.num(1), a.num(2), a.num(3)];
    let (batch, threads, reps): (usize, usize, usize) = (a.num(4), a.num(5), a.num(6));
    let warmup: usize = a.opt("warmup", 2);
    let t: u32 = a.opt("t", 500);
    if let Some(v) = a.opts.get("tract-thresholds") {
        let v: Vec<usize> = v
            .split(',')
            .map(|x| x.parse().unwrap_or_else(|_| usage()))
            .collect();
        let [panels, macs, elements] = v[..] else {
            usage()
        };
        tract_linalg::multithread::set_threading_panel_threshold(panels);
        tract_linalg::multithread::set_threading_mac_threshold(macs);
        tract_linalg::multithread::set_threading_element_threshold(elements);
    }
    let exec = executor(threads);
    // `--path batched` (default): one forward of the batch-`batch` plan, tract's executor
    // with `threads` threads. `--path per-image`: esddpm's own batch path
    // (`Session::step`): `batch` forwards of the batch-1 plan, the images split across
    // min(threads, batch) OS threads, one single-threaded run state each.
    let per_image = a.opts.get("path").map(String::as_str) == Some("per-image");
    let workers = if per_image {
        esddpm::session::workers(threads, batch)
    } else {
        1
    };

    // Load to first step, from main(): read + parse, optimise, first forward.
    let t0 = Instant::now();
    // `--plan-cache DIR`: load through esddpm's plan cache (the first run fills it, a
    // second run starts from it).
    let cache = a.opts.get("plan-cache").map(PlanCache::new);
    let model =
        OnnxModel::from_path_cached(ModelRole::Unet, &path, DEFAULT_MEMORY_LIMIT, cache.as_ref())?;
    let parse_s = secs(t0);
    let t0 = Instant::now();
    // Unet::new checks the signature on the plan for batch 1 (optimised and cached).
    let unet = Unet::new(model, shape)?;
    let optimise_b1_s = secs(t0);
    let t0 = Instant::now();
    // The plan for `batch` (the cached batch-1 plan when batch is 1) and its run state;
    // per image: one batch-1 state per worker.
    let mut states = if per_image {
        (0..workers)
            .map(|_| unet.state(1))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![unet.state(batch)?]
    };
    let plan_batch_s = secs(t0);
    let n_in = batch * shape.iter().product::<usize>();
    let x = match a.opts.get("input") {
        Some(p) => read_f32(Path::new(p), n_in)?,
        None => normal_sample(n_in, 0),
    };
    let [_, h, w] = shape;
    let mut out = vec![0f32; batch * unet.out_channels() * h * w];
    let mut forward = |out: &mut [f32]| -> Result<(), esddpm::Error> {
        if per_image {
            // esddpm's own batch path, as `Session::step` runs it.
            unet.run_images(&mut states, &x, t, out, &exec)
        } else {
            unet.run_in(&mut states[0], &x, t, out, &exec)
        }
    };
    let t0 = Instant::now();
    forward(&mut out)?;
    let first_run_s = secs(t0);
    let load_to_first_step_s = secs(t_main);
    if let Some(p) = a.opts.get("output") {
        write_f32(Path::new(p), &out)?;
    }

    for _ in 0..warmup {
        forward(&mut out)?;
    }
    let mut times = Vec::with_capacity(reps);
    let (wall0, cpu0) = (Instant::now(), cpu_time());
    for _ in 0..reps {
        let t0 = Instant::now();
        forward(&mut out)?;
        times.push(secs(t0) * 1e3);
    }
    let (wall, cpu) = (secs(wall0), cpu_time() - cpu0);
    let mem = unet.memory(if per_image { 1 } else { batch })?;
    Ok(json!({
        "mode": "forward",
        "runtime": "tract",
        "path": if per_image { "per-image" } else { "batched" },
        "model": model_name(&path),
        "batch": batch,
        "threads": threads,
        "reps": reps,
        "warmup": warmup,
        "median_ms": median(&times),
        "min_ms": times.iter().copied().fold(f64::INFINITY, f64::min),
        "mean_ms": times.iter().sum::<f64>() / reps.max(1) as f64,
        "max_ms": times.iter().copied().fold(0.0, f64::max),
        "cpu_cores": cpu / wall,
        "peak_rss_mb": proc_status_mb("VmHWM:"),
        "rss_mb": proc_status_mb("VmRSS:"),
        "weights_mb": mem.weights as f64 / 1e6,
        "activations_mb": mem.activations as f64 / 1e6,
        "parse_s": parse_s,
        "optimise_s": optimise_b1_s + plan_batch_s,
        "optimise_b1_s": optimise_b1_s,
        "plan_batch_s": plan_batch_s,
        "first_run_s": first_run_s,
        "load_to_first_step_s": load_to_first_step_s,
        "times_ms": times,
    }))
}

/// Operator types of the profile.
const CONV: &str = "conv + linear (matmul kernels)";
const ATTN_MM: &str = "attention: matmul (q/k/v/out, QK^T, AV)";
const ATTN: &str = "attention: softmax, scaling";
const NORM: &str = "norm (group / instance, incl. its elementwise)";
const CONV_LAYOUT: &str = "layout: pad / im2col / packing";
const LAYOUT: &str = "layout: reshape / concat / slice / upsample";
const ELEMENTWISE: &str = "elementwise (SiLU, adds, time embedding)";
const OTHER: &str = "other (consts, sources, casts)";

/// The operator type of a node of the optimised plan, from its op name and the ONNX
/// node name it came from (tract keeps it as a prefix).
fn category(op: &str, node: &str) -> &'static str {
    let op_l = op.to_ascii_lowercase();
    let node_l = node.to_ascii_lowercase();
    let has = |s: &str, pats: &[&str]| pats.iter().any(|p| s.contains(p));
    let in_attention = has(&node_l, &["attention", "attn"]);
    if op == "EsddpmAttention" {
        // The fused attention: both products and the softmax between them.
        ATTN_MM
    } else if has(&op_l, &["im2col", "pack", "pad"]) {
        CONV_LAYOUT
    } else if has(
        &op_l,
        &["matmul", "conv", "einsum", "mmm", "gemm", "depthwise"],
    ) {
        if in_attention {
            ATTN_MM
        } else {
            CONV
        }
    } else if has(&op_l, &["softmax"]) {
        ATTN
    } else if has(&node_l, &["norm"]) || has(&op_l, &["norm", "reduce"]) {
        NORM
    } else if has(
        &op_l,
        &[
            "axisop",
            "reshape",
            "intoshape",
            "transpose",
            "move",
            "concat",
            "slice",
            "gather",
            "resize",
            "upsample",
            "broadcast",
            "tile",
            "downsample",
        ],
    ) {
        LAYOUT
    } else if in_attention {
        ATTN
    } else if has(&op_l, &["const", "source", "cast"]) {
        OTHER
    } else if has(
        &op_l,
        &[
            "add",
            "sub",
            "mul",
            "div",
            "sigmoid",
            "silu",
            "swish",
            "tanh",
            "exp",
            "sqrt",
            "rsqrt",
            "recip",
            "bin",
            "unicast",
            "scalar",
            "elementwise",
            "max",
            "min",
            "sin",
            "cos",
            "neg",
            "abs",
            "pow",
            "square",
            "erf",
            "gelu",
            "relu",
        ],
    ) {
        ELEMENTWISE
    } else {
        OTHER
    }
}

fn profile(a: &Args) -> Res<Value> {
    if a.pos.len() < 6 {
        usage()
    }
    let path = PathBuf::from(&a.pos[0]);
    let shape: [usize; 3] = [a.num(1), a.num(2), a.num(3)];
    let (batch, reps): (usize, usize) = (a.num(4), a.num(5));
    let warmup: usize = a.opt("warmup", 2);
    let t: u32 = a.opt("t", 500);
    let model = OnnxModel::from_path(ModelRole::Unet, &path, DEFAULT_MEMORY_LIMIT)?;
    let unet = Unet::new(model, shape)?;
    let plan = unet.plan(batch)?;
    // `--rewrite off`: tract's own plan for the same input facts, without esddpm's
    // load-time rewrites (`esddpm::rewrite`), to measure what they gain.
    // `--rewrite strides`: esddpm's plan without the direct convolutions
    // (`esddpm::direct_conv`), to measure what they gain.
    // `--direct-max-channels N`, `--direct-min-width N`, `--direct-tiles LIST` (of
    // `wide`, `wide16`, `rows`, `narrow`, `wide16x6`; `none`): esddpm's plan with another
    // `direct_conv::Policy`.
    // `--group-norm off`: esddpm's plan without the fused group norms.
    // `--attention off`: esddpm's plan without the fused attention.
    // `--pointwise off`: esddpm's plan with tract's 1 × 1 convolutions.
    // `--winograd off`: esddpm's plan with the 3 × 3 convolutions Winograd takes left
    // to the direct kernels and tract; `large`: Winograd on maps of 32 × 32 or more only; `all`: on every map.
    let rewrite = a.opts.get("rewrite").map(String::as_str).unwrap_or("all");
    let mut policy = Policy::default();
    let fuse_norms = match a.opts.get("group-norm").map(String::as_str) {
        None | Some("fused") => true,
        Some("off") => false,
        Some(_) => usage(),
    };
    let fuse_attn = match a.opts.get("attention").map(String::as_str) {
        None | Some("fused") => true,
        Some("off") => false,
        Some(_) => usage(),
    };
    let fuse_pointwise = match a.opts.get("pointwise").map(String::as_str) {
        None | Some("fused") => true,
        Some("off") => false,
        Some(_) => usage(),
    };
    let winograd = match a.opts.get("winograd").map(String::as_str) {
        None | Some("on") => Some(esddpm::winograd::MIN_PIXELS),
        // Only maps of 32 × 32 or more (the default before the nineteenth lever).
        Some("large") => Some(1024),
        // Every map, 4 × 4 and 2 × 2 too.
        Some("all") => Some(4),
        Some("off") => None,
        Some(_) => usage(),
    };
    // `--small-maps off`: esddpm's plan with the convolutions on small maps that
    // `esddpm::small_map_conv` takes left to tract.
    let small_maps = match a.opts.get("small-maps").map(String::as_str) {
        None | Some("on") => true,
        Some("off") => false,
        Some(_) => usage(),
    };
    let custom = [
        "small-maps",
        "direct-max-channels",
        "direct-min-width",
        "direct-tiles",
        "group-norm",
        "attention",
        "pointwise",
        "winograd",
    ]
    .iter()
    .any(|k| a.opts.contains_key(*k));
    policy.max_output_channels = a.opt("direct-max-channels", policy.max_output_channels);
    policy.min_output_width = a.opt("direct-min-width", policy.min_output_width);
    if let Some(list) = a.opts.get("direct-tiles") {
        policy.tiles = list
            .split(',')
            .filter(|t| *t != "none")
            .map(|t| match t {
                "wide" => Tile::Wide32x4,
                "wide16" => Tile::Wide16x8,
                "rows" => Tile::Rows2x8,
                "narrow" => Tile::Narrow8x8,
                "wide16x6" => Tile::Wide16x6,
                _ => usage(),
            })
            .collect();
    }
    let plan = if rewrite == "all" && !custom {
        plan
    } else {
        let mut m = tract_onnx::onnx().model_for_path(&path)?;
        for i in 0..plan.model().inputs.len() {
            m = m.with_input_fact(i, plan.model().input_fact(i)?.clone().into())?;
        }
        match rewrite {
            "off" => m.into_optimized()?.into_runnable()?,
            "strides" | "all" => {
                let mut m = m.into_typed()?.into_decluttered()?;
                if fuse_norms {
                    fuse_group_norms(&mut m)?;
                }
                if fuse_attn {
                    fuse_attention(&mut m)?;
                }
                if rewrite == "all" {
                    if let Some(min_pixels) = winograd {
                        use_winograd_with(&mut m, min_pixels)?;
                    }
                    if small_maps {
                        esddpm::small_map_conv::use_small_map_convs(&mut m)?;
                    }
                    use_direct_convs_with(&mut m, &policy)?;
                    if fuse_pointwise {
                        fuse_pointwise_convs_with(&mut m, &policy)?;
                    }
                }
                m.optimize()?;
                esddpm::rewrite::natural_const_strides(&mut m)?;
                m.into_runnable()?
            }
            _ => usage(),
        }
    };
    let model = plan.model();

    // The inputs in the model's order, as esddpm makes them.
    let x = normal_sample(batch * shape.iter().product::<usize>(), 0);
    let [c, h, w] = shape;
    let mut inputs: TVec<TValue> = tvec![];
    for (i, desc) in unet.model().inputs().iter().enumerate() {
        let fact = model.input_fact(i)?;
        let is_sample = desc.name == "sample" || fact.rank() == 4;
        let tensor = if is_sample {
            Tensor::from_shape(&[batch, c, h, w], &x)?
        } else {
            let shape: Vec<usize> = if fact.rank() == 0 {
                vec![]
            } else {
                vec![batch]
            };
            let n = shape.iter().product::<usize>();
            match fact.datum_type {
                DatumType::F32 => Tensor::from_shape(&shape, &vec![t as f32; n])?,
                DatumType::I32 => Tensor::from_shape(&shape, &vec![t as i32; n])?,
                _ => Tensor::from_shape(&shape, &vec![i64::from(t); n])?,
            }
        };
        inputs.push(tensor.into_tvalue());
    }

    let exec = Executor::SingleThread;
    let mut state = TypedSimpleState::new(&plan)?;
    let run = |state: &mut TypedSimpleState| -> TractResult<()> {
        tract_linalg::multithread::multithread_tract_scope(exec.clone(), || {
            state.run(inputs.clone()).map(drop)
        })
    };
    for _ in 0..warmup {
        run(&mut state)?;
    }
    // Plain forwards (no per-node timing) for the profile's overhead.
    let mut plain = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        run(&mut state)?;
        plain.push(secs(t0) * 1e3);
    }

    let n_nodes = model.nodes().len();
    let mut node_s = vec![0f64; n_nodes];
    let mut profiled = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        tract_linalg::multithread::multithread_tract_scope(exec.clone(), || {
            state.run_plan_with_eval(
                inputs.clone(),
                |ctx: &EvalContext,
                 op_state: Option<&mut (dyn OpState + 'static)>,
                 node: &TypedNode,
                 input: TVec<TValue>| {
                    let t0 = Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                    node_s[node.id] += secs(t0);
                    r
                },
            )
        })?;
        profiled.push(secs(t0) * 1e3);
    }

    // Aggregate per operator type and per operator name.
    #[derive(Default)]
    struct Agg {
        nodes: usize,
        ms: f64,
        flop: f64,
    }
    let mut by_cat: BTreeMap<&'static str, Agg> = BTreeMap::new();
    let mut by_op: BTreeMap<String, Agg> = BTreeMap::new();
    let mut per_node = Vec::new();
    let mut total_flop = 0f64;
    for node in model.nodes() {
        let ms = node_s[node.id] * 1e3 / reps as f64;
        let flop = node_flops(model, node);
        total_flop += flop;
        let op = node.op.name().to_string();
        let cat = category(&op, &node.name);
        for agg in [
            by_cat.entry(cat).or_default(),
            by_op.entry(op.clone()).or_default(),
        ] {
            agg.nodes += 1;
            agg.ms += ms;
            agg.flop += flop;
        }
        per_node.push((ms, node.id, node.name.clone(), op, flop));
    }
    let total_ms: f64 = node_s.iter().sum::<f64>() * 1e3 / reps as f64;
    let rate = |cats: &[&str]| {
        let (flop, ms) = cats
            .iter()
            .filter_map(|c| by_cat.get(c))
            .fold((0.0, 0.0), |(f, m), a| (f + a.flop, m + a.ms));
        if ms > 0.0 {
            flop / (ms * 1e-3) / 1e9
        } else {
            0.0
        }
    };
    let (conv_gflops, matmul_gflops) = (rate(&[CONV]), rate(&[CONV, ATTN_MM]));

    eprintln!(
        "{} batch {batch}, 1 thread: {:.2} ms per forward profiled (plain {:.2} ms), {:.3} GFLOP \
         counted by tract",
        model_name(&path),
        median(&profiled),
        median(&plain),
        total_flop / 1e9
    );
    eprintln!("| operator type | nodes | ms | share | GFLOP | GFLOP/s |");
    eprintln!("|---|---|---|---|---|---|");
    let mut cats: Vec<_> = by_cat.iter().collect();
    cats.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
    for (cat, agg) in &cats {
        let rate = if [CONV, ATTN_MM].contains(*cat) && agg.flop > 0.0 {
            format!("{:.1}", agg.flop / (agg.ms * 1e-3) / 1e9)
        } else {
            String::new()
        };
        eprintln!(
            "| {cat} | {} | {:.2} | {:.1}% | {:.3} | {rate} |",
            agg.nodes,
            agg.ms,
            100.0 * agg.ms / total_ms,
            agg.flop / 1e9
        );
    }
    let mut ops: Vec<_> = by_op.iter().collect();
    ops.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
    per_node.sort_by(|a, b| b.0.total_cmp(&a.0));

    let agg_json = |cat: &str, agg: &Agg| {
        let is_mm = [CONV, ATTN_MM].contains(&cat);
        json!({
            "nodes": agg.nodes,
            "ms": agg.ms,
            "share": agg.ms / total_ms,
            "gflop": agg.flop / 1e9,
            "gflops": if is_mm && agg.flop > 0.0 { agg.flop / (agg.ms * 1e-3) / 1e9 } else { 0.0 },
        })
    };
    Ok(json!({
        "mode": "profile",
        "runtime": "tract",
        "model": model_name(&path),
        "batch": batch,
        "threads": 1,
        "reps": reps,
        "plain_median_ms": median(&plain),
        "profiled_median_ms": median(&profiled),
        "sum_of_nodes_ms": total_ms,
        "model_gflop": total_flop / 1e9,
        "conv_gflops": conv_gflops,
        "matmul_gflops": matmul_gflops,
        "whole_model_gflops": total_flop / (median(&plain) * 1e-3) / 1e9,
        "categories": cats.iter().map(|(c, a)| (c.to_string(), agg_json(c, a))).collect::<serde_json::Map<_, _>>(),
        "ops": ops.iter().map(|(o, a)| json!({"op": o, "nodes": a.nodes, "ms": a.ms, "share": a.ms / total_ms, "gflop": a.flop / 1e9})).collect::<Vec<_>>(),
        "top_nodes": per_node.iter().take(60).map(|(ms, id, name, op, flop)| json!({"id": id, "name": name, "op": op, "ms": ms, "gflop": flop / 1e9})).collect::<Vec<_>>(),
    }))
}

fn e2e(t_main: Instant, a: &Args) -> Res<Value> {
    if a.pos.len() < 5 {
        usage()
    }
    let folder = PathBuf::from(&a.pos[0]);
    let mode = a.pos[1].as_str();
    let (batch, threads, rounds): (usize, usize, usize) = (a.num(2), a.num(3), a.num(4));
    let (start, sampler, steps) = match mode {
        "es-ddpm100" => (
            Start::EarlyStop { t_prime: Some(100) },
            SamplerChoice::Ddpm,
            100,
        ),
        "es-ddim10" => (
            Start::EarlyStop { t_prime: Some(100) },
            SamplerChoice::Ddim { eta: 0.0 },
            10,
        ),
        "ddpm1000" => (Start::Noise, SamplerChoice::Ddpm, 1000),
        _ => usage(),
    };
    let p = Pipeline::from_folder(
        &folder,
        &LoadOptions {
            threads: Some(threads),
            ..Default::default()
        },
    )?;
    let load_s = secs(t_main);
    // Warm-up: one cheap call at this batch makes the U-Net's and the prior's plans.
    let t0 = Instant::now();
    p.generate(&GenerateOptions {
        seed: 999,
        batch,
        start: Start::EarlyStop { t_prime: Some(100) },
        sampler: SamplerChoice::Ddim { eta: 0.0 },
        steps: Some(1),
        ..Default::default()
    })?;
    let warmup_s = secs(t0);
    let mut times = Vec::new();
    let (wall0, cpu0) = (Instant::now(), cpu_time());
    for r in 0..rounds {
        let t0 = Instant::now();
        let images = p.generate(&GenerateOptions {
            seed: r as u64,
            batch,
            start,
            sampler,
            steps: Some(steps),
            ..Default::default()
        })?;
        times.push(secs(t0));
        std::hint::black_box(images);
    }
    let (wall, cpu) = (secs(wall0), cpu_time() - cpu0);
    let images = (batch * rounds) as f64;
    Ok(json!({
        "mode": "e2e",
        "runtime": "esddpm",
        "pipeline": mode,
        "unet_steps": steps,
        "batch": batch,
        "threads": threads,
        "rounds": rounds,
        "images": images,
        "images_per_s": images / wall,
        "s_per_image": wall / images,
        "s_per_call": times,
        "cpu_cores": cpu / wall,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "peak_rss_mb": proc_status_mb("VmHWM:"),
    }))
}

fn split(a: &Args) -> Res<Value> {
    let reps: u32 = a.opt("reps", 5000);
    let rounds: usize = a.opt("rounds", 3);
    let works: Vec<f64> = match a.pos.is_empty() {
        true => vec![2.0, 5.0, 10.0, 20.0],
        false => (0..a.pos.len()).map(|i| a.num(i)).collect(),
    };
    let executor = Executor::multithread(2);
    let Executor::MultiThread(pool) = &executor else {
        unreachable!("a pool of two threads")
    };
    let busy = |us: f64| {
        let t = Instant::now();
        while t.elapsed().as_secs_f64() * 1e6 < us {
            std::hint::spin_loop();
        }
    };
    // µs per split beyond the parts' `us`.
    let per_split = |us: f64, run: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..reps {
            run();
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(reps) - us
    };
    let rows = esddpm::op_threads::on_pool(&executor, || {
        works
            .iter()
            .map(|&us| {
                let (mut handoff, mut rayon) = (Vec::new(), Vec::new());
                for _ in 0..rounds {
                    handoff.push(per_split(us, &|| {
                        esddpm::op_threads::for_each(0..2, |_| busy(us))
                    }));
                    rayon.push(per_split(us, &|| {
                        pool.in_place_scope(|s| {
                            s.spawn(|_| busy(us));
                            busy(us);
                        })
                    }));
                }
                (us, median(&handoff), median(&rayon))
            })
            .collect::<Vec<_>>()
    });
    eprintln!("| part µs | hand-over µs per split | rayon µs per split |\n|---|---|---|");
    for (us, h, r) in &rows {
        eprintln!("| {us} | {h:.2} | {r:.2} |");
    }
    Ok(json!({
        "mode": "split",
        "reps": reps,
        "rounds": rounds,
        "rows": rows.iter().map(|(us, h, r)| json!({"work_us": us, "handoff_us": h, "rayon_us": r})).collect::<Vec<_>>(),
    }))
}

fn main() {
    let t_main = Instant::now();
    // esddpm's debug records (a load's stages: `RUST_LOG=esddpm::load=debug`) on stderr.
    env_logger::init();
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    let mode = match raw
        .iter()
        .find(|s| !s.starts_with("--"))
        .map(String::as_str)
    {
        Some(m @ ("forward" | "profile" | "e2e" | "split")) => {
            let m = m.to_string();
            let i = raw.iter().position(|s| *s == m).expect("mode");
            raw.remove(i);
            m
        }
        Some(_) => "forward".to_string(),
        None => usage(),
    };
    let args = Args::parse(raw.into_iter());
    let result = match mode.as_str() {
        "profile" => profile(&args),
        "e2e" => e2e(t_main, &args),
        "split" => split(&args),
        _ => forward(t_main, &args),
    };
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    }
}
