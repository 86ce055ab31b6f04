"""Shards run in parallel: every configured embed actor gets work (issue 15, item 8)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from ray.data import DataContext

from pipeline.config import ArchitectureConfig, EmbedConfig, ModelConfig, PreprocessConfig
from pipeline.embed.runner import embed_images_to_version
from pipeline.gallery.store import Gallery
from pipeline.io import uri as uri_io
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.store import embedder_meta, resolve_blob, save_model_dir

pytestmark = pytest.mark.slow

PRE = PreprocessConfig(input_size=8, channels=1, mean=[0.5], std=[0.5])


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _shards(root: Path, shards: int, rows: int) -> dict[int, str]:
    files = {}
    for s in range(shards):
        ids = range(s * rows, (s + 1) * rows)
        table = pa.table(
            {
                "key": [f"k{i:05d}" for i in ids],
                "image": pa.array([_png(i) for i in ids], pa.binary()),
                "label": pa.array([i % 3 for i in ids], pa.int64()),
                "split": ["train"] * rows,
            }
        )
        files[s] = str(root / f"shard-{s:05d}.parquet")
        uri_io.write_table(table, files[s])
    return files


def test_two_configured_actors_both_embed_rows(tmp_path: Path, ray_local) -> None:
    d = tmp_path / "m"
    cfg = ModelConfig(
        name="m",
        architecture=ArchitectureConfig(widths=[4], embedding_dim=4, num_classes=2),
        preprocess=PRE,
    )
    torch.manual_seed(0)
    save_model_dir(EmbeddingNet(cfg.architecture, in_channels=1).eval(), embedder_meta(cfg), d)
    blob = resolve_blob(ModelConfig(name="m", uri=str(d)))
    (tmp_path / "images").mkdir()
    files = _shards(tmp_path / "images", shards=8, rows=12)
    g = Gallery(str(tmp_path / "gallery"))
    ctx = DataContext.get_current()
    before = ctx.wait_for_min_actors_s
    # Both actors up before the first block is handed out: then only the number of input
    # blocks decides whether the second one gets work, which is what is under test.
    ctx.wait_for_min_actors_s = 600
    try:
        res = embed_images_to_version(
            files,
            g,
            "v1",
            blob,
            EmbedConfig(num_actors=2, batch_size=4, actor_num_cpus=0.5),
            {},
            "embed:m",
            quiet=True,
        )
    finally:
        ctx.wait_for_min_actors_s = before
    assert (res.shards_written, res.rows_written, res.rows_rejected) == (8, 96, 0)
    workers = {w for r in res.records for w in r["workers"]}
    assert len(workers) == 2, workers
    assert all(r["workers"] for r in res.records)
