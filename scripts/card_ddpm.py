"""The DDPM half of ``scripts/make_model_card.py --ddpm``: loss curve, samples and the
classifier-feature FID of the bundled diffusers UNet2DModel, sampled two ways at the same number
of network evaluations (NFE): dflow_fast's midpoint solve of the probability-flow ODE through
``dflow_fast.adapters.from_diffusers`` (the path D-Flow differentiates), and diffusers' own DDIM
loop (eta = 0) as the library's reference sampler."""
from __future__ import annotations

import json
import time

import torch

import dflow_fast
from dflow_fast.data import fashion_mnist
from dflow_fast.metrics import frechet_distance
from dflow_fast.models import load_checkpoint


@torch.no_grad()
def ddim_sample(unet, scheduler_config: dict, x: torch.Tensor, nfe: int) -> torch.Tensor:
    """diffusers' DDIM (eta = 0) with ``nfe`` steps from noise ``x`` [B, 1, 28, 28]."""
    from diffusers import DDIMScheduler, DDPMScheduler

    sched = DDIMScheduler.from_config(DDPMScheduler(**scheduler_config).config)
    sched.set_timesteps(nfe)
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def measure_ddpm(args, plt, batched, image_grid) -> dict:
    """Writes card/ddpm_loss_curve.png and card/ddpm_samples.png; returns the metrics."""
    velocity = load_checkpoint(args.ddpm_weights)
    clf = load_checkpoint(args.classifier)
    log = json.loads(args.ddpm_weights.with_suffix(".json").read_text())
    x_test, _ = fashion_mnist("test")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(log["curve"]["step"], log["curve"]["loss"])
    ax.set(xlabel="step", ylabel="epsilon MSE", yscale="log",
           title=f"DDPM UNet2DModel, batch {log['batch_size']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out_dir / "ddpm_loss_curve.png", dpi=110)
    plt.close(fig)

    n, nfe = args.n_fid, 2 * args.steps  # midpoint: two evaluations per step
    x0 = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    grid = velocity.time_grid(args.steps)
    t0 = time.time()
    ours = batched(lambda z: dflow_fast.solve(velocity, z, time_grid=grid), x0, args.batch_size)
    ours_s = time.time() - t0
    t0 = time.time()
    ddim = batched(lambda z: ddim_sample(velocity.model, log["scheduler"], z, nfe), x0,
                   args.batch_size)
    ddim_s = time.time() - t0

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.8))
    for ax, x, title in ((axes[0], ours, f"dflow_fast midpoint, {args.steps} steps"),
                         (axes[1], ddim, f"diffusers DDIM, {nfe} steps")):
        ax.imshow(image_grid(x[:64], 8), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{title} ({nfe} NFE)")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out_dir / "ddpm_samples.png", dpi=110)
    plt.close(fig)

    f_real = batched(clf.features, x_test[:n], 500)
    fid = {k: frechet_distance(batched(clf.features, x.clamp(-1, 1), 500), f_real)
           for k, x in (("dflow_fast_midpoint", ours), ("diffusers_ddim", ddim))}
    hist = torch.bincount(batched(clf, ours.clamp(-1, 1), 500).argmax(1), minlength=10)
    return {
        "file": args.ddpm_weights.name, "size_bytes": args.ddpm_weights.stat().st_size,
        "parameters": log["parameters"], "config": log["config"], "scheduler": log["scheduler"],
        "steps": log["steps"], "batch_size": log["batch_size"], "lr": log["lr"],
        "ema": log["ema"], "hparams": log["hparams"], "wall_s": log["wall_s"],
        "threads": log["threads"], "final_loss": log["final_loss"],
        "finished": log.get("finished"),
        "reschedules": log.get("reschedules", []),
        "fid_classifier_features": {"n": n, "nfe": nfe, "seed": args.seed, **fid,
                                    "note": "vs test images 0..n-1; same classifier and "
                                            "images as the flow model's FID"},
        "sampling_wall_s": {"dflow_fast_midpoint": round(ours_s, 1),
                            "diffusers_ddim": round(ddim_s, 1)},
        "generated_class_histogram": hist.tolist(),
        "torch": torch.__version__, "diffusers": log.get("diffusers"),
    }


def _reschedules(d: dict) -> str:
    """The horizon changes of a ``--reschedule``d run, as a clause of the optimizer row."""
    return "".join(f" (planned {r['decay_steps_from']:,}, shortened at step {r['step']:,} to fit "
                   f"the CPU budget)" if r["decay_steps_to"] < r["decay_steps_from"] else
                   f" (planned {r['decay_steps_from']:,}, extended at step {r['step']:,})"
                   for r in d.get("reschedules", []))


def render_ddpm(d: dict, classes) -> str:
    """The card's DDPM section from :func:`measure_ddpm`'s metrics."""
    fid, hp = d["fid_classifier_features"], d["hparams"]
    hist = ", ".join(f"{c} {k}" for c, k in zip(classes, d["generated_class_histogram"]))
    status = ("finished" if d.get("finished") else
              f"an intermediate export: {d['steps']:,} of {hp['decay_steps']:,} planned steps")
    return f"""
## `load_pretrained("fashion-mnist-ddpm")`: DDPM (diffusers UNet2DModel, epsilon prediction)

Loaded as the probability-flow ODE velocity through `dflow_fast.adapters.from_diffusers` (t = 0
noise, t = 1 data; `velocity.time_grid(steps)` follows the scheduler's spacing); needs the
`[diffusers]` extra.

| | |
|---|---|
| architecture | diffusers `UNet2DModel`, config `{json.dumps(d['config'])}` |
| scheduler | `DDPMScheduler` `{json.dumps(d['scheduler'])}` |
| parameters | {d['parameters']:,} |
| checkpoint | `weights/{d['file']}`, {d['size_bytes'] / 1e6:.1f} MB, EMA weights (decay {d['ema']}) |
| objective | DDPM: x_tau = sqrt(abar) x + sqrt(1 - abar) eps, tau ~ U{{0..999}}, MSE on eps |
| optimizer | AdamW, lr {d['lr']}, {hp['warmup']} warm-up steps then {hp['schedule']} decay to {hp['min_lr_ratio']}x at step {hp['decay_steps']:,}{_reschedules(d)}, gradient clipping 1.0 |
| training | {d['steps']:,} steps of batch {d['batch_size']} ({d['steps'] * d['batch_size'] / 60000:.1f} epochs), {d['wall_s'] / 3600:.1f} h wall time on {d['threads']} thread ({status}) |
| final training loss | {d['final_loss']:.4f} |

![DDPM loss](card/ddpm_loss_curve.png)

The same noise sampled two ways at {fid['nfe']} network evaluations each (left: the adapter's
probability-flow ODE with dflow_fast's midpoint solver, the path D-Flow differentiates; right:
diffusers' own DDIM loop):

![DDPM samples](card/ddpm_samples.png)

| sampler ({fid['nfe']} NFE, n = {fid['n']}) | FID (classifier features) vs test images 0..{fid['n'] - 1} | seconds (1 thread) |
|---|---:|---:|
| dflow_fast midpoint through the adapter | {fid['dflow_fast_midpoint']:.2f} | {d['sampling_wall_s']['dflow_fast_midpoint']} |
| diffusers DDIM (eta = 0) | {fid['diffusers_ddim']:.2f} | {d['sampling_wall_s']['diffusers_ddim']} |

Classes of the midpoint samples as predicted by the classifier: {hist}. Regenerate this section
with `python scripts/make_model_card.py --ddpm --threads 1`.
"""
