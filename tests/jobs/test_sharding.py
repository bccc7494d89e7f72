"""Results do not depend on the number of workers or on a kill: 1 worker and 2 torchrun workers
(gloo) agree bitwise; a job killed with SIGKILL and resumed equals an uninterrupted one and does
not recompute a finished chunk (issue 14, item 5)."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from dflow_fast import jobs

from .helpers import (GATED_MODEL, PYTHON, ROOT, TINY, TINY_ARGS, chunk_stats, same_results,
                      subprocess_env)

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted in-process run: 6 problems in 3 chunks."""
    out = tmp_path_factory.mktemp("ref") / "job"
    jobs.run(data="fashion-mnist:test", indices="20:26", out=str(out), **TINY)
    return out


def test_two_torchrun_workers_equal_one_worker(reference, tmp_path):
    out = tmp_path / "job"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dflow_fast", "run", "--data", "fashion-mnist:test", "--indices", "20:26",
           "--out", str(out), *TINY_ARGS]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    same_results(reference, out)
    # and the files themselves, byte for byte: results and every chunk
    for name in ["results.safetensors", *(f"chunks/chunk-{k:05d}.safetensors" for k in range(3))]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    ranks = {json.loads((out / "chunks" / f"chunk-{k:05d}.json").read_text())["rank"]
             for k in range(3)}
    assert ranks == {0, 1}  # both workers solved chunks (r, r + 2, ...)
    report = json.loads((out / "report.json").read_text())
    assert report["workers"] == {"world": 2, "backend": "gloo"}
    assert report["chunks"]["computed"] == 3


def test_sigkill_then_resume_equals_uninterrupted_and_keeps_finished_chunks(reference,
                                                                           tmp_path):
    """Killed after its first chunk (a user model that blocks on a file holds it there), then
    resumed: the finished chunk's file is not rewritten, the rest are computed, and the results
    equal the uninterrupted run (of the bundled model: the user model is the same network)."""
    out, gate = tmp_path / "job", tmp_path / "gate"
    args = dict(data="fashion-mnist:test", indices="20:26", model=GATED_MODEL, **TINY)
    cmd = [PYTHON, "-m", "dflow_fast", "run", "--data", "fashion-mnist:test", "--indices",
           "20:26", "--model", GATED_MODEL, "--out", str(out), *TINY_ARGS]
    p = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(DFLOW_FAST_TEST_GATE=str(gate)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "chunks").glob("chunk-*.json")):
            assert p.poll() is None, p.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job did not finish a chunk in time"
            time.sleep(0.02)
        gate.touch()  # the job blocks at its next velocity call, mid-chunk
        time.sleep(0.5)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()
        p.stderr.close()
    gate.unlink()
    assert p.returncode == -signal.SIGKILL
    finished = sorted(int(e.stem[6:]) for e in (out / "chunks").glob("chunk-*.json"))
    assert 1 <= len(finished) < 3 and not (out / "results.safetensors").exists()
    before = {name: s for name, s in chunk_stats(out).items() if int(name[6:11]) in finished}

    with pytest.raises(jobs.JobInputError, match="not empty"):  # no --resume: refused
        jobs.run(out=str(out), **args)
    report = jobs.run(out=str(out), resume=True, **args)
    after = chunk_stats(out)
    assert {name: after[name] for name in before} == before  # not rewritten
    assert report["chunks"] == {**report["chunks"], "total": 3, "kept": len(finished),
                                "computed": 3 - len(finished)}
    same_results(reference, out)
