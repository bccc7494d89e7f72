"""Reversible solvers on the trained Fashion-MNIST flow: linear stability, accuracy, reconstruction
drift, and the cost of one gradient (docs/reversible.md has the tables and how to read them).

Four sections, each a table printed and written to ``bench/results/reversible_<device>.{json,md}``:

- ``stability`` (instant, no model): on the linear test equation dx/dt = a x, one step of each
  solver is a linear map of its state pair; its spectral radius at z = h a, next to |exp(z)|,
  shows the parasitic mode of the pair (y - yhat, y - z). The matrices come from running the
  library's own step code on basis vectors, not from hand-written formulas.
- ``accuracy`` (float64, so only discretization error shows): for each solver and step count N,
  ``||x1 - x_ref|| / ||x_ref||`` against a fine reference (plain midpoint, ``--ref-steps`` steps,
  whose own error is estimated from the same solve at half the steps) and
  ``||x1 - x1_midpoint(N)|| / ||x1_midpoint(N)||`` against the plain midpoint sampler at the same N,
  with the velocity evaluations (NFE) per solve. The coupled solvers at several couplings lambda.
- ``drift`` (float32, and bfloat16 with ``--drift-dtypes``): the relative distance between x0 and
  the x0 rebuilt by the inverse sweep (``dflow_fast.gradients.reversible.reconstruction_drift``;
  max and median over the batch) across N and lambda, against the warning tolerance of the dtype.
- ``gradient`` (float32): one gradient d cost(x1)/d x0 (cost = per-sample MSE to a random target,
  summed) by backprop, the stored adjoint and the reversible sweep, per solver and N: median time
  over ``--repeats`` round-robin rounds, peak and after-forward bytes saved for backward
  (``bench.lib.SavedBytesMeter``: by storage, live over forward + backward, weights excluded),
  velocity calls, and the gradient's distance to backprop's.

Run from the repository root (about 35 minutes on one CPU thread; the float64 reference solve and
the six couplings dominate)::

    python -m bench.bench_reversible
    python -m bench.bench_reversible --sections drift --drift-dtypes float32 bfloat16
    python -m bench.bench_reversible --device cuda --batch 64        # on a GPU machine
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from bench.lib import (RESULTS_DIR, SavedBytesMeter, command, environment, rel_err, shown,
                       time_interleaved, write_json)
import dflow_fast as df
from dflow_fast.core.plan import DEFAULT_COUPLING, SOLVERS
from dflow_fast.gradients.reversible import drift_tolerance, reconstruction_drift
from dflow_fast.models import load_pretrained

MODULE = "bench.bench_reversible"
COUPLED = ("reversible_euler", "reversible_midpoint")


def checkpoint_info() -> dict:
    """Which trained weights a section ran with (they may be retrained between runs)."""
    import hashlib
    from dflow_fast.models import PRETRAINED, WEIGHTS_DIR
    path = WEIGHTS_DIR / PRETRAINED["fashion-mnist"]
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "mtime": path.stat().st_mtime}


def nfe(solver: str, n: int) -> int:
    return SOLVERS[solver] * n + (solver == "reversible_heun")


def nfe_label(solver: str) -> str:
    return "N+1" if solver == "reversible_heun" else f"{SOLVERS[solver]}N".replace("1N", "N")


def configs(couplings):
    """(solver, coupling) rows: the plain samplers, Heun, and the coupled ones per lambda."""
    rows = [("euler", None), ("midpoint", None), ("reversible_heun", None)]
    for s in COUPLED:
        rows += [(s, lam) for lam in couplings]
    return rows


def label(solver: str, lam) -> str:
    return solver if lam is None else f"{solver} (λ={lam:g})"


# ---- stability -----------------------------------------------------------------------------------

STABILITY_Z = [-1.0, -0.5, -0.2, -0.05, 0.2]


def step_matrix(solver: str, lam, z: float) -> torch.Tensor:
    """The 2x2 map (y, w) -> (y', w') of one step of size 1 on dx/dt = z x, built column by column
    with the library's sweep (float64)."""
    from dflow_fast.core.plan import make_plan
    from dflow_fast.core.reversible_steps import sweep
    e = torch.eye(2, dtype=torch.float64)
    plan = make_plan(solver, 1, 0.0, 1.0, None, e, "torch", coupling=lam)
    cols = [torch.stack(sweep(lambda t, x: z * x, plan, 0, 1, e[i:i + 1, :1], e[i:i + 1, 1:]))
            .flatten() for i in range(2)]
    return torch.stack(cols, 1)


