"""Shared helpers: args, seeding, wall-clock budget, checkpoints, CSV logs, PNG grids."""
import argparse
import csv
import json
import os
import random
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LOG_DIR = os.path.join(HERE, "logs")
RUN_DIR = os.path.join(HERE, "runs")


def base_args(desc, minutes):
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--minutes", type=float, default=minutes,
                   help="total wall-clock training budget in minutes (counts time of earlier "
                        "runs when resuming)")
    p.add_argument("--resume", action="store_true", help="continue from runs/<model>.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-minutes", type=float, default=5.0, help="checkpoint period")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is measured faster than 2 while cargo builds beside us")
    return p


def setup(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    os.makedirs(LOG_DIR, exist_ok=True)
    os.makedirs(RUN_DIR, exist_ok=True)


def ckpt_path(name):
    return os.path.join(RUN_DIR, f"{name}.pt")


def save_ckpt(name, state):
    state = dict(state)
    state["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()}
    tmp = ckpt_path(name) + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_path(name))


def load_ckpt(name):
    state = torch.load(ckpt_path(name), map_location="cpu", weights_only=False)
    rng = state.get("rng")
    if rng:
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return state


class Budget:
    """Wall clock: `elapsed()` includes the time of earlier (resumed) runs.
    SIGTERM / SIGINT / SIGUSR1 end the budget early: the script then checkpoints and
    finishes normally (summary, samples)."""

    def __init__(self, minutes, prior_elapsed=0.0, ckpt_minutes=5.0):
        import signal
        self.stop = False

        def _stop(signum, frame):
            print(f"signal {signum}: stopping at the next step", flush=True)
            self.stop = True

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, _stop)
        self.limit = minutes * 60.0
        self.prior = prior_elapsed
        self.t0 = time.time()
        self.ckpt_period = ckpt_minutes * 60.0
        self.last_ckpt = self.elapsed()

    def elapsed(self):
        return self.prior + time.time() - self.t0

    def done(self):
        return self.stop or self.elapsed() >= self.limit

    def ckpt_due(self):
        if self.elapsed() - self.last_ckpt >= self.ckpt_period:
            self.last_ckpt = self.elapsed()
            return True
        return False


class CsvLog:
    def __init__(self, name, fields, resume):
        self.path = os.path.join(LOG_DIR, f"{name}.csv")
        new = not (resume and os.path.exists(self.path))
        self.f = open(self.path, "w" if new else "a", newline="")
        self.w = csv.writer(self.f)
        self.fields = fields
        if new:
            self.w.writerow(fields)
            self.f.flush()

    def row(self, **kv):
        self.w.writerow([kv.get(k, "") if not isinstance(kv.get(k), float)
                         else f"{kv[k]:.6g}" for k in self.fields])
        self.f.flush()


def write_summary(name, summary):
    path = os.path.join(LOG_DIR, f"{name}_summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2), flush=True)


def n_params(module):
    return int(sum(p.numel() for p in module.parameters()))


def save_grid(images, path, nrow=8, pad=2):
    """images: array/tensor [N,1,H,W] in [-1,1] -> grayscale PNG grid."""
    from PIL import Image
    x = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    x = np.clip((x[:, 0] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    n, h, w = x.shape
    ncol = min(nrow, n)
    nr = (n + ncol - 1) // ncol
    grid = np.full((nr * (h + pad) + pad, ncol * (w + pad) + pad), 128, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def batches(n, batch, gen):
    """Endless iterator of index batches over shuffled epochs (torch generator)."""
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield epoch, perm[i:i + batch]
        epoch += 1
