"""The ``dflow-fast`` command line."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dflow-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo-digits", help="train a tiny flow on sklearn digits and inpaint")
    d.add_argument("--n", type=int, default=16, help="held-out digits to inpaint")
    d.add_argument("--train-steps", type=int, default=1500)
    d.add_argument("--steps", type=int, default=6, help="midpoint steps of the ODE solve")
    d.add_argument("--max-iter", type=int, default=20, help="L-BFGS iterations")
    d.add_argument("--out", default="demo_out/digits")
    d.add_argument("--seed", type=int, default=0)

    sub.add_parser("info", help="print build_info()")

    args = parser.parse_args(argv)
    if args.command == "demo-digits":
        from .demo_digits import run
        report = run(n=args.n, train_steps=args.train_steps, steps=args.steps,
                     max_iter=args.max_iter, out=args.out, seed=args.seed)
        print(json.dumps(report, indent=2))
        print(f"wrote {args.out}/inpainting.png and {args.out}/report.json")
    elif args.command == "info":
        from . import build_info
        print(json.dumps(build_info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
