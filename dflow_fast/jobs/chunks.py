"""The job folder on disk: chunk files, their manifest entries, resumption and the merge.

Layout of ``OUT``::

    job.json                      settings, fingerprint, inputs, provenance (rank 0, at start)
    chunks/chunk-KKKKK.safetensors   chunk k's tensors (KEYS of problems.py); metadata (one key,
                                     META_KEY): format, chunk, fingerprint, status names
    chunks/chunk-KKKKK.json       its manifest entry: SHA-256 and size of the chunk file, problems,
                                  loss sum, seconds, velocity calls, worker, device
    chunks/manifest.json          all entries in chunk order (rank 0, at the merge)
    chunks/worker-R.beat          worker R's beat while it runs (liveness.py)
    results.safetensors           every problem, ordered by index (rank 0, at the merge)

Every file is written atomically: a temporary file in the same folder, flushed and fsync'ed, then
renamed over the final name (and the folder fsync'ed), so a reader or a resumed job sees either
the old file or the whole new one. The chunk is renamed into place before its entry; a chunk is
finished iff its entry exists and the file's SHA-256 matches it: a worker killed between the two
renames, a truncated or corrupt file, all count as unfinished and are recomputed. The entry is a
file per chunk rather than lines of one shared manifest so that workers on several nodes never
write the same file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

FORMAT = "dflow_fast.jobs/1"
CHUNKS = "chunks"
RESULTS = "results.safetensors"
JOB = "job.json"
MANIFEST = "manifest.json"
#: the one metadata key of chunk and results files (a JSON object: format, fingerprint, ...)
META_KEY = "dflow_fast.jobs"


def chunk_path(out: Path, k: int) -> Path:
    return Path(out) / CHUNKS / f"chunk-{k:05d}.safetensors"


def entry_path(out: Path, k: int) -> Path:
    return Path(out) / CHUNKS / f"chunk-{k:05d}.json"


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (tmp file, rename) and, if ``durable``, so that it
    survives a power cut (fsync the file before the rename, the folder after)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if not durable:
        return
    try:  # the rename itself survives a power cut only once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    """Strict JSON, atomically; non-finite floats (a PSNR of identical images is inf) are
    written as the strings "inf", "-inf", "nan", as the benchmarks' result files do."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False, default=str)
    atomic_write(path, (text + "\n").encode())


def json_safe(o):
    """``o`` with every non-finite float replaced by its string (nested dicts, lists, tuples), so
    that strict JSON (``allow_nan=False``) can hold it; the benchmarks' result files use it too."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o


def remove_temporaries(out: Path) -> list[str]:
    """Delete the temporary files a killed writer left (rank 0, before any worker writes)."""
    gone = []
    for folder in (Path(out), Path(out) / CHUNKS):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def write_chunk(out: Path, k: int, tensors: dict[str, Tensor], fingerprint: str,
                entry: dict) -> dict:
    """Write chunk k and then its manifest entry; returns the entry (with sha256, bytes and
    write_seconds: serializing, hashing, writing and syncing the chunk file, its rename)."""
    from safetensors.torch import save

    from .problems import STATUS_NAMES
    meta = _metadata(chunk=k, fingerprint=fingerprint, status_names=list(STATUS_NAMES))
    t0 = time.perf_counter()
    data = save(tensors, metadata=meta)
    sha = hashlib.sha256(data).hexdigest()
    atomic_write(chunk_path(out, k), data)
    entry = {**entry, "chunk": k, "file": chunk_path(out, k).name, "sha256": sha,
             "bytes": len(data), "write_seconds": time.perf_counter() - t0,
             "fingerprint": fingerprint, "host": socket.gethostname()}
    write_json(entry_path(out, k), entry)
    return entry


def read_entry(out: Path, k: int) -> Optional[dict]:
    """Chunk k's manifest entry, or None when missing or unreadable."""
    try:
        e = json.loads(entry_path(out, k).read_text())
    except (OSError, ValueError):
        return None
    return e if isinstance(e, dict) and e.get("chunk") == k else None


def sha256_file(path: Path) -> Optional[str]:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def check_chunk(out: Path, k: int, fingerprint: str) -> tuple[Optional[dict], str]:
    """(entry, "") when chunk k is finished: an entry of this job whose SHA-256 and size match
    the file; else (None, why not)."""
    e = read_entry(out, k)
    path = chunk_path(out, k)
    if e is None:
        return None, "no manifest entry" if path.exists() else "missing"
    if e.get("fingerprint") != fingerprint:
        return None, "written by a job with other settings"
    if not path.exists():
        return None, "entry without its file"
    if path.stat().st_size != e.get("bytes") or sha256_file(path) != e.get("sha256"):
        return None, "checksum mismatch (truncated or corrupt)"
    return e, ""


def read_chunk(out: Path, k: int, entry: dict) -> dict[str, Tensor]:
    """Chunk k's tensors, verified against its entry's SHA-256 on the bytes read."""
    from safetensors.torch import load

    data = chunk_path(out, k).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise RuntimeError(f"{chunk_path(out, k)} changed since it was written (checksum "
                           "mismatch); rerun with --resume to recompute it")
    return load(data)


def merge(out: Path, entries: list[dict], fingerprint: str, index: Tensor) -> tuple[str, int]:
    """Concatenate the chunks (in chunk order, hence index order) into results.safetensors;
    checks that the indices are exactly ``index``. Returns (sha256, bytes) of the file."""
    from safetensors.torch import save

    from .problems import STATUS_NAMES
    parts = [read_chunk(out, e["chunk"], e) for e in entries]
    keys = list(parts[0])
    tensors = {key: torch.cat([p[key] for p in parts]).contiguous() for key in keys}
    if not torch.equal(tensors["index"], index):
        raise RuntimeError(f"{out}: the chunks' indices are not the job's problems in order")
    meta = _metadata(fingerprint=fingerprint, status_names=list(STATUS_NAMES))
    data = save(tensors, metadata=meta)
    atomic_write(Path(out) / RESULTS, data)
    write_json(Path(out) / CHUNKS / MANIFEST, {"format": FORMAT, "fingerprint": fingerprint,
                                               "chunks": entries})
    return hashlib.sha256(data).hexdigest(), len(data)


def load_results(out: str | Path) -> tuple[dict[str, Tensor], list[str]]:
    """A finished job's ``results.safetensors``: (tensors keyed as problems.KEYS, status names:
    ``status`` holds indices into them)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(out) / RESULTS
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), json.loads(meta[META_KEY])["status_names"]


def _metadata(**fields) -> dict[str, str]:
    """safetensors metadata as ONE key holding sorted JSON: the library writes its metadata map
    in a per-process random order (a Rust HashMap), so with several keys the same tensors gave
    files of different bytes; with one, a file's bytes (and SHA-256) depend on its contents
    only, and a job's results.safetensors is bytewise the same however it was computed."""
    return {META_KEY: json.dumps({"format": FORMAT, **fields}, sort_keys=True)}
