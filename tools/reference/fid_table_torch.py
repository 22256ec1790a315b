"""The README's FID table, computed independently of esddpm: PyTorch + diffusers'
schedulers, from the training checkpoints (the weights that models/fashion/ was exported
from), on a GPU if there is one (seconds there; hours on this project's 2-core CPU).

It cross-checks `esddpm eval` (same rows, same N, same FID definition: the shipped
classifier's 128-d penultimate features, unbiased covariances, Frechet distance) with a
different implementation and different random numbers, so the two tables agree to within
the FID's sampling noise, not bit for bit.

  python tools/reference/fid_table_torch.py --n 2000 --out tools/reference/fid_table_torch.json

Checkpoints: tools/train/runs/{unet_ema,gan_G_final,vae,classifier}.pt (made by
tools/train/run_all.sh; not committed), or a folder of slim state dicts made with
--export-weights DIR (what travels to a lent GPU machine).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "train"))
import data  # noqa: E402
import models  # noqa: E402


def load_weights(args):
    """(unet, {prior name: module}, classifier) on args.device, eval mode."""
    run = os.path.join(HERE, "..", "train", "runs")
    if args.weights:
        sd = {k: torch.load(os.path.join(args.weights, f"{k}.pt"), map_location="cpu")
              for k in ("unet", "gan", "vae", "classifier")}
    else:
        ld = lambda n: torch.load(os.path.join(run, n), map_location="cpu", weights_only=False)  # noqa
        sd = {"unet": ld("unet_ema.pt"), "gan": ld("gan_G_final.pt"),
              "vae": ld("vae.pt")["dec"], "classifier": ld("classifier.pt")["model"]}
    if args.export_weights:
        os.makedirs(args.export_weights, exist_ok=True)
        for k, v in sd.items():
            torch.save(v, os.path.join(args.export_weights, f"{k}.pt"))
    unet = models.make_unet()
    unet.load_state_dict(sd["unet"])
    gan, vae, clf = models.Generator(), models.VAEDecoder(), models.Classifier()
    gan.load_state_dict(sd["gan"])
    vae.load_state_dict(sd["vae"])
    clf.load_state_dict(sd["classifier"])
    mods = [m.to(args.device).eval() for m in (unet, gan, vae, clf)]
    return mods[0], {"gan": mods[1], "vae": mods[2]}, mods[3]


def frechet(f1, f2):
    """|mu1-mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), unbiased covariances, f64."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ev = np.linalg.eigvals(c1 @ c2)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2)
                 - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())


class Sampler:
    """The reverse processes of the table, with diffusers' DDPMScheduler for the DDPM
    chains and the DDIM update written out (its previous timestep is the next entry of
    the run, as in esddpm; diffusers' DDIMScheduler would use t - T/steps)."""

    def __init__(self, unet, device, gen):
        from diffusers import DDPMScheduler
        self.unet, self.device, self.gen = unet, device, gen
        self.cfg = dict(models.SCHEDULER_CONFIG)
        self.T = self.cfg["num_train_timesteps"]
        self.DDPMScheduler = DDPMScheduler
        self.abar = DDPMScheduler(**self.cfg).alphas_cumprod.to(device)

    @torch.no_grad()
    def eps(self, x, t):
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=self.device)
        return self.unet(x, tt).sample

    def noise(self, shape):
        return torch.randn(shape, generator=self.gen, device=self.device)

    @torch.no_grad()
    def ddpm(self, x, steps, start_index=None):
        """DDPM ancestral steps: from noise with `steps` diffusers steps ("leading"), or
        from x at start_index down to 0 through every step of the chain."""
        s = self.DDPMScheduler(**self.cfg)
        if start_index is None:
            s.set_timesteps(steps, device=self.device)
            ts = s.timesteps
        else:
            s.set_timesteps(self.T, device=self.device)
            ts = s.timesteps[self.T - 1 - start_index:]
        for t in ts:
            x = s.step(self.eps(x, t), t, x, generator=self.gen).prev_sample
        return x

    @torch.no_grad()
    def ddim(self, x, ts):
        """DDIM, eta 0, clipped x0, over the timesteps `ts` (descending); the last step
        goes to abar = 1."""
        for i, t in enumerate(ts):
            a = self.abar[t]
            a_prev = self.abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            e = self.eps(x, t)
            x0 = ((x - (1 - a).sqrt() * e) / a.sqrt()).clamp(-1, 1)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        return x


def rows():
    out = [("gan", "prior", "gan", None), ("vae", "prior", "vae", None),
           ("ddpm-1000", "ddpm", None, 1000), ("ddpm-100", "ddpm", None, 100),
           ("ddim-10", "ddim", None, 10), ("ddim-50", "ddim", None, 50)]
    for p in ("gan", "vae"):
        for tp in (50, 100, 200, 300):
            out += [(f"es-{p}-ddpm-{tp}", "es-ddpm", p, tp),
                    (f"es-{p}-ddim10-{tp}", "es-ddim10", p, tp)]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="", help="comma-separated ids (default: all)")
    ap.add_argument("--weights", help="folder of slim state dicts (see --export-weights)")
    ap.add_argument("--export-weights", help="write slim state dicts here")
    ap.add_argument("--data", default=data.DATA_DIR)
    ap.add_argument("--out", default=os.path.join(HERE, "fid_table_torch.json"))
    args = ap.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    unet, priors, clf = load_weights(args)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    sm = Sampler(unet, args.device, gen)

    @torch.no_grad()
    def feats(x):
        return np.concatenate([clf(x[i:i + 1000].to(args.device))[1].cpu().numpy()
                               for i in range(0, len(x), 1000)])

    xte = torch.from_numpy(data.load("test", args.data)[0])
    f_test = feats(xte)
    wanted = set(filter(None, args.rows.split(",")))
    results = []
    for rid, kind, prior, k in rows():
        if wanted and rid not in wanted:
            continue
        t0 = time.time()
        imgs = []
        for b0 in range(0, args.n, args.batch):
            b = min(args.batch, args.n - b0)
            shape = (b, 1, 32, 32)
            if kind == "prior" or kind.startswith("es-"):
                d = models.GAN_LATENT if prior == "gan" else models.VAE_LATENT
                with torch.no_grad():
                    x0 = priors[prior](sm.noise((b, d)))
            if kind == "prior":
                x, calls = x0, 0
            elif kind == "ddpm":
                x, calls = sm.ddpm(sm.noise(shape), k), k
            elif kind == "ddim":
                # diffusers "leading" spacing: t = (0..k) * (T // k), descending
                ts = [int(v) for v in (np.arange(k) * (sm.T // k))[::-1]]
                x, calls = sm.ddim(sm.noise(shape), ts), k
            else:
                a = sm.abar[k - 1]
                xt = a.sqrt() * x0 + (1 - a).sqrt() * sm.noise(shape)
                if kind == "es-ddpm":
                    x, calls = sm.ddpm(xt, None, start_index=k - 1), k
                else:
                    ts = [int(v) for v in np.round(np.linspace(0, k - 1, 10))[::-1]]
                    x, calls = sm.ddim(xt, ts), 10
            imgs.append(x.clamp(-1, 1).cpu())
        if args.device == "cuda":
            torch.cuda.synchronize()
        secs = time.time() - t0
        fid = frechet(feats(torch.cat(imgs)), f_test)
        results.append(dict(id=rid, unet_calls=calls, fid=round(fid, 3), seconds=round(secs, 2)))
        print(json.dumps(results[-1]), flush=True)
    doc = dict(n=args.n, seed=args.seed, device=args.device,
               torch=torch.__version__, rows=results)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
