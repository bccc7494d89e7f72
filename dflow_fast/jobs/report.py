"""A finished job's report: ``report.json`` (settings, provenance, inputs, metrics, statuses,
seconds, evaluations), ``report.md`` (the same as a table) and PNG grids (truth, observation and
D-Flow's result, one column per problem)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import metrics
from .chunks import write_json
from .problems import STATUS_NAMES

#: problems per grid picture, and at most this many pictures (the first problems of the job)
GRID_COLUMNS, MAX_GRIDS = 16, 4
#: rows of the metric computations (bounded memory on long jobs)
BLOCK = 256
OURS = "D-Flow (dflow_fast)"


def quality(task: str, results: dict[str, Tensor], truth: Tensor,
            classifier=None) -> dict:
    """Mean PSNR and SSIM (dB, [-1, 1] images, data range 2) of the observation and of D-Flow's
    x1 against the ground truth for an inverse problem; for the class task, the bundled
    classifier's accuracy on the requested labels (it defines the cost, so this measures how well
    the optimization hit the target, not an independent judgement). Without torchmetrics:
    ``{"unavailable": why}``."""
    x1 = results["x1"]
    if task == "class":
        target = results["target"]
        dev = next(classifier.parameters()).device if hasattr(classifier, "parameters") else "cpu"
        dt = next(classifier.parameters()).dtype if hasattr(classifier, "parameters") else None
        hits = 0
        for s in range(0, x1.shape[0], BLOCK):
            xb = x1[s:s + BLOCK].to(dev, dt)
            with torch.no_grad():
                hits += int((classifier(xb).argmax(1).cpu() == target[s:s + BLOCK]).sum())
        return {"accuracy": {OURS: hits / x1.shape[0]}}
    try:
        metrics.psnr(truth[:1], truth[:1])
    except ImportError as e:
        return {"unavailable": str(e)}
    out = {}
    for name, fn in (("psnr", metrics.psnr), ("ssim", metrics.ssim)):
        row = {}
        for label, x in (("observation", results["observation"]), (OURS, x1)):
            vals = torch.cat([fn(x[s:s + BLOCK], truth[s:s + BLOCK].to(x.dtype))
                              for s in range(0, x.shape[0], BLOCK)])
            row[label] = float(vals.mean())
        out[name] = row
    return out


def summary(results: dict[str, Tensor]) -> dict:
    """Loss, iterations, statuses and evaluations over all problems."""
    loss = results["loss"].double()
    finite = loss[torch.isfinite(loss)]
    status = results["status"].tolist()
    return {
        "loss": {"mean": float(finite.mean()) if finite.numel() else None,
                 "median": float(finite.median()) if finite.numel() else None,
                 "nonfinite": int((~torch.isfinite(loss)).sum())},
        "iterations_mean": float(results["nit"].double().mean()),
        "status": {STATUS_NAMES[c]: status.count(c) for c in sorted(set(status))},
        "success": int(results["success"].sum()),
        "velocity_evaluations": int(results["nfe"].sum()),
        "velocity_evaluations_per_problem": float(results["nfe"].double().mean()),
    }


def save_grids(out: Path, truth: Tensor, results: dict[str, Tensor]) -> list[str]:
    """``grids/grid-PPP.png``: rows truth, observation, D-Flow's x1; GRID_COLUMNS problems per
    picture, at most MAX_GRIDS pictures. Needs Pillow (else no pictures, said in the report)."""
    try:
        from PIL import Image
    except ImportError:
        return []
    import numpy as np

    folder = Path(out) / "grids"
    folder.mkdir(exist_ok=True)
    n = truth.shape[0]
    names = []
    for page in range(min(MAX_GRIDS, math.ceil(n / GRID_COLUMNS))):
        s = slice(page * GRID_COLUMNS, min(n, (page + 1) * GRID_COLUMNS))
        rows = [truth[s], results["observation"][s], results["x1"][s]]
        tile = np.concatenate([_row(r) for r in rows], axis=0)
        name = f"grid-{page:03d}.png"
        img = Image.fromarray(tile if tile.shape[2] == 3 else tile[..., 0])
        img.save(folder / name)
        names.append(f"grids/{name}")
    return names


def _row(x: Tensor):
    """[n, C, H, W] in [-1, 1] -> uint8 [H', n W', 1 or 3] with 2-pixel gaps, upscaled
    (nearest) to at least 56 pixels; 3 or 4 channels as RGB (alpha dropped), else channel 0."""
    import numpy as np

    x = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    f = max(1, math.ceil(56 / x.shape[-1]))
    x = x.repeat_interleave(f, 2).repeat_interleave(f, 3)
    x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=255)
    return np.ascontiguousarray(x.permute(2, 0, 3, 1).flatten(1, 2).numpy())


def write(out: Path, report: dict) -> None:
    write_json(Path(out) / "report.json", report)
    from .chunks import atomic_write
    atomic_write(Path(out) / "report.md", to_markdown(report).encode())


def to_markdown(report: dict) -> str:
    c, s, q = report["config"], report["summary"], report["quality"]
    prov = report["provenance"]
    commit = prov.get("commit") or "not a checkout"
    if prov.get("dirty"):
        commit += " (+ local edits)"
    lines = [f"# dflow-fast run: {c['task']} on {report['inputs']['data']} "
             f"[{report['inputs']['range'][0]}:{report['inputs']['range'][1]}]", "",
             f"{report['inputs']['n']} problems of [C, H, W] = {report['inputs']['shape']}, "
             f"model {c['model']}, {c['solver']} {c['steps']} steps, gradient {c['gradient']}, "
             f"L-BFGS max_iter {c['max_iter']}, sigma {report['sigma']}, alpha {c['alpha']}, "
             f"seed {c['seed']}, {c['dtype']}, batch (chunk) {c['batch']}.", "",
             f"dflow_fast {prov['dflow_fast']}, torch {prov['torch']} (CUDA "
             f"{prov['torch_cuda']}), {prov['device']} ({prov['device_name']}), "
             f"{report['workers']['world']} worker(s) x {c['threads']} thread(s); commit "
             f"{commit}.", "", "| metric | observation | D-Flow |", "|---|---:|---:|"]
    if "unavailable" in q:
        lines.append(f"| quality | {q['unavailable']} | |")
    for m in ("psnr", "ssim"):
        if m in q:
            fmt = "{:.2f}" if m == "psnr" else "{:.3f}"
            lines.append(f"| {m.upper()} | {fmt.format(q[m]['observation'])} | "
                         f"{fmt.format(q[m][OURS])} |")
    if "accuracy" in q:
        lines.append(f"| classifier accuracy on the requested class | - | "
                     f"{q['accuracy'][OURS]:.3f} |")
    loss = s["loss"]["mean"]
    lines += ["", "| | |", "|---|---|",
              f"| mean loss | {loss:.4g} |" if loss is not None else "| mean loss | - |",
              f"| statuses | {', '.join(f'{v} {k}' for k, v in s['status'].items())} |",
              f"| mean iterations | {s['iterations_mean']:.2f} |",
              f"| velocity evaluations (per problem) | {s['velocity_evaluations']} "
              f"({s['velocity_evaluations_per_problem']:.1f}) |",
              f"| chunks (computed in this run / kept) | {report['chunks']['total']} "
              f"({report['chunks']['computed']} / {report['chunks']['kept']}) |",
              f"| seconds: this run's wall / all chunks' compute | "
              f"{report['seconds']['wall']:.1f} / {report['seconds']['compute']:.1f} |"]
    if report["grids"]:
        lines += ["", "Grids (rows: truth, observation, D-Flow): "
                  + ", ".join(f"[{g}]({g})" for g in report["grids"])]
    return "\n".join(lines) + "\n"


def problems_per_hour(n: int, seconds: float) -> Optional[float]:
    return 3600.0 * n / seconds if seconds > 0 else None
