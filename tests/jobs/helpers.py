"""Shared pieces of the jobs tests: a tiny job's settings and result comparisons."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from dflow_fast.jobs import load_results

ROOT = Path(__file__).resolve().parents[2]
GATED_MODEL = str(Path(__file__).with_name("gated_model.py")) + ":velocity"
#: a tiny job: 2 midpoint steps, 2 L-BFGS iterations, 2 problems per chunk
TINY = dict(task="sr2", steps=2, max_iter=2, batch=2, progress=False)
TINY_ARGS = ["--task", "sr2", "--steps", "2", "--max-iter", "2", "--batch", "2",
             "--no-progress"]


def same_results(a: str | Path, b: str | Path, rows: slice = slice(None)) -> None:
    """Every tensor of two jobs' results.safetensors bitwise equal (``rows`` of a: all of b)."""
    ra, names_a = load_results(a)
    rb, names_b = load_results(b)
    assert names_a == names_b and set(ra) == set(rb)
    for key in ra:
        assert ra[key].dtype == rb[key].dtype, key
        assert torch.equal(ra[key][rows], rb[key]), f"{key} differs"


def chunk_stats(out: Path) -> dict[str, tuple[int, int]]:
    """chunk file name -> (inode, mtime_ns): a rewritten file gets a new inode (atomic rename)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((Path(out) / "chunks").glob("chunk-*.safetensors"))}


def subprocess_env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    return env


PYTHON = sys.executable
