"""The GPU fast path (issue 16): CUDA graphs end to end, batch-1 latency, bf16 on a transformer.

Three sections, each written to the JSON as soon as it is done (a run cut short by a time limit
keeps what finished):

- ``e2e``: per task (inpaint_box, sr2, deblur on the bundled Fashion-MNIST flow and ``--n`` test
  images), D-Flow problems per hour of the paper's per-image loop (``dflow_fast.reference``;
  measured on the first ``--ref-subset`` images and extrapolated to n, said in the row), of
  ``dflow_fast.optimize`` batched (``--batch``) eager, and the same with ``cuda_graphs=True``
  (graph captures included in its time); the mean PSNR of each, on all n and on the reference's
  subset (the same problems, for the "equal PSNR" verdict).
- ``latency_b1``: one cost-and-gradient evaluation at batch 1 on the bundled flow
  (``dflow_fast.ValueAndGrad``), eager against replayed from a CUDA graph; median seconds.
- ``bf16``: one adjoint gradient (batch 8) through a DiT-style transformer velocity of about 100M
  parameters on 32x32x4 latents (bench/lib/dit.py), float32 against ``autocast=torch.bfloat16``,
  and the bf16 gradient's relative error against the float32 one. Beside them (no goal): the same
  network with its weights in bfloat16 and in float16, as a pipeline loaded with ``torch_dtype``
  (the state cast down and the output back, the dtype declared as ``compute_dtype``, so float16's
  cotangents are scaled): ``bf16_weights_*`` and ``fp16_weights_*``.

Goals (issue 16), each recorded with whether it is met: graphed >= 100x the per-image loop at
equal mean PSNR (within ``PSNR_TOL`` dB on the same problems), batch-1 latency >= 3x eager, bf16
>= 1.5x float32 with gradient error <= 2e-2.

    python -m bench.bench_fastpath --device cuda      # ~4 min on an H200
    python -m bench.bench_fastpath --smoke            # tiny, CPU, eager only (graphed: unavailable)

Writes ``bench/results/fastpath_<device>.{json,md}`` and ``_throughput.png``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.lib import RESULTS_DIR, command, environment, shown, write_json

MODULE = "bench.bench_fastpath"
PSNR_TOL = 0.1  # dB: "equal mean PSNR"
GOALS = {"e2e_vs_reference": 100.0, "latency_b1": 3.0, "bf16_speedup": 1.5, "bf16_err": 2e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, eager only")
    p.add_argument("--tasks", nargs="+", default=["inpaint_box", "sr2", "deblur"])
    p.add_argument("--n", type=int, default=256, help="problems per task")
    p.add_argument("--batch", type=int, default=256, help="dflow_fast batch (64-256)")
    p.add_argument("--ref-subset", type=int, default=6,
                   help="images the per-image reference loop runs (extrapolated to n)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--dit", default="dit-100m", help="DiT config (bench/lib/dit.py)")
    p.add_argument("--dit-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sections", nargs="+", default=["e2e", "latency_b1", "bf16"],
                   choices=["e2e", "latency_b1", "bf16"])
    p.add_argument("--limit-s", type=float, default=150.0,
                   help="soft time limit of the e2e section (later tasks are skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.smoke:
        a.device, a.n, a.batch, a.ref_subset, a.steps, a.max_iter = "cpu", 4, 4, 1, 2, 2
        a.dit, a.dit_batch, a.repeats = "tiny", 2, 1
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (use --smoke on the CPU)")
    if min(a.n, a.batch, a.ref_subset, a.steps, a.max_iter, a.repeats) < 1:
        p.error("n, batch, ref-subset, steps, max-iter and repeats must be >= 1")
    a.ref_subset = min(a.ref_subset, a.n)
    a.out = a.out or RESULTS_DIR / f"fastpath_{a.device}.json"
    return a


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _median_time(fn, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn, device)[1] for _ in range(repeats))


def _graphs_ok(device) -> tuple[bool, str | None]:
    return (True, None) if device.type == "cuda" else (False, "unavailable: no CUDA device")


# ---- sections ----------------------------------------------------------------------------------

def e2e(args, flow, images, device, save) -> list[dict]:
    import dflow_fast
    from dflow_fast import metrics, reference
    from dflow_fast.tasks import make as make_task

    graphs, why = _graphs_ok(device)
    truth = images[:args.n].to(device)
    # untimed warm-up of both paths: kernels load, allocator and caches fill
    warm = make_task(args.tasks[0], truth[:2], sigma=args.sigma)
    for cg in ([False, True] if graphs else [False]):
        dflow_fast.optimize(flow, warm.cost, torch.randn_like(truth[:2]), steps=args.steps,
                            max_iter=2, cuda_graphs=cg)
    rows, start = [], time.perf_counter()
    for task in args.tasks:
        if time.perf_counter() - start > args.limit_s:
            rows.append({"task": task, "skipped": f"time limit {args.limit_s:.0f} s"})
            continue
        p = make_task(task, truth, sigma=args.sigma,
                      generator=torch.Generator().manual_seed(args.seed))
        x0 = dflow_fast.backward_blend(flow, p.guess, steps=args.steps,
                                       generator=torch.Generator(device).manual_seed(args.seed))
        sub = list(range(args.ref_subset))

        def reference_loop():
            return [reference.optimize(flow, p.select([i]).cost, x0[i:i + 1], steps=args.steps,
                                       max_iter=args.max_iter).x1 for i in sub]
        ref_x1, ref_s = _timed(reference_loop, device)
        ref_x1 = torch.cat(ref_x1)

        def batched(cg):
            def go():
                x1s, extra = [], []
                for lo in range(0, args.n, args.batch):
                    rows_ = list(range(lo, min(args.n, lo + args.batch)))
                    r = dflow_fast.optimize(flow, p.select(rows_).cost, x0[rows_],
                                            steps=args.steps, max_iter=args.max_iter,
                                            cuda_graphs=cg)
                    x1s.append(r.x1)
                    extra.append(r.extra["cuda_graphs"])
                return torch.cat(x1s), extra
            return go
        (eager_x1, _), eager_s = _timed(batched(False), device)
        row = {"task": task, "n": args.n, "batch": args.batch,
               "reference_problems_per_hour": args.ref_subset / ref_s * 3600,
               "reference_measured_on": args.ref_subset,
               "reference_note": (f"per-image loop timed on the first {args.ref_subset} of "
                                  f"{args.n} problems, extrapolated per problem"),
               "reference_seconds": ref_s,
               "reference_psnr_mean": float(metrics.psnr(ref_x1, truth[sub]).mean()),
               "eager_problems_per_hour": args.n / eager_s * 3600, "eager_seconds": eager_s,
               "eager_psnr_mean": float(metrics.psnr(eager_x1, truth).mean()),
               "eager_psnr_subset": float(metrics.psnr(eager_x1[sub], truth[sub]).mean())}
        if graphs:
            (g_x1, g_extra), g_s = _timed(batched(True), device)
            row.update(graphed_problems_per_hour=args.n / g_s * 3600, graphed_seconds=g_s,
                       graphed_psnr_mean=float(metrics.psnr(g_x1, truth).mean()),
                       graphed_psnr_subset=float(metrics.psnr(g_x1[sub], truth[sub]).mean()),
                       graphed_cuda_graphs=g_extra)
        else:
            row.update(graphed_problems_per_hour=None, graphed_psnr_mean=None,
                       graphed_psnr_subset=None, graphed_unavailable=why)
        rows.append(row)
        print(f"{task:12s} ref {row['reference_problems_per_hour']:9.0f}/h  eager "
              f"{row['eager_problems_per_hour']:9.0f}/h  graphed "
              f"{row['graphed_problems_per_hour'] or 0:9.0f}/h", file=sys.stderr, flush=True)
        save(rows)
    return rows


def latency_b1(args, flow, images, device) -> dict:
    import dflow_fast

    graphs, why = _graphs_ok(device)
    x0 = torch.randn(1, *images.shape[1:], device=device, generator=None)
    target = images[:1].to(device)

    def cost(x1):
        return (x1 - target).pow(2).flatten(1).sum(1)
    out = {"batch": 1, "steps": args.steps, "gradient": "auto"}
    eager = dflow_fast.ValueAndGrad(flow, cost, steps=args.steps, cuda_graphs=False)
    out["eager_s"] = _median_time(lambda: eager(x0), device, args.repeats * 4)
    if graphs:
        graph = dflow_fast.ValueAndGrad(flow, cost, steps=args.steps, cuda_graphs=True)
        out["graphed_s"] = _median_time(lambda: graph(x0), device, args.repeats * 4, warmup=3)
        out["speedup"] = out["eager_s"] / out["graphed_s"]
        g_e, g_g = eager(x0)[1], graph(x0)[1]
        out["grad_rel_diff_graphed_vs_eager"] = float((g_g - g_e).norm() / g_e.norm())
        out["cuda_graphs"] = graph.objective.report()
    else:
        out.update(graphed_s=None, speedup=None, graphed_unavailable=why)
    return out


class _LowWeights(torch.nn.Module):
    """``net`` with its weights in ``dtype``, called as an adapter calls such a model: the state
    cast down, the output back to the state's dtype, the dtype declared as ``compute_dtype``."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net = copy.deepcopy(net).to(dtype)
        self.compute_dtype = dtype

    def forward(self, t, x):
        return self.net(t, x.to(self.compute_dtype)).to(x.dtype)


