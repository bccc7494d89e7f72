"""``dflow-fast molecules`` in chunks: every batch is written to ``OUT/chunks/`` as soon as it is
solved, so a killed run continues with ``--resume`` where it stopped (docs/molecules.md, "Long
runs"). The store is the batch jobs' (:mod:`dflow_fast.jobs.chunks`: atomic tmp -> fsync ->
rename writes, a manifest entry with the chunk file's SHA-256, a fingerprint of the settings);
this module says what a molecule batch's chunk holds and when a folder may be resumed.

Layout of ``OUT`` (beside the xyz/, molecules.sdf and report files the end of the run writes)::

    job.json                          kind, fingerprint, the settings it covers, runs, provenance
    chunks/chunk-KKKKK.safetensors    batch k: KEYS below (rows of the batch, cut to its M atoms)
    chunks/chunk-KKKKK.json           its entry: SHA-256, bytes, atoms, seconds, evaluations, ...

Batch k is always the same molecules (``order[k*batch:(k+1)*batch]``, the targets sorted by atom
count) and every molecule's noise comes from one draw of ``--seed`` for all n, so a batch computed
in a resumed run is bitwise the one an uninterrupted run computes (same machine, threads and
software).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..jobs import chunks as C
from ..optimize import optimize
from ..solve import solve
from ..tasks.molecules import molecule_problem
from .provenance import provenance

KIND = "dflow_fast.molecules/1"
#: the settings that change a batch's numbers; with the flow's and the guide's checkpoint
#: SHA-256, the device type and the flow's dtype they make the fingerprint. Not in it: the
#: evaluation checkpoint, --validity and --lbound-n (they score the chunks, rerun every time).
RESULT_FIELDS = ("target", "n", "steps", "solver", "max_iter", "gradient", "prior_weight",
                 "batch", "seed")
#: tensors of a molecule chunk: ``index`` int64 [b] (rows of the run, i.e. test molecules),
#: ``x1`` / ``x1_unconditional`` float32 [b, M, 3 + K], ``status`` uint8 [b] (index into
#: jobs.problems.STATUS_NAMES), ``nit`` / ``nfe`` int64 [b], ``guide_alpha`` /
#: ``guide_alpha_start`` float64 [b] (the guide on the states after / before D-Flow)
KEYS = ("index", "x1", "x1_unconditional", "status", "nit", "nfe", "guide_alpha",
        "guide_alpha_start")


def job_record(s, models: dict, device: torch.device) -> dict:
    """``job.json``'s content for settings ``s`` (:class:`~.molecules.Settings`) and the loaded
    ``models`` ({role: (module, file)}): the fingerprint and what it covers."""
    flow = models["flow"][0]
    covered = {f: getattr(s, f) for f in RESULT_FIELDS}
    covered["prior_weight"] = float(s.prior_weight)  # 1 and 1.0 are the same run
    for role in ("flow", "guide"):
        path = Path(models[role][1])
        covered[role] = {"file": path.name, "sha256": C.sha256_file(path)}
    covered["device_type"] = device.type
    covered["dtype"] = str(next(flow.parameters()).dtype)
    fp = hashlib.sha256(json.dumps(covered, sort_keys=True).encode()).hexdigest()
    return {"format": C.FORMAT, "kind": KIND, "fingerprint": fp, "result_settings": covered,
            "batches": -(-s.n // s.batch)}


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds (part of) a chunked run: its job.json or any chunk file."""
    chunks = Path(out) / C.CHUNKS
    return (Path(out) / C.JOB).exists() or (chunks.is_dir() and any(chunks.iterdir()))


def check_out(out: Path, resume: bool, job: dict) -> None:
    """Refuse (ValueError naming the problem, before any work) a folder holding another run's
    chunks without ``resume``, or with ``resume`` a run of other settings (naming them). Other
    files (an older run's xyz/ and reports) are overwritten at the end, as before chunks."""
    out = Path(out)
    if not holds_run(out):
        return
    if not resume:
        raise ValueError(f"--out {out} holds the chunks of an earlier run: give --resume to "
                         "continue it, or choose another (new or empty) --out")
    try:
        old = json.loads((out / C.JOB).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: {out} holds chunks but no readable {C.JOB} ({e}); it is "
                         "not a dflow-fast molecules run folder: choose another --out") from None
    if old.get("kind") != KIND:
        raise ValueError(f"--resume: {out}/{C.JOB} is not a dflow-fast molecules run "
                         f"({old.get('kind', 'a dflow-fast run job')!r}): choose another --out")
    if old.get("fingerprint") == job["fingerprint"]:
        return
    was, now = old.get("result_settings", {}), job["result_settings"]
    diff = [f"{k.replace('_', '-')}: {_shown(was.get(k))} -> {_shown(now[k])}"
            for k in now if was.get(k) != now[k]]
    raise ValueError(f"--resume: {out} holds a run with other settings "
                     f"({'; '.join(diff) or 'settings'}); rerun with its settings, or choose "
                     "another --out")


def _shown(v) -> str:
    if isinstance(v, dict) and "sha256" in v:  # a checkpoint
        return f"{v['file']} (sha256 {str(v['sha256'])[:12]})"
    return repr(v)


