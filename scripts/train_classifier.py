"""Train the CNN shipped as ``load_pretrained("fashion-mnist-classifier")``.

Cross-entropy on the Fashion-MNIST train split with light augmentation (random horizontal flips
and shifts of up to 2 pixels), AdamW with a cosine learning-rate decay; reports the test-split
accuracy at the end. Writes the checkpoint (safetensors, architecture config in its metadata), and
``<output>.json`` with the loss curve and accuracy, every ``--save-every`` steps and at the end.

Example (the run behind the shipped checkpoint, see dflow_fast/models/MODEL_CARD.md)::

    python scripts/train_classifier.py --steps 3000 --batch-size 128 --lr 2e-3 --threads 1 \
        --output dflow_fast/models/weights/fashion_mnist_classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from dflow_fast.data import fashion_mnist  # noqa: E402
from dflow_fast.models import SmallCNN, save_checkpoint  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train images")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--output", type=Path,
                   default=Path("dflow_fast/models/weights/fashion_mnist_classifier.safetensors"))
    return p.parse_args(argv)


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and integer shift (zero = background -1 padding). ``x: [B,1,H,W]``."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    # One shift per batch keeps this a cheap slice; batches differ, which is what matters.
    return padded[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                  for i in range(0, len(x), batch))
    return correct / len(x)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = fashion_mnist("train", limit=args.limit)
    x_test, y_test = fashion_mnist("test")
    n = len(x_train)

    model = SmallCNN()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    curve = {"step": [], "loss": [], "wall_s": []}
    out_json = args.output.with_suffix(".json")
    t0 = time.time()
    step, test_acc = 0, None

    def save(final: bool):
        info = {"steps": step, "batch_size": args.batch_size, "lr": args.lr,
                "wall_s": round(time.time() - t0, 1), "threads": args.threads,
                "seed": args.seed, "train_images": n, "test_accuracy": test_acc,
                "final_loss": curve["loss"][-1] if curve["loss"] else None}
        save_checkpoint(model, args.output, extra_metadata={"train": info})
        out_json.write_text(json.dumps({
            "model": "SmallCNN", "config": model.config, "parameters": n_params,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__, "platform": platform.platform(), "finished": final,
            **info, "curve": curve}, indent=1))

    print(f"SmallCNN {model.config}: {n_params:,} parameters; {n} train images", flush=True)
    perm, pos = torch.randperm(n, generator=gen), 0
    running, count = 0.0, 0
    while step < args.steps:
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        # Warm-up then cosine decay to zero: a short run ends at a settled minimum.
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running, count = running + loss.item(), count + 1
        if step % args.log_every == 0 or step == args.steps:
            curve["step"].append(step)
            curve["loss"].append(running / count)
            curve["wall_s"].append(round(time.time() - t0, 1))
            print(f"step {step:5d}/{args.steps}  loss {running / count:.4f}  lr {lr:.2e}  "
                  f"{(time.time() - t0) / 60:5.1f} min", flush=True)
            running, count = 0.0, 0
        if step % args.save_every == 0 and step < args.steps:
            save(final=False)
    test_acc = accuracy(model, x_test, y_test)
    print(f"test accuracy {test_acc:.4f} on {len(x_test)} images", flush=True)
    save(final=True)
    print(f"saved {args.output} and {out_json}", flush=True)


if __name__ == "__main__":
    main()
