#!/usr/bin/env python3
"""Generate reference test vectors for the esddpm-core crate from HuggingFace diffusers.

Usage (from anywhere):

    python tools/reference/make_core_vectors.py [--out DIR]

DIR defaults to ``core/tests/data`` under the repository root (computed from this
file's location).  The script writes six JSON files:

* ``schedules.json``   beta / alphas_cumprod schedules (linear, scaled_linear,
  squaredcos_cap_v2, sigmoid, trained betas, zero-terminal-SNR rescaling) plus the
  improved-diffusion posterior coefficients of the full chain.
* ``timesteps.json``   diffusers ``set_timesteps`` results (DDPM, DDIM,
  DPM-Solver) for leading/trailing/linspace spacing, improved-diffusion
  ``space_timesteps`` respacing, and img2img ``strength`` start selection.
* ``ddpm_steps.json``  single ``DDPMScheduler.step`` cases.
* ``ddim_steps.json``  single ``DDIMScheduler.step`` cases.
* ``dpmsolver_trajectories.json``  multi-step DPM-Solver++(2M) trajectories.
* ``add_noise.json``   ``DDPMScheduler.add_noise`` cases.

Precision strategy
------------------
diffusers builds its schedules in float32.  esddpm-core builds them in float64
and is tested against these files at 1e-10 relative for schedules and 1e-5
relative for its f32 sampler steps, so every reference here is float64:

* Schedules are recomputed in float64 along exactly diffusers' code path
  (betas -> alphas = 1 - betas -> cumprod; ``rescale_zero_terminal_snr`` is
  diffusers' own function applied to float64 betas; ``squaredcos_cap_v2`` is a
  transcription of ``betas_for_alpha_bar`` kept in Python floats, checked
  against diffusers' float32 result).  The real float32 ``alphas_cumprod`` of a
  ``DDPMScheduler`` built with the same config is stored alongside.
* Sampler steps construct the real diffusers scheduler, call
  ``set_timesteps``, then override its schedule tensors with the float64
  versions (DDPM: betas, alphas, alphas_cumprod, one; DDIM: also
  final_alpha_cumprod; DPM-Solver: also alpha_t, sigma_t, lambda_t, sigmas) and
  call the real ``step`` with float64 tensors, so the whole step runs in
  float64.  DPM-Solver's ``step`` casts ``sample`` to float32 ("upcast"); that
  single cast is neutralised during our calls by giving the module a ``torch``
  proxy whose ``float32`` is ``float64`` (nothing else in dpmsolver++ uses
  ``torch.float32``).
* Inputs (sample, model_output, noise, DPM-Solver model outputs) are drawn /
  computed and then rounded to float32, so they are exactly representable as
  f32 on the Rust side; they are stored as the float64 value of that f32.
  Stochastic DDPM noise is injected by patching
  ``scheduling_ddpm.randn_tensor`` to return our f32-valued tensor; DDIM noise
  is passed through ``variance_noise``.
* Every float is written with Python's ``repr`` (shortest round-trip form), so
  the JSON text parses back to the identical binary64 value.
* As a sanity check each sampler case is also run through the unmodified
  float32 diffusers object; the maximum deviation is printed (not stored).

The output is deterministic (fixed seeds, single thread); running the script
twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddpm as _ddpm_mod
from diffusers.schedulers import scheduling_dpmsolver_multistep as _dpm_mod
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar, rescale_zero_terminal_snr
from diffusers.utils import logging as _dlogging

F64 = torch.float64
F32 = torch.float32
SHAPE = [2, 2, 3, 3]
T_DEFAULT = 1000

GENERATOR = (
    f"tools/reference/make_core_vectors.py; diffusers {diffusers.__version__} / "
    f"torch {torch.__version__.split('+')[0]} / numpy {np.__version__}"
)


# --------------------------------------------------------------------------- helpers


def flat(t: torch.Tensor) -> list[float]:
    """Flatten (row-major / NCHW) to a list of Python floats (float64 values)."""
    return t.detach().double().reshape(-1).tolist()


def ints(t) -> list[int]:
    return [int(x) for x in (t.tolist() if hasattr(t, "tolist") else t)]


def finite_or_null(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def randn32(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """randn drawn in float32 from a fixed seed, scaled in float32, returned as float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F32)
    if scale != 1.0:
        x = x * torch.tensor(scale, dtype=F32)
    return x.double()


