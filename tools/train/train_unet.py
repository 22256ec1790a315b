"""Train the ES-DDPM U-Net: diffusers UNet2DModel (1x32x32), epsilon prediction, DDPM linear
betas 1e-4..0.02 over 1000 steps, AdamW with warm-up, EMA of the weights (exported)."""
import copy
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

import common
import data
from models import SCHEDULER_CONFIG, make_unet

NAME = "unet"


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


@torch.no_grad()
def sample(unet, n, seed=0, steps=1000):
    """Plain ancestral DDPM over all 1000 steps (variance fixed_small, clip_sample)."""
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, generator=g)
    unet.eval()
    for t in sched.timesteps:
        eps = unet(x, t.expand(n)).sample
        x = sched.step(eps, t, x, generator=g).prev_sample
    return x


def main():
    p = common.base_args(__doc__, minutes=75)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--sample-only", action="store_true",
                   help="only write logs/unet_samples.png from the checkpoint's EMA weights")
    args = p.parse_args()
    common.setup(args)

    model = make_unet()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    abar = sched.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(args.seed)
    step, prior, run = 0, 0.0, {}
    if args.resume or args.sample_only:
        st = common.load_ckpt(NAME)
        model.load_state_dict(st["model"]); ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"]); gen.set_state(st["gen"])
        step, prior, run = st["step"], st["elapsed"], st["run"]
        print(f"loaded step {step}, elapsed {prior:.0f}s", flush=True)
    if args.sample_only:
        t0 = time.time()
        x = sample(ema, args.n_samples)
        common.save_grid(x, f"{common.LOG_DIR}/unet_samples.png")
        print(f"sampled {args.n_samples} in {time.time() - t0:.0f}s", flush=True)
        return

    xtr = torch.from_numpy(data.load("train")[0])
    budget = common.Budget(args.minutes, prior, args.ckpt_minutes)
    log = common.CsvLog(NAME, ["step", "elapsed_s", "epoch", "lr", "loss", "loss_t_lt_100"],
                        args.resume)
    it = common.batches(len(xtr), args.batch, gen)

    def ckpt():
        common.save_ckpt(NAME, dict(model=model.state_dict(), ema=ema.state_dict(),
                                    opt=opt.state_dict(), step=step, elapsed=budget.elapsed(),
                                    gen=gen.get_state(), run=run, config=dict(args.__dict__)))
        torch.save(ema.state_dict(), f"{common.RUN_DIR}/unet_ema.pt")

    epoch = 0
    model.train()
    while not budget.done():
        epoch, idx = next(it)
        x0 = xtr[idx]
        flip = torch.rand(len(idx)) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        t = torch.randint(0, 1000, (len(idx),))
        eps = torch.randn_like(x0)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        per = F.mse_loss(model(xt, t).sample, eps, reduction="none").flatten(1).mean(1)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        run["loss"] = 0.99 * run["loss"] + 0.01 * loss.item() if "loss" in run else loss.item()
        low = t < 100
        if low.any():
            v = per[low].mean().item()
            run["loss_t_lt_100"] = 0.99 * run["loss_t_lt_100"] + 0.01 * v \
                if "loss_t_lt_100" in run else v
        if step % 50 == 0:
            log.row(step=step, elapsed_s=budget.elapsed(), epoch=epoch, lr=lr, **run)
            if step % 250 == 0:
                print(f"step {step} t {budget.elapsed():.0f}s epoch {epoch} " +
                      " ".join(f"{k} {v:.4f}" for k, v in run.items()), flush=True)
        if budget.ckpt_due():
            ckpt()
    ckpt()
    log.row(step=step, elapsed_s=budget.elapsed(), epoch=epoch, lr=lr, **run)
    wall = budget.elapsed()
    t0 = time.time()
    x = sample(ema, args.n_samples)
    common.save_grid(x, f"{common.LOG_DIR}/unet_samples.png")
    sample_s = time.time() - t0
    common.write_summary(NAME, dict(
        model=NAME, steps=step, batch=args.batch, lr=args.lr, warmup=args.warmup,
        ema_decay=args.ema, epochs_seen=round(step * args.batch / len(xtr), 2),
        wall_time_s=round(wall, 1),
        final_loss_ema=round(run.get("loss", float("nan")), 5),
        final_loss_t_lt_100_ema=round(run.get("loss_t_lt_100", float("nan")), 5),
        params=common.n_params(model),
        samples_png=f"logs/unet_samples.png ({args.n_samples} samples, 1000-step DDPM, EMA)",
        sampling_s=round(sample_s, 1)))


if __name__ == "__main__":
    main()
