"""scripts/train_qm9.py (--smoke: tiny models on 128 molecules, a few seconds): the flow run
resumes bitwise identically, SIGTERM checkpoints and exits, --export loads back through
load_checkpoint; the regressor run logs the valid MAE and exports its test MAE; and unconditional
sampling (dflow_fast.molecules.sample) from the exported flow."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dflow_fast import molecules as mol
from dflow_fast.models import EGNNFlow, EGNNRegressor, load_checkpoint

from .helpers import qm9_or_skip

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["--smoke", "--batch-size", "16", "--log-every", "1", "--warmup", "2"]


@pytest.fixture(scope="module")
def train_qm9():
    qm9_or_skip("train_a", 128)  # skip (or fail in CI) without qm9pack
    spec = importlib.util.spec_from_file_location("train_qm9", ROOT / "scripts" / "train_qm9.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state(out: Path) -> dict:
    return torch.load(out / "state.pt", map_location="cpu", weights_only=False)


def test_flow_resume_is_bitwise_identical_and_exports(train_qm9, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_qm9.main(["--model", "flow", *SMOKE, "--max-steps", "3", "--save-minutes", "0",
                    "--out", str(a)])
    assert _state(a)["step"] == 3
    train_qm9.main(["--model", "flow", "--resume", "--max-steps", "6", "--log-every", "1",
                    "--out", str(a)])
    train_qm9.main(["--model", "flow", *SMOKE, "--max-steps", "6", "--out", str(b)])
    sa, sb = _state(a), _state(b)
    assert sa["step"] == sb["step"] == 6 and sa["curve"]["loss"] == sb["curve"]["loss"]
    for key in ("model", "ema"):
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), (key, k)
    assert [s["start_step"] for s in sa["sessions"]] == [0, 3]
    log = json.loads((a / "train_log.json").read_text())
    assert log["steps"] == 6 and len(log["curve"]["loss"]) == 6
    # a run is never overwritten, and a resumed run keeps its hyperparameters
    with pytest.raises(SystemExit, match="--resume"):
        train_qm9.main(["--model", "flow", *SMOKE, "--out", str(a)])
    with pytest.raises(SystemExit, match="differs"):
        train_qm9.main(["--model", "flow", "--resume", "--lr", "0.1", "--out", str(a)])
    with pytest.raises(SystemExit, match="--model"):
        train_qm9.main(["--model", "guide", "--resume", "--out", str(a)])

    path = tmp_path / "flow.safetensors"
    train_qm9.main(["--model", "flow", "--out", str(a), "--export", str(path)])
    flow = load_checkpoint(path)
    assert isinstance(flow, EGNNFlow) and json.loads(path.with_suffix(".json").read_text())[
        "steps"] == 6
    ema = EGNNFlow(**sa["model_config"])
    ema.load_state_dict(sa["ema"])
    for k, v in ema.state_dict().items():
        assert torch.equal(flow.state_dict()[k], v)
    # --reschedule: a new cosine horizon from the resumed step on, recorded (shared with DDPM)
    train_qm9.main(["--model", "flow", "--resume", "--reschedule", "--decay-steps", "7",
                    "--out", str(a)])
    st = _state(a)
    assert st["step"] == 7 and st["hparams"]["decay_steps"] == 7
    assert st["reschedules"] == [{"step": 6, "decay_steps_from": 40_000, "decay_steps_to": 7}]

    # unconditional samples: the requested sizes, zero CoM, nothing on padded slots
    n_atoms = torch.tensor([4, 9, 6, 9])
    pos, types, mask, x1 = mol.sample(flow, n_atoms, steps=3,
                                      generator=torch.Generator().manual_seed(0), batch=3)
    assert pos.shape == (4, 9, 3) and torch.equal(mask.sum(1), n_atoms)
    assert (x1[~mask] == 0).all() and (pos * mask[..., None]).sum(1).abs().max() < 1e-4
    assert ((types >= 0) & (types < 5)).all()


def test_regressor_trains_and_reports_test_mae(train_qm9, tmp_path):
    out = tmp_path / "eval"
    st = train_qm9.main(["--model", "eval", *SMOKE, "--max-steps", "4", "--eval-limit", "64",
                         "--out", str(out)])
    assert st["step"] == 4 and st["valid_mae"] > 0
    path = tmp_path / "eval.safetensors"
    rec = train_qm9.main(["--model", "eval", "--out", str(out), "--export", str(path)])
    reg = load_checkpoint(path)
    assert isinstance(reg, EGNNRegressor)
    assert rec["test_mae"] > 0 and rec["test_molecules"] == 512 and rec["data"].endswith("train_b")
    m = qm9_or_skip("test", 512)
    assert abs(train_qm9.regressor_mae(reg, m) - rec["test_mae"]) < 1e-4
    assert reg.config["mean"] == st["model_config"]["mean"]  # alpha of half B, standardized


def test_sigterm_checkpoints_and_exits_cleanly(train_qm9, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train_qm9.py"), "--model", "flow", *SMOKE,
         "--max-steps", "100000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    assert proc.returncode == 0 and "received SIGTERM" in text, text
    st = _state(out)
    assert 2 <= st["step"] < 100000 and st["max_steps"] == 100000
    assert json.loads((out / "train_log.json").read_text())["steps"] == st["step"]
