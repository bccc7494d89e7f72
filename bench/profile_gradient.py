"""Where one gradient's time goes, per method: torch.profiler around one gradient d cost(x1)/d x0
through a midpoint solve of the U-Net velocity (the gradient benchmark's problem).

Why: on the H100 the adjoint's three backends differ by 30-80 ms per gradient (batch 8, 10 steps)
although they differ only in elementwise kernels of ~10 us, and absolute times moved up to 2x
between processes (bench/results/README.md, "Time"). This separates the candidates: device time
actually spent in kernels, host time, kernel launches, host-device syncs and memcpys, and
``cudaMalloc``/``cudaFree`` calls (the caching allocator growing or shrinking) per gradient.

Per method: the median of ``--repeats`` un-profiled timed rounds (round-robin, as in
bench.bench_gradient), then one profiled call after ``--warmup`` calls. Reported: wall time of the
profiled call, device busy time (sum of the kernels' self device time; CUDA only) and the idle
fraction of the wall time, host self time of all ops, counts of launches / syncs / memcpys /
mallocs / frees, and the top ops by self device (CUDA) or host (CPU) time.

    python -m bench.profile_gradient --device cuda             # 35M "gpu" net, batch 8, 10 steps
    python -m bench.profile_gradient --config tiny --batch 2   # CPU smoke run

Writes ``bench/results/profile_<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.lib import (RESULTS_DIR, add_net_options, available_methods, build_velocity,
                       check_net_options, command, median, n_params, one_gradient, time_interleaved,
                       write_result)

MODULE = "bench.profile_gradient"

#: host-side CUDA runtime/driver calls counted per gradient, by kind
CALLS = {"launches": ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                      "cuLaunchKernelEx"),
         "syncs": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
         "memcpys": ("cudaMemcpyAsync", "cudaMemcpy"),
         "mallocs": ("cudaMalloc",),
         "frees": ("cudaFree",)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_net_options(p, batch=8, steps=10)
    p.add_argument("--methods", nargs="+",
                   help="default: backprop and the adjoint on every backend of the device")
    p.add_argument("--repeats", type=int, default=5, help="un-profiled timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="calls before the profiled one")
    p.add_argument("--top", type=int, default=8, help="ops listed per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path,
                   help="JSON path (default bench/results/profile_<device>.json)")
    a = p.parse_args(argv)
    check_net_options(p, a)
    if min(a.batch, a.steps, a.repeats, a.top) < 1 or a.warmup < 0:
        p.error("batch, steps, repeats and top must be >= 1, warmup >= 0")
    a.methods = a.methods or [m for m in available_methods(a.device)
                              if m == "backprop" or m.startswith("adjoint-")]
    a.out = a.out or RESULTS_DIR / f"profile_{a.device}.json"
    return a


def _self_device_us(e) -> float:
    # torch >= 2.4 names it self_device_time_total; older releases self_cuda_time_total
    return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))


def profile_one(fn, device: torch.device, warmup: int, top: int) -> dict:
    """One call of ``fn`` under torch.profiler after ``warmup`` calls: times (s), call counts and
    the ``top`` ops by self device time (CUDA) or self host time (CPU)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    counts = {kind: sum(e.count for e in events if e.key in names)
              for kind, names in CALLS.items()}
    host = sum(e.self_cpu_time_total for e in events) / 1e6
    busy = sum(_self_device_us(e) for e in events) / 1e6 if cuda else None
    key = (lambda e: _self_device_us(e)) if cuda else (lambda e: e.self_cpu_time_total)
    top_ops = [{"op": e.key, "count": e.count, "self_s": key(e) / 1e6}
               for e in sorted(events, key=key, reverse=True)[:top] if key(e) > 0]
    return {"wall_s": wall, "host_self_s": host, "device_busy_s": busy,
            "device_idle_fraction": None if busy is None else max(0.0, 1 - busy / wall),
            **counts, "top_ops": top_ops}


def measure(args, cmd: str | None = None) -> dict:
    device = torch.device(args.device)
    net, shape = build_velocity(args.config, device=device, seed=args.seed)
    import dflow_fast
    velocity = dflow_fast.ModelVelocity(net)
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(args.batch, *shape, generator=gen).to(device)
    target = torch.randn(args.batch, *shape, generator=gen).to(device)
    fns = {m: (lambda m=m: one_gradient(m, velocity, x0, target, steps=args.steps,
                                        solver="midpoint")) for m in args.methods}
    times = time_interleaved(fns, device, repeats=args.repeats, warmup=1)
    rows = []
    for m in args.methods:
        t = times[m]
        row = {"method": m, "status": "oom" if t == "oom" else "ok"}
        if t != "oom":
            row.update(time_s=median(t), times_s=t,
                       **profile_one(fns[m], device, args.warmup, args.top))
        rows.append(row)
        print(f"{m:16s} {row.get('time_s', float('nan')):8.4f} s", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["method"] == "backprop" and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["time_ratio_vs_backprop"] = r["time_s"] / base["time_s"]
    return {"benchmark": "profile_gradient",
            "command": cmd or command(MODULE),
            "config": {"net": args.config, "n_params": n_params(net),
                       "state_shape": [None, *shape], "batch": args.batch, "steps": args.steps,
                       "solver": "midpoint", "methods": args.methods, "repeats": args.repeats,
                       "warmup": args.warmup, "seed": args.seed,
                       "threads": torch.get_num_threads()},
            "results": rows}


def markdown(payload: dict, meta: dict) -> str:
    cfg = payload["config"]
    cuda = meta["device"].startswith("cuda")
    lines = [f"# Where one gradient's time goes: {meta['device_name']} ({meta['device']})", "",
             f"net `{cfg['net']}` ({cfg['n_params'] / 1e6:.2f}M params), batch {cfg['batch']}, "
             f"{cfg['steps']} midpoint steps; \"time\": median of {cfg['repeats']} un-profiled "
             f"rounds (round-robin); the other columns: one profiled call; torch "
             f"{meta['torch']}, commit `{(meta.get('commit') or 'unknown')[:12]}`.", "",
             "| method | time (s) | / backprop | profiled wall (s) | host self (s) "
             "| device busy (s) | device idle | launches | syncs | memcpys | mallocs | frees |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']} |" + " – |" * 10)
            continue
        lines.append(f"| {r['method']} | {r['time_s']:.4f} "
                     f"| {_fmt(r.get('time_ratio_vs_backprop'), '.3f')} | {r['wall_s']:.4f} "
                     f"| {r['host_self_s']:.4f} | {_fmt(r['device_busy_s'], '.4f')} "
                     f"| {_fmt(r['device_idle_fraction'], '.1%')} | {r['launches']} "
                     f"| {r['syncs']} | {r['memcpys']} | {r['mallocs']} | {r['frees']} |")
    for r in payload["results"]:
        if r["status"] == "ok" and r["top_ops"]:
            ops = "; ".join(f"{o['op']} x{o['count']} {o['self_s'] * 1e3:.2f} ms"
                            for o in r["top_ops"])
            lines += ["", f"Top ops of `{r['method']}` by self {'device' if cuda else 'host'} "
                          f"time: {ops}"]
    return "\n".join(lines) + "\n"


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = measure(args, command(MODULE, argv))
    write_result(args.out, payload, args.device, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
