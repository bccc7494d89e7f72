"""Mixed precision: what ``autocast=torch.bfloat16`` / ``torch.float16`` costs in accuracy.

On the bundled Fashion-MNIST flow (``load_pretrained("fashion-mnist")``), ``--n`` test images and
the demo's tasks (its noise levels, L-BFGS history and stopping rule, apps/demo.py):

1. Gradients. For every task, at the task's backward-blend start x0, the gradient of the task's
   cost w.r.t. x0 through a ``--steps`` midpoint solve, per gradient scheme (auto, adjoint,
   backprop; "reversible" with the reversible_midpoint solver) and per precision: float32, each
   low-precision autocast dtype, and float64 (the model in float64). Reported: the relative
   error ``||g_low - g_32|| / ||g_32||`` per scheme and dtype, float32's own error against
   float64 (the rounding floor float32 already has), and with float16 the plain reference loop
   under the same autocast, which does not scale its cotangents (the underflow that dflow_fast's
   cotangent scaling prevents), and the time of one gradient relative to float32.
2. End to end. ``dflow_fast.optimize`` (default gradient "auto") per task in float32 and under
   each autocast dtype, from the same x0 with the same budget: final mean cost, mean PSNR
   (class: the classifier's accuracy for the requested class), iterations and seconds.

    python -m bench.bench_autocast                        # CPU: bfloat16
    python -m bench.bench_autocast --device cuda          # CUDA: bfloat16 and float16

Writes ``bench/results/autocast_<device>.{json,md}``. Seconds are this process's CPU time on the
CPU with one thread (as in the other CPU benchmarks), CUDA-synchronized wall time on CUDA.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from bench.lib import RESULTS_DIR, command, n_params, rel_err, write_result

MODULE = "bench.bench_autocast"
SCHEMES = ("auto", "adjoint", "backprop", "reversible")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    from dflow_fast.tasks import TASKS

    p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                   help="autocast dtypes (default: bfloat16 on cpu, bfloat16 float16 on cuda)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    p.add_argument("--n", type=int, default=8, help="test images (one batch)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max-iter", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="gradients only")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    a.dtypes = a.dtypes or (["bfloat16"] if a.device == "cpu" else ["bfloat16", "float16"])
    a.out = a.out or RESULTS_DIR / f"autocast_{a.device}.json"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    return a


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def gradient(flow, cost, x0: torch.Tensor, scheme: str, steps: int, autocast=None,
             reference_loop: bool = False) -> tuple[torch.Tensor, float]:
    """d cost(x1(x0)).sum() / d x0 [n, *S] and its seconds."""
    import dflow_fast
    from dflow_fast import reference

    x = x0.detach().clone().requires_grad_(True)
    start = _clock(x0.device)
    if reference_loop:
        x1 = reference.solve(flow, x, steps=steps, autocast=autocast)
    elif scheme == "reversible":
        x1 = dflow_fast.solve(flow, x, steps=steps, solver="reversible_midpoint",
                              gradient="reversible", params=[], autocast=autocast)
    else:
        x1 = dflow_fast.solve(flow, x, steps=steps, gradient=scheme, params=[],
                              autocast=autocast)
    g, = torch.autograd.grad(cost(x1).sum(), x)
    return g, _clock(x0.device) - start


def _to_double(obj):
    """A deep copy of a task's problem with every floating-point tensor and module in float64
    (observation, masks, blur kernel, classifier)."""
    obj = copy.deepcopy(obj)

    def convert(o, depth=0):
        if isinstance(o, torch.nn.Module):
            return o.double()
        if isinstance(o, torch.Tensor):
            return o.double() if o.is_floating_point() else o
        if depth < 3 and hasattr(o, "__dict__") and not isinstance(o, type):
            for k, v in list(vars(o).items()):
                setattr(o, k, convert(v, depth + 1))
        return o

    return convert(obj)


def measure(args, cmd: str | None = None) -> dict:
    import dflow_fast
    from dflow_fast import metrics
    from dflow_fast.apps.demo import CLASS_TARGET_PROB, HISTORY, TASK_SIGMA
    from dflow_fast.data import fashion_mnist
    from dflow_fast.models import load_pretrained
    from dflow_fast.tasks import make as make_task

    device = torch.device(args.device)
    flow = load_pretrained("fashion-mnist", device=device, dtype=torch.float32)
    flow64 = copy.deepcopy(flow).double()
    classifier = load_pretrained("fashion-mnist-classifier", device=device, dtype=torch.float32)
    images, labels = fashion_mnist("test", limit=1000)
    idx = torch.randperm(1000, generator=torch.Generator().manual_seed(args.seed))[:args.n]
    truth, labels = images[idx].to(device), labels[idx].to(device)
    target = (labels + 1) % 10  # the demo's class task: another class than the image's
    lows = {name: DTYPES[name] for name in args.dtypes}
    grads, e2e = [], []
    for task in args.tasks:
        p = make_task(task, truth, sigma=TASK_SIGMA.get(task, 0.05), classifier=classifier,
                      labels=target, generator=torch.Generator().manual_seed(args.seed))
        p64 = _to_double(p)  # the same observation (same noise draw), in float64
        x0 = dflow_fast.backward_blend(flow, p.guess, steps=args.steps,
                                       generator=torch.Generator().manual_seed(args.seed + 1))
        for scheme in args.schemes:
            gradient(flow, p.cost, x0, scheme, args.steps)  # first calls allocate: untimed
            g32, t32 = gradient(flow, p.cost, x0, scheme, args.steps)
            g64, _ = gradient(flow64, p64.cost, x0.double(), scheme, args.steps)
            row = {"task": task, "scheme": scheme, "seconds_float32": t32,
                   "float32_vs_float64": rel_err(g32, g64)}
            for name, low in lows.items():
                gradient(flow, p.cost, x0, scheme, args.steps, low)
                g, t = gradient(flow, p.cost, x0, scheme, args.steps, low)
                row[f"{name}_vs_float32"] = rel_err(g, g32)
                row[f"{name}_time_vs_float32"] = t / t32
                if low == torch.float16 and scheme == "backprop":
                    gr, _ = gradient(flow, p.cost, x0, scheme, args.steps, low,
                                     reference_loop=True)
                    row["float16_reference_loop_unscaled_vs_float32"] = rel_err(gr, g32)
            grads.append(row)
            print(f"{task:12s} {scheme:10s} " + " ".join(
                f"{k}={v:.2e}" for k, v in row.items() if isinstance(v, float)),
                file=sys.stderr, flush=True)
        if not args.e2e:
            continue
        stop = p.noise_level if p.noise_level is not None else -torch.log(
            torch.tensor(CLASS_TARGET_PROB)).item()
        for name in ["float32", *lows]:
            start = _clock(device)
            res = dflow_fast.optimize(flow, p.cost, x0, steps=args.steps, max_iter=args.max_iter,
                                      history_size=HISTORY, stop_loss=stop,
                                      autocast=lows.get(name))
            row = {"task": task, "precision": name, "seconds": _clock(device) - start,
                   "loss_mean": float(res.loss.mean()), "iterations_mean":
                   float(res.nit.float().mean()), "status": res.message}
            if task == "class":
                row["accuracy"] = metrics.accuracy(classifier, res.x1, target)
            else:
                row["psnr_mean"] = float(metrics.psnr(res.x1, truth).mean())
            e2e.append(row)
            print(f"{task:12s} {name:9s} cost {row['loss_mean']:.4g} "
                  f"{'acc' if task == 'class' else 'psnr'} "
                  f"{row.get('accuracy', row.get('psnr_mean')):.4g} {row['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
    return {"benchmark": "autocast", "command": cmd or command(MODULE),
            "config": {"model": "dflow_fast.models.load_pretrained('fashion-mnist')",
                       "n_params": n_params(flow), "n": args.n, "tasks": args.tasks,
                       "steps": args.steps, "solver": "midpoint (reversible: "
                       "reversible_midpoint)", "schemes": args.schemes, "dtypes": args.dtypes,
                       "max_iter": args.max_iter, "history_size": HISTORY,
                       "sigma": {t: TASK_SIGMA.get(t, 0.05) for t in args.tasks},
                       "threads": torch.get_num_threads(), "seed": args.seed,
                       "time": "CUDA-synchronized wall time" if device.type == "cuda" else
                       "time.process_time (this process's CPU time)"},
            "gradients": grads, "e2e": e2e}


def markdown(payload: dict, meta: dict) -> str:
    cfg = payload["config"]
    lows = cfg["dtypes"]
    commit = f"`{(meta.get('commit') or 'unknown')[:12]}`" + (" (+ local edits)"
                                                              if meta.get("dirty") else "")
    lines = [f"# autocast accuracy: {meta['device_name']} ({meta['device']})", "",
             f"Bundled Fashion-MNIST flow ({cfg['n_params'] / 1e6:.2f}M params), {cfg['n']} test "
             f"images, {cfg['steps']} {cfg['solver']} steps; torch {meta['torch']}, "
             f"{cfg['threads']} thread(s); commit {commit}. `{payload['command']}`", "",
             "## Gradient d cost / d x0 at the backward-blend start", "",
             "Relative errors ||g - g_ref|| / ||g_ref||: each low precision against float32 of "
             "the same scheme, float32 against float64. Time: one gradient under autocast / in "
             "float32." + (" float16's \"ref. loop\": the plain loop under the same autocast, "
                           "without cotangent scaling." if "float16" in lows else ""), ""]
    head = ["task", "scheme", "fp32 vs fp64"]
    for d in lows:
        head += [f"{d} vs fp32", f"{d} time"]
    if "float16" in lows:
        head.append("fp16 ref. loop vs fp32")
    lines += ["| " + " | ".join(head) + " |", "|:---|:---|" + "---:|" * (len(head) - 2)]
    for r in payload["gradients"]:
        cells = [r["task"], r["scheme"], f"{r['float32_vs_float64']:.1e}"]
        for d in lows:
            cells += [f"{r[f'{d}_vs_float32']:.1e}", f"{r[f'{d}_time_vs_float32']:.2f}x"]
        if "float16" in lows:
            v = r.get("float16_reference_loop_unscaled_vs_float32")
            cells.append("–" if v is None else f"{v:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    if payload["e2e"]:
        lines += ["", f"## optimize end to end (gradient \"auto\", L-BFGS max_iter "
                      f"{cfg['max_iter']}, history {cfg['history_size']}, the demo's stop at "
                      "the noise level)", "",
                  "| task | precision | mean cost | PSNR (dB) / accuracy | mean iterations | "
                  "seconds |", "|:---|:---|---:|---:|---:|---:|"]
        for r in payload["e2e"]:
            q = (f"{r['accuracy']:.3f}" if "accuracy" in r else f"{r['psnr_mean']:.2f}")
            lines.append(f"| {r['task']} | {r['precision']} | {r['loss_mean']:.4g} | {q} "
                         f"| {r['iterations_mean']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = measure(args, command(MODULE, argv))
    write_result(args.out, payload, args.device, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
