"""``run()``: a job from its settings to ``results.safetensors`` and the report (docs/jobs.md).

1. every worker checks the settings, loads the model and its share of nothing yet but the inputs
   (all selected images: they are small next to the work), probes the model on one image and
   checks the output folder; the workers agree that all of this passed, or all refuse, before
   anything is written;
2. rank 0 sets up the folder: on a resume it verifies every chunk against its manifest entry and
   deletes the unfinished ones (a truncated or corrupt file, a file without entry), then writes
   ``job.json``;
3. worker r solves chunks r, r + W, ... that have no entry, writing each atomically; the
   workers other than rank 0 beat meanwhile (liveness.py);
4. rank 0 waits for every chunk's entry, giving up on a worker that stopped or fell silent
   (:class:`~dflow_fast.jobs.liveness.WorkerLost`), merges, writes the report.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from ..apps.provenance import provenance
from ..models import load_pretrained
from . import chunks as C
from . import report as R
from .config import RESULT_FIELDS, JobConfig, JobInputError, fingerprint, validate
from .dist import Workers, restarted, start
from .inputs import CLASSIFIER, check_task_fit, load_inputs, load_velocity, probe
from .liveness import Heartbeat, Watch, WorkerLost, interval_for, remove_beats
from .problems import Solver

log = logging.getLogger("dflow_fast.jobs")
#: seconds between rank 0's looks at the other workers' manifest entries
POLL = 0.2


def run(config: JobConfig | None = None, **settings) -> dict:
    """Run (or resume) a batch job; see :class:`JobConfig` for the settings, given as a config,
    as keywords (``run(task="sr4", data="fashion-mnist:test", indices="0:64", out="o")``) or
    both (keywords override). Under torchrun every worker calls it; the chunks are shared out.

    Returns the report (also ``out``/report.json) on rank 0; on the other workers
    ``{"rank", "computed", "kept"}``: the chunks this worker solved and found finished.
    Raises :class:`JobInputError` before any work for settings or inputs that do not fit, and
    on rank 0 :class:`~dflow_fast.jobs.liveness.WorkerLost` when another worker stops or falls
    silent with chunks unfinished (the finished ones are kept for ``resume``).
    """
    cfg = dataclasses.replace(config, **settings) if config is not None else JobConfig(**settings)
    validate(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # bitwise results need a fixed thread count
    workers = None
    try:
        workers = start(cfg.device)
        return _run(cfg, workers)
    except WorkerLost:
        workers.lost = True  # the group has a dead member: not torn down (Workers.close)
        raise
    finally:
        if workers is not None:
            workers.close()
        torch.set_num_threads(threads)


def _prepare(cfg: JobConfig, workers: Workers, out: Path, resume: bool):
    """Everything that reads and checks, nothing that writes: (Solver, fingerprint, job.json)."""
    dev, dt = workers.device, getattr(torch, cfg.dtype)
    velocity, shape = load_velocity(cfg.model, dev, dt)
    inputs = load_inputs(cfg.data, cfg.indices, shape)
    sample = tuple(inputs.images.shape[1:])
    check_task_fit(cfg.task, sample, f"--data {cfg.data}")
    classifier = None
    if cfg.task == "class":
        try:
            classifier = load_pretrained(CLASSIFIER, device=dev, dtype=dt)
        except FileNotFoundError as e:
            raise JobInputError(f"task class: {e}") from e
    solver = Solver(cfg, inputs.images, inputs.labels, inputs.start, velocity, classifier, dev, dt)
    probe(velocity, cfg.model, inputs.images[:1].to(dev, dt), solver.first_time())
    fp = fingerprint(cfg, inputs.digest, (inputs.start, inputs.stop))
    job = {"format": C.FORMAT, "fingerprint": fp, "config": cfg.as_dict(),
           "result_settings": {f: getattr(cfg, f) for f in RESULT_FIELDS},
           "sigma": cfg.noise_sigma,
           "inputs": {"data": cfg.data, "range": [inputs.start, inputs.stop],
                      "n": solver.n, "shape": list(sample), "digest": inputs.digest,
                      "labels": inputs.labels is not None, "files": inputs.names},
           "chunks": solver.chunks}
    _check_out(out, resume, job)
    return solver, fp, job


def _check_out(out: Path, resume: bool, job: dict) -> None:
    """Without resume the folder must be new or empty; with it, a folder of this same job."""
    if out.exists() and not out.is_dir():
        raise JobInputError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not resume:
        raise JobInputError(f"--out {out} is not empty: give --resume to continue the job "
                            "there, or an empty or new folder")
    try:
        old = json.loads((out / C.JOB).read_text())
    except (OSError, ValueError) as e:
        raise JobInputError(f"--resume: {out} holds no readable {C.JOB} ({e}); it is not a "
                            "dflow-fast run folder") from None
    if old.get("fingerprint") == job["fingerprint"]:
        return
    diff = [f"{f}: {old.get('result_settings', {}).get(f)!r} -> {job['result_settings'][f]!r}"
            for f in RESULT_FIELDS
            if old.get("result_settings", {}).get(f) != job["result_settings"][f]]
    o_in, n_in = old.get("inputs", {}), job["inputs"]
    if o_in.get("range") != n_in["range"]:
        diff.append(f"indices: {o_in.get('range')} -> {n_in['range']}")
    if o_in.get("digest") != n_in["digest"]:
        diff.append("the input images differ")
    raise JobInputError(f"--resume: {out} holds another job ({'; '.join(diff) or 'settings'}); "
                        "rerun with its settings, or use another folder")


def _set_up(out: Path, solver: Solver, fp: str, job: dict, workers: Workers, resume: bool
            ) -> list[int]:
    """Rank 0, alone: the folder, the resume check of every chunk, job.json. Returns the
    finished chunks."""
    (out / C.CHUNKS).mkdir(parents=True, exist_ok=True)
    C.remove_temporaries(out)
    remove_beats(out)  # an earlier run's "done" or "stopped" must not speak for this one
    kept = []
    if resume:
        for k in range(solver.chunks):
            entry, why = C.check_chunk(out, k, fp)
            if entry is not None:
                kept.append(k)
            elif why != "missing":
                log.warning("chunk %d: %s; it will be recomputed", k, why)
                C.entry_path(out, k).unlink(missing_ok=True)
                C.chunk_path(out, k).unlink(missing_ok=True)
        log.info("resuming %s: %d of %d chunks finished", out, len(kept), solver.chunks)
    old = {}
    if (out / C.JOB).exists():
        old = json.loads((out / C.JOB).read_text())
    dev = {"device": str(workers.device), "threads": solver.cfg.threads, "world": workers.world}
    runs = old.get("runs", []) + [dev]
    if old.get("runs") and any(r["device"] != dev["device"] or r["threads"] != dev["threads"]
                               for r in old["runs"]):
        log.warning("the chunks of %s were computed on other devices or thread counts: results "
                    "are not bitwise those of one uninterrupted run", out)
    C.write_json(out / C.JOB, {**job, "runs": runs, "provenance": provenance(workers.device)})
    return kept


def _run(cfg: JobConfig, workers: Workers) -> dict:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    resume = cfg.resume or restarted()
    prepared, error = None, None
    try:
        prepared = _prepare(cfg, workers, out, resume)
    except Exception as e:  # any refusal on any worker: all refuse, none writes
        error = e
    if not workers.agree(error is None):
        if error is not None:
            raise error
        raise JobInputError("another worker refused the job (its message names the reason); "
                            "nothing was written")
    solver, fp, job = prepared
    kept = _set_up(out, solver, fp, job, workers, resume) if workers.rank == 0 else []
    workers.barrier()  # nobody writes a chunk before the folder is set up
    t_chunks = time.perf_counter()

    # rank 0 tracks every chunk (the bar, the merge); the others only their own
    done: dict[int, dict] = {k: C.read_entry(out, k) for k in kept}
    bar = _bar(cfg, workers, solver, kept)
    look = workers.rank == 0 and workers.world > 1
    if workers.rank != 0:
        with Heartbeat(out, workers.rank, interval_for(cfg.worker_timeout)):
            computed = _solve_own(cfg, workers, solver, out, fp, done, bar, look)
        return {"rank": workers.rank, "computed": computed,
                "kept": sorted(set(done) - set(computed))}
    watch = Watch(out, workers.world, cfg.worker_timeout)
    _solve_own(cfg, workers, solver, out, fp, done, bar, look)
    while len(done) < solver.chunks:  # the other workers' chunks, by their manifest entries
        time.sleep(POLL)
        _refresh(bar, out, fp, solver.chunks, done, True)
        watch.check(_pending(solver.chunks, workers.world, done))
    if bar is not None:
        bar.close()
    now = time.perf_counter()
    return _finish(cfg, workers, solver, fp, job, [done[k] for k in range(solver.chunks)],
                   computed_here=len(set(range(solver.chunks)) - set(kept)),
                   kept=len(kept), wall=now - t_start, chunks_wall=now - t_chunks)


def _solve_own(cfg: JobConfig, workers: Workers, solver: Solver, out: Path, fp: str,
               done: dict[int, dict], bar, look: bool) -> list[int]:
    """This worker's chunks r, r + W, ... that have no entry yet; returns those it computed."""
    computed = []
    for k in range(workers.rank, solver.chunks, workers.world):
        entry = C.read_entry(out, k)
        if entry is not None and entry.get("fingerprint") == fp:  # verified by rank 0 above
            done[k] = entry
            continue
        tensors, info = solver.solve_chunk(k)
        loss = tensors["loss"].double()
        finite = torch.isfinite(loss)
        done[k] = C.write_chunk(out, k, tensors, fp, {
            **info, "problems": [int(tensors["index"][0]), int(tensors["index"][-1]) + 1],
            "loss_sum": float(loss[finite].sum()), "finite": int(finite.sum()),
            "velocity_evaluations": int(tensors["nfe"].sum()), "rank": workers.rank,
            "world": workers.world, "device": str(workers.device), "threads": cfg.threads})
        computed.append(k)
        _refresh(bar, out, fp, solver.chunks, done, look)
    return computed


