"""The shipped QM9 checkpoints: load by name, size limit, the call conventions the D-Flow task
uses (velocity with a per-sample mask, regressor on positions / types / mask)."""
from __future__ import annotations

import json

import pytest
import torch

from dflow_fast.models import (
    PRETRAINED, WEIGHTS_DIR, EGNNFlow, EGNNRegressor, load_pretrained,
)
from dflow_fast.models.egnn import zero_com_noise

NAMES = {"qm9-flow": EGNNFlow, "qm9-alpha-guide": EGNNRegressor, "qm9-alpha-eval": EGNNRegressor}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_checkpoint_loads_and_follows_the_conventions(name):
    path = WEIGHTS_DIR / PRETRAINED[name]
    if name != "qm9-flow" and not path.is_file():
        pytest.skip(f"{path.name} not trained yet (scripts/train_qm9.py --model ...)")
    assert path.stat().st_size <= 20e6
    log = json.loads(path.with_suffix(".json").read_text())
    assert log["steps"] > 0 and log["checkpoint"] == path.name
    model = load_pretrained(name)
    assert type(model) is NAMES[name] and not any(p.requires_grad for p in model.parameters())
    mask = torch.arange(12)[None] < torch.tensor([12, 7, 3])[:, None]
    x = zero_com_noise(mask, 5, generator=torch.Generator().manual_seed(0))
    if name == "qm9-flow":
        v = model(torch.tensor(0.5), x, mask=mask)
        assert v.shape == x.shape and (v[~mask] == 0).all()
        assert (v[..., :3] * mask[..., None]).sum(1).abs().max() < 1e-4
    else:
        assert "test_mae" in log and log["data"].endswith("train_a" if "guide" in name
                                                          else "train_b")
        onehot = torch.nn.functional.one_hot(x[..., 3:].argmax(-1), 5).float()
        alpha = model(x[..., :3], onehot, mask)
        assert alpha.shape == (3,) and torch.isfinite(alpha).all()
