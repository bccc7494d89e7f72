"""The ``dflow-fast`` command line."""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (imports no torch, so ``--help`` is instant)."""
    parser = argparse.ArgumentParser(prog="dflow-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("demo", help="D-Flow on held-out Fashion-MNIST test images with the "
                       "bundled flow model: PNG grids and a JSON/Markdown report")
    f.add_argument("--n", type=int, default=3, help="test images per task")
    f.add_argument("--tasks", nargs="+", default=None,
                   help="tasks (default: all): inpaint_box inpaint_random sr2 sr4 deblur "
                        "denoise class")
    # = demo.run's defaults (tests/apps check): the main job's size, see its docstring
    f.add_argument("--steps", type=int, default=4, help="midpoint steps of the ODE solve")
    f.add_argument("--max-iter", type=int, default=40,
                   help="L-BFGS iterations at most (each image stops at its noise level)")
    f.add_argument("--alpha", type=float, default=0.1, help="backward-blend alpha")
    f.add_argument("--sigma", type=float, default=0.05,
                   help="measurement noise std (denoise: 0.2)")
    f.add_argument("--no-reference", action="store_true",
                   help="skip the per-image reference path")
    f.add_argument("--device", default="cpu")
    f.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64: the batched and per-image paths take the same iterates")
    # = demo.GRADIENTS (tests/test_demo.py checks), written out: the parser imports no torch
    f.add_argument("--gradient", choices=["adjoint", "backprop", "auto"], default="auto",
                   help="dflow_fast's gradient scheme (default auto: backprop's graphs where "
                        "they fit the memory budget, else the adjoint's recomputation)")
    # = demo.MODELS (tests check), written out: the parser imports no torch
    f.add_argument("--model", choices=["fashion-mnist", "fashion-mnist-ddpm"],
                   default="fashion-mnist",
                   help="the bundled flow-matching U-Net (default) or the bundled DDPM through "
                        "the diffusers adapter (needs the [diffusers] extra)")
    f.add_argument("--out", default="demo_out/fashion")
    f.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("demo-digits", help="train a tiny flow on sklearn digits and inpaint")
    d.add_argument("--n", type=int, default=16, help="held-out digits to inpaint")
    d.add_argument("--train-steps", type=int, default=1500)
    d.add_argument("--steps", type=int, default=6, help="midpoint steps of the ODE solve")
    d.add_argument("--max-iter", type=int, default=20, help="L-BFGS iterations")
    d.add_argument("--out", default="demo_out/digits")
    d.add_argument("--seed", type=int, default=0)

    sub.add_parser("info", help="print build_info()")
    _add_run_parser(sub)
    _add_molecules_parser(sub)
    return parser


def _add_run_parser(sub) -> None:
    """``dflow-fast run``: a resumable, sharded batch job (docs/jobs.md). Choices are written
    out (the parser imports no torch); tests/jobs/test_cli.py checks them against the package."""
    r = sub.add_parser("run", help="D-Flow over a dataset, an image folder or an array file in "
                       "resumable chunks; under torchrun the chunks shard over the workers")
    r.add_argument("--task", required=True,
                   help="inpaint_box inpaint_random sr2 sr4 deblur denoise class")
    r.add_argument("--data", required=True,
                   help="fashion-mnist:test | fashion-mnist:train | mnist-5k | DIR (PNG/JPEG "
                        "images) | FILE (.npy, .pt or .safetensors holding [N, C, H, W])")
    r.add_argument("--indices", default=None, help="A:B, a slice of the data (default: all)")
    r.add_argument("--model", default="fashion-mnist",
                   help="fashion-mnist | fashion-mnist-ddpm | module:function | "
                        "path/to/file.py:function (function(device=, dtype=) -> velocity(t, x))")
    r.add_argument("--batch", type=int, default=16, help="problems per chunk (one optimize call)")
    r.add_argument("--steps", type=int, default=6, help="solver steps of the ODE solve")
    r.add_argument("--solver", default="midpoint",
                   choices=["euler", "midpoint", "reversible_euler", "reversible_heun",
                            "reversible_midpoint"])
    r.add_argument("--gradient", default="auto",
                   choices=["adjoint", "backprop", "reversible", "auto"])
    r.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations at most")
    r.add_argument("--sigma", type=float, default=None,
                   help="measurement noise std (default 0.05; denoise 0.2)")
    r.add_argument("--alpha", type=float, default=0.1,
                   help="backward-blend weight of the initial x0 (0: pure noise)")
    r.add_argument("--seed", type=int, default=0, help="problem i's randomness is (seed, i)'s")
    r.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    r.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK where there are GPUs, else cpu) | cpu | cuda")
    r.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (results are bitwise reproducible at a fixed "
                        "count)")
    r.add_argument("--out", required=True, help="the job folder")
    r.add_argument("--resume", action="store_true",
                   help="continue the job in --out: keep verified chunks, compute the rest")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--worker-timeout", type=float, default=300.0,
                   help="seconds rank 0 waits on a worker that stopped beating before it gives "
                        "up (the finished chunks are kept for --resume)")


def _add_molecules_parser(sub) -> None:
    """``dflow-fast molecules``: D-Flow on QM9 with the EDM protocol (docs/molecules.md). Choices
    are written out (the parser imports no torch); tests/molecules/test_app.py checks them."""
    m = sub.add_parser("molecules", help="D-Flow steers QM9 molecules to target properties "
                       "(polarizability alpha); MAE by an independent regressor, EDM's protocol")
    m.add_argument("--target", required=True, choices=["alpha"],
                   help="the property (targets: the first --n molecules of QM9's test split)")
    m.add_argument("--n", type=int, required=True, help="molecules to generate")
    m.add_argument("--out", required=True, help="folder for xyz/, molecules.sdf, report.*")
    m.add_argument("--max-iter", type=int, default=20, help="L-BFGS iterations at most")
    m.add_argument("--steps", type=int, default=10, help="solver steps of the ODE solve")
    m.add_argument("--solver", choices=["euler", "midpoint"], default="midpoint")
    m.add_argument("--gradient", choices=["adjoint", "backprop", "auto"], default="auto")
    m.add_argument("--prior-weight", type=float, default=1.0,
                   help="weight of the chi_d prior on the zero-CoM subspace (0: none)")
    m.add_argument("--seed", type=int, default=0, help="seed of the noise and the shuffle")
    m.add_argument("--batch", type=int, default=32, help="molecules per optimize call")
    m.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    m.add_argument("--flow", default=None,
                   help="EGNNFlow checkpoint (.safetensors; default: pretrained qm9-flow)")
    m.add_argument("--guide", default=None, help="EGNNRegressor checkpoint for the D-Flow cost "
                   "(default: pretrained qm9-alpha-guide)")
    m.add_argument("--eval", default=None, help="EGNNRegressor checkpoint that judges "
                   "(default: pretrained qm9-alpha-eval)")
    m.add_argument("--lbound-n", type=int, default=None,
                   help="test molecules for the L-bound (default: the figure the eval "
                        "checkpoint records over the whole test split, else all of it)")
    m.add_argument("--validity", choices=["edm", "rdkit"], default="edm",
                   help="RDKit validity with EDM's distance bonds or RDKit's DetermineBonds")
    m.add_argument("--resume", action="store_true",
                   help="continue the run in --out: keep its verified batches (chunks/), "
                        "compute the rest")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import DEFAULT_TASKS, run as run_demo, to_markdown
        report = run_demo(n=args.n, tasks=args.tasks or DEFAULT_TASKS, steps=args.steps,
                          max_iter=args.max_iter, sigma=args.sigma, alpha=args.alpha,
                          out=args.out, seed=args.seed, reference=not args.no_reference,
                          device=args.device, dtype=args.dtype, gradient=args.gradient,
                          model=args.model)
        print(to_markdown(report))
        print(f"wrote {args.out}/<task>.png, report.json and report.md")
    elif args.command == "demo-digits":
        from .demo_digits import run
        report = run(n=args.n, train_steps=args.train_steps, steps=args.steps,
                     max_iter=args.max_iter, out=args.out, seed=args.seed)
        print(json.dumps(report, indent=2))
        print(f"wrote {args.out}/inpainting.png and {args.out}/report.json")
    elif args.command == "run":
        from ..jobs.main import main as run_job
        return run_job(args)
    elif args.command == "molecules":
        from .molecules import main as run_molecules
        return run_molecules(args)
    elif args.command == "info":
        from ..ops.build import build_info
        print(json.dumps(build_info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
