"""Rank 0's watch over the other workers while it waits for their chunks.

Rank 0 waits for the other workers' chunks by looking at the folder, not in a collective
(runner.py). Under torchrun a worker that dies stops the group, but in a group started some
other way (a launcher that sets ``RANK``/``WORLD_SIZE`` itself, a caller's own process group)
nobody would stop rank 0: it would wait forever for chunks that never come. So every other
worker beats: a daemon thread rewrites ``OUT/chunks/worker-R.beat`` (a counter and a state) every
``interval`` seconds while the worker runs, and the worker marks it ``stopped`` when its chunk
loop raises, ``done`` when it finishes. Rank 0 raises :class:`WorkerLost` as soon as a worker with
unfinished chunks is ``stopped``, or when its counter has not changed for ``timeout`` seconds
(killed, or its node lost).

Rank 0 compares counters on its own monotonic clock, never file times: the nodes' clocks need
not agree. A beat is ``chunks.atomic_write`` without its fsyncs: it needs to be seen, not to
survive a power cut. The beat thread runs between the worker's torch calls (they release the GIL), so a
long chunk still beats.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .chunks import CHUNKS, atomic_write

#: a worker's state in its beat file
RUNNING, DONE, STOPPED = "running", "done", "stopped"


class WorkerLost(RuntimeError):
    """Rank 0 gave up waiting: a worker stopped or stopped beating with chunks unfinished. The
    finished chunks are on disk; ``--resume`` (with any number of workers) computes the rest."""


def beat_path(out: Path, rank: int) -> Path:
    return Path(out) / CHUNKS / f"worker-{rank}.beat"


def remove_beats(out: Path) -> None:
    """Delete the beat files of earlier runs (rank 0, at set-up, before any worker beats)."""
    folder = Path(out) / CHUNKS
    if folder.is_dir():
        for p in folder.glob("worker-*.beat"):
            p.unlink(missing_ok=True)


def interval_for(timeout: float) -> float:
    """Seconds between beats: a tenth of the timeout, at most 10 s."""
    return min(10.0, timeout / 10.0)


class Heartbeat:
    """A worker's beat (use as a context manager around its chunk loop): ``running`` every
    ``interval`` seconds, then ``done``, or ``stopped`` when the loop raised."""

    def __init__(self, out: Path, rank: int, interval: float):
        self.path, self.rank, self.interval = beat_path(out, rank), rank, interval
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"dflow-fast beat {rank}",
                                        daemon=True)

    def write(self, state: str) -> None:
        self.count += 1
        body = json.dumps({"rank": self.rank, "beat": self.count, "state": state,
                           "host": socket.gethostname(), "pid": os.getpid()})
        atomic_write(self.path, body.encode(), durable=False)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write(RUNNING)
            except OSError:  # a full or flaky file system: try again at the next beat
                pass

    def __enter__(self) -> "Heartbeat":
        self.write(RUNNING)
        self._thread.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.write(DONE if kind is None else STOPPED)
        except OSError:  # neither hide the loop's error nor fail finished work over a beat:
            pass         # rank 0 sees the entries, or gives up after the timeout


def read_beat(out: Path, rank: int) -> Optional[dict]:
    """The worker's last beat, or None (none yet, or caught mid-rename on a file system without
    atomic rename)."""
    try:
        beat = json.loads(beat_path(out, rank).read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


class Watch:
    """Rank 0's view of the other workers' beats. ``timeout``: seconds without a new beat after
    which a worker with unfinished chunks is given up (counted from the watch's creation for a
    worker not seen yet). ``clock``: seconds, monotonic (a test's fake clock)."""

    def __init__(self, out: Path, world: int, timeout: float,
                 clock: Callable[[], float] = time.monotonic):
        self.out, self.timeout, self.clock = Path(out), timeout, clock
        now = clock()
        self._seen: dict[int, tuple[Optional[int], float]] = {r: (None, now)
                                                             for r in range(1, world)}

    def check(self, pending: dict[int, list[int]]) -> None:
        """``pending``: rank -> its unfinished chunks. Raises :class:`WorkerLost` naming the
        worker and its chunks when one is ``stopped`` or silent for ``timeout`` seconds."""
        now = self.clock()
        for rank, chunks in sorted(pending.items()):
            if not chunks or rank == 0:
                continue
            beat = read_beat(self.out, rank)
            count = beat.get("beat") if beat else None
            last_count, last_change = self._seen[rank]
            if count != last_count:
                self._seen[rank] = (count, now)
                last_change = now
            where = (f" (host {beat.get('host')}, pid {beat.get('pid')})" if beat else "")
            if beat and beat.get("state") == STOPPED:
                raise WorkerLost(f"worker {rank}{where} stopped with an error before finishing "
                                 f"chunks {chunks} (its own output names the error). "
                                 + _resume_hint(self.out))
            if now - last_change > self.timeout:
                heard = ("has not beaten" if beat is None
                         else f"has not beaten in {now - last_change:.0f} s")
                why = ("it died before its first beat, or OUT is not on a file system its node "
                       "shares with rank 0's" if beat is None
                       else "it was killed or its node was lost")
                raise WorkerLost(f"worker {rank}{where} {heard} (worker_timeout "
                                 f"{self.timeout:g} s; its beat file "
                                 f"{beat_path(self.out, rank)}) and chunks {chunks} are "
                                 f"unfinished: {why}. " + _resume_hint(self.out))


def _resume_hint(out: Path) -> str:
    return (f"The finished chunks in {out} are kept: rerun the same command with --resume, with "
            f"any number of workers, to compute the rest.")
