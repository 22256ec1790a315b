#!/usr/bin/env python3
"""Generate the small random-weight ONNX models used by the esddpm Rust tests.

Usage (from anywhere):

    python tools/models/make_test_models.py [--out DIR]

DIR defaults to ``tests/models`` under the repository root (computed from this
file's location).  Nothing is downloaded; all weights are random with fixed
seeds, and the whole run takes a few seconds on one CPU thread.

Export settings (see the project's tract notes): every model is exported with
``torch.onnx.export(..., dynamo=False, opset_version=17)`` and a dynamic batch
axis ``"N"`` on every input and output, which tract-onnx 0.23 loads, types and
optimises whether the batch is fixed or left symbolic.

``DIR/tiny/`` -- a complete esddpm model folder
-----------------------------------------------
* ``unet.onnx``  A diffusers ``UNet2DModel`` (1 channel, 16x16, block channels
  (16, 32), one ResNet per block, a self-attention down and up block, GroupNorm
  with 8 groups), random init after ``torch.manual_seed(0)``.  A wrapper gives
  it the ONNX signature ``sample`` [N,1,16,16] float32, ``timestep`` [N] int64
  -> ``noise_pred`` [N,1,16,16] float32 (the epsilon prediction, ``.sample``
  of diffusers' output).
* ``prior.onnx``  A tiny "VAE decoder"-like MLP standing in for the cheap
  prior generator: ``z`` [N,8] float32 -> Linear(8,64) -> SiLU ->
  Linear(64,256) -> tanh -> reshape -> ``image`` [N,1,16,16] in [-1, 1].
* ``prior_cond.onnx``  Class-conditional variant: inputs ``z`` [N,8] float32
  and ``class_label`` [N] int64 (10 classes); ``nn.Embedding(10, 8)`` of the
  label is added to ``z`` before the same MLP; output ``image`` as above.
* ``scheduler_config.json``  Written by diffusers' own
  ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
  beta_start=0.0001, beta_end=0.02, variance_type="fixed_small",
  clip_sample=True, prediction_type="epsilon").save_config``.
* ``esddpm.json``  The esddpm manifest (format ``esddpm/1``) naming the U-Net,
  the two priors (``mlp`` the default, ``mlp_cond`` with 10 classes) and
  ``recommended_start`` 100.

``DIR/broken/`` -- single files for error tests
-----------------------------------------------
All load and run in onnxruntime except ``not_onnx.onnx``.  Every U-Net-like
model takes (and uses) both ``sample`` and ``timestep`` so neither input is
pruned by the exporter.

* ``unet_rank3.onnx``  ``sample`` is [N,16,16] (rank 3), ``timestep`` [N]
  int64; output ``noise_pred`` [N,16,16] = sample*2 + float(timestep)*0.001.
* ``unet_f64.onnx``  ``sample`` is float64 [N,1,16,16]; output float64.
* ``unet_wrong_out.onnx``  Correct inputs, output [N,3,16,16] (a 3x3 conv to 3
  channels): neither C nor 2C channels for C=1.
* ``unet_nan.onnx``  Correct signature; output is NaN everywhere
  (log(sample*0 - 1) plus a timestep term), checked in onnxruntime.
* ``unet_inf.onnx``  Correct signature; output is +inf everywhere (exp(1000) in
  float32).
* ``unet_out_f64.onnx``  float32 inputs as the pipeline needs, but a float64
  output.
* ``unet_huge_input.onnx``  A 3x3 conv U-Net whose declared ``sample`` and output
  are [N,1,65536,65536] (16 GiB per image in float32): a model that would exhaust
  memory; loading it must fail on the memory limit before anything is allocated.
  (Not run in onnxruntime, for that reason.)
* ``unet_learned.onnx``  Correct inputs, output [N,2,16,16] in the
  learned-variance layout: channel 0 an epsilon-like conv output, channel 1
  tanh(...) in [-1, 1] (the variance interpolation value).
* ``prior_01.onnx``  Like ``prior.onnx`` but sigmoid output in [0, 1].
* ``prior_255.onnx``  Like ``prior.onnx`` but output sigmoid*255 in [0, 255].
* ``prior_wrong_shape.onnx``  Prior whose ``image`` is [N,1,8,8] (wrong
  spatial size for the 16x16 U-Net).
* ``not_onnx.onnx``  A few bytes of plain text, not protobuf.

``DIR/reference.json``
----------------------
Fixed batch-2 inputs (float32 values drawn from seeded numpy generators,
timesteps [10, 500], labels [3, 7]) and onnxruntime's outputs for
``tiny/unet.onnx``, ``tiny/prior.onnx`` and ``tiny/prior_cond.onnx``, flattened
row-major (NCHW) as JSON lists of Python floats (exact float64 values of the
float32 numbers, ``repr`` form, so they round-trip).  The runtime checks tract
against these within 1e-4.  ONNX Runtime runs with one thread and graph
optimisations disabled.  The maximum absolute difference between PyTorch's and
onnxruntime's outputs is printed (and required to be <= 1e-5), not stored.

Finally every model is loaded in onnxruntime and run at batch 1 and 3 to check
the dynamic batch and the expected output shapes / ranges.

The output is deterministic (fixed seeds, single thread): two runs give
byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import diffusers
from diffusers import DDPMScheduler, UNet2DModel

OPSET = 17
LATENT = 8
SIDE = 16
NUM_CLASSES = 10

GENERATOR = (
    f"tools/models/make_test_models.py; torch {torch.__version__.split('+')[0]} / "
    f"diffusers {diffusers.__version__} / onnx {onnx.__version__} / "
    f"onnxruntime {ort.__version__} / numpy {np.__version__}"
)

MANIFEST = {
    "format": "esddpm/1",
    "unet": {"file": "unet.onnx", "sample_shape": [1, SIDE, SIDE], "timestep_dtype": "int64"},
    "priors": {
        "mlp": {"file": "prior.onnx", "latent_shape": [LATENT], "output_range": [-1, 1]},
        "mlp_cond": {
            "file": "prior_cond.onnx",
            "latent_shape": [LATENT],
            "output_range": [-1, 1],
            "num_classes": NUM_CLASSES,
        },
    },
    "default_prior": "mlp",
    "recommended_start": 100,
}


# --------------------------------------------------------------------------- modules


class UNetWrapper(nn.Module):
    """(sample, timestep) -> epsilon prediction tensor (diffusers' ``.sample``)."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep).sample


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=SIDE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


class MlpPrior(nn.Module):
    """z [N,8] -> Linear -> SiLU -> Linear -> squash -> image [N,1,side,side].

    ``squash`` is "tanh" ([-1,1]), "sigmoid" ([0,1]) or "sigmoid255" ([0,255]).
    """

    def __init__(self, squash: str = "tanh", side: int = SIDE, num_classes: int = 0):
        super().__init__()
        self.side = side
        self.squash = squash
        self.embed = nn.Embedding(num_classes, LATENT) if num_classes else None
        self.fc1 = nn.Linear(LATENT, 64)
        self.fc2 = nn.Linear(64, side * side)

    def _decode(self, z):
        h = self.fc2(nn.functional.silu(self.fc1(z)))
        if self.squash == "tanh":
            h = torch.tanh(h)
        elif self.squash == "sigmoid":
            h = torch.sigmoid(h)
        elif self.squash == "sigmoid255":
            h = torch.sigmoid(h) * 255.0
        else:
            raise ValueError(self.squash)
        return h.reshape(-1, 1, self.side, self.side)

    def forward(self, z):
        return self._decode(z)


class CondMlpPrior(MlpPrior):
    def forward(self, z, class_label):
        return self._decode(z + self.embed(class_label))


def _tscale(timestep, shape):
    """float(timestep)/1000 broadcast over a sample of rank len(shape)."""
    return (timestep.to(torch.float32) * 0.001).reshape(-1, *([1] * (len(shape) - 1)))


class Rank3Unet(nn.Module):
    def forward(self, sample, timestep):  # sample [N,16,16]
        return sample * 2.0 + _tscale(timestep, sample.shape)


class F64Unet(nn.Module):
    def forward(self, sample, timestep):  # sample float64
        return sample * 2.0 + _tscale(timestep, sample.shape).to(torch.float64)


class ConvUnet(nn.Module):
    """3x3 conv from 1 channel to ``out`` channels plus a timestep term."""

    def __init__(self, out: int):
        super().__init__()
        self.conv = nn.Conv2d(1, out, 3, padding=1)

    def forward(self, sample, timestep):
        return self.conv(sample) + _tscale(timestep, sample.shape)


class NanUnet(nn.Module):
    def forward(self, sample, timestep):
        # log of a negative number is NaN; NaN + anything stays NaN.
        return torch.log(sample * 0.0 - 1.0) + _tscale(timestep, sample.shape)


class InfUnet(nn.Module):
    def forward(self, sample, timestep):
        # exp(1000) overflows float32: +inf everywhere.
        return torch.exp(sample * 0.0 + 1000.0) + _tscale(timestep, sample.shape)


class OutF64Unet(nn.Module):
    def forward(self, sample, timestep):  # float32 in, float64 out
        return (sample * 2.0 + _tscale(timestep, sample.shape)).to(torch.float64)


HUGE_SIDE = 65536


def declare_huge(path: Path) -> None:
    """Rewrite the declared H, W of every input/output of rank 4 to HUGE_SIDE."""
    m = onnx.load(str(path))
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[2].dim_value = HUGE_SIDE
            dims[3].dim_value = HUGE_SIDE
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


class LearnedVarUnet(ConvUnet):
    """[N,2,16,16]: channel 0 epsilon-like, channel 1 tanh(...) in [-1, 1]."""

    def __init__(self):
        super().__init__(2)

    def forward(self, sample, timestep):
        h = super().forward(sample, timestep)
        return torch.cat([h[:, 0:1], torch.tanh(h[:, 1:2])], dim=1)


# --------------------------------------------------------------------------- export


def export(model: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]):
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "N"} for name in inputs + outputs},
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def flat(a: np.ndarray) -> list[float]:
    """Row-major flatten to Python floats (exact float64 values of the f32 numbers)."""
    return [float(v) for v in np.asarray(a, dtype=np.float32).reshape(-1)]


