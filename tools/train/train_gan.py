"""Train a DCGAN-style generator (z 64 -> 1x32x32, tanh) with a spectral-norm discriminator
and hinge loss on Fashion-MNIST; the generator is the ES-DDPM 'gan' prior."""
import torch
import torch.nn.functional as F

import common
import data
from models import GAN_LATENT, Discriminator, Generator

NAME = "gan"


@torch.no_grad()
def recalibrate_bn(G, n_batches=20, batch=256):
    """Re-estimate BatchNorm running stats (cumulative average) so that eval-mode samples
    (what the ONNX export computes) match train-mode ones."""
    for m in G.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    G.train()
    g = torch.Generator().manual_seed(99)
    for _ in range(n_batches):
        G(torch.randn(batch, GAN_LATENT, generator=g))
    G.eval()


@torch.no_grad()
def diversity(G, real):
    """Mean per-pixel std over 256 samples, generated vs real (collapse check)."""
    was = G.training
    G.eval()
    x = G(torch.randn(256, GAN_LATENT, generator=torch.Generator().manual_seed(7)))
    G.train(was)
    return x.std(0).mean().item(), real[:256].std(0).mean().item()


def main():
    p = common.base_args(__doc__, minutes=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    args = p.parse_args()
    common.setup(args)
    xtr = torch.from_numpy(data.load("train")[0])

    G, D = Generator(), Discriminator()
    optG = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    optD = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(args.seed)
    step, prior, ema = 0, 0.0, {}
    if args.resume:
        st = common.load_ckpt(NAME)
        G.load_state_dict(st["G"]); D.load_state_dict(st["D"])
        optG.load_state_dict(st["optG"]); optD.load_state_dict(st["optD"]); gen.set_state(st["gen"])
        step, prior, ema = st["step"], st["elapsed"], st["ema"]
        print(f"resumed at step {step}, elapsed {prior:.0f}s", flush=True)
    budget = common.Budget(args.minutes, prior, args.ckpt_minutes)
    log = common.CsvLog(NAME, ["step", "elapsed_s", "epoch", "loss_d", "loss_g", "d_real",
                               "d_fake"], args.resume)
    it = common.batches(len(xtr), args.batch, gen)
    zfix = torch.randn(64, GAN_LATENT, generator=torch.Generator().manual_seed(0))

    def ckpt():
        common.save_ckpt(NAME, dict(G=G.state_dict(), D=D.state_dict(), optG=optG.state_dict(),
                                    optD=optD.state_dict(), step=step, elapsed=budget.elapsed(),
                                    gen=gen.get_state(), ema=ema))
        G.eval()
        with torch.no_grad():
            common.save_grid(G(zfix), f"{common.LOG_DIR}/gan_samples.png")
        G.train()

    epoch = 0
    G.train(); D.train()
    while not budget.done():
        epoch, idx = next(it)
        real = xtr[idx]
        if torch.rand(()) < 0.5:
            real = real.flip(3)
        # discriminator (hinge)
        with torch.no_grad():
            fake = G(torch.randn(args.batch, GAN_LATENT))
        dr, df = D(real), D(fake)
        loss_d = F.relu(1 - dr).mean() + F.relu(1 + df).mean()
        optD.zero_grad(set_to_none=True)
        loss_d.backward()
        optD.step()
        # generator
        loss_g = -D(G(torch.randn(args.batch, GAN_LATENT))).mean()
        optG.zero_grad(set_to_none=True)
        loss_g.backward()
        optG.step()
        step += 1
        for k, v in (("loss_d", loss_d.item()), ("loss_g", loss_g.item()),
                     ("d_real", dr.mean().item()), ("d_fake", df.mean().item())):
            ema[k] = 0.98 * ema[k] + 0.02 * v if k in ema else v
        if step % 50 == 0:
            log.row(step=step, elapsed_s=budget.elapsed(), epoch=epoch, **ema)
            if step % 250 == 0:
                print(f"step {step} t {budget.elapsed():.0f}s " +
                      " ".join(f"{k} {v:.3f}" for k, v in ema.items()), flush=True)
        if budget.ckpt_due():
            ckpt()
    ckpt()  # raw (train-mode BN stats) checkpoint for resuming
    log.row(step=step, elapsed_s=budget.elapsed(), epoch=epoch, **ema)
    recalibrate_bn(G)
    torch.save(G.state_dict(), f"{common.RUN_DIR}/gan_G_final.pt")
    with torch.no_grad():
        common.save_grid(G(zfix), f"{common.LOG_DIR}/gan_samples.png")
    div_fake, div_real = diversity(G, xtr)
    common.write_summary(NAME, dict(
        model=NAME, latent_dim=GAN_LATENT, steps=step, batch=args.batch,
        epochs_seen=round(step * args.batch / len(xtr), 2), wall_time_s=round(budget.elapsed(), 1),
        final={k: round(v, 4) for k, v in ema.items()},
        pixel_std_over_samples_generated=round(div_fake, 4),
        pixel_std_over_samples_real=round(div_real, 4),
        params_generator=common.n_params(G), params_discriminator=common.n_params(D),
        note="export uses runs/gan_G_final.pt (BatchNorm stats recalibrated, eval mode)"))


if __name__ == "__main__":
    main()
