"""Small pretrained models shipped with dflow_fast, trained by ``scripts/train_*.py``.

- ``load_pretrained("fashion-mnist")``: :class:`UNet` flow-matching velocity ``v(t, x)`` on
  Fashion-MNIST 28x28 in ``[-1, 1]`` (noise at t=0, data at t=1, linear path).
- ``load_pretrained("fashion-mnist-classifier")``: :class:`SmallCNN`, logits ``[B, 10]`` and
  ``features(x) -> [B, 128]``.
- ``load_pretrained("qm9-flow")``: :class:`EGNNFlow`, an E(3)-equivariant flow-matching velocity
  ``v(t, x, mask=...)`` on QM9 molecules, ``x [B, M, 3 + 5]`` (positions, atom-type features).
- ``load_pretrained("qm9-alpha-guide")`` / ``("qm9-alpha-eval")``: :class:`EGNNRegressor`,
  polarizability ``alpha(positions, types, mask) -> [B]`` (Bohr^3) trained on the two disjoint
  halves of QM9's train split (the flow's half / the other one; scripts/train_qm9.py).

Checkpoints are safetensors files inside the package (``models/weights/``) whose metadata holds the
architecture name and its constructor config as JSON, so loading needs no network and no pickle.
See ``MODEL_CARD.md`` for how they were trained and how good they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .classifier import SmallCNN
from .egnn import EGNNFlow, EGNNRegressor
from .unet import UNet

__all__ = [
    "UNet", "SmallCNN", "EGNNFlow", "EGNNRegressor", "load_pretrained", "load_checkpoint", "save_checkpoint",
    "PRETRAINED", "WEIGHTS_DIR",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: name -> checkpoint file inside WEIGHTS_DIR
PRETRAINED = {
    "fashion-mnist": "fashion_mnist_unet.safetensors",
    "fashion-mnist-classifier": "fashion_mnist_classifier.safetensors",
    # a diffusers UNet2DModel trained with DDPM (epsilon) by scripts/train_ddpm.py; loaded as the
    # adapted probability-flow velocity (needs the [diffusers] extra)
    "fashion-mnist-ddpm": "fashion_mnist_ddpm.safetensors",
    # QM9 (scripts/train_qm9.py): the EGNN flow on train half A, the alpha regressors on half A
    # (the D-Flow cost) and half B (evaluation only)
    "qm9-flow": "qm9_flow.safetensors",
    "qm9-alpha-guide": "qm9_alpha_guide.safetensors",
    "qm9-alpha-eval": "qm9_alpha_eval.safetensors",
}
#: the metadata ``arch`` of a diffusers UNet2DModel checkpoint (scripts/train_ddpm.py --export)
DIFFUSERS_UNET = "diffusers.UNet2DModel"

_ARCHS = {"UNet": UNet, "SmallCNN": SmallCNN, "EGNNFlow": EGNNFlow,
          "EGNNRegressor": EGNNRegressor}


def save_checkpoint(model: nn.Module, path, extra_metadata: Mapping[str, object] | None = None):
    """Write ``model``'s weights and architecture config to a safetensors file.

    ``model`` must be a :class:`UNet`, :class:`SmallCNN`, :class:`EGNNFlow` or
    :class:`EGNNRegressor` (it carries ``.config``). Extra
    metadata values are stored as JSON strings (safetensors metadata is str -> str).
    """
    from safetensors.torch import save_file

    arch = type(model).__name__
    if arch not in _ARCHS:
        raise ValueError(f"cannot save a {arch}; known architectures: {sorted(_ARCHS)}")
    metadata = {"format": "dflow_fast.models/1", "arch": arch, "config": json.dumps(model.config)}
    for k, v in (extra_metadata or {}).items():
        metadata[str(k)] = v if isinstance(v, str) else json.dumps(v)
    # safetensors needs contiguous tensors (training may use channels_last).
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)
    tmp.replace(path)  # atomic: a reader never sees a half-written checkpoint


def load_checkpoint(path, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Build the model described by a checkpoint's metadata and load its weights.

    Returns the module in eval mode with ``requires_grad=False`` on every parameter (the models
    are frozen inside D-Flow; gradients flow to the inputs only). ``dtype`` casts the weights
    (e.g. ``torch.float64`` for reference computations).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    arch = metadata.get("arch")
    if arch == DIFFUSERS_UNET:
        return _load_diffusion_velocity(path, metadata, device, dtype)
    if arch not in _ARCHS:
        raise ValueError(f"{path}: unknown or missing architecture {arch!r} in metadata")
    model = _ARCHS[arch](**json.loads(metadata["config"]))
    model.load_state_dict(load_file(str(path), device=str(device)))
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_diffusion_velocity(path: Path, metadata: dict, device, dtype) -> nn.Module:
    """A diffusers UNet2DModel checkpoint as ``velocity(t, x)`` in dflow_fast's convention
    (:func:`dflow_fast.adapters.from_diffusers` with the DDPM scheduler stored beside it)."""
    from safetensors.torch import load_file

    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError as e:
        raise ImportError(f"{path} holds a diffusers UNet2DModel: pip install "
                          f"'dflow_fast[diffusers]'") from e
    from ..adapters.diffusers import from_diffusers

    unet = UNet2DModel(**json.loads(metadata["config"]))
    unet.load_state_dict(load_file(str(path), device=str(device)))
    unet = unet.to(device=device, dtype=dtype) if dtype is not None else unet.to(device)
    unet.eval().requires_grad_(False)
    scheduler = DDPMScheduler(**json.loads(metadata["scheduler"]))
    return from_diffusers(unet, scheduler)


def load_pretrained(name: str, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model shipped with the package by name (no network).

    Args:
        name: one of ``PRETRAINED``: ``"fashion-mnist"`` (velocity ``forward(t, x)``,
            ``x: [B, 1, 28, 28]``, ``t`` 0-dim or ``[B]``), ``"fashion-mnist-classifier"``
            (``forward(x) -> [B, 10]`` logits, ``features(x) -> [B, 128]``) or
            ``"fashion-mnist-ddpm"`` (the DDPM UNet as a velocity ``forward(t, x)`` with
            ``time_grid(steps)``; needs diffusers), ``"qm9-flow"`` (``forward(t, x, mask=None)``,
            ``x: [B, M, 8]``) or ``"qm9-alpha-guide"`` / ``"qm9-alpha-eval"``
            (``forward(positions, types, mask=None) -> [B]``).
        device, dtype: where and in which floating dtype to put the weights.

    Returns:
        The frozen module in eval mode.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; known: {sorted(PRETRAINED)}")
    path = WEIGHTS_DIR / PRETRAINED[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights for {name!r} are missing at {path}; the package was installed "
            "without its data files (reinstall dflow_fast) or they were not trained yet "
            "(see scripts/train_flow.py, scripts/train_classifier.py, scripts/train_ddpm.py and "
            "scripts/train_qm9.py)."
        )
    return load_checkpoint(path, device=device, dtype=dtype)
