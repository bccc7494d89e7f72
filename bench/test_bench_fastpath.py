"""Smoke test of bench/bench_fastpath.py: the ``--smoke`` run (tiny sizes, CPU, eager only) writes
the fields issue 16 asks for, with the graphed rows marked unavailable; timing is recorded, never
asserted (docs/design.md section 6)."""
from __future__ import annotations

import json

import pytest
import torch

from bench import bench_fastpath
from bench.lib.dit import DIT_CONFIGS, DiTVelocity, build_dit


def test_smoke_run_writes_every_field(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fastpath_cpu.json"
    assert bench_fastpath.main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"device", "device_name", "torch", "torch_cuda", "commit"} <= set(doc["meta"])
    assert doc["command"].startswith("python -m bench.bench_fastpath --smoke")
    assert [r["task"] for r in doc["e2e"]] == ["inpaint_box", "sr2", "deblur"]
    for r in doc["e2e"]:
        for key in ("n", "reference_problems_per_hour", "eager_problems_per_hour",
                    "reference_psnr_mean", "eager_psnr_mean"):
            assert isinstance(r[key], (int, float)) and r[key] > 0, key
        assert r["graphed_problems_per_hour"] is None and "no CUDA" in r["graphed_unavailable"]
        assert "extrapolated" in r["reference_note"]
    lat, bf = doc["latency_b1"], doc["bf16"]
    assert lat["eager_s"] > 0 and lat["graphed_s"] is None
    assert bf["fp32_s"] > 0 and bf["bf16_s"] > 0
    # bf16 moves the gradient, but not wholesale (a broken autocast path would give ~1 or NaN)
    assert 0 < bf["grad_rel_err"] < 0.1
    for name in ("bf16_weights", "fp16_weights"):  # the network's own weights in low precision
        assert bf[f"{name}_s"] > 0 and 0 < bf[f"{name}_grad_rel_err"] < 0.1, name
    assert set(doc["goals"]) == {"e2e_graphed_vs_reference", "latency_b1", "bf16"}
    assert doc["goals"]["latency_b1"]["met"] is False  # nothing graphed on the CPU
    md = out.with_suffix(".md").read_text()
    assert "SMOKE RUN" in md and "| goal |" in md
    assert out.with_name("fastpath_cpu_throughput.png").is_file()


def test_dit_config_is_about_100m_parameters_and_a_velocity():
    c = DIT_CONFIGS["dit-100m"]
    with torch.device("meta"):
        n = sum(p.numel() for p in DiTVelocity(c).parameters())
    assert 90e6 <= n <= 130e6 and (c.channels, c.size) == (4, 32)
    net = build_dit("tiny")
    x = torch.randn(3, 4, 8, 8)
    v = net(torch.tensor(0.25), x)
    assert v.shape == x.shape and bool(torch.isfinite(v).all())
    assert not torch.allclose(v, net(torch.tensor(0.75), x))  # depends on t

