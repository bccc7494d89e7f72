"""``dflow-fast molecules --resume``: every batch is a chunk on disk as soon as it is solved; a
killed run resumes with only the unfinished batches computed and ends bitwise where an
uninterrupted run does; other settings, a missing --resume and corrupt chunks are handled before
or instead of reusing anything. 4 QM9 test targets in 2 batches, tiny random EGNNs (the
``tiny`` fixture of test_app.py). Needs qm9pack and RDKit (skips without them unless
DFLOW_FAST_REQUIRE_DATA=1)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from dflow_fast.apps import molecules as app
from dflow_fast.apps import molecules_chunks as MC
from dflow_fast.apps.cli import main
from dflow_fast.jobs import chunks as C

from .test_app import _needs_data, tiny  # noqa: F401  (tiny: the shared checkpoint fixture)

N, BATCH = 4, 2


def _options(tiny, **changes):  # noqa: F811
    opts = dict(target="alpha", n=N, batch=BATCH, max_iter=2, steps=2, flow=tiny["flow"],
                guide=tiny["guide"], evaluator=tiny["eval"], lbound_n=3)
    return {**opts, **changes}


def _counting(monkeypatch, fail_on=None):
    """Count MC's optimize calls; raise (a kill) on call number ``fail_on``."""
    calls = []
    real = MC.optimize

    def wrapped(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == fail_on:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(MC, "optimize", wrapped)
    return calls


def _chunks(out):
    return [C.read_chunk(out, k, C.read_entry(out, k)) for k in range(N // BATCH)]


def _same_results(a, b, ra, rb):
    for ca, cb in zip(_chunks(a), _chunks(b)):
        assert set(ca) == set(MC.KEYS)
        for key in MC.KEYS:
            assert torch.equal(ca[key], cb[key]), key
    assert ra["mae"] == rb["mae"]
    assert ra["status_counts"] == rb["status_counts"]
    for ma, mb in zip(ra["molecules"], rb["molecules"]):
        for key in ("status", "nit", "nfe", "guide_alpha", "eval_alpha", "valid"):
            assert ma[key] == mb[key], key
    for i in range(N):
        assert (a / "xyz" / f"{i:04d}.xyz").read_text() == (b / "xyz" / f"{i:04d}.xyz").read_text()


@pytest.fixture(scope="module")
def full(tiny, tmp_path_factory):  # noqa: F811
    """(a) the uninterrupted run: (out, report)."""
    _needs_data()
    out = tmp_path_factory.mktemp("full") / "run"
    return out, app.run(out=out, **_options(tiny))


def test_uninterrupted_run_writes_a_verified_chunk_per_batch(full):
    out, r = full
    job = json.loads((out / C.JOB).read_text())
    assert job["kind"] == MC.KIND and job["batches"] == N // BATCH == r["chunks"]["batches"]
    assert r["chunks"]["resumed"] == 0 and r["chunks"]["computed"] == N // BATCH
    rows, secs, evals = [], 0.0, 0
    for k in range(N // BATCH):
        entry, why = C.check_chunk(out, k, job["fingerprint"])
        assert entry is not None, why
        t = C.read_chunk(out, k, entry)
        rows += t["index"].tolist()
        assert t["x1"].shape == (BATCH, entry["atoms"], 3 + 5) == t["x1_unconditional"].shape
        secs += entry["seconds"]["dflow"]
        evals += entry["velocity_evaluations"]["dflow"]
        for j, i in enumerate(t["index"].tolist()):
            assert r["molecules"][i]["nfe"] == int(t["nfe"][j])
    assert sorted(rows) == list(range(N))  # every molecule in exactly one chunk
    assert r["seconds"]["dflow"] == pytest.approx(secs)
    assert r["velocity_evaluations"]["dflow"] == evals > 0


def test_killed_run_resumes_only_the_unfinished_batch_bitwise(full, tiny, tmp_path,  # noqa: F811
                                                              monkeypatch):
    ref_out, ref = full
    out = tmp_path / "run"
    calls = _counting(monkeypatch, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        app.run(out=out, **_options(tiny))
    assert len(calls) == 2
    first = C.chunk_path(out, 0).stat()
    assert C.check_chunk(out, 0, json.loads((out / C.JOB).read_text())["fingerprint"])[0]
    assert not C.chunk_path(out, 1).exists() and not (out / "report.json").exists()

    calls = _counting(monkeypatch)
    r = app.run(out=out, resume=True, **_options(tiny))
    assert calls == [BATCH]  # only the second batch was solved
    again = C.chunk_path(out, 0).stat()
    assert (again.st_ino, again.st_mtime_ns, again.st_size) == (first.st_ino, first.st_mtime_ns,
                                                                first.st_size)
    assert r["chunks"]["resumed"] == 1 and r["chunks"]["computed"] == 1
    # seconds summed over both chunks, the loaded one's included
    entries = [C.read_entry(out, k) for k in range(N // BATCH)]
    assert r["seconds"]["dflow"] == pytest.approx(sum(e["seconds"]["dflow"] for e in entries))
    assert r["velocity_evaluations"] == ref["velocity_evaluations"]
    assert "--resume" in r["command"]
    _same_results(ref_out, out, ref, r)


def test_resume_with_other_settings_is_refused_naming_them(full, tiny, capsys):  # noqa: F811
    out, _ = full
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError, match=r"max-iter: 2 -> 3"):
        app.run(out=out, resume=True, **_options(tiny, max_iter=3))
    argv = ["molecules", "--target", "alpha", "--n", str(N), "--batch", str(BATCH),
            "--max-iter", "2", "--steps", "2", "--out", str(out), "--flow", str(tiny["flow"]),
            "--guide", str(tiny["guide"]), "--eval", str(tiny["eval"]), "--lbound-n", "3"]
    # without --resume: refused, exit 2, the message says what to do
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "give --resume" in err and "another" in err
    # another guide checkpoint is another run, named by file
    swapped = [str(tiny["eval"]) if a == str(tiny["guide"]) else a for a in argv]
    assert main(swapped + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "guide: guide.safetensors" in err and "-> eval.safetensors" in err
    assert "max-iter" not in err  # only what differs is named
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written


def test_corrupt_chunk_is_recomputed(full, tiny, tmp_path, monkeypatch):  # noqa: F811
    ref_out, ref = full
    out = tmp_path / "run"
    app.run(out=out, **_options(tiny))
    data = bytearray(C.chunk_path(out, 1).read_bytes())
    data[-8] ^= 0xFF  # one flipped byte in the tensors
    C.chunk_path(out, 1).write_bytes(bytes(data))
    (out / C.CHUNKS / ".chunk-00000.safetensors.tmp-host-1").write_bytes(b"half")  # a killed writer
    calls = _counting(monkeypatch)
    logs = []
    r = app.run(out=out, resume=True, log=logs.append, **_options(tiny))
    assert len(calls) == 1 and r["chunks"]["resumed"] == 1
    assert any("checksum mismatch" in line for line in logs)
    assert not list((out / C.CHUNKS).glob(".*.tmp-*"))
    _same_results(ref_out, out, ref, r)


def test_bench_resumes_its_folder_by_default(full, tiny, tmp_path, monkeypatch):  # noqa: F811
    from bench.bench_qm9_alpha import main as bench_main

    ref_out, ref = full
    out = tmp_path / "mols"
    shutil.copytree(ref_out, out)
    argv = ["--n", str(N), "--batch", str(BATCH), "--max-iter", "2", "--steps", "2",
            "--flow", str(tiny["flow"]), "--guide", str(tiny["guide"]), "--eval",
            str(tiny["eval"]), "--lbound-n", "3", "--json", str(tmp_path / "q.json"),
            "--out", str(out)]
    with pytest.raises(ValueError, match="give --resume"):
        bench_main(argv + ["--no-resume"])
    calls = _counting(monkeypatch)
    doc = bench_main(argv)
    assert calls == [] and doc["chunks"]["resumed"] == N // BATCH
    assert doc["mae"] == ref["mae"] and doc["status_counts"] == ref["status_counts"]
    assert doc["velocity_evaluations"] == ref["velocity_evaluations"]


def test_a_batch_does_not_depend_on_what_the_process_solved_before(tiny, tmp_path):  # noqa: F811
    """gradient="auto" caches a memory measurement (whose evaluations count in nfe) on the
    velocity object: each batch gets a fresh one, so a batch solved after others with the same
    models (as in a resumed run) has the same evaluation counts and results."""
    _needs_data()
    s = app.Settings(out=tmp_path / "a", **_options(tiny, gradient="auto"))
    setup = app.prepare(s)
    ra = app.generate(s, setup)
    rb = app.generate(dataclasses.replace(s, out=tmp_path / "b"), setup)  # the same models
    assert ra["velocity_evaluations"] == rb["velocity_evaluations"]
    _same_results(tmp_path / "a", tmp_path / "b", ra, rb)
