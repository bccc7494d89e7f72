"""End to end: D-Flow inverse problems solved per hour, dflow_fast batched vs the paper's loop.

On the bundled flow model (``dflow_fast.models.load_pretrained("fashion-mnist")``, a U-Net velocity
on Fashion-MNIST 28x28 in [-1, 1]) and ``--n`` Fashion-MNIST test images, for each task
(``dflow_fast.tasks.make``: inpaint_box, sr2, deblur, ...):

- the same backward-blend start ``x0`` (``dflow_fast.backward_blend``) for every method;
- ``reference``: the paper-style loop, ``dflow_fast.reference.optimize`` (autograd through the
  unrolled solve + ``torch.optim.LBFGS``) one image at a time;
- ``dflow_fast-adjoint`` / ``dflow_fast-backprop``: ``dflow_fast.optimize`` (per-sample L-BFGS;
  ``gradient="adjoint"``, the default, or ``"backprop"``) on batches of each ``--batch`` size
  (batch 1 is dflow_fast's own per-image loop: it separates the gain of batching from that of the
  implementation).

Every method gets the same budget (``--max-iter`` L-BFGS iterations, ``max_eval`` = 5/4 of it,
torch.optim.LBFGS's tolerances). "Equal final cost" means dflow_fast's mean final cost is at
most 1% above the reference's; then the throughputs (problems per hour = n / seconds) are
compared as such; otherwise the table says so and gives the gap. Seconds are this process's CPU
time on the CPU with one thread (``--time auto``): there it equals the wall time of an unshared
core, and other jobs on a shared machine do not inflate it (they still share caches and memory
bandwidth); wall time on CUDA or with more threads. Both are recorded.

Time to the reference's final PSNR: for a dflow_fast run whose batch holds all n images, a
callback (run after every batched evaluation in which some sample completed an iteration) solves
x1 from the current x0 (no grad) and records the mean PSNR against the ground truth and the wall
time spent so far *minus the callback's own time* (the callback does not change the trajectory).
The first point whose mean PSNR reaches the reference's final mean
PSNR (and, separately, comes within 0.1 dB of it) gives dflow_fast's time; the reference's time is
its whole loop (its mean PSNR over the n images exists only once the last image is done).

    python -m bench.bench_e2e                      # CPU: n=16, batch 1 4 16, ~10 min on 2 cores
    python -m bench.bench_e2e --device cuda        # CUDA: n=64, batch 1 8 64

Writes ``bench/results/e2e_<device>.{json,md}``, ``_throughput.png`` (problems/hour vs batch per
task) and ``_psnr.png`` (mean PSNR vs time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.lib import RESULTS_DIR, command, environment, n_params, shown, write_json
from dflow_fast.optim.lbfgs import default_max_eval

MODULE = "bench.bench_e2e"

EQUAL_COST_TOL = 0.01  # "equal final cost": dflow_fast's mean within 1% of the reference's
# Time to the reference's final PSNR is also given to within this many dB: runs that end at the
# same cost differ by a few hundredths of a dB through rounding, which "reached or not" magnifies.
PSNR_TOL = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tasks", nargs="+", default=["inpaint_box", "sr2", "deblur"])
    p.add_argument("--n", type=int, help="test images per task (default: 16 cpu, 64 cuda)")
    p.add_argument("--batch", type=int, nargs="+",
                   help="dflow_fast batch sizes (default: 1 4 16 cpu, 1 8 64 cuda)")
    p.add_argument("--steps", type=int, default=6, help="midpoint steps (paper recipe: 6)")
    p.add_argument("--max-iter", type=int, default=20, help="L-BFGS iterations per problem")
    p.add_argument("--gradient", nargs="+", choices=["adjoint", "backprop"],
                   default=["adjoint", "backprop"],
                   help="dflow_fast's gradient schemes, each run at every batch (default both: "
                        "adjoint is the library default and bounds memory; backprop is faster "
                        "where memory is no constraint)")
    p.add_argument("--sigma", type=float, default=0.05, help="observation noise")
    p.add_argument("--alpha", type=float, default=0.1, help="backward-blend weight")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="run the reference loop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time", choices=["auto", "cpu", "wall"], default="auto",
                   help="what 'seconds' means: this process's CPU time (auto on cpu: with one "
                        "thread it is the wall time of an unshared core, and other jobs on a "
                        "shared machine do not inflate it) or wall time (auto on cuda); both "
                        "are recorded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/e2e_<device>.json)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-render the Markdown and plots of an existing result file")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.n = a.n or (64 if cuda else 16)
    a.batch = sorted(set(a.batch or ([1, 8, 64] if cuda else [1, 4, 16])))
    a.out = a.out or RESULTS_DIR / f"e2e_{a.device}.json"
    if a.time == "auto":  # CPU time counts every thread: only with one is it a wall time
        a.time = "cpu" if not cuda and a.threads == 1 else "wall"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / on this machine")
    if a.n < 1 or min(a.batch) < 1 or a.max_iter < 1 or a.steps < 1:
        p.error("n, batch, max-iter and steps must be >= 1")
    return a


def _clock(device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) now; CUDA work is synchronized first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float], device, minus=(0.0, 0.0)) -> tuple[float, float]:
    now = _clock(device)
    return now[0] - start[0] - minus[0], now[1] - start[1] - minus[1]


def _seconds(wall_cpu: tuple[float, float], basis: str) -> float:
    return wall_cpu[1] if basis == "cpu" else wall_cpu[0]


class PsnrTracker:
    """``optimize`` callback: per iteration, the mean PSNR of x1(x0) against ``truth`` and the
    optimizer's own elapsed time (wall time minus the time spent in this callback)."""

    def __init__(self, flow, truth, steps: int, device: torch.device, basis: str):
        self.flow, self.truth, self.steps, self.device = flow, truth, steps, device
        self.basis = basis
        self.start, self.overhead = (0.0, 0.0), (0.0, 0.0)
        self.curve: list[dict] = []

    def begin(self, x0) -> None:
        self.curve = [self._point(0, (0.0, 0.0), x0, None)]
        self.overhead = (0.0, 0.0)
        self.start = _clock(self.device)

    def _point(self, it, elapsed, x0, loss) -> dict:
        import dflow_fast
        from dflow_fast import metrics

        with torch.no_grad():
            x1 = dflow_fast.solve(self.flow, x0, steps=self.steps)
        return {"iteration": it, "seconds": _seconds(elapsed, self.basis),
                "wall_seconds": elapsed[0],
                "psnr_mean": float(metrics.psnr(x1, self.truth).mean()),
                "loss_mean": None if loss is None else float(loss.mean())}

    def __call__(self, info) -> bool:
        entered = _clock(self.device)
        elapsed = (entered[0] - self.start[0] - self.overhead[0],
                   entered[1] - self.start[1] - self.overhead[1])
        self.curve.append(self._point(info.iteration, elapsed, info.x0, info.loss))
        spent = _since(entered, self.device)
        self.overhead = (self.overhead[0] + spent[0], self.overhead[1] + spent[1])
        return False


