"""The digits demo runs end to end (tiny settings) and D-Flow improves on the observation."""
from __future__ import annotations

import json

from dflow_fast.apps.cli import main


def test_demo_digits_end_to_end(tmp_path):
    out = tmp_path / "digits"
    assert main(["demo-digits", "--n", "4", "--train-steps", "300", "--max-iter", "5",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "inpainting.png").stat().st_size > 0
    psnr = report["psnr_db"]
    assert psnr["D-Flow (dflow_fast)"] > psnr["observation (hole = 0)"]
