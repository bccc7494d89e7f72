"""Train the DDPM U-Net (epsilon prediction) for ``load_pretrained("fashion-mnist-ddpm")``.

A diffusers ``UNet2DModel`` (~1.1M parameters) on the Fashion-MNIST train split, 1x28x28 images in
``[-1, 1]``, with ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
prediction_type="epsilon")``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` at uniform integer
timesteps ``t in {0..999}``, loss ``MSE(model(x_t, t).sample, eps)``, AdamW with linear warm-up then
cosine decay (or constant), gradient clipping 1.0, EMA of the weights (the EMA weights are what
``--export`` ships).

Resolution: 28 is used as is (no padding). Three blocks with two downsamples give 28 -> 14 -> 7;
the 7x7 level (last down block, mid block, first up block) has self-attention, 28 and 14 are
attention-free ResNet blocks. ``--smoke`` swaps in a tiny model of the same layout for tests.

Long runs are meant to be stopped and resumed (possibly in another session, on another day):

- ``<out>/state.pt``: the full training state (model, EMA, AdamW moments, all fp32; step, loss
  log, wall time, RNG state, the run's hyperparameters) written every ``--save-minutes``, at the
  end, at ``--minutes`` and on SIGTERM/SIGINT, atomically (temp file, fsync, ``os.replace``): a
  reader or a kill never sees a half-written file. About 16 bytes per parameter (17.8 MB for the
  default model), nothing is rounded, so a resumed run is **bitwise identical** to an uninterrupted
  one on the same machine and thread count: the batch order and the noise of step ``s`` are drawn
  from generators seeded by ``(seed, epoch)`` and ``(seed, s)``, not from a running RNG stream.
- ``<out>/train_log.json``: the loss curve (``curve: {step, loss, wall_s}``, mean loss over each
  ``--log-every`` interval) and the run's settings, rewritten at every checkpoint.

``--resume`` continues from ``<out>/state.pt`` (or starts fresh if there is none); the run's
hyperparameters come from the state, and giving a different value on the command line is an error
(``--max-steps``, ``--minutes``, ``--threads``, ``--save-minutes``, ``--log-every`` may change).
``--reschedule`` is the one deliberate exception: with it, ``--decay-steps N`` shortens or extends
the cosine horizon of a resumed run from its current step on (N must lie beyond that step); each
change is recorded in the state and in ``train_log.json`` under ``reschedules`` (step, old, new),
and the curve shows the learning rate's jump there.
Without ``--resume`` an existing state is never overwritten.

``--export PATH`` trains nothing: it writes the EMA weights of ``<out>/state.pt`` to a safetensors
file with metadata ``format`` ("dflow_fast.models/1"), ``arch`` ("diffusers.UNet2DModel"),
``config`` / ``scheduler`` (JSON constructor kwargs of ``UNet2DModel`` / ``DDPMScheduler``) and
``training`` (JSON), plus ``PATH`` with suffix ``.json``: the training log in the same format as
the flow model's ``weights/fashion_mnist_unet.json``.

Example (the run behind the checkpoint; each session resumes where the last one stopped)::

    python scripts/train_ddpm.py --threads 1 --minutes 120 --out dflow_fast/models/weights/ddpm_run
    python scripts/train_ddpm.py --resume --threads 1 --minutes 120 \
        --out dflow_fast/models/weights/ddpm_run
    python scripts/train_ddpm.py --out dflow_fast/models/weights/ddpm_run \
        --export dflow_fast/models/weights/fashion_mnist_ddpm.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dflow_fast.data import fashion_mnist  # noqa: E402
from train_flow import ema_update  # noqa: E402  (the bundled flow's EMA, the same update)

STATE_FORMAT = "dflow_fast.train_ddpm/1"
EXPORT_FORMAT = "dflow_fast.models/1"
EXPORT_ARCH = "diffusers.UNet2DModel"

#: UNet2DModel constructor kwargs of the shipped model (1,112,801 parameters).
MODEL_CONFIG = {
    "sample_size": 28, "in_channels": 1, "out_channels": 1,
    "block_out_channels": [32, 64, 64], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8, "attention_head_dim": 8, "dropout": 0.0,
}
#: ``--smoke``: the same layout, tiny (71,033 parameters), for tests.
SMOKE_CONFIG = {**MODEL_CONFIG, "block_out_channels": [8, 16, 16]}

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear",
                    "prediction_type": "epsilon"}

#: Hyperparameters that define the run: stored in the state, taken from it on --resume.
#: name -> default (None-valued CLI defaults mean "not given").
RUN_DEFAULTS = {
    "batch_size": 64, "lr": 1e-3, "min_lr_ratio": 0.1, "schedule": "cosine", "warmup": 500,
    "decay_steps": 20_000, "weight_decay": 0.0, "ema": 0.999, "seed": 0, "limit": None,
    "smoke": False,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("dflow_fast/models/weights/ddpm_run"),
                   help="folder of state.pt and train_log.json")
    p.add_argument("--reschedule", action="store_true",
                   help="with --resume: accept a new --decay-steps (recorded in the log)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/state.pt (start fresh if it does not exist)")
    p.add_argument("--export", type=Path, default=None, metavar="PATH",
                   help="write the EMA weights of <out>/state.pt as safetensors and exit")
    # Run-defining hyperparameters (defaults in RUN_DEFAULTS; on --resume, from the state).
    p.add_argument("--batch-size", type=int, default=None, help="default 64")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, default 1e-3")
    p.add_argument("--schedule", choices=["cosine", "constant"], default=None,
                   help="after the warm-up: cosine decay to lr*min-lr-ratio at --decay-steps, or "
                        "constant (default cosine)")
    p.add_argument("--min-lr-ratio", type=float, default=None, help="default 0.1")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps, default 500")
    p.add_argument("--decay-steps", type=int, default=None,
                   help="cosine horizon in steps (default 20000; lr stays at the floor after)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW, default 0")
    p.add_argument("--ema", type=float, default=None, help="EMA decay, default 0.999")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train images")
    p.add_argument("--smoke", action="store_const", const=True, default=None,
                   help="tiny model (same layout) for tests; --limit defaults to 256")
    # Per-invocation settings.
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop once the (total) step count reaches this (default --decay-steps)")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop (checkpointing) after this much wall time in this invocation")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--save-minutes", type=float, default=5.0,
                   help="checkpoint every this many minutes (default 5)")
    p.add_argument("--log-every", type=int, default=50, help="loss-curve interval in steps")
    return p.parse_args(argv)


def resolve_hparams(args, stored: dict | None, defaults: dict = RUN_DEFAULTS,
                    prog: str = "train_ddpm", smoke_limit: int = 256) -> dict:
    """The run's hyperparameters: CLI value, else the stored one (on resume), else the default.
    On resume a differing value is an error, except ``--decay-steps`` under ``--reschedule``."""
    hp = {}
    for name, default in defaults.items():
        given = getattr(args, name)
        if stored is not None:
            if given is not None and given != stored[name]:
                if name == "decay_steps" and args.reschedule:
                    hp[name] = given
                    continue
                raise SystemExit(
                    f"{prog}: --{name.replace('_', '-')} {given} differs from the resumed "
                    f"run's {stored[name]!r}; drop the flag (or start a new run in another --out)")
            hp[name] = stored[name]
        else:
            hp[name] = default if given is None else given
    if stored is None and hp["smoke"] and hp["limit"] is None:
        hp["limit"] = smoke_limit
    return hp


def make_model(hp: dict):
    from diffusers import UNet2DModel

    return UNet2DModel(**(SMOKE_CONFIG if hp["smoke"] else MODEL_CONFIG))


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def public_config(config) -> dict:
    """A diffusers config as plain JSON-able constructor kwargs (no ``_``-prefixed keys)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def derived_seed(*ints: int) -> int:
    """A well-mixed 63-bit seed from integers (the stream of one epoch / one step)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def apply_reschedule(st: dict, stored: dict | None, hp: dict, prog: str):
    """Carry the resumed state's ``reschedules`` into ``st`` and record a new one (``--reschedule``:
    a new cosine horizon from the current step on)."""
    st["reschedules"] = list(stored.get("reschedules", [])) if stored else []
    stored_hp = stored["hparams"] if stored else None
    if stored_hp is None or hp["decay_steps"] == stored_hp["decay_steps"]:
        return
    if hp["decay_steps"] <= st["step"]:
        raise SystemExit(f"{prog}: --decay-steps {hp['decay_steps']} must lie beyond the resumed "
                         f"step {st['step']}")
    st["reschedules"].append({"step": st["step"], "decay_steps_from": stored_hp["decay_steps"],
                              "decay_steps_to": hp["decay_steps"]})
    print(f"rescheduled at step {st['step']}: cosine horizon {stored_hp['decay_steps']} -> "
          f"{hp['decay_steps']}", flush=True)


def lr_at(step: int, hp: dict) -> float:
    """Learning rate of (0-based) optimizer step ``step``."""
    if step < hp["warmup"]:
        return hp["lr"] * (step + 1) / hp["warmup"]
    if hp["schedule"] == "constant":
        return hp["lr"]
    span = max(1, hp["decay_steps"] - hp["warmup"])
    frac = min(1.0, (step - hp["warmup"]) / span)
    floor = hp["lr"] * hp["min_lr_ratio"]
    return floor + (hp["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def ddpm_loss(model, scheduler, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``MSE(model(x_t, t).sample, eps)``, ``t ~ U{0..T-1}``, ``x_t = add_noise(x0, eps, t)``."""
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    xt = scheduler.add_noise(x0, eps, t)
    return torch.nn.functional.mse_loss(model(xt, t).sample, eps)


