"""Batched, seedable SimCLR augmentations for normalised image tensors, in plain torch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_ROTATION_DEG = 20.0
SCALE_RANGE = (0.8, 1.15)
MAX_TRANSLATION = 0.12  # fraction of the image size
BRIGHTNESS = 0.25  # additive shift, in normalised (std) units
CONTRAST = 0.3  # multiplicative factor range around 1
NOISE_STD = 0.05
ERASE_P = 0.25
ERASE_SIDE = (0.1, 0.3)  # erased patch side, as a fraction of the image side


def _uniform(n: int, lo: float, hi: float, like: Tensor, gen: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=like.device, dtype=like.dtype)


def _random_affine(x: Tensor, strength: float, gen: torch.Generator | None) -> Tensor:
    """Rotate, scale and translate each image; uncovered pixels take the image's minimum."""
    n = x.shape[0]
    angle = _uniform(n, -1.0, 1.0, x, gen) * math.radians(MAX_ROTATION_DEG) * strength
    # Interpolate the scale range toward 1 so strength=0 is the identity.
    lo = 1.0 + (SCALE_RANGE[0] - 1.0) * strength
    hi = 1.0 + (SCALE_RANGE[1] - 1.0) * strength
    scale = _uniform(n, lo, hi, x, gen)
    # affine_grid works in [-1, 1] coordinates, so a fraction f of the size is 2f there.
    shift = _uniform(2 * n, -1.0, 1.0, x, gen).view(n, 2) * 2 * MAX_TRANSLATION * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Pad with each image's per-channel minimum (the background for dark-background digits),
    # not 0, which in normalised space is the mean grey and would draw a visible frame.
    floor = x.amin(dim=(2, 3), keepdim=True)
    out = F.grid_sample(x - floor, grid, padding_mode="zeros", align_corners=False)
    return out + floor


def _jitter(x: Tensor, strength: float, gen: torch.Generator | None) -> Tensor:
    """Random contrast around each image's mean, then a random brightness shift."""
    n = x.shape[0]
    contrast = _uniform(n, 1.0 - CONTRAST * strength, 1.0 + CONTRAST * strength, x, gen)
    bright = _uniform(n, -BRIGHTNESS * strength, BRIGHTNESS * strength, x, gen)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast.view(n, 1, 1, 1) + mean + bright.view(n, 1, 1, 1)


def _random_erase(x: Tensor, p: float, gen: torch.Generator | None) -> Tensor:
    """Zero (the normalised mean) a random rectangle in each image with probability p."""
    n, _, h, w = x.shape
    apply = torch.rand(n, generator=gen, device=x.device) < p
    side_h = _uniform(n, *ERASE_SIDE, x, gen) * h
    side_w = _uniform(n, *ERASE_SIDE, x, gen) * w
    top = torch.rand(n, generator=gen, device=x.device, dtype=x.dtype) * (h - side_h)
    left = torch.rand(n, generator=gen, device=x.device, dtype=x.dtype) * (w - side_w)
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    in_rows = (rows >= top.view(n, 1, 1)) & (rows < (top + side_h).view(n, 1, 1))
    in_cols = (cols >= left.view(n, 1, 1)) & (cols < (left + side_w).view(n, 1, 1))
    mask = (in_rows & in_cols & apply.view(n, 1, 1)).unsqueeze(1)
    return x.masked_fill(mask, 0.0)


def simclr_augment(
    x: Tensor, generator: torch.Generator | None = None, strength: float = 1.0
) -> Tensor:
    """Return one random SimCLR view of each image in a normalised (N, C, H, W) batch.

    Applies a random affine (rotation up to +-20 deg * strength, scale 0.8-1.15, shift up to 12%
    of the size, uncovered pixels padded with the image minimum), brightness/contrast jitter,
    light gaussian noise and, with probability 0.25 * min(strength, 1), random erasing of a small
    patch (filled with 0, the normalised mean). strength scales every perturbation, so 0 gives the
    input back. Deterministic for a given generator state; the generator must live on x's device.
    """
    if x.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {x.dtype}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if x.shape[0] == 0 or strength == 0:
        return x.clone()
    dtype = x.dtype
    # grid_sample is poorly supported in half precision on CPU; work in float32 at least.
    work = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    out = _random_affine(work, strength, generator)
    out = _jitter(out, strength, generator)
    noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    out = out + NOISE_STD * strength * noise
    out = _random_erase(out, ERASE_P * min(strength, 1.0), generator)
    return out.to(dtype)
