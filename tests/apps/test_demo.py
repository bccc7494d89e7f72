"""The Fashion-MNIST demo runs end to end (2 images, 2 iterations) and writes its outputs."""
from __future__ import annotations

import json

import pytest

from dflow_fast.apps.cli import main


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "fashion"
    assert main(["demo", "--n", "2", "--max-iter", "2", "--steps", "2", "--tasks", "inpaint_box",
                 "sr2", "class", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["task"] for r in report["tasks"]] == ["inpaint_box", "sr2", "class"]
    for r in report["tasks"]:
        assert (out / f"{r['task']}.png").stat().st_size > 0
        assert r["dflow_fast"]["velocity_calls"] > 0 and r["reference"]["velocity_calls"] > 0
    box = report["tasks"][0]
    assert set(box["psnr"]) == {"observation", "blend only", "D-Flow (dflow_fast)", "reference"}
    assert "accuracy" in report["tasks"][2]
    # the paired per-image difference is the difference of the two means
    per = box["psnr_per_image"]
    assert len(per["D-Flow (dflow_fast)"]) == len(per["reference"]) == 2
    d = box["psnr_paired_diff"]
    assert abs(d["mean"] - (box["psnr"]["D-Flow (dflow_fast)"] - box["psnr"]["reference"])) < 1e-4
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    md = (out / "report.md").read_text()
    assert "| inpaint_box | PSNR |" in md and "95% interval" in md


def test_demo_float64_paths_agree(tmp_path):
    """In float64 the batched path and the per-image reference loop (given the same iterations)
    take the same iterates, so their PSNRs agree; the report says which stop each image hit."""
    from dflow_fast.apps import demo
    report = demo.run(n=2, tasks=["deblur"], steps=2, max_iter=3, out=tmp_path, dtype="float64",
                      progress=False)
    row = report["tasks"][0]
    assert report["dtype"] == "float64" and row["stop_loss"] > 0
    assert abs(row["psnr"]["D-Flow (dflow_fast)"] - row["psnr"]["reference"]) <= 1e-6
    assert len(row["dflow_fast"]["iterations"]) == 2


def test_demo_keeps_finished_tasks_when_a_later_one_fails(tmp_path, monkeypatch):
    """The report is written after every task: a run stopped later (a time limit, an error)
    keeps what it finished."""
    from dflow_fast.apps import demo
    real = demo.run_task

    def failing_second(task, *args, **kw):
        if task == "sr2":
            raise RuntimeError("stopped")
        return real(task, *args, **kw)
    monkeypatch.setattr(demo, "run_task", failing_second)
    with pytest.raises(RuntimeError, match="stopped"):
        demo.run(n=1, tasks=["inpaint_box", "sr2"], steps=2, max_iter=1, out=tmp_path,
                 progress=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["task"] for r in report["tasks"]] == ["inpaint_box"]
    assert "| inpaint_box | PSNR |" in (tmp_path / "report.md").read_text()


def test_demo_gradient_choice(tmp_path):
    """``--gradient backprop``: the batched path evaluates the network half as often as with the
    adjoint (no recomputation in the backward) and still matches the reference loop in float64;
    the report names the scheme. An unknown scheme fails before any work."""
    from dflow_fast.apps import demo
    kw = dict(n=2, tasks=["sr2"], steps=2, max_iter=3, dtype="float64", progress=False)
    adj = demo.run(out=tmp_path / "a", gradient="adjoint", **kw)["tasks"][0]
    rep = demo.run(out=tmp_path / "b", gradient="backprop", **kw)
    bp = rep["tasks"][0]
    assert rep["gradient"] == "backprop"
    assert "gradient backprop" in (tmp_path / "b" / "report.md").read_text()
    assert bp["dflow_fast"]["iterations"] == adj["dflow_fast"]["iterations"]
    assert 2 * bp["dflow_fast"]["velocity_calls"] == adj["dflow_fast"]["velocity_calls"]
    assert abs(bp["psnr"]["D-Flow (dflow_fast)"] - bp["psnr"]["reference"]) <= 1e-6
    with pytest.raises(ValueError, match="gradient must be one of"):
        demo.run(out=tmp_path / "c", gradient="reversible", **kw)
    assert not (tmp_path / "c").exists()


def test_cli_gradient_choices_are_the_demos():
    """The CLI spells the demo's gradient schemes out (its parser imports no torch): it accepts
    each of them and nothing else."""
    from dflow_fast.apps import cli, demo
    parser = cli.build_parser()
    for g in demo.GRADIENTS:
        assert parser.parse_args(["demo", "--gradient", g]).gradient == g
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--gradient", "reversible"])


def test_cli_demo_defaults_are_the_demos():
    """`dflow-fast demo` without options runs demo.run's defaults (the CLI writes them out)."""
    import inspect
    from dflow_fast.apps import cli, demo
    args = cli.build_parser().parse_args(["demo"])
    defaults = {k: p.default for k, p in inspect.signature(demo.run).parameters.items()}
    for name in ("n", "steps", "max_iter", "alpha", "sigma", "seed", "dtype", "gradient",
                 "model", "device"):
        assert getattr(args, name) == defaults[name], name


def test_cli_model_choices_are_the_demos():
    """The CLI spells the demo's bundled models out: each of them and nothing else."""
    from dflow_fast.apps import cli, demo
    parser = cli.build_parser()
    for m in demo.MODELS:
        assert parser.parse_args(["demo", "--model", m]).model == m
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--model", "fashion-mnist-classifier"])


def test_demo_with_the_bundled_ddpm(tmp_path):
    """``--model fashion-mnist-ddpm``: the demo runs through the diffusers adapter on the
    scheduler's time grid; the batched path and the per-image reference agree in float64 (same
    iterates), and the report names the model."""
    pytest.importorskip("diffusers", reason="needs the [diffusers] extra")
    from dflow_fast.apps import demo
    rep = demo.run(n=2, tasks=["deblur"], steps=2, max_iter=3, out=tmp_path, progress=False,
                   dtype="float64", gradient="backprop", model="fashion-mnist-ddpm")
    assert "DDPM" in rep["model"]
    row = rep["tasks"][0]
    assert abs(row["psnr"]["D-Flow (dflow_fast)"] - row["psnr"]["reference"]) <= 1e-6
    # D-Flow improves on the blend it starts from (the cost is the data fit)
    assert row["psnr"]["D-Flow (dflow_fast)"] > row["psnr"]["blend only"]
    with pytest.raises(ValueError, match="model must be one of"):
        demo.run(out=tmp_path / "c", model="fashion-mnist-classifier", n=1, tasks=["sr4"])
    assert not (tmp_path / "c").exists()