def set_up(out: Path, job: dict, resume: bool, device: torch.device,
           log: Callable[[str], None]) -> list[int]:
    """Create ``out/chunks``, remove killed writers' temporary files, verify every chunk on a
    resume (an unfinished, truncated or corrupt one is deleted and will be recomputed), write
    job.json. Returns the finished batches."""
    out = Path(out)
    (out / C.CHUNKS).mkdir(parents=True, exist_ok=True)
    C.remove_temporaries(out)
    fp, kept = job["fingerprint"], []
    if resume:
        for k in range(job["batches"]):
            entry, why = C.check_chunk(out, k, fp)
            if entry is not None:
                kept.append(k)
            elif why != "missing":
                log(f"batch {k + 1}: chunk {why}; it will be recomputed")
                C.entry_path(out, k).unlink(missing_ok=True)
                C.chunk_path(out, k).unlink(missing_ok=True)
        log(f"resuming {out}: {len(kept)} of {job['batches']} batches finished")
    old = json.loads((out / C.JOB).read_text()) if (out / C.JOB).exists() else {}
    run = {"device": str(device), "threads": torch.get_num_threads()}
    runs = old.get("runs", []) + [run]
    if any(r != run for r in runs):
        log("warning: the chunks were computed on other devices or thread counts: results are "
            "not bitwise those of one uninterrupted run")
    C.write_json(out / C.JOB, {**job, "runs": runs, "provenance": provenance(device)})
    return kept


def solve_batch(s, models: dict, rows: Tensor, y: Tensor, mask: Tensor, x0_all: Tensor,
                device: torch.device) -> tuple[dict[str, Tensor], dict]:
    """Batch ``rows`` (int64 [b], molecules of the run) solved unconditionally and by D-Flow
    from their noise ``x0_all[rows]``: (tensors keyed as KEYS on the CPU, an entry summary with
    its atom count, seconds and velocity evaluations)."""
    from ..jobs.problems import STATUS_NAMES

    flow_m, guide_m = models["flow"][0], models["guide"][0]
    M = int(mask[rows].sum(1).max())
    problem = molecule_problem(guide_m, y[rows], mask[rows, :M], name=s.target,
                               n_types=flow_m.n_types, type_scale=flow_m.type_scale,
                               prior_weight=s.prior_weight, x0=x0_all[rows, :M], device=device)
    calls = [0]

    def counted(t, x, **kw):
        calls[0] += 1
        return flow_m(t, x, **kw)

    # gradient="auto" measures its memory plan once per velocity object and keeps that step's
    # calls out of nfe: a batch's counts do not depend on what this process solved before
    velocity = flow_m
    t0 = time.perf_counter()
    with torch.no_grad():
        unc = solve(counted, problem.x0, steps=s.steps, solver=s.solver, cond=problem.cond)
    t1 = time.perf_counter()
    res = optimize(velocity, problem.cost, problem.x0, steps=s.steps, solver=s.solver,
                   gradient=s.gradient, max_iter=s.max_iter, regularization=problem.prior,
                   cond=problem.cond)
    t2 = time.perf_counter()
    unknown = set(res.status) - set(STATUS_NAMES)
    if unknown:  # a status optimize gained: chunk files need a code for it
        raise RuntimeError(f"optimize returned statuses {sorted(unknown)} that "
                           "dflow_fast.jobs.problems.STATUS_NAMES lacks")
    with torch.no_grad():  # the guide on the states the cost saw: before and after D-Flow
        guide_end = problem.predict(res.x1).double().cpu()
        guide_start = problem.predict(unc).double().cpu()
    tensors = {"index": rows.to(torch.int64), "x1": res.x1.detach().cpu().float(),
               "x1_unconditional": unc.detach().cpu().float(),
               "status": torch.tensor([STATUS_NAMES.index(st) for st in res.status],
                                      dtype=torch.uint8),
               "nit": res.nit.detach().cpu().to(torch.int64),
               "nfe": res.nfe.detach().cpu().to(torch.int64),
               "guide_alpha": guide_end, "guide_alpha_start": guide_start}
    info = {"molecules": len(rows), "atoms": M, "message": res.message,
            "seconds": {"dflow": t2 - t1, "unconditional": t1 - t0},
            "velocity_evaluations": {"dflow": int(res.nfe.sum()),
                                     "unconditional": calls[0] * len(rows)}}
    return {k: tensors[k].contiguous() for k in KEYS}, info


def save_batch(out: Path, k: int, fp: str, tensors: dict[str, Tensor], info: dict,
               device: torch.device) -> dict:
    """Write batch k's chunk and entry atomically; returns the entry."""
    return C.write_chunk(out, k, tensors, fp, {**info, "device": str(device),
                                                "threads": torch.get_num_threads()})


def load_batch(out: Path, k: int, fp: str) -> tuple[dict[str, Tensor], dict]:
    """Batch k's chunk, verified in :func:`set_up` and again (SHA-256) on the bytes read:
    (tensors keyed as KEYS, its entry)."""
    entry = C.read_entry(out, k)
    if entry is None or entry.get("fingerprint") != fp:
        raise RuntimeError(f"{C.entry_path(out, k)} vanished or changed during the run; rerun "
                           "with --resume to recompute its batch")
    return C.read_chunk(out, k, entry), entry


def status_names() -> tuple[str, ...]:
    """The statuses a chunk's ``status`` codes index (those of the batch jobs' chunks)."""
    from ..jobs.problems import STATUS_NAMES
    return STATUS_NAMES
