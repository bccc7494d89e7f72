"""The package root: the public API, submodules reachable as attributes and loaded lazily, and an
import that stays light. Each check runs in a fresh interpreter, since this test session has
already imported most submodules."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dflow_fast as df

HEAVY = ("triton", "matplotlib", "torchmetrics", "safetensors", "diffusers", "flow_matching",
         "sklearn")  # (tqdm not listed: torch itself imports it when installed)


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_import_is_light():
    loaded = json.loads(_fresh(
        "import sys, json, dflow_fast\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"))
    assert loaded == []


@pytest.mark.parametrize("name, attr", [("models", "load_pretrained"), ("reference", "optimize"),
                                        ("data", "fashion_mnist"), ("metrics", "psnr"),
                                        ("tasks", "make"), ("apps", "__doc__")])
def test_submodule_is_an_attribute_after_import_dflow_fast(name, attr):
    """``import dflow_fast as df; df.models.load_pretrained(...)`` works without importing
    dflow_fast.models first, and the submodule was not loaded before it was asked for."""
    out = _fresh(
        "import sys, dflow_fast as df\n"
        f"before = 'dflow_fast.{name}' in sys.modules\n"
        f"ok = hasattr(df.{name}, {attr!r})\n"
        "print(before, ok)")
    assert out == "False True"


def test_public_api():
    for name in ("solve", "optimize", "OptimizeResult", "IterationInfo", "LBFGSOptions",
                 "AdamOptions", "ChiPrior", "backward_blend", "ModelVelocity", "build_info",
                 "ReconstructionWarning", "reconstruction_drift", "__version__"):
        assert name in df.__all__ and hasattr(df, name), name
    assert callable(df.solve) and callable(df.optimize)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        df.nope  # noqa: B018
    assert {"models", "reference", "data"} <= set(dir(df))


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "dflow_fast", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout
