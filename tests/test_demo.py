"""The Fashion-MNIST demo runs end to end (2 images, 2 iterations) and writes its outputs."""
from __future__ import annotations

import json

from dflow_fast.cli import main


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
    assert "| inpaint_box | PSNR |" in (out / "report.md").read_text()
