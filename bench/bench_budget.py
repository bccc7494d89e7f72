"""gradient="auto" as its memory budget goes from zero to everything: time and peak memory per
gradient, and the split of the steps that auto chose.

One gradient d cost(x1)/d x0 through an N-step solve of the U-Net velocity (bench.lib.nets),
for each solver in ``--solvers`` (default: midpoint, and reversible_midpoint whose smallest
budgets reach the reversible segment). The budgets are fractions of what auto estimates keeping
every step's graph costs (``--fractions``; 0 = nothing kept: the adjoint's memory; 1 = all: the
backprop split), plus for a reversible solver a budget that holds only half of the stored states.
For the same inputs, ``backprop`` and ``adjoint`` (plain midpoint) are measured as the two ends.
Memory: on the CPU the peak bytes saved for backward (``SavedBytesMeter``, weights excluded) and
the peak RSS above the pre-call size; on CUDA the allocator's peak above the pre-call allocation.
Times: medians of ``--repeats`` rounds, all cases round-robin (CPU time with one thread on the CPU).

Reversible solvers vs the adjoint vs backprop across steps is in the gradient/peers benchmark
(``python -m bench.bench_peers``: rows ``reversible``, ``adjoint-*``, ``backprop``, ``auto``,
``auto-0``).

    python -m bench.bench_budget                       # CPU, "small" net, batch 8, 20 steps
    python -m bench.bench_budget --device cuda         # CUDA, 35M-parameter "gpu" net

Writes ``bench/results/budget_<device>.{json,md}`` and ``_budget.png`` (time and memory vs budget).
"""
from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from pathlib import Path

import torch

from bench.lib import (RESULTS_DIR, RssPeak, SavedBytesMeter, add_net_options, build_velocity,
                       check_net_options, command, cuda_peak, environment, guard_oom, median,
                       mse_cost, rel_err, time_interleaved, write_json)

