"""Batch jobs (``dflow-fast run``): problems per hour against the number of workers, and what
writing the chunks costs.

For each worker count W in ``--workers`` (CPU default 1 2; CUDA default 1 .. the number of GPUs,
one worker per GPU), the same job runs as a fresh command: ``python -m dflow_fast run`` for
W = 1, ``torchrun --standalone --nproc-per-node W -m dflow_fast run`` (as
``python -m torch.distributed.run``) for W > 1, with ``--threads 1`` per worker on the CPU. The job:
``--n`` Fashion-MNIST test images, ``--task``, chunks of ``--batch``, the bundled flow, midpoint
``--steps``, L-BFGS ``--max-iter``, gradient ``--gradient``. Rounds go round-robin over the
worker counts (``--repeats``), so load on the machine hits all of them alike.

Recorded per run: the command's wall seconds (interpreter start-up, imports, rendezvous and the
merge included); the job's own wall seconds from its report (``run()`` on rank 0, from the input
checks to the last chunk) and its chunk phase (from the folder's set-up to the last chunk: the
part that scales with the workers); the chunks' compute seconds (their sum over workers); the
chunk write seconds (serializing, SHA-256, writing, fsync and rename, per chunk, from the
manifest entries) and bytes per chunk; and whether the W-worker results equal the 1-worker
results bitwise.
Problems per hour = n / seconds (wall); write share = write / (compute + write) seconds.

    python -m bench.bench_jobs                              # CPU: 1 and 2 workers
    python -m bench.bench_jobs --device cuda                # one worker per GPU
    python -m bench.bench_jobs --render bench/results/jobs_scaling.json

Writes ``bench/results/jobs_scaling.{json,md}`` (CPU) or ``jobs_scaling_cuda.{json,md}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.lib import REPO_ROOT, RESULTS_DIR, command, environment, write_json

MODULE = "bench.bench_jobs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--workers", type=int, nargs="+",
                   help="worker counts (default: 1 2 on the CPU, 1 .. #GPUs on CUDA)")
    p.add_argument("--n", type=int, default=32, help="problems (Fashion-MNIST test images)")
    p.add_argument("--batch", type=int, default=8, help="problems per chunk")
    p.add_argument("--task", default="sr4")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--gradient", default="auto", help="as dflow-fast run (default auto)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all worker counts")
    p.add_argument("--note", default="", help="a note on the machine's load, kept in the JSON")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/jobs_scaling"
                                            "[_cuda].json)")
    p.add_argument("--render", type=Path, help="rewrite the Markdown of this JSON; measure "
                                               "nothing")
    a = p.parse_args(argv)
    if a.workers is None:
        a.workers = ([1, 2] if a.device == "cpu"
                     else list(range(1, max(1, torch.cuda.device_count()) + 1)))
    a.out = a.out or RESULTS_DIR / ("jobs_scaling.json" if a.device == "cpu"
                                    else "jobs_scaling_cuda.json")
    return a


def job_command(args, workers: int, out: Path) -> list[str]:
    """The job as a command line: plain for 1 worker, through torchrun for more."""
    launch = ([sys.executable, "-m", "dflow_fast"] if workers == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(workers), "-m", "dflow_fast"])
    return launch + ["run", "--task", args.task, "--data", "fashion-mnist:test", "--indices",
                     f"0:{args.n}", "--batch", str(args.batch), "--steps", str(args.steps),
                     "--max-iter", str(args.max_iter), "--gradient", args.gradient,
                     "--device", args.device, "--threads", "1", "--out", str(out),
                     "--no-progress"]


def source_digest() -> str:
    """SHA-256 of the package's Python sources: in a checkout other people edit while this
    runs, two runs' results are comparable bitwise only when the code they ran was the same."""
    h = hashlib.sha256()
    for path in sorted((REPO_ROOT / "dflow_fast").rglob("*.py")):
        h.update(path.relative_to(REPO_ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def one_run(args, workers: int, out: Path) -> dict:
    """Run the job once in a fresh folder; its timings from the command and the job folder."""
    shutil.rmtree(out, ignore_errors=True)
    source = source_digest()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run(job_command(args, workers, out), cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{workers} worker(s) failed:\n{p.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    entries = json.loads((out / "chunks" / "manifest.json").read_text())["chunks"]
    writes = [e["write_seconds"] for e in entries]
    compute = report["seconds"]["compute"]
    return {"workers": workers, "command_wall_s": wall, "job_wall_s": report["seconds"]["wall"],
            "chunks_wall_s": report["seconds"]["chunks_wall"],
            "compute_s": compute, "write_s": sum(writes), "write_s_per_chunk": writes,
            "bytes_per_chunk": statistics.median(e["bytes"] for e in entries),
            "chunks": len(entries), "velocity_evaluations":
                report["summary"]["velocity_evaluations"],
            "results_sha256": report["results"]["sha256"],
            "source_before": source, "source_after": source_digest(),
            "chunk_ranks": sorted({e["rank"] for e in entries})}


def bitwise(rows: list[dict], rs: list[dict], first: int) -> str:
    """Do these runs' results equal the first worker count's, bitwise? Only pairs that ran the
    same package source (unchanged during either run) are compared."""
    def same_code(r):
        return r["source_before"] == r["source_after"]
    pairs = [(r, b) for r in rs if same_code(r) for b in rows
             if b is not r and b["workers"] == first and same_code(b)
             and b["source_before"] == r["source_before"]]
    if not pairs:
        return "not compared: the package's source changed between or during the runs"
    equal = sum(r["results_sha256"] == b["results_sha256"] for r, b in pairs)
    return f"{'yes' if equal == len(pairs) else 'NO'} ({equal} of {len(pairs)} pairs)"


def measure(args, cmd: str) -> dict:
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_jobs_") as tmp:
        for r in range(args.repeats):
            for w in args.workers:  # round-robin: load on the machine hits every count alike
                row = one_run(args, w, Path(tmp) / f"w{w}")
                row["round"] = r
                rows.append(row)
                print(f"round {r}, {w} worker(s): {row['command_wall_s']:.1f} s command, "
                      f"{row['job_wall_s']:.1f} s job", flush=True)
    load_after = os.getloadavg()
    summary = []
    for w in args.workers:
        rs = [r for r in rows if r["workers"] == w]
        cmd_s = statistics.median(r["command_wall_s"] for r in rs)
        job_s = statistics.median(r["job_wall_s"] for r in rs)
        chunks_s = statistics.median(r["chunks_wall_s"] for r in rs)
        writes = [s for r in rs for s in r["write_s_per_chunk"]]
        share = statistics.median(r["write_s"] / (r["write_s"] + r["compute_s"]) for r in rs)
        summary.append({
            "workers": w, "runs": len(rs), "command_wall_s": cmd_s, "job_wall_s": job_s,
            "chunks_wall_s": chunks_s,
            "problems_per_hour_command": 3600 * args.n / cmd_s,
            "problems_per_hour_job": 3600 * args.n / job_s,
            "problems_per_hour_chunks": 3600 * args.n / chunks_s,
            "write_s_per_chunk_median": statistics.median(writes),
            "write_share": share, "bytes_per_chunk": rs[0]["bytes_per_chunk"],
            "bitwise_vs_first": bitwise(rows, rs, args.workers[0]),
        })
    for s in summary:
        s["speedup_command"] = summary[0]["command_wall_s"] / s["command_wall_s"]
        s["speedup_job"] = summary[0]["job_wall_s"] / s["job_wall_s"]
        s["speedup_chunks"] = summary[0]["chunks_wall_s"] / s["chunks_wall_s"]
    return {"command": cmd, "config": {k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in vars(args).items()},
            "load_average": {"before": load_before, "after": load_after},
            "note": args.note, "rows": rows, "summary": summary}


def markdown(doc: dict) -> str:
    m, c = doc["meta"], doc["config"]
    commit = (m.get("commit") or "?")[:12] + (" (+ local edits)" if m.get("dirty") else "")
    lines = [f"# Batch jobs: problems per hour vs workers ({c['device']})", "",
             f"`{doc['command']}`; {m.get('device_name')}, {m.get('cpu_count')} CPUs, torch "
             f"{m.get('torch')}, commit {commit}, {m.get('timestamp')}.", "",
             f"Job: {c['n']} Fashion-MNIST test images, task {c['task']}, chunks of "
             f"{c['batch']}, midpoint {c['steps']} steps, L-BFGS max_iter {c['max_iter']}, "
             f"gradient {c['gradient']}, 1 thread per worker; medians of {c['repeats']} "
             "round-robin rounds. *command*: the whole command (start-up, imports, rendezvous, "
             "merge, report); *job*: `run()` on rank 0 from the input checks to the last chunk; "
             "*chunks*: from the folder's set-up to the last chunk, the part that scales with "
             "the workers.", "",
             "| workers | command s | job s | chunks s | problems/h (command / job / chunks) | "
             "speed-up (command / job / chunks) | chunk write (median) | write share | "
             "bytes/chunk | bitwise = 1 worker (same code) |",
             "|---:|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for s in doc["summary"]:
        lines.append(f"| {s['workers']} | {s['command_wall_s']:.1f} | {s['job_wall_s']:.1f} | "
                     f"{s['chunks_wall_s']:.1f} | {s['problems_per_hour_command']:.0f} / "
                     f"{s['problems_per_hour_job']:.0f} / {s['problems_per_hour_chunks']:.0f} "
                     f"| {s['speedup_command']:.2f} / {s['speedup_job']:.2f} / "
                     f"{s['speedup_chunks']:.2f} | "
                     f"{s['write_s_per_chunk_median'] * 1e3:.2f} ms | "
                     f"{100 * s['write_share']:.3f}% | {s['bytes_per_chunk']:.0f} | "
                     f"{s['bitwise_vs_first']} |")
    la = doc["load_average"]
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines += ["", f"Load average (1, 5, 15 min) before: {fmt(la['before'])}; after: "
              f"{fmt(la['after'])}."]
    if doc.get("note"):
        lines += ["", f"Note: {doc['note']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text())
        first = doc["config"]["workers"][0]
        for s in doc["summary"]:  # derived from the rows: recomputed with this version's rule
            s["bitwise_vs_first"] = bitwise(
                doc["rows"], [r for r in doc["rows"] if r["workers"] == s["workers"]], first)
        args.render.write_text(json.dumps(doc, indent=2) + "\n")
        args.render.with_suffix(".md").write_text(markdown(doc))
        print(markdown(doc))
        return 0
    payload = measure(args, command(MODULE, argv))
    meta = environment(args.device)
    path = write_json(args.out, payload, args.device, meta)
    md = path.with_suffix(".md")
    md.write_text(markdown({"meta": meta, **payload}))
    print(md.read_text())
    print(f"wrote {path} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
