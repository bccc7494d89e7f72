"""A job's inputs: the images (a bundled dataset, a folder of PNG/JPEG files, or an array file)
and the velocity model (bundled, or the user's ``module:function``), each checked against the other
before any work: a file that cannot be read, an image of the wrong size or channel count, an index
range outside the data, a model that does not take the images, all raise
:class:`~dflow_fast.jobs.config.JobInputError` naming the file, setting or shape."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..data import fashion_mnist, mnist_5k
from ..models import load_pretrained
from .config import DATASETS, JobInputError, resolve_indices

#: bundled velocities ``--model`` accepts by name, with the per-sample shape [C, H, W] they take
BUNDLED = {"fashion-mnist": (1, 28, 28), "fashion-mnist-ddpm": (1, 28, 28)}
#: the class task's classifier (bundled) and the shape it takes
CLASSIFIER, CLASSIFIER_SHAPE = "fashion-mnist-classifier", (1, 28, 28)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".pt", ".safetensors")
#: PIL modes read as they are: mode -> (channels, the pixel value that maps to +1)
_MODES = {"L": (1, 255.0), "LA": (2, 255.0), "RGB": (3, 255.0), "RGBA": (4, 255.0),
          "I;16": (1, 65535.0), "I;16B": (1, 65535.0), "I;16L": (1, 65535.0), "I": (1, 65535.0)}


@dataclass
class Inputs:
    """The selected problems' ground truth. ``images``: float32 [n, C, H, W] in [-1, 1] (CPU);
    ``labels``: int64 [n] or None; problem j has data index ``start + j``; ``names``: the image
    files of a folder, else None; ``digest``: SHA-256 of images and labels."""

    images: Tensor
    labels: Optional[Tensor]
    start: int
    stop: int
    source: str
    names: Optional[list[str]] = None
    digest: str = ""


def load_velocity(spec: str, device: torch.device, dtype: torch.dtype
                  ) -> tuple[Callable, Optional[tuple[int, ...]]]:
    """``(velocity(t, x), per-sample shape or None)`` for ``--model spec``: a BUNDLED name, or
    ``module:function`` / ``path/to/file.py:function`` called as ``function(device=, dtype=)``.
    A user's velocity may carry ``sample_shape`` (C, H, W); without it only the probe
    (:func:`probe`) checks that it takes the images."""
    if spec in BUNDLED:
        try:
            return load_pretrained(spec, device=device, dtype=dtype), BUNDLED[spec]
        except (FileNotFoundError, ImportError) as e:
            raise JobInputError(f"--model {spec}: {e}") from e
    mod_name, colon, fn_name = spec.rpartition(":")
    if not colon or not mod_name or not fn_name:
        raise JobInputError(f"unknown model {spec!r}: give a bundled one {sorted(BUNDLED)} or "
                            "module:function (or path/to/file.py:function)")
    module = _import(spec, mod_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise JobInputError(f"--model {spec}: {mod_name} has no function {fn_name!r}")
    try:
        velocity = fn(device=device, dtype=dtype)
    except Exception as e:  # the user's code: any failure is a refusal naming it
        raise JobInputError(f"--model {spec}: {fn_name}(device=, dtype=) raised "
                            f"{type(e).__name__}: {e}") from e
    if not callable(velocity):
        raise JobInputError(f"--model {spec}: {fn_name}() must return velocity(t, x), got "
                            f"{type(velocity).__name__}")
    shape = getattr(velocity, "sample_shape", None)
    return velocity, (tuple(int(s) for s in shape) if shape is not None else None)


def _import(spec: str, mod_name: str):
    try:
        if mod_name.endswith(".py") or "/" in mod_name:
            path = Path(mod_name).resolve()
            if not path.is_file():
                raise JobInputError(f"--model {spec}: file {path} not found")
            name = "dflow_fast_user_model_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(mod_name)
    except JobInputError:
        raise
    except Exception as e:
        raise JobInputError(f"--model {spec}: cannot import {mod_name}: {type(e).__name__}: "
                            f"{e}") from e


def probe(velocity: Callable, spec: str, x: Tensor, t: float) -> None:
    """One evaluation ``velocity(t, x[:1])`` before any work: it must run and return a tensor
    like its input."""
    x = x[:1]
    try:
        with torch.no_grad():
            v = velocity(torch.tensor(t, dtype=x.dtype, device=x.device), x)
    except Exception as e:
        raise JobInputError(f"--model {spec} does not take the data's images "
                            f"{list(x.shape)}: {type(e).__name__}: {e}") from e
    if not isinstance(v, Tensor) or v.shape != x.shape or v.dtype != x.dtype:
        got = (f"{list(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__)
        raise JobInputError(f"--model {spec}: velocity(t, x {list(x.shape)} {x.dtype}) returned "
                            f"{got}; it must return a tensor like x")


def check_task_fit(task: str, shape: tuple[int, ...], source: str) -> None:
    """Shapes a task needs: super-resolution by k needs H and W divisible by k; the class task's
    classifier takes CLASSIFIER_SHAPE."""
    if task in ("sr2", "sr4"):
        k = int(task[-1])
        if shape[1] % k or shape[2] % k:
            raise JobInputError(f"task {task}: images of {source} are {shape[1]}x{shape[2]}, "
                                f"not divisible by {k}")
    if task == "class" and tuple(shape) != CLASSIFIER_SHAPE:
        raise JobInputError(f"task class uses the bundled classifier {CLASSIFIER!r}, which takes "
                            f"[C, H, W] = {list(CLASSIFIER_SHAPE)}; {source} holds "
                            f"{list(shape)}")


def load_inputs(spec: str, indices: Optional[str], expect: Optional[tuple[int, ...]]) -> Inputs:
    """The images ``data[indices]`` of ``--data spec``, checked against the model's per-sample
    shape ``expect`` (C, H, W) where known."""
    if spec in DATASETS:
        a, b = resolve_indices(indices, DATASETS[spec], spec)
        try:
            if spec == "mnist-5k":
                images, labels = mnist_5k(limit=b)
            else:
                images, labels = fashion_mnist(spec.split(":")[1], limit=b)
        except FileNotFoundError as e:  # DatasetNotFoundError: says how to install the data
            raise JobInputError(f"--data {spec}: {e}") from e
        inputs = Inputs(images[a:b].contiguous(), labels[a:b].contiguous(), a, b, spec)
        _check_shape(inputs.images.shape[1:], expect, spec)
    else:
        path = Path(spec)
        if path.is_dir():
            inputs = _load_folder(path, indices, expect)
        elif path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES:
            inputs = _load_array_file(path, indices, expect)
        elif path.is_file():
            raise JobInputError(f"--data {spec}: unknown file type {path.suffix!r}; give a "
                                f"folder of PNG/JPEG images or a {'/'.join(ARRAY_SUFFIXES)} "
                                "file holding [N, C, H, W]")
        else:
            raise JobInputError(f"--data {spec}: not a bundled dataset {sorted(DATASETS)}, and "
                                "no such folder or file")
    inputs.digest = _digest(inputs)
    return inputs


def _check_shape(shape, expect, source: str) -> None:
    shape = tuple(int(s) for s in shape)
    if expect is None or shape == tuple(expect):
        return
    what = "channels" if shape[0] != expect[0] else "size"
    raise JobInputError(f"{source}: images are [C, H, W] = {list(shape)} but the model takes "
                        f"{list(expect)} (wrong {what})")


def _load_folder(folder: Path, indices, expect) -> Inputs:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise JobInputError(f"--data {folder}: no {'/'.join(IMAGE_SUFFIXES)} images in the "
                            "folder")
    a, b = resolve_indices(indices, len(files), f"folder {folder} ({len(files)} images)")
    arrays, first = [], None
    for p in files[a:b]:  # every selected file is decoded before any work
        x = _read_image(p)
        if first is None:
            first = (p, x.shape)
        if expect is not None:
            _check_shape(x.shape, expect, f"--data {folder}: image {p.name}")
        elif x.shape != first[1]:
            raise JobInputError(f"--data {folder}: image {p.name} is [C, H, W] = "
                                f"{list(x.shape)}, but {first[0].name} is {list(first[1])}")
        arrays.append(x)
    images = torch.from_numpy(np.stack(arrays))
    return Inputs(images, None, a, b, str(folder), names=[p.name for p in files[a:b]])


def _read_image(path: Path) -> np.ndarray:
    """One PNG/JPEG as float32 [C, H, W] in [-1, 1]; modes as _MODES (a palette image as RGB,
    RGBA with transparency; a 1-bit image as L)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise JobInputError("reading image folders needs Pillow: pip install pillow") from e
    try:
        # verify() checks a PNG's chunk CRCs and structure: a truncated PNG whose pixel data
        # happen to decompress still fails here; load() then decodes every pixel (a truncated
        # JPEG fails there), on a fresh handle as verify() requires
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode == "1":
                im = im.convert("L")
            if im.mode not in _MODES:
                raise JobInputError(f"image {path}: unsupported mode {im.mode!r} (supported: "
                                    f"{sorted(_MODES)})")
            channels, top = _MODES[im.mode]
            arr = np.asarray(im, dtype=np.float32)
    except JobInputError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise JobInputError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    arr = arr.reshape(arr.shape[0], arr.shape[1], channels).transpose(2, 0, 1)
    return np.ascontiguousarray(arr * (2.0 / top) - 1.0, dtype=np.float32)


