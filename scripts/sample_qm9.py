"""Draw molecules from the QM9 flow and report EDM's sample-quality numbers (atom stability,
molecule stability, RDKit validity, uniqueness) next to EDM's published ones.

Atom counts are drawn from train half A's distribution (the flow's data), noise from a seeded
generator; the ODE runs with ``dflow_fast.solve``. Writes ``<out>/report.json`` (the numbers, the
settings and the usual provenance: device, versions, git commit, command), ``<out>/report.md``
and ``<out>/samples.xyz`` (every molecule, multi-frame .xyz). Example (the model card's run)::

    python scripts/sample_qm9.py --n 1000 --steps 50 --out dflow_fast/models/card/qm9
    python scripts/sample_qm9.py --state dflow_fast/models/weights/qm9_flow_run/state.pt ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lib.env import command, environment, write_json  # noqa: E402
from dflow_fast import molecules as mol  # noqa: E402
from dflow_fast.data import qm9  # noqa: E402
from dflow_fast.models import EGNNFlow, load_checkpoint, load_pretrained  # noqa: E402

#: EDM (Hoogeboom et al. 2022), Table 1, QM9 with hydrogens, in percent
EDM = {"atom_stability": 98.7, "molecule_stability": 82.0, "validity": 91.9, "uniqueness": 98.7}
DATA_EDM = {"atom_stability": 99.0, "molecule_stability": 95.2, "validity": 97.7,
            "uniqueness": 100.0}
KEYS = ("atom_stability", "molecule_stability", "validity", "uniqueness")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default="qm9-flow",
                     help="a PRETRAINED name or a .safetensors file (default qm9-flow)")
    src.add_argument("--state", type=Path, help="a train_qm9.py state.pt (its EMA weights)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--solver", default="midpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--validity", choices=["edm", "rdkit"], default="edm")
    p.add_argument("--data", action="store_true",
                   help="also score --n real test molecules (the metrics' ceiling)")
    return p.parse_args(argv)


def load_flow(args):
    if args.state is not None:
        st = torch.load(args.state, map_location="cpu", weights_only=False)
        flow = EGNNFlow(**st["model_config"])
        flow.load_state_dict(st["ema"])
        return flow.eval().requires_grad_(False), f"{args.state} (EMA, step {st['step']})"
    path = Path(args.checkpoint)
    if path.suffix == ".safetensors":
        return load_checkpoint(path), str(path)
    return load_pretrained(args.checkpoint), args.checkpoint


def summary(r: dict) -> dict:
    return {k: round(100 * r[k], 2) for k in KEYS}


def main(argv=None):
    args = parse_args(argv)
    if args.n < 1 or args.steps < 1:
        raise SystemExit("sample_qm9: --n and --steps must be positive")
    torch.set_num_threads(args.threads)
    flow, source = load_flow(args)
    g = torch.Generator().manual_seed(args.seed)
    dist = mol.atom_count_distribution(qm9("train_a").n_atoms)
    n_atoms = torch.multinomial(dist.float(), args.n, replacement=True, generator=g)
    t0 = time.time()
    pos, types, mask, _ = mol.sample(flow, n_atoms, steps=args.steps, solver=args.solver,
                                     generator=g, batch=args.batch)
    seconds = time.time() - t0
    r = mol.evaluate(pos, types, mask, method=args.validity)
    report = {"model": source, "n": args.n, "steps": args.steps, "solver": args.solver,
              "seed": args.seed, "validity_method": args.validity, "sample_seconds": seconds,
              "percent": summary(r), "edm_percent": EDM, "edm_data_percent": DATA_EDM,
              "command": command("scripts.sample_qm9", argv)}
    if args.data:
        test = qm9("test", limit=args.n)
        report["test_data_percent"] = summary(mol.evaluate(test.positions, test.one_hot,
                                                           test.mask, method=args.validity))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "report.json", report, "cpu", meta=environment("cpu"))
    with open(args.out / "samples.xyz", "w") as f:
        for i in range(args.n):
            f.write(mol.to_xyz(pos[i][mask[i]], types[i][mask[i]],
                               f"sample {i} stable={r['stable'][i]} smiles={r['smiles'][i]}"))
    rows = ["| | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS),
            f"| this model ({args.n} samples, {args.solver} {args.steps} steps) | "
            + " | ".join(f"{report['percent'][k]:.1f}" for k in KEYS) + " |",
            "| EDM (Hoogeboom et al. 2022, Table 1) | "
            + " | ".join(f"{EDM[k]:.1f}" for k in KEYS) + " |"]
    if args.data:
        rows.append(f"| QM9 test molecules ({args.n}) | "
                    + " | ".join(f"{report['test_data_percent'][k]:.1f}" for k in KEYS) + " |")
    (args.out / "report.md").write_text(
        f"# QM9 flow samples: {source}\n\nPercent; validity by the {args.validity} rule, "
        "uniqueness among valid molecules.\n\n" + "\n".join(rows) + "\n")
    print(json.dumps(report["percent"]), f"{seconds:.1f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
