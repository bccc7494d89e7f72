"""Inputs that do not fit are refused before any work, with a message naming them, and nothing
is written: a PNG folder with one broken file, out-of-range indices, an unknown task, images of
the wrong size or channel count, a non-empty output folder without --resume, a resume with other
settings (issue 14, items 1, 3 and 5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dflow_fast import jobs
from dflow_fast.apps.cli import main

from .helpers import TINY


def _pngs(folder, n=3, size=28, mode="L", broken=None):
    from PIL import Image
    folder.mkdir()
    rng = np.random.default_rng(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        if i == broken:  # a truncated file: its header reads, its pixels do not
            path.write_bytes(path.read_bytes()[:100])
    return folder


def refused(tmp_path, match: str, **settings):
    out = tmp_path / "out"
    settings = {**TINY, "data": "fashion-mnist:test", "indices": "0:2", **settings}
    with pytest.raises(jobs.JobInputError, match=match):
        jobs.run(out=str(out), **settings)
    assert not out.exists(), "a refused job wrote something"


def test_png_folder_with_one_broken_file_is_refused_naming_it(tmp_path):
    pytest.importorskip("PIL")
    folder = _pngs(tmp_path / "pngs", broken=1)
    refused(tmp_path, "img1.png", data=str(folder), indices=None)


def test_out_of_range_indices_are_refused(tmp_path):
    refused(tmp_path, r"out of range.*10000", indices="9999:10001")
    refused(tmp_path, r"out of range", indices="5:5")
    refused(tmp_path, r"indices must be", indices="a:b")


def test_unknown_task_is_refused(tmp_path):
    refused(tmp_path, r"unknown task 'paint'.*inpaint_box", task="paint")


def test_wrong_size_is_refused(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.zeros((2, 1, 32, 32), np.uint8))
    refused(tmp_path, r"big.npy.*\[1, 32, 32\].*\[1, 28, 28\].*wrong size", data=str(path),
            indices=None)


def test_wrong_channels_are_refused_naming_the_file(tmp_path):
    pytest.importorskip("PIL")
    folder = _pngs(tmp_path / "rgb", n=2, mode="RGB")
    refused(tmp_path, r"img0.png.*\[3, 28, 28\].*wrong channels", data=str(folder),
            indices=None)


@pytest.mark.parametrize("bad, match", [
    ({"model": "no_such_module_xyz:velocity"}, "cannot import no_such_module_xyz"),
    ({"model": "nonsense"}, "unknown model 'nonsense'"),
    ({"data": "no/such/folder"}, "no such folder or file"),
    ({"gradient": "reversible"}, "needs a reversible solver"),
    ({"task": "sr4", "data": "ODD"}, "not divisible by 4"),
    ({"batch": 0}, "batch must be an int >= 1"),
])
def test_other_bad_settings_are_refused(tmp_path, bad, match):
    if bad.get("data") == "ODD":  # 30x30 images: sr4 cannot pool them
        path = tmp_path / "odd.pt"
        torch.save(torch.zeros(2, 1, 30, 30), path)
        model = tmp_path / "m.py"  # a user model that takes any size
        model.write_text("def velocity(device, dtype):\n    return lambda t, x: -x\n")
        bad = {**bad, "data": str(path), "model": f"{model}:velocity", "indices": None}
    refused(tmp_path, match, **bad)


def test_float_file_outside_the_image_range_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(torch.full((2, 1, 28, 28), 3.0), path)
    refused(tmp_path, r"x.pt: float images must lie in \[-1, 1\]", data=str(path), indices=None)


def test_non_empty_out_without_resume_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = main(["run", "--task", "sr2", "--data", "fashion-mnist:test", "--indices", "0:2",
               "--out", str(out), "--no-progress"])
    assert rc == 2 and "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(jobs.JobInputError, match="not a dflow-fast run folder"):
        jobs.run(data="fashion-mnist:test", indices="0:2", out=str(out), resume=True, **TINY)


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    job = {"fingerprint": "other", "result_settings": {**TINY, "seed": 1},
           "inputs": {"range": [0, 2]}}
    (out / "job.json").write_text(__import__("json").dumps(job))
    with pytest.raises(jobs.JobInputError, match=r"seed: 1 -> 0.*input images differ"):
        jobs.run(data="fashion-mnist:test", indices="0:2", out=str(out), resume=True, **TINY)
