"""What every report records about how it was made (docs/design.md section 6): the git commit of the
checkout the package runs from (and whether tracked files had local edits), the versions of
dflow_fast, torch, CUDA and Python, and the device.

Used by the batch jobs' report (:mod:`dflow_fast.jobs`), the demo's report and the benchmarks'
result files (``bench/lib/env.py``), so that all of them read the same fields the same way.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .._version import __version__

#: the checkout the package sits in when it runs from a source tree (``<root>/dflow_fast/...``)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def git_commit(root: str | Path | None = None) -> dict:
    """``{"commit": HEAD or None, "dirty": bool or None}`` of the checkout at ``root`` (default:
    the one this package was imported from; an installed package has none, and then both are
    None). ``dirty``: tracked files differ from HEAD (read-only git calls; untracked files do not
    count). ``$DFLOW_FAST_COMMIT`` overrides: a copied working tree can carry a stale ``.git``,
    and the copier names the commit it copied instead (``"commit_from"`` says so)."""
    if os.environ.get("DFLOW_FAST_COMMIT"):
        return {"commit": os.environ["DFLOW_FAST_COMMIT"], "dirty": None,
                "commit_from": "DFLOW_FAST_COMMIT"}
    root = Path(root) if root is not None else PACKAGE_ROOT
    if not (root / ".git").exists():  # site-packages: never report some enclosing repository
        return {"commit": None, "dirty": None}

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "--no-optional-locks", *args], cwd=root,
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    # Other files change while a job runs in a shared checkout: record that the numbers belong to
    # HEAD plus local edits, not to HEAD alone.
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device, the CPU's otherwise."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def versions() -> dict:
    """Versions of dflow_fast, torch, the CUDA torch was built with (None: a CPU build), cuDNN
    and Python."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"dflow_fast": __version__, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cudnn": cudnn,
            "python": platform.python_version()}


def provenance(device: torch.device | str) -> dict:
    """Everything above in one flat dict, plus the device, thread count and a UTC time stamp:
    the ``provenance`` field of a report."""
    device = torch.device(device)
    return {**versions(), **git_commit(), "device": str(device),
            "device_name": device_name(device), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
