"""Train the small Fashion-MNIST CNN whose 128-d penultimate layer is the FID feature space."""
import time

import torch
import torch.nn.functional as F

import common
import data
from models import Classifier

NAME = "classifier"


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), 1000):
        logits, _ = model(x[i:i + 1000])
        loss += F.cross_entropy(logits, y[i:i + 1000], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + 1000]).sum().item()
    model.train()
    return correct / len(x), loss / len(x)


def main():
    p = common.base_args(__doc__, minutes=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    common.setup(args)
    xtr, ytr = map(torch.from_numpy, data.load("train"))
    xte, yte = map(torch.from_numpy, data.load("test"))

    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    step, prior = 0, 0.0
    if args.resume:
        st = common.load_ckpt(NAME)
        model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"])
        step, prior = st["step"], st["elapsed"]
        gen.set_state(st["gen"])
        print(f"resumed at step {step}, elapsed {prior:.0f}s", flush=True)
    budget = common.Budget(args.minutes, prior, args.ckpt_minutes)
    log = common.CsvLog(NAME, ["step", "elapsed_s", "epoch", "loss", "test_acc", "test_loss"],
                        args.resume)
    it = common.batches(len(xtr), args.batch, gen)

    def ckpt():
        common.save_ckpt(NAME, dict(model=model.state_dict(), opt=opt.state_dict(), step=step,
                                    elapsed=budget.elapsed(), gen=gen.get_state(),
                                    run_loss=run_loss))

    run_loss, epoch = (st.get("run_loss", 0.0) if args.resume else 0.0), 0
    model.train()
    while not budget.done():
        epoch, idx = next(it)
        logits, _ = model(xtr[idx])
        loss = F.cross_entropy(logits, ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        run_loss = 0.98 * run_loss + 0.02 * loss.item() if run_loss else loss.item()
        if step % 100 == 0:
            acc, tl = ("", "")
            if step % 500 == 0:
                acc, tl = evaluate(model, xte, yte)
                print(f"step {step} loss {run_loss:.4f} test_acc {acc:.4f}", flush=True)
            log.row(step=step, elapsed_s=budget.elapsed(), epoch=epoch, loss=run_loss,
                    test_acc=acc, test_loss=tl)
        if budget.ckpt_due():
            ckpt()
    ckpt()
    acc, tl = evaluate(model, xte, yte)
    log.row(step=step, elapsed_s=budget.elapsed(), epoch=epoch, loss=run_loss, test_acc=acc,
            test_loss=tl)
    common.write_summary(NAME, dict(model=NAME, steps=step, batch=args.batch,
                                    epochs_seen=round(step * args.batch / len(xtr), 2),
                                    wall_time_s=round(budget.elapsed(), 1),
                                    final_train_loss_ema=round(run_loss, 5),
                                    test_loss=round(tl, 5), test_accuracy=round(acc, 4),
                                    params=common.n_params(model), feature_dim=128))


if __name__ == "__main__":
    main()