def run_dflow(flow, problem, x0, truth, batch: int, gradient: str, args, device,
              track: bool) -> dict:
    """dflow_fast.optimize over the n problems in chunks of ``batch``."""
    import dflow_fast
    from dflow_fast import metrics

    n = x0.shape[0]
    tracker = (PsnrTracker(flow, truth, args.steps, device, args.time)
               if track and batch >= n else None)
    x1s, losses, nfe, status, overhead = [], [], 0, [], (0.0, 0.0)
    t0 = _clock(device)
    for lo in range(0, n, batch):
        rows = list(range(lo, min(n, lo + batch)))
        sub = problem.select(rows)
        if tracker is not None:
            tracker.begin(x0[rows])
        res = dflow_fast.optimize(flow, sub.cost, x0[rows], steps=args.steps,
                                  max_iter=args.max_iter, gradient=gradient,
                                  callback=tracker)
        if tracker is not None:
            overhead = (overhead[0] + tracker.overhead[0], overhead[1] + tracker.overhead[1])
        x1s.append(res.x1)
        losses.append(res.loss)
        nfe += int(res.nfe.sum())
        status += res.status
    took = _since(t0, device, overhead)
    x1, loss = torch.cat(x1s), torch.cat(losses)
    return {"method": f"dflow_fast-{gradient}", "batch": batch, "gradient": gradient,
            "seconds": _seconds(took, args.time), "wall_seconds": took[0],
            "cpu_seconds": took[1], "tracker_seconds_excluded": overhead,
            "loss": loss.tolist(), "loss_mean": float(loss.mean()),
            "psnr_mean": float(metrics.psnr(x1, truth).mean()),
            "ssim_mean": float(metrics.ssim(x1, truth).mean()),
            "velocity_evals_per_problem": nfe / n,
            "status": {s: status.count(s) for s in sorted(set(status))},
            "curve": tracker.curve if tracker is not None else None}


