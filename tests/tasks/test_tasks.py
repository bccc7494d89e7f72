"""Forward operators, problem costs and metrics."""
from __future__ import annotations

import math

import pytest
import torch

from dflow_fast import metrics, tasks as problems

from tests.helpers import rel_err

OPS = {
    "box": lambda: problems.Mask(problems.center_box_mask(28, 28), "box"),
    "random": lambda: problems.Mask((torch.rand(3, 1, 28, 28) > 0.7).double(), "random"),
    "avgpool2": lambda: problems.AvgPool(2),
    "avgpool4": lambda: problems.AvgPool(4),
    "blur": lambda: problems.GaussianBlur(),
    "identity": lambda: problems.Identity(),
}


@pytest.mark.parametrize("name", list(OPS))
def test_adjoint_identity(name):
    """<A x, y> = <x, A^T y> on fresh random x and y (float64)."""
    op = OPS[name]()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    y = torch.randn_like(op(x))
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + 1)
    assert op(x).norm() > 0


def test_blur_kernel_follows_each_input_dtype():
    """The blur's kernel, cached per (dtype, device), is that of the input each call: float32 and
    float64 inputs alternately give each dtype's own result (a cache keyed wrongly would not)."""
    op = problems.GaussianBlur()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    y64 = op(x)
    y32 = op(x.float())
    assert y64.dtype == torch.float64 and y32.dtype == torch.float32
    assert torch.equal(op(x), y64)
    direct = torch.nn.functional.conv2d(x.float(), op.kernel.float(), padding=op.size // 2)
    assert torch.equal(y32, direct)
    assert rel_err(y32.double(), y64) < 1e-6


def test_box_covers_the_papers_fraction():
    m = problems.center_box_mask(28, 28)
    assert abs((1 - m.mean().item()) - (40 / 128) ** 2) < 0.01
    m128 = problems.center_box_mask(128, 128)
    assert int((m128 == 0).sum()) == 40 * 40


@pytest.mark.parametrize("task", problems.LINEAR_TASKS)
def test_linear_problem_costs(task):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=g) * 2 - 1
    p = problems.make(task, x, sigma=0.05, generator=g)
    assert p.guess.shape == x.shape and p.display.shape == x.shape
    c = p.cost(x)
    assert c.shape == (4,)
    # the truth fits its own observation to the noise level: cost ~ sigma^2 * #measurements
    m = p.y[0].numel()
    assert (c < 3 * 0.05**2 * m).all()
    assert (p.cost(torch.zeros_like(x)) > c).all()
    for rows in ([2], slice(0, 2)):
        sub = p.select(rows)
        assert rel_err(sub.cost(x[rows]), c[rows]) <= 1e-6


@pytest.mark.parametrize("task", problems.LINEAR_TASKS)
def test_noise_level_is_the_truths_expected_cost(task):
    """m sigma^2: the ground truth's own cost is within a few standard deviations of it (the cost
    at the truth is sigma^2 times a chi-square with m degrees of freedom)."""
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    p = problems.make(task, x, sigma=0.1, generator=torch.Generator().manual_seed(1))
    m = p.y[0].numel()
    assert p.noise_level == pytest.approx(m * 0.01)
    mean = float(p.cost(x).mean())
    assert abs(mean - p.noise_level) <= 4 * 0.01 * math.sqrt(2 * m / 64)


def test_class_problem_cost():
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    x = torch.randn(5, 1, 28, 28)
    labels = torch.arange(5)
    p = problems.make("class", x, classifier=clf, labels=labels)
    c = p.cost(x)
    assert c.shape == (5,)
    assert rel_err(c, torch.nn.functional.cross_entropy(clf(x), labels, reduction="none")) < 1e-6
    sub = p.select(slice(1, 3))
    assert rel_err(sub.cost(x[1:3]), c[1:3]) < 1e-6
    with pytest.raises(ValueError, match="needs classifier"):
        problems.make("class", x)
    with pytest.raises(ValueError, match="unknown task"):
        problems.make("colorize", x)
    assert p.noise_level is None  # no noise model: nothing to stop at


def test_metrics():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    p = metrics.psnr(noisy, x)
    mse = (noisy.clamp(-1, 1) - x).pow(2).flatten(1).mean(1)
    assert p.shape == (3,)
    assert rel_err(p, 10 * torch.log10(4 / mse)) < 1e-5
    s = metrics.ssim(noisy, x)
    assert s.shape == (3,) and (s < 1).all() and (metrics.ssim(x, x) > 0.999).all()
    a, b = torch.randn(400, 6, generator=g), torch.randn(400, 6, generator=g)
    assert metrics.frechet_distance(a, a) < 1e-9
    assert metrics.frechet_distance(a, b + 1.0) > 5.0  # mean shift of 1 in 6 dims
    assert math.isfinite(metrics.frechet_distance(a, b))
