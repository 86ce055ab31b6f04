"""Section "cost": what transforming a stored row costs beside re-embedding its image.

Both are measured in one process with one torch thread count: ResNet-50 images/s at 224 px
(the papers' backbone, the backfill's unit of work) and rows/s of the FCT/FastFill
transformation through carryover's own `apply_transformation`, with FLOP counts for both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.bench.common import Figure
from pipeline.models.compat import Transformation, fold_batchnorm
from pipeline.models.resnet import resnet50_embedder
from pipeline.train.transformation import apply_transformation

SECTION = "cost"
IMAGE_SIZE = 224
TRANSFORM_BATCH = 8192  # apply_transformation's default batch, as the embed stage uses


@dataclass
class Throughput:
    """One measured rate and what it was measured on."""

    per_second: float
    items: int
    seconds: float
    flops_per_item: int
    info: dict[str, Any] = field(default_factory=dict)


def count_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates per input row of every Conv2d and Linear, counted with forward hooks
    (batch norm, activations, pooling and residual adds are not counted: they are <1% here)."""
    total = [0]

    def conv(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        kh, kw = m.kernel_size
        total[0] += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        total[0] += out.numel() * m.in_features

    hooks = [
        mod.register_forward_hook(conv if isinstance(mod, nn.Conv2d) else linear)
        for mod in model.modules()
        if isinstance(mod, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return total[0] // inputs[0].shape[0]


def linear_flops(model: nn.Module) -> int:
    """2·in·out per Linear layer (its weight shape): FLOPs of one row through every layer."""
    return sum(
        2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)
    )


def measure_embedder(
    batch: int = 16, seconds: float = 20.0, image_size: int = IMAGE_SIZE
) -> Throughput:
    """ResNet-50 images/s on random 3-channel images: eval mode, inference_mode, warm-up first."""
    torch.manual_seed(0)
    model = resnet50_embedder().eval()
    x = torch.randn(batch, 3, image_size, image_size)
    flops = 2 * count_macs(model, x[:1])
    with torch.inference_mode():
        # Warm-up: first calls pick kernels and grow allocator pools.
        for _ in range(2):
            model(x)
        images, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or images == 0:
            model(x)
            images += batch
    elapsed = time.perf_counter() - t0
    info = {
        "model": f"ResNet-50 → {model.embedding_dim}-d, {image_size}x{image_size}x3, fp32",
        "batch": batch,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return Throughput(images / elapsed, images, elapsed, flops, info)


def measure_transformation(
    dim: int = 128, side_dim: int = 32, rows: int = 200_000, batch: int = TRANSFORM_BATCH
) -> Throughput:
    """rows/s of production's transformation (FastFill head on, default inner width)."""
    torch.manual_seed(0)
    arch = {"old_dim": dim, "new_dim": dim, "side_dim": side_dim, "inner_dim": None}
    # As the executor's TransformChain runs it: eval mode, BatchNorm folded into the Linears.
    model = fold_batchnorm(Transformation(**arch, uncertainty=True).eval())
    rng = np.random.default_rng(0)
    old = rng.standard_normal((rows, dim), dtype=np.float32)
    side = rng.standard_normal((rows, side_dim), dtype=np.float32) if side_dim else None
    warm = min(rows, batch)
    apply_transformation(model, old[:warm], None if side is None else side[:warm], batch)
    t0 = time.perf_counter()
    pred, log_var = apply_transformation(model, old, side, batch)
    elapsed = time.perf_counter() - t0
    if pred.shape != (rows, dim) or log_var is None or not np.isfinite(pred).all():
        raise RuntimeError(f"transformation returned {pred.shape}, log_var={log_var is not None}")
    info = {
        "model": f"FCT transformation {model.config()}, BatchNorm folded",
        "arch": model.config(),
        "batch": batch,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return Throughput(rows / elapsed, rows, elapsed, linear_flops(model), info)


def run_cost(
    batch: int = 16, seconds: float = 20.0, dim: int = 128, side_dim: int = 32, rows: int = 200_000
) -> list[Figure]:
    """ResNet-50 images/s, transformation rows/s, and their ratio, with FLOP counts."""
    threads = torch.get_num_threads()
    emb = measure_embedder(batch, seconds)
    tr = measure_transformation(dim, side_dim, rows)
    if torch.get_num_threads() != threads:
        raise RuntimeError("torch thread count changed between the two measurements")
    common = {"torch_threads": threads}
    flops = {
        "resnet50_flops_per_image": emb.flops_per_item,
        "transformation_flops_per_row": tr.flops_per_item,
        "flop_ratio": emb.flops_per_item / tr.flops_per_item,
    }
    gflops = {
        "resnet50_gflop_per_s": emb.per_second * emb.flops_per_item / 1e9,
        "transformation_gflop_per_s": tr.per_second * tr.flops_per_item / 1e9,
    }
    return [
        Figure(
            SECTION,
            "resnet50 images/s",
            emb.per_second,
            "images/s",
            note=f"{emb.info['model']}, batch {batch}, {emb.items} images in {emb.seconds:.1f} s",
            extra={**common, **emb.info, "flops_per_image": emb.flops_per_item, **gflops},
        ),
        Figure(
            SECTION,
            "transformation rows/s",
            tr.per_second,
            "rows/s",
            note=f"{dim}-d + {side_dim}-d side info, FastFill head, batches of {TRANSFORM_BATCH}",
            extra={**common, **tr.info, "flops_per_row": tr.flops_per_item, **gflops},
        ),
        Figure(
            SECTION,
            "transform vs backfill cost",
            tr.per_second,
            "rows/s",
            baseline="resnet50 images/s",
            baseline_value=emb.per_second,
            note="ratio = rows transformed in the time one image is embedded (decode excluded)",
            extra={**common, **flops, **gflops},
        ),
    ]
