"""The workers: torch.distributed when the job runs under torchrun (or in a process group the
caller set up), one process otherwise.

Worker r of W takes chunks r, r + W, r + 2W, ... (docs/jobs.md); workers never exchange tensors.
The process group serves three short collectives: agreeing that every worker accepted the inputs
(so that a refusal on one is a refusal on all, before anything is written), and two barriers
around rank 0's set-up of the job folder. Rank 0 then waits for the other workers' chunks by
watching their manifest entries on the (shared) file system, not in a collective, so no
collective waits for hours behind a slow worker (NCCL's and gloo's timeouts would fire).

Device: ``cuda:{LOCAL_RANK}`` (one GPU per worker, backend NCCL) where CUDA is available and the
device is ``auto`` or ``cuda``; the CPU with gloo otherwise.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from .config import JobInputError

#: the process group's timeout for the set-up collectives (rank 0 writes a few small files
#: between them; the long waits are file-system polls, not collectives)
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class Workers:
    """Where this process stands: ``rank`` of ``world`` workers, ``local_rank`` on its node,
    ``backend`` ("gloo", "nccl" or None for one process), ``owned``: this job created the
    process group (and destroys it at the end, unless a worker was ``lost``: tearing down an
    NCCL communicator whose peer died can hang, so a lost job leaves it to process exit)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = False
    device: torch.device = torch.device("cpu")
    lost: bool = False

    def agree(self, ok: bool) -> bool:
        """True iff ``ok`` on every worker (an all-reduce of the minimum; a barrier too)."""
        if self.backend is None:
            return ok
        import torch.distributed as dist
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.backend is not None:
            self.agree(True)  # an all-reduce: NCCL's barrier() needs to guess the device

    def close(self) -> None:
        if self.owned and not self.lost:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.owned = False


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def resolve_device(spec: str, local_rank: int, world: int) -> torch.device:
    """``auto``: cuda:{local_rank} where CUDA is available, else the CPU; ``cuda`` likewise but
    refusing without CUDA; ``cuda:N``: one process only; anything else as torch.device."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise JobInputError(f"device {spec!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise JobInputError(f"device {spec!r}: CUDA is not available here")
        count = torch.cuda.device_count()
        if dev.index is None:
            if local_rank >= count:  # NCCL refuses two ranks on one GPU
                raise JobInputError(f"worker with LOCAL_RANK {local_rank} has no GPU of its own "
                                    f"({count} visible): start at most {count} workers per node")
            dev = torch.device("cuda", local_rank)
        elif world > 1:
            raise JobInputError(f"device {spec!r} names one GPU, but {world} workers run: give "
                                "'cuda' (one GPU per worker) instead")
        elif dev.index >= count:
            raise JobInputError(f"device {spec!r}: only {count} GPU(s) visible")
    return dev


def start(device: str) -> Workers:
    """Join (or create, under torchrun) the process group; resolve this worker's device. Writes
    nothing. A group the caller initialized is used as it is and left open."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        dev = resolve_device(device, local, world)
        backend = str(dist.get_backend()) if world > 1 else None
        return Workers(rank, world, local, backend, owned=False, device=dev)
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local, world)
    if world == 1:
        return Workers(device=dev)
    if not dist.is_available():
        raise JobInputError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=TIMEOUT)  # env:// rendezvous (torchrun sets it)
    return Workers(rank, world, local, backend, owned=True, device=dev)


def restarted() -> bool:
    """True in a worker torchrun restarted (``--max-restarts``): the job then resumes."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0
