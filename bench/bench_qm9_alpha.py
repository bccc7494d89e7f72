"""The paper's QM9 experiment by EDM's protocol: D-Flow steers the polarizability alpha of generated
molecules to targets from QM9's test split; an independent regressor judges (docs/molecules.md).

Runs :func:`dflow_fast.apps.molecules.run` (what ``dflow-fast molecules`` runs) with the shipped
``qm9-flow``, ``qm9-alpha-guide`` and ``qm9-alpha-eval`` (or the checkpoints given) and records
the issue's fields: ``n``, ``mae`` (``dflow``, ``unconditional`` = EDM's U-bound, ``lower_bound``
= the evaluator's test MAE, plus ``n_atoms_only`` and ``guide``), ``validity``,
``atom_stability``, ``molecule_stability`` (D-Flow's molecules; the unconditional ones under
``unconditional``), seconds, velocity evaluations, the settings, EDM's published figures and the
goal (D-Flow's MAE at most 0.35 x the U-bound), with the usual meta (bench/lib/env.py).

    python -m bench.bench_qm9_alpha --n 500                 # the committed result
    python -m bench.bench_qm9_alpha --n 2 --max-iter 2 --flow F --guide G --eval E \\
        --json /tmp/q.json --out /tmp/q                     # a smoke run with other models

Writes ``bench/results/qm9_alpha.{json,md}``, ``qm9_alpha.png`` (RDKit drawings of a few valid
D-Flow molecules spread over the targets' range, each with its target and evaluated alpha: the
README's picture) and the molecules (xyz/, molecules.sdf, the full per-molecule report) under
``bench/results/qm9_alpha/``.

Resumes by default (``--resume``; ``--no-resume`` to refuse a folder holding chunks): the run takes
hours on a CPU, and ``--out`` keeps every finished batch (``chunks/``), so rerunning the same
command after a kill continues where it stopped. That is safe as a default because a folder is
only resumed when its fingerprint (every setting that changes a batch's numbers, the flow's and
guide's checkpoint hashes) matches; a folder of other settings is refused, naming them, and
never overwritten: choose another --out or delete the folder to start over.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.lib.env import RESULTS_DIR, command, environment, shown, write_json

MODULE = "bench.bench_qm9_alpha"
#: the issue's goal: D-Flow's MAE at most this fraction of the unconditional (U-bound) MAE
GOAL_RATIO = 0.35


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="molecules (targets: the test split's first)")
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--solver", choices=["euler", "midpoint"], default="midpoint")
    p.add_argument("--gradient", choices=["adjoint", "backprop", "auto"], default="auto")
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--flow", default=None, help="default: pretrained qm9-flow")
    p.add_argument("--guide", default=None, help="default: pretrained qm9-alpha-guide")
    p.add_argument("--eval", default=None, help="default: pretrained qm9-alpha-eval")
    p.add_argument("--lbound-n", type=int, default=None)
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "qm9_alpha.json")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "qm9_alpha",
                   help="folder of the molecules, the full report and the batches' chunks")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue the run --out holds when its settings match (default); "
                        "--no-resume refuses a folder holding chunks")
    return p.parse_args(argv)


def draw_molecules(sdf: Path, png: Path, k: int = 8, per_row: int = 4) -> int:
    """Draw ``k`` molecules of ``sdf`` (as :func:`dflow_fast.apps.molecules.write_molecules`
    writes it) spread evenly over their targets' range, hydrogens hidden, each captioned with its
    target and evaluated alpha; writes ``png`` (RDKit's Cairo drawer) and returns how many were
    drawn (0: no file written)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem
    from rdkit.Chem.Draw import rdMolDraw2D

    if k < 1 or not sdf.is_file() or sdf.stat().st_size == 0:  # RDKit refuses an empty file
        return 0
    mols = [m for m in Chem.SDMolSupplier(str(sdf), removeHs=False) if m is not None]
    if not mols:
        return 0
    mols.sort(key=lambda m: m.GetDoubleProp("target"))
    n = len(mols)
    picks = range(n) if k >= n else [round(i * (n - 1) / max(1, k - 1)) for i in range(k)]
    drawn, legends = [], []
    for i in picks:
        m = Chem.RemoveHs(mols[i])
        AllChem.Compute2DCoords(m)
        drawn.append(m)
        legends.append(f"{mols[i].GetProp('_Name')}: target {mols[i].GetDoubleProp('target'):.1f}"
                       f", got {mols[i].GetDoubleProp('eval_alpha'):.1f} Bohr^3")
    cols = min(per_row, len(drawn))
    rows = -(-len(drawn) // cols)
    d2d = rdMolDraw2D.MolDraw2DCairo(cols * 260, rows * 220, 260, 220)
    d2d.drawOptions().legendFontSize = 15
    d2d.DrawMolecules(drawn, legends=legends)
    d2d.FinishDrawing()
    png.write_bytes(d2d.GetDrawingText())
    return len(drawn)


def checkpoints(models: dict) -> dict:
    """{role: path} -> {role: {"file": path relative to the repository, "sha256"}}."""
    from dflow_fast.jobs.chunks import sha256_file

    return {k: {"file": shown(v), "sha256": sha256_file(Path(v))} for k, v in models.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from dflow_fast.apps.molecules import run, to_markdown

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    r = run(out=args.out, target="alpha", n=args.n, max_iter=args.max_iter, steps=args.steps,
            solver=args.solver, gradient=args.gradient, prior_weight=args.prior_weight,
            seed=args.seed, batch=args.batch, device=args.device, flow=args.flow,
            guide=args.guide, evaluator=args.eval, lbound_n=args.lbound_n,
            resume=args.resume, log=lambda s: print(s, flush=True))
    mae = r["mae"]
    ratio = mae["dflow"] / mae["unconditional"] if mae["unconditional"] > 0 else float("nan")
    payload = {
        "n": r["n"], "mae": mae, "validity": r["validity"],
        "atom_stability": r["atom_stability"], "molecule_stability": r["molecule_stability"],
        "uniqueness": r["uniqueness"], "unconditional": r["unconditional"],
        "lower_bound": r["lower_bound"],
        "goal": {"ratio": ratio, "at_most": GOAL_RATIO, "met": bool(ratio <= GOAL_RATIO)},
        "seconds": r["seconds"], "velocity_evaluations": r["velocity_evaluations"],
        "status_counts": r["status_counts"], "chunks": r["chunks"], "settings": r["settings"],
        "models": checkpoints(r["models"]),
        "edm_published": r["edm_published"], "molecules_dir": shown(args.out),
        "command": command(MODULE, argv),
    }
    path = write_json(args.json, payload, args.device, meta=environment(args.device))
    path.with_suffix(".md").write_text(to_markdown(r))
    print(to_markdown(r))
    png = path.with_suffix(".png")
    n_drawn = draw_molecules(args.out / "molecules.sdf", png)
    print(f"wrote {shown(path)}, {shown(path.with_suffix('.md'))}"
          f"{f', {shown(png)} ({n_drawn} drawn)' if n_drawn else ''} and {shown(args.out)}/")
    return payload


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ImportError, ValueError) as e:  # refused before any work
        print(f"python -m {MODULE}: error: {e}", file=sys.stderr)
        sys.exit(2)
