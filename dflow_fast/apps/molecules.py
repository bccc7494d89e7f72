"""``dflow-fast molecules``: D-Flow steers QM9 molecules to target polarizabilities, judged by the
protocol of EDM (Hoogeboom et al., "Equivariant Diffusion for Molecule Generation in 3D", ICML
2022, section 5.3 and Table 3); docs/molecules.md.

The targets are the first ``n`` molecules of QM9's test split (a fixed random order): each
generated molecule gets the atom count and the alpha of one test molecule, so sizes and targets
follow their joint distribution, as EDM's conditional sampling draws the property given the atom
count. Every molecule starts from seeded zero-CoM noise; D-Flow (:func:`dflow_fast.optimize`,
L-BFGS through the flow's ODE solve) minimizes ``(guide(x1) - target)^2`` plus the χ_d prior on the
zero-CoM subspace (:mod:`dflow_fast.tasks.molecules`); the same noise solved without optimization
gives the unconditional molecules. The EVALUATION regressor (trained on the other half of train)
scores the decoded molecules (atom types by argmax, one-hot):

- ``mae.dflow``: mean |eval(D-Flow molecule) - its target|;
- ``mae.unconditional`` (EDM's "U-bound"): unconditional molecules against the targets shuffled;
- ``mae.n_atoms_only``: unconditional molecules against their own targets (they share only the
  atom count: EDM's "#Atoms" baseline in spirit);
- ``mae.lower_bound`` (EDM's "L-bound"): the evaluation regressor's own MAE on real test
  molecules (recorded in its checkpoint when it covers the whole test split, else computed);
- ``mae.guide``: the guide regressor's MAE on the decoded D-Flow molecules (the optimizer saw
  it on the continuous states: the gap to ``mae.dflow`` is what steering the guide did not
  transfer to an independent judge).

Plus EDM's validity, atom and molecule stability and uniqueness for both sets
(:mod:`dflow_fast.molecules`), seconds and velocity evaluations. Writes ``xyz/NNNN.xyz`` per
D-Flow molecule (the comment line holds its target and evaluated alpha), ``molecules.sdf`` (the
valid ones, via RDKit, with their alphas as properties), report.json and report.md. Each batch is
written to ``chunks/`` as it finishes; ``--resume`` continues a killed run
(:mod:`.molecules_chunks`).
"""
from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import models as pretrained
from .. import molecules as mol
from ..data.qm9 import QM9_SPLIT_SIZES, qm9, qm9_data_dir
from ..models import EGNNFlow, EGNNRegressor, load_checkpoint
from ..models.egnn import zero_com_noise
from ..tasks.molecules import MOLECULE_TASKS, masks_for
from . import molecules_chunks as MC
from .provenance import provenance

#: EDM's published alpha MAEs (Bohr^3; Hoogeboom et al. 2022, Table 3)
EDM_ALPHA = {"u_bound": 9.01, "n_atoms": 3.56, "edm": 2.76, "l_bound": 0.10}
#: which pretrained model each role loads when no file is given
PRETRAINED_ROLES = {"flow": "qm9-flow", "guide": "qm9-alpha-guide", "eval": "qm9-alpha-eval"}
#: the choices of --solver (reversible solvers are other discretizations: not offered here),
#: --gradient and --validity (the CLI writes them out; tests/molecules/test_app.py compares)
SOLVERS, GRADIENTS, VALIDITY = ("euler", "midpoint"), ("adjoint", "backprop", "auto"), \
    ("edm", "rdkit")
_EVAL_BATCH = 256