def randn32(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# --------------------------------------------------------------------------- main


def build(out: Path) -> dict[str, Path]:
    tiny = out / "tiny"
    broken = out / "broken"
    tiny.mkdir(parents=True, exist_ok=True)
    broken.mkdir(parents=True, exist_ok=True)

    x = torch.zeros(2, 1, SIDE, SIDE)
    t = torch.tensor([10, 500], dtype=torch.int64)
    z = torch.zeros(2, LATENT)
    y = torch.tensor([3, 7], dtype=torch.int64)
    u_in, u_out = ["sample", "timestep"], ["noise_pred"]
    files = {}

    def ex(key, model, args, path, inputs, outputs):
        export(model, args, path, inputs, outputs)
        files[key] = path

    ex("unet", UNetWrapper(tiny_unet()), (x, t), tiny / "unet.onnx", u_in, u_out)
    torch.manual_seed(1)
    ex("prior", MlpPrior("tanh"), (z,), tiny / "prior.onnx", ["z"], ["image"])
    torch.manual_seed(2)
    ex("prior_cond", CondMlpPrior("tanh", num_classes=NUM_CLASSES), (z, y),
       tiny / "prior_cond.onnx", ["z", "class_label"], ["image"])

    DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
    ).save_config(str(tiny))
    (tiny / "esddpm.json").write_text(json.dumps(MANIFEST, indent=2) + "\n")

    ex("unet_rank3", Rank3Unet(), (torch.zeros(2, SIDE, SIDE), t),
       broken / "unet_rank3.onnx", u_in, u_out)
    ex("unet_f64", F64Unet(), (x.double(), t), broken / "unet_f64.onnx", u_in, u_out)
    torch.manual_seed(3)
    ex("unet_wrong_out", ConvUnet(3), (x, t), broken / "unet_wrong_out.onnx", u_in, u_out)
    ex("unet_nan", NanUnet(), (x, t), broken / "unet_nan.onnx", u_in, u_out)
    ex("unet_inf", InfUnet(), (x, t), broken / "unet_inf.onnx", u_in, u_out)
    ex("unet_out_f64", OutF64Unet(), (x, t), broken / "unet_out_f64.onnx", u_in, u_out)
    torch.manual_seed(8)
    export(ConvUnet(1), (x, t), broken / "unet_huge_input.onnx", u_in, u_out)
    declare_huge(broken / "unet_huge_input.onnx")
    torch.manual_seed(4)
    ex("unet_learned", LearnedVarUnet(), (x, t), broken / "unet_learned.onnx", u_in, u_out)
    torch.manual_seed(5)
    ex("prior_01", MlpPrior("sigmoid"), (z,), broken / "prior_01.onnx", ["z"], ["image"])
    torch.manual_seed(6)
    ex("prior_255", MlpPrior("sigmoid255"), (z,), broken / "prior_255.onnx", ["z"], ["image"])
    torch.manual_seed(7)
    ex("prior_wrong_shape", MlpPrior("tanh", side=8), (z,), broken / "prior_wrong_shape.onnx",
       ["z"], ["image"])
    (broken / "not_onnx.onnx").write_bytes(b"this is not an onnx model\n")
    files["not_onnx"] = broken / "not_onnx.onnx"
    return files


