"""The bundled flow-matching U-Net and the bundled DDPM (through the diffusers adapter) side by
side: the demo's tasks on the same test images, observations and initial noise, at the same number
of network evaluations per ODE solve (midpoint, ``--steps`` steps: 2 evaluations per step), with
the same optimizer budget. Writes bench/results/models_cpu.json and .md.

    python -m bench.bench_models --n 8 --threads 1
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.lib.env import RESULTS_DIR, command, write_json

#: report keys of the two models (dflow_fast.apps.demo.MODELS)
MODELS = ("fashion-mnist", "fashion-mnist-ddpm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="test images per task")
    p.add_argument("--tasks", nargs="+", default=None, help="default: every demo task")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--gradient", default="backprop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "models_cpu.json")
    return p.parse_args(argv)


def to_markdown(doc: dict) -> str:
    cfg = doc["config"]
    lines = [f"# Flow matching vs DDPM (bundled models), {cfg['n']} Fashion-MNIST test images "
             f"per task", "",
             f"`{doc['command']}`; midpoint, {cfg['steps']} steps ({2 * cfg['steps']} network "
             f"evaluations per solve) for both, L-BFGS max_iter {cfg['max_iter']}, gradient "
             f"{cfg['gradient']}, {cfg['threads']} thread(s). DDPM weights: "
             f"{doc['ddpm_training_steps']} training steps.", "",
             "| task | metric | flow (U-Net) | DDPM (UNet2DModel) | flow s | DDPM s | "
             "flow evaluations | DDPM evaluations |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    rows = {m: {r["task"]: r for r in doc["reports"][m]["tasks"]} for m in MODELS}
    for task, f in rows[MODELS[0]].items():
        d = rows[MODELS[1]][task]
        metrics = ("psnr", "ssim") if "psnr" in f else ("accuracy",)
        for m in metrics:
            key = "D-Flow (dflow_fast)"
            fmt = "{:.3f}" if m == "ssim" else "{:.2f}"
            lines.append(f"| {task} | {m.upper()} | {fmt.format(f[m][key])} | "
                         f"{fmt.format(d[m][key])} | {f['dflow_fast']['seconds']:.1f} | "
                         f"{d['dflow_fast']['seconds']:.1f} | "
                         f"{f['dflow_fast']['velocity_evaluations']} | "
                         f"{d['dflow_fast']['velocity_evaluations']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import json

    from dflow_fast.apps import demo
    from dflow_fast.models import PRETRAINED, WEIGHTS_DIR

    tasks = args.tasks or list(demo.DEFAULT_TASKS)
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in MODELS:
            reports[m] = demo.run(n=args.n, tasks=tasks, steps=args.steps,
                                  max_iter=args.max_iter, out=Path(tmp) / m, reference=False,
                                  progress=False, gradient=args.gradient, model=m)
    log = json.loads((WEIGHTS_DIR / PRETRAINED["fashion-mnist-ddpm"]).with_suffix(".json")
                     .read_text())
    doc = {"command": command("bench.bench_models", argv),
           "config": {"n": args.n, "tasks": tasks, "steps": args.steps,
                      "max_iter": args.max_iter, "gradient": args.gradient,
                      "threads": args.threads},
           "ddpm_training_steps": log["steps"], "reports": reports}
    path = write_json(args.out, doc, "cpu")
    doc = json.loads(path.read_text())
    path.with_suffix(".md").write_text(to_markdown(doc))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
