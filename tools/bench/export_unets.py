"""Export the U-Nets of the benchmark (issue 6) to target/bench/.

1. The ddpm-cifar10 architecture (google/ddpm-cifar10-32's config) as a diffusers
   `UNet2DModel` with random weights (torch.manual_seed(0)): `cifar_unet.onnx` plus the
   state dict `cifar_unet.pt`, so that PyTorch runs the very same weights.
2. The shipped Fashion-MNIST U-Net `models/fashion/unet.onnx` is used as it is. Its
   PyTorch weights are the EMA checkpoint `tools/train/runs/unet_ema.pt` when present
   (git-ignored; written by tools/train/train_unet.py, exported by tools/train/export.py
   with `models.UNET_CONFIG`), else the ONNX file's own weights loaded into the same
   architecture. This script checks that they reproduce the ONNX file (ONNX Runtime vs
   PyTorch on the same input) and writes `fashion_unet.json` saying whether PyTorch can
   be benchmarked on it.

Export settings (see /work/shared/TRACT-NOTES.md): torch.onnx.export with dynamo=False,
opset 17, a dynamic batch axis, a wrapper returning `.sample`; inputs `sample` f32
[N,C,32,32] and `timestep` int64 [N]; output `noise_pred`.

    /work/venv/bin/python tools/bench/export_unets.py [--force]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "target", "bench")
FASHION_ONNX = os.path.join(ROOT, "models", "fashion", "unet.onnx")
FASHION_CKPT = os.path.join(ROOT, "tools", "train", "runs", "unet_ema.pt")
TOL = 1e-4

# google/ddpm-cifar10-32 (35.7M parameters).
CIFAR_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)


class Wrapper(torch.nn.Module):
    """(sample [N,C,H,W] f32, timestep [N] int64) -> noise_pred [N,C,H,W]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep).sample


def cifar_unet():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(**CIFAR_CONFIG).eval()


def fashion_unet():
    """The shipped U-Net's architecture (tools/train/models.py) with the EMA weights of
    the training checkpoint when it is here, else with the weights of the shipped ONNX
    file itself (`fashion_weights_from_onnx`). `ort_vs_torch` checks either against
    the ONNX file."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "train"))
    from models import make_unet  # noqa: E402
    unet = make_unet()
    if os.path.isfile(FASHION_CKPT):
        unet.load_state_dict(torch.load(FASHION_CKPT, weights_only=False))
    else:
        unet.load_state_dict(fashion_weights_from_onnx(unet.state_dict()))
    return unet.eval()


def fashion_weights_source():
    """Where `fashion_unet` takes its weights from, relative to the repository."""
    path = FASHION_CKPT if os.path.isfile(FASHION_CKPT) else FASHION_ONNX
    return os.path.relpath(path, ROOT)


def fashion_weights_from_onnx(like):
    """A state dict for the shipped U-Net read from models/fashion/unet.onnx, shaped
    like `like` (the model's own state dict). The exporter kept most parameter names
    (`unet.<key>`); the others it renamed `onnx::Op_N` and feeds to one node, named
    `/unet/<module path>/<Op>`: a GroupNorm's affine as `Mul` (weight) and `Add` (bias)
    of shape [C, 1(, 1)], a Linear's weight transposed as `MatMul`'s second input."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(FASHION_ONNX)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    sd = {}
    for name, value in init.items():
        if name.startswith("unet."):
            sd[name[len("unet."):]] = value
    for node in model.graph.node:
        for name in node.input:
            if not name.startswith("onnx::") or name not in init:
                continue
            module = node.name.split("/")[2:-1]
            role = {"Mul": "weight", "Add": "bias", "MatMul": "weight"}.get(node.op_type)
            if not module or role is None:
                raise SystemExit(f"{name}: no parameter for node {node.name}")
            value = init[name].T if node.op_type == "MatMul" else init[name]
            sd[".".join(module) + "." + role] = value
    missing = sorted(set(like) - set(sd))
    if missing:
        raise SystemExit(f"{FASHION_ONNX}: no weights for {missing[:5]}...")
    return {k: torch.from_numpy(np.array(sd[k], dtype=np.float32).reshape(v.shape))
            for k, v in like.items()}


def ort_vs_torch(path, unet, c, n=2):
    import onnxruntime as ort
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, 32, 32, generator=g)
    t = torch.tensor([500, 10][:n], dtype=torch.int64)
    with torch.no_grad():
        ref = unet(x, t).sample.numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    got = s.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
    return float(np.abs(got - ref).max())


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="export again even if present")
    args = p.parse_args()
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)

    onnx_path = os.path.join(OUT, "cifar_unet.onnx")
    pt_path = os.path.join(OUT, "cifar_unet.pt")
    info_path = os.path.join(OUT, "cifar_unet.json")
    if args.force or not all(os.path.isfile(f) for f in (onnx_path, pt_path, info_path)):
        t0 = time.time()
        unet = cifar_unet()
        n_params = sum(p.numel() for p in unet.parameters())
        torch.save(unet.state_dict(), pt_path)
        x = torch.randn(1, 3, 32, 32)
        t = torch.tensor([500], dtype=torch.int64)
        with torch.no_grad():
            torch.onnx.export(Wrapper(unet), (x, t), onnx_path, dynamo=False, opset_version=17,
                              input_names=["sample", "timestep"], output_names=["noise_pred"],
                              dynamic_axes={"sample": {0: "N"}, "timestep": {0: "N"},
                                            "noise_pred": {0: "N"}},
                              do_constant_folding=True)
        import onnx
        onnx.checker.check_model(onnx.load(onnx_path))
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            unet(x, t)
        diff = ort_vs_torch(onnx_path, unet, 3)
        info = {"params": n_params, "gflop_batch1": fc.get_total_flops() / 1e9,
                "weights_mb": n_params * 4 / 1e6, "ort_vs_torch_max_abs_diff": diff,
                "config": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in CIFAR_CONFIG.items()}}
        with open(info_path, "w") as f:
            json.dump(info, f, indent=1)
        print(f"cifar U-Net: {n_params / 1e6:.2f}M params, {info['gflop_batch1']:.2f} GFLOP "
              f"at batch 1, ORT vs PyTorch max |diff| {diff:.2e}; {onnx_path} "
              f"({os.path.getsize(onnx_path) / 1e6:.1f} MB) in {time.time() - t0:.0f} s",
              flush=True)
        assert diff <= TOL, f"ORT vs PyTorch {diff} > {TOL}"
    else:
        print(f"cifar U-Net: {onnx_path} present (--force to export again)")

    finfo_path = os.path.join(OUT, "fashion_unet.json")
    if args.force or not os.path.isfile(finfo_path):
        unet = fashion_unet()
        info = {"onnx": os.path.relpath(FASHION_ONNX, ROOT),
                "weights": fashion_weights_source()}
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            unet(torch.randn(1, 1, 32, 32), torch.tensor([500]))
        diff = ort_vs_torch(FASHION_ONNX, unet, 1)
        n_params = sum(p.numel() for p in unet.parameters())
        info.update(torch_ok=diff <= TOL, ort_vs_torch_max_abs_diff=diff, params=n_params,
                    weights_mb=n_params * 4 / 1e6, gflop_batch1=fc.get_total_flops() / 1e9)
        if diff > TOL:
            info["reason"] = f"{info['weights']} does not reproduce the ONNX file ({diff:.2e})"
        with open(finfo_path, "w") as f:
            json.dump(info, f, indent=1)
        print("fashion U-Net:", json.dumps(info), flush=True)
    else:
        print(f"fashion U-Net: {finfo_path} present")


if __name__ == "__main__":
    main()
