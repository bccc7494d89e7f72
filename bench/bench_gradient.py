"""Time and memory of ONE gradient d cost(x1)/d x0 through a fixed-step ODE solve.

Compares, on the same velocity, x0, target, steps and batch:

- ``reference``: ``dflow_fast.reference.solve`` (plain unrolled loop, autograd): the baseline;
- ``backprop``:  ``dflow_fast.solve(..., gradient="backprop")``;
- ``adjoint``:   ``dflow_fast.solve(..., gradient="adjoint")`` (stored states, recompute + VJP),
  ``adjoint-<backend>`` for each backend (``--methods all``: every one this device has);
- peers (``--methods all`` or ``peers``, when installed): ``checkpoint`` (torch.utils.checkpoint
  around each step), ``torchdiffeq`` (odeint, backprop, t = the grid), ``torchdiffeq-adjoint``
  (odeint_adjoint, t = the grid: the continuous adjoint, restarted from each stored state),
  ``torchdiffeq-adjoint-ss`` (odeint_adjoint, t = [0, 1] with step_size 1/N: x reconstructed
  backward, O(1) states), ``flow_matching`` (ODESolver.sample(enable_grad=True));
- ``vjp`` (always, unless ``--no-vjp``): one network evaluation and its VJP at the same batch,
  the unit of the adjoint's memory goal; not a solve, so no ratio or error. Timed with it: one
  evaluation without a graph (``eval``). Backprop costs about N_eval x t_vjp and the adjoint
  N_eval x (t_eval + t_vjp) (its forward sweep without a graph, then each evaluation again with
  its VJP), so ``1 + t_eval / t_vjp`` is the adjoint-to-backprop time ratio that the evaluation
  count alone predicts, reported beside the measured one in the goals.

cost(x1) = sum over samples of the per-sample mean squared error to a random target.
Per (batch, steps, method): median time, peak memory, both as ratios to the reference of the same
run, velocity calls per gradient, and the relative gradient error ``||g - g_ref|| / ||g_ref||``
(and against a float64 gradient of the same discrete solve, which separates float32 rounding from
method error: torchdiffeq's continuous adjoints approximate that gradient).

Memory, CPU: the peak bytes saved for backward (``bench.lib.SavedBytesMeter``: by storage, live
over forward + backward, model weights excluded; docs/design.md section 6's CPU measure) and the
peak resident set size above the pre-call size (``bench.lib.RssPeak``), which also sees
torch.utils.checkpoint (its own saved-tensor hooks hide it from the meter) and transients. CUDA:
the allocator's peak above what was allocated before the call (``torch.cuda.max_memory_allocated``),
with the saved bytes also recorded. Out-of-memory cases are recorded as ``"status": "oom"``.

Timing (on the CPU with one thread: this process's CPU time, which other jobs on a shared machine
do not inflate; ``--clock wall`` for wall time): per batch, every method once untimed at the
fewest steps (first calls at a shape allocate caches); then per (batch, steps) one measured call
per method (memory, gradients, call counts), ``--warmup`` untimed rounds, and ``--repeats`` timed
rounds, methods round-robin. Where steps x batch exceeds ``--big`` (CPU default 320):
``--repeats-big`` rounds (default 1) and no warm-up round (the measured call was the warm-up),
which keeps the CPU sweep to about half an hour.

Examples (from the repository root)::

    python -m bench.bench_gradient --plot                      # CPU, "small" net, batch 4, ~2 min
    python -m bench.bench_peers                                # CPU, + peers, batch 1 8 32
    python -m bench.bench_gradient --device cuda --plot        # CUDA, 35M-parameter "gpu" net

Writes ``bench/results/gradient_<device>[_<config>].{json,md}`` (+ ``_memory.png``, ``_rss.png``,
``_time.png``, ``_throughput.png`` with ``--plot``); the config suffix is left out for the
device's default config.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.lib import (CONFIGS, DEFAULT_NET, METHODS, MIB, PEER_METHODS, RESULTS_DIR,
                       CountingVelocity, RssPeak, available_methods, build_velocity, command,
                       cuda_peak, environment, guard_oom, import_peers, median, n_params, one_eval,
                       one_gradient, peer_available, rel_err, saved_bytes_gradient, shown,
                       time_interleaved, write_json)

MODULE = "bench.bench_gradient"

DEFAULT_BATCH = {"tiny": 2, "small": 4, "gpu": 8}
#: where the goals of the issue are read off (docs/design.md section 2's setting: 10 steps)
GOAL_STEPS = 10


def parse_args(argv=None, *, module=MODULE, description=None,
               out_stem="gradient") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {module}",
                                description=description or __doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", choices=sorted(CONFIGS),
                   help="velocity net (default: small on cpu, gpu on cuda)")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    p.add_argument("--batch", type=int, nargs="+", help="one or more (default: tiny 2, small 4, "
                                                        "gpu 8)")
    p.add_argument("--solver", choices=["midpoint", "euler"], default="midpoint")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="reference, backprop, adjoint, <gradient>-<backend> (adjoint-cpp, "
                        "adjoint-cuda, ...), peers (checkpoint, torchdiffeq, torchdiffeq-adjoint, "
                        "torchdiffeq-adjoint-ss, flow_matching), or 'all' (every method available "
                        "on the device) / 'peers' (the installed peers)")
    p.add_argument("--vjp", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure one network VJP (the memory goal's unit)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: 3 on cpu, 5 on cuda)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--big", type=int, help="steps x batch above which --repeats-big rounds and no "
                                           "warm-up round are used (default: 320 on cpu, none on "
                                           "cuda)")
    p.add_argument("--repeats-big", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a steady number on a shared machine)")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="CPU timings: this process's CPU time (auto with one thread: the wall "
                        "time of an unshared core, not inflated by other jobs on a shared "
                        "machine) or wall time (auto with more threads); CUDA: events")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--fp64-check", action=argparse.BooleanOptionalAction, default=None,
                   help="also compare every gradient with a float64 reference gradient "
                        "(default: on for cpu, off for cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help=f"JSON path (default: bench/results/{out_stem}_<device>"
                                            "[_<config>].json); the .md and .png go beside it")
    p.add_argument("--plot", action="store_true", help="write memory, time and throughput plots")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-render the Markdown (and with --plot the plots) of a result file")
    a = p.parse_args(argv)
    if a.render:
        return a
    a.config = a.config or DEFAULT_NET[a.device]
    a.batch = a.batch or [DEFAULT_BATCH[a.config]]
    a.repeats = a.repeats or (3 if a.device == "cpu" else 5)
    if a.clock == "auto":  # CPU time counts every thread: only with one is it a wall time
        a.clock = "cpu" if a.device == "cpu" and a.threads == 1 else "wall"
    if a.big is None:
        a.big = 320 if a.device == "cpu" else 0
    if a.fp64_check is None:
        a.fp64_check = a.device == "cpu"
    if a.out is None:
        suffix = "" if a.config == DEFAULT_NET[a.device] else f"_{a.config}"
        a.out = RESULTS_DIR / f"{out_stem}_{a.device}{suffix}.json"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / on this machine")
    if min(a.steps) < 1 or min(a.batch) < 1 or a.repeats < 1 or a.warmup < 0 \
            or a.repeats_big < 1:
        p.error("steps, batch and repeats must be >= 1, warmup >= 0")
    a.methods = expand_methods(a.methods, a.device, p.error)
    return a


def expand_methods(names: list[str], device: str, error) -> list[str]:
    """Resolve 'all' / 'peers', drop 'vjp' (measured separately), check peers are installed."""
    avail = available_methods(device)
    out: list[str] = []
    for n in names:
        if n == "all":
            add = avail
        elif n == "peers":
            add = [m for m in avail if m in PEER_METHODS]
        else:
            why = peer_available(n)
            if why:
                error(f"method {n}: {why}")
            add = [n]
        out += [m for m in add if m not in out and m != "vjp"]
    return out


def _measured_call(method, counted, net, x0, target, kw, device):
    """One gradient under the memory meters and a call counter: (g, memory dict, calls).
    ``counted``: the run's one CountingVelocity around the velocity, the same object at every
    call (gradient="auto" measures its memory plan once per velocity object, which the untimed
    warm-up does, as an application's first call would)."""
    counted.n = 0

    def run():
        return saved_bytes_gradient(method, counted, net, x0, target, **kw)

    if device.type == "cuda":
        (g, meter), peak = cuda_peak(run, device)
        rss = None
    elif RssPeak.available():
        (g, meter), rss = RssPeak.measure(run)
        peak = meter.peak
    else:
        (g, meter), rss, peak = run(), None, None
        peak = meter.peak
    hidden = method == "checkpoint"  # its own saved-tensor hooks take precedence over the meter
    mem = dict(peak_bytes=None if hidden and device.type == "cpu" else int(peak),
               saved_peak_bytes=None if hidden else meter.peak,
               saved_after_forward_bytes=None if hidden else meter.after_forward,
               rss_peak_bytes=rss)
    mem["peak_mib"] = None if mem["peak_bytes"] is None else mem["peak_bytes"] / MIB
    return g, mem, counted.n


def measure(args, cmd: str | None = None) -> dict:
    """All rows of the benchmark; returns the JSON payload (without metadata). ``cmd``: the
    command recorded with it (default: this module with this process's arguments)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    net, shape = build_velocity(args.config, device=device, dtype=dtype, seed=args.seed)
    import dflow_fast
    velocity = dflow_fast.ModelVelocity(net)
    counted = CountingVelocity(velocity)  # the measured calls' velocity (memory, call counts)
    velocity64 = dflow_fast.ModelVelocity(copy.deepcopy(net).double()) if args.fp64_check else None
    gen = torch.Generator().manual_seed(args.seed)
    nfe_per_step = 2 if args.solver == "midpoint" else 1
    methods = list(args.methods) + (["vjp"] if args.vjp else [])

    rows, vjp_rows = [], []
    for batch in args.batch:
        state_bytes = batch * torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
        # Every method once at this batch and the fewest steps, untimed: first calls at a new
        # shape allocate caches (oneDNN primitives, allocator pools) that would otherwise land in
        # the memory measured for whichever method runs first.
        xw = torch.randn(batch, *shape, generator=gen).to(device=device, dtype=dtype)
        for m in methods:
            for v in (velocity, counted):  # the timed and the measured calls' velocity
                guard_oom(functools.partial(one_gradient, m, v, xw, xw,
                                            steps=min(args.steps), solver=args.solver), device)
        del xw
        for steps in args.steps:
            x0 = torch.randn(batch, *shape, generator=gen).to(device=device, dtype=dtype)
            target = torch.randn(batch, *shape, generator=gen).to(device=device, dtype=dtype)
            kw = dict(steps=steps, solver=args.solver)
            big = args.big and steps * batch > args.big
            todo = methods if steps == args.steps[0] else args.methods  # vjp once per batch
            g64 = None
            # The float64 oracle: the reference loop; at big sizes the same loop under
            # torch.utils.checkpoint (same arithmetic, rounding 1e-16), because a float64 graph
            # of 40 steps at batch 32 would need 16 GB here.
            oracle = "checkpoint" if big else "reference"
            if args.fp64_check:
                g64 = guard_oom(functools.partial(one_gradient, oracle, velocity64,
                                                  x0.double(), target.double(), **kw), device)
                g64 = None if isinstance(g64, str) else g64

            mem, grads, calls = {}, {}, {}
            for method in todo:
                out = guard_oom(functools.partial(_measured_call, method, counted, net, x0,
                                                  target, kw, device), device)
                if out != "oom":
                    grads[method], mem[method], calls[method] = out
                del out
                gc.collect()

            fns = {m: functools.partial(one_gradient, m, velocity, x0, target, **kw)
                   for m in todo if m in mem}
            if "vjp" in fns:
                fns["eval"] = functools.partial(one_eval, velocity, x0)
            times = time_interleaved(
                fns,
                device, repeats=args.repeats_big if big else args.repeats,
                warmup=0 if big else args.warmup,
                clock=time.process_time if args.clock == "cpu" else time.perf_counter)

            def med(m):
                t = times.get(m)
                return median(t) if isinstance(t, list) and t else None

            if "vjp" in todo:
                vjp_rows.append(_vjp_row(batch, med("vjp"), times.get("vjp"), mem.get("vjp"),
                                         state_bytes, args.dtype, med("eval"), times.get("eval")))
            base = {m: (med(m), mem.get(m, {})) for m in ("reference", "backprop")}
            for method in args.methods:
                row = {"steps": steps, "nfe": steps * nfe_per_step, "batch": batch,
                       "solver": args.solver, "method": method, "dtype": args.dtype,
                       "state_bytes": state_bytes, "repeats": len(times.get(method) or [])
                       if isinstance(times.get(method), list) else 0}
                t = med(method)
                if method not in mem or t is None:
                    row.update(status="oom", time_s=None, times_s=None)
                    rows.append(row)
                    print(f"batch={batch:3d} steps={steps:3d} {method:22s} out of memory",
                          file=sys.stderr, flush=True)
                    continue
                row.update(status="ok", time_s=t, times_s=times[method], **mem[method],
                           velocity_calls=calls[method])
                for name, (bt, bm) in base.items():  # ratios against this run's baselines
                    row[f"time_ratio_vs_{'ref' if name == 'reference' else name}"] = \
                        _ratio(t, bt)
                    suffix = "ref" if name == "reference" else name
                    row[f"mem_ratio_vs_{suffix}"] = _ratio(row["peak_bytes"], bm.get("peak_bytes"))
                    row[f"rss_ratio_vs_{suffix}"] = _ratio(row["rss_peak_bytes"],
                                                           bm.get("rss_peak_bytes"))
                row["rel_err_vs_ref"] = (rel_err(grads[method], grads["reference"])
                                         if "reference" in grads else None)
                row["rel_err_vs_fp64"] = None if g64 is None else rel_err(grads[method], g64)
                row["fp64_oracle"] = None if g64 is None else oracle
                rows.append(row)
                print(f"batch={batch:3d} steps={steps:3d} {method:22s} {t:8.4f} s  "
                      f"saved {_fmt(row['peak_mib'], '9.2f')} MiB  rss "
                      f"{_fmt(_mib(row['rss_peak_bytes']), '9.2f')} MiB  "
                      f"err {_fmt(row['rel_err_vs_ref'], '.1e')}", file=sys.stderr, flush=True)
            del grads, g64, x0, target
            gc.collect()

    payload = {
        "benchmark": "gradient",
        "command": cmd or command(MODULE),
        "config": {
            "net": args.config, "net_config": asdict(CONFIGS[args.config]),
            "n_params": n_params(net), "state_shape": [None, *shape],
            "dtype": args.dtype, "solver": args.solver, "batch": args.batch,
            "steps": args.steps, "methods": args.methods, "repeats": args.repeats,
            "warmup": args.warmup, "big": args.big, "repeats_big": args.repeats_big,
            "threads": torch.get_num_threads(), "seed": args.seed,
            "peers": _peer_versions(),
            "cost": "sum_b mean((x1_b - target_b)^2), target ~ N(0, I); gradient w.r.t. x0 only",
            "memory": ("CUDA allocator peak above the pre-call allocation"
                       if device.type == "cuda" else
                       "peak bytes saved for backward (saved_tensors_hooks; by storage; live "
                       "over forward+backward; model weights excluded); rss: peak resident set "
                       "size above the pre-call size (VmHWM after clear_refs)"),
            "time": ("CUDA events" if device.type == "cuda" else
                     "time.process_time (this process's CPU time, 1 thread)"
                     if args.clock == "cpu" else "time.perf_counter (wall)")
                    + ", median of repeats after warm-up; methods timed round-robin",
            "clock": "cuda events" if device.type == "cuda" else args.clock,
        },
        "results": rows,
        "vjp": vjp_rows,
    }
    payload["goals"] = goals(payload)
    payload["auto_goals"] = auto_goals(payload)
    return payload


def _vjp_row(batch, t, times, mem, state_bytes, dtype, t_eval=None, eval_times=None) -> dict:
    """One network VJP at ``batch`` (time, memory) and one evaluation without a graph (time);
    ``adjoint_time_ratio_predicted = 1 + t_eval / t_vjp`` (see the module docstring)."""
    row = {"batch": batch, "method": "vjp", "dtype": dtype, "state_bytes": state_bytes}
    if mem is None or t is None:
        return {**row, "status": "oom"}
    return {**row, "status": "ok", "time_s": t, "times_s": times, **mem,
            "eval_time_s": t_eval, "eval_times_s": eval_times,
            "adjoint_time_ratio_predicted": None if t_eval is None else 1 + t_eval / t}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _mib(b):
    return None if b is None else b / MIB


def goals(payload: dict) -> list[dict]:
    """The issue's goals for every adjoint row at GOAL_STEPS steps (or the nearest measured):
    peak <= 1.15 x (one network VJP's peak + the stored states), peak <= backprop's / 10,
    time <= 1.45 x backprop's. Memory in the primary measure (saved bytes on CPU, allocator on
    CUDA), with the RSS versions alongside on CPU."""
    rows = [r for r in payload["results"] if r["status"] == "ok"]
    if not rows:
        return []
    steps = min({r["steps"] for r in rows}, key=lambda s: (abs(s - GOAL_STEPS), s))
    vjp = {v["batch"]: v for v in payload.get("vjp", []) if v.get("status") == "ok"}
    out = []
    for r in rows:
        if r["steps"] != steps or not r["method"].startswith("adjoint"):
            continue
        v = vjp.get(r["batch"], {})
        states = r.get("saved_after_forward_bytes")
        unit = (v["peak_bytes"] + states) if v.get("peak_bytes") is not None and states else None
        rss_unit = (v["rss_peak_bytes"] + states) if v.get("rss_peak_bytes") and states else None
        g = {"batch": r["batch"], "steps": steps, "method": r["method"],
             "mem_vs_vjp_plus_states": _ratio(r["peak_bytes"], unit),
             "rss_vs_vjp_plus_states": _ratio(r.get("rss_peak_bytes"), rss_unit),
             "mem_vs_backprop": r.get("mem_ratio_vs_backprop"),
             "rss_vs_backprop": r.get("rss_ratio_vs_backprop"),
             "time_vs_backprop": r.get("time_ratio_vs_backprop"),
             "time_vs_backprop_predicted": v.get("adjoint_time_ratio_predicted")}
        g["met"] = {
            "mem_vs_vjp_plus_states<=1.15": _le(g["mem_vs_vjp_plus_states"], 1.15),
            "mem_vs_backprop<=0.1": _le(g["mem_vs_backprop"], 0.1),
            "time_vs_backprop<=1.45": _le(g["time_vs_backprop"], 1.45)}
        out.append(g)
    return out


#: how the tables name dflow_fast's "auto" methods
LABELS = {"auto": "auto (default)", "auto-0": "auto, budget 0"}


def auto_goals(payload: dict) -> list[dict]:
    """gradient="auto" (the default) against backprop and the adjoint, per batch at GOAL_STEPS
    steps (or the nearest measured): with the default budget everything fits on these sizes, so
    auto's time <= 1.05 x backprop's; with budget 0 ("a small budget") its peak memory is the
    adjoint's (<= 1.0 x, the adjoint of the same backend "auto")."""
    rows = [r for r in payload["results"] if r["status"] == "ok"]
    if not rows:
        return []
    steps = min({r["steps"] for r in rows}, key=lambda s: (abs(s - GOAL_STEPS), s))
    at = {(r["batch"], r["method"]): r for r in rows if r["steps"] == steps}
    out = []
    for batch in sorted({b for b, _ in at}):
        auto, small, bp = (at.get((batch, m)) for m in ("auto", "auto-0", "backprop"))
        adj = at.get((batch, "adjoint")) or at.get((batch, "adjoint-cpp")) \
            or at.get((batch, "adjoint-cuda"))
        if auto is None or bp is None:
            continue
        g = {"batch": batch, "steps": steps,
             "time_vs_backprop": _ratio(auto["time_s"], bp["time_s"]),
             "mem_vs_backprop": _ratio(auto["peak_bytes"], bp["peak_bytes"]),
             "calls": auto["velocity_calls"], "backprop_calls": bp["velocity_calls"],
             "small_budget_mem_vs_adjoint": None if small is None or adj is None else
             _ratio(small["peak_bytes"], adj["peak_bytes"]),
             "small_budget_rss_vs_adjoint": None if small is None or adj is None else
             _ratio(small.get("rss_peak_bytes"), adj.get("rss_peak_bytes")),
             "adjoint_method": None if adj is None else adj["method"]}
        g["met"] = {"time_vs_backprop<=1.05": _le(g["time_vs_backprop"], 1.05),
                    "small_budget_mem_vs_adjoint<=1.0":
                        _le(g["small_budget_mem_vs_adjoint"], 1.0)}
        out.append(g)
    return out


def _le(x, bound):
    return None if x is None else bool(x <= bound)


def _peer_versions() -> dict:
    out = {}
    for mod in ("torchdiffeq", "flow_matching"):
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            out[mod] = None
    return out


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def markdown(payload: dict, meta: dict) -> str:
    cfg = payload["config"]
    cuda = meta["device"].startswith("cuda")
    mem = "peak alloc (MiB)" if cuda else "peak saved (MiB)"
    commit = f"`{(meta.get('commit') or 'unknown')[:12]}`"
    commit += " (+ local edits)" if meta.get("dirty") else ""
    peers = ", ".join(f"{k} {v}" for k, v in cfg.get("peers", {}).items() if v)
    lines = [
        f"# One gradient d cost(x1)/d x0: {meta['device_name']} ({meta['device']})",
        "",
        f"net `{cfg['net']}` ({cfg['n_params'] / 1e6:.2f}M params), state "
        f"[B, {', '.join(map(str, cfg['state_shape'][1:]))}] {cfg['dtype']}, solver "
        f"{cfg['solver']}, median of {cfg['repeats']} timed rounds after {cfg['warmup']} warm-up "
        + (f"({cfg['repeats_big']} round, no warm-up, where steps x batch > {cfg['big']})"
           if cfg.get("big") else "").rstrip()
        + f", methods round-robin, {cfg['threads']} thread(s), clock: "
        + {"cpu": "process CPU time", "wall": "wall"}.get(cfg.get("clock"), "CUDA events")
        + f"; torch {meta['torch']}"
        + (f", {peers}" if peers else "") + f"; commit {commit}.",
        f"Memory: {cfg['memory']}. Ratios are against `reference` in the same run. "
        "\"calls\": velocity evaluations per gradient (forward + backward). \"rel. err\": "
        "||g - g_ref|| / ||g_ref|| of the gradient w.r.t. x0; vs fp64: against the float64 "
        "gradient of the same discrete solve (the reference loop in float64; where steps x "
        "batch > the big threshold, the same loop under torch.utils.checkpoint in float64, "
        "which keeps its graph out of memory).",
    ]
    if not cuda:
        lines.append("`checkpoint`: torch.utils.checkpoint's own saved-tensor hooks hide it from "
                     "the saved-bytes meter (\"n/a\"); its RSS column is measured.")
    rss = not cuda and any(r.get("rss_peak_bytes") for r in payload["results"])
    for batch in cfg["batch"]:
        lines += ["", f"## batch {batch}", ""]
        head = (f"| steps | method | calls | time (s) | time / ref | {mem} | mem / ref |"
                + (" RSS peak (MiB) | RSS / ref |" if rss else "")
                + " rel. err vs ref | rel. err vs fp64 |")
        lines += [head, "|" + "|".join(["---:"] + [":---"] + ["---:"] * (head.count("|") - 3))
                  + "|"]
        for r in payload["results"]:
            if r["batch"] != batch:
                continue
            if r["status"] != "ok":
                lines.append(f"| {r['steps']} | {LABELS.get(r['method'], r['method'])} | – | "
                             f"{r['status']} | – | "
                             f"{r['status']} | – |" + (" – | – |" if rss else "")
                             + " – | – |")
                continue
            lines.append(
                f"| {r['steps']} | {LABELS.get(r['method'], r['method'])} "
                f"| {r['velocity_calls']} | {r['time_s']:.3f} "
                f"| {_fmt(r.get('time_ratio_vs_ref'), '.2f')} "
                f"| {_fmt(r['peak_mib'], '.2f', 'n/a')} "
                f"| {_fmt(r.get('mem_ratio_vs_ref'), '.3f')} |"
                + (f" {_fmt(_mib(r.get('rss_peak_bytes')), '.1f')} "
                   f"| {_fmt(r.get('rss_ratio_vs_ref'), '.3f')} |" if rss else "")
                + f" {_fmt(r.get('rel_err_vs_ref'), '.1e')} "
                f"| {_fmt(r.get('rel_err_vs_fp64'), '.1e')} |")
        for v in payload.get("vjp", []):
            if v["batch"] == batch and v["status"] == "ok":
                lines += ["", f"One network VJP at batch {batch} (the memory goal's unit): "
                              f"{v['time_s'] * 1e3:.1f} ms, {mem} {_fmt(v['peak_mib'], '.2f')}"
                          + (f", RSS peak {_fmt(_mib(v.get('rss_peak_bytes')), '.1f')} MiB"
                             if rss else "") + "."
                          + (f" One evaluation without a graph: {v['eval_time_s'] * 1e3:.1f} ms."
                             if v.get("eval_time_s") is not None else "")]
    if payload.get("goals"):
        lines += ["", "## Goals (adjoint rows at "
                  f"{payload['goals'][0]['steps']} steps)", "",
                  "Goals: peak ≤ 1.15 x (one network VJP's peak + the stored states); "
                  "peak ≤ 1/10 of backprop's; time ≤ 1.45 x backprop's."
                  + (" Memory in saved bytes (RSS in parentheses)." if rss else "")
                  + " \"predicted\": 1 + t_eval / t_vjp, the time ratio the adjoint's extra "
                  "forward sweep alone explains (evaluation without a graph vs evaluation + "
                  "VJP, measured at the same batch).", "",
                  "| batch | method | peak / (VJP + states) | peak / backprop | time / backprop "
                  "| predicted |",
                  "|---:|:---|---:|---:|---:|---:|"]
        for g in payload["goals"]:
            def cell(key, rkey, bound):
                v = g[key]
                s = _fmt(v, ".4f" if "mem" in key else ".3f")
                if v is not None:
                    s += " ✓" if v <= bound else " ✗"
                if rss and g.get(rkey) is not None:
                    s += f" ({g[rkey]:.3f})"
                return s
            lines.append(f"| {g['batch']} | {g['method']} "
                         f"| {cell('mem_vs_vjp_plus_states', 'rss_vs_vjp_plus_states', 1.15)} "
                         f"| {cell('mem_vs_backprop', 'rss_vs_backprop', 0.1)} "
                         f"| {cell('time_vs_backprop', None, 1.45)} "
                         f"| {_fmt(g.get('time_vs_backprop_predicted'), '.3f')} |")
    lines += _auto_goal_lines(payload.get("auto_goals") or [], rss)
    return "\n".join(lines) + "\n"


def _auto_goal_lines(goals_: list[dict], rss: bool) -> list[str]:
    """The table of :func:`auto_goals`."""
    if not goals_:
        return []

    def mark(v, bound, spec):
        return "–" if v is None else format(v, spec) + (" ✓" if v <= bound else " ✗")

    lines = ["", f"## gradient=\"auto\" (the default) at {goals_[0]['steps']} steps", "",
             "Goals: with the default budget (everything fits here) time ≤ 1.05 x backprop's; "
             "with budget 0 peak memory ≤ the adjoint's (same backend). \"calls\": velocity "
             "evaluations per gradient; the measuring step of auto's memory plan runs once per "
             "velocity (in the untimed warm-up call here), not per gradient."
             + (" Memory in saved bytes (RSS in parentheses)." if rss else ""), "",
             "| batch | auto calls | backprop calls | auto time / backprop | auto peak / backprop "
             "| budget 0: peak / adjoint |", "|---:|---:|---:|---:|---:|---:|"]
    for g in goals_:
        small = mark(g["small_budget_mem_vs_adjoint"], 1.0, ".4f")
        if rss and g.get("small_budget_rss_vs_adjoint") is not None:
            small += f" ({g['small_budget_rss_vs_adjoint']:.3f})"
        lines.append(f"| {g['batch']} | {g['calls']} | {g['backprop_calls']} "
                     f"| {mark(g['time_vs_backprop'], 1.05, '.3f')} "
                     f"| {_fmt(g['mem_vs_backprop'], '.4f')} | {small} |")
    return lines


_STYLE = {"reference": dict(marker="o", ls="-", ms=9, mfc="none", color="black"),
          "backprop": dict(marker="s", ls="--", ms=4, color="tab:blue"),
          "adjoint": dict(marker="^", ls="-", color="tab:red"),
          "adjoint-torch": dict(marker="v", ls="-", color="tab:orange"),
          "adjoint-cpp": dict(marker="^", ls="-", color="tab:red"),
          "adjoint-cuda": dict(marker="^", ls="-", color="tab:red"),
          "adjoint-triton": dict(marker="<", ls="-", color="tab:pink"),
          "checkpoint": dict(marker="D", ls="-.", color="tab:green"),
          "torchdiffeq": dict(marker="x", ls=":", color="tab:purple"),
          "torchdiffeq-adjoint": dict(marker="P", ls="-.", color="tab:brown"),
          "torchdiffeq-adjoint-ss": dict(marker="*", ls="-.", color="tab:olive"),
          "flow_matching": dict(marker="+", ls=":", ms=9, color="tab:cyan")}


def _legend_below(fig, axes) -> None:
    """One legend for all panels, below them (inside a panel it would hide lines)."""
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    handles, labels = list(seen.values()), list(seen)
    ncol = min(len(labels), 5)
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 0.95))


