"""scripts/train_ddpm.py: resume is bitwise exact, SIGTERM checkpoints, --export loads back (CPU).

Runs the ``--smoke`` model (71k parameters) for a few steps on the first 256 Fashion-MNIST train
images. Skips without diffusers, and without the Fashion-MNIST data unless
``DFLOW_FAST_REQUIRE_DATA=1`` (then it fails), like tests/test_data_models.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="scripts/train_ddpm.py needs diffusers")

from dflow_fast import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_ddpm.py"
SMOKE = ["--smoke", "--limit", "256", "--batch-size", "16", "--log-every", "1"]


@pytest.fixture(scope="module")
def train_ddpm():
    try:
        data.fashion_mnist("train", limit=256)
    except data.DatasetNotFoundError as e:
        if os.environ.get("DFLOW_FAST_REQUIRE_DATA") == "1":
            raise
        pytest.skip(f"data not installed: {e}")
    spec = importlib.util.spec_from_file_location("train_ddpm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state(out: Path) -> dict:
    return torch.load(out / "state.pt", map_location="cpu", weights_only=False)


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(train_ddpm, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # Interrupted: 3 steps (checkpointing after every step), then resumed to 6.
    argv = SMOKE + ["--max-steps", "3", "--save-minutes", "0", "--out", str(a)]
    assert train_ddpm.main(argv) == 3
    assert _state(a)["step"] == 3
    argv = ["--resume", "--max-steps", "6", "--log-every", "1", "--out", str(a)]
    assert train_ddpm.main(argv) == 6
    # Uninterrupted: 6 steps.
    assert train_ddpm.main(SMOKE + ["--max-steps", "6", "--out", str(b)]) == 6

    sa, sb = _state(a), _state(b)
    assert sa["step"] == sb["step"] == 6
    assert sa["hparams"] == sb["hparams"]
    for key in ("model", "ema", "opt", "torch_rng"):
        _assert_same_tensors(sa[key], sb[key], key)  # bitwise, not just close
    assert sa["curve"]["step"] == sb["curve"]["step"] == [1, 2, 3, 4, 5, 6]
    assert sa["curve"]["loss"] == sb["curve"]["loss"]
    assert all(l > 0 for l in sa["curve"]["loss"])
    # The training moved the weights, and the EMA lags behind them.
    fresh = train_ddpm.make_model(sa["hparams"]).state_dict()
    assert any(not torch.equal(fresh[k], sa["model"][k]) for k in fresh)
    assert any(not torch.equal(sa["ema"][k], sa["model"][k]) for k in fresh)

    log = json.loads((a / "train_log.json").read_text())
    assert log["steps"] == 6 and log["curve"]["step"] == [1, 2, 3, 4, 5, 6]
    assert log["finished"] and log["parameters"] == sum(v.numel() for v in fresh.values())
    assert [s["start_step"] for s in sa["sessions"]] == [0, 3]


def test_guards_against_clobbering_a_run(train_ddpm, tmp_path):
    out = tmp_path / "run"
    train_ddpm.main(SMOKE + ["--max-steps", "1", "--out", str(out)])
    before = (out / "state.pt").read_bytes()
    with pytest.raises(SystemExit, match="--resume"):
        train_ddpm.main(SMOKE + ["--max-steps", "2", "--out", str(out)])
    with pytest.raises(SystemExit, match="--lr"):
        train_ddpm.main(["--resume", "--lr", "0.5", "--max-steps", "2", "--out", str(out)])
    assert (out / "state.pt").read_bytes() == before
    with pytest.raises(SystemExit, match="nothing to export"):
        train_ddpm.main(["--out", str(tmp_path / "none"), "--export", str(tmp_path / "x.st")])


def test_reschedule_changes_the_horizon_only_when_asked_and_records_it(train_ddpm, tmp_path):
    out = tmp_path / "run"
    train_ddpm.main(SMOKE + ["--warmup", "1", "--decay-steps", "8", "--max-steps", "3",
                             "--out", str(out)])
    before = (out / "state.pt").read_bytes()
    with pytest.raises(SystemExit, match="--decay-steps 5 differs"):
        train_ddpm.main(["--resume", "--decay-steps", "5", "--out", str(out)])
    with pytest.raises(SystemExit, match="must lie beyond the resumed step 3"):
        train_ddpm.main(["--resume", "--reschedule", "--decay-steps", "3", "--out", str(out)])
    assert (out / "state.pt").read_bytes() == before  # refused before any work
    assert train_ddpm.main(["--resume", "--reschedule", "--decay-steps", "5", "--out",
                            str(out)]) == 5  # --max-steps defaults to the new horizon
    st = _state(out)
    assert st["hparams"]["decay_steps"] == 5
    assert st["reschedules"] == [{"step": 3, "decay_steps_from": 8, "decay_steps_to": 5}]
    log = json.loads((out / "train_log.json").read_text())
    assert log["reschedules"] == st["reschedules"] and log["hparams"]["decay_steps"] == 5
    # The new horizon is the state's: a later plain --resume keeps it, and the cosine ends there.
    assert train_ddpm.lr_at(4, st["hparams"]) == pytest.approx(
        st["hparams"]["lr"] * (st["hparams"]["min_lr_ratio"]
                               + (1 - st["hparams"]["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * 3 / 4))))
    assert train_ddpm.main(["--resume", "--max-steps", "6", "--out", str(out)]) == 6
    assert len(_state(out)["reschedules"]) == 1


def test_export_loads_back_into_unet2dmodel(train_ddpm, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    out, path = tmp_path / "run", tmp_path / "export" / "ddpm.safetensors"
    train_ddpm.main(SMOKE + ["--max-steps", "3", "--out", str(out)])
    train_ddpm.main(["--out", str(out), "--export", str(path)])

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "dflow_fast.models/1" and meta["arch"] == "diffusers.UNet2DModel"
    model = UNet2DModel(**json.loads(meta["config"]))  # plain constructor kwargs
    model.load_state_dict(load_file(str(path)))  # strict: every tensor present, nothing extra
    model.eval()
    sched = DDPMScheduler(**json.loads(meta["scheduler"]))
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000
    assert sched.config.beta_schedule == "linear"
    training = json.loads(meta["training"])
    assert training["steps"] == 3 and training["ema"] == 0.999 and training["train_images"] == 256

    st = _state(out)
    ema = UNet2DModel(**st["model_config"])
    ema.load_state_dict(st["ema"])
    ema.eval()
    x = torch.randn(4, 1, 28, 28)
    t = torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        y, y_ref = model(x, t).sample, ema(x, t).sample
    assert y.shape == (4, 1, 28, 28)
    assert torch.equal(y, y_ref)
    log = json.loads(path.with_suffix(".json").read_text())
    assert log["steps"] == 3 and log["curve"]["step"] == [1, 2, 3]


def test_sigterm_checkpoints_and_exits_cleanly(train_ddpm, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *SMOKE, "--max-steps", "100000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        deadline, lines = time.time() + 300, []
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 2:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "received SIGTERM" in text
    st = _state(out)
    assert 2 <= st["step"] < 100000 and st["max_steps"] == 100000
    assert json.loads((out / "train_log.json").read_text())["steps"] == st["step"]


def test_export_loads_as_the_adapted_velocity(train_ddpm, tmp_path):
    """dflow_fast.models.load_checkpoint turns the export into the probability-flow velocity of
    its UNet and DDPM scheduler (what load_pretrained("fashion-mnist-ddpm") returns)."""
    from diffusers import DDPMScheduler, UNet2DModel

    import dflow_fast as df

    out, path = tmp_path / "run", tmp_path / "export" / "ddpm.safetensors"
    train_ddpm.main(SMOKE + ["--max-steps", "2", "--out", str(out)])
    train_ddpm.main(["--out", str(out), "--export", str(path)])
    v = df.models.load_checkpoint(path)
    assert not any(p.requires_grad for p in v.parameters())
    grid = v.time_grid(5)
    assert grid.shape == (6,) and float(grid[0]) == 0.0 and float(grid[-1]) == 1.0

    st = _state(out)
    ema = UNet2DModel(**st["model_config"])
    ema.load_state_dict(st["ema"])
    ref = df.adapters.from_diffusers(ema.eval().requires_grad_(False), DDPMScheduler())
    x = torch.randn(2, 1, 28, 28)
    for t in (0.0, 0.37, 1.0):
        tt = torch.tensor(t)
        with torch.no_grad():
            assert torch.equal(v(tt, x), ref(tt, x))
    with pytest.raises(ValueError, match="unknown pretrained model"):
        df.models.load_pretrained("fashion-mnist-ddmp")
