"""``dflow-fast molecules`` and ``python -m bench.bench_qm9_alpha`` on a small slice: 2 QM9 test
targets, 2 L-BFGS iterations, tiny random EGNNs saved to tmp_path and passed as --flow / --guide /
--eval (the trained files need not exist); refusals before any work; the .sdf / .xyz writer on
real molecules. Needs qm9pack and RDKit (skips without them unless DFLOW_FAST_REQUIRE_DATA=1)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dflow_fast import models as pretrained
from dflow_fast.apps import molecules as app
from dflow_fast.apps.cli import build_parser, main
from dflow_fast.models import EGNNFlow, EGNNRegressor, save_checkpoint
from dflow_fast.tasks import MOLECULE_TASKS

from .helpers import qm9_or_skip, rdkit_or_skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three tiny random checkpoints: {"flow", "guide", "eval"} -> path."""
    d = tmp_path_factory.mktemp("tiny_qm9_models")
    torch.manual_seed(0)
    models = {"flow": EGNNFlow(hidden=8, n_layers=2, n_freqs=1),
              "guide": EGNNRegressor(hidden=8, n_layers=1, mean=75.0, std=8.0),
              "eval": EGNNRegressor(hidden=8, n_layers=1, mean=75.0, std=8.0)}
    for layer in models["flow"].net.layers:  # coordinate heads that move the atoms
        torch.nn.init.normal_(layer.coord.weight, std=0.3)
    paths = {}
    for role, model in models.items():
        paths[role] = d / f"{role}.safetensors"
        save_checkpoint(model, paths[role])
    return paths


def _needs_data():
    rdkit_or_skip()
    return qm9_or_skip("test", limit=2)


def _argv(tiny, out, *extra):
    return ["molecules", "--target", "alpha", "--n", "2", "--max-iter", "2", "--steps", "2",
            "--out", str(out), "--flow", str(tiny["flow"]), "--guide", str(tiny["guide"]),
            "--eval", str(tiny["eval"]), "--lbound-n", "3", "--threads", "1", *extra]


def test_parser_matches_the_package():
    args = build_parser().parse_args(["molecules", "--target", "alpha", "--n", "3", "--out", "o"])
    sub = build_parser()._subparsers._group_actions[0].choices["molecules"]
    choices = {a.dest: a.choices for a in sub._actions}
    assert tuple(choices["target"]) == MOLECULE_TASKS
    assert tuple(choices["solver"]) == app.SOLVERS
    assert tuple(choices["gradient"]) == app.GRADIENTS
    assert tuple(choices["validity"]) == app.VALIDITY
    defaults = {f.name: f.default for f in dataclasses.fields(app.Settings)}
    for name in ("max_iter", "steps", "seed", "batch", "device", "solver", "gradient",
                 "prior_weight", "flow", "guide", "lbound_n", "validity"):
        assert getattr(args, name) == defaults[name], name
    assert args.eval is None and defaults["evaluator"] is None


def test_command_on_two_molecules_with_two_iterations(tiny, tmp_path, capsys):
    test = _needs_data()
    out = tmp_path / "run"
    assert main(_argv(tiny, out, "--prior-weight", "0")) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["n"] == 2 and len(r["molecules"]) == 2
    assert set(r["mae"]) >= {"dflow", "unconditional", "lower_bound", "n_atoms_only", "guide"}
    assert all(math.isfinite(v) and v >= 0 for v in r["mae"].values())
    assert r["lower_bound"]["molecules"] == 3
    for k in ("validity", "atom_stability", "molecule_stability", "uniqueness"):
        assert 0 <= r[k] <= 1 and 0 <= r["unconditional"][k] <= 1
    assert r["velocity_evaluations"]["dflow"] > r["velocity_evaluations"]["unconditional"] > 0
    assert r["seconds"]["dflow"] > 0 and r["provenance"]["torch"] == torch.__version__
    assert "--n 2" in r["command"] and "--prior-weight 0.0" in r["command"]
    moved = []
    for i, rec in enumerate(r["molecules"]):
        # each molecule has its test molecule's target and atom count
        assert rec["target"] == pytest.approx(test.properties["alpha"][i].item())
        assert rec["n_atoms"] == int(test.n_atoms[i])
        # without the prior, L-BFGS only accepts steps that lower the guide's squared error
        assert abs(rec["guide_alpha"] - rec["target"]) <= abs(rec["guide_alpha_start"]
                                                              - rec["target"]) + 1e-4
        assert rec["nfe"] > 0 and rec["status"] in ("max_iter", "max_eval", "converged")
        moved.append(abs(rec["guide_alpha_start"] - rec["target"])
                     - abs(rec["guide_alpha"] - rec["target"]))
        lines = (out / "xyz" / f"{i:04d}.xyz").read_text().splitlines()
        assert int(lines[0]) == rec["n_atoms"] and len(lines) == 2 + rec["n_atoms"]
        assert f"target alpha {rec['target']:.3f}" in lines[1]
    assert max(moved) > 1e-3  # D-Flow did steer towards the targets
    assert (out / "molecules.sdf").is_file()
    md = (out / "report.md").read_text()
    assert "U-bound" in md and "L-bound" in md and "9.01" in md
    assert "| D-Flow |" in capsys.readouterr().out