def _load_array_file(path: Path, indices, expect) -> Inputs:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)  # slices read lazily
            images, labels = arr, None
        elif suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            images, labels = _pick(obj, path)
        else:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                key = _image_key(keys, path)
                images = f.get_slice(key)
                n = images.get_shape()[0] if images.get_shape() else 0
                a, b = _file_range(images.get_shape(), indices, path)
                images = f.get_slice(key)[a:b]
                labels = f.get_tensor("labels")[a:b] if "labels" in keys else None
                return _finish(path, images, labels, a, b, expect, sliced=True, n=n)
    except JobInputError:
        raise
    except Exception as e:
        raise JobInputError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    a, b = _file_range(tuple(images.shape), indices, path)
    return _finish(path, images, labels, a, b, expect, sliced=False, n=images.shape[0])


def _pick(obj, path: Path):
    """A .pt file's images (a tensor, or a dict with 'images' or one tensor) and labels."""
    if isinstance(obj, Tensor):
        return obj, None
    if isinstance(obj, dict):
        key = _image_key([k for k, v in obj.items() if isinstance(v, Tensor)], path)
        return obj[key], obj.get("labels")
    raise JobInputError(f"{path}: holds a {type(obj).__name__}; expected a tensor [N, C, H, W] "
                        "or a dict with 'images'")


