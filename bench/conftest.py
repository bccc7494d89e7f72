"""pytest setup for the benchmark suites (run ``python -m pytest bench/...`` from the repository
root, which puts the root on sys.path so that ``bench`` and ``dflow_fast`` import): the ``gpu``
marker, and one torch thread for every test module."""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: benchmark case sized for a CUDA GPU; skipped when CUDA is unavailable")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Timings of tiny problems are dominated by thread hand-offs; one thread is steadier.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
