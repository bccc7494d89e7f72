"""A job's settings (:class:`JobConfig`), their validation, the per-problem seeds, and the
fingerprint that ties a job folder to the settings that produced its chunks."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Optional

from ..core.checks import GRADIENTS
from ..core.plan import REVERSIBLE, SOLVERS
from ..tasks import TASKS


class JobInputError(ValueError):
    """A job refused before any work: bad settings, inputs that do not fit the model, or an
    output folder that is not empty without ``resume``. The message names what is wrong."""


#: the bundled datasets ``--data`` accepts, with the number of images each holds
DATASETS = {"fashion-mnist:test": 10_000, "fashion-mnist:train": 60_000, "mnist-5k": 5_000}
#: floating dtypes a job may run in (L-BFGS in half precision is not meaningful)
DTYPES = ("float32", "float64")
#: the settings that change a job's numbers: a resumed job must agree with its folder on all of
#: them (device and threads change rounding only; a change of either is logged, not refused)
RESULT_FIELDS = ("task", "model", "batch", "steps", "solver", "gradient", "max_iter", "sigma",
                 "alpha", "seed", "dtype")
#: measurement noise std per task when ``sigma`` is not given (as the demo: denoise 0.2 = 25/255
#: on [0, 1] images, the other tasks 0.05)
DEFAULT_SIGMA = {"denoise": 0.2}
DEFAULT_SIGMA_OTHER = 0.05


@dataclass(frozen=True)
class JobConfig:
    """One ``dflow-fast run`` job (docs/jobs.md). Problems are the images ``data[indices]``;
    chunk k holds problems ``k*batch .. (k+1)*batch - 1`` of that selection.

    task: one of ``dflow_fast.tasks.TASKS``. data: a bundled dataset (``DATASETS``), a folder of
    PNG/JPEG images, or a ``.npy``/``.pt``/``.safetensors`` file holding ``[N, C, H, W]``.
    indices: ``"A:B"`` (either end may be left out), a slice of the data. model: a bundled
    velocity (``fashion-mnist``, ``fashion-mnist-ddpm``) or ``module:function`` /
    ``path/to/file.py:function``, called as ``function(device=, dtype=)`` and returning
    ``velocity(t, x) -> like x``. sigma: measurement noise std (None: the task's default).
    alpha: backward-blend weight of the initial x0 (0: pure noise). threads: torch threads per
    worker (results are bitwise reproducible at a fixed count). device: ``auto`` (one GPU per
    worker where there are GPUs, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. worker_timeout:
    seconds rank 0 waits for a silent worker's beat before it gives up on its unfinished chunks
    (jobs/liveness.py).
    """

    task: str
    data: str
    out: str
    indices: Optional[str] = None
    model: str = "fashion-mnist"
    batch: int = 16
    steps: int = 6
    solver: str = "midpoint"
    gradient: str = "auto"
    max_iter: int = 100
    sigma: Optional[float] = None
    alpha: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    threads: int = 1
    resume: bool = False
    progress: bool = True
    worker_timeout: float = 300.0

    @property
    def noise_sigma(self) -> float:
        """The measurement noise std this job uses (``sigma`` or the task's default)."""
        if self.sigma is not None:
            return float(self.sigma)
        return DEFAULT_SIGMA.get(self.task, DEFAULT_SIGMA_OTHER)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise JobInputError(f"{name} must be an int >= {lo}, got {value!r}")


def validate(cfg: JobConfig) -> None:
    """Every setting that can be checked without reading data or models; raises
    :class:`JobInputError` naming the setting."""
    if cfg.task not in TASKS:
        raise JobInputError(f"unknown task {cfg.task!r}; choose one of {list(TASKS)}")
    if cfg.solver not in SOLVERS:
        raise JobInputError(f"unknown solver {cfg.solver!r}; choose one of {sorted(SOLVERS)}")
    if cfg.gradient not in GRADIENTS:
        raise JobInputError(f"unknown gradient {cfg.gradient!r}; choose one of "
                            f"{list(GRADIENTS)}")
    if cfg.gradient == "reversible" and cfg.solver not in REVERSIBLE:
        raise JobInputError(f"gradient 'reversible' needs a reversible solver {list(REVERSIBLE)}"
                            f", got solver {cfg.solver!r}")
    if cfg.dtype not in DTYPES:
        raise JobInputError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    for name, lo in (("batch", 1), ("steps", 1), ("max_iter", 1), ("threads", 1), ("seed", 0)):
        _int(name, getattr(cfg, name), lo)
    if cfg.sigma is not None and not (isinstance(cfg.sigma, (int, float))
                                      and math.isfinite(cfg.sigma) and cfg.sigma >= 0):
        raise JobInputError(f"sigma must be a finite number >= 0, got {cfg.sigma!r}")
    if not (isinstance(cfg.alpha, (int, float)) and 0.0 <= cfg.alpha <= 1.0):
        raise JobInputError(f"alpha must be in [0, 1], got {cfg.alpha!r}")
    if not (isinstance(cfg.worker_timeout, (int, float)) and not isinstance(cfg.worker_timeout, bool)
            and math.isfinite(cfg.worker_timeout) and cfg.worker_timeout > 0):
        raise JobInputError(f"worker_timeout must be a finite number of seconds > 0, got "
                            f"{cfg.worker_timeout!r}")
    if not isinstance(cfg.out, str) or not cfg.out:
        raise JobInputError(f"out must be a folder path, got {cfg.out!r}")
    if not isinstance(cfg.model, str) or not cfg.model:
        raise JobInputError(f"model must be a bundled model name or module:function, got "
                            f"{cfg.model!r}")
    parse_indices(cfg.indices)  # the syntax; the range is checked against the data


def parse_indices(spec: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """``"A:B"`` -> (A, B), either None when left out; ``None`` -> (None, None)."""
    if spec is None:
        return None, None
    parts = str(spec).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise JobInputError(f"indices must be 'A:B' with non-negative ints A < B (either may be "
                            f"left out), got {spec!r}") from None
    if (a is not None and a < 0) or (b is not None and b < 0):
        raise JobInputError(f"indices must be non-negative, got {spec!r}")
    return a, b


def resolve_indices(spec: Optional[str], n: int, what: str) -> tuple[int, int]:
    """The slice ``spec`` of ``n`` items as a range [A, B) with 0 <= A < B <= n, else a
    :class:`JobInputError` naming the range and ``what`` holds only n items."""
    a, b = parse_indices(spec)
    a = 0 if a is None else a
    b = n if b is None else b
    if not (0 <= a < b <= n):
        raise JobInputError(f"indices {spec!r} are out of range: {what} holds {n} items "
                            f"(valid: A:B with 0 <= A < B <= {n})")
    return a, b


def problem_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed from (seed, problem index, stream) alone: the same problem gets the same
    random numbers whichever worker solves it, in whichever chunk order and batch neighbours.
    Streams: ``"noise"`` (the initial x0), ``"measurement"`` (the observation's noise and random
    masks), ``"target"`` (a class task's requested label where the data has none). SHA-256
    rather than ``seed + index``, so nearby (seed, index) pairs do not share streams."""
    h = hashlib.sha256(f"dflow_fast.jobs/{stream}/{seed}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def fingerprint(cfg: JobConfig, data_digest: str, selection: tuple[int, int]) -> str:
    """SHA-256 over the settings that change a job's numbers (RESULT_FIELDS, sigma resolved),
    the digest of the selected input images and the selected range [A, B) of the data (the
    problems' indices, hence their seeds): a chunk belongs to a job iff they agree."""
    key = {f: getattr(cfg, f) for f in RESULT_FIELDS}
    key["sigma"] = cfg.noise_sigma
    key["data"] = data_digest
    key["selection"] = list(selection)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
