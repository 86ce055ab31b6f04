"""What this upgrade's own models cost, measured on a short sample on the driver: the new
model's images/s (decode + embed) and h's rows/s. The planner prices with these instead of a
profile measured on other models: a 1,280-d h can cost as much as the model it replaces."""

from __future__ import annotations

import time

import numpy as np

from pipeline.config import EmbedConfig, StorageConfig
from pipeline.data.decode import decode_batch
from pipeline.embed.probe import sample_images
from pipeline.embed.stages import EmbedStage
from pipeline.embed.transform import TransformChain
from pipeline.models.store import ModelBlob

WARMUP_ROWS = 8  # the first call pays for lazy initialisation (threads, allocator)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def embed_rate(
    blob: ModelBlob, files: list[str], storage: StorageConfig | None, cfg: EmbedConfig, rows: int
) -> tuple[float | None, int]:
    """Images/s of decoding and embedding `rows` gallery images with `blob` (None: no images)."""
    t = sample_images(files, storage, rows + WARMUP_ROWS)
    if t.num_rows <= WARMUP_ROWS:
        return None, 0
    images = np.empty(t.num_rows, dtype=object)
    images[:] = t["image"].to_pylist()
    keys = t["key"].to_numpy(zero_copy_only=False)
    stage = EmbedStage(blob, cfg.torch_threads)

    def run(lo: int, hi: int) -> None:
        batch = {"key": keys[lo:hi], "image": images[lo:hi]}
        dec = decode_batch(batch, blob.preprocess, cfg.max_decoded_pixels)
        stage({**dec, "shard": np.zeros(hi - lo)})

    run(0, WARMUP_ROWS)
    n = t.num_rows - WARMUP_ROWS
    secs = sum(
        _timed(run, lo, min(lo + cfg.batch_size, t.num_rows))
        for lo in range(WARMUP_ROWS, t.num_rows, cfg.batch_size)
    )
    return n / max(secs, 1e-9), n


def transform_rate(chain: TransformChain, old: np.ndarray, side: np.ndarray | None) -> float:
    """Rows/s of applying `chain` to stored old embeddings (and side-info)."""
    chain(old[:WARMUP_ROWS], None if side is None else side[:WARMUP_ROWS])
    secs = _timed(chain, old, side)
    return len(old) / max(secs, 1e-9)