def atomic_write(path: Path, write):
    """``write(tmp_path)``, fsync, then ``os.replace`` onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def log_record(st: dict, n_params: int, finished: bool) -> dict:
    """The JSON training log (same fields as the flow model's weights/*.json)."""
    hp, curve = st["hparams"], st["curve"]
    return {
        "model": EXPORT_ARCH, "config": st["model_config"], "scheduler": SCHEDULER_CONFIG,
        "parameters": n_params, "objective": "DDPM epsilon prediction, MSE, t ~ U{0..999}",
        "data": "Fashion-MNIST train split, 1x28x28 in [-1, 1]", "train_images": st["n_images"],
        "steps": st["step"], "batch_size": hp["batch_size"], "lr": hp["lr"], "ema": hp["ema"],
        "wall_s": round(st["wall_s"], 1), "threads": st["threads"], "seed": hp["seed"],
        "final_loss": curve["loss"][-1] if curve["loss"] else None, "hparams": hp,
        "torch": torch.__version__, "diffusers": _diffusers_version(),
        "platform": platform.platform(), "processor": platform.processor(),
        "reschedules": st.get("reschedules", []), "finished": finished, "curve": curve,
    }


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def export(args) -> Path:
    from safetensors.torch import save_file

    state_path = args.out / "state.pt"
    if not state_path.is_file():
        raise SystemExit(f"train_ddpm: nothing to export, {state_path} does not exist")
    st = torch.load(state_path, map_location="cpu", weights_only=False)
    hp = st["hparams"]
    from diffusers import UNet2DModel

    ema = UNet2DModel(**st["model_config"])
    ema.load_state_dict(st["ema"])
    n_params = sum(p.numel() for p in ema.parameters())
    training = {
        "steps": st["step"], "batch_size": hp["batch_size"], "lr": hp["lr"],
        "schedule": hp["schedule"], "warmup": hp["warmup"], "decay_steps": hp["decay_steps"],
        "min_lr_ratio": hp["min_lr_ratio"], "weight_decay": hp["weight_decay"],
        "ema": hp["ema"], "seed": hp["seed"], "train_images": st["n_images"],
        "wall_s": round(st["wall_s"], 1), "threads": st["threads"],
        "final_loss": st["curve"]["loss"][-1] if st["curve"]["loss"] else None,
        "objective": "epsilon prediction, MSE, t ~ U{0..999}",
        "data": "Fashion-MNIST train, 1x28x28 in [-1, 1]",
        "torch": torch.__version__, "diffusers": _diffusers_version(),
    }
    metadata = {
        "format": EXPORT_FORMAT, "arch": EXPORT_ARCH,
        "config": json.dumps(public_config(ema.config)),
        "scheduler": json.dumps(public_config(make_scheduler().config)),
        "training": json.dumps(training),
    }
    tensors = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    path = Path(args.export)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    record = log_record(st, n_params, finished=st["step"] >= st.get("max_steps", st["step"]))
    record["checkpoint"] = path.name
    atomic_write(path.with_suffix(".json"),
                 lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    print(f"exported the EMA weights at step {st['step']} ({n_params:,} parameters) to {path} "
          f"and {path.with_suffix('.json')}", flush=True)
    return path


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints after the current step and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, rely on periodic checkpoints
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_steps(st: dict, hp: dict, args, max_steps: int, model, ema, opt, step_loss, save,
              t_start: float, wall_before: float) -> Optional[str]:
    """The optimizer steps from ``st["step"]`` to ``max_steps`` (shared with train_qm9.py):
    learning rate ``lr_at(step)``, ``step_loss(step)`` (the batch and noise of that step, from
    their own seeded generators), gradient clipping 1.0, the EMA with its short-run warm-up, the
    loss curve every ``--log-every`` steps, a checkpoint (``save(reason)``) every
    ``--save-minutes``, at ``--minutes``, on SIGTERM/SIGINT and at the end. Returns why it
    stopped early (None: ``max_steps`` reached)."""
    last_save, last_log_t, last_log_step = time.time(), time.time(), st["step"]
    stop_reason = None
    with _StopFlag() as stop:
        while st["step"] < max_steps:
            step = st["step"]
            lr = lr_at(step, hp)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = step_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            st["step"] = step = step + 1
            # Short-run EMA warm-up: average over at most the steps seen so far.
            ema_update(ema, model, min(hp["ema"], (1 + step) / (10 + step)))

            loss_v = loss.item()
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"non-finite loss at step {step}")
            st["running"][0] += loss_v
            st["running"][1] += 1
            if step % args.log_every == 0 or step == max_steps:
                mean = st["running"][0] / st["running"][1]
                elapsed = wall_before + time.time() - t_start
                st["curve"]["step"].append(step)
                st["curve"]["loss"].append(mean)
                st["curve"]["wall_s"].append(round(elapsed, 1))
                now = time.time()
                rate = (now - last_log_t) / max(1, step - last_log_step)
                print(f"step {step:6d}/{max_steps}  loss {mean:.4f}  lr {lr:.2e}  "
                      f"{rate:.3f} s/step  {elapsed / 60:7.1f} min total", flush=True)
                st["running"] = [0.0, 0]
                last_log_t, last_log_step = now, step
            if stop.signal is not None:
                stop_reason = f"received {stop.signal}"
                break
            if args.minutes is not None and time.time() - t_start > 60 * args.minutes:
                stop_reason = f"--minutes {args.minutes} reached"
                break
            if time.time() - last_save > 60 * args.save_minutes:
                save("periodic")
                last_save = time.time()
        save(stop_reason or ("done" if st["step"] >= max_steps else "end"))
    return stop_reason


def train(args):
    out = Path(args.out)
    state_path, log_path = out / "state.pt", out / "train_log.json"
    stored = None
    if state_path.is_file():
        if not args.resume:
            raise SystemExit(f"train_ddpm: {state_path} exists; pass --resume to continue it "
                             "(or choose another --out)")
        stored = torch.load(state_path, map_location="cpu", weights_only=False)
        if stored.get("format") != STATE_FORMAT:
            raise SystemExit(f"train_ddpm: {state_path} is not a {STATE_FORMAT} state")
    elif args.resume:
        print(f"--resume: no {state_path} yet, starting a new run", flush=True)
    hp = resolve_hparams(args, stored["hparams"] if stored else None)
    max_steps = args.max_steps if args.max_steps is not None else hp["decay_steps"]

    torch.manual_seed(hp["seed"])
    images, _ = fashion_mnist("train", limit=hp["limit"])  # [N, 1, 28, 28] in [-1, 1]
    n = images.shape[0]
    if n < hp["batch_size"]:
        raise SystemExit(f"train_ddpm: {n} images < batch size {hp['batch_size']}")
    steps_per_epoch = n // hp["batch_size"]  # drop the last partial batch of each epoch

    model = make_model(hp)
    scheduler = make_scheduler()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    n_params = sum(p.numel() for p in model.parameters())
    model_config = SMOKE_CONFIG if hp["smoke"] else MODEL_CONFIG

    st = {"format": STATE_FORMAT, "hparams": hp, "model_config": model_config, "step": 0,
          "wall_s": 0.0, "curve": {"step": [], "loss": [], "wall_s": []}, "running": [0.0, 0],
          "n_images": n, "threads": args.threads, "sessions": []}
    if stored is not None:
        if stored["model_config"] != model_config or stored["n_images"] != n:
            raise SystemExit("train_ddpm: the state's model config or data size differ from "
                             "this run")
        model.load_state_dict(stored["model"])
        ema.load_state_dict(stored["ema"])
        opt.load_state_dict(stored["opt"])
        torch.set_rng_state(stored["torch_rng"])
        for k in ("step", "wall_s", "curve", "running", "sessions"):
            st[k] = stored[k]
        print(f"resumed {state_path} at step {st['step']} "
              f"({st['wall_s'] / 60:.1f} min trained so far)", flush=True)
    apply_reschedule(st, stored, hp, "train_ddpm")
    del stored
    st["max_steps"] = max_steps
    st["sessions"].append({"start_step": st["step"], "threads": args.threads,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    wall_before = st["wall_s"]

    def save(reason: str):
        st["wall_s"] = wall_before + time.time() - t_start
        st["sessions"][-1]["end_step"] = st["step"]
        full = {**st, "model": model.state_dict(), "ema": ema.state_dict(),
                "opt": opt.state_dict(), "torch_rng": torch.get_rng_state()}
        atomic_write(state_path, lambda tmp: torch.save(full, tmp))
        record = log_record(st, n_params, finished=st["step"] >= max_steps)
        atomic_write(log_path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        print(f"checkpoint ({reason}) at step {st['step']}: {state_path} "
              f"({state_path.stat().st_size / 1e6:.1f} MB)", flush=True)

    print(f"UNet2DModel {json.dumps(model_config)}: {n_params:,} parameters; {n} train images; "
          f"steps {st['step']} -> {max_steps} of batch {hp['batch_size']}; "
          f"{args.threads} thread(s)", flush=True)
    model.train()
    perm_epoch, perm = None, None

    def step_loss(step: int) -> torch.Tensor:
        nonlocal perm_epoch, perm
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            g_epoch = torch.Generator().manual_seed(derived_seed(hp["seed"], 0, epoch))
            perm, perm_epoch = torch.randperm(n, generator=g_epoch), epoch
        x0 = images[perm[i * hp["batch_size"]:(i + 1) * hp["batch_size"]]]
        g_step = torch.Generator().manual_seed(derived_seed(hp["seed"], 1, step))
        return ddpm_loss(model, scheduler, x0, g_step)

    stop_reason = run_steps(st, hp, args, max_steps, model, ema, opt, step_loss, save,
                            t_start, wall_before)
    print(f"stopped at step {st['step']}/{max_steps}: {stop_reason or 'max steps reached'}; "
          f"{(time.time() - t_start) / 60:.1f} min this run", flush=True)
    return st["step"]


def main(argv=None):
    args = parse_args(argv)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.export is not None:
            return export(args)
        return train(args)
    finally:
        torch.set_num_threads(prev_threads)  # when called in-process (tests)


if __name__ == "__main__":
    main()