def _image_key(keys: list, path: Path) -> str:
    if "images" in keys:
        return "images"
    if len(keys) == 1:
        return keys[0]
    raise JobInputError(f"{path}: holds {sorted(keys)}; name the images tensor 'images'")


def _file_range(shape, indices, path: Path) -> tuple[int, int]:
    if len(shape) != 4:
        raise JobInputError(f"{path}: images must be [N, C, H, W], got shape {list(shape)}")
    return resolve_indices(indices, int(shape[0]), f"{path} ({shape[0]} images)")


def _finish(path: Path, images, labels, a: int, b: int, expect, *, sliced: bool,
            n: int) -> Inputs:
    x = images if sliced else images[a:b]
    x = torch.as_tensor(np.array(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    _check_shape(x.shape[1:], expect, str(path))
    if x.dtype == torch.uint8:
        x = x.float() * (2.0 / 255.0) - 1.0
    elif x.is_floating_point():
        x = x.float()
        bad = ~torch.isfinite(x)
        if bad.any():
            i = int(bad.flatten(1).any(1).nonzero()[0])
            raise JobInputError(f"{path}: image {a + i} has non-finite values")
        if x.numel() and (x.min() < -1 or x.max() > 1):
            raise JobInputError(f"{path}: float images must lie in [-1, 1] (uint8 0..255 is "
                                f"scaled), got values in [{float(x.min()):.4g}, "
                                f"{float(x.max()):.4g}]")
    else:
        raise JobInputError(f"{path}: images must be floating point in [-1, 1] or uint8, got "
                            f"{x.dtype}")
    if labels is not None:
        labels = torch.as_tensor(labels if sliced else labels[a:b])
        if labels.dim() != 1 or labels.shape[0] != b - a or labels.is_floating_point():
            raise JobInputError(f"{path}: 'labels' must be integers [N] = [{n}]")
        labels = labels.long()
    return Inputs(x.contiguous(), labels, a, b, str(path))


def _digest(inputs: Inputs) -> str:
    h = hashlib.sha256(str(list(inputs.images.shape)).encode())
    h.update(inputs.images.numpy().tobytes())
    if inputs.labels is not None:
        h.update(inputs.labels.numpy().tobytes())
    return h.hexdigest()