def plot(payload: dict, meta: dict, stem: Path) -> list[Path]:
    """``<stem>_memory.png``, ``_rss.png`` (CPU), ``_time.png``: one panel per batch, one line
    per method over steps; ``_throughput.png`` (several batches): samples per second vs batch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = payload["config"]
    cuda = meta["device"].startswith("cuda")
    rows = [r for r in payload["results"] if r["status"] == "ok"]
    methods = [m for m in cfg["methods"] if any(r["method"] == m for r in rows)]
    batches = cfg["batch"]
    title = (f"{meta['device_name']}: net {cfg['net']} ({cfg['n_params'] / 1e6:.2f}M), "
             f"{cfg['solver']}")
    panels = [("peak_mib", "peak bytes saved for backward (MiB)" if not cuda
               else "peak memory (MiB)", "memory"),
              ("time_s", "time per gradient (s)", "time")]
    if any(r.get("rss_peak_bytes") for r in rows):
        panels.insert(1, ("rss_mib", "peak RSS above pre-call (MiB)", "rss"))
    out = []
    for key, ylabel, name in panels:
        fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.4), dpi=110,
                                 squeeze=False)
        for ax, batch in zip(axes[0], batches):
            for m in methods:
                pts = [(r["steps"], _mib(r.get("rss_peak_bytes")) if key == "rss_mib"
                        else r[key]) for r in rows if r["method"] == m and r["batch"] == batch]
                pts = [p for p in pts if p[1]]
                if pts:
                    ax.plot(*zip(*pts), label=m, **_STYLE.get(m, {}))
            vjp = [v for v in payload.get("vjp", []) if v["batch"] == batch
                   and v.get("status") == "ok"]
            vkey = {"peak_mib": "peak_mib", "rss_mib": "rss_peak_bytes", "time_s": "time_s"}[key]
            if vjp and vjp[0].get(vkey):
                val = vjp[0][vkey] / (MIB if key == "rss_mib" else 1)
                ax.axhline(val, color="grey", ls=":", lw=1, label="one network VJP")
            oom = sorted({(r["steps"], r["method"]) for r in payload["results"]
                          if r["status"] == "oom" and r["batch"] == batch})
            if oom:
                ax.text(0.02, 0.02, "out of memory: " + ", ".join(f"{m}@{s}" for s, m in oom),
                        transform=ax.transAxes, fontsize=7, color="red")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(cfg["steps"])
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel(f"steps ({cfg['solver']})")
            ax.set_ylabel(ylabel)
            ax.set_title(f"batch {batch}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        _legend_below(fig, axes[0])
        fig.suptitle(title, fontsize=10)
        path = stem.with_name(f"{stem.name}_{name}.png")
        fig.savefig(path)
        plt.close(fig)
        out.append(path)
    if len(batches) > 1:
        fig, axes = plt.subplots(1, len(cfg["steps"]), figsize=(4.2 * len(cfg["steps"]), 4.2),
                                 dpi=110, squeeze=False)
        for ax, steps in zip(axes[0], cfg["steps"]):
            for m in methods:
                pts = [(r["batch"], r["batch"] / r["time_s"]) for r in rows
                       if r["method"] == m and r["steps"] == steps]
                if pts:
                    ax.plot(*zip(*sorted(pts)), label=m, **_STYLE.get(m, {}))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(batches)
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("batch")
            ax.set_ylabel("samples' gradients per second")
            ax.set_title(f"{steps} steps", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        _legend_below(fig, axes[0])
        fig.suptitle("throughput vs batch — " + title, fontsize=10)
        path = stem.with_name(f"{stem.name}_throughput.png")
        fig.savefig(path)
        plt.close(fig)
        out.append(path)
    return out


def main(argv=None, *, preset=(), module=MODULE, **parse_kw) -> int:
    """Run (or with ``--render`` re-render) the benchmark. ``argv``: the options (default: the
    command line); ``preset``: options parsed before them (the caller's defaults, left out of the
    recorded command); ``module``: the script named in the usage line and the recorded command;
    ``parse_kw``: ``description``, ``out_stem`` of :func:`parse_args`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args([*preset, *argv], module=module, **parse_kw)
    if args.render:
        doc = json.loads(args.render.read_text())
        meta = doc.pop("meta")
        doc["goals"] = goals(doc)
        doc["auto_goals"] = auto_goals(doc)
        write_json(args.render, doc, meta["device"], meta)
        args.render.with_suffix(".md").write_text(markdown(doc, meta))
        if args.plot:
            plot(doc, meta, args.render.with_suffix(""))
        return 0
    torch.set_num_threads(args.threads)
    # The memory measurements collect garbage before every call; once torch.utils.checkpoint has
    # imported torch._dynamo, a full collection walks ~10^6 objects (0.2 s). Freezing what exists
    # now (modules, the net) leaves the collections only the garbage of the calls.
    import_peers()
    gc.freeze()
    try:
        payload = measure(args, command(module, argv))
    finally:
        gc.unfreeze()
    meta = environment(args.device)
    path = write_json(args.out, payload, args.device, meta)
    table = markdown(payload, meta)
    md = path.with_suffix(".md")
    md.write_text(table)
    written = [path, md]
    if args.plot:
        written += plot(payload, meta, path.with_suffix(""))
    print()
    print(table)
    print("wrote " + ", ".join(shown(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