def run_reference(flow, problem, x0, truth, args, device) -> dict:
    """The paper's loop: dflow_fast.reference.optimize one image at a time."""
    from dflow_fast import metrics, reference

    n = x0.shape[0]
    x1s, losses, calls = [], [], 0
    t0 = _clock(device)
    for i in range(n):
        r = reference.optimize(flow, problem.select([i]).cost, x0[i:i + 1], steps=args.steps,
                               max_iter=args.max_iter)
        x1s.append(r.x1)
        losses.append(r.loss)
        calls += r.velocity_calls
    took = _since(t0, device)
    x1, loss = torch.cat(x1s), torch.cat(losses)
    return {"method": "reference", "batch": 1, "gradient": "backprop (autograd)",
            "seconds": _seconds(took, args.time), "wall_seconds": took[0],
            "cpu_seconds": took[1], "loss": loss.tolist(), "loss_mean": float(loss.mean()),
            "psnr_mean": float(metrics.psnr(x1, truth).mean()),
            "ssim_mean": float(metrics.ssim(x1, truth).mean()),
            "velocity_evals_per_problem": calls / n, "status": None, "curve": None}


def compare(runs: list[dict], n: int) -> None:
    """Adds problems/hour, ratios to the reference, the equal-cost verdict and time-to-PSNR."""
    ref = next((r for r in runs if r["method"] == "reference"), None)
    for r in runs:
        r["problems_per_hour"] = n / r["seconds"] * 3600
        if ref is None or r is ref:
            continue
        r["cost_ratio_vs_ref"] = r["loss_mean"] / ref["loss_mean"]
        r["equal_cost"] = r["cost_ratio_vs_ref"] <= 1 + EQUAL_COST_TOL
        # Paired, per problem: 20 L-BFGS iterations leave most problems unconverged, and float32
        # rounding then steers the same algorithm to different iterates (batch 1 vs batch 16 of
        # dflow_fast itself differ as much), so the mean over a few problems is noisy.
        ratios = sorted(a / b for a, b in zip(r["loss"], ref["loss"]))
        r["cost_ratio_median"] = statistics.median(ratios)
        r["share_within_1pct"] = sum(x <= 1 + EQUAL_COST_TOL for x in ratios) / len(ratios)
        r["throughput_ratio_vs_ref"] = r["problems_per_hour"] / ref["problems_per_hour"]
        r["psnr_diff_vs_ref"] = r["psnr_mean"] - ref["psnr_mean"]
        if r["curve"]:
            for key, tol in (("", 0.0), ("_tol", PSNR_TOL)):
                hit = next((p for p in r["curve"] if p["psnr_mean"] >= ref["psnr_mean"] - tol),
                           None)
                r[f"time_to_ref_psnr{key}"] = None if hit is None else hit["seconds"]
                r[f"iterations_to_ref_psnr{key}"] = None if hit is None else hit["iteration"]
                r[f"time_to_ref_psnr{key}_speedup"] = (
                    ref["seconds"] / hit["seconds"] if hit is not None and hit["seconds"] > 0
                    else None)