def bf16(args, device) -> dict:
    import dflow_fast
    from bench.lib.dit import DIT_CONFIGS, build_dit

    net = build_dit(args.dit, device)
    c = DIT_CONFIGS[args.dit]
    g = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(args.dit_batch, c.channels, c.size, c.size, generator=g).to(device)
    target = torch.randn(x0.shape, generator=g).to(device)

    def cost(x1):
        return (x1 - target).pow(2).flatten(1).mean(1)
    grads, out = {}, {"config": args.dit, "params": sum(p.numel() for p in net.parameters()),
                      "batch": args.dit_batch, "steps": args.steps, "gradient": "adjoint"}
    runs = (("fp32", net, None), ("bf16", net, torch.bfloat16),
            ("bf16_weights", _LowWeights(net, torch.bfloat16), None),
            ("fp16_weights", _LowWeights(net, torch.float16), None))
    for name, velocity, low in runs:
        vg = dflow_fast.ValueAndGrad(velocity, cost, steps=args.steps, gradient="adjoint",
                                     autocast=low, cuda_graphs=False)
        out[f"{name}_s"] = _median_time(lambda: vg(x0), device, args.repeats, warmup=1)
        grads[name] = vg(x0)[1].double()

    def err(name):
        return float((grads[name] - grads["fp32"]).norm() / grads["fp32"].norm())
    out["speedup"] = out["fp32_s"] / out["bf16_s"]
    out["grad_rel_err"] = err("bf16")
    for name in ("bf16_weights", "fp16_weights"):
        out[f"{name}_speedup"] = out["fp32_s"] / out[f"{name}_s"]
        out[f"{name}_grad_rel_err"] = err(name)
    return out