@dataclass
class Settings:
    """The command's options (``dflow-fast molecules --help``; :func:`run`)."""

    out: str | Path
    target: str = "alpha"
    n: int = 100
    max_iter: int = 20
    steps: int = 10
    seed: int = 0
    batch: int = 32
    device: str = "cpu"
    solver: str = "midpoint"
    gradient: str = "auto"
    prior_weight: float = 1.0
    flow: Optional[str | Path] = None
    guide: Optional[str | Path] = None
    evaluator: Optional[str | Path] = None
    lbound_n: Optional[int] = None
    validity: str = "edm"
    resume: bool = False

    def checked(self) -> "Settings":
        """Bad options raise ValueError naming them, before anything is loaded or solved."""
        if self.target not in MOLECULE_TASKS:
            raise ValueError(f"--target: unknown target {self.target!r}; choose one of "
                             f"{list(MOLECULE_TASKS)}")
        n_test = QM9_SPLIT_SIZES["test"]
        for name, v, hi in (("n", self.n, n_test), ("max-iter", self.max_iter, None),
                            ("steps", self.steps, None), ("batch", self.batch, None),
                            ("lbound-n", self.lbound_n, n_test)):
            if v is None and name == "lbound-n":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi and v > hi):
                raise ValueError(f"--{name} must be an int in 1..{hi or 'inf'}, got {v!r}")
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be True or False, got {self.resume!r}")
        if not (isinstance(self.prior_weight, (int, float)) and self.prior_weight >= 0):
            raise ValueError(f"--prior-weight must be a number >= 0, got {self.prior_weight!r}")
        for name, v, ok in (("solver", self.solver, SOLVERS),
                            ("gradient", self.gradient, GRADIENTS),
                            ("validity", self.validity, VALIDITY)):
            if v not in ok:
                raise ValueError(f"--{name} must be one of {list(ok)}, got {v!r}")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} exists and is not a folder")
        return self

    def command(self) -> str:
        """The command line that reruns these settings, every option spelled out."""
        flags = {"target": self.target, "n": self.n, "out": self.out, "max-iter": self.max_iter,
                 "steps": self.steps, "solver": self.solver, "gradient": self.gradient,
                 "prior-weight": self.prior_weight, "seed": self.seed, "batch": self.batch,
                 "device": self.device, "flow": self.flow, "guide": self.guide,
                 "eval": self.evaluator, "lbound-n": self.lbound_n, "validity": self.validity}
        args = [f"--{k} {shlex.quote(str(v))}" for k, v in flags.items() if v is not None]
        return "dflow-fast molecules " + " ".join(args + ["--resume"] * self.resume)


def prepare(s: Settings) -> dict:
    """Check the options, RDKit and QM9, load the three models, check ``out`` against the run's
    fingerprint (:func:`~.molecules_chunks.check_out`): ``{"device", "models", "job"}``.
    Everything that can refuse the command refuses here, before anything is written."""
    s.checked()
    _require_rdkit()
    qm9_data_dir()  # qm9pack missing: ImportError with how to install it
    dev = torch.device(s.device)
    models = load_models(s.flow, s.guide, s.evaluator, dev)
    job = MC.job_record(s, models, dev)
    MC.check_out(Path(s.out), s.resume, job)
    return {"device": dev, "models": models, "job": job}


def load_models(flow=None, guide=None, evaluator=None, device="cpu") -> dict:
    """``{"flow", "guide", "eval"}`` -> (module, source): a checkpoint file for each given path,
    the pretrained model (``PRETRAINED_ROLES``) otherwise. A missing file raises
    FileNotFoundError naming it (and, for the pretrained ones, scripts/train_qm9.py)."""
    out = {}
    for role, path, kind in (("flow", flow, EGNNFlow), ("guide", guide, EGNNRegressor),
                             ("eval", evaluator, EGNNRegressor)):
        if path is None:
            name = PRETRAINED_ROLES[role]
            model = pretrained.load_pretrained(name, device=device)
            source = pretrained.WEIGHTS_DIR / pretrained.PRETRAINED[name]
        else:
            source = Path(path)
            if not source.is_file():
                raise FileNotFoundError(f"--{role}: checkpoint not found: {source}")
            model = load_checkpoint(source, device=device)
        if not isinstance(model, kind):
            raise ValueError(f"--{role}: {source} holds a {type(model).__name__}, expected a "
                             f"{kind.__name__}")
        out[role] = (model, Path(source))
    K = {role: m.n_types for role, (m, _) in out.items()}
    if len(set(K.values())) != 1:
        raise ValueError(f"the models disagree on the number of atom types: {K}")
    return out


