"""Rank 0 does not wait forever for a lost worker: the beat files, the watch on a fake clock, and
two hand-launched gloo workers (no torchrun agent to stop the group) of which one dies mid-chunk:
rank 0 exits with a message naming it and its chunks, the finished chunks stay, and a resume with
one worker completes the job with the uninterrupted job's results."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from dflow_fast import jobs
from dflow_fast.jobs.liveness import (DONE, RUNNING, STOPPED, Heartbeat, Watch, WorkerLost,
                                      beat_path, interval_for, read_beat)

from .helpers import GATED_MODEL, PYTHON, ROOT, TINY, TINY_ARGS, same_results, subprocess_env


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def out(tmp_path):
    (tmp_path / "chunks").mkdir()
    return tmp_path


def test_heartbeat_states_and_beats(out):
    with Heartbeat(out, 1, interval=0.01) as hb:
        assert read_beat(out, 1)["state"] == RUNNING
        deadline = time.monotonic() + 30
        while read_beat(out, 1)["beat"] < 4:  # the thread beats on its own
            assert time.monotonic() < deadline
            time.sleep(0.01)
    beat = read_beat(out, 1)
    assert beat["state"] == DONE and beat["beat"] == hb.count and beat["rank"] == 1
    with pytest.raises(KeyError):
        with Heartbeat(out, 2, interval=10.0):
            raise KeyError("a chunk failed")
    assert read_beat(out, 2)["state"] == STOPPED
    assert not list((out / "chunks").glob(".*tmp*"))  # every beat renamed into place


def test_watch_gives_up_after_the_timeout_of_silence_only(out):
    clock = Clock()
    watch = Watch(out, world=3, timeout=5.0, clock=clock)
    hb = Heartbeat(out, 1, interval=1.0)
    hb.write(RUNNING)
    pending = {0: [], 1: [1, 4], 2: []}  # worker 2 is finished: never checked
    for _ in range(10):  # beating: never given up, however long it takes
        clock.now += 4.0
        hb.write(RUNNING)
        watch.check(pending)
    clock.now += 5.0
    watch.check(pending)  # silent for exactly the timeout: still waiting
    clock.now += 0.5
    with pytest.raises(WorkerLost, match=r"worker 1 .*has not beaten in 6 s.*chunks \[1, 4\]"
                                         r".*--resume"):
        watch.check(pending)


def test_watch_gives_up_on_a_worker_never_heard_from(out):
    clock = Clock()
    watch = Watch(out, world=2, timeout=5.0, clock=clock)
    clock.now += 4.0
    watch.check({1: [1]})
    clock.now += 2.0
    with pytest.raises(WorkerLost, match=r"worker 1 has not beaten \(worker_timeout 5 s.*"
                                         r"OUT is not on a file system its node shares"):
        watch.check({1: [1]})


def test_watch_gives_up_on_a_stopped_worker_at_once(out):
    watch = Watch(out, world=2, timeout=1e9, clock=Clock())
    with pytest.raises(ZeroDivisionError):
        with Heartbeat(out, 1, interval=10.0):
            1 / 0
    with pytest.raises(WorkerLost, match=r"worker 1 \(host .*\) stopped with an error before "
                                         r"finishing chunks \[3\]"):
        watch.check({1: [3]})
    watch.check({1: []})  # all its chunks finished before it stopped: nothing lost


def test_a_lost_group_is_not_torn_down(monkeypatch):
    """Destroying an NCCL communicator whose peer died can hang: a job that lost a worker leaves
    its process group to process exit; an intact one is destroyed as before."""
    import torch.distributed as dist

    from dflow_fast.jobs.dist import Workers
    destroyed = []
    monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(1))
    Workers(rank=0, world=2, backend="nccl", owned=True, lost=True).close()
    assert destroyed == []
    Workers(rank=0, world=2, backend="nccl", owned=True).close()
    assert destroyed == [1]


def test_beat_interval_follows_the_timeout():
    assert interval_for(300.0) == 10.0 and interval_for(2.0) == 0.2


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "5", True])
def test_bad_worker_timeout_is_refused(tmp_path, bad):
    with pytest.raises(jobs.JobInputError, match="worker_timeout"):
        jobs.run(data="fashion-mnist:test", indices="0:2", out=str(tmp_path / "o"),
                 worker_timeout=bad, **TINY)
    assert not (tmp_path / "o").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank0_exits_when_a_hand_launched_worker_dies_and_resume_completes(tmp_path):
    """Workers started by hand (RANK/WORLD_SIZE/MASTER_* set, no torchrun agent): worker 1 dies
    at its 5th velocity call, inside its first chunk (chunk 1). Rank 0 finishes chunks 0 and 2,
    then gives up on worker 1 after worker_timeout instead of waiting forever."""
    pytest.importorskip("safetensors")
    out = tmp_path / "job"
    cmd = [PYTHON, "-m", "dflow_fast", "run", "--data", "fashion-mnist:test", "--indices",
           "20:26", "--model", GATED_MODEL, "--out", str(out), "--worker-timeout", "2",
           *TINY_ARGS]
    dist = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True,
                              env=subprocess_env(RANK=str(r), LOCAL_RANK=str(r), **dist,
                                                 **({"DFLOW_FAST_TEST_EXIT_AFTER": "5"}
                                                    if r == 1 else {})))
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 3, errs[1][-3000:]  # the model's os._exit
    assert procs[0].returncode == 1, errs[0][-3000:]
    assert "worker 1" in errs[0] and "chunks [1]" in errs[0] and "--resume" in errs[0]
    finished = sorted(p.name for p in (out / "chunks").glob("chunk-*.json"))
    assert finished == ["chunk-00000.json", "chunk-00002.json"]
    assert json.loads(beat_path(out, 1).read_text())["state"] == RUNNING  # killed mid-beat
    assert not (out / "results.safetensors").exists()

    report = jobs.run(data="fashion-mnist:test", indices="20:26", model=GATED_MODEL,
                      out=str(out), resume=True, **TINY)
    assert (report["chunks"]["kept"], report["chunks"]["computed"]) == (2, 1)
    assert not beat_path(out, 1).exists()  # the resume cleared the lost run's beats
    ref = tmp_path / "ref"
    jobs.run(data="fashion-mnist:test", indices="20:26", out=str(ref), **TINY)
    same_results(ref, out)
