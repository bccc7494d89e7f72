"""Microbenchmarks of the fused ops: every backend against the eager PyTorch twin.

For each op, size and dtype it reports the median time, the achieved bandwidth (the op's minimum
memory traffic divided by its time), that bandwidth as a fraction of the device's measured copy
bandwidth (``clone`` of a large tensor, timed the same way), and the speedup over the eager
reference (``dflow_fast.ops.twins``, i.e. what the solver would run without the kernels).

    python -m bench.bench_kernels --device cuda --dtypes float32 float16 bfloat16
    python -m bench.bench_kernels --device cpu              # cpp (and torch) on the CPU

Goals (issue: compiled core): >= 80% of copy bandwidth on the elementwise updates, >= 2x over
eager PyTorch on the multi-input fused updates. JSON + Markdown go to bench/results/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.lib import RESULTS_DIR, command, median, time_cpu, time_cuda, write_json
from dflow_fast.ops import registry, twins

MODULE = "bench.bench_kernels"


def min_bytes(op: str, n: int, m: int, b: int, esize: int) -> int:
    """Minimum memory traffic of one call: every input read once, every output written once."""
    if op == "axpy" or op == "adjoint_euler":
        return 3 * n * esize
    if op == "adjoint_midpoint":
        return 4 * n * esize
    if op == "chi_prior":
        return 2 * n * esize  # read x, write grad (sq/value are [B])
    # two-loop: S and Y each read in both loops, g read, d written
    return (4 * m * n + 2 * n) * esize


def make_inputs(op: str, n: int, m: int, b: int, dtype, device):
    """Fresh random inputs; n is the total element count of one state [B, D]."""
    d = n // b
    r = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    if op == "axpy":
        return (r(b, d), r(b, d), 0.37)
    if op == "adjoint_euler":
        return (r(b, d), r(b, d))
    if op == "adjoint_midpoint":
        return (r(b, d), r(b, d), r(b, d))
    if op == "chi_prior":
        return (r(b, d), 0.1)
    S, Y = r(b, m, d), r(b, m, d)
    rho = 1.0 / (S * Y).sum(-1).abs().clamp(min=1.0)
    return (r(b, d), S, Y, rho.to(dtype), torch.rand(b, dtype=dtype, device=device) + 0.5)


def timer(device: torch.device, repeats: int):
    if device.type == "cuda":
        try:  # do_bench flushes L2 between runs and picks its own repeat count for short ops
            from triton.testing import do_bench
            return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except ImportError:
            return lambda fn: median(time_cuda(fn, device, repeats=repeats, warmup=3))
    return lambda fn: median(time_cpu(fn, repeats=repeats, warmup=2))


def copy_bandwidth(device, dtype, n, measure) -> float:
    x = torch.randn(n, dtype=dtype, device=device)
    t = measure(lambda: x.clone())
    return 2 * n * x.element_size() / t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=None)
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="elements per state (default: 2^16, 2^20, 2^24 on CUDA; 2^14, 2^18 CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--history", type=int, default=10, help="L-BFGS m")
    p.add_argument("--ops", nargs="+", default=list(registry.OP_NAMES))
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    dtypes = [getattr(torch, d) for d in (args.dtypes or (
        ["float32", "float16", "bfloat16"] if cuda else ["float32", "float64"]))]
    sizes = args.sizes or ([2**16, 2**20, 2**24] if cuda else [2**14, 2**18])
    names = args.backends or (["cuda", "triton"] if cuda else ["cpp"])
    impls = {}
    for name in names:
        try:
            impls[name] = registry.resolve(name, device)
        except (registry.BackendUnavailable, ValueError) as e:
            print(f"skipping backend {name}: {e}")
    measure = timer(device, args.repeats)
    rows = []
    for dtype in dtypes:
        copy_bw = copy_bandwidth(device, dtype, max(sizes), measure)
        for n in sizes:
            for op in args.ops:
                inputs = make_inputs(op, n, args.history, args.batch, dtype, device)
                eager = getattr(twins, op)
                t_eager = measure(lambda: eager(*inputs))
                traffic = min_bytes(op, n, args.history, args.batch, inputs[0].element_size())
                for name, ops in impls.items():
                    fn = getattr(ops, op)
                    t = measure(lambda: fn(*inputs))
                    bw = traffic / t
                    rows.append({"op": op, "backend": name, "dtype": str(dtype).split(".")[-1],
                                 "elements": n, "seconds": t, "eager_seconds": t_eager,
                                 "speedup_vs_eager": t_eager / t, "bandwidth_GBps": bw / 1e9,
                                 "copy_bandwidth_GBps": copy_bw / 1e9,
                                 "fraction_of_copy": bw / copy_bw})
    out = Path(args.out) if args.out else RESULTS_DIR / f"kernels_{device.type}.json"
    write_json(out, {"command": command(MODULE, argv), "rows": rows}, device)
    table = to_markdown(rows)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def to_markdown(rows) -> str:
    lines = ["| op | backend | dtype | elements | time (us) | eager (us) | speedup | GB/s | "
             "of copy BW |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['elements']} | "
                     f"{r['seconds'] * 1e6:.1f} | {r['eager_seconds'] * 1e6:.1f} | "
                     f"{r['speedup_vs_eager']:.2f}x | {r['bandwidth_GBps']:.1f} | "
                     f"{r['fraction_of_copy']:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
