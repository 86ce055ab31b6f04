"""What this upgrade's own models cost, measured on a short sample on the driver: the new
model's images/s (decode + embed) and h's rows/s. The planner prices with these instead of a
profile measured on other models: a 1,280-d h can cost as much as the model it replaces."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from pipeline.config import EmbedConfig, PreprocessConfig, StorageConfig
from pipeline.data.decode import decode_batch
from pipeline.data.sources import ImageLayout
from pipeline.embed.probe import sample_images
from pipeline.embed.transform import TransformChain
from pipeline.models.compat import Transformation, fold_batchnorm

WARMUP_ROWS = 8  # the first call pays for lazy initialisation (threads, allocator)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def embed_rate(
    model: nn.Module,
    pre: PreprocessConfig,
    files: list[str],
    storage: StorageConfig | None,
    cfg: EmbedConfig,
    rows: int,
    layout: ImageLayout | None = None,
) -> tuple[float | None, int]:
    """Images/s of decoding `rows` gallery images with `pre` and embedding them with `model`
    (None: no images). A model not trained yet is timed untrained: the cost is the same."""
    t = sample_images(files, storage, rows + WARMUP_ROWS, layout)
    if t.num_rows <= WARMUP_ROWS:
        return None, 0
    images = np.empty(t.num_rows, dtype=object)
    images[:] = t["image"].to_pylist()
    keys = t["key"].to_numpy(zero_copy_only=False)
    shape = (-1, pre.channels, pre.input_size, pre.input_size)
    torch.set_num_threads(cfg.torch_threads)
    model.eval()

    def run(lo: int, hi: int) -> None:
        dec = decode_batch(
            {"key": keys[lo:hi], "image": images[lo:hi]}, pre, cfg.max_decoded_pixels
        )
        with torch.inference_mode():
            model(torch.from_numpy(np.ascontiguousarray(dec["pixels"])).view(shape))

    run(0, WARMUP_ROWS)
    bounds = range(WARMUP_ROWS, t.num_rows, cfg.batch_size)
    secs = sum(_timed(run, lo, min(lo + cfg.batch_size, t.num_rows)) for lo in bounds)
    return (t.num_rows - WARMUP_ROWS) / max(secs, 1e-9), t.num_rows - WARMUP_ROWS


def h_rate(arch: dict, rows: int = 4096, seed: int = 0) -> float:
    """Rows/s of an h of this architecture (BatchNorm folded, as the executor runs it)."""
    g = torch.Generator().manual_seed(seed)
    model = fold_batchnorm(Transformation(**arch).eval())
    old = torch.randn(rows, arch["old_dim"], generator=g)
    side = torch.randn(rows, arch["side_dim"], generator=g) if arch["side_dim"] else None
    with torch.inference_mode():
        model(old[:WARMUP_ROWS], None if side is None else side[:WARMUP_ROWS])
        secs = _timed(model, old, side)
    return rows / max(secs, 1e-9)


def transform_rate(chain: TransformChain, old: np.ndarray, side: np.ndarray | None) -> float:
    """Rows/s of applying `chain` to stored old embeddings (and side-info)."""
    chain(old[:WARMUP_ROWS], None if side is None else side[:WARMUP_ROWS])
    secs = _timed(chain, old, side)
    return len(old) / max(secs, 1e-9)
