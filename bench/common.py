"""Shared helpers for the dflow_fast benchmarks (DESIGN.md section 7).

- :func:`environment`: device, torch/python versions, git commit, CPU and thread counts.
- :class:`ConvVelocityNet` and :data:`CONFIGS`: a U-Net-style conv velocity built here so the
  benchmarks do not depend on a trained checkpoint ("tiny" for tests, "small" for CPU runs,
  "gpu" 35M parameters at 3x64x64 for CUDA runs).
- :func:`one_gradient`: d cost(x1)/d x0 by one of the methods being compared.
- :func:`solve_by` also runs the peers (torch.utils.checkpoint, torchdiffeq, flow_matching) and a
  one-network-VJP baseline; :func:`available_methods` lists what runs here.
- :class:`SavedBytesMeter` and :class:`RssPeak` (CPU memory) and :func:`cuda_peak` (CUDA).
- :func:`time_cpu` / :func:`time_cuda`: wall times of repeats after warm-up;
  :func:`time_interleaved`: the same for several functions, round-robin.
- :func:`guard_oom`: run a measurement and return ``"oom"`` instead of raising.
- :func:`write_json`: results plus the environment metadata.

Run the scripts from the repository root (``python bench/bench_gradient.py``); they put the root on
``sys.path`` so that ``bench`` imports as a namespace package and ``dflow_fast`` from the checkout.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MIB = 2 ** 20

#: methods compared by the gradient benchmark; "reference" is dflow_fast.reference.solve
METHODS = ("reference", "backprop", "adjoint")


# ----------------------------------------------------------------------------- environment

def git_commit() -> dict:
    """HEAD commit and whether the tracked files differ from it (read-only git calls)."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    # A copied working tree (the device tool's) can carry a stale .git: the caller names the
    # commit it copied instead.
    if os.environ.get("DFLOW_FAST_COMMIT"):
        return {"commit": os.environ["DFLOW_FAST_COMMIT"], "dirty": None,
                "commit_from": "DFLOW_FAST_COMMIT"}
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    # Other files change while a benchmark runs in a shared checkout: record that the numbers
    # belong to HEAD plus local edits, not to HEAD alone.
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    tmp.replace(path)  # a reader never sees half a file
    return path


def _json_default(o: Any):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ----------------------------------------------------------------------------- velocity model

@dataclass(frozen=True)
class NetConfig:
    """Shape of a :class:`ConvVelocityNet` and of the state it acts on ([B, channels, size, size]).

    ``mults``: width multipliers per resolution level; each level after the first halves H and W.
    """

    name: str
    channels: int
    size: int
    base: int
    mults: tuple[int, ...]
    blocks: int  # residual blocks per level, on the way down and on the way up
    temb: int  # time-embedding width


CONFIGS = {
    # for tests: 27k parameters, about a millisecond per evaluation
    "tiny": NetConfig("tiny", channels=1, size=8, base=8, mults=(1, 2), blocks=1, temb=16),
    # CPU runs: Fashion-MNIST-sized state, 0.75M parameters
    "small": NetConfig("small", channels=1, size=28, base=32, mults=(1, 2, 2), blocks=1, temb=128),
    # GPU runs: 35.1M parameters at 3x64x64 (64 -> 32 -> 16 -> 8), the scale of the H100
    # measurement in DESIGN.md section 2 (36M parameters, batch 8)
    "gpu": NetConfig("gpu", channels=3, size=64, base=128, mults=(1, 2, 2, 3), blocks=2,
                     temb=512),
}


def _groups(c: int) -> int:
    g = min(8, c)
    while c % g:
        g -= 1
    return g


