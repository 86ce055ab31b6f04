"""Backfill path: carryover's Ray Data pipeline (read Parquet → decode → embed → write shard
files) beside a plain single-process loop doing the same work with the same model, the same
decode function and the same number of model threads, measured in the same run."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save

from pipeline.bench.common import Figure
from pipeline.config import ArchitectureConfig, DataConfig, EmbedConfig, ModelConfig
from pipeline.config import PreprocessConfig as Pre
from pipeline.data.decode import decode_batch
from pipeline.data.prepare import prepare
from pipeline.embed.runner import embed_images_to_version
from pipeline.gallery.store import Gallery
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.store import WEIGHTS_FILE, ModelBlob, build_model, embedder_meta
from pipeline.runtime import ensure_ray


def small_cnn(size: int = 28) -> Any:
    """The benchmark's embedder: carryover's EmbeddingNet (demo-sized), as a ModelBlob."""
    cfg = ModelConfig(
        name="bench",
        architecture=ArchitectureConfig(widths=[16, 32, 64], embedding_dim=64),
        preprocess=Pre(input_size=size),
    )
    torch.manual_seed(0)
    net = EmbeddingNet(cfg.architecture, in_channels=1)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    return ModelBlob(
        "carryover", "bench", cfg.preprocess, 64, {WEIGHTS_FILE: save(state)}, embedder_meta(cfg)
    )


def make_images(root: Path, n: int, shards: int) -> dict[int, str]:
    """n synthetic 28×28 PNG digits in Parquet shards (carryover's own `data prepare`)."""
    res = prepare("synthetic", str(root / "images"), shards, None, DataConfig(), synthetic_n=n)
    return dict(enumerate(res.files))


def plain_loop(files: dict[int, str], blob: Any, threads: int, batch: int, out: Path) -> float:
    """rows/s of one process: read → decode → embed (inference_mode) → write Parquet."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = build_model(blob)
    shape = (-1, blob.preprocess.channels, blob.preprocess.input_size, blob.preprocess.input_size)
    schema = pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32(), 64))])
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = 0, time.perf_counter()
    try:
        for sid, f in files.items():
            with pq.ParquetWriter(out / f"shard-{sid:05d}.parquet", schema) as w:
                for b in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=["key", "image"]):
                    dec = decode_batch(
                        {
                            "key": b.column("key").to_numpy(zero_copy_only=False),
                            "image": b.column("image").to_pylist(),
                        },
                        blob.preprocess,
                        64_000_000,
                    )
                    x = torch.from_numpy(dec["pixels"]).view(shape)
                    with torch.inference_mode():
                        emb = model(x).numpy()
                    flat = pa.array(emb.reshape(-1), pa.float32())
                    w.write_table(
                        pa.table(
                            {
                                "key": pa.array(dec["key"], pa.string()),
                                "embedding": pa.FixedSizeListArray.from_arrays(flat, 64),
                            },
                            schema=schema,
                        )
                    )
                    rows += len(dec["key"])
    finally:
        torch.set_num_threads(old)
    secs = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return rows / secs


def carryover_backfill(
    files: dict[int, str], blob: Any, cfg: EmbedConfig, root: Path
) -> tuple[float, int]:
    """rows/s of `embed_images_to_version` (the ingest / full-backfill path), first row read to
    last shard committed; returns (rows/s, rows written)."""
    g = Gallery(str(root / "gallery"))
    meta = {sid: {"method": "full", "model": "bench", "run_id": None} for sid in files}
    res = embed_images_to_version(files, g, "bench", blob, cfg, meta, "backfill:bench", quiet=True)
    shutil.rmtree(root / "gallery", ignore_errors=True)
    return res.rows_in / res.seconds, res.rows_written


def run_backfill(
    workdir: Path,
    images: int = 100_000,
    shards: int = 10,
    cfg: EmbedConfig | None = None,
) -> list[Figure]:
    cfg = cfg or EmbedConfig()
    root = Path(workdir) / "backfill"
    shutil.rmtree(root, ignore_errors=True)
    files = make_images(root, images, shards)
    blob = small_cnn()
    threads = cfg.torch_threads * cfg.num_actors  # the same number of model threads
    ensure_ray()
    rps, written = carryover_backfill(files, blob, cfg, root)
    assert written == images, f"the backfill wrote {written} of {images} rows"
    loop = plain_loop(files, blob, threads, cfg.batch_size, root / "loop")
    note = (
        f"{images:,} synthetic 28×28 PNGs in {shards} shards; EmbeddingNet [16,32,64]→64; "
        f"Ray Data: {cfg.num_actors} embed actor(s) × {cfg.torch_threads} thread(s), decode tasks "
        f"{cfg.decode_num_cpus} CPU, batch {cfg.batch_size}; loop: {threads} torch thread(s)"
    )
    return [
        Figure(
            "backfill",
            "Ray Data decode→embed→write",
            rps,
            "images/s",
            "plain loop",
            loop,
            0.9,
            note=note,
            tried="Ray Data fuses decode into the embed actor (no decoded pixels through the "
            "object store); batches of 256; inference_mode; Arrow→NumPy→torch without copies "
            "(torch.from_numpy on the decoded buffer); one torch thread per actor so actors do "
            "not oversubscribe the cores; shard files are written by the driver as rows arrive",
            extra={"images": images, "shards": shards, "embed": cfg.model_dump()},
        )
    ]
