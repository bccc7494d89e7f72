"""Image-quality metrics for the demo and the benchmarks.

PSNR and SSIM come from torchmetrics (per sample, images in [-1, 1], data range 2). The
Fréchet distance is applied to the features of the in-repo Fashion-MNIST classifier
(scripts/make_model_card.py), not to Inception features (which need downloaded weights): label it
"classifier-feature FID" wherever it appears.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _metrics():
    try:
        from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                                   structural_similarity_index_measure)
    except ImportError as e:
        raise ImportError("image metrics need torchmetrics: pip install 'dflow_fast[data]'") from e
    return peak_signal_noise_ratio, structural_similarity_index_measure


def psnr(x: Tensor, ref: Tensor) -> Tensor:
    """Per-sample PSNR in dB, x and ref [B, C, H, W] in [-1, 1] (x is clamped first)."""
    fn, _ = _metrics()
    x, ref = x.detach().clamp(-1, 1).double(), ref.detach().double()
    return fn(x, ref, data_range=2.0, reduction="none", dim=(1, 2, 3)).float()


def ssim(x: Tensor, ref: Tensor) -> Tensor:
    """Per-sample SSIM (Gaussian window 11, sigma 1.5), x and ref [B, C, H, W] in [-1, 1]."""
    _, fn = _metrics()
    x, ref = x.detach().clamp(-1, 1).double(), ref.detach().double()
    return fn(x, ref, data_range=2.0, reduction="none").float()


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, F] (float64):
    ``||mu_a - mu_b||^2 + tr(Ca + Cb - 2 (Ca^1/2 Cb Ca^1/2)^1/2)``."""
    a, b = feat_a.detach().double(), feat_b.detach().double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # sqrt(Ca) via a symmetric eigendecomposition, then the trace of sqrt(sqrt(Ca) Cb sqrt(Ca)),
    # whose eigenvalues are those of Ca Cb: both symmetric PSD, so this stays real.
    ea, va = torch.linalg.eigh(ca)
    sa = (va * ea.clamp(min=0).sqrt()) @ va.T
    mid = torch.linalg.eigvalsh(sa @ cb @ sa).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * mid)


def accuracy(classifier, x: Tensor, labels: Tensor) -> float:
    """Fraction of x [N, C, H, W] the classifier assigns to ``labels`` [N]."""
    with torch.no_grad():
        return float((classifier(x).argmax(1) == labels.to(x.device)).float().mean())