def reference(out: Path) -> None:
    """Write reference.json from ORT and compare PyTorch against it."""
    tiny = out / "tiny"
    sample = randn32((2, 1, SIDE, SIDE), 100)
    timestep = np.array([10, 500], dtype=np.int64)
    z = randn32((2, LATENT), 101)
    zc = randn32((2, LATENT), 102)
    label = np.array([3, 7], dtype=np.int64)

    eps = session(tiny / "unet.onnx").run(None, {"sample": sample, "timestep": timestep})[0]
    img = session(tiny / "prior.onnx").run(None, {"z": z})[0]
    imgc = session(tiny / "prior_cond.onnx").run(None, {"z": zc, "class_label": label})[0]

    # PyTorch side (same seeds -> same weights as the exported files).
    with torch.no_grad():
        eps_pt = UNetWrapper(tiny_unet())(torch.from_numpy(sample), torch.from_numpy(timestep))
        torch.manual_seed(1)
        img_pt = MlpPrior("tanh").eval()(torch.from_numpy(z))
        torch.manual_seed(2)
        imgc_pt = CondMlpPrior("tanh", num_classes=NUM_CLASSES).eval()(
            torch.from_numpy(zc), torch.from_numpy(label))
    for name, a, b in [("unet", eps, eps_pt), ("prior", img, img_pt), ("prior_cond", imgc, imgc_pt)]:
        d = float(np.max(np.abs(a - b.numpy())))
        print(f"reference: {name:10s} PyTorch vs ORT max abs diff {d:.3g}")
        if not d <= 1e-5:
            sys.exit(f"PyTorch and ORT differ by {d} on {name}")

    ref = {
        "generator": GENERATOR,
        "unet": {
            "sample": flat(sample),
            "sample_shape": list(sample.shape),
            "timestep": [int(v) for v in timestep],
            "noise_pred": flat(eps),
        },
        "prior": {"z": flat(z), "z_shape": list(z.shape), "image": flat(img)},
        "prior_cond": {
            "z": flat(zc),
            "z_shape": list(zc.shape),
            "class_label": [int(v) for v in label],
            "image": flat(imgc),
        },
    }
    (out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")


# key -> (input builders(batch), expected output shape(batch), extra check)
def _checks():
    s = lambda n: np.random.default_rng(n).standard_normal((n, 1, SIDE, SIDE), dtype=np.float32)
    ts = lambda n: np.arange(n, dtype=np.int64) * 300 + 1
    zz = lambda n: np.random.default_rng(n).standard_normal((n, LATENT), dtype=np.float32) * 3
    lab = lambda n: np.arange(n, dtype=np.int64) % NUM_CLASSES
    unet_in = lambda n: {"sample": s(n), "timestep": ts(n)}
    finite = lambda o: bool(np.all(np.isfinite(o)))
    rng = lambda lo, hi: (lambda o: finite(o) and o.min() >= lo and o.max() <= hi)
    return {
        "unet": (unet_in, (1, SIDE, SIDE), finite),
        "prior": (lambda n: {"z": zz(n)}, (1, SIDE, SIDE), rng(-1, 1)),
        "prior_cond": (lambda n: {"z": zz(n), "class_label": lab(n)}, (1, SIDE, SIDE), rng(-1, 1)),
        "unet_rank3": (lambda n: {"sample": s(n)[:, 0], "timestep": ts(n)}, (SIDE, SIDE), finite),
        "unet_f64": (lambda n: {"sample": s(n).astype(np.float64), "timestep": ts(n)},
                     (1, SIDE, SIDE), lambda o: o.dtype == np.float64 and finite(o)),
        "unet_wrong_out": (unet_in, (3, SIDE, SIDE), finite),
        "unet_nan": (unet_in, (1, SIDE, SIDE), lambda o: bool(np.all(np.isnan(o)))),
        "unet_inf": (unet_in, (1, SIDE, SIDE), lambda o: bool(np.all(np.isposinf(o)))),
        "unet_out_f64": (unet_in, (1, SIDE, SIDE),
                         lambda o: o.dtype == np.float64 and finite(o)),
        "unet_learned": (unet_in, (2, SIDE, SIDE),
                         lambda o: finite(o) and np.abs(o[:, 1]).max() <= 1),
        "prior_01": (lambda n: {"z": zz(n)}, (1, SIDE, SIDE), rng(0, 1)),
        "prior_255": (lambda n: {"z": zz(n)}, (1, SIDE, SIDE),
                      lambda o: rng(0, 255)(o) and o.max() > 1),
        "prior_wrong_shape": (lambda n: {"z": zz(n)}, (1, 8, 8), rng(-1, 1)),
    }


def check(files: dict[str, Path]) -> None:
    """Load every model in onnxruntime and run it at batch 1 and 3."""
    failed = []
    for key, (make_in, shape, ok) in _checks().items():
        sess = session(files[key])
        sig = ", ".join(f"{i.name}:{i.type}{i.shape}" for i in sess.get_inputs())
        osig = ", ".join(f"{o.name}:{o.type}{o.shape}" for o in sess.get_outputs())
        res = []
        for n in (1, 3):
            o = sess.run(None, make_in(n))[0]
            good = o.shape == (n, *shape) and ok(o)
            res.append(f"b{n} {list(o.shape)} {'ok' if good else 'FAIL'}")
            if not good:
                failed.append(f"{key} batch {n}")
        print(f"check: {key:17s} ({sig}) -> ({osig}): {'; '.join(res)}")
    try:
        session(files["not_onnx"])
        failed.append("not_onnx loaded")
    except Exception as e:  # noqa: BLE001 -- any load error is the expected outcome
        print(f"check: not_onnx          rejected by ORT: {type(e).__name__}")
    if failed:
        sys.exit("checks failed: " + ", ".join(failed))


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=root / "tests" / "models")
    out = ap.parse_args().out
    torch.set_num_threads(1)
    files = build(out)
    reference(out)
    check(files)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:9d}  {p.relative_to(out)}")


if __name__ == "__main__":
    main()
