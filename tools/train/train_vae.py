"""Train a conv VAE (latent 16) on Fashion-MNIST; its decoder is the ES-DDPM 'vae' prior."""
import torch

import common
import data
from models import VAE_LATENT, VAEDecoder, VAEEncoder

NAME = "vae"


def main():
    p = common.base_args(__doc__, minutes=12)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sigma", type=float, default=0.2,
                   help="Gaussian likelihood std on the [-1,1] pixel scale")
    args = p.parse_args()
    common.setup(args)
    xtr = torch.from_numpy(data.load("train")[0])
    xte = torch.from_numpy(data.load("test")[0])

    enc, dec = VAEEncoder(), VAEDecoder()
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    step, prior, ema = 0, 0.0, {}
    if args.resume:
        st = common.load_ckpt(NAME)
        enc.load_state_dict(st["enc"]); dec.load_state_dict(st["dec"])
        opt.load_state_dict(st["opt"]); gen.set_state(st["gen"])
        step, prior, ema = st["step"], st["elapsed"], st["ema"]
        print(f"resumed at step {step}, elapsed {prior:.0f}s", flush=True)
    budget = common.Budget(args.minutes, prior, args.ckpt_minutes)
    log = common.CsvLog(NAME, ["step", "elapsed_s", "epoch", "loss", "recon_mse", "kl"],
                        args.resume)
    it = common.batches(len(xtr), args.batch, gen)
    inv2s2 = 1.0 / (2 * args.sigma ** 2)

    def losses(x):
        mu, logvar = enc(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        xh = dec(z)
        mse = ((xh - x) ** 2).flatten(1).sum(1)
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
        return (mse * inv2s2 + kl).mean(), mse.mean() / x[0].numel(), kl.mean()

    def ckpt():
        common.save_ckpt(NAME, dict(enc=enc.state_dict(), dec=dec.state_dict(),
                                    opt=opt.state_dict(), step=step, elapsed=budget.elapsed(),
                                    gen=gen.get_state(), ema=ema))

    epoch = 0
    while not budget.done():
        epoch, idx = next(it)
        x = xtr[idx]
        if torch.rand(()) < 0.5:
            x = x.flip(3)
        loss, mse, kl = losses(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        for k, v in (("loss", loss.item()), ("recon_mse", mse.item()), ("kl", kl.item())):
            ema[k] = 0.98 * ema[k] + 0.02 * v if k in ema else v
        if step % 100 == 0:
            log.row(step=step, elapsed_s=budget.elapsed(), epoch=epoch, **ema)
            if step % 500 == 0:
                print(f"step {step} " + " ".join(f"{k} {v:.4f}" for k, v in ema.items()),
                      flush=True)
        if budget.ckpt_due():
            ckpt()
    ckpt()
    log.row(step=step, elapsed_s=budget.elapsed(), epoch=epoch, **ema)
    enc.eval(); dec.eval()
    with torch.no_grad():
        torch.manual_seed(1234)
        tl, tm, tk = [], [], []
        for i in range(0, len(xte), 1000):
            a, b, c = losses(xte[i:i + 1000]); tl.append(a.item()); tm.append(b.item()); tk.append(c.item())
        samples = dec(torch.randn(64, VAE_LATENT, generator=torch.Generator().manual_seed(0)))
        common.save_grid(samples, f"{common.LOG_DIR}/vae_samples.png")
    n = len(tl)
    common.write_summary(NAME, dict(
        model=NAME, latent_dim=VAE_LATENT, sigma=args.sigma, steps=step, batch=args.batch,
        epochs_seen=round(step * args.batch / len(xtr), 2), wall_time_s=round(budget.elapsed(), 1),
        final_train={k: round(v, 5) for k, v in ema.items()},
        test_neg_elbo_nats=round(sum(tl) / n, 3), test_recon_mse=round(sum(tm) / n, 5),
        test_kl=round(sum(tk) / n, 3),
        params_encoder=common.n_params(enc), params_decoder=common.n_params(dec)))


if __name__ == "__main__":
    main()