class _Block(nn.Module):
    """Residual block: GroupNorm -> SiLU -> conv3x3 (+ time bias) -> GroupNorm -> SiLU -> conv3x3.

    ``x: [B, c_in, H, W]``, ``emb: [B, temb]`` -> ``[B, c_out, H, W]``.
    """

    def __init__(self, c_in: int, c_out: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(temb, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ConvVelocityNet(nn.Module):
    """U-Net-style velocity ``model(x [B, C, H, W], t [B]) -> [B, C, H, W]``.

    One concatenated skip per resolution level, stride-2 conv down, nearest-neighbour up + conv.
    No attention and no BatchNorm (each sample's output depends on that sample only). Weights keep
    PyTorch's default random init on purpose: a zero-initialized output layer would make the
    velocity constant in x and the gradient through the solve trivial.
    Use it as a velocity with ``dflow_fast.ModelVelocity(net)``.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base * m for m in cfg.mults]
        self.freq = cfg.base  # sinusoidal features of t
        self.embed = nn.Sequential(nn.Linear(self.freq, cfg.temb), nn.SiLU(),
                                   nn.Linear(cfg.temb, cfg.temb))
        self.stem = nn.Conv2d(cfg.channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList(_Block(c if j == 0 else w, w, cfg.temb)
                                           for j in range(cfg.blocks)))
            c = w
            if i < len(widths) - 1:
                self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([_Block(c, c, cfg.temb), _Block(c, c, cfg.temb)])
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for i in reversed(range(len(widths))):
            w = widths[i]
            self.up.append(nn.ModuleList(_Block(c + w if j == 0 else w, w, cfg.temb)
                                         for j in range(cfg.blocks)))
            c = w
            if i > 0:
                self.unpool.append(nn.Conv2d(c, widths[i - 1], 3, padding=1))
                c = widths[i - 1]
        self.head = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                  nn.Conv2d(c, cfg.channels, 3, padding=1))

    def _features(self, t: Tensor) -> Tensor:
        half = self.freq // 2
        k = torch.arange(half, device=t.device, dtype=t.dtype)
        ang = t[:, None] * 1000.0 * torch.exp(-math.log(10_000.0) * k / half)[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.embed(self._features(t))
        h = self.stem(x)
        skips = []
        for i, blocks in enumerate(self.down):
            for b in blocks:
                h = b(h, emb)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        for b in self.mid:
            h = b(h, emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for b in blocks:
                h = b(h, emb)
            if i < len(self.unpool):
                h = self.unpool[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.head(h)


#: the net a device's benchmarks use unless --config says otherwise
DEFAULT_NET = {"cpu": "small", "cuda": "gpu"}


def add_net_options(p, *, batch: int, steps: int) -> None:
    """``--device``, ``--config`` (the net), ``--batch``, ``--steps``: the options of a benchmark
    of one problem size (argparse parser ``p``); finish with :func:`check_net_options`."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), help="net (default small cpu, gpu cuda)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=steps)


def check_net_options(p, a) -> None:
    """After parsing: CUDA must be there when asked for; the device's default net."""
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    a.config = a.config or DEFAULT_NET[a.device]


def build_velocity(config: str | NetConfig, device="cpu", dtype=torch.float32, seed: int = 0):
    """A frozen :class:`ConvVelocityNet` (eval mode, ``requires_grad=False``) and its state shape.

    Frozen because D-Flow optimizes x0 only, and because with trainable weights
    ``solve(gradient="adjoint")`` computes every weight's gradient in its backward sweep even when
    only x0's is requested (~30% more time on the "small" net), which is not what is measured.
    Returns ``(net, (C, H, W))``; wrap ``net`` with ``dflow_fast.ModelVelocity``.
    """
    cfg = CONFIGS[config] if isinstance(config, str) else config
    with torch.random.fork_rng(devices=[]):  # same weights for a seed; caller's RNG untouched
        torch.manual_seed(seed)
        net = ConvVelocityNet(cfg)
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return net, (cfg.channels, cfg.size, cfg.size)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- the gradient

def mse_cost(x1: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error ``[B]`` of ``x1, target: [B, *S]``."""
    return (x1 - target).pow(2).flatten(1).mean(1)


#: peers and baselines that :func:`solve_by` also knows (benchmark-only: dflow_fast never imports
#: torchdiffeq or flow_matching). "vjp" is no solve but one network evaluation, the unit of the
#: memory goal ("one network VJP's peak").
PEER_METHODS = ("checkpoint", "torchdiffeq", "torchdiffeq-adjoint", "torchdiffeq-adjoint-ss",
                "flow_matching")
BASELINE_METHODS = ("vjp",)
#: dflow_fast's other gradient schemes: "auto" (default memory budget: on a GPU with room to spare
#: it keeps every step's graph), "auto-0" (budget 0: nothing kept, the adjoint's memory) and
#: "reversible" (the reversible midpoint solver, default coupling: a different discretization of
#: the same ODE, so its gradient differs from the reference's by the method's error, not rounding).
DFLOW_EXTRA_METHODS = ("auto", "auto-0", "reversible")


def peer_available(method: str) -> Optional[str]:
    """None if ``method``'s package imports, else the reason it cannot run."""
    module = {"torchdiffeq": "torchdiffeq", "flow_matching": "flow_matching"}.get(
        method.split("-")[0])
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError as e:
        return f"{module} is not installed ({e}); pip install {module} (setup.py extra 'bench')"
    return None


def import_peers() -> None:
    """Import what the peers import (torch.utils.checkpoint pulls in torch._dynamo), so that the
    first measured call does not pay for it."""
    import torch.utils.checkpoint  # noqa: F401
    for m in ("torchdiffeq", "flow_matching.solver"):
        try:
            __import__(m)
        except ImportError:
            pass
    try:
        torch.utils.checkpoint.checkpoint(lambda x: x * 2, torch.ones(1, requires_grad=True),
                                          use_reentrant=False).sum().backward()
    except Exception:  # only a warm-up
        pass


def available_methods(device: torch.device | str) -> list[str]:
    """Every method that can run on ``device`` here: the reference, dflow_fast's backprop, its
    adjoint on each backend that loads for the device, and the installed peers."""
    import dflow_fast

    dev = torch.device(device).type
    usable = {"cpu": ("torch", "cpp"), "cuda": ("torch", "cuda", "triton")}.get(dev, ("torch",))
    backends = [b for b in dflow_fast.build_info()["backends"] if b in usable]
    methods = (["reference", "backprop"] + [f"adjoint-{b}" for b in backends]
               + list(DFLOW_EXTRA_METHODS))
    return methods + [m for m in PEER_METHODS if peer_available(m) is None] + ["vjp"]


def _grid(steps: int) -> list[float]:
    return [k / steps for k in range(steps + 1)]  # t0=0, t1=1: dflow_fast.reference's grid


def _step(velocity, x: Tensor, ta: float, h: float, solver: str) -> Tensor:
    """One Euler or midpoint step, the formulas of dflow_fast.reference.solve."""
    t = torch.tensor(ta, dtype=x.dtype, device=x.device)
    if solver == "euler":
        return x + h * velocity(t, x)
    tm = torch.tensor(ta + h / 2, dtype=x.dtype, device=x.device)
    return x + h * velocity(tm, x + (h / 2) * velocity(t, x))


def _checkpoint_solve(velocity, x0: Tensor, *, steps: int, solver: str) -> Tensor:
    """Plain loop with ``torch.utils.checkpoint`` around every step: the forward keeps each step's
    input, the backward re-runs one step at a time (the textbook way to trade time for memory)."""
    from torch.utils.checkpoint import checkpoint

    grid = _grid(steps)
    x = x0
    for ta, tb in zip(grid[:-1], grid[1:]):
        x = checkpoint(_step, velocity, x, ta, tb - ta, solver, use_reentrant=False)
    return x


def _torchdiffeq_solve(velocity, x0: Tensor, *, steps: int, solver: str, adjoint: bool,
                       step_size: bool) -> Tensor:
    """torchdiffeq's fixed-grid solver. ``step_size=False``: ``t`` lists all N+1 grid points (the
    solution at each is returned, and odeint_adjoint stores all of them and restarts its backward
    solve of x from each); ``True``: ``t = [0, 1]`` with ``options={"step_size": 1/N}`` (only x1 is
    kept; odeint_adjoint reconstructs x by integrating backward: O(1) memory, larger error)."""
    import torchdiffeq

    if step_size:
        t = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
        options = {"step_size": 1.0 / steps}
    else:
        t = torch.tensor(_grid(steps), dtype=x0.dtype, device=x0.device)
        options = None
    if adjoint:
        # adjoint_params=(): x0's gradient only, as every other method here computes.
        return torchdiffeq.odeint_adjoint(velocity, x0, t, method=solver, options=options,
                                          adjoint_params=())[-1]
    return torchdiffeq.odeint(velocity, x0, t, method=solver, options=options)[-1]


def _flow_matching_solve(velocity, x0: Tensor, *, steps: int, solver: str) -> Tensor:
    """flow_matching's ``ODESolver.sample`` (torchdiffeq underneath, step_size 1/N) with gradients
    enabled; its velocity is a ``ModelWrapper`` called as ``forward(x, t, **extras)``."""
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    class Wrapped(ModelWrapper):
        def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
            return self.model(t, x)

    return ODESolver(velocity_model=Wrapped(velocity)).sample(
        x_init=x0, step_size=1.0 / steps, method=solver,
        time_grid=torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device), enable_grad=True)


def solve_by(method: str, velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor, *,
             steps: int, solver: str) -> Tensor:
    """x1 ``[B, *S]`` from x0 ``[B, *S]`` by ``method``:

    - ``"reference"``: dflow_fast.reference.solve, autograd through the plain loop;
    - ``"backprop"``, ``"adjoint"`` or ``"auto"``: dflow_fast.solve's gradient schemes with the
      default backend "auto", or ``"<gradient>-<backend>"`` for an explicit backend, e.g.
      ``"adjoint-cpp"``; ``"auto-0"``: gradient "auto" with ``memory_budget=0``; ``"reversible"``:
      the reversible solver around ``solver`` with gradient "reversible";
    - peers (:data:`PEER_METHODS`): ``"checkpoint"`` (torch.utils.checkpoint per step),
      ``"torchdiffeq"`` (odeint, backprop, t = the grid), ``"torchdiffeq-adjoint"``
      (odeint_adjoint, t = the grid), ``"torchdiffeq-adjoint-ss"`` (odeint_adjoint, t = [0, 1] and
      step_size 1/N), ``"flow_matching"`` (ODESolver.sample, enable_grad=True);
    - ``"vjp"``: no solve, ``velocity(0.5, x0)`` once (one network evaluation and, under a
      gradient, its VJP: the unit of the adjoint's memory goal).
    """
    import dflow_fast
    import dflow_fast.reference

    if method == "reference":
        return dflow_fast.reference.solve(velocity, x0, steps=steps, solver=solver)
    if method == "vjp":
        return velocity(torch.tensor(0.5, dtype=x0.dtype, device=x0.device), x0)
    if method == "checkpoint":
        return _checkpoint_solve(velocity, x0, steps=steps, solver=solver)
    if method in ("torchdiffeq", "torchdiffeq-adjoint", "torchdiffeq-adjoint-ss"):
        return _torchdiffeq_solve(velocity, x0, steps=steps, solver=solver,
                                  adjoint="adjoint" in method, step_size=method.endswith("-ss"))
    if method == "flow_matching":
        return _flow_matching_solve(velocity, x0, steps=steps, solver=solver)
    if method == "auto-0":
        return dflow_fast.solve(velocity, x0, steps=steps, solver=solver, gradient="auto",
                                memory_budget=0)
    if method == "reversible":
        return dflow_fast.solve(velocity, x0, steps=steps, solver=f"reversible_{solver}",
                                gradient="reversible")
    gradient, _, backend = method.partition("-")
    if gradient in ("backprop", "adjoint", "auto"):
        return dflow_fast.solve(velocity, x0, steps=steps, solver=solver, gradient=gradient,
                                backend=backend or None)
    raise ValueError(f"unknown method {method!r}; choose one of "
                     f"{list(METHODS + PEER_METHODS + BASELINE_METHODS)} or "
                     f"'<gradient>-<backend>'")


class CountingVelocity(nn.Module):
    """``velocity(t, x)`` that counts its calls (``n``): a module, so torchdiffeq and
    flow_matching take it as they take a model."""

    def __init__(self, velocity: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.velocity, self.n = velocity, 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.n += 1
        return self.velocity(t, x)


def one_gradient(method: str, velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor,
                 target: Tensor, *, steps: int, solver: str) -> Tensor:
    """``d sum_b mse(x1_b, target_b) / d x0``: one forward solve and one backward pass.

    ``x0, target: [B, *S]``; returns ``[B, *S]``. ``torch.autograd.grad`` asks for x0 only, so
    nothing lands in weights' ``.grad`` (use a frozen net anyway, see :func:`build_velocity`).
    """
    x = x0.detach().requires_grad_(True)
    x1 = solve_by(method, velocity, x, steps=steps, solver=solver)
    g, = torch.autograd.grad(mse_cost(x1, target).sum(), x)
    return g


def one_eval(velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor) -> Tensor:
    """``velocity(0.5, x0)`` under ``torch.no_grad``: one network evaluation as the adjoint's
    forward sweep makes it, without a graph; ``x0: [B, *S]``."""
    with torch.no_grad():
        return velocity(torch.tensor(0.5, dtype=x0.dtype, device=x0.device), x0)


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (NaN if either has non-finite entries)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- memory

class _Saved:
    """What the pack hook hands autograd instead of the tensor: releasing it (when autograd frees
    the saved variable) tells the meter that the storage is no longer held for backward."""

    __slots__ = ("tensor", "meter", "ptr")

    def __init__(self, tensor: Tensor, meter: "SavedBytesMeter", ptr: int):
        self.tensor, self.meter, self.ptr = tensor, meter, ptr

    def __del__(self):
        self.meter._release(self.ptr)


class SavedBytesMeter:
    """CPU memory of a gradient: bytes that autograd keeps saved for backward.

    Used as a context manager around forward *and* backward. Through
    ``torch.autograd.graph.saved_tensors_hooks`` every tensor saved for backward is seen (ops'
    saved inputs/outputs, and ``ctx.save_for_backward`` of custom autograd Functions such as the
    adjoint's stored states, and the graphs the adjoint's backward sweep rebuilds). Accounting:

    - by storage: a storage is counted once, with its full ``untyped_storage().nbytes()``, however
      many saved tensors (views, the same tensor saved by several ops) refer to it;
    - live: a storage stops counting when the last saved variable referring to it is freed, so
      ``peak`` is the high-water mark over the whole forward + backward, e.g. the adjoint's N
      states plus the one step it recomputes at a time;
    - ``exclude`` (the model's parameters) is not counted: weights are resident anyway and do not
      grow with steps or batch, so they are not memory spent per gradient.

    Not counted: transient tensors that are never saved (freed right after use), gradient
    buffers of the backward pass, and allocator overhead. It is a lower bound on the process's
    extra memory and the quantity that grows with steps; CUDA runs measure the allocator instead.

    Attributes: ``peak`` (bytes), ``live`` (bytes now), ``after_forward`` (bytes at
    :meth:`mark`), ``n_saved`` (pack-hook calls counted).
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._refs: dict[int, list[int]] = {}  # storage data_ptr -> [saved refs, nbytes]
        self.live = self.peak = self.n_saved = 0
        self.after_forward: Optional[int] = None
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor):
        st = t.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or ptr in self.exclude:
            return t
        rec = self._refs.get(ptr)
        if rec is None:
            self._refs[ptr] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            rec[0] += 1
        self.n_saved += 1
        # Detached: a saved output holding itself (tensor -> grad_fn -> saved -> tensor) would be
        # a reference cycle that keeps graphs run with retain_graph=True (torchdiffeq's
        # odeint_adjoint) alive until the next gc; autograd gives an unpacked tensor its history.
        return _Saved(t.detach(), self, ptr)

    @staticmethod
    def _unpack(obj):
        return obj.tensor if isinstance(obj, _Saved) else obj

    def _release(self, ptr: int) -> None:
        rec = self._refs.get(ptr)
        if rec is None:
            return
        rec[0] -= 1
        if rec[0] == 0:
            del self._refs[ptr]
            self.live -= rec[1]

    def mark(self) -> None:
        """Record ``live`` now as ``after_forward`` (call between forward and backward)."""
        self.after_forward = self.live

    def __enter__(self) -> "SavedBytesMeter":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def saved_bytes_gradient(method: str, velocity, net: nn.Module, x0: Tensor, target: Tensor, *,
                         steps: int, solver: str) -> tuple[Tensor, SavedBytesMeter]:
    """:func:`one_gradient` under a :class:`SavedBytesMeter` that excludes ``net``'s parameters.
    Returns ``(gradient [B, *S], meter)``; ``meter.after_forward`` is taken before the backward."""
    meter = SavedBytesMeter(exclude=list(net.parameters()) + list(net.buffers()))
    with meter:
        x = x0.detach().requires_grad_(True)
        x1 = solve_by(method, velocity, x, steps=steps, solver=solver)
        loss = mse_cost(x1, target).sum()
        meter.mark()
        g, = torch.autograd.grad(loss, x)
        del x1, loss
    gc.collect()
    return g, meter


class RssPeak:
    """CPU memory of a call as the operating system sees it: the process's peak resident set size
    during the call minus its resident size before (Linux: ``VmHWM`` after resetting it through
    ``/proc/self/clear_refs``, then ``VmRSS``/``VmHWM`` from ``/proc/self/status``).

    Unlike :class:`SavedBytesMeter` it needs no cooperation from autograd, so it also sees what
    ``torch.utils.checkpoint`` keeps (its own saved-tensor hooks hide it from the meter) and the
    transients (gradient buffers, convolution workspaces). Freed memory that malloc keeps instead
    of returning to the system would hide reuse, so every measurement starts with
    ``gc.collect()`` and glibc's ``malloc_trim(0)``; large tensors are mmap'ed and unmapped on
    free, so the peak tracks them. Measure after one warm-up call (first calls allocate caches).
    """

    _libc = None

    @staticmethod
    def available() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return RssPeak._status("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> Optional[int]:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
        return None

    @classmethod
    def measure(cls, fn: Callable[[], Any]) -> tuple[Any, int]:
        """``(fn(), peak resident bytes during fn above the resident bytes before it)``."""
        gc.collect()
        if cls._libc is None:
            import ctypes
            try:
                cls._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                cls._libc = False
        if cls._libc:
            cls._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = cls._status("VmRSS")
        out = fn()
        return out, max(0, cls._status("VmHWM") - base)


def cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Run ``fn`` once; returns ``(its result, peak bytes allocated above what was allocated
    before the call)``, i.e. the memory the call itself needed on top of weights and inputs."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - base


# ----------------------------------------------------------------------------- time

def time_cpu(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1,
             clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Times (s) of ``repeats`` calls after ``warmup`` untimed ones: wall time
    (``time.perf_counter``), or pass ``clock=time.process_time`` for this process's CPU time (with
    one torch thread, the wall time of an unshared core: other processes on a shared machine do
    not inflate it, though they still compete for caches and memory bandwidth)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def time_cuda(fn: Callable[[], Any], device: torch.device, *, repeats: int = 5,
              warmup: int = 2) -> list[float]:
    """Times (s) of ``repeats`` calls after ``warmup`` ones, each between CUDA events.

    A fixed count instead of ``triton.testing.do_bench``: do_bench sizes its repeats from a budget
    in milliseconds, which for a gradient that takes a second leaves one or two samples."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device | str, *,
                     repeats: int, warmup: int = 1,
                     clock: Callable[[], float] = time.perf_counter
                     ) -> dict[str, list[float] | str]:
    """Times (s) of several functions measured round-robin: each round calls every function once.

    On a shared machine, load from other processes comes in bursts; interleaving spreads a burst
    over all the methods instead of inflating one of them, which keeps the ratios between them
    meaningful. ``warmup`` untimed rounds come first. A function that runs out of memory is
    recorded as ``"oom"`` and leaves the rotation. ``clock``: see :func:`time_cpu` (CPU only)."""
    device = torch.device(device)
    if device.type == "cuda":
        def once(fn):
            return time_cuda(fn, device, repeats=1, warmup=0)[0]
    else:
        def once(fn):
            return time_cpu(fn, repeats=1, warmup=0, clock=clock)[0]
    out: dict[str, list[float] | str] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            if out[name] == "oom":
                continue
            t = guard_oom(lambda: once(fn), device)
            if t == "oom":
                out[name] = "oom"
            elif r >= warmup:
                out[name].append(t)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ----------------------------------------------------------------------------- out of memory

def is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(e, oom_type):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def guard_oom(fn: Callable[[], Any], device: torch.device | str | None = None):
    """``fn()``, or the string ``"oom"`` if it ran out of memory (other errors propagate).

    The exception is dropped before the cache is emptied: its traceback holds the frames, and so
    the tensors, of the failed call."""
    try:
        return fn()
    except Exception as e:
        if not is_oom(e):
            raise
    # Out of the except block: the exception and its frames are gone, their memory can be freed.
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return "oom"
