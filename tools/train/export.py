"""Export the four trained models to ONNX in models/fashion/, check them with onnxruntime
against PyTorch, write reference.json (tract check data), scheduler_config.json and
esddpm.json, and time the U-Net in onnxruntime (batch 1, 1 thread)."""
import argparse
import json
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode

import common
import data
from models import (GAN_LATENT, SCHEDULER_CONFIG, UNET_CONFIG, VAE_LATENT, Classifier,
                    Generator, UNetWrapper, VAEDecoder, make_unet)

OUT = os.path.normpath(os.path.join(common.HERE, "..", "..", "models", "fashion"))
TOL = 1e-4


def load_models():
    clf = Classifier()
    clf.load_state_dict(torch.load(common.ckpt_path("classifier"), weights_only=False)["model"])
    dec = VAEDecoder()
    dec.load_state_dict(torch.load(common.ckpt_path("vae"), weights_only=False)["dec"])
    G = Generator()
    G.load_state_dict(torch.load(f"{common.RUN_DIR}/gan_G_final.pt", weights_only=False))
    unet = make_unet()
    unet.load_state_dict(torch.load(f"{common.RUN_DIR}/unet_ema.pt", weights_only=False))
    return {"classifier": clf.eval(), "vae_decoder": dec.eval(), "gan_generator": G.eval(),
            "unet": UNetWrapper(unet).eval()}


SPECS = {
    "unet": (["sample", "timestep"], ["noise_pred"]),
    "vae_decoder": (["z"], ["image"]),
    "gan_generator": (["z"], ["image"]),
    "classifier": (["image"], ["logits", "features"]),
}


def inputs(name, n, seed):
    """Fixed seeded inputs, rounded to 4 decimals (exact in JSON, float32 after casting)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda t: torch.round(t * 1e4) / 1e4  # noqa: E731
    if name == "unet":
        x = r(torch.randn(n, 1, 32, 32, generator=g))
        t = torch.tensor([10, 500, 99, 999][:n] + [int(v) for v in
                         torch.randint(0, 1000, (max(0, n - 4),), generator=g)], dtype=torch.int64)
        return (x, t)
    if name in ("vae_decoder", "gan_generator"):
        d = VAE_LATENT if name == "vae_decoder" else GAN_LATENT
        return (r(torch.randn(n, d, generator=g)),)
    x_test = torch.from_numpy(data.load("test")[0])
    return (x_test[seed % 1000: seed % 1000 + n].clone(),)


def export(name, model):
    ins, outs = SPECS[name]
    path = os.path.join(OUT, f"{name}.onnx")
    dyn = {k: {0: "N"} for k in ins + outs}
    with torch.no_grad():
        torch.onnx.export(model, inputs(name, 1, 0), path, dynamo=False, opset_version=17,
                          input_names=ins, output_names=outs, dynamic_axes=dyn,
                          do_constant_folding=True)
    onnx.checker.check_model(onnx.load(path))
    return path


def session(path, threads=0):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_both(name, model, sess, n, seed):
    args = inputs(name, n, seed)
    with torch.no_grad():
        ref = model(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    feed = {k: a.numpy() for k, a in zip(SPECS[name][0], args)}
    got = sess.run(SPECS[name][1], feed)
    diff = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref))
    return args, got, diff


def fmt(a):
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return [float(f"{v:.9g}") for v in a.astype(np.float32).ravel().tolist()]
    return [int(v) for v in a.ravel().tolist()]


def time_unet(path, threads, batch=1, reps=100):
    s = session(path, threads)
    feed = {"sample": np.random.RandomState(0).randn(batch, 1, 32, 32).astype(np.float32),
            "timestep": np.full((batch,), 50, np.int64)}
    for _ in range(10):
        s.run(None, feed)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        s.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(OUT, exist_ok=True)
    models = load_models()
    report, reference = {}, {"tolerance": TOL, "batch": 2, "models": {}}
    for name, model in models.items():
        path = export(name, model)
        sess = session(path)
        diffs = {}
        for n in (1, 4):
            _, _, diffs[f"batch{n}"] = run_both(name, model, sess, n, seed=1 + n)
        args2, got2, diffs["batch2"] = run_both(name, model, sess, 2, seed=2026)
        print(f"{name}: ORT vs PyTorch max abs diff " +
              ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()), flush=True)
        assert all(v <= TOL for v in diffs.values()), f"{name}: diff above {TOL}"
        ins, outs = SPECS[name]
        reference["models"][name] = {
            "file": f"{name}.onnx",
            "inputs": {k: {"shape": list(a.shape), "dtype": str(a.numpy().dtype),
                           "data": fmt(a.numpy())} for k, a in zip(ins, args2)},
            "outputs": {k: {"shape": list(g.shape), "dtype": str(g.dtype), "data": fmt(g)}
                        for k, g in zip(outs, got2)},
        }
        report[name] = {"file": f"models/fashion/{name}.onnx", "bytes": os.path.getsize(path),
                        "params": common.n_params(model), "ort_vs_torch_max_abs_diff": diffs}

    # classifier accuracy through ONNX Runtime on the full test set
    xte, yte = data.load("test")
    s = session(os.path.join(OUT, "classifier.onnx"))
    logits = np.concatenate([s.run(["logits"], {"image": xte[i:i + 1000]})[0]
                             for i in range(0, len(xte), 1000)])
    report["classifier"]["ort_test_accuracy"] = float((logits.argmax(1) == yte).mean())

    # U-Net cost
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        models["unet"](*inputs("unet", 1, 0))
    upath = os.path.join(OUT, "unet.onnx")
    report["unet"].update(gflop_batch1=round(fc.get_total_flops() / 1e9, 4),
                          ort_ms_batch1_1thread=round(time_unet(upath, 1), 2),
                          ort_ms_batch1_2threads=round(time_unet(upath, 2), 2),
                          ort_ms_batch8_1thread=round(time_unet(upath, 1, 8, 30), 2),
                          config={k: list(v) if isinstance(v, tuple) else v
                                  for k, v in UNET_CONFIG.items()})
    print("unet:", {k: v for k, v in report["unet"].items() if k != "config"}, flush=True)

    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(reference, f, separators=(",", ":"))
    DDPMScheduler(**SCHEDULER_CONFIG).save_config(OUT)
    manifest = {
        "format": "esddpm/1",
        "unet": {"file": "unet.onnx", "sample_shape": [1, 32, 32], "timestep_dtype": "int64"},
        "priors": {
            "gan": {"file": "gan_generator.onnx", "latent_shape": [GAN_LATENT],
                    "output_range": [-1, 1]},
            "vae": {"file": "vae_decoder.onnx", "latent_shape": [VAE_LATENT],
                    "output_range": [-1, 1]},
        },
        "default_prior": "gan",
        "recommended_start": 100,
        "classifier": {"file": "classifier.onnx", "features_output": "features",
                       "logits_output": "logits"},
        "data": {"dataset": "Fashion-MNIST", "padding": "28x28 padded to 32x32 with -1"},
    }
    with open(os.path.join(OUT, "esddpm.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    sizes = {fn: os.path.getsize(os.path.join(OUT, fn)) for fn in sorted(os.listdir(OUT))}
    report["files"] = sizes
    report["total_bytes"] = sum(sizes.values())
    assert report["total_bytes"] < 25e6, "models/fashion/ over 25 MB"
    assert sizes["reference.json"] < 200e3, "reference.json over 200 KB"
    with open(os.path.join(common.LOG_DIR, "export_summary.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