def _require_rdkit():
    if importlib.util.find_spec("rdkit") is None:
        raise ImportError("dflow-fast molecules needs RDKit (validity, .sdf): pip install "
                          "'dflow_fast[molecules]'")


def _recorded_test_mae(path: Path) -> Optional[dict]:
    """The test MAE scripts/train_qm9.py --export recorded in a regressor's checkpoint."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        training = json.loads((f.metadata() or {}).get("training", "{}"))
    if "test_mae" not in training:
        return None
    return {"value": float(training["test_mae"]), "molecules": training.get("test_molecules")}


@torch.no_grad()
def predict(regressor, positions, types, mask, device) -> torch.Tensor:
    """float64 [N] property of decoded molecules (types int [N, M]) in batches (CPU result)."""
    out = []
    K = regressor.n_types
    for i in range(0, len(positions), _EVAL_BATCH):
        m = mask[i:i + _EVAL_BATCH]
        M = int(m.sum(1).max())  # real atoms come first: cut the padding
        one_hot = torch.nn.functional.one_hot(types[i:i + _EVAL_BATCH, :M], K).float()
        one_hot = one_hot * m[:, :M, None]
        out.append(regressor(positions[i:i + _EVAL_BATCH, :M].float().to(device),
                             one_hot.to(device), m[:, :M].to(device)).double().cpu())
    return torch.cat(out)


def lower_bound(evaluator, source: Path, target: str, lbound_n: Optional[int], device) -> dict:
    """EDM's L-bound: the evaluation regressor's MAE on real test molecules."""
    recorded = _recorded_test_mae(source) if lbound_n is None else None
    if recorded and recorded["molecules"] == QM9_SPLIT_SIZES["test"]:
        return {**recorded, "source": f"recorded in {source.name} (scripts/train_qm9.py)"}
    test = qm9("test", limit=lbound_n)
    types = test.one_hot.argmax(-1) * test.mask
    pred = predict(evaluator, test.positions, types, test.mask, device)
    mae = (pred - test.properties[target].double()).abs().mean().item()
    return {"value": mae, "molecules": len(test), "source": "computed on the test split"}


def run(*, out, log: Optional[Callable[[str], None]] = None, **options) -> dict:
    """Generate molecules with D-Flow and unconditionally, score them (module docstring), write
    the files into ``out``; returns the report (also ``out/report.json``).

    Options (:class:`Settings`): ``target``, ``n`` (test molecules whose targets are used),
    ``flow`` / ``guide`` / ``evaluator`` (checkpoint files; default the pretrained ``qm9-flow``,
    ``qm9-alpha-guide``, ``qm9-alpha-eval``), ``steps``, ``solver`` (the ODE solve of both D-Flow
    and the unconditional molecules), ``max_iter``, ``gradient`` (D-Flow's L-BFGS),
    ``prior_weight`` (the χ_d prior's), ``batch`` (molecules per optimize call, in order of size
    so a batch pads to its largest), ``seed``, ``device``, ``lbound_n`` (test molecules for the
    L-bound; None: the checkpoint's recorded figure over the whole test split, else all of it),
    ``validity`` (``"edm"`` or ``"rdkit"``, as :func:`dflow_fast.molecules.validity`),
    ``resume`` (continue the run whose chunks ``out`` holds: its verified batches are loaded,
    the rest computed; without it a folder holding chunks is refused; docs/molecules.md).
    """
    s = Settings(out=out, **options)
    return generate(s, prepare(s), log)


def generate(s: Settings, setup: dict, log: Optional[Callable[[str], None]] = None) -> dict:
    """:func:`run` after :func:`prepare`."""
    out, target, n, batch, steps, solver = Path(s.out), s.target, s.n, s.batch, s.steps, s.solver
    dev, models = setup["device"], setup["models"]
    log = log or (lambda msg: None)
    start = time.perf_counter()

    test = qm9("test", limit=n)
    y, sizes = test.properties[target].double(), test.n_atoms
    K = models["flow"][0].n_types
    mask = masks_for(sizes)
    g = torch.Generator().manual_seed(s.seed)
    x0_all = zero_com_noise(mask, K, generator=g)  # drawn once: independent of --batch
    shuffle = torch.randperm(n, generator=g)
    x1_dflow, x1_unc = torch.zeros_like(x0_all), torch.zeros_like(x0_all)
    per = {k: [None] * n for k in ("status", "nit", "nfe", "guide_alpha", "guide_alpha_start")}
    secs = {"dflow": 0.0, "unconditional": 0.0}
    evals = {"dflow": 0, "unconditional": 0}
    order = torch.sort(sizes, stable=True).indices
    job, n_batches = setup["job"], -(-n // batch)
    fp, names = job["fingerprint"], MC.status_names()
    # a kill loses at most the batch being solved: each is written as a chunk once it is done
    kept = MC.set_up(out, job, s.resume, dev, log)
    for b, i in enumerate(range(0, n, batch)):
        if b in kept:  # verified in set_up: the same molecules, noise and settings
            tensors, entry = MC.load_batch(out, b, fp)
        else:
            tensors, entry = MC.solve_batch(s, models, order[i:i + batch], y, mask, x0_all, dev)
            MC.save_batch(out, b, fp, tensors, entry, dev)
        rows, M = tensors["index"], entry["atoms"]
        x1_unc[rows, :M], x1_dflow[rows, :M] = tensors["x1_unconditional"], tensors["x1"]
        for key in secs:  # summed over the chunks, whether computed now or loaded
            secs[key] += entry["seconds"][key]
            evals[key] += entry["velocity_evaluations"][key]
        for k, r in enumerate(rows.tolist()):
            per["status"][r] = names[int(tensors["status"][k])]
            for key in ("nit", "nfe"):
                per[key][r] = int(tensors[key][k])
            for key in ("guide_alpha", "guide_alpha_start"):
                per[key][r] = float(tensors[key][k])
        log(f"batch {b + 1}/{n_batches}: {len(rows)} molecules of <= {M} atoms, "
            + ("loaded from its chunk" if b in kept else
               f"D-Flow {entry['seconds']['dflow']:.1f} s, {entry['message']}"))

    t_eval = time.perf_counter()
    report = evaluate(x1_dflow, x1_unc, mask, y, shuffle, models, target, dev, s.validity,
                      s.lbound_n)
    secs["evaluation"] = time.perf_counter() - t_eval
    secs["total"] = time.perf_counter() - start
    report.update(
        command=s.command(), target=target, n=n, seconds=secs,
        velocity_evaluations={"dflow": evals["dflow"], "dflow_per_molecule": evals["dflow"] / n,
                              "unconditional": evals["unconditional"],
                              "unconditional_per_molecule": evals["unconditional"] / n},
        settings={"steps": steps, "solver": solver, "gradient": s.gradient,
                  "max_iter": s.max_iter, "optimizer": "lbfgs", "prior_weight": s.prior_weight,
                  "batch": batch, "seed": s.seed, "validity_method": s.validity,
                  "lbound_n": s.lbound_n,
                  "targets": f"QM9 test split, first {n} molecules (atom count and {target} "
                             "of each)"},
        models={k: str(v[1]) for k, v in models.items()},
        edm_published=EDM_ALPHA, provenance=provenance(dev))
    statuses = per["status"]
    report["status_counts"] = {st: statuses.count(st) for st in sorted(set(statuses))}
    report["chunks"] = {"batches": n_batches, "resumed": len(kept),
                        "computed": n_batches - len(kept), "fingerprint": fp,
                        "folder": "chunks/ (docs/molecules.md, Long runs)"}
    for k in per:
        for r, rec in enumerate(report["molecules"]):
            rec[k] = per[k][r]
    write_outputs(out, report, x1_dflow, mask, s.validity)
    return report


def evaluate(x1_dflow, x1_unc, mask, y, shuffle, models, target, dev, validity, lbound_n):
    """The report's numbers from the generated states (module docstring)."""
    (guide_m, _), (eval_m, eval_src) = models["guide"], models["eval"]
    K = eval_m.n_types
    pos_d, typ_d = mol.decode(x1_dflow, mask, K)
    pos_u, typ_u = mol.decode(x1_unc, mask, K)
    a_dflow = predict(eval_m, pos_d, typ_d, mask, dev)
    a_unc = predict(eval_m, pos_u, typ_u, mask, dev)
    a_guide = predict(guide_m, pos_d, typ_d, mask, dev)
    q_d = mol.evaluate(pos_d, typ_d, mask, validity)
    q_u = mol.evaluate(pos_u, typ_u, mask, validity)
    keys = ("validity", "atom_stability", "molecule_stability", "uniqueness")
    lb = lower_bound(eval_m, eval_src, target, lbound_n, dev)
    molecules = [{"target": float(y[i]), "eval_alpha": float(a_dflow[i]),
                  "eval_alpha_unconditional": float(a_unc[i]), "n_atoms": int(mask[i].sum()),
                  "valid": q_d["valid"][i], "stable": q_d["stable"][i],
                  "smiles": q_d["smiles"][i]} for i in range(len(y))]
    return {
        "mae": {"dflow": (a_dflow - y).abs().mean().item(),
                "unconditional": (a_unc - y[shuffle]).abs().mean().item(),
                "n_atoms_only": (a_unc - y).abs().mean().item(),
                "lower_bound": lb["value"], "guide": (a_guide - y).abs().mean().item()},
        "lower_bound": lb, **{k: q_d[k] for k in keys},
        "unconditional": {k: q_u[k] for k in keys}, "molecules": molecules,
    }


def write_outputs(out: Path, report: dict, x1: torch.Tensor, mask: torch.Tensor,
                  validity: str) -> None:
    """The molecules (:func:`write_molecules`), report.json and report.md into ``out``."""
    write_molecules(out, report["molecules"], x1, mask, validity)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(to_markdown(report))


def write_molecules(out: Path, records: list, x1: torch.Tensor, mask: torch.Tensor,
                    validity: str = "edm") -> int:
    """``out/xyz/NNNN.xyz`` for every state ``x1 [N, M, 3 + K]`` (mask ``[N, M]``) and
    ``out/molecules.sdf`` with the ones whose record says ``valid``, named ``dflow_NNNN`` with
    their ``target``, ``eval_alpha`` and ``guide_alpha`` as properties. Returns how many went
    into the .sdf."""
    from rdkit import Chem

    (out / "xyz").mkdir(parents=True, exist_ok=True)
    pos, typ = mol.decode(x1, mask)
    writer, written = Chem.SDWriter(str(out / "molecules.sdf")), 0
    try:
        for i, rec in enumerate(records):
            m = mask[i]
            note = (f"molecule {i}: target alpha {rec['target']:.3f}, eval alpha "
                    f"{rec['eval_alpha']:.3f} Bohr^3, valid {rec['valid']}")
            (out / "xyz" / f"{i:04d}.xyz").write_text(mol.to_xyz(pos[i][m], typ[i][m], note))
            rd = mol.to_rdkit(pos[i][m], typ[i][m], validity) if rec["valid"] else None
            if rd is not None:
                rd.SetProp("_Name", f"dflow_{i:04d}")
                for key in ("target", "eval_alpha", "guide_alpha"):
                    rd.SetDoubleProp(key, float(rec[key]))
                writer.write(rd)
                written += 1
    finally:
        writer.close()
    return written


def _pct(v) -> str:
    return f"{100 * v:.1f}"


def to_markdown(r: dict) -> str:
    """The report as Markdown: the MAE table next to EDM's figures, sample quality, cost."""
    m, u, e, lb = r["mae"], r["unconditional"], r["edm_published"], r["lower_bound"]
    s, v = r["settings"], r["velocity_evaluations"]
    lines = [
        f"# D-Flow on QM9: {r['target']} targets, {r['n']} molecules", "",
        f"{s['targets']}; {s['steps']} {s['solver']} steps, L-BFGS max_iter {s['max_iter']}, "
        f"χ_d prior weight {s['prior_weight']}, seed {s['seed']}. MAE in Bohr^3 by the "
        "evaluation regressor (trained on the half of train the flow and the guide never saw).",
        "", "| | MAE | EDM (published) | validity % | atom stab. % | mol. stab. % |",
        "|---|---|---|---|---|---|",
        f"| D-Flow | {m['dflow']:.3f} | conditional EDM {e['edm']} | {_pct(r['validity'])} | "
        f"{_pct(r['atom_stability'])} | {_pct(r['molecule_stability'])} |",
        f"| unconditional, targets shuffled (U-bound) | {m['unconditional']:.3f} | "
        f"{e['u_bound']} | {_pct(u['validity'])} | {_pct(u['atom_stability'])} | "
        f"{_pct(u['molecule_stability'])} |",
        f"| unconditional, same atom count (#atoms) | {m['n_atoms_only']:.3f} | "
        f"{e['n_atoms']} | | | |",
        f"| evaluation regressor on {lb['molecules']} test molecules (L-bound) | "
        f"{m['lower_bound']:.3f} | {e['l_bound']} | | | |", "",
        f"D-Flow / U-bound: {m['dflow'] / max(m['unconditional'], 1e-12):.3f} (the issue's goal: "
        f"<= 0.35). The guide regressor's MAE on the D-Flow molecules: {m['guide']:.3f}. "
        f"Uniqueness: D-Flow {_pct(r['uniqueness'])} %, unconditional {_pct(u['uniqueness'])} %.",
        "", f"Seconds: D-Flow {r['seconds']['dflow']:.1f}, unconditional "
        f"{r['seconds']['unconditional']:.1f}, this invocation {r['seconds']['total']:.1f}. "
        "Velocity "
        f"evaluations per molecule: D-Flow {v['dflow_per_molecule']:.0f}, unconditional "
        f"{v['unconditional_per_molecule']:.0f}. Status: {r['status_counts']}. Batches: "
        f"{r['chunks']['batches']}, {r['chunks']['resumed']} of them loaded from the chunks of "
        "a killed run (seconds and evaluations: summed over all batches).", "",
        "EDM: Hoogeboom et al., Equivariant Diffusion for Molecule Generation in 3D, ICML 2022, "
        "Table 3.", ""]
    return "\n".join(lines)


def main(args) -> int:
    """The CLI's entry: argparse namespace -> exit status (2: bad options or missing files or
    packages, reported in one line before any work)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    s = Settings(out=args.out, target=args.target, n=args.n, max_iter=args.max_iter,
                 steps=args.steps, seed=args.seed, batch=args.batch, device=args.device,
                 solver=args.solver, gradient=args.gradient, prior_weight=args.prior_weight,
                 flow=args.flow, guide=args.guide, evaluator=getattr(args, "eval"),
                 lbound_n=args.lbound_n, validity=args.validity,
                 resume=getattr(args, "resume", False))
    try:
        setup = prepare(s)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"dflow-fast molecules: error: {e}", file=sys.stderr)
        return 2
    report = generate(s, setup, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(to_markdown(report))
    print(f"wrote {args.out}/xyz/*.xyz, molecules.sdf, report.json and report.md")
    return 0