def _pending(n_chunks: int, world: int, done: dict) -> dict[int, list[int]]:
    """rank -> its chunks without an entry yet."""
    return {r: [k for k in range(r, n_chunks, world) if k not in done] for r in range(world)}


def _bar(cfg: JobConfig, workers: Workers, solver: Solver, kept: list[int]):
    if not cfg.progress or workers.rank != 0:
        return None
    from tqdm.auto import tqdm
    initial = sum(len(solver.chunk_rows(k)) for k in kept)
    return tqdm(total=solver.n, initial=initial, desc="dflow-fast run", unit="problem")


def _refresh(bar, out: Path, fp: str, n_chunks: int, done: dict, look: bool) -> None:
    """Pick up the other workers' new manifest entries (``look``); show finished problems and
    their mean loss."""
    if look:
        for k in range(n_chunks):
            if k not in done:
                e = C.read_entry(out, k)
                if e is not None and e.get("fingerprint") == fp:
                    done[k] = e
    if bar is None:
        return
    n = sum(e["problems"][1] - e["problems"][0] for e in done.values())
    finite = sum(e["finite"] for e in done.values())
    loss = sum(e["loss_sum"] for e in done.values()) / finite if finite else float("nan")
    bar.update(n - bar.n)
    bar.set_postfix(loss=f"{loss:.4g}")


