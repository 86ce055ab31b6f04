"""Try a model on a real sample of the gallery's own images before a pass, on the driver.

A model that returns one row per batch, zeros, NaNs or 1e38-scale vectors is refused here,
in a second, before Ray decodes and embeds a billion rows with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import EmbedConfig, StorageConfig
from pipeline.data.shards import DataError
from pipeline.data.sources import ImageLayout
from pipeline.embed.quality import distinct_rows
from pipeline.embed.stages import EmbedStage, decode_with_side
from pipeline.models.store import ModelBlob, ModelLoadError


@dataclass(frozen=True)
class ProbeResult:
    """What a model made of the sample: rows tried, rows it rejected, distinct in and out."""

    model: str
    source: str
    rows: int
    rejected: int
    distinct_inputs: int
    distinct_outputs: int


def sample_images(
    files: list[str], storage: StorageConfig | None, rows: int, layout: ImageLayout | None = None
) -> pa.Table:
    """The first `rows` usable (key, image) rows of the image shards, in shard order (rows
    the layout's status column rejects are skipped)."""
    parts: list[pa.RecordBatch] = []
    got = 0
    for f in files:
        try:
            for b in (layout or ImageLayout()).read(f, storage, ["key", "image"], rows):
                b = b.filter(pc.equal(b.column("reject"), "")).select(["key", "image"])
                parts.append(b.slice(0, rows - got))
                got += len(parts[-1])
                if got >= rows:
                    return pa.Table.from_batches(parts)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f}: cannot read image rows: {e}") from None
    return pa.Table.from_batches(parts) if parts else pa.table({"key": [], "image": []})


def probe_model(
    blob: ModelBlob,
    files: list[str],
    storage: StorageConfig | None,
    cfg: EmbedConfig,
    side_blob: ModelBlob | None = None,
    layout: ImageLayout | None = None,
) -> ProbeResult:
    """Embed a sample of the gallery with `blob` (and its side-info model); ModelLoadError
    when the output is unfit to serve: a rejected share over `max_rejected_fraction`, or
    fewer distinct embeddings than `min_distinct_fraction` of the distinct images."""
    t = sample_images(files, storage, cfg.probe_rows, layout)
    where = files[0] if files else "(no image shards)"
    images = np.empty(t.num_rows, dtype=object)  # bytes stay objects, never a fixed 'S' width
    images[:] = t["image"].to_pylist()
    batch = {"key": t["key"].to_numpy(zero_copy_only=False), "image": images}
    side_pre = side_blob.preprocess if side_blob is not None else None
    dec = decode_with_side(batch, blob.preprocess, cfg.max_decoded_pixels, side_pre)
    ok = dec["error"] == ""
    res = ProbeResult(blob.name, where, int(ok.sum()), 0, 0, 0)
    if res.rows < 2:
        return res  # nothing to judge by: the pass rejects rows one by one
    out = EmbedStage(blob, cfg.torch_threads, side_blob)({**dec, "shard": np.zeros(len(ok))})
    bad = ok & (out["error"] != "")
    good = ok & ~bad
    pixels = np.asarray(dec["pixels"])[ok].reshape(int(ok.sum()), -1)
    res = ProbeResult(
        blob.name,
        where,
        res.rows,
        int(bad.sum()),
        distinct_rows(pixels),
        distinct_rows(out["embedding"][good]),
    )
    _judge(res, cfg, str(out["error"][bad][0]) if bad.any() else "")
    return res


def _judge(res: ProbeResult, cfg: EmbedConfig, reason: str) -> None:
    """Raise ModelLoadError naming the model when the probe's output is unfit."""
    head = f"model {res.model!r} on {res.rows} sample images of {res.source}"
    if res.rejected > cfg.max_rejected_fraction * res.rows:
        raise ModelLoadError(
            f"{head}: {res.rejected} outputs unusable ({reason}); over "
            f"embed.max_rejected_fraction={cfg.max_rejected_fraction}: refused before the pass"
        )
    if res.distinct_outputs < cfg.min_distinct_fraction * min(
        res.distinct_inputs, res.rows - res.rejected
    ):
        raise ModelLoadError(
            f"{head}: {res.distinct_outputs} distinct embeddings for {res.distinct_inputs} "
            f"distinct images (under embed.min_distinct_fraction={cfg.min_distinct_fraction}): "
            "the model maps different images to the same vector (pooling over the batch?)"
        )
