"""Train the QM9 models: the EGNN flow (``--model flow``, ``load_pretrained("qm9-flow")``) and the
two EGNN polarizability regressors (``--model guide`` on train half A, ``--model eval`` on half
B; ``"qm9-alpha-guide"`` / ``"qm9-alpha-eval"``).

Data: :func:`dflow_fast.data.qm9` (qm9pack; its fixed split). The flow and the guide regressor
see only ``train_a``, the evaluation regressor only ``train_b`` (EDM's protocol: the evaluator
never sees the generator's molecules).

**flow**: :class:`EGNNFlow`, state ``x = [positions (zero CoM, Angstrom), type_scale * one-hot]``
``[B, M, 8]``; conditional flow matching on the linear path ``x_t = (1 - t) x0 + t x1``,
``t ~ U(0, 1)``, ``x0`` standard Gaussian with the positions projected to zero centre of mass
over the real atoms and padded slots zero; loss ``|v(t, x_t) - (x1 - x0)|^2`` averaged over the
real atoms' 8 coordinates. **guide / eval**: :class:`EGNNRegressor` on (positions, one-hot,
mask), L1 loss on alpha standardized by the half's mean and std (EDM trains its property
classifiers with L1); the valid MAE is logged at each checkpoint, the test MAE on the whole test
split is computed by ``--export`` and stored in the checkpoint's metadata and JSON.

Batches: each epoch is a seeded permutation of the half; every 32 consecutive batches are sorted
by atom count and the batch order is shuffled again, so a batch holds molecules of similar size
and is cut to its largest molecule (dense pairs cost M^2; this halves the padding).

Runs stop and resume like ``scripts/train_ddpm.py`` (whose checkpointing helpers this reuses):
``<out>/state.pt`` (model, EMA, AdamW, step, curve, RNG; atomic writes every ``--save-minutes``,
at ``--minutes``, at the end and on SIGTERM/SIGINT), ``<out>/train_log.json`` (the loss curve
and settings), ``--resume`` (hyperparameters from the state; a different value is an error, except
``--decay-steps`` with ``--reschedule``, recorded under ``reschedules``),
``--export PATH`` (the EMA weights as safetensors + ``PATH.json``). The batch order and noise of
step s come from generators seeded by (seed, epoch) and (seed, s): a resumed run repeats an
uninterrupted one.

Examples (the shipped runs)::

    python scripts/train_qm9.py --model flow --threads 1 --minutes 150 \\
        --out dflow_fast/models/weights/qm9_flow_run          # add --resume to continue
    python scripts/train_qm9.py --model flow --out dflow_fast/models/weights/qm9_flow_run \\
        --export dflow_fast/models/weights/qm9_flow.safetensors
    python scripts/train_qm9.py --model guide --resume --threads 1 --minutes 60 \\
        --out dflow_fast/models/weights/qm9_guide_run
    python scripts/train_qm9.py --model guide --out dflow_fast/models/weights/qm9_guide_run \\
        --export dflow_fast/models/weights/qm9_alpha_guide.safetensors
    # the same with --model eval, qm9_eval_run, qm9_alpha_eval.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled
sys.path.insert(0, str(ROOT / "scripts"))

from dflow_fast.data import qm9  # noqa: E402
from dflow_fast.models import save_checkpoint  # noqa: E402
from dflow_fast.models.egnn import EGNNFlow, EGNNRegressor, zero_com_noise  # noqa: E402
from train_ddpm import apply_reschedule, atomic_write, derived_seed, run_steps  # noqa: E402
from train_ddpm import resolve_hparams as ddpm_resolve_hparams  # noqa: E402

STATE_FORMAT = "dflow_fast.train_qm9/1"
HALF = {"flow": "train_a", "guide": "train_a", "eval": "train_b"}
#: constructor kwargs of the shipped models, and of the --smoke ones
MODEL_CONFIGS = {
    "flow": {"hidden": 96, "n_layers": 6, "type_scale": 0.25},
    "guide": {"hidden": 96, "n_layers": 4}, "eval": {"hidden": 96, "n_layers": 4},
}
SMOKE_CONFIGS = {"flow": {"hidden": 16, "n_layers": 2, "type_scale": 0.25},
                 "guide": {"hidden": 16, "n_layers": 2}, "eval": {"hidden": 16, "n_layers": 2}}
RUN_DEFAULTS = {
    "batch_size": 64, "lr": 5e-4, "min_lr_ratio": 0.05, "schedule": "cosine", "warmup": 500,
    "decay_steps": 40_000, "weight_decay": 0.0, "ema": 0.999, "seed": 0, "limit": None,
    "smoke": False,
}
#: the regressors converge faster than the flow: a shorter cosine horizon
REGRESSOR_DEFAULTS = {"decay_steps": 10_000}
BUCKET = 32  # batches sorted by size together


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(HALF), required=True)
    p.add_argument("--out", type=Path, required=True, help="folder of state.pt, train_log.json")
    p.add_argument("--resume", action="store_true", help="continue from <out>/state.pt")
    p.add_argument("--reschedule", action="store_true",
                   help="with --resume: accept a new --decay-steps (recorded in the log)")
    p.add_argument("--export", type=Path, default=None, metavar="PATH",
                   help="write the EMA weights of <out>/state.pt as safetensors and exit")
    p.add_argument("--batch-size", type=int, default=None, help="default 64")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, default 5e-4")
    p.add_argument("--schedule", choices=["cosine", "constant"], default=None)
    p.add_argument("--min-lr-ratio", type=float, default=None, help="default 0.05")
    p.add_argument("--warmup", type=int, default=None, help="default 500 steps")
    p.add_argument("--decay-steps", type=int, default=None,
                   help="cosine horizon, default 40000 (flow) / 10000 (regressors)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW, default 0")
    p.add_argument("--ema", type=float, default=None, help="default 0.999")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--limit", type=int, default=None, help="only the first N molecules")
    p.add_argument("--smoke", action="store_const", const=True, default=None,
                   help="tiny model for tests; --limit defaults to 128")
    p.add_argument("--max-steps", type=int, default=None, help="default --decay-steps")
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget of this run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-minutes", type=float, default=5.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-limit", type=int, default=2000,
                   help="regressors: valid molecules scored at each checkpoint (default 2000)")
    return p.parse_args(argv)


def resolve_hparams(args, stored):
    defaults = {**RUN_DEFAULTS, **({} if args.model == "flow" else REGRESSOR_DEFAULTS)}
    return ddpm_resolve_hparams(args, stored, defaults, "train_qm9", smoke_limit=128)


def make_model(kind: str, config: dict):
    return EGNNFlow(**config) if kind == "flow" else EGNNRegressor(**config)


def epoch_batches(n_atoms: torch.Tensor, batch: int, seed: int, epoch: int) -> list:
    """The epoch's batches (index tensors): a seeded permutation, sorted by size within buckets
    of BUCKET batches, in a seeded random order."""
    g = torch.Generator().manual_seed(derived_seed(seed, 0, epoch))
    perm = torch.randperm(len(n_atoms), generator=g)
    steps = len(n_atoms) // batch  # drop the last partial batch
    out = []
    for b0 in range(0, steps, BUCKET):
        chunk = perm[b0 * batch:min(steps, b0 + BUCKET) * batch]
        chunk = chunk[torch.sort(n_atoms[chunk], stable=True).indices]
        out += list(chunk.split(batch))
    order = torch.randperm(len(out), generator=g)
    return [out[i] for i in order]


def cut(mol, idx):
    """Molecules ``idx`` with the atom slots cut to the largest one (real atoms come first)."""
    M = int(mol.mask[idx].sum(1).max())
    return (mol.positions[idx, :M], mol.one_hot[idx, :M], mol.mask[idx, :M],
            mol.properties["alpha"][idx])


def flow_loss(model, pos, one_hot, mask, g):
    x1 = torch.cat([pos, model.type_scale * one_hot], -1)
    x0 = zero_com_noise(mask, one_hot.shape[-1], generator=g)
    t = torch.rand(pos.shape[0], generator=g)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    err = (model(t, xt, mask) - (x1 - x0)).square() * mask[..., None]
    return err.sum() / (mask.sum() * x1.shape[-1])


@torch.no_grad()
def regressor_mae(model, mol, batch=256) -> float:
    """Mean absolute error of alpha (Bohr^3) over ``mol``."""
    model.eval()
    err = 0.0
    for i in range(0, len(mol), batch):
        pos, oh, mask, alpha = cut(mol, torch.arange(i, min(len(mol), i + batch)))
        err += (model(pos, oh, mask) - alpha).abs().sum().item()
    return err / len(mol)


def log_record(st, n_params, finished):
    hp, curve = st["hparams"], st["curve"]
    return {"model": st["kind"], "arch": "EGNNFlow" if st["kind"] == "flow" else "EGNNRegressor",
            "config": st["model_config"], "parameters": n_params, "objective": st["objective"],
            "data": f"QM9 (qm9pack) {HALF[st['kind']]}", "train_molecules": st["n_train"],
            "steps": st["step"], "wall_s": round(st["wall_s"], 1), "threads": st["threads"],
            "final_loss": curve["loss"][-1] if curve["loss"] else None, "hparams": hp,
            "valid_mae": st.get("valid_mae"), "torch": torch.__version__,
            "platform": platform.platform(), "reschedules": st.get("reschedules", []),
            "finished": finished, "curve": curve}


def export(args):
    state_path = args.out / "state.pt"
    if not state_path.is_file():
        raise SystemExit(f"train_qm9: nothing to export, {state_path} does not exist")
    st = torch.load(state_path, map_location="cpu", weights_only=False)
    ema = make_model(st["kind"], st["model_config"])
    ema.load_state_dict(st["ema"])
    n_params = sum(p.numel() for p in ema.parameters())
    record = log_record(st, n_params, finished=st["step"] >= st.get("max_steps", st["step"]))
    if st["kind"] != "flow":
        test = qm9("test", limit=st["hparams"]["limit"] and 512)
        record["test_mae"] = regressor_mae(ema, test)
        record["test_molecules"] = len(test)
        print(f"test MAE {record['test_mae']:.4f} Bohr^3 on {len(test)} molecules", flush=True)
    path = Path(args.export)
    training = {k: v for k, v in record.items() if k not in ("curve", "config")}
    save_checkpoint(ema, path, extra_metadata={"training": training})
    record["checkpoint"] = path.name
    atomic_write(path.with_suffix(".json"), lambda t: t.write_text(json.dumps(record, indent=1)))
    print(f"exported the EMA weights at step {st['step']} ({n_params:,} parameters) to {path} "
          f"({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    return record


def train(args):
    out = Path(args.out)
    state_path, log_path = out / "state.pt", out / "train_log.json"
    stored = None
    if state_path.is_file():
        if not args.resume:
            raise SystemExit(f"train_qm9: {state_path} exists; pass --resume to continue it")
        stored = torch.load(state_path, map_location="cpu", weights_only=False)
        if stored.get("format") != STATE_FORMAT or stored["kind"] != args.model:
            raise SystemExit(f"train_qm9: {state_path} is not a {STATE_FORMAT} state of a "
                             f"--model {args.model} run")
    elif args.resume:
        print(f"--resume: no {state_path} yet, starting a new run", flush=True)
    hp = resolve_hparams(args, stored["hparams"] if stored else None)
    max_steps = args.max_steps if args.max_steps is not None else hp["decay_steps"]
    kind = args.model
    torch.manual_seed(hp["seed"])
    mol = qm9(HALF[kind], limit=hp["limit"])
    n = len(mol)
    if n < hp["batch_size"]:
        raise SystemExit(f"train_qm9: {n} molecules < batch size {hp['batch_size']}")
    config = dict((SMOKE_CONFIGS if hp["smoke"] else MODEL_CONFIGS)[kind])
    if kind != "flow":  # standardize alpha with the half's statistics
        a = mol.properties["alpha"].double()
        config.update(mean=round(a.mean().item(), 4), std=round(a.std().item(), 4))
    valid = None if kind == "flow" else qm9("valid", limit=min(args.eval_limit, 10_000))

    model = make_model(kind, config)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    n_params = sum(p.numel() for p in model.parameters())
    objective = ("flow matching, linear path, zero-CoM Gaussian source, MSE on v = x1 - x0"
                 if kind == "flow" else "L1 on standardized alpha")
    st = {"format": STATE_FORMAT, "kind": kind, "hparams": hp, "model_config": config,
          "objective": objective, "step": 0, "wall_s": 0.0,
          "curve": {"step": [], "loss": [], "wall_s": []}, "running": [0.0, 0], "n_train": n,
          "threads": args.threads, "sessions": []}
    if stored is not None:
        if stored["model_config"] != config or stored["n_train"] != n:
            raise SystemExit("train_qm9: the state's model config or data size differ")
        model.load_state_dict(stored["model"])
        ema.load_state_dict(stored["ema"])
        opt.load_state_dict(stored["opt"])
        torch.set_rng_state(stored["torch_rng"])
        for k in ("step", "wall_s", "curve", "running", "sessions", "valid_mae"):
            if k in stored:
                st[k] = stored[k]
        print(f"resumed {state_path} at step {st['step']} ({st['wall_s'] / 60:.1f} min so far)",
              flush=True)
    apply_reschedule(st, stored, hp, "train_qm9")
    del stored
    st["max_steps"] = max_steps
    st["sessions"].append({"start_step": st["step"], "threads": args.threads,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    out.mkdir(parents=True, exist_ok=True)
    t_start, wall_before = time.time(), st["wall_s"]

    def save(reason):
        st["wall_s"] = wall_before + time.time() - t_start
        st["sessions"][-1]["end_step"] = st["step"]
        if valid is not None:
            st["valid_mae"] = regressor_mae(ema, valid)
            model.train()
        full = {**st, "model": model.state_dict(), "ema": ema.state_dict(),
                "opt": opt.state_dict(), "torch_rng": torch.get_rng_state()}
        atomic_write(state_path, lambda tmp: torch.save(full, tmp))
        rec = log_record(st, n_params, finished=st["step"] >= max_steps)
        atomic_write(log_path, lambda tmp: tmp.write_text(json.dumps(rec, indent=1)))
        extra = f", valid MAE {st['valid_mae']:.3f}" if valid is not None else ""
        print(f"checkpoint ({reason}) at step {st['step']}{extra}: {state_path}", flush=True)

    print(f"{kind}: {type(model).__name__} {json.dumps(config)}: {n_params:,} parameters; "
          f"{n} molecules ({HALF[kind]}); steps {st['step']} -> {max_steps} of batch "
          f"{hp['batch_size']}; {args.threads} thread(s)", flush=True)
    model.train()
    steps_per_epoch = n // hp["batch_size"]
    batches, batches_epoch = None, None
    n_atoms = mol.n_atoms

    def step_loss(step: int) -> torch.Tensor:
        nonlocal batches, batches_epoch
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches = epoch_batches(n_atoms, hp["batch_size"], hp["seed"], epoch)
            batches_epoch = epoch
        pos, oh, mask, alpha = cut(mol, batches[i])
        g = torch.Generator().manual_seed(derived_seed(hp["seed"], 1, step))
        if kind == "flow":
            return flow_loss(model, pos, oh, mask, g)
        pred = (model(pos, oh, mask) - model.mean) / model.std
        return (pred - (alpha - model.mean) / model.std).abs().mean()

    stop_reason = run_steps(st, hp, args, max_steps, model, ema, opt, step_loss, save,
                            t_start, wall_before)
    print(f"stopped at step {st['step']}/{max_steps}: {stop_reason or 'max steps reached'}",
          flush=True)
    return st


def main(argv=None):
    args = parse_args(argv)
    prev = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return export(args) if args.export is not None else train(args)
    finally:
        torch.set_num_threads(prev)


if __name__ == "__main__":
    main()
