"""Produce the figures and numbers of ``dflow_fast/models/MODEL_CARD.md``.

- ``card/loss_curve.png``: flow-matching training loss (and the classifier's), from the JSON logs
  the training scripts write next to the checkpoints;
- ``card/samples.png``: 64 unconditional samples, midpoint ODE solve t=0 -> 1 (``--steps`` steps);
- ``card/metrics.json``: classifier test accuracy, and FID on the in-repo classifier's
  penultimate features (NOT Inception FID) between ``--n-fid`` generated samples and as many test
  images, with the same FID between two disjoint sets of real test images as a floor for scale;
- ``MODEL_CARD.md`` itself, rewritten from those numbers.

    python scripts/make_model_card.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

import dflow_fast  # noqa: E402
from dflow_fast.data import FASHION_MNIST_CLASSES, fashion_mnist  # noqa: E402
from dflow_fast.metrics import frechet_distance  # noqa: E402
from dflow_fast.models import PRETRAINED, WEIGHTS_DIR, load_checkpoint  # noqa: E402

MODELS_DIR = ROOT / "dflow_fast" / "models"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flow", type=Path, default=WEIGHTS_DIR / PRETRAINED["fashion-mnist"])
    p.add_argument("--classifier", type=Path,
                   default=WEIGHTS_DIR / PRETRAINED["fashion-mnist-classifier"])
    p.add_argument("--steps", type=int, default=20, help="midpoint steps for sampling")
    p.add_argument("--n-fid", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=MODELS_DIR / "card")
    p.add_argument("--card", type=Path, default=MODELS_DIR / "MODEL_CARD.md")
    p.add_argument("--ddpm", action="store_true",
                   help="measure the bundled DDPM instead (card/ddpm_*), then rewrite the card "
                        "from both metrics files")
    p.add_argument("--ddpm-weights", type=Path,
                   default=WEIGHTS_DIR / PRETRAINED["fashion-mnist-ddpm"])
    return p.parse_args(argv)


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def image_grid(x: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """``x: [B, 1, H, W]`` in [-1, 1] -> one [rows*(H+pad)+pad, nrow*(W+pad)+pad] array in [0, 1]."""
    b, _, h, w = x.shape
    rows = (b + nrow - 1) // nrow
    grid = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad))
    imgs = ((x[:, 0].clamp(-1, 1) + 1) / 2).numpy()
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = imgs[i]
    return grid


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.ddpm:
        from card_ddpm import measure_ddpm

        ddpm = measure_ddpm(args, plt, batched, image_grid)
        (args.out_dir / "ddpm_metrics.json").write_text(json.dumps(ddpm, indent=1))
        metrics = json.loads((args.out_dir / "metrics.json").read_text())
        args.card.write_text(render_card(metrics, ddpm))
        print(json.dumps(ddpm, indent=1))
        return
    flow = load_checkpoint(args.flow)
    clf = load_checkpoint(args.classifier)
    flow_log = json.loads(args.flow.with_suffix(".json").read_text())
    clf_log = json.loads(args.classifier.with_suffix(".json").read_text())
    x_test, y_test = fashion_mnist("test")

    # Loss curves.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(flow_log["curve"]["step"], flow_log["curve"]["loss"])
    axes[0].set(xlabel="step", ylabel="flow-matching MSE", yscale="log",
                title=f"U-Net velocity, batch {flow_log['batch_size']}")
    axes[1].plot(clf_log["curve"]["step"], clf_log["curve"]["loss"], color="C1")
    axes[1].set(xlabel="step", ylabel="cross-entropy", yscale="log",
                title=f"classifier, batch {clf_log['batch_size']}")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out_dir / "loss_curve.png", dpi=110)
    plt.close(fig)

    # Samples: the first 64 of the FID set (same seed), so the grid shows what FID measures.
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(args.n_fid, 1, 28, 28, generator=gen)
    t0 = time.time()
    samples = batched(lambda z: dflow_fast.solve(flow, z, steps=args.steps), x0, args.batch_size)
    sample_s = time.time() - t0
    fig = plt.figure(figsize=(6, 6))
    plt.imshow(image_grid(samples[:64], 8), cmap="gray", vmin=0, vmax=1)
    plt.axis("off")
    plt.title(f"64 unconditional samples, midpoint, {args.steps} steps ({2 * args.steps} NFE)")
    fig.tight_layout()
    fig.savefig(args.out_dir / "samples.png", dpi=110)
    plt.close(fig)

    # Classifier accuracy and FID on its penultimate features.
    pred = batched(clf, x_test, 500).argmax(1)
    test_acc = (pred == y_test).double().mean().item()
    n = args.n_fid
    if 2 * n > len(x_test):
        raise ValueError(f"--n-fid {n}: need 2*n <= {len(x_test)} test images for the floor")
    f_gen = batched(clf.features, samples.clamp(-1, 1), 500)
    f_real_a = batched(clf.features, x_test[:n], 500)
    f_real_b = batched(clf.features, x_test[n:2 * n], 500)
    fid_gen = frechet_distance(f_gen, f_real_a)
    fid_floor = frechet_distance(f_real_b, f_real_a)
    gen_classes = torch.bincount(batched(clf, samples.clamp(-1, 1), 500).argmax(1), minlength=10)

    n_flow = sum(p.numel() for p in flow.parameters())
    n_clf = sum(p.numel() for p in clf.parameters())
    metrics = {
        "flow": {"file": args.flow.name, "parameters": n_flow, "config": flow_log["config"],
                 "steps": flow_log["steps"], "batch_size": flow_log["batch_size"],
                 "lr": flow_log["lr"], "ema": flow_log["ema"], "wall_s": flow_log["wall_s"],
                 "final_loss": flow_log["final_loss"], "threads": flow_log["threads"],
                 "size_bytes": args.flow.stat().st_size},
        "classifier": {"file": args.classifier.name, "parameters": n_clf,
                       "config": clf_log["config"], "steps": clf_log["steps"],
                       "batch_size": clf_log["batch_size"], "wall_s": clf_log["wall_s"],
                       "final_loss": clf_log["final_loss"], "test_accuracy": test_acc,
                       "size_bytes": args.classifier.stat().st_size},
        "fid_classifier_features": {
            "note": "FID on in-repo classifier features (not Inception FID)",
            "n": n, "sampler": f"midpoint, {args.steps} steps", "seed": args.seed,
            "generated_vs_test": fid_gen, "test_vs_disjoint_test_floor": fid_floor,
        },
        "generated_class_histogram": gen_classes.tolist(),
        "sampling_wall_s": round(sample_s, 1),
        "torch": torch.__version__, "platform": platform.platform(),
    }
    (args.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    ddpm_file = args.out_dir / "ddpm_metrics.json"
    args.card.write_text(render_card(
        metrics, json.loads(ddpm_file.read_text()) if ddpm_file.exists() else None))
    print(json.dumps(metrics, indent=1))


def render_card(m: dict, ddpm: dict | None = None) -> str:
    """The card from the flow/classifier metrics and, when measured, the DDPM's."""
    from card_ddpm import render_ddpm

    return _render_card(m) + (render_ddpm(ddpm, FASHION_MNIST_CLASSES) if ddpm else "")


