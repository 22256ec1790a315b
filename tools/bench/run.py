"""The U-Net benchmark of issue 6 in one command: esddpm (tract) against ONNX Runtime and
PyTorch on the same ONNX file, weights and inputs. Run through tools/bench/run.sh.

1. Exports the ddpm-cifar10-architecture U-Net if missing (export_unets.py) and builds
   the bench binary (`cargo bench --bench unet_forward --no-run`).
2. Forward cells: both U-Nets x batch 1 and 8 x threads 1 and 2; in every cell ONNX
   Runtime, PyTorch and tract each run in a fresh process, one after the other (the
   order rotates from cell to cell), on the same seeded input. tract's and PyTorch's
   outputs are compared with ONNX Runtime's (max abs diff; must be <= 1e-4).
3. Profile: tract's optimised plan timed per node and aggregated by operator type
   (both U-Nets, batch 1 and 8, one thread).
4. End to end on the shipped Fashion-MNIST models: images per second of ES-DDPM
   (T' = 100: 100 DDPM steps, 10 DDIM steps) and of the 1000-step DDPM from noise in
   esddpm, and of diffusers' DDPMPipeline (1000 steps, PyTorch CPU, same weights).

Writes target/bench/results.json and target/bench/results.md (also printed).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "target", "bench")
IO = os.path.join(OUT, "io")
TOL = 1e-4
MODELS = {
    # name: (label, onnx path, [C, H, W])
    "cifar": ("ddpm-cifar10 arch", os.path.join(OUT, "cifar_unet.onnx"), (3, 32, 32)),
    "fashion": ("shipped Fashion-MNIST", os.path.join(ROOT, "models", "fashion", "unet.onnx"),
                (1, 32, 32)),
}
# Timed forwards per configuration (>= 10), after 2 warm-up forwards.
REPS = {("cifar", 1): 20, ("cifar", 8): 10, ("fashion", 1): 50, ("fashion", 8): 20}
PROFILE_REPS = {("cifar", 1): 5, ("cifar", 8): 3, ("fashion", 1): 20, ("fashion", 8): 10}
LOG = None


def log(*a):
    msg = " ".join(str(x) for x in a)
    print(msg, file=sys.stderr, flush=True)
    if LOG:
        LOG.write(msg + "\n")
        LOG.flush()


def run_json(cmd, env_threads=None, timeout=1800):
    """Runs cmd in a fresh process; returns the last JSON line of its stdout."""
    env = dict(os.environ)
    if env_threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(env_threads)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if LOG:
        LOG.write(f"$ {' '.join(cmd)}\n{p.stderr}\n")
    if p.returncode != 0:
        log(f"FAILED ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
        return None
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        log(f"no JSON from {' '.join(cmd)}")
        return None
    res = json.loads(lines[-1])
    res["process_wall_s"] = time.time() - t0
    return res


def build_bench():
    cmd = ["cargo", "bench", "--bench", "unet_forward", "--no-run", "--message-format=json"]
    log("$", " ".join(cmd))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"cargo bench --no-run failed:\n{p.stderr[-4000:]}")
    exe = None
    for line in p.stdout.splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("executable") and \
                m.get("target", {}).get("name") == "unet_forward":
            exe = m["executable"]
    if not exe:
        sys.exit("could not find the unet_forward bench executable")
    return exe


def input_file(model, batch):
    c, h, w = MODELS[model][2]
    path = os.path.join(IO, f"{model}_b{batch}_input.f32")
    x = np.random.RandomState(1000 + batch).randn(batch, c, h, w).astype("<f4")
    x.tofile(path)
    return path


def max_diff(a, b):
    x, y = np.fromfile(a, dtype="<f4"), np.fromfile(b, dtype="<f4")
    if x.shape != y.shape:
        return float("inf")
    return float(np.abs(x - y).max())


def forward_cells(args, exe, py, fashion_torch):
    results = []
    cell_ix = 0
    for model in args.models:
        label, onnx, (c, h, w) = MODELS[model]
        for batch in args.batches:
            inp = input_file(model, batch)
            reps = args.reps or REPS[(model, batch)]
            for threads in args.threads:
                cell = {"model": model, "label": label, "batch": batch, "threads": threads,
                        "reps": reps, "rounds": []}
                for rnd in range(args.rounds):
                    # "esddpm": esddpm's own batch path (batch-1 forwards, images split
                    # across OS threads, as Session::step runs them; a lone image on
                    # one thread when the U-Net is too small for threads to pay).
                    peers = ["ort", "torch", "tract", "esddpm"]
                    k = (cell_ix + rnd) % len(peers)
                    peers = peers[k:] + peers[:k]
                    got = {}
                    for rt in peers:
                        outp = os.path.join(IO, f"{model}_b{batch}_t{threads}_{rt}.f32")
                        if rt in ("tract", "esddpm"):
                            cmd = [exe, "forward", onnx, str(c), str(h), str(w), str(batch),
                                   str(threads), str(reps), "--input", inp, "--output", outp]
                            if rt == "esddpm":
                                cmd += ["--path", "per-image"]
                        elif rt == "torch" and model == "fashion" and not fashion_torch:
                            continue
                        else:
                            cmd = [py, os.path.join(HERE, "bench_ort_torch.py"), "forward",
                                   "--runtime", rt, "--model", model, "--batch", str(batch),
                                   "--threads", str(threads), "--reps", str(reps),
                                   "--input", inp, "--output", outp]
                        r = run_json(cmd, env_threads=threads)
                        if r:
                            r["output_file"] = outp
                            got[rt] = r
                            log(f"  {model} b{batch} t{threads} {rt:5s}: median "
                                f"{r['median_ms']:9.2f} ms, cpu {r['cpu_cores']:.2f}, "
                                f"peak RSS {r['peak_rss_mb']:.0f} MB, load-to-first "
                                f"{r['load_to_first_step_s']:.2f} s")
                    if "ort" in got:
                        ref = got["ort"]["output_file"]
                        for rt in ("tract", "torch", "esddpm"):
                            if rt in got:
                                got[rt]["max_abs_diff_vs_ort"] = max_diff(
                                    got[rt]["output_file"], ref)
                    for r in got.values():
                        r.pop("times_ms", None)
                    cell["rounds"].append(got)
                cell_ix += 1
                summarise_cell(cell)
                results.append(cell)
    return results


def summarise_cell(cell):
    """Median over rounds of each peer's median (one round: that round's numbers)."""
    s = {}
    for rt in ("ort", "torch", "tract", "esddpm"):
        rs = [r[rt] for r in cell["rounds"] if rt in r]
        if not rs:
            continue
        keys = [k for k, v in rs[0].items() if isinstance(v, (int, float))]
        s[rt] = {k: float(np.median([r[k] for r in rs if k in r])) for k in keys}
    if "ort" in s and "tract" in s:
        ratios = [r["tract"]["median_ms"] / r["ort"]["median_ms"] for r in cell["rounds"]
                  if "ort" in r and "tract" in r]
        s["tract_over_ort"] = float(np.median(ratios))
        s["tract_over_ort_per_round"] = ratios
    # The path esddpm takes: per-image for batch > 1, the batch-1 plan otherwise.
    best = "esddpm" if "esddpm" in s else "tract"
    if "ort" in s and best in s:
        s["esddpm_path"] = best
        s["esddpm_over_ort"] = float(np.median(
            [r[best]["median_ms"] / r["ort"]["median_ms"] for r in cell["rounds"]
             if "ort" in r and best in r]))
    cell["summary"] = s


def starts(args, exe):
    """Start-up of each U-Net at batch 1, one thread, each in a fresh process: without the
    plan cache, with it on a first start (empty cache: parse, optimise, save) and on a
    second start (from the cache); load-to-first-step, its parts, and peak RSS."""
    out = []
    for model in args.models:
        _, onnx, (c, h, w) = MODELS[model]
        rows = {"none": [], "first": [], "second": []}
        for rnd in range(args.rounds):
            cache = tempfile.mkdtemp(prefix="esddpm_plan_cache_")
            try:
                for kind in ("none", "first", "second"):
                    cmd = [exe, "forward", onnx, str(c), str(h), str(w), "1", "1", "3"]
                    if kind != "none":
                        cmd += ["--plan-cache", cache]
                    r = run_json(cmd, env_threads=1)
                    if r:
                        r.pop("times_ms", None)
                        rows[kind].append(r)
                        log(f"  start {model} {kind:6s}: load-to-first "
                            f"{r['load_to_first_step_s']:.3f} s (parse {r['parse_s']:.3f}, "
                            f"optimise {r['optimise_s']:.3f}, first run "
                            f"{r['first_run_s']:.3f}), peak RSS {r['peak_rss_mb']:.0f} MB")
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        summary = {}
        for kind, rs in rows.items():
            if rs:
                keys = ["load_to_first_step_s", "parse_s", "optimise_s", "first_run_s",
                        "peak_rss_mb", "weights_mb"]
                summary[kind] = {k: float(np.median([r[k] for r in rs])) for k in keys}
        out.append({"model": model, "label": MODELS[model][0], "runs": rows,
                    "summary": summary})
    return out


def profiles(args, exe):
    out = []
    for model in args.models:
        _, onnx, (c, h, w) = MODELS[model]
        for batch in args.batches:
            reps = PROFILE_REPS[(model, batch)] if not args.quick else 2
            r = run_json([exe, "profile", onnx, str(c), str(h), str(w), str(batch), str(reps)],
                         env_threads=1)
            if r:
                log(f"  profile {model} b{batch}: {r['plain_median_ms']:.1f} ms, conv "
                    f"{r['conv_gflops']:.1f} GFLOP/s")
                out.append(r)
    return out


def e2e(args, exe, py, fashion_torch):
    folder = os.path.join(ROOT, "models", "fashion")
    b, th = args.e2e_batch, args.e2e_threads
    q = args.quick
    runs = [("es-ddpm100", 1 if q else 2), ("es-ddim10", 2 if q else 10),
            ("ddpm1000", 1)]
    out = []
    for mode, rounds in runs:
        if q and mode == "ddpm1000":
            continue
        r = run_json([exe, "e2e", folder, mode, str(b), str(th), str(rounds)], env_threads=th)
        if r:
            log(f"  e2e esddpm {mode}: {r['images_per_s']:.3f} images/s")
            out.append(r)
    if fashion_torch:
        steps = 20 if q else 1000
        r = run_json([py, os.path.join(HERE, "bench_ort_torch.py"), "ddpm-pipeline",
                      "--batch", str(b), "--threads", str(th), "--steps", str(steps)],
                     env_threads=th)
        if r:
            log(f"  e2e diffusers DDPMPipeline {steps} steps: {r['images_per_s']:.3f} images/s")
            out.append(r)
    return out


def fid_table():
    path = os.path.join(ROOT, "tools", "reference", "fid_table_torch.json")
    try:
        with open(path) as f:
            d = json.load(f)
        return {r["id"]: r["fid"] for r in d["rows"]}, d.get("n")
    except (OSError, ValueError, KeyError):
        return {}, None


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(res):
    L = []
    m = res["machine"]
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores; {m['when']}; "
             f"rounds per cell: {res['args']['rounds']}.")
    L.append("")
    L.append("tract batched = one forward of the batch's plan on tract's executor; esddpm "
             "path = what esddpm runs (`Unet::run_images`, as `Session::step`): batch-1 "
             "forwards, the images split across the threads as OS threads; a lone image on "
             "tract's executor from one of its pool threads, another spinning, or, when "
             "the U-Net is under 2 GFLOP "
             "(`Unet::threads_pay_at_batch_1`), with tract on one thread and esddpm's own "
             "operators on the threads (`esddpm::op_threads`).")
    L.append("")
    L.append("| U-Net | batch | threads | ORT ms | PyTorch ms | tract batched ms | tract/ORT | "
             "esddpm path ms | esddpm path / ORT | esddpm CPU use (cores) | "
             "tract peak RSS MB (weights MB) | tract load-to-first-step s |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in res["cells"]:
        s = c["summary"]
        o, p, t = s.get("ort", {}), s.get("torch", {}), s.get("tract", {})
        e = s.get(s.get("esddpm_path", "tract"), {})
        L.append(
            f"| {c['label']} | {c['batch']} | {c['threads']} | {fmt(o.get('median_ms'), '.1f')} "
            f"| {fmt(p.get('median_ms'), '.1f')} | {fmt(t.get('median_ms'), '.1f')} | "
            f"{fmt(s.get('tract_over_ort'), '.2f')}x | {fmt(e.get('median_ms'), '.1f')} | "
            f"{fmt(s.get('esddpm_over_ort'), '.2f')}x | {fmt(e.get('cpu_cores'), '.2f')} | "
            f"{fmt(t.get('peak_rss_mb'), '.0f')} ({fmt(t.get('weights_mb'), '.0f')}) | "
            f"{fmt(t.get('load_to_first_step_s'), '.2f')} |")
    L.append("")
    L.append("Peers and checks (same cells): min ms, CPU use, peak RSS, load-to-first-step "
             "(ORT: session creation + first run; PyTorch: model build + weights + first run; "
             "interpreter and imports not counted), max abs diff of the output vs ORT's.")
    L.append("")
    L.append("| U-Net | batch | threads | min ms ORT / PyTorch / tract | CPU cores ORT / "
             "PyTorch | peak RSS MB ORT / PyTorch | load-to-first s ORT / PyTorch | "
             "tract parse / optimise / first run s | max abs diff tract / PyTorch vs ORT |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for c in res["cells"]:
        s = c["summary"]
        o, p, t = s.get("ort", {}), s.get("torch", {}), s.get("tract", {})
        L.append(
            f"| {c['label']} | {c['batch']} | {c['threads']} | {fmt(o.get('min_ms'), '.1f')} / "
            f"{fmt(p.get('min_ms'), '.1f')} / {fmt(t.get('min_ms'), '.1f')} | "
            f"{fmt(o.get('cpu_cores'), '.2f')} / {fmt(p.get('cpu_cores'), '.2f')} | "
            f"{fmt(o.get('peak_rss_mb'), '.0f')} / {fmt(p.get('peak_rss_mb'), '.0f')} | "
            f"{fmt(o.get('load_to_first_step_s'), '.2f')} / "
            f"{fmt(p.get('load_to_first_step_s'), '.2f')} | "
            f"{fmt(t.get('parse_s'), '.2f')} / {fmt(t.get('optimise_s'), '.2f')} / "
            f"{fmt(t.get('first_run_s'), '.2f')} | "
            f"{fmt(t.get('max_abs_diff_vs_ort'), '.1e')} / "
            f"{fmt(p.get('max_abs_diff_vs_ort'), '.1e')} |")
    if res.get("numerics_ok") is not None:
        L.append("")
        L.append(f"Numerics: tract vs ONNX Runtime max abs diff {res['numerics_max_diff']:.2e} "
                 f"over all cells ({'OK' if res['numerics_ok'] else 'FAIL'}, limit {TOL}).")
    if res.get("starts"):
        L.append("")
        L.append("Start-up, batch 1, one thread, each a fresh process (`unet_forward forward "
                 "... --plan-cache DIR`): without the plan cache; with it on a first start "
                 "(empty: parse, optimise, save the decluttered model) and on a second start "
                 "(from the cache). Load-to-first-step = read/hash + parse + optimise + the "
                 "first forward.")
        L.append("")
        L.append("| U-Net | start | load-to-first-step s | parse (or hash) / optimise / "
                 "first run s | peak RSS MB | peak RSS / weights |")
        L.append("|---|---|---|---|---|---|")
        names = {"none": "no cache", "first": "cache, first start",
                 "second": "cache, second start"}
        for st in res["starts"]:
            for kind, v in st["summary"].items():
                L.append(f"| {st['label']} | {names[kind]} | {v['load_to_first_step_s']:.2f} | "
                         f"{v['parse_s']:.2f} / {v['optimise_s']:.2f} / "
                         f"{v['first_run_s']:.2f} | {v['peak_rss_mb']:.0f} | "
                         f"{v['peak_rss_mb'] / v['weights_mb']:.2f}x |")
    if res.get("profiles"):
        L.append("")
        L.append("Profile of tract's optimised plan, one thread (`unet_forward profile`): "
                 "time per operator type (sum of per-node times, mean of the profiled "
                 "forwards), GFLOP as tract counts them (2 per FMA), GFLOP/s of the matmul "
                 "kernels.")
        for pr in res["profiles"]:
            label = MODELS.get("cifar" if pr["model"] == "cifar_unet" else "fashion")[0]
            L.append("")
            L.append(f"**{label}, batch {pr['batch']}**: {pr['plain_median_ms']:.1f} ms per "
                     f"forward unprofiled ({pr['profiled_median_ms']:.1f} ms profiled), "
                     f"{pr['model_gflop']:.2f} GFLOP, {pr['whole_model_gflops']:.1f} GFLOP/s "
                     f"over the whole forward, {pr['conv_gflops']:.1f} GFLOP/s inside the "
                     "conv/linear matmuls.")
            L.append("")
            L.append("| operator type | nodes | ms | share | GFLOP | GFLOP/s |")
            L.append("|---|---|---|---|---|---|")
            cats = sorted(pr["categories"].items(), key=lambda kv: -kv[1]["ms"])
            for name, a in cats:
                rate = f"{a['gflops']:.1f}" if a.get("gflops") else ""
                L.append(f"| {name} | {a['nodes']} | {a['ms']:.2f} | {100 * a['share']:.1f}% | "
                         f"{a['gflop']:.3f} | {rate} |")
            top = ", ".join(f"{o['op']} {100 * o['share']:.1f}%" for o in pr["ops"][:6])
            L.append("")
            L.append(f"Top tract ops: {top}.")
    if res.get("e2e"):
        fids, n = fid_table()
        fid_ids = {"es-ddpm100": "es-gan-ddpm-100", "es-ddim10": "es-gan-ddim10-100",
                   "ddpm1000": "ddpm-1000"}
        base = next((r for r in res["e2e"] if r["runtime"] == "esddpm" and
                     r["pipeline"] == "ddpm1000"), None)
        torch_base = next((r for r in res["e2e"] if r["runtime"] != "esddpm"), None)
        L.append("")
        L.append(f"End to end, shipped Fashion-MNIST models, batch {res['args']['e2e_batch']}, "
                 f"{res['args']['e2e_threads']} thread(s); ES-DDPM from the default (GAN) "
                 f"prior at T' = 100. FID: PyTorch reference, N = {n}, "
                 "tools/reference/fid_table_torch.json.")
        L.append("")
        tsteps = torch_base["unet_steps"] if torch_base else 1000
        L.append("| pipeline | runtime | U-Net calls / image | images | images/s | s / image | "
                 f"vs esddpm DDPM-1000 | vs diffusers DDPMPipeline-{tsteps} | FID |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in res["e2e"]:
            name = {"es-ddpm100": "ES-DDPM T'=100, 100 DDPM steps",
                    "es-ddim10": "ES-DDPM T'=100, 10 DDIM steps",
                    "ddpm1000": "DDPM 1000 steps from noise"}.get(
                        r["pipeline"], f"DDPM {r['unet_steps']} steps from noise")
            rt = "esddpm (tract)" if r["runtime"] == "esddpm" else "diffusers DDPMPipeline (PyTorch)"
            vb = f"{r['images_per_s'] / base['images_per_s']:.1f}x" if base else ""
            vt = f"{r['images_per_s'] / torch_base['images_per_s']:.1f}x" if torch_base else ""
            fid = fids.get(fid_ids.get(r["pipeline"], ""), None)
            L.append(f"| {name} | {rt} | {r['unet_steps']} | {r['images']:.0f} | "
                     f"{r['images_per_s']:.3f} | {r['s_per_image']:.3f} | {vb} | {vt} | "
                     f"{fmt(fid, '.1f')} |")
    return "\n".join(L) + "\n"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    global LOG
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 1, 1 thread, 3 reps, short end-to-end part")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], choices=[1, 8])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--reps", type=int, default=0, help="timed forwards (default per model)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat each cell's three peers this many times (medians reported)")
    p.add_argument("--no-forward", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--no-starts", action="store_true",
                   help="skip the start-up rows (without / with the plan cache)")
    p.add_argument("--e2e-batch", type=int, default=4)
    p.add_argument("--e2e-threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(OUT, "results"),
                   help="writes OUT.json and OUT.md")
    args = p.parse_args()
    if args.quick:
        args.batches, args.threads = [1], [1]
        args.reps = args.reps or 3
    os.makedirs(IO, exist_ok=True)
    LOG = open(args.out + ".log", "w")
    py = sys.executable
    t0 = time.time()

    if "cifar" in args.models:
        subprocess.run([py, os.path.join(HERE, "export_unets.py")], cwd=ROOT, check=True)
    finfo = os.path.join(OUT, "fashion_unet.json")
    if not os.path.isfile(finfo):
        subprocess.run([py, os.path.join(HERE, "export_unets.py")], cwd=ROOT, check=True)
    with open(finfo) as f:
        fashion_torch = json.load(f).get("torch_ok", False)
    if not fashion_torch:
        log("no PyTorch weights for the shipped U-Net: PyTorch cells of it are left out")
    exe = build_bench()

    res = {"args": vars(args), "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                                           "when": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                 time.gmtime())}}
    with open(os.path.join(OUT, "cifar_unet.json")) as f:
        res["cifar_unet"] = json.load(f)
    with open(finfo) as f:
        res["fashion_unet"] = json.load(f)
    if not args.no_forward:
        log("forward cells")
        res["cells"] = forward_cells(args, exe, py, fashion_torch)
        diffs = [r[rt]["max_abs_diff_vs_ort"] for c in res["cells"] for r in c["rounds"]
                 for rt in ("tract", "esddpm")
                 if rt in r and "max_abs_diff_vs_ort" in r[rt]]
        if diffs:
            res["numerics_max_diff"] = max(diffs)
            res["numerics_ok"] = max(diffs) <= TOL
    else:
        res["cells"] = []
    if not args.no_starts:
        log("start-up, without and with the plan cache")
        res["starts"] = starts(args, exe)
    if not args.no_profile:
        log("profiles")
        res["profiles"] = profiles(args, exe)
    if not args.no_e2e:
        log("end to end")
        res["e2e"] = e2e(args, exe, py, fashion_torch)
    res["total_s"] = time.time() - t0
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {args.out}.json, {args.out}.md ({res['total_s'] / 60:.1f} min)")
    if res.get("numerics_ok") is False:
        sys.exit(f"numerics: tract vs ORT max abs diff {res['numerics_max_diff']} > {TOL}")


if __name__ == "__main__":
    main()