MODULE = "bench.bench_budget"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_net_options(p, batch=8, steps=20)
    p.add_argument("--solvers", nargs="+", default=["midpoint", "reversible_midpoint"],
                   choices=["euler", "midpoint", "reversible_euler", "reversible_midpoint",
                            "reversible_heun"])
    p.add_argument("--fractions", type=float, nargs="+",
                   default=[0.0, 0.125, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--repeats", type=int, help="timed rounds (default 3 cpu, 5 cuda)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path,
                   help="JSON path (default bench/results/budget_<device>.json)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args(argv)
    check_net_options(p, a)
    a.repeats = a.repeats or (5 if a.device == "cuda" else 3)
    a.out = a.out or RESULTS_DIR / f"budget_{a.device}.json"
    return a


def _gradient(velocity, x0, target, *, steps, solver, gradient, budget=None):
    """d sum_b mse(x1_b, target_b) / d x0 through dflow_fast.solve; [B, *S]."""
    import dflow_fast
    x = x0.detach().requires_grad_(True)
    kw = {"memory_budget": budget} if gradient == "auto" else {}
    x1 = dflow_fast.solve(velocity, x, steps=steps, solver=solver, gradient=gradient, **kw)
    g, = torch.autograd.grad(mse_cost(x1, target).sum(), x)
    return g


def _split_of(velocity, x0, *, steps, solver, budget):
    """The split and estimated bytes that auto picks (from the plan it solves with)."""
    from dflow_fast.core.plan import make_plan
    from dflow_fast.core.velocity import CheckedVelocity
    from dflow_fast.gradients.auto import memo
    from dflow_fast.gradients.common import find_params
    from dflow_fast.gradients.dispatch import run
    plan = make_plan(solver, steps, 0.0, 1.0, None, x0, None, gradient="auto")
    params = find_params(velocity)
    x = x0.detach().requires_grad_(True)
    run(CheckedVelocity(velocity), plan, x, "auto", params, True, memory_budget=budget)
    m = memo(plan)  # what auto recorded for this plan: the split and its estimated bytes
    s = m.split
    return {"graph": s.graph, "stored": s.stored, "reversible": s.reversible}, m.estimate


def _memory(fn, net, device):
    """Peak memory of one call: CUDA allocator peak, or saved bytes (meter) and RSS on the CPU."""
    if device.type == "cuda":
        _, peak = cuda_peak(fn, device)
        return {"peak_bytes": peak}
    meter = SavedBytesMeter(exclude=list(net.parameters()) + list(net.buffers()))
    with meter:
        fn()
    gc.collect()
    _, rss = RssPeak.measure(fn) if RssPeak.available() else (None, None)
    return {"peak_bytes": meter.peak, "rss_peak_bytes": rss}


def measure(args, cmd: str | None = None) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    net, shape = build_velocity(args.config, device=device, seed=args.seed)
    import dflow_fast
    velocity = dflow_fast.ModelVelocity(net)
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(args.batch, *shape, generator=gen).to(device)
    target = torch.randn(args.batch, *shape, generator=gen).to(device)
    state_bytes = x0.numel() * x0.element_size()
    kw = dict(steps=args.steps)

    cases = {"backprop": dict(solver="midpoint", gradient="backprop"),
             "adjoint": dict(solver="midpoint", gradient="adjoint")}
    meta = {}
    for solver in args.solvers:
        _, all_graph = _split_of(velocity, x0, budget=float("inf"), solver=solver, **kw)
        budgets = [f * all_graph for f in args.fractions]
        if solver.startswith("reversible"):
            # half of the stored (y, z) pairs fit: the rest of the steps run reversibly
            budgets.append(0.5 * args.steps * 2 * state_bytes + 2 * state_bytes)
        for b in sorted(set(budgets)):
            split, est = _split_of(velocity, x0, budget=b, solver=solver, **kw)
            name = f"auto/{solver}/{b / all_graph:.4f}"
            cases[name] = dict(solver=solver, gradient="auto", budget=b)
            meta[name] = dict(solver=solver, budget_bytes=b, budget_fraction=b / all_graph,
                              all_graph_estimate=all_graph, split=split, estimate_bytes=est)

    fns = {n: functools.partial(_gradient, velocity, x0, target, **kw, **c)
           for n, c in cases.items()}
    g_ref = fns["backprop"]()
    rows = []
    for name, fn in fns.items():
        fn()  # warm-up at this case (allocator pools, caches)
        mem = guard_oom(lambda: _memory(fn, net, device), device)
        g = fn()
        rows.append({"case": name, **cases[name], **meta.get(name, {}),
                     **({"status": "oom"} if mem == "oom" else {"status": "ok", **mem}),
                     "rel_err_vs_backprop": rel_err(g, g_ref)
                     if not cases[name]["solver"].startswith("reversible") else None})
        print(f"{name:34s} {meta.get(name, {}).get('split', '')} "
              f"peak {mem if mem == 'oom' else mem['peak_bytes'] / 2**20:.1f} MiB",
              file=sys.stderr, flush=True)
    clock = time.process_time if device.type == "cpu" and args.threads == 1 else time.perf_counter
    times = time_interleaved(fns, device, repeats=args.repeats, warmup=1, clock=clock)
    base = {n: median(times[n]) for n in ("backprop", "adjoint")}
    mem_base = {r["case"]: r.get("peak_bytes") for r in rows if r["case"] in base}
    for r in rows:
        t = times[r["case"]]
        r["times_s"] = t if isinstance(t, list) else None
        r["time_s"] = median(t) if isinstance(t, list) and t else None
        for b in base:
            r[f"time_ratio_vs_{b}"] = r["time_s"] / base[b] if r["time_s"] else None
            r[f"mem_ratio_vs_{b}"] = (r["peak_bytes"] / mem_base[b]
                                      if r.get("peak_bytes") and mem_base[b] else None)
    return {"benchmark": "budget", "command": cmd or command(MODULE),
            "config": {"device": args.device, "net": args.config, "batch": args.batch,
                       "steps": args.steps, "solvers": args.solvers, "fractions": args.fractions,
                       "repeats": args.repeats, "threads": args.threads, "seed": args.seed,
                       "state_bytes": state_bytes,
                       "clock": "process_time" if clock is time.process_time else "wall"},
            "rows": rows}


def markdown(doc: dict, meta: dict) -> str:
    cfg = doc["config"]
    where = meta.get("device_name", cfg["device"])
    peak = ("CUDA allocator peak above the pre-call allocation" if cfg["device"] == "cuda"
            else "bytes saved for backward (weights excluded)")
    lines = [f"# gradient=\"auto\" vs memory budget — {where}",
             "",
             f"Net `{cfg['net']}`, batch {cfg['batch']}, {cfg['steps']} steps, one gradient "
             f"d cost/d x0; median of {cfg['repeats']} ({cfg['clock']} time). Budget as a "
             f"fraction of auto's estimate for keeping every step's graph. Peak: {peak}. "
             f"Command: `{meta.get('command', '')}`", "",
             "| case | solver | budget | split graph/stored/reversible | time (s) | time / backprop "
             "| peak (MiB) | peak / backprop | peak / adjoint | grad err vs backprop |",
             "|:---|:---|---:|:---|---:|---:|---:|---:|---:|---:|"]

    def f(x, fmt):
        return "–" if x is None else format(x, fmt)
    for r in doc["rows"]:
        s = r.get("split")
        split = f"{s['graph']}/{s['stored']}/{s['reversible']}" if s else "–"
        case = r["case"].split("/")[0]
        lines.append(
            f"| {case} | {r['solver']} | {f(r.get('budget_fraction'), '.3f')} | {split} | "
            f"{f(r['time_s'], '.4f')} | {f(r['time_ratio_vs_backprop'], '.2f')} | "
            f"{f(r['peak_bytes'] / 2**20 if r.get('peak_bytes') else None, '.1f')} | "
            f"{f(r['mem_ratio_vs_backprop'], '.3f')} | {f(r['mem_ratio_vs_adjoint'], '.2f')} | "
            f"{f(r['rel_err_vs_backprop'], '.1e')} |")
    lines += ["", "Rows with the reversible solver have no error vs backprop: they discretize the "
              "ODE differently (tests check them against backprop through the same solver)."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, stem: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ends = {r["case"]: r for r in doc["rows"] if "/" not in r["case"]}
    for solver in doc["config"]["solvers"]:
        rs = sorted((r for r in doc["rows"] if r.get("solver") == solver and "/" in r["case"]
                     and r["time_s"]), key=lambda r: r["budget_fraction"])
        xs = [r["budget_fraction"] for r in rs]
        axes[0].plot(xs, [r["time_s"] for r in rs], "o-", label=f"auto, {solver}")
        axes[1].plot(xs, [r["peak_bytes"] / 2**20 for r in rs], "o-", label=f"auto, {solver}")
    for name, ls in (("backprop", "--"), ("adjoint", ":")):
        r = ends.get(name)
        if r and r["time_s"]:
            axes[0].axhline(r["time_s"], ls=ls, color="gray", label=f"{name} (midpoint)")
            axes[1].axhline(r["peak_bytes"] / 2**20, ls=ls, color="gray", label=name)
    axes[0].set(xlabel="memory budget / all-graph estimate", ylabel="seconds per gradient")
    axes[1].set(xlabel="memory budget / all-graph estimate", ylabel="peak MiB")
    axes[0].legend(fontsize=8)
    cfg = doc["config"]
    fig.suptitle(f"gradient='auto' vs budget: {cfg['net']} net, batch {cfg['batch']}, "
                 f"{cfg['steps']} steps ({cfg['device']})")
    fig.tight_layout()
    out = stem.with_name(stem.name + "_budget.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = measure(args, command(MODULE, argv))
    meta = environment(args.device)
    path = write_json(args.out, payload, args.device, meta)
    md = path.with_suffix(".md")
    md.write_text(markdown(payload, {**meta, "command": payload["command"]}))
    written = [path, md] + ([plot(payload, path.with_suffix(""))] if args.plot else [])
    print(md.read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
