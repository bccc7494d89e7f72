"""pytest setup for the benchmark smoke suite: the checkout on sys.path (so ``bench`` imports as a
namespace package next to ``dflow_fast``) and the ``gpu`` marker."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: benchmark case sized for a CUDA GPU; skipped when CUDA is unavailable")
