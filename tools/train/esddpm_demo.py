"""End-to-end check of the exported files in models/fashion/ with onnxruntime only:
ES-DDPM from the GAN and VAE priors (start at t = k-1 of the 1000-step chain, k reverse steps,
DDPMScheduler fixed_small + clip), a PNG (rows: prior, ES-DDPM from it) and a small FID in the
classifier's 128-d feature space against the test set (few samples: biased upward, only for
comparing the rows with each other and with the real-vs-real line)."""
import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort
import torch
from diffusers import DDPMScheduler

import common
import data

OUT = os.path.normpath(os.path.join(common.HERE, "..", "..", "models", "fashion"))


def sess(name, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(os.path.join(OUT, name), so, providers=["CPUExecutionProvider"])


def fid(f1, f2):
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ev = np.linalg.eigvals(c1 @ c2)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2)
                 - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--k", type=int, default=100, help="reverse steps (start at t = k-1)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    cfg = json.load(open(os.path.join(OUT, "esddpm.json")))
    sched = DDPMScheduler.from_pretrained(OUT)  # reads scheduler_config.json
    unet = sess(cfg["unet"]["file"], args.threads)
    clf = sess(cfg["classifier"]["file"], args.threads)
    feats = lambda x: np.concatenate([clf.run(["features"], {"image": x[i:i + 500]})[0]  # noqa
                                      for i in range(0, len(x), 500)])
    xte = data.load("test")[0]
    xtr = data.load("train")[0]
    f_test = feats(xte)
    res = {"n": args.n, "k": args.k,
           "fid_train_subset_vs_test": round(fid(feats(xtr[:args.n]), f_test), 3)}
    rng = np.random.RandomState(0)
    g = torch.Generator().manual_seed(0)
    abar = sched.alphas_cumprod.numpy()
    rows = []
    for name in ("gan", "vae"):
        pr = cfg["priors"][name]
        prior = sess(pr["file"], args.threads)
        z = rng.randn(args.n, *pr["latent_shape"]).astype(np.float32)
        x0 = prior.run(None, {"z": z})[0]
        t0 = time.time()
        s = args.k - 1
        x = np.sqrt(abar[s]) * x0 + np.sqrt(1 - abar[s]) * rng.randn(*x0.shape)
        x = torch.from_numpy(x.astype(np.float32))
        for t in range(s, -1, -1):
            eps = unet.run(None, {"sample": x.numpy(),
                                  "timestep": np.full(args.n, t, np.int64)})[0]
            x = sched.step(torch.from_numpy(eps), t, x, generator=g).prev_sample
        xe = x.numpy()
        res[f"fid_{name}_prior"] = round(fid(feats(x0), f_test), 3)
        res[f"fid_{name}_esddpm"] = round(fid(feats(xe), f_test), 3)
        res[f"{name}_esddpm_s"] = round(time.time() - t0, 1)
        rows += [x0[:8], xe[:8]]
        print(res, flush=True)
    common.save_grid(np.concatenate(rows), os.path.join(common.LOG_DIR, "esddpm_samples.png"))
    with open(os.path.join(common.LOG_DIR, "esddpm_demo.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