def measure(args, on_task=None, cmd: str | None = None) -> dict:
    """Runs every task; ``on_task(payload)`` is called after each one with the tasks done so far
    (a run cut short by a time limit still leaves its finished tasks on disk). ``cmd``: the command
    recorded (default: this module with this process's arguments)."""
    import dflow_fast
    from dflow_fast import metrics
    from dflow_fast.tasks import make as make_task
    from dflow_fast.data import fashion_mnist
    from dflow_fast.models import load_pretrained

    device = torch.device(args.device)
    flow = load_pretrained("fashion-mnist").to(device)
    images, _ = fashion_mnist("test", limit=1000)
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:args.n]
    truth = images[idx].to(device)
    # One untimed optimization first: first calls allocate caches and load kernels.
    warm = make_task(args.tasks[0], truth[:2], sigma=args.sigma)
    dflow_fast.optimize(flow, warm.cost, torch.randn_like(truth[:2]), steps=args.steps, max_iter=2)

    tasks = []
    for task in args.tasks:
        p = make_task(task, truth, sigma=args.sigma,
                      generator=torch.Generator().manual_seed(args.seed))
        x0 = dflow_fast.backward_blend(flow, p.guess, alpha=args.alpha, steps=args.steps,
                                       generator=torch.Generator(device).manual_seed(
                                           args.seed + 1))  # on x's device: randn needs that
        with torch.no_grad():
            blend_psnr = float(metrics.psnr(dflow_fast.solve(flow, x0, steps=args.steps),
                                            truth).mean())
        runs = []
        if args.reference:
            runs.append(run_reference(flow, p, x0, truth, args, device))
            _log(task, runs[-1])
        for gradient in args.gradient:
            for b in args.batch:
                runs.append(run_dflow(flow, p, x0, truth, b, gradient, args, device,
                                      track=args.reference))
                _log(task, runs[-1])
        compare(runs, args.n)
        tasks.append({"task": task, "n": args.n, "blend_psnr_mean": blend_psnr, "runs": runs})
        if on_task is not None:
            on_task(_payload(args, flow, tasks, cmd))
    return _payload(args, flow, tasks, cmd)


def _payload(args, flow, tasks: list[dict], cmd: str | None = None) -> dict:
    return {
        "benchmark": "e2e",
        "command": cmd or command(MODULE),
        "config": {
            "model": "dflow_fast.models.load_pretrained('fashion-mnist')",
            "n_params": n_params(flow), "data": "Fashion-MNIST test, seeded random subset",
            "tasks": args.tasks, "n": args.n, "batch": args.batch, "steps": args.steps,
            "solver": "midpoint", "max_iter": args.max_iter,
            "max_eval": default_max_eval(args.max_iter), "gradient": args.gradient,
            "sigma": args.sigma, "alpha": args.alpha, "threads": torch.get_num_threads(),
            "seed": args.seed, "equal_cost_tolerance": EQUAL_COST_TOL,
            "time": (f"seconds = {'process CPU time' if args.time == 'cpu' else 'wall time'} "
                     "of the whole set of n problems (both recorded; CUDA synchronized)"),
            "time_basis": args.time,
        },
        "tasks": tasks,
    }