def stability(args, device) -> dict:
    rows = []
    for solver, lam in configs(args.couplings):
        if solver in ("euler", "midpoint"):
            continue
        for z in STABILITY_Z:
            radius = float(torch.linalg.eigvals(step_matrix(solver, lam, z)).abs().max())
            rows.append({"solver": solver, "coupling": lam, "z": z, "spectral_radius": radius,
                         "exp_z": float(torch.tensor(z).exp())})
    return {"rows": rows, "seconds": 0.0}


def stability_table(res: dict, couplings) -> str:
    zs = sorted({r["z"] for r in res["rows"]})
    lines = ["| solver | " + " | ".join(f"z={z:g}" for z in zs) + " |",
             "|:---|" + "---:|" * len(zs),
             "| exact: exp(z) | " + " | ".join(f"{torch.tensor(z).exp():.3f}" for z in zs) + " |"]
    for solver, lam in configs(couplings):
        per = {r["z"]: r for r in res["rows"] if r["solver"] == solver and r["coupling"] == lam}
        if per:
            lines.append(f"| {label(solver, lam)} | "
                         + " | ".join(f"{per[z]['spectral_radius']:.3f}" for z in zs) + " |")
    return "\n".join(lines) + ("\n\nSpectral radius of one step's map of the state pair on "
                               "dx/dt = a x, z = h a. Above exp(z) for z < 0: a parasitic mode "
                               "that grows where the flow contracts.")


# ---- accuracy ------------------------------------------------------------------------------------