def _finish(cfg: JobConfig, workers: Workers, solver: Solver, fp: str, job: dict,
            entries: list[dict], *, computed_here: int, kept: int, wall: float,
            chunks_wall: float) -> dict:
    """Rank 0: merge the chunks, then report.json, report.md and the grids. ``wall``: seconds
    from the input checks to the last chunk; ``chunks_wall``: from the folder's set-up to the
    last chunk (the part that scales with the workers)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    index = torch.arange(solver.start, solver.start + solver.n, dtype=torch.int64)
    sha, size = C.merge(out, entries, fp, index)
    results, _ = C.load_results(out)
    compute = sum(e["seconds"] for e in entries)
    report = {
        "format": C.FORMAT, "config": cfg.as_dict(), "sigma": cfg.noise_sigma,
        "fingerprint": fp, "inputs": job["inputs"] | {"files": None},
        "provenance": provenance(workers.device),
        "workers": {"world": workers.world, "backend": workers.backend},
        "chunks": {"total": solver.chunks, "computed": computed_here, "kept": kept,
                   "manifest": f"{C.CHUNKS}/{C.MANIFEST}"},
        "results": {"file": C.RESULTS, "sha256": sha, "bytes": size},
        "quality": R.quality(cfg.task, results, solver.truth, solver.classifier),
        "summary": R.summary(results),
        "seconds": {"wall": wall, "chunks_wall": chunks_wall, "compute": compute,
                    "write_chunks": sum(e.get("write_seconds", 0.0) for e in entries),
                    "problems_per_hour_wall": R.problems_per_hour(solver.n, wall)},
        "velocity_calls": sum(e["velocity_calls"] for e in entries),
        "grids": R.save_grids(out, solver.truth, results),
    }
    report["seconds"]["merge_and_report"] = time.perf_counter() - t0
    R.write(out, report)
    return report
