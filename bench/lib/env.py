"""Where results go and what every result file records about how it was made: the environment
(device, versions, git commit, CPU and threads), the command line, and the JSON writer."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from dflow_fast.jobs.chunks import json_safe

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def command(module: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command that reruns a script: ``python -m <module> <args>``, with ``argv`` (default:
    this process's ``sys.argv[1:]``) as the arguments; for the ``command`` field of results."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", module, *args])


def git_commit() -> dict:
    """HEAD commit and whether the tracked files differ from it (read-only git calls), or the
    commit named by ``$DFLOW_FAST_COMMIT``: :func:`dflow_fast.apps.provenance.git_commit` on this
    checkout, the same fields every report of the package records."""
    from dflow_fast.apps.provenance import git_commit as _git_commit
    return _git_commit(REPO_ROOT)


def _cpu_name() -> str:
    from dflow_fast.apps.provenance import cpu_name
    return cpu_name()


def environment(device: torch.device | str) -> dict:
    """Metadata every result file carries: what ran where, with which code."""
    device = torch.device(device)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
    }
    try:
        import dflow_fast
        meta["dflow_fast"] = dflow_fast.__version__
        meta["dflow_fast_build"] = dflow_fast.build_info()
    except Exception as e:  # the metadata must not be the reason a benchmark fails
        meta["dflow_fast"] = f"unavailable: {e!r}"
    if device.type == "cuda":
        meta["cuda_capability"] = list(torch.cuda.get_device_capability(device))
        meta["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        meta["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        for name, mod in (("fp32_precision_matmul", torch.backends.cuda.matmul),
                          ("fp32_precision_cudnn", torch.backends.cudnn)):
            if hasattr(mod, "fp32_precision"):  # the newer TF32 switch (torch >= 2.9)
                meta[name] = mod.fp32_precision
    return meta


def write_json(path: str | Path, payload: dict, device: torch.device | str,
               meta: Optional[dict] = None) -> Path:
    """Write ``{"meta": meta or environment(device), **payload}`` as indented JSON; returns the
    path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta if meta is not None else environment(device), **payload}
    tmp = path.with_name(path.name + ".tmp")
    # strict JSON: json.dumps writes non-finite floats as bare NaN/Infinity before any default hook
    # sees them, which strict parsers reject; they are stored as the strings "nan", "inf", "-inf"
    tmp.write_text(json.dumps(json_safe(doc), indent=2, default=_json_default, allow_nan=False)
                   + "\n")
    tmp.replace(path)  # a reader never sees half a file
    return path


def write_result(path: str | Path, payload: dict, device: torch.device | str,
                 markdown: Callable[[dict, dict], str]) -> Path:
    """A benchmark's usual ending: ``payload`` with this environment as meta to ``path`` (JSON),
    ``markdown(payload, meta)`` beside it as .md, both printed; returns the JSON path."""
    meta = environment(device)
    path = write_json(path, payload, device, meta)
    md = path.with_suffix(".md")
    md.write_text(markdown(payload, meta))
    print(md.read_text())
    print(f"wrote {shown(path)}, {shown(md)}")
    return path


def _json_default(o: Any):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def shown(path: str | Path) -> str:
    """``path`` relative to the repository root where it lies inside it, for messages."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