def uniform32(shape, seed: int, lo: float, hi: float) -> torch.Tensor:
    """Uniform in [lo, hi) computed in float32, returned as float64."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=F32)
    x = u * torch.tensor(hi - lo, dtype=F32) + torch.tensor(lo, dtype=F32)
    return x.double()


def to_f32_values(x: torch.Tensor) -> torch.Tensor:
    return x.float().double()


def max_rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-3) -> float:
    a = a.double()
    b = b.double()
    return float(((a - b).abs() / b.abs().clamp(min=floor)).max())


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"), allow_nan=False)
        f.write("\n")


# --------------------------------------------------------------------------- float64 schedules


def cosine_betas_f64(num_diffusion_timesteps: int, max_beta: float = 0.999) -> list[float]:
    """Transcription of diffusers' betas_for_alpha_bar(..., "cosine") without the final float32 cast."""

    def alpha_bar_fn(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return betas


def betas_f64(T, beta_start, beta_end, schedule, trained_betas=None, rescale=False) -> torch.Tensor:
    if trained_betas is not None:
        b = torch.tensor(trained_betas, dtype=F64)
    elif schedule == "linear":
        b = torch.linspace(beta_start, beta_end, T, dtype=F64)
    elif schedule == "scaled_linear":
        b = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=F64) ** 2
    elif schedule == "squaredcos_cap_v2":
        lst = cosine_betas_f64(T)
        # the transcription must be diffusers' formula: same values once rounded to f32
        assert torch.equal(torch.tensor(lst, dtype=F32), betas_for_alpha_bar(T)), "cosine transcription mismatch"
        b = torch.tensor(lst, dtype=F64)
    elif schedule == "sigmoid":
        b = torch.sigmoid(torch.linspace(-6, 6, T, dtype=F64)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(schedule)
    if rescale:
        b = rescale_zero_terminal_snr(b)
    assert b.dtype == F64
    return b


def schedule_f64(**cfg):
    betas = betas_f64(**cfg)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    return betas, alphas, abar


def override_ddpm_like(s, betas, alphas, abar) -> None:
    s.betas = betas.clone()
    s.alphas = alphas.clone()
    s.alphas_cumprod = abar.clone()
    if hasattr(s, "one"):
        s.one = torch.tensor(1.0, dtype=F64)


# --------------------------------------------------------------------------- A. schedules


def schedule_indices(T: int) -> list[int]:
    if T <= 100:
        return list(range(T))
    stride = 7 if T <= 1000 else 29
    idx = set(range(0, T, stride)) | {1, 2, T - 3, T - 2, T - 1}
    return sorted(i for i in idx if 0 <= i < T)


def posterior_f64(betas: np.ndarray, alphas: np.ndarray, abar: np.ndarray) -> dict:
    """improved-diffusion GaussianDiffusion posterior coefficients (float64, full chain)."""
    abar_prev = np.append(1.0, abar[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        pv = betas * (1.0 - abar_prev) / (1.0 - abar)
        plv = np.log(np.append(pv[1], pv[1:]))
        c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        c2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
    return {
        "posterior_variance": pv,
        "posterior_log_variance_clipped": plv,
        "posterior_mean_coef1": c1,
        "posterior_mean_coef2": c2,
    }


def make_schedules() -> dict:
    specs = []
    sd = dict(beta_start=0.00085, beta_end=0.012)
    ddpm = dict(beta_start=1e-4, beta_end=0.02)
    for sch in ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]:
        specs.append((f"{sch}_T1000", dict(T=1000, schedule=sch, **(sd if sch == "scaled_linear" else ddpm))))
    for T in [1, 2, 10, 4000]:
        specs.append((f"linear_T{T}", dict(T=T, schedule="linear", **ddpm)))
    specs.append(("squaredcos_cap_v2_T4000", dict(T=4000, schedule="squaredcos_cap_v2", **ddpm)))
    for sch in ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]:
        specs.append(
            (
                f"{sch}_T1000_zero_snr",
                dict(T=1000, schedule=sch, rescale=True, **(sd if sch == "scaled_linear" else ddpm)),
            )
        )
    trained = (np.linspace(1e-3, 0.2, 50) ** 1.5).tolist()
    specs.append(("trained_T50", dict(T=50, schedule="linear", trained_betas=trained, **ddpm)))

    cases = []
    for name, cfg in specs:
        cfg = dict(cfg)
        cfg.setdefault("rescale", False)
        cfg.setdefault("trained_betas", None)
        T = cfg["T"]
        betas, alphas, abar = schedule_f64(**cfg)
        real = DDPMScheduler(
            num_train_timesteps=T,
            beta_start=cfg["beta_start"],
            beta_end=cfg["beta_end"],
            beta_schedule=cfg["schedule"],
            trained_betas=cfg["trained_betas"],
            rescale_betas_zero_snr=cfg["rescale"],
        )
        assert real.alphas_cumprod.dtype == F32
        # sanity: f64 reference vs real f32 object
        dev = float((real.alphas_cumprod.double() - abar).abs().max())
        assert dev < 1e-5, (name, dev)
        idx = schedule_indices(T)
        it = torch.tensor(idx, dtype=torch.long)
        case = {
            "name": name,
            "num_train_timesteps": T,
            "beta_start": cfg["beta_start"],
            "beta_end": cfg["beta_end"],
            "beta_schedule": cfg["schedule"],
            "trained_betas": cfg["trained_betas"],
            "rescale_betas_zero_snr": cfg["rescale"],
            "indices": idx,
            "betas": flat(betas[it]),
            "alphas_cumprod": flat(abar[it]),
            "diffusers_f32_alphas_cumprod": flat(real.alphas_cumprod[it]),
        }
        if T >= 2:
            post = posterior_f64(betas.numpy(), alphas.numpy(), abar.numpy())
            for k, v in post.items():
                case[k] = finite_or_null([float(x) for x in v[idx]])
                n_bad = sum(1 for x in v if not math.isfinite(float(x)))
                if n_bad:
                    print(f"  note: {name}: {k} has {n_bad} non-finite entries (stored as null where sampled)")
        print(f"  schedule {name}: {len(idx)} indices, max |abar64 - diffusers f32| = {dev:.3e}")
        cases.append(case)
    return {"generator": GENERATOR, "cases": cases}


# --------------------------------------------------------------------------- B. timesteps


def space_timesteps(num_timesteps, spec):
    """improved-diffusion's respacing semantics, written here from its documented rules.

    - ``"ddimN"``: the smallest integer stride k >= 1 (k < T) whose ``range(0, T, k)`` has
      exactly N entries; no such stride is an error.
    - ``"a,b,c"``: T is cut into len(counts) consecutive sections whose sizes differ by at
      most one (the first ``T % len`` are one longer); section i keeps ``count_i``
      timesteps, the j-th at ``start + round(j-fold running sum of stride)`` with
      ``stride = (size - 1) / (count - 1)`` (1 when count <= 1) and Python's
      round-half-to-even; a count larger than its section is an error.

    Returns the kept timesteps as a set (callers sort them).
    """
    T = num_timesteps
    if spec.startswith("ddim"):
        wanted = int(spec[4:])
        stride = next((k for k in range(1, T) if -(-T // k) == wanted), None)
        if stride is None:
            raise ValueError(f"no integer stride gives {wanted} steps out of {T}")
        return set(range(0, T, stride))
    counts = [int(part) for part in spec.split(",")]
    base, longer = divmod(T, len(counts))
    kept, offset = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < longer else 0)
        if count > size:
            raise ValueError(f"section of {size} timesteps cannot keep {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(offset + round(position))
            position += stride
        offset += size
    return set(kept)


def try_timesteps(cls, T, S, O, N, **kw):
    try:
        s = cls(num_train_timesteps=T, timestep_spacing=S, steps_offset=O, **kw)
        s.set_timesteps(N)
        return ints(s.timesteps), None
    except Exception as e:  # noqa: BLE001 - record diffusers' rejection
        return None, f"{type(e).__name__}: {e}"


def make_timesteps() -> dict:
    out_d = []
    for S in ["leading", "trailing", "linspace"]:
        for T, N, O in [
            (1000, 10, 0),
            (1000, 10, 1),
            (1000, 50, 0),
            (1000, 1000, 0),
            (1000, 7, 1),
            (4000, 33, 0),
            (10, 3, 0),
            (1, 1, 0),
        ]:
            ts, err = try_timesteps(DDPMScheduler, T, S, O, N)
            if err is not None:
                print(f"  note: DDPMScheduler rejects T={T} spacing={S} offset={O} N={N}: {err}")
                continue
            dts, derr = try_timesteps(DDIMScheduler, T, S, O, N)
            if derr is not None:
                print(f"  note: DDIMScheduler rejects T={T} spacing={S} offset={O} N={N}: {derr}")
            pts, perr = try_timesteps(DPMSolverMultistepScheduler, T, S, O, N)
            if perr is not None:
                print(f"  note: DPMSolverMultistepScheduler rejects T={T} spacing={S} offset={O} N={N}: {perr}")
            if len(ts) != N:
                print(f"  note: DDPM T={T} spacing={S} offset={O} N={N} gives {len(ts)} timesteps: {ts[-3:]} ...")
            if min(ts) < 0 or max(ts) >= T:
                print(f"  note: DDPM T={T} spacing={S} offset={O} N={N} gives out-of-range timesteps {ts}")
            out_d.append(
                {
                    "num_train_timesteps": T,
                    "spacing": S,
                    "steps_offset": O,
                    "num_inference_steps": N,
                    "timesteps": ts,
                    "ddim_timesteps": dts,
                    "dpmsolver_timesteps": pts,
                }
            )

    out_r = []
    for T, spec in [
        (1000, "250"),
        (1000, "1000"),
        (1000, "100"),
        (1000, "50"),
        (1000, "10,15,20"),
        (1000, "ddim25"),
        (1000, "ddim50"),
        (1000, "ddim7"),
        (1000, "ddim999"),
        (1000, "1"),
        (4000, "100"),
        (100, "10,10,10,10,10,10,10,10,10,10"),
        (10, "11"),
        (1000, "ddim1000"),
    ]:
        try:
            steps = sorted(space_timesteps(T, spec))
            out_r.append({"num_train_timesteps": T, "spec": spec, "timesteps": steps})
        except ValueError as e:
            print(f"  respacing T={T} spec={spec!r}: error ({e})")
            out_r.append({"num_train_timesteps": T, "spec": spec, "error": True})

    out_s = []
    for S in ["leading", "trailing"]:
        O = 1 if S == "leading" else 0
        for N in [50, 100, 1000]:
            s = DDPMScheduler(num_train_timesteps=1000, timestep_spacing=S, steps_offset=O)
            s.set_timesteps(N)
            for strength in [0.0, 0.1, 0.25, 0.29, 0.3, 0.5, 0.57, 0.75, 1.0]:
                # StableDiffusionImg2ImgPipeline.get_timesteps (scheduler.order == 1)
                init_timestep = min(int(N * strength), N)
                t_start = max(N - init_timestep, 0)
                out_s.append(
                    {
                        "num_train_timesteps": 1000,
                        "spacing": S,
                        "steps_offset": O,
                        "num_inference_steps": N,
                        "strength": strength,
                        "t_start": t_start,
                        "timesteps": ints(s.timesteps[t_start * s.order :]),
                    }
                )
    return {"diffusers": out_d, "respacing": out_r, "strength": out_s}


# --------------------------------------------------------------------------- C. DDPM steps


@contextlib.contextmanager
def ddpm_noise(noise: torch.Tensor, record: dict):
    """Make DDPMScheduler.step use `noise` instead of drawing from randn_tensor."""
    orig = _ddpm_mod.randn_tensor

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        record["called"] = record.get("called", 0) + 1
        return noise.clone().to(dtype=dtype or noise.dtype)

    _ddpm_mod.randn_tensor = fake
    try:
        yield
    finally:
        _ddpm_mod.randn_tensor = orig


LINEAR = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def ddpm_case(
    name,
    seed,
    variance_type="fixed_small",
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    N=50,
    O=0,
    step_index=20,
    sample_scale=1.0,
    model_override=None,
):
    cfg = dict(
        variance_type=variance_type,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value,
    )
    C = SHAPE[1]
    sample = randn32(SHAPE, seed, sample_scale)
    if model_override is not None:
        model_output = model_override
    else:
        model_output = randn32(SHAPE, seed + 1)
    if variance_type == "learned_range":
        model_output = torch.cat([model_output, uniform32(SHAPE, seed + 2, -1.0, 1.0)], dim=1)
    elif variance_type == "learned":
        model_output = torch.cat([model_output, uniform32(SHAPE, seed + 2, 1e-4, 0.02)], dim=1)
    noise = randn32(SHAPE, seed + 3)

    betas, alphas, abar = schedule_f64(T=1000, beta_start=1e-4, beta_end=0.02, schedule="linear")

    def run(f64: bool):
        s = DDPMScheduler(**LINEAR, timestep_spacing="leading", steps_offset=O, **cfg)
        s.set_timesteps(N)
        if f64:
            override_ddpm_like(s, betas, alphas, abar)
        dt = F64 if f64 else F32
        t = int(s.timesteps[step_index])
        rec = {}
        with ddpm_noise(noise.to(dt), rec):
            out = s.step(model_output.to(dt), t, sample.to(dt))
        return s, t, rec, out

    s, t, rec, out = run(True)
    assert out.prev_sample.dtype == F64 and out.pred_original_sample.dtype == F64
    used_noise = rec.get("called", 0) > 0
    assert used_noise == (t > 0)
    assert torch.isfinite(out.prev_sample).all(), name
    _, _, _, out32 = run(False)
    d_prev = max_rel(out32.prev_sample, out.prev_sample)
    d_x0 = max_rel(out32.pred_original_sample, out.pred_original_sample)
    print(f"  ddpm {name}: t={t} noise={'yes' if used_noise else 'no'}  f32-diffusers vs f64 max rel: prev {d_prev:.2e}, x0 {d_x0:.2e}")
    assert C * (2 if variance_type in ("learned", "learned_range") else 1) == model_output.shape[1]
    case = {
        "name": name,
        **cfg,
        "num_inference_steps": N,
        "steps_offset": O,
        "timesteps": ints(s.timesteps),
        "step_index": step_index,
        "timestep": t,
        "shape": SHAPE,
        "sample": flat(sample),
        "model_output": flat(model_output),
        "noise": flat(noise) if used_noise else [],
        "prev_sample": flat(out.prev_sample),
        "pred_original_sample": flat(out.pred_original_sample),
    }
    return case, out


def find_mid_threshold_x0(seed0: int, ratio: float, max_value: float) -> tuple[int, torch.Tensor]:
    """Find a seed whose x0 (scale 0.8) has its `ratio` |x| quantile strictly inside (1, max_value) per image."""
    for seed in range(seed0, seed0 + 1000):
        x0 = randn32(SHAPE, seed, 0.8)
        q = torch.quantile(x0.reshape(SHAPE[0], -1).abs(), ratio, dim=1)
        if bool(((q > 1.02) & (q < max_value - 0.02)).all()):
            return seed, x0
    raise RuntimeError("no seed found")


def make_ddpm() -> list:
    cases = []
    seed = 1000
    for vt in ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]:
        for pt in ["epsilon", "sample", "v_prediction"]:
            c, _ = ddpm_case(f"{vt}_{pt}", seed, variance_type=vt, prediction_type=pt)
            cases.append(c)
            seed += 10
    cases.append(ddpm_case("no_clip", 2000, clip_sample=False)[0])
    cases.append(ddpm_case("clip_range_0.5", 2010, clip_sample_range=0.5)[0])

    thr = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    c_thr, o_thr = ddpm_case("thresholding", 2020, sample_scale=3.0, **thr)
    _, o_clip = ddpm_case("(check: same inputs, plain clip)", 2020, sample_scale=3.0)
    _, o_raw = ddpm_case("(check: same inputs, no clip)", 2020, sample_scale=3.0, clip_sample=False)
    assert not torch.allclose(o_thr.pred_original_sample, o_clip.pred_original_sample), "thresholding had no effect"
    assert not torch.allclose(o_thr.pred_original_sample, o_raw.pred_original_sample), "thresholding had no effect"
    cases.append(c_thr)

    mseed, x0 = find_mid_threshold_x0(2030, 0.9, 1.5)
    c_mid, o_mid = ddpm_case(
        "thresholding_mid_quantile", mseed, prediction_type="sample", model_override=x0, **thr
    )
    assert not torch.allclose(o_mid.pred_original_sample, x0.clamp(-1, 1)), "mid thresholding had no effect"
    cases.append(c_mid)

    cases.append(ddpm_case("final_step", 2040, step_index=49)[0])
    cases.append(ddpm_case("final_step_steps_offset1", 2050, step_index=49, O=1)[0])
    cases.append(ddpm_case("first_step", 2060, step_index=0)[0])
    cases.append(ddpm_case("full_chain_t500", 2070, N=1000, step_index=499)[0])
    cases.append(ddpm_case("full_chain_t1", 2080, N=1000, step_index=998)[0])
    # sanity: the first-step case is t=980, full chain t=500 / t=1
    assert cases[-3]["timestep"] == 980 and cases[-2]["timestep"] == 500 and cases[-1]["timestep"] == 1
    return cases


def fixed_large_log_probe() -> None:
    """Document diffusers' fixed_large_log behaviour (sqrt of a log -> NaN)."""
    s = DDPMScheduler(**LINEAR, variance_type="fixed_large_log")
    s.set_timesteps(50)
    x = randn32(SHAPE, 7).float()
    out = s.step(randn32(SHAPE, 8).float(), int(s.timesteps[20]), x, generator=torch.Generator().manual_seed(0))
    print(f"  note: diffusers fixed_large_log prev_sample all-NaN: {bool(torch.isnan(out.prev_sample).all())}")


# --------------------------------------------------------------------------- D. DDIM steps


def ddim_case(
    name,
    seed,
    eta=0.0,
    prediction_type="epsilon",
    step_index=20,
    set_alpha_to_one=True,
    use_clipped_model_output=False,
    clip_sample=True,
    clip_sample_range=1.0,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    sample_scale=1.0,
    N=50,
):
    cfg = dict(
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value,
        set_alpha_to_one=set_alpha_to_one,
    )
    sample = randn32(SHAPE, seed, sample_scale)
    model_output = randn32(SHAPE, seed + 1)
    noise = randn32(SHAPE, seed + 3)
    betas, alphas, abar = schedule_f64(T=1000, beta_start=1e-4, beta_end=0.02, schedule="linear")

    def run(f64: bool, ucmo=use_clipped_model_output):
        s = DDIMScheduler(**LINEAR, timestep_spacing="leading", steps_offset=0, **cfg)
        s.set_timesteps(N)
        if f64:
            override_ddpm_like(s, betas, alphas, abar)
            s.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if set_alpha_to_one else abar[0].clone()
        dt = F64 if f64 else F32
        t = int(s.timesteps[step_index])
        out = s.step(
            model_output.to(dt),
            t,
            sample.to(dt),
            eta=eta,
            use_clipped_model_output=ucmo,
            variance_noise=noise.to(dt) if eta > 0 else None,
        )
        return s, t, out

    s, t, out = run(True)
    assert out.prev_sample.dtype == F64
    assert torch.isfinite(out.prev_sample).all(), name
    _, _, out32 = run(False)
    print(
        f"  ddim {name}: t={t} eta={eta} f32-diffusers vs f64 max rel: "
        f"prev {max_rel(out32.prev_sample, out.prev_sample):.2e}, x0 {max_rel(out32.pred_original_sample, out.pred_original_sample):.2e}"
    )
    if use_clipped_model_output:
        _, _, o2 = run(True, ucmo=False)
        assert not torch.allclose(o2.prev_sample, out.prev_sample), "use_clipped_model_output had no effect"
    case = {
        "name": name,
        **cfg,
        "eta": eta,
        "use_clipped_model_output": use_clipped_model_output,
        "num_inference_steps": N,
        "steps_offset": 0,
        "timesteps": ints(s.timesteps),
        "step_index": step_index,
        "timestep": t,
        "prev_timestep": t - 1000 // N,
        "shape": SHAPE,
        "sample": flat(sample),
        "model_output": flat(model_output),
        "noise": flat(noise) if eta > 0 else [],
        "prev_sample": flat(out.prev_sample),
        "pred_original_sample": flat(out.pred_original_sample),
    }
    return case, out


def make_ddim() -> list:
    cases = []
    seed = 3000
    for eta in [0.0, 0.5, 1.0]:
        for pt in ["epsilon", "sample", "v_prediction"]:
            cases.append(ddim_case(f"eta{eta}_{pt}", seed, eta=eta, prediction_type=pt)[0])
            seed += 10
    cases.append(ddim_case("final_step_eta1.0", 3100, eta=1.0, step_index=49)[0])
    cases.append(ddim_case("final_step_alpha_not_one_eta0.5", 3110, eta=0.5, step_index=49, set_alpha_to_one=False)[0])
    cases.append(ddim_case("use_clipped_model_output_eta0.5", 3120, eta=0.5, use_clipped_model_output=True)[0])
    cases.append(ddim_case("no_clip_eta0", 3130, eta=0.0, clip_sample=False)[0])
    c_thr, o_thr = ddim_case(
        "thresholding", 3140, sample_scale=3.0, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5
    )
    _, o_clip = ddim_case("(check: same inputs, plain clip)", 3140, sample_scale=3.0)
    assert not torch.allclose(o_thr.pred_original_sample, o_clip.pred_original_sample), "thresholding had no effect"
    cases.append(c_thr)
    assert cases[9]["timestep"] == 0 and cases[10]["timestep"] == 0
    return cases


# --------------------------------------------------------------------------- E. DPM-Solver++ trajectories


class _TorchWithF32AsF64:
    """Stand-in for the `torch` module inside scheduling_dpmsolver_multistep while we call step():
    `torch.float32` resolves to float64 so that `sample = sample.to(torch.float32)` keeps float64."""

    def __getattr__(self, name):
        if name == "float32":
            return torch.float64
        return getattr(torch, name)


@contextlib.contextmanager
def dpm_keep_f64():
    orig = _dpm_mod.torch
    _dpm_mod.torch = _TorchWithF32AsF64()
    try:
        yield
    finally:
        _dpm_mod.torch = orig


def stand_in_model(sample: torch.Tensor, t: int) -> torch.Tensor:
    """Deterministic smooth fake model (float64), rounded to f32 values."""
    return to_f32_values(torch.tanh(0.8 * sample + 0.05 * (t / 1000.0)) * 0.9)


DPM_CFG = dict(
    **LINEAR,
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    final_sigmas_type="zero",
    thresholding=False,
)


def dpm_case(name, seed, prediction_type="epsilon", N=10, b=0):
    betas, alphas, abar = schedule_f64(T=1000, beta_start=1e-4, beta_end=0.02, schedule="linear")

    def make(f64: bool):
        s = DPMSolverMultistepScheduler(**DPM_CFG, prediction_type=prediction_type)
        s.set_timesteps(N)
        if f64:
            override_ddpm_like(s, betas, alphas, abar)
            s.alpha_t = torch.sqrt(abar)
            s.sigma_t = torch.sqrt(1 - abar)
            s.lambda_t = torch.log(s.alpha_t) - torch.log(s.sigma_t)
            full = ((1 - abar) / abar) ** 0.5
            sig = np.interp(s.timesteps.numpy(), np.arange(0, len(full)), full.numpy())
            sig = np.concatenate([sig, [0.0]])  # final_sigmas_type == "zero"
            assert sig.dtype == np.float64
            # must agree with diffusers' own float32 sigmas
            assert np.allclose(sig, s.sigmas.numpy(), rtol=1e-5, atol=0), name
            s.sigmas = torch.from_numpy(sig)
        if b > 0:
            s.set_begin_index(b)
        return s

    s = make(True)
    orders = []
    orig1, orig2 = s.dpm_solver_first_order_update, s.multistep_dpm_solver_second_order_update

    def spy1(*a, **k):
        orders.append(1)
        return orig1(*a, **k)

    def spy2(*a, **k):
        orders.append(2)
        return orig2(*a, **k)

    s.dpm_solver_first_order_update = spy1
    s.multistep_dpm_solver_second_order_update = spy2

    x = randn32(SHAPE, seed)
    initial = x.clone()
    run_ts = ints(s.timesteps[b:])
    steps = []
    with dpm_keep_f64():
        for t in run_ts:
            mo = stand_in_model(x, t)
            x_next = s.step(mo, t, x).prev_sample
            assert x_next.dtype == F64 and torch.isfinite(x_next).all()
            steps.append({"timestep": t, "model_output": mo, "prev_sample": x_next})
            x = x_next
    assert len(orders) == len(run_ts)
    assert orders[0] == 1 and orders[-1] == 1

    # replay the same model outputs through the unmodified float32 diffusers scheduler
    s32 = make(False)
    x32 = initial.float()
    worst = 0.0
    for st in steps:
        x32 = s32.step(st["model_output"].float(), st["timestep"], x32).prev_sample
        worst = max(worst, max_rel(x32, st["prev_sample"]))
    # the f64-overridden scheduler *without* the proxy (diffusers casts `sample` to float32 in step)
    s_cast = make(True)
    xc = initial.clone()
    worst_cast = 0.0
    for st in steps:
        xc = s_cast.step(st["model_output"], st["timestep"], xc).prev_sample
        worst_cast = max(worst_cast, max_rel(xc, st["prev_sample"]))
    print(
        f"  dpm {name}: orders={orders}; max rel vs stored f64 over trajectory: "
        f"f32 diffusers {worst:.2e}, f64 schedule but diffusers' f32 sample cast {worst_cast:.2e}"
    )

    return {
        "name": name,
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "final_sigmas_type": "zero",
        "timestep_spacing": "linspace",
        "prediction_type": prediction_type,
        "num_train_timesteps": 1000,
        "num_inference_steps": N,
        "begin_index": b,
        "all_timesteps": ints(s.timesteps),
        "timesteps": run_ts,
        "sigmas": flat(s.sigmas),
        "shape": SHAPE,
        "initial_sample": flat(initial),
        "steps": [
            {"timestep": st["timestep"], "order": o, "model_output": flat(st["model_output"]), "prev_sample": flat(st["prev_sample"])}
            for st, o in zip(steps, orders)
        ],
    }


def make_dpm() -> list:
    return [
        dpm_case("epsilon_N10", 4000, "epsilon", N=10),
        dpm_case("epsilon_N20", 4010, "epsilon", N=20),
        dpm_case("v_prediction_N10", 4020, "v_prediction", N=10),
        dpm_case("sample_N10", 4030, "sample", N=10),
        dpm_case("epsilon_N20_begin10", 4040, "epsilon", N=20, b=10),
    ]


# --------------------------------------------------------------------------- F. add_noise


def make_add_noise() -> dict:
    cases = []
    shape = [4, 1, 2, 2]
    ts = [0, 99, 500, 999]
    for i, sch in enumerate(["linear", "squaredcos_cap_v2"]):
        betas, alphas, abar = schedule_f64(T=1000, beta_start=1e-4, beta_end=0.02, schedule=sch)
        s = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule=sch)
        override_ddpm_like(s, betas, alphas, abar)
        x0 = randn32(shape, 5000 + 10 * i)
        eps = randn32(shape, 5001 + 10 * i)
        noisy = s.add_noise(x0, eps, torch.tensor(ts, dtype=torch.long))
        assert noisy.dtype == F64
        cases.append(
            {
                "beta_schedule": sch,
                "num_train_timesteps": 1000,
                "beta_start": 1e-4,
                "beta_end": 0.02,
                "shape": shape,
                "original": flat(x0),
                "noise": flat(eps),
                "timesteps": ts,
                "noisy": flat(noisy),
            }
        )
    return {"cases": cases}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    repo_root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=repo_root / "core" / "tests" / "data", help="output directory")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    _dlogging.set_verbosity_error()

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        ("schedules.json", make_schedules),
        ("timesteps.json", make_timesteps),
        ("ddpm_steps.json", make_ddpm),
        ("ddim_steps.json", make_ddim),
        ("dpmsolver_trajectories.json", make_dpm),
        ("add_noise.json", make_add_noise),
    ]
    fixed_large_log_probe()
    total = 0
    for fname, fn in jobs:
        print(f"{fname}:")
        obj = fn()
        path = out / fname
        write_json(path, obj)
        size = os.path.getsize(path)
        total += size
        print(f"  -> {path} ({size} bytes)")
    print(f"total {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
