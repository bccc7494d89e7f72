"""Time and memory of ONE gradient d cost(x1)/d x0 through a fixed-step ODE solve.

Compares, on the same velocity, x0, target and steps:

- ``reference``: ``dflow_fast.reference.solve`` (plain unrolled loop, autograd): the baseline;
- ``backprop``:  ``dflow_fast.solve(..., gradient="backprop")``;
- ``adjoint``:   ``dflow_fast.solve(..., gradient="adjoint")`` (stored states, recompute + VJP).

cost(x1) = sum over samples of the per-sample mean squared error to a random target.
Per (steps, method): median time, peak memory, both as ratios to the reference of the same run,
and the relative gradient error ``||g - g_ref|| / ||g_ref||`` (and, optionally, against a float64
reference gradient, which shows how much of that error is float32 rounding).

Memory: on CPU the peak bytes saved for backward (``bench.common.SavedBytesMeter``: by storage,
live over forward + backward, model weights excluded); on CUDA the allocator's peak above what
was allocated before the call (``torch.cuda.max_memory_allocated``), with the saved bytes also
recorded. Out-of-memory cases are recorded as ``"status": "oom"``.

Examples (from the repository root)::

    python bench/bench_gradient.py --plot                      # CPU, "small" net, ~1-2 min
    python bench/bench_gradient.py --device cuda --plot        # CUDA, 35M-parameter "gpu" net

Writes ``bench/results/gradient_<device>[_<config>].{json,md}`` (+ ``_memory.png``,
``_time.png`` with ``--plot``); the config suffix is left out for the device's default config.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, bench package
from bench import common as C  # noqa: E402

DEFAULT_CONFIG = {"cpu": "small", "cuda": "gpu"}
DEFAULT_BATCH = {"tiny": 2, "small": 4, "gpu": 8}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", choices=sorted(C.CONFIGS),
                   help="velocity net (default: small on cpu, gpu on cuda)")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    p.add_argument("--batch", type=int, help="default: tiny 2, small 4, gpu 8")
    p.add_argument("--solver", choices=["midpoint", "euler"], default="midpoint")
    p.add_argument("--methods", nargs="+", default=list(C.METHODS),
                   help="reference, backprop, adjoint, or <gradient>-<backend> such as "
                        "adjoint-cuda, adjoint-triton, adjoint-torch")
    p.add_argument("--repeats", type=int, help="timed repeats (default: 3 on cpu, 5 on cuda)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a steady number on a shared machine)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--fp64-check", action=argparse.BooleanOptionalAction, default=None,
                   help="also compare every gradient with a float64 reference gradient "
                        "(default: on for cpu, off for cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/gradient_<device>"
                                            "[_<config>].json); the .md and .png go beside it")
    p.add_argument("--plot", action="store_true", help="write memory and time plots (PNG)")
    a = p.parse_args(argv)
    a.config = a.config or DEFAULT_CONFIG[a.device]
    a.batch = a.batch or DEFAULT_BATCH[a.config]
    a.repeats = a.repeats or (3 if a.device == "cpu" else 5)
    if a.fp64_check is None:
        a.fp64_check = a.device == "cpu"
    if a.out is None:
        suffix = "" if a.config == DEFAULT_CONFIG[a.device] else f"_{a.config}"
        a.out = C.RESULTS_DIR / f"gradient_{a.device}{suffix}.json"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / on this machine")
    if min(a.steps) < 1 or a.batch < 1 or a.repeats < 1 or a.warmup < 0:
        p.error("steps, batch and repeats must be >= 1, warmup >= 0")
    return a


def measure(args) -> dict:
    """All rows of the benchmark; returns the JSON payload (without metadata)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    net, shape = C.build_velocity(args.config, device=device, dtype=dtype, seed=args.seed)
    import dflow_fast
    velocity = dflow_fast.ModelVelocity(net)
    velocity64 = dflow_fast.ModelVelocity(copy.deepcopy(net).double()) if args.fp64_check else None
    state_bytes = args.batch * torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(args.seed)

    nfe_per_step = 2 if args.solver == "midpoint" else 1
    rows = []
    for steps in args.steps:
        x0 = torch.randn(args.batch, *shape, generator=gen).to(device=device, dtype=dtype)
        target = torch.randn(args.batch, *shape, generator=gen).to(device=device, dtype=dtype)
        kw = dict(steps=steps, solver=args.solver)
        g64 = None
        if args.fp64_check:
            g64 = C.guard_oom(lambda: C.one_gradient("reference", velocity64, x0.double(),
                                                     target.double(), **kw), device)
            g64 = None if isinstance(g64, str) else g64

        # Memory runs, one per method; they also give the gradients compared below. The hooks
        # cost time, so the timed runs are separate and unhooked.
        mem, grads = {}, {}
        for method in args.methods:
            def mem_run():
                if device.type == "cuda":
                    (g, meter), peak = C.cuda_peak(lambda: C.saved_bytes_gradient(
                        method, velocity, net, x0, target, **kw), device)
                    return g, meter, peak
                g, meter = C.saved_bytes_gradient(method, velocity, net, x0, target, **kw)
                return g, meter, meter.peak
            out = C.guard_oom(mem_run, device)
            if out != "oom":
                grads[method], meter, peak = out
                mem[method] = dict(peak_bytes=int(peak), peak_mib=peak / C.MIB,
                                   saved_peak_bytes=meter.peak,
                                   saved_after_forward_bytes=meter.after_forward)
            del out
            gc.collect()

        times = C.time_interleaved(
            {m: functools.partial(C.one_gradient, m, velocity, x0, target, **kw)
             for m in args.methods if m in mem},
            device, repeats=args.repeats, warmup=args.warmup)

        ref_ok = "reference" in mem and isinstance(times.get("reference"), list)
        for method in args.methods:
            row = {"steps": steps, "nfe": steps * nfe_per_step, "batch": args.batch,
                   "solver": args.solver, "method": method, "dtype": args.dtype,
                   "state_bytes": state_bytes}
            t = times.get(method, "oom")
            if method not in mem or t == "oom":
                row.update(status="oom", time_s=None, times_s=None, peak_bytes=None,
                           peak_mib=None, saved_peak_bytes=None, saved_after_forward_bytes=None,
                           time_ratio_vs_ref=None, mem_ratio_vs_ref=None, rel_err_vs_ref=None,
                           rel_err_vs_fp64=None)
                rows.append(row)
                print(f"steps={steps:3d} {method:9s} out of memory", file=sys.stderr, flush=True)
                continue
            row.update(status="ok", time_s=C.median(t), times_s=t, **mem[method])
            # Ratios and errors against the reference of this run (None when it ran out of
            # memory or was not selected).
            row["time_ratio_vs_ref"] = (row["time_s"] / C.median(times["reference"])
                                        if ref_ok else None)
            ref_peak = mem["reference"]["peak_bytes"] if ref_ok else 0
            row["mem_ratio_vs_ref"] = row["peak_bytes"] / ref_peak if ref_peak else None
            row["rel_err_vs_ref"] = (C.rel_err(grads[method], grads["reference"])
                                     if "reference" in grads else None)
            row["rel_err_vs_fp64"] = None if g64 is None else C.rel_err(grads[method], g64)
            rows.append(row)
            print(f"steps={steps:3d} {method:9s} {row['time_s']:.4f} s  "
                  f"{row['peak_mib']:9.2f} MiB", file=sys.stderr, flush=True)
        del grads, g64, x0, target
        gc.collect()

    return {
        "benchmark": "gradient",
        "command": " ".join(["python", _script_path(), *sys.argv[1:]]),
        "config": {
            "net": args.config, "net_config": asdict(C.CONFIGS[args.config]),
            "n_params": C.n_params(net), "state_shape": [args.batch, *shape],
            "dtype": args.dtype, "solver": args.solver, "batch": args.batch,
            "steps": args.steps, "methods": args.methods, "repeats": args.repeats,
            "warmup": args.warmup, "threads": torch.get_num_threads(), "seed": args.seed,
            "cost": "sum_b mean((x1_b - target_b)^2), target ~ N(0, I); gradient w.r.t. x0 only",
            "memory": ("CUDA allocator peak above the pre-call allocation"
                       if device.type == "cuda" else
                       "peak bytes saved for backward (saved_tensors_hooks; by storage; live "
                       "over forward+backward; model weights excluded)"),
            "time": ("CUDA events" if device.type == "cuda" else "time.perf_counter")
                    + ", median of repeats after warm-up; methods timed round-robin",
        },
        "results": rows,
    }