def _log(task, r) -> None:
    print(f"{task:12s} {r['method']:19s} batch {r['batch']:3d}: {r['seconds']:7.1f} s  "
          f"cost {r['loss_mean']:.4f}  PSNR {r['psnr_mean']:.2f}", file=sys.stderr, flush=True)


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def markdown(payload: dict, meta: dict) -> str:
    cfg = payload["config"]
    commit = f"`{(meta.get('commit') or 'unknown')[:12]}`"
    commit += " (+ local edits)" if meta.get("dirty") else ""
    lines = [
        f"# D-Flow end to end: {meta['device_name']} ({meta['device']})",
        "",
        f"Bundled Fashion-MNIST flow ({cfg['n_params'] / 1e6:.2f}M params), {cfg['n']} test "
        f"images per task, midpoint {cfg['steps']} steps, L-BFGS max_iter {cfg['max_iter']} "
        f"(max_eval {cfg['max_eval']}), noise sigma "
        f"{cfg['sigma']}, backward blend alpha {cfg['alpha']}, {cfg['threads']} thread(s); "
        f"torch {meta['torch']}, commit {commit}. \"seconds\": "
        + ("this process's CPU time (one thread: the wall time of an unshared core; other jobs "
           "on the shared machine do not inflate it); \"wall s\": wall time."
           if cfg.get("time_basis") == "cpu" else "wall time."),
        "`reference`: dflow_fast.reference.optimize one image at a time (the paper's loop). "
        "\"equal cost\": dflow_fast's mean final cost ≤ 1.01 x the reference's. "
        "\"time to ref PSNR\": seconds (as above) until dflow_fast's mean PSNR first reaches the "
        "reference's final mean PSNR (callback time excluded; only for a batch holding all "
        "images); the reference needs its whole loop for it. \"velocity calls\": network "
        "evaluations per problem, the adjoint's backward recomputation included (autograd's "
        "backward calls no velocity; the reference's count includes its final solve).",
        "`dflow_fast-adjoint` / `-backprop`: `dflow_fast.optimize(gradient=...)`; batch 1 is "
        "dflow_fast's own per-image loop.",
        "",
        "| task | method | batch | seconds | wall s | problems / hour | x ref | mean final cost "
        "| cost / ref | median per-problem cost / ref | equal cost | PSNR (dB) "
        f"| time to ref PSNR (s) | time to ref PSNR − {PSNR_TOL} dB (s) "
        "| velocity calls / problem |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for t in payload["tasks"]:
        for r in t["runs"]:
            eq = r.get("equal_cost")
            ttp = []
            for key in ("time_to_ref_psnr", "time_to_ref_psnr_tol"):
                if r["method"] == "reference":
                    ttp.append(f"{r['seconds']:.1f}")
                elif r.get("curve") and r.get(key) is None:
                    ttp.append("not reached")
                else:
                    ttp.append(_fmt(r.get(key), ".1f"))
            ttp_s = " | ".join(ttp)
            lines.append(
                f"| {t['task']} | {r['method']} | {r['batch']} | {r['seconds']:.1f} "
                f"| {r['wall_seconds']:.1f} "
                f"| {r['problems_per_hour']:.0f} | {_fmt(r.get('throughput_ratio_vs_ref'), '.2f')} "
                f"| {r['loss_mean']:.4f} | {_fmt(r.get('cost_ratio_vs_ref'), '.4f')} "
                f"| {_fmt(r.get('cost_ratio_median'), '.4f')} "
                f"| {'–' if eq is None else ('yes' if eq else 'NO')} | {r['psnr_mean']:.2f} "
                f"| {ttp_s} | {r['velocity_evals_per_problem']:.0f} |")
    spread = []
    for t in payload["tasks"]:
        costs = [r["loss_mean"] for r in t["runs"] if r["method"].startswith("dflow_fast")]
        if len(costs) > 1:
            spread.append(f"{t['task']} {100 * (max(costs) / min(costs) - 1):.1f}%")
    if spread:
        lines += ["", "Spread of dflow_fast's own mean final cost across its runs (batch sizes and "
                  "gradient schemes: the same algorithm, different float32 rounding): "
                  + ", ".join(spread) + ". Differences to the reference of that size are "
                  "rounding steering unconverged L-BFGS runs, not a different algorithm."]
    lines += ["", "Blend only (backward blend decoded without optimization), mean PSNR: "
              + ", ".join(f"{t['task']} {t['blend_psnr_mean']:.2f} dB" for t in payload["tasks"])
              + "."]
    return "\n".join(lines) + "\n"


def plot(payload: dict, meta: dict, stem: Path) -> list[Path]:
    """``<stem>_throughput.png`` (problems per hour vs batch) and ``_psnr.png`` (mean PSNR vs
    time), one panel per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = payload["tasks"]
    title = f"{meta['device_name']}: D-Flow on Fashion-MNIST, n={payload['config']['n']}"

    def panels():
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 4.0), dpi=110,
                                 squeeze=False)
        return fig, axes[0]

    def save(fig, axes, what: str, suffix: str) -> Path:
        for ax, t in zip(axes, tasks):
            ax.set_title(t["task"], fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[-1].legend(fontsize=7)
        fig.suptitle(f"{what} — {title}", fontsize=10)
        fig.tight_layout()
        path = stem.with_name(stem.name + suffix)
        fig.savefig(path)
        plt.close(fig)
        return path

    fig, axes = panels()
    for ax, t in zip(axes, tasks):
        colors = {"adjoint": "tab:red", "backprop": "tab:blue"}
        fast = [r for r in t["runs"] if r["method"].startswith("dflow_fast")]
        for g in sorted({r["gradient"] for r in fast}):
            rs = sorted((r for r in fast if r["gradient"] == g), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rs], [r["problems_per_hour"] for r in rs], "o-",
                    color=colors.get(g), label=f"dflow_fast, {g}")
        for r in t["runs"]:
            if r["method"] == "reference":
                ax.axhline(r["problems_per_hour"], color="black", ls="--",
                           label="reference loop (1 image at a time)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch"] for r in fast}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch")
        ax.set_ylabel("problems per hour")
    out = [save(fig, axes, "throughput vs batch", "_throughput.png")]

    fig, axes = panels()
    for ax, t in zip(axes, tasks):
        for r in t["runs"]:
            if r.get("curve"):
                ax.plot([p["seconds"] for p in r["curve"]], [p["psnr_mean"] for p in r["curve"]],
                        ".-", color={"adjoint": "tab:red"}.get(r["gradient"], "tab:blue"),
                        label=f"{r['method']}, batch {r['batch']}")
            if r["method"] == "reference":
                ax.axhline(r["psnr_mean"], color="black", ls=":", lw=1,
                           label="reference final PSNR")
                ax.plot([r["seconds"]], [r["psnr_mean"]], "ks",
                        label="reference loop done")
        ax.set_xlabel(("CPU" if payload["config"].get("time_basis") == "cpu" else "wall")
                      + " seconds (all images)")
        ax.set_ylabel("mean PSNR (dB)")
    out.append(save(fig, axes, "PSNR vs time", "_psnr.png"))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text())
        meta = doc.pop("meta")
        for t in doc["tasks"]:
            compare(t["runs"], t["n"])
        path = write_json(args.render, doc, meta["device"], meta)
        payload = doc
    else:
        torch.set_num_threads(args.threads)
        meta = environment(args.device)

        def save_partial(payload):
            write_json(args.out, payload, args.device, meta).with_suffix(".md").write_text(
                markdown(payload, meta))

        payload = measure(args, on_task=save_partial, cmd=command(MODULE, argv))
        path = write_json(args.out, payload, args.device, meta)
    md = path.with_suffix(".md")
    md.write_text(markdown(payload, meta))
    written = [path, md] + (plot(payload, meta, path.with_suffix("")) if args.plot else [])
    print(md.read_text())
    print("wrote " + ", ".join(shown(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