def goals(payload: dict) -> dict:
    rows = [r for r in payload.get("e2e", []) if "skipped" not in r]
    per_task = {}
    for r in rows:
        if r.get("graphed_problems_per_hour") is None:
            per_task[r["task"]] = None
            continue
        ratio = r["graphed_problems_per_hour"] / r["reference_problems_per_hour"]
        equal = r["graphed_psnr_subset"] >= r["reference_psnr_mean"] - PSNR_TOL
        per_task[r["task"]] = {"ratio": ratio, "equal_psnr": equal,
                               "met": ratio >= GOALS["e2e_vs_reference"] and equal}
    lat, bf = payload.get("latency_b1", {}), payload.get("bf16", {})
    return {
        "e2e_graphed_vs_reference": {"goal": f">= {GOALS['e2e_vs_reference']:.0f}x at equal "
                                             f"mean PSNR (within {PSNR_TOL} dB)",
                                     "per_task": per_task,
                                     "met": bool(per_task) and all(
                                         v is not None and v["met"] for v in per_task.values())},
        "latency_b1": {"goal": f">= {GOALS['latency_b1']:.0f}x eager", "ratio": lat.get("speedup"),
                       "met": lat.get("speedup") is not None
                       and lat["speedup"] >= GOALS["latency_b1"]},
        "bf16": {"goal": f">= {GOALS['bf16_speedup']}x fp32 with grad error <= "
                         f"{GOALS['bf16_err']}", "ratio": bf.get("speedup"),
                 "err": bf.get("grad_rel_err"),
                 "met": bf.get("speedup") is not None and bf["speedup"] >= GOALS["bf16_speedup"]
                 and bf["grad_rel_err"] <= GOALS["bf16_err"]},
    }


