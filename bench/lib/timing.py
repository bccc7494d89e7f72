"""Wall (or CPU) times of calls after warm-up: one function (:func:`time_cpu`, :func:`time_cuda`)
or several round-robin (:func:`time_interleaved`), and their :func:`median`."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from .memory import guard_oom


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
