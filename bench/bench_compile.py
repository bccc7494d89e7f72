"""torch.compile of the velocity: compile time, speed-up and recompiles, on the bundled model.

On the bundled Fashion-MNIST flow (``load_pretrained("fashion-mnist")``) at batch ``--batch``:

1. One gradient d cost(x1)/d x0 through a ``--steps`` midpoint solve, per gradient scheme
   (``auto``, the default, which keeps the graph here, and ``adjoint``, which evaluates without a
   graph and recomputes with one), eager against the velocity compiled as
   ``optimize(..., compile=True)`` compiles it (:class:`dflow_fast.core.compiled.CompiledVelocity`:
   inductor, dynamic batch dimension). Compile time = the first compiled call minus an eager
   call; then eager and compiled timed round-robin (median of ``--repeats``); the gradients'
   relative difference.
2. ``optimize`` on one demo task (``--task``, the demo's noise level and stop): eager against
   ``compile=True``. The first compiled run pays the compilation of the batch sizes it meets; a
   second run reuses the graphs. Recorded: seconds of each run, the graphs dynamo compiled
   (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``) and the distinct active-set sizes
   the run evaluated, so the recompiles per batch size can be read off (one graph per grad mode
   for every size >= 2, plus size 1's), and the final costs of both.

    python -m bench.bench_compile                     # CPU (inductor), batch 8

Writes ``bench/results/compile_<device>.{json,md}``. Inductor compiles in this process
(``compile_threads=1``), so this process's CPU time counts it; seconds are CPU time on the CPU
(one torch thread), wall time on CUDA; wall time is recorded as well.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.lib import (RESULTS_DIR, command, median, n_params, rel_err, time_interleaved,
                       write_result)

MODULE = "bench.bench_compile"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--schemes", nargs="+", default=["auto", "adjoint"],
                   choices=["auto", "adjoint", "backprop"])
    p.add_argument("--task", default="sr4")
    p.add_argument("--max-iter", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", default=None, help="torch.compile mode (default: its default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    a.out = a.out or RESULTS_DIR / f"compile_{a.device}.json"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    return a


def _clock(device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def _since(start, device) -> dict:
    now = _clock(device)
    return {"wall": now[0] - start[0], "cpu": now[1] - start[1]}


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def measure(args, cmd: str | None = None) -> dict:
    import dflow_fast
    from dflow_fast.apps.demo import HISTORY, TASK_SIGMA
    from dflow_fast.core.compiled import CompiledVelocity
    from dflow_fast.data import fashion_mnist
    from dflow_fast.models import load_pretrained
    from dflow_fast.tasks import make as make_task

    import torch._inductor.config
    torch._inductor.config.compile_threads = 1  # in this process: its CPU time counts it
    device = torch.device(args.device)
    basis = "wall" if device.type == "cuda" or args.threads > 1 else "cpu"
    flow = load_pretrained("fashion-mnist", device=device, dtype=torch.float32)
    images, _ = fashion_mnist("test", limit=1000)
    idx = torch.randperm(1000, generator=torch.Generator().manual_seed(args.seed))[:args.batch]
    truth = images[idx].to(device)
    p = make_task(args.task, truth, sigma=TASK_SIGMA.get(args.task, 0.05),
                  generator=torch.Generator().manual_seed(args.seed))
    x0 = dflow_fast.backward_blend(flow, p.guess, steps=args.steps,
                                   generator=torch.Generator().manual_seed(args.seed + 1))
    options = {} if args.mode is None else {"mode": args.mode}
    compiled = CompiledVelocity(flow, options)

    def grad(velocity, scheme):
        x = x0.detach().clone().requires_grad_(True)
        x1 = dflow_fast.solve(velocity, x, steps=args.steps, gradient=scheme, params=[])
        return torch.autograd.grad(p.cost(x1).sum(), x)[0]

    gradients = []
    for scheme in args.schemes:
        grad(flow, scheme)
        start = _clock(device)
        g_eager = grad(flow, scheme)
        eager_first = _since(start, device)
        graphs = _graphs()
        start = _clock(device)
        g_comp = grad(compiled, scheme)
        first = _since(start, device)
        times = time_interleaved({"eager": lambda: grad(flow, scheme),
                                  "compiled": lambda: grad(compiled, scheme)}, device,
                                 repeats=args.repeats, warmup=1,
                                 clock=time.process_time if basis == "cpu" else time.perf_counter)
        row = {"scheme": scheme, "first_compiled_call_s": first, "eager_call_s": eager_first,
               "compile_s": {k: first[k] - eager_first[k] for k in first},
               "graphs_compiled": _graphs() - graphs,
               "eager_s": median(times["eager"]), "compiled_s": median(times["compiled"]),
               "eager_times_s": times["eager"], "compiled_times_s": times["compiled"],
               "rel_diff": rel_err(g_comp, g_eager)}
        row["speedup"] = row["eager_s"] / row["compiled_s"]
        gradients.append(row)
        print(f"{scheme}: compile {row['compile_s'][basis]:.1f} s, eager {row['eager_s']:.3f} s, "
              f"compiled {row['compiled_s']:.3f} s ({row['speedup']:.2f}x), diff "
              f"{row['rel_diff']:.1e}", file=sys.stderr, flush=True)

    runs = []
    stop = p.noise_level
    for name, comp in (("eager", False), ("compiled, first run", True),
                       ("compiled, second run", True)):
        sizes: set[int] = set()
        graphs = _graphs()
        start = _clock(device)
        res = dflow_fast.optimize(flow, p.cost, x0, steps=args.steps, max_iter=args.max_iter,
                                  history_size=HISTORY, stop_loss=stop,
                                  compile=(options or True) if comp else False,
                                  callback=lambda info: sizes.add(int(info.active.sum())))
        took = _since(start, device)
        runs.append({"run": name, "seconds": took[basis], "wall_s": took["wall"],
                     "cpu_s": took["cpu"], "graphs_compiled": _graphs() - graphs,
                     "active_sizes": sorted(n for n in sizes if n), "loss": res.loss.tolist(),
                     "loss_mean": float(res.loss.mean()), "velocity_calls": res.velocity_calls,
                     "iterations": res.nit.tolist(), "status": res.message})
        print(f"optimize {name}: {took[basis]:.1f} s, graphs {runs[-1]['graphs_compiled']}, "
              f"sizes {sorted(sizes)}, cost {runs[-1]['loss_mean']:.4g}", file=sys.stderr,
              flush=True)
    return {"benchmark": "compile", "command": cmd or command(MODULE),
            "config": {"model": "dflow_fast.models.load_pretrained('fashion-mnist')",
                       "n_params": n_params(flow), "batch": args.batch, "steps": args.steps,
                       "solver": "midpoint", "schemes": args.schemes, "task": args.task,
                       "max_iter": args.max_iter, "history_size": HISTORY,
                       "compile": {"backend": "inductor", **options, "dynamic batch": True,
                                   "inductor compile_threads": 1},
                       "repeats": args.repeats, "threads": torch.get_num_threads(),
                       "seconds": basis, "seed": args.seed},
            "gradients": gradients, "optimize": runs}


def markdown(payload: dict, meta: dict) -> str:
    cfg = payload["config"]
    basis = cfg["seconds"]
    commit = f"`{(meta.get('commit') or 'unknown')[:12]}`" + (" (+ local edits)"
                                                              if meta.get("dirty") else "")
    lines = [f"# torch.compile (inductor) of the velocity: {meta['device_name']} "
             f"({meta['device']})", "",
             f"Bundled Fashion-MNIST flow ({cfg['n_params'] / 1e6:.2f}M params), batch "
             f"{cfg['batch']}, {cfg['steps']} midpoint steps; torch {meta['torch']}, "
             f"{cfg['threads']} thread(s), seconds: "
             + ("this process's CPU time (inductor compiles in-process)" if basis == "cpu"
                else "wall") + f"; commit {commit}. `{payload['command']}`", "",
             "## One gradient", "",
             "| scheme | compile (s) | graphs | eager (s) | compiled (s) | speed-up | "
             "rel. diff |", "|:---|---:|---:|---:|---:|---:|---:|"]
    for r in payload["gradients"]:
        lines.append(f"| {r['scheme']} | {r['compile_s'][basis]:.1f} | {r['graphs_compiled']} "
                     f"| {r['eager_s']:.3f} | {r['compiled_s']:.3f} | {r['speedup']:.2f}x "
                     f"| {r['rel_diff']:.1e} |")
    lines += ["", f"## optimize, task {cfg['task']} (L-BFGS max_iter {cfg['max_iter']}, stop at "
                  "the noise level)", "",
              "The active set shrinks as samples stop; \"graphs\": new graphs dynamo compiled "
              "in the run (none per batch size: the batch dimension is dynamic; dynamo caches "
              "graphs per code object, so the dynamic graphs compiled for the gradients above "
              "serve these runs too, and the first run compiles only what they did not meet, "
              "e.g. the specialized batch size 1). The compiled and eager runs take different "
              "iterates from the first float32 rounding difference on.", "",
              "| run | seconds | graphs | active-set sizes | mean cost | velocity calls |",
              "|:---|---:|---:|:---|---:|---:|"]
    for r in payload["optimize"]:
        lines.append(f"| {r['run']} | {r['seconds']:.1f} | {r['graphs_compiled']} "
                     f"| {', '.join(map(str, r['active_sizes']))} | {r['loss_mean']:.5g} "
                     f"| {r['velocity_calls']} |")
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