def markdown(payload: dict, meta: dict) -> str:
    def f(x, spec=".0f"):
        return "–" if x is None else format(x, spec)
    cfg = payload["config"]
    dirty = " (+ local edits)" if meta.get("dirty") else ""
    lines = [f"# Fast path (CUDA graphs, bf16): {meta['device_name']} ({meta['device']})", "",
             f"torch {meta['torch']} (CUDA {meta.get('torch_cuda')}), commit "
             f"`{(meta.get('commit') or 'unknown')[:12]}`{dirty}"
             f"; midpoint {cfg['steps']} steps, L-BFGS max_iter {cfg['max_iter']}, "
             f"gradient='auto'" + (" — SMOKE RUN (tiny sizes)" if cfg["smoke"] else "") + ".", "",
             "## e2e: problems per hour", "",
             "| task | n | batch | reference / h | eager / h | graphed / h | graphed x ref "
             "| PSNR ref (subset) | PSNR eager | PSNR graphed | PSNR graphed (subset) |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload.get("e2e", []):
        if "skipped" in r:
            lines.append(f"| {r['task']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        gr = r.get("graphed_problems_per_hour")
        lines.append(
            f"| {r['task']} | {r['n']} | {r['batch']} | {f(r['reference_problems_per_hour'])} "
            f"| {f(r['eager_problems_per_hour'])} | {f(gr)} "
            f"| {f(gr / r['reference_problems_per_hour'] if gr else None, '.1f')} "
            f"| {r['reference_psnr_mean']:.2f} | {r['eager_psnr_mean']:.2f} "
            f"| {f(r.get('graphed_psnr_mean'), '.2f')} "
            f"| {f(r.get('graphed_psnr_subset'), '.2f')} |")
    if payload.get("e2e"):
        lines += ["", "Reference: the per-image loop timed on the first "
                  f"{cfg['ref_subset']} problems of each task and extrapolated per problem; "
                  "its PSNR is over that subset (compared with graphed's over the same images)."]
    lat, bf = payload.get("latency_b1"), payload.get("bf16")
    if lat:
        lines += ["", "## latency at batch 1 (one cost-and-gradient evaluation)", "",
                  f"eager {f(lat['eager_s'] * 1e3, '.2f')} ms, graphed "
                  f"{f(None if lat['graphed_s'] is None else lat['graphed_s'] * 1e3, '.2f')} ms, "
                  f"speed-up {f(lat['speedup'], '.2f')}x"]
    if bf:
        lines += ["", f"## bf16: DiT ({bf['config']}, {bf['params'] / 1e6:.0f}M params), one "
                  f"adjoint gradient at batch {bf['batch']}", "",
                  f"fp32 {bf['fp32_s'] * 1e3:.1f} ms, bf16 {bf['bf16_s'] * 1e3:.1f} ms, speed-up "
                  f"{bf['speedup']:.2f}x, gradient relative error {bf['grad_rel_err']:.2e}"]
        if "bf16_weights_s" in bf:
            lines += ["", "The same network with its weights in low precision (no autocast; "
                      "the state cast down and back, float16's cotangents scaled): "
                      + ", ".join(f"{n.replace('_weights', '')} weights "
                                  f"{bf[n + '_s'] * 1e3:.1f} ms ({bf[n + '_speedup']:.2f}x, "
                                  f"gradient error {bf[n + '_grad_rel_err']:.2e})"
                                  for n in ("bf16_weights", "fp16_weights"))]
    lines += ["", "## goals", "", "| goal | target | measured | met |", "|:---|:---|:---|:---:|"]
    for name, gl in payload.get("goals", {}).items():
        measured = (", ".join(f"{t} {f(v and v['ratio'], '.0f')}x" for t, v in
                              gl["per_task"].items()) if "per_task" in gl else
                    f"{f(gl.get('ratio'), '.2f')}x" + (f", err {f(gl['err'], '.1e')}"
                                                       if "err" in gl else ""))
        lines.append(f"| {name} | {gl['goal']} | {measured} | {'yes' if gl['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, meta: dict, stem: Path) -> Path | None:
    rows = [r for r in payload.get("e2e", []) if "skipped" not in r]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    names = ("reference", "eager", "graphed")
    for k, name in enumerate(names):
        vals = [r.get(f"{name}_problems_per_hour") or 0 for r in rows]
        ax.bar([i + (k - 1) * 0.27 for i in range(len(rows))], vals, 0.27, label=name)
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("problems per hour")
    ax.legend(fontsize=8)
    ax.set_title(f"D-Flow throughput, {meta['device_name']}", fontsize=9)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_throughput.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from dflow_fast.data import fashion_mnist
    from dflow_fast.models import load_pretrained

    device = torch.device(args.device)
    meta = environment(device)
    payload: dict = {"benchmark": "fastpath", "command": command(MODULE, argv),
                     "config": {k: (str(v) if isinstance(v, Path) else v)
                                for k, v in vars(args).items()}, "goals_targets": GOALS}

    def save(**part):
        payload.update(part)
        payload["goals"] = goals(payload)
        write_json(args.out, payload, device, meta).with_suffix(".md").write_text(
            markdown(payload, meta))

    flow = images = None
    if {"e2e", "latency_b1"} & set(args.sections):
        flow = load_pretrained("fashion-mnist").to(device)
        imgs, _ = fashion_mnist("test", limit=1000)
        idx = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(args.seed))
        images = imgs[idx]
    for section in args.sections:
        t0 = time.perf_counter()
        if section == "e2e":
            save(e2e=e2e(args, flow, images, device, lambda rows: save(e2e=rows)))
        elif section == "latency_b1":
            save(latency_b1=latency_b1(args, flow, images, device))
        else:
            save(bf16=bf16(args, device))
        print(f"{section}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    save()
    md = args.out.with_suffix(".md")
    png = plot(payload, meta, args.out.with_suffix(""))
    print(md.read_text())
    print("wrote " + ", ".join(shown(p) for p in (args.out, md, png) if p is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
