"""The batched L-BFGS's host synchronisations and their wall-time effect, before vs after its line
search moved to the device (issue 15, item 4), measured side by side in one process.

"before": ``dflow_fast/optim/lbfgs.py`` as of ``--before`` (a git revision; default the last one
whose line searches were per-sample Python generators fed from the host) loaded from git into a
private module; "after": the checkout's. ``dflow_fast.optimize`` is pointed at each in turn.

- Host reads (:class:`dflow_fast.optim.syncs.HostReads`: ``.tolist()``, ``.item()``, ``bool()``,
  boolean masks, ... of tensors not made on the host; on CUDA also the synchronisations
  ``torch.cuda.set_sync_debug_mode`` reports, blocking uploads included), split into the
  optimizer's own (counted between consecutive batched evaluations and after the last one) and
  the objective's (inside ``evaluate``: solve, cost, gradient; not the optimizer's).
- "optimizer alone": ``batched_lbfgs`` on ``--batch`` independent scaled Rosenbrock problems of
  ``--dim`` variables whose evaluation costs next to nothing, so its time is the optimizer's own:
  reported per batched evaluation, with the time inside ``evaluate`` subtracted.
- "end to end": ``dflow_fast.optimize`` (library defaults) with the bundled Fashion-MNIST flow on
  ``--task`` for ``--batch`` test images, ``--repeats`` rounds round-robin; the reads are counted
  on a separate short run (``--count-iter`` iterations) so that counting does not slow the timed
  ones. Also: whether both reach the same iterates.

    python -m bench.bench_lbfgs_sync                    # CPU: batch 16, sr4, ~10 min on 2 cores
    python -m bench.bench_lbfgs_sync --repeats 0        # the optimizer alone and the counts only
    python -m bench.bench_lbfgs_sync --no-e2e           # the optimizer alone

Writes ``bench/results/lbfgs_sync_<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import torch

from bench.lib import REPO_ROOT, RESULTS_DIR, command, shown, write_result

MODULE = "bench.bench_lbfgs_sync"
#: the last commit whose batched L-BFGS ran one Python line search per sample
BEFORE = "04db25b502b9fd763546ccc044c5006e7b262504"
SOURCE = "dflow_fast/optim/lbfgs.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--task", default="sr4", help="end-to-end task (dflow_fast.tasks.make)")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                   help="the end-to-end part (bundled model and Fashion-MNIST)")
    p.add_argument("--repeats", type=int, default=2,
                   help="end-to-end timed rounds, each running both (0: skip the timing)")
    p.add_argument("--count-iter", type=int, default=4,
                   help="max_iter of the end-to-end run whose host reads are counted")
    p.add_argument("--dim", type=int, default=784, help="variables per problem, optimizer alone")
    p.add_argument("--alone-iter", type=int, default=50, help="max_iter, optimizer alone")
    p.add_argument("--alone-repeats", type=int, default=5, help="timed rounds, optimizer alone")
    p.add_argument("--before", default=BEFORE, help="git revision of the 'before' lbfgs.py")
    p.add_argument("--before-file", type=Path, help="the 'before' lbfgs.py as a file instead")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path,
                   help="JSON path (default bench/results/lbfgs_sync_<device>.json)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-render the Markdown of an existing result file")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if min(a.batch, a.count_iter, a.dim, a.alone_iter, a.alone_repeats, a.threads) < 1 \
            or a.repeats < 0 or a.dim < 2:
        p.error("batch, count-iter, alone-iter, alone-repeats, threads must be >= 1, dim >= 2, "
                "repeats >= 0")
    if a.before_file is not None and not a.before_file.is_file():
        p.error(f"--before-file {a.before_file}: no such file")
    a.out = a.out or RESULTS_DIR / f"lbfgs_sync_{a.device}.json"
    return a


def load_before(rev: str, path: Path | None) -> tuple[types.ModuleType, dict]:
    """The 'before' implementation as a private module of dflow_fast.optim (its relative imports
    resolve against the checkout's core/, ops/ and optim/samples.py); and where it came from."""
    if path is not None:
        src, origin = path.read_text(), {"file": str(path)}
    else:
        done = subprocess.run(["git", "--no-optional-locks", "show", f"{rev}:{SOURCE}"],
                              cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"--before {rev}: git cannot show {SOURCE} ({done.stderr.strip()}); "
                             f"pass --before-file PATH")
        src, origin = done.stdout, {"git_revision": rev, "path": SOURCE}
    name = "dflow_fast.optim._lbfgs_before"
    mod = types.ModuleType(name)
    mod.__package__, mod.__file__ = "dflow_fast.optim", f"<before: {origin}>"
    sys.modules[name] = mod  # dataclasses look their module up here
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod, origin


class CudaSyncs:
    """Counts the synchronisations ``torch.cuda.set_sync_debug_mode("warn")`` reports."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.log = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    @property
    def count(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self.log)

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)


class Split:
    """Wraps a ``batched_lbfgs`` so that ``counter()`` is read around every ``evaluate``: the
    counts inside evaluations (the objective's) and between them and after the last (the
    optimizer's, one number per batched evaluation)."""

    def __init__(self, impl, counter):
        self.impl, self.counter = impl, counter
        self.optimizer: list[int] = []
        self.objective: list[int] = []
        self.setup = 0  # before the first evaluation
        self.eval_seconds = self.eval_cpu_seconds = 0.0  # wall and process CPU time inside

    def __call__(self, evaluate, x, options, **kw):
        last = [self.counter()]

        def counted(idx, X):
            c0 = self.counter()
            if self.objective:
                self.optimizer.append(c0 - last[0])
            else:
                self.setup = c0 - last[0]
            t0, p0 = time.perf_counter(), time.process_time()
            out = evaluate(idx, X)
            self.eval_seconds += time.perf_counter() - t0
            self.eval_cpu_seconds += time.process_time() - p0
            last[0] = self.counter()
            self.objective.append(last[0] - c0)
            return out

        out = self.impl(counted, x, options, **kw)
        self.optimizer.append(self.counter() - last[0])
        return out

    def summary(self) -> dict:
        return {"evaluations": len(self.objective), "setup": self.setup,
                "optimizer_total": sum(self.optimizer), "optimizer_max": max(self.optimizer),
                "optimizer_mean": statistics.mean(self.optimizer),
                "objective_total": sum(self.objective), "objective_max": max(self.objective)}


@contextlib.contextmanager
def optimize_using(batched_lbfgs):
    """``dflow_fast.optimize`` with ``batched_lbfgs`` as its L-BFGS."""
    mod = importlib.import_module("dflow_fast.optimize")
    saved = mod.batched_lbfgs
    mod.batched_lbfgs = batched_lbfgs
    try:
        yield
    finally:
        mod.batched_lbfgs = saved


def count_reads(run, impl, device: torch.device) -> dict:
    """``run(batched_lbfgs)`` once with host reads (and CUDA syncs) counted per evaluation."""
    from dflow_fast.optim.syncs import HostReads

    out = {}
    with HostReads() as reads:
        split = Split(impl, lambda: reads.count)
        run(split)
    out["host_reads"] = {**split.summary(), "by_kind": dict(reads.by_kind)}
    if device.type == "cuda":
        with CudaSyncs() as syncs:
            split = Split(impl, lambda: syncs.count)
            run(split)
        out["cuda_syncs"] = split.summary()
    return out


def rosenbrock(B: int, D: int, device, dtype, seed: int):
    """B independent chained Rosenbrock problems of D variables, each with its own scale (so the
    line searches differ); evaluate(idx, X) -> (f [n], g [n, D], X)."""
    gen = torch.Generator().manual_seed(seed)
    scale = (0.5 + torch.rand(B, 1, generator=gen) * 10 ** torch.linspace(-1, 1, B)[:, None])
    scale = scale.to(device, dtype)
    x0 = (torch.rand(B, D, generator=gen) * 0.4 - 0.2).to(device, dtype)

    def evaluate(idx, X):
        s = scale if idx is None else scale[idx]
        a, b = X[:, :-1], X[:, 1:]
        r = b - a * a
        f = s[:, 0] * (100.0 * r * r + (1.0 - a) ** 2).sum(1)
        g = torch.zeros_like(X)
        g[:, :-1] = -400.0 * a * r - 2.0 * (1.0 - a)
        g[:, 1:] += 200.0 * r
        return f, s * g, X.clone()
    return evaluate, x0


def optimizer_alone(impls: dict, args, device) -> dict:
    from dflow_fast.optim.lbfgs import LBFGSOptions

    evaluate, x0 = rosenbrock(args.batch, args.dim, device, torch.float32, args.seed)
    opts = LBFGSOptions(max_iter=args.alone_iter)
    rows = {}
    for name, impl in impls.items():
        counts = count_reads(lambda lb: lb(evaluate, x0, opts), impl.batched_lbfgs, device)
        rows[name] = {"impl": name, **counts, "times_s": [], "own_s_per_eval": []}
    results = {}
    for r in range(args.alone_repeats + 1):  # round 0 warms up
        for name, impl in impls.items():
            split = Split(impl.batched_lbfgs, lambda: 0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            results[name] = split(evaluate, x0, opts)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            took = time.perf_counter() - t0
            if r:
                rows[name]["times_s"].append(took)
                rows[name]["own_s_per_eval"].append((took - split.eval_seconds)
                                                    / len(split.objective))
    for row in rows.values():
        row["time_s"] = statistics.median(row["times_s"])
        row["own_ms_per_eval"] = 1e3 * statistics.median(row["own_s_per_eval"])
    return {"rows": list(rows.values()), **_same(results)}


def end_to_end(impls: dict, args, device) -> dict:
    import dflow_fast
    from dflow_fast.data import fashion_mnist
    from dflow_fast.models import load_pretrained
    from dflow_fast.tasks import make

    flow = load_pretrained("fashion-mnist").to(device)
    images, _ = fashion_mnist("test", limit=1000)
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    truth = images[idx[:args.batch]].to(device)
    p = make(args.task, truth, sigma=0.05, generator=torch.Generator().manual_seed(args.seed))
    x0 = dflow_fast.backward_blend(flow, p.guess, alpha=0.1,
                                   generator=torch.Generator(device).manual_seed(args.seed + 1))
    dflow_fast.optimize(flow, p.select([0, 1]).cost, x0[:2], max_iter=2)  # warm-up: caches

    def run(lb, **kw):
        with optimize_using(lb):
            return dflow_fast.optimize(flow, p.cost, x0, **kw)

    rows = {name: {"impl": name, **count_reads(lambda lb: run(lb, max_iter=args.count_iter),
                                               impl.batched_lbfgs, device),
                   "times_s": [], "cpu_times_s": [], "own_s": [], "own_cpu_s": []}
            for name, impl in impls.items()}
    results = {}
    order = list(impls)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:  # alternate: drift hits both alike
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            split = Split(impls[name].batched_lbfgs, lambda: 0)  # times inside evaluate
            w0, c0 = time.perf_counter(), time.process_time()
            res = run(split)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            row = rows[name]
            row["times_s"].append(wall)
            row["cpu_times_s"].append(cpu)
            # the optimizer's own share: the run minus its evaluations (optimize's set-up and
            # result, a few ms, included)
            row["own_s"].append(wall - split.eval_seconds)
            row["own_cpu_s"].append(cpu - split.eval_cpu_seconds)
            results[name] = (res.x0.flatten(1), res)
    for row in rows.values():
        if row["times_s"]:
            row["time_s"] = statistics.median(row["times_s"])
            row["cpu_time_s"] = statistics.median(row["cpu_times_s"])
            row["own_s_median"] = statistics.median(row["own_s"])
            row["own_cpu_s_median"] = statistics.median(row["own_cpu_s"])
            res = results[row["impl"]][1]
            row.update(velocity_calls=res.velocity_calls, gradient=res.extra["gradient"],
                       status={s: res.status.count(s) for s in sorted(set(res.status))},
                       loss_mean=float(res.loss.mean()))
    same = _same({k: (v[0], None, None, v[1]) for k, v in results.items()}) if results else {}
    return {"rows": list(rows.values()), **same}


def _same(results: dict) -> dict:
    """Do 'before' and 'after' end on the same iterates? (x [B, D], ..., samples or result)"""
    if len(results) != 2:
        return {}
    (xa, *_, a), (xb, *_, b) = results.values()
    return {"max_abs_x_diff": float((xa - xb).abs().max()), "x_equal": bool(torch.equal(xa, xb)),
            "status_equal": list(a.status) == list(b.status),
            "nit_equal": list(map(int, a.nit)) == list(map(int, b.nit))}


def measure(args, cmd: str | None = None) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import dflow_fast.optim.lbfgs as after
    before, origin = load_before(args.before, args.before_file)
    impls = {"before": before, "after": after}
    alone = optimizer_alone(impls, args, device)
    e2e = end_to_end(impls, args, device) if args.e2e else None
    for part in (alone, e2e):
        if part is None:
            continue
        base = part["rows"][0]
        for row in part["rows"]:
            if "time_s" in row and "time_s" in base:
                row["time_ratio_vs_before"] = row["time_s"] / base["time_s"]
    return {"benchmark": "lbfgs_sync", "command": cmd or command(MODULE),
            "config": {"before": origin, "batch": args.batch, "task": args.task,
                       "e2e": args.e2e, "repeats": args.repeats, "count_iter": args.count_iter,
                       "dim": args.dim, "alone_iter": args.alone_iter,
                       "alone_repeats": args.alone_repeats,
                       "model": "dflow_fast.models.load_pretrained('fashion-mnist')",
                       "optimize": "library defaults (steps, solver, gradient, L-BFGS options)",
                       "threads": args.threads, "seed": args.seed},
            "optimizer_alone": alone, "end_to_end": e2e}


def markdown(payload: dict, meta: dict) -> str:
    cfg = payload["config"]
    lines = [f"# Batched L-BFGS host reads, before vs after: {meta['device_name']} "
             f"({meta['device']})", "",
             f"Before: `{cfg['before']}`; after: the checkout (commit "
             f"`{(meta.get('commit') or 'unknown')[:12]}`, local edits: {meta.get('dirty')}). "
             f"torch {meta['torch']}, {cfg['threads']} thread(s). Host reads: values read from "
             f"tensors into Python (what synchronises with an accelerator), per batched "
             f"evaluation; \"optimizer\": between evaluations, \"objective\": inside them.", ""]
    alone = payload["optimizer_alone"]
    lines += [f"## Optimizer alone: {cfg['batch']} scaled Rosenbrock problems of {cfg['dim']} "
              f"variables, max_iter {cfg['alone_iter']}, median of {cfg['alone_repeats']} rounds",
              "", "| impl | evaluations | optimizer reads / eval (max, mean) | time (s) | / before "
                  "| optimizer's own ms / eval |", "|:---|---:|---:|---:|---:|---:|"]
    for r in alone["rows"]:
        h = r["host_reads"]
        lines.append(f"| {r['impl']} | {h['evaluations']} | {h['optimizer_max']}, "
                     f"{h['optimizer_mean']:.2f} | {r['time_s']:.3f} "
                     f"| {r.get('time_ratio_vs_before', float('nan')):.3f} "
                     f"| {r['own_ms_per_eval']:.2f} |")
    lines += ["", _same_line(alone)]
    e2e = payload.get("end_to_end")
    if e2e:
        lines += ["", f"## End to end: dflow_fast.optimize, bundled Fashion-MNIST flow, "
                      f"`{cfg['task']}`, batch {cfg['batch']}",
                  "", f"Reads counted on a run of max_iter {cfg['count_iter']} (a line search may "
                      f"take 25 evaluations in one iteration); times: median of {cfg['repeats']} "
                      f"rounds (alternating order) of the default run; \"optimizer's own\": the "
                      f"run's time minus the time inside its evaluations.", "",
                  "| impl | evaluations (counted run) | optimizer reads / eval (max, mean) "
                  "| objective reads / eval (max) | wall (s) | CPU (s) | / before (wall) "
                  "| velocity calls | optimizer's own wall (s) | optimizer's own CPU (s) |",
                  "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        spread = []
        for r in e2e["rows"]:
            h = r["host_reads"]
            timed = (f"{r['time_s']:.1f} | {r['cpu_time_s']:.1f} | "
                     f"{r.get('time_ratio_vs_before', float('nan')):.3f} | {r['velocity_calls']} "
                     f"| {r['own_s_median']:.3f} | {r['own_cpu_s_median']:.3f}"
                     if "time_s" in r else "– | – | – | – | – | –")
            lines.append(f"| {r['impl']} | {h['evaluations']} | {h['optimizer_max']}, "
                         f"{h['optimizer_mean']:.2f} | {h['objective_max']} | {timed} |")
            if "time_s" in r:
                spread.append(f"{r['impl']}: wall {_range(r['times_s'], '.0f')} s, CPU "
                              f"{_range(r['cpu_times_s'], '.1f')} s, optimizer's own CPU "
                              f"{_range(r['own_cpu_s'], '.3f')} s")
        if spread:
            lines += ["", "Per-round range (min-max): " + "; ".join(spread) + "."]
        if "x_equal" in e2e:
            lines += ["", _same_line(e2e)]
    lines += ["", "Reading: on the CPU a read of a tensor value waits for nothing, so what the "
                  "times show there is the cost of the bookkeeping; the host reads matter where "
                  "each one stalls an accelerator's queue. The end-to-end times are those of the "
                  "network and vary between rounds far more than the optimizer's own share. "
                  "Objective reads: optimize's evaluate reads its index tensor with .cpu() (a "
                  "CUDA synchronisation in both versions); the counter does not count it for "
                  "'before' on the CPU only because that index was made there from a list."]
    return "\n".join(lines) + "\n"


def _range(xs: list, spec: str) -> str:
    return f"{format(min(xs), spec)}-{format(max(xs), spec)}"


def _same_line(part: dict) -> str:
    if "x_equal" not in part:
        return ""
    return (f"Same iterates: {'yes, bitwise' if part['x_equal'] else 'no'} (max |x diff| "
            f"{part['max_abs_x_diff']:.3g}); statuses equal: {part['status_equal']}; iterations "
            f"equal: {part['nit_equal']}.")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        import json
        doc = json.loads(args.render.read_text())
        md = args.render.with_suffix(".md")
        md.write_text(markdown(doc, doc["meta"]))
        print(f"wrote {shown(md)}")
        return 0
    payload = measure(args, command(MODULE, argv))
    write_result(args.out, payload, args.device, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