def accuracy(args, device) -> dict:
    model = load_pretrained("fashion-mnist", device=device, dtype=torch.float64)
    g = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(args.batch, 1, 28, 28, generator=g, dtype=torch.float64).to(device)
    t = time.perf_counter()
    with torch.no_grad():
        ref = df.solve(model, x0, steps=args.ref_steps, solver="midpoint")
        half = df.solve(model, x0, steps=args.ref_steps // 2, solver="midpoint")
        # midpoint is second order: err(half) ~ 4 err(ref), so err(ref) ~ |half - ref| / 3
        ref_err = rel_err(half, ref) / 3
        rows = []
        for n in args.steps:
            plain = df.solve(model, x0, steps=n, solver="midpoint")
            for solver, lam in configs(args.couplings):
                x1 = df.solve(model, x0, steps=n, solver=solver, coupling=lam)
                rows.append({"solver": solver, "coupling": lam, "steps": n, "nfe": nfe(solver, n),
                             "err_vs_reference": rel_err(x1, ref),
                             "dist_to_midpoint_same_steps": rel_err(x1, plain)})
    return {"reference": {"solver": "midpoint", "steps": args.ref_steps,
                          "estimated_rel_error": ref_err},
            "dtype": "float64", "batch": args.batch, "rows": rows,
            "seconds": time.perf_counter() - t}


def accuracy_table(res: dict, couplings) -> str:
    steps = sorted({r["steps"] for r in res["rows"]})
    head = ("| solver | NFE | " + " | ".join(f"N={n}: vs ref / vs midpoint" for n in steps)
            + " |\n|:---|:---|" + "---:|" * len(steps))
    lines = [head]
    for solver, lam in configs(couplings):
        cells = []
        per = [r for r in res["rows"] if r["solver"] == solver and r["coupling"] == lam]
        for n in steps:
            r = next(r for r in per if r["steps"] == n)
            vs_mid = "—" if solver == "midpoint" else f"{r['dist_to_midpoint_same_steps']:.2e}"
            cells.append(f"{r['err_vs_reference']:.2e} / {vs_mid}")
        lines.append(f"| {label(solver, lam)} | {nfe_label(solver)} | " + " | ".join(cells) + " |")
    ref = res["reference"]
    return ("\n".join(lines) + f"\n\nReference: midpoint, {ref['steps']} steps (estimated relative "
            f"error {ref['estimated_rel_error']:.1e}); float64; batch {res['batch']}.")


# ---- drift ---------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def drift(args, device) -> dict:
    rows = []
    t = time.perf_counter()
    for dname in args.drift_dtypes:
        dtype = DTYPES[dname]
        model = load_pretrained("fashion-mnist", device=device, dtype=dtype)
        g = torch.Generator().manual_seed(args.seed)
        x0 = torch.randn(args.batch, 1, 28, 28, generator=g).to(device=device, dtype=dtype)
        steps = args.steps if dname == "float32" else [n for n in args.steps if n <= 16]
        for solver, lam in configs(args.drift_couplings):
            if solver in ("euler", "midpoint"):
                continue
            for n in steps:
                d = reconstruction_drift(model, x0, solver=solver, steps=n, coupling=lam)
                rows.append({"dtype": dname, "solver": solver, "coupling": lam, "steps": n,
                             "drift_max": float(d.max()), "drift_median": float(d.median()),
                             "tolerance": drift_tolerance(dtype)})
    return {"batch": args.batch, "rows": rows, "seconds": time.perf_counter() - t}


def drift_table(res: dict, dname: str, couplings) -> str:
    rows = [r for r in res["rows"] if r["dtype"] == dname]
    if not rows:
        return ""
    steps = sorted({r["steps"] for r in rows})
    lines = ["| solver | " + " | ".join(f"N={n}" for n in steps) + " |",
             "|:---|" + "---:|" * len(steps)]
    for solver, lam in configs(couplings):
        per = [r for r in rows if r["solver"] == solver and r["coupling"] == lam]
        if not per:
            continue
        cells = []
        for n in steps:
            r = next(r for r in per if r["steps"] == n)
            flag = " ⚠" if not r["drift_max"] <= r["tolerance"] else ""
            cells.append(f"{r['drift_max']:.1e}{flag}")
        lines.append(f"| {label(solver, lam)} | " + " | ".join(cells) + " |")
    tol = rows[0]["tolerance"]
    return ("\n".join(lines) + f"\n\n{dname}: max over the batch of the relative drift; ⚠ marks "
            f"values above the warning tolerance {tol:.2g} (sqrt(eps)).")


# ---- gradient ------------------------------------------------------------------------------------

GRAD_METHODS = {"midpoint": ("backprop", "adjoint"),
                "reversible_heun": ("backprop", "adjoint", "reversible"),
                "reversible_midpoint": ("backprop", "adjoint", "reversible")}


def gradient(args, device) -> dict:
    model = load_pretrained("fashion-mnist", device=device)
    exclude = list(model.parameters()) + list(model.buffers())
    g = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(args.grad_batch, 1, 28, 28, generator=g).to(device)
    target = torch.randn(args.grad_batch, 1, 28, 28, generator=g).clamp(-1, 1).to(device)
    calls = [0]

    def velocity(t, x):
        calls[0] += 1
        return model(t, x)

    def one(solver, method, n):
        x = x0.detach().requires_grad_(True)
        x1 = df.solve(velocity, x, steps=n, solver=solver, gradient=method, params=[])
        loss = ((x1 - target) ** 2).flatten(1).mean(1).sum()
        return torch.autograd.grad(loss, x)[0]

    rows = []
    t0 = time.perf_counter()
    for solver, methods in GRAD_METHODS.items():
        for n in args.grad_steps:
            grads, meas = {}, {}
            for m in methods:  # one measured call per method: memory, gradient, calls
                gc.collect()
                meter = SavedBytesMeter(exclude=exclude)
                calls[0] = 0
                with meter:
                    x = x0.detach().requires_grad_(True)
                    x1 = df.solve(velocity, x, steps=n, solver=solver, gradient=m, params=[])
                    loss = ((x1 - target) ** 2).flatten(1).mean(1).sum()
                    meter.mark()
                    grads[m] = torch.autograd.grad(loss, x)[0]
                    del x1, loss
                meas[m] = {"peak_saved_bytes": meter.peak,
                           "saved_after_forward": meter.after_forward, "velocity_calls": calls[0]}
            times = time_interleaved({m: (lambda m=m: one(solver, m, n)) for m in methods}, device,
                                     repeats=args.repeats, warmup=args.warmup)
            for m in methods:
                med = statistics.median(times[m])
                rows.append({"solver": solver, "method": m, "steps": n, "times_s": times[m],
                             "median_s": med, **meas[m],
                             "rel_err_vs_backprop": rel_err(grads[m], grads["backprop"])})
    for r in rows:
        bp = next(b for b in rows if b["solver"] == r["solver"] and b["steps"] == r["steps"]
                  and b["method"] == "backprop")
        r["time_vs_backprop"] = r["median_s"] / bp["median_s"]
        r["memory_vs_backprop"] = r["peak_saved_bytes"] / bp["peak_saved_bytes"]
    return {"batch": args.grad_batch, "dtype": "float32", "rows": rows,
            "seconds": time.perf_counter() - t0}


def gradient_table(res: dict) -> str:
    lines = ["| solver | gradient | N | velocity calls | time (s) | × backprop | peak saved (MiB) "
             "| × backprop | after forward (MiB) | rel. err vs backprop |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['solver']} | {r['method']} | {r['steps']} | {r['velocity_calls']} | "
            f"{r['median_s']:.3f} | {r['time_vs_backprop']:.2f} | "
            f"{r['peak_saved_bytes'] / 2**20:.2f} | "
            f"{r['memory_vs_backprop']:.3f} | {r['saved_after_forward'] / 2**20:.3f} | "
            f"{r['rel_err_vs_backprop']:.1e} |")
    return "\n".join(lines) + (f"\n\nfloat32, batch {res['batch']}, gradient w.r.t. x0 only "
                               f"(params=[]); median of round-robin repeats.")


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sections", nargs="+", default=["stability", "accuracy", "drift", "gradient"],
                   choices=["stability", "accuracy", "drift", "gradient"])
    p.add_argument("--batch", type=int, default=8, help="batch of the accuracy and drift runs")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--ref-steps", type=int, default=1000)
    p.add_argument("--couplings", type=float, nargs="+",
                   default=[0.5, 0.8, 0.9, 0.95, 0.99, 0.999])
    p.add_argument("--drift-couplings", type=float, nargs="+",
                   default=[0.5, 0.8, 0.9, 0.95, 0.99, 0.999])
    p.add_argument("--drift-dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    p.add_argument("--grad-steps", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--grad-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/reversible_<dev>)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS_DIR / f"reversible_{device.type}.json"
    payload = {"command": command(MODULE, argv),
               "default_coupling": DEFAULT_COUPLING}
    if out.exists():  # keep the sections not rerun this time
        import json
        old = json.loads(out.read_text())
        payload.update({k: v for k, v in old.items()
                        if k in ("stability", "accuracy", "drift", "gradient")})
    md = [f"# Reversible solvers — {device.type}\n", f"Command: `{payload['command']}`\n"]
    for section in args.sections:
        ckpt = checkpoint_info()
        payload[section] = globals()[section](args, device)
        if section != "stability":
            if checkpoint_info() != ckpt:
                raise RuntimeError("the fashion-mnist checkpoint changed during the run; rerun")
            payload[section]["checkpoint"] = ckpt
        print(f"[{section}: {payload[section]['seconds']:.0f} s]", flush=True)
    if "stability" in payload:
        md += ["## Linear stability of the state pair\n",
               stability_table(payload["stability"], args.couplings), ""]
    if "accuracy" in payload:
        md += ["## Accuracy (x1 vs a fine reference, and vs plain midpoint at the same N)\n",
               accuracy_table(payload["accuracy"], args.couplings), ""]
    if "drift" in payload:
        md.append("## Reconstruction drift\n")
        for dname in DTYPES:
            table = drift_table(payload["drift"], dname, args.drift_couplings)
            if table:
                md += [table, ""]
    if "gradient" in payload:
        md += ["## One gradient: time and saved bytes\n", gradient_table(payload["gradient"]), ""]
    text = "\n".join(md)
    print(text)
    write_json(out, payload, device, meta=environment(device))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {shown(out)} and {shown(out.with_suffix('.md'))}")


if __name__ == "__main__":
    main()