def _render_card(m: dict) -> str:
    f, c, fid = m["flow"], m["classifier"], m["fid_classifier_features"]
    hist = ", ".join(f"{name} {k}" for name, k in zip(FASHION_MNIST_CLASSES,
                                                       m["generated_class_histogram"]))
    return f"""# Model card: dflow_fast pretrained models

Generated by `scripts/make_model_card.py` from the training logs next to the checkpoints
(`weights/*.json`) and `card/metrics.json`. Both models were trained on the Fashion-MNIST
**train** split (60,000 images, Debian package `dataset-fashion-mnist`); every number below is
measured on the **test** split (10,000 images). Images are 28x28x1 scaled to [-1, 1].

Hardware for training and evaluation: a 2-core x86-64 CPU, PyTorch {m['torch']} (CPU build),
`torch.set_num_threads(1)`, no GPU.

## `load_pretrained("fashion-mnist")`: flow-matching velocity (U-Net)

| | |
|---|---|
| architecture | attention-free U-Net, GroupNorm + SiLU residual blocks, sinusoidal time embedding + MLP added in every block, resolutions 28 -> 14 -> 7, config `{json.dumps(f['config'])}` |
| parameters | {f['parameters']:,} |
| checkpoint | `weights/{f['file']}`, {f['size_bytes'] / 1e6:.1f} MB, EMA weights (decay {f['ema']}) |
| objective | conditional-OT flow matching: x_t = (1 - t) x0 + t x1, x0 ~ N(0, I) at t=0, data x1 at t=1, target x1 - x0, MSE, t ~ U[0, 1] |
| optimizer | AdamW, lr {f['lr']} (linear warm-up then constant), gradient clipping 1.0 |
| training | {f['steps']:,} steps of batch {f['batch_size']} ({f['steps'] * f['batch_size'] / 60000:.1f} epochs), {f['wall_s'] / 60:.0f} min wall time on {f['threads']} thread |
| final training loss | {f['final_loss']:.4f} (mean of the last logged interval) |
| step time | {f['wall_s'] / f['steps']:.2f} s per step on average; the 2 cores were shared with other jobs during training (about 0.40 s per step on an otherwise idle core) |
| convention | `v = model(t, x)`, `x: [B, 1, 28, 28]`, `t` 0-dim or `[B]`; noise at t=0, data at t=1 |

Training loss (left) and the classifier's (right):

![loss curves](card/loss_curve.png)

64 unconditional samples (seed {fid['seed']}, {fid['sampler']}):

![samples](card/samples.png)

## `load_pretrained("fashion-mnist-classifier")`: CNN classifier

| | |
|---|---|
| architecture | 3 conv blocks (2 convs each, GroupNorm + SiLU) at 28, 14, 7 with max-pooling, global average pool, dropout, linear; config `{json.dumps(c['config'])}` |
| parameters | {c['parameters']:,} |
| checkpoint | `weights/{c['file']}`, {c['size_bytes'] / 1e6:.1f} MB |
| training | {c['steps']:,} steps of batch {c['batch_size']}, AdamW with cosine decay, flips and 2-pixel shifts, {c['wall_s'] / 60:.0f} min wall time on 1 thread at low priority (nice 10) beside the flow training; final loss {c['final_loss']:.4f} |
| **test accuracy** | **{100 * c['test_accuracy']:.2f}%** (10,000 test images) |
| features | `model.features(x) -> [B, 128]` (pooled penultimate layer) |

## Sample quality

**FID on in-repo classifier features (not Inception FID).** Fréchet distance between Gaussians
fitted to the classifier's 128-dim penultimate features; it is only comparable with other numbers
computed with this same classifier and the same sample count.

| comparison (n = {fid['n']} each) | FID (classifier features) |
|---|---|
| {fid['n']} generated samples ({fid['sampler']}) vs test images 0..{fid['n'] - 1} | {fid['generated_vs_test']:.2f} |
| floor: test images {fid['n']}..{2 * fid['n'] - 1} vs test images 0..{fid['n'] - 1} | {fid['test_vs_disjoint_test_floor']:.2f} |

Classes of the generated samples as predicted by the classifier: {hist}.

## Limitations

A small model trained for about an hour on one CPU thread: samples are recognisable garments of
every class but show artefacts (broken textures, smeared details) that real images lack. It exists so that D-Flow's inverse problems run end to end
on real data offline; it is not a benchmark model. Regenerate this card with
`python scripts/make_model_card.py --threads 1`.
"""


if __name__ == "__main__":
    main()