def test_bench_script_writes_the_issue_fields(tiny, tmp_path):
    _needs_data()
    from bench.bench_qm9_alpha import main as bench_main

    path = tmp_path / "qm9_alpha.json"
    bench_main(["--n", "2", "--max-iter", "2", "--steps", "2", "--flow", str(tiny["flow"]),
                "--guide", str(tiny["guide"]), "--eval", str(tiny["eval"]), "--lbound-n", "3",
                "--json", str(path), "--out", str(tmp_path / "mols")])
    doc = json.loads(path.read_text())
    assert doc["n"] == 2 and set(doc["mae"]) >= {"dflow", "unconditional", "lower_bound"}
    for k in ("validity", "atom_stability", "molecule_stability"):
        assert 0 <= doc[k] <= 1
    ratio = doc["mae"]["dflow"] / doc["mae"]["unconditional"]
    assert doc["goal"]["ratio"] == pytest.approx(ratio) and doc["goal"]["at_most"] == 0.35
    meta = doc["meta"]
    assert meta["device"] == "cpu" and "commit" in meta and meta["torch"] == torch.__version__
    assert doc["command"].startswith("python -m bench.bench_qm9_alpha --n 2")
    assert doc["models"]["flow"]["file"].endswith(tiny["flow"].name)
    assert len(doc["models"]["eval"]["sha256"]) == 64
    assert path.with_suffix(".md").is_file() and (tmp_path / "mols" / "report.json").is_file()


def test_refusals_name_the_problem_before_any_work(tiny, tmp_path, monkeypatch, capsys):
    _needs_data()
    out = tmp_path / "never"
    # the pretrained files missing (as the regressors are until trained): the loader's message
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "no_weights")
    assert main(["molecules", "--target", "alpha", "--n", "2", "--out", str(out)]) == 2
    assert "scripts/train_qm9.py" in capsys.readouterr().err
    bad = _argv(tiny, out)
    bad[bad.index("--guide") + 1] = str(tmp_path / "missing.safetensors")
    assert main(bad) == 2 and "--guide: checkpoint not found" in capsys.readouterr().err
    swapped = _argv(tiny, out)
    swapped[swapped.index("--flow") + 1] = str(tiny["eval"])
    assert main(swapped) == 2 and "holds a EGNNRegressor" in capsys.readouterr().err
    assert main(_argv(tiny, out, "--batch", "0")) == 2
    assert "--batch must be" in capsys.readouterr().err
    assert not out.exists()


def test_writer_puts_the_valid_molecules_in_the_sdf(tmp_path):
    rdkit_or_skip()
    test = qm9_or_skip("test", limit=4)
    from rdkit import Chem

    from dflow_fast import molecules as mol

    x1 = torch.cat([test.positions, 0.25 * test.one_hot], -1)
    q = mol.evaluate(test.positions, test.one_hot, test.mask)
    assert sum(q["valid"]) >= 2  # real molecules: most are valid
    recs = [{"target": float(a), "eval_alpha": float(a) + 1, "guide_alpha": float(a) - 1,
             "valid": v} for a, v in zip(test.properties["alpha"], q["valid"])]
    recs[0]["valid"] = False  # an invalid one stays out of the .sdf
    out = tmp_path / "o"
    want = [i for i, rec in enumerate(recs) if rec["valid"]]
    assert app.write_molecules(out, recs, x1, test.mask) == len(want) >= 1
    sdf = list(Chem.SDMolSupplier(str(out / "molecules.sdf"), removeHs=False))
    assert [m.GetProp("_Name") for m in sdf] == [f"dflow_{i:04d}" for i in want]
    for m, i in zip(sdf, want):
        assert m.GetDoubleProp("target") == pytest.approx(recs[i]["target"])
        assert m.GetNumAtoms() <= int(test.n_atoms[i])
    assert len(list((out / "xyz").glob("*.xyz"))) == 4


def test_picture_draws_molecules_spread_over_the_targets(tmp_path):
    rdkit_or_skip()
    test = qm9_or_skip("test", limit=8)
    from bench.bench_qm9_alpha import draw_molecules
    from dflow_fast import molecules as mol

    x1 = torch.cat([test.positions, 0.25 * test.one_hot], -1)
    q = mol.evaluate(test.positions, test.one_hot, test.mask)
    recs = [{"target": float(a), "eval_alpha": float(a) + 1, "guide_alpha": float(a),
             "valid": v} for a, v in zip(test.properties["alpha"], q["valid"])]
    n_valid = app.write_molecules(tmp_path, recs, x1, test.mask)
    assert n_valid >= 4
    png = tmp_path / "grid.png"
    assert draw_molecules(tmp_path / "molecules.sdf", png, k=3) == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # asking for more than there are draws each once; an empty .sdf draws nothing, writes nothing
    assert draw_molecules(tmp_path / "molecules.sdf", png, k=50) == n_valid
    empty = tmp_path / "empty"
    app.write_molecules(empty, [dict(r, valid=False) for r in recs], x1, test.mask)
    assert draw_molecules(empty / "molecules.sdf", tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()