def _script_path() -> str:
    here = Path(__file__).resolve()
    return str(here.relative_to(C.REPO_ROOT)) if here.is_relative_to(C.REPO_ROOT) else str(here)


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def markdown(payload: dict, meta: dict) -> str:
    cfg = payload["config"]
    mem = "peak alloc (MiB)" if meta["device"].startswith("cuda") else "peak saved (MiB)"
    commit = f"`{(meta.get('commit') or 'unknown')[:12]}`"
    commit += " (+ local edits)" if meta.get("dirty") else ""
    lines = [
        f"# One gradient d cost(x1)/d x0: {meta['device_name']} ({meta['device']})",
        "",
        f"net `{cfg['net']}` ({cfg['n_params'] / 1e6:.2f}M params), state {cfg['state_shape']} "
        f"{cfg['dtype']}, solver {cfg['solver']}, median of {cfg['repeats']} after "
        f"{cfg['warmup']} warm-up, {cfg['threads']} thread(s); torch {meta['torch']}, commit "
        f"{commit}.",
        f"Memory: {cfg['memory']}. Ratios are against `reference` in the same run. "
        "\"saved after fwd\": bytes held for backward when the forward ends (the adjoint's N "
        "states). \"rel. err\": ||g - g_ref|| / ||g_ref|| of the gradient w.r.t. x0.",
        "",
        f"| steps | NFE | method | time (s) | time / ref | {mem} | mem / ref "
        "| saved after fwd (MiB) | rel. err vs ref | rel. err vs fp64 |",
        "|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['steps']} | {r['nfe']} | {r['method']} | {r['status']} | – "
                         f"| {r['status']} | – | – | – | – |")
            continue
        lines.append(
            f"| {r['steps']} | {r['nfe']} | {r['method']} | {r['time_s']:.3f} "
            f"| {_fmt(r.get('time_ratio_vs_ref'), '.2f')} | {r['peak_mib']:.2f} "
            f"| {_fmt(r.get('mem_ratio_vs_ref'), '.3f')} "
            f"| {_fmt(r['saved_after_forward_bytes'] / C.MIB, '.3f')} "
            f"| {_fmt(r.get('rel_err_vs_ref'), '.1e')} "
            f"| {_fmt(r.get('rel_err_vs_fp64'), '.1e')} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, meta: dict, stem: Path) -> list[Path]:
    """``<stem>_memory.png`` and ``<stem>_time.png``: one line per method over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = payload["config"]
    rows = [r for r in payload["results"] if r["status"] == "ok"]
    methods = [m for m in cfg["methods"] if any(r["method"] == m for r in rows)]
    # Hollow, larger reference markers: backprop often lies exactly on top of the reference.
    style = {"reference": dict(marker="o", ls="-", ms=9, mfc="none"),
             "backprop": dict(marker="s", ls="--", ms=4),
             "adjoint": dict(marker="^", ls="-")}
    title = (f"{meta['device_name']}: net {cfg['net']} ({cfg['n_params'] / 1e6:.2f}M), "
             f"batch {cfg['batch']}, {cfg['solver']}")
    out = []
    for key, ylabel, name in [("peak_mib", "peak memory (MiB)", "memory"),
                              ("time_s", "time per gradient (s)", "time")]:
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
        for m in methods:
            pts = [(r["steps"], r[key]) for r in rows if r["method"] == m]
            ax.plot(*zip(*pts), label=m, **style.get(m, {}))
        if name == "memory":
            # What the adjoint keeps across steps (saved at the end of its forward): one state
            # per step, the only part of its memory that grows with N.
            pts = [(r["steps"], r["saved_after_forward_bytes"] / C.MIB) for r in rows
                   if r["method"] == "adjoint" and r.get("saved_after_forward_bytes")]
            if pts:
                ax.plot(*zip(*pts), color="grey", ls=":", marker="x",
                        label="adjoint: saved after forward (N states)")
        oom = sorted({(r["steps"], r["method"]) for r in payload["results"]
                      if r["status"] == "oom"})
        if oom:
            ax.text(0.02, 0.02, "out of memory: " + ", ".join(f"{m}@{s}" for s, m in oom),
                    transform=ax.transAxes, fontsize=8, color="red")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["steps"] for r in payload["results"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(f"steps ({cfg['solver']})")
        if name == "memory" and not meta["device"].startswith("cuda"):
            ylabel = "peak bytes saved for backward (MiB)"
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{name}.png")
        fig.savefig(path)
        plt.close(fig)
        out.append(path)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = measure(args)
    meta = C.environment(args.device)
    path = C.write_json(args.out, payload, args.device, meta)
    table = markdown(payload, meta)
    md = path.with_suffix(".md")
    md.write_text(table)
    written = [path, md]
    if args.plot:
        written += plot(payload, meta, path.with_suffix(""))
    print()
    print(table)
    print("wrote " + ", ".join(str(p.relative_to(C.REPO_ROOT)) if p.is_relative_to(C.REPO_ROOT)
                               else str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
