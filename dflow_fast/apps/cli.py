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
    f.add_argument("--steps", type=int, default=6, help="midpoint steps of the ODE solve")
    f.add_argument("--max-iter", type=int, default=100,
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
    f.add_argument("--gradient", choices=["adjoint", "backprop", "auto"], default="adjoint",
                   help="dflow_fast's gradient scheme (default adjoint; backprop: half the "
                        "network evaluations, faster where memory allows)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import DEFAULT_TASKS, run as run_demo, to_markdown
        report = run_demo(n=args.n, tasks=args.tasks or DEFAULT_TASKS, steps=args.steps,
                          max_iter=args.max_iter, sigma=args.sigma, alpha=args.alpha,
                          out=args.out, seed=args.seed, reference=not args.no_reference,
                          device=args.device, dtype=args.dtype, gradient=args.gradient)
        print(to_markdown(report))
        print(f"wrote {args.out}/<task>.png, report.json and report.md")
    elif args.command == "demo-digits":
        from .demo_digits import run
        report = run(n=args.n, train_steps=args.train_steps, steps=args.steps,
                     max_iter=args.max_iter, out=args.out, seed=args.seed)
        print(json.dumps(report, indent=2))
        print(f"wrote {args.out}/inpainting.png and {args.out}/report.json")
    elif args.command == "info":
        from ..ops.build import build_info
        print(json.dumps(build_info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
