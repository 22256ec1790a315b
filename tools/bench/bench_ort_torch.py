"""U-Net forwards in ONNX Runtime or PyTorch, one configuration per process, for the
benchmark against esddpm/tract (issue 6). Prints one JSON line on stdout with the same
fields as `cargo bench --bench unet_forward` (median/min of REPS forwards after warm-up,
CPU cores busy in the timed loop, peak RSS, load-to-first-step time and its parts).

    bench_ort_torch.py forward --runtime ort|torch --model cifar|fashion
        --batch B --threads T --reps R [--warmup 2] [--t 500] [--input F] [--output F]
    bench_ort_torch.py ddpm-pipeline --batch B --threads T [--steps 1000] [--rounds 1]

ONNX Runtime: the same ONNX file as tract (target/bench/cifar_unet.onnx or
models/fashion/unet.onnx), CPUExecutionProvider, intra_op_num_threads = T,
inter_op_num_threads = 1, default graph optimisations. PyTorch: the same weights
(target/bench/cifar_unet.pt, or for the shipped U-Net tools/train/runs/unet_ema.pt or the ONNX
file's own weights) in diffusers' UNet2DModel,
torch.set_num_threads(T), eval(), no_grad(). `--input`/`--output`: little-endian f32 files
of the sample / the first forward's output (for the numerics check of the driver).

`ddpm-pipeline`: images per second of diffusers' DDPMPipeline on PyTorch CPU, STEPS
DDPM steps from noise with the shipped U-Net's weights and scheduler config.
"""
import argparse
import json
import os
import resource
import sys
import time

T_MAIN = time.perf_counter()

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
BENCH = os.path.join(ROOT, "target", "bench")
MODELS = {
    # name: (onnx, shape [C, H, W])
    "cifar": (os.path.join(BENCH, "cifar_unet.onnx"), (3, 32, 32)),
    "fashion": (os.path.join(ROOT, "models", "fashion", "unet.onnx"), (1, 32, 32)),
}


def cpu_time():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_status_mb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    if field == "VmHWM:":  # ru_maxrss is in KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    return float("nan")


def torch_unet(model):
    import torch
    sys.path.insert(0, HERE)
    import export_unets
    if model == "cifar":
        from diffusers import UNet2DModel
        unet = UNet2DModel(**export_unets.CIFAR_CONFIG)
        unet.load_state_dict(torch.load(os.path.join(BENCH, "cifar_unet.pt"), weights_only=True))
    else:
        unet = export_unets.fashion_unet()
    return unet.eval()


def forward(args):
    import numpy as np
    if args.runtime == "ort":
        import onnxruntime as ort
    else:
        import torch
        import diffusers  # noqa: F401
    # Interpreter start-up and imports, not in load_to_first_step_s.
    import_s = time.perf_counter() - T_MAIN
    path, (c, h, w) = MODELS[args.model]
    n = args.batch
    if args.input:
        x = np.fromfile(args.input, dtype="<f4")
        assert x.size == n * c * h * w, f"{args.input}: {x.size} values"
        x = x.reshape(n, c, h, w)
    else:
        x = np.random.RandomState(0).randn(n, c, h, w).astype(np.float32)
    t = np.full((n,), args.t, dtype=np.int64)

    t_load = time.perf_counter()
    if args.runtime == "ort":
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = {"sample": x, "timestep": t}
        load_s = time.perf_counter() - t_load

        def run():
            return sess.run(None, feed)[0]
        version = ort.__version__
    else:
        torch.set_num_threads(args.threads)
        unet = torch_unet(args.model)
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        load_s = time.perf_counter() - t_load

        def run():
            with torch.no_grad():
                return unet(xt, tt).sample.numpy()
        version = torch.__version__

    t0 = time.perf_counter()
    out = run()
    first_run_s = time.perf_counter() - t0
    load_to_first_step_s = time.perf_counter() - t_load
    if args.output:
        np.ascontiguousarray(out, dtype="<f4").tofile(args.output)
    for _ in range(args.warmup):
        run()
    times = []
    wall0, cpu0 = time.perf_counter(), cpu_time()
    for _ in range(args.reps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    wall, cpu = time.perf_counter() - wall0, cpu_time() - cpu0
    return {
        "mode": "forward", "runtime": args.runtime, "version": version,
        "model": args.model, "batch": n, "threads": args.threads, "reps": args.reps,
        "warmup": args.warmup,
        "median_ms": float(np.median(times)), "min_ms": min(times),
        "mean_ms": sum(times) / len(times), "max_ms": max(times),
        "cpu_cores": cpu / wall,
        "peak_rss_mb": proc_status_mb("VmHWM:"), "rss_mb": proc_status_mb("VmRSS:"),
        "import_s": import_s, "load_s": load_s, "first_run_s": first_run_s,
        "load_to_first_step_s": load_to_first_step_s, "times_ms": times,
    }


def ddpm_pipeline(args):
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler
    torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    unet = torch_unet("fashion")
    sched = DDPMScheduler.from_pretrained(os.path.join(ROOT, "models", "fashion"))
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t_load
    # Warm-up: a 2-step call at this batch.
    pipe(batch_size=args.batch, num_inference_steps=2, output_type="np",
         generator=torch.Generator().manual_seed(999))
    times = []
    wall0, cpu0 = time.perf_counter(), cpu_time()
    for r in range(args.rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(batch_size=args.batch, num_inference_steps=args.steps, output_type="np",
                 generator=torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - t0)
    wall, cpu = time.perf_counter() - wall0, cpu_time() - cpu0
    images = args.batch * args.rounds
    return {
        "mode": "e2e", "runtime": "diffusers-torch", "pipeline": f"ddpm{args.steps}",
        "unet_steps": args.steps, "batch": args.batch, "threads": args.threads,
        "rounds": args.rounds, "images": images, "images_per_s": images / wall,
        "s_per_image": wall / images, "s_per_call": times, "cpu_cores": cpu / wall,
        "load_s": load_s, "peak_rss_mb": proc_status_mb("VmHWM:"),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("forward")
    f.add_argument("--runtime", choices=["ort", "torch"], required=True)
    f.add_argument("--model", choices=list(MODELS), required=True)
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--reps", type=int, default=10)
    f.add_argument("--warmup", type=int, default=2)
    f.add_argument("--t", type=int, default=500)
    f.add_argument("--input")
    f.add_argument("--output")
    d = sub.add_parser("ddpm-pipeline")
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    res = forward(args) if args.cmd == "forward" else ddpm_pipeline(args)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
