"""Tiny diffusers models with random weights (nothing is downloaded), shared by the adapter tests.
Import it after ``pytest.importorskip("diffusers")``."""
from __future__ import annotations

import diffusers
import torch

UNET = dict(sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"))


def unet(channels=1, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    m = diffusers.UNet2DModel(in_channels=channels, out_channels=channels, **{**UNET, **kw})
    return m.to(dtype).eval().requires_grad_(False)


def sd3(dtype=torch.float32):
    torch.manual_seed(0)
    m = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8)
    return m.to(dtype).eval().requires_grad_(False)
