"""Ray Train task that trains an embedding model: classification, optionally with BCT's loss."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray.data
import torch
from torch import nn

from pipeline.compat.losses import bct_loss
from pipeline.config import ModelConfig, PreprocessConfig, StorageConfig
from pipeline.data.decode import decode_batch
from pipeline.data.sources import ImageLayout, image_files
from pipeline.io import uri as uri_io
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.store import embedder_meta
from pipeline.train.compat_heads import LogitsHead, dsimplex_task, rotated_task
from pipeline.train.loop import (
    Task,
    TrainingRun,
    config_hash,
    install_checkpoint,
    reuse,
    run_training,
)


@dataclass
class TrainResult:
    """What one training run produced."""

    model_name: str
    model_dir: str
    images_uri: str
    epochs: int
    train_rows: int
    final_loss: float
    final_accuracy: float
    seconds: float
    num_workers: int
    use_gpu: bool
    config_hash: str
    cached: bool = False
    resumed_from_epoch: int = 0  # > 0: a killed run went on from its last checkpoint

    def metrics(self) -> dict[str, float]:
        return {
            "train_rows": self.train_rows,
            "final_loss": self.final_loss,
            "final_accuracy": self.final_accuracy,
            "train_seconds": self.seconds,
            "resumed_from_epoch": self.resumed_from_epoch,
        }


def training_batch(
    batch: dict[str, np.ndarray],
    pre: PreprocessConfig,
    max_pixels: int,
    split: str | None,
    classes: list[int] | None,
    labelled_only: bool = True,
) -> dict[str, np.ndarray]:
    """Decode a batch and keep the usable rows of the split/classes asked for: labelled ones
    only, unless `labelled_only` is False (self-supervised training: unlabelled rows get -1)."""
    keep = np.ones(len(batch["key"]), dtype=bool)
    if split is not None and "split" in batch:
        keep &= batch["split"] == split
    labels = batch.get("label")
    if labels is None:
        raise ValueError("training needs a 'label' column in the image shards")
    missing = np.isnan(np.asarray(labels).astype(np.float64))
    labels = np.where(missing, -1, labels)
    if labelled_only:
        keep &= ~missing
    if classes is not None:
        keep &= np.isin(labels, classes)
    sub = {k: v[keep] for k, v in {**batch, "label": labels}.items()}
    out = decode_batch(sub, pre, max_pixels)
    ok = out["error"] == ""
    return {"pixels": out["pixels"][ok], "label": sub["label"][ok].astype(np.int64)}


def image_dataset(
    images_uri: str,
    storage: StorageConfig | None,
    columns: list[str] | None = None,
    layout: ImageLayout | None = None,
):
    """A Ray Dataset of the usable rows of the image shards under a URI (local or s3://),
    read in place through their layout: one read task per shard file."""
    layout = layout or ImageLayout()
    files = list(image_files(images_uri, storage, layout).values())  # stray files left out
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    return ds.map_batches(
        read_layout_rows,
        fn_kwargs={
            "storage": storage.resolved() if storage is not None else None,  # workers: no AWS_*
            "layout": layout,
            "columns": columns or ["key", "image", "label", "split"],
        },
        batch_size=1,
        num_cpus=0.25,
    )


def read_layout_rows(
    batch: dict[str, np.ndarray],
    storage: StorageConfig | None,
    layout: ImageLayout,
    columns: list[str],
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage: each input row names a shard file; yields its rows the source did not
    refuse, under the pipeline's column names (a missing label is NaN)."""
    for f in batch["file"].tolist():
        for b in layout.read(f, storage, columns, 4096):
            if "reject" in b.schema.names:
                b = b.filter(pc.equal(b.column("reject"), "")).drop_columns(["reject"])
            out = {c: b.column(c).to_numpy(zero_copy_only=False) for c in columns if c != "image"}
            if "image" in columns:  # bytes stay objects, never a fixed 'S' width
                out["image"] = np.empty(b.num_rows, dtype=object)
                out["image"][:] = b.column("image").to_pylist()
            yield out


def image_training_dataset(
    images_uri: str,
    storage: StorageConfig | None,
    pre: PreprocessConfig,
    max_pixels: int,
    classes: list[int] | None,
    split: str = "train",
    cache_max_bytes: int = 0,
    labelled_only: bool = True,
    layout: ImageLayout | None = None,
):
    """The decoded rows of one split (and classes) of the image shards (labelled ones only,
    unless `labelled_only` is False), and whether they were cached.

    Streamed (decoded again every epoch), or decoded once and cached in the object store
    when all rows' pixels fit in `cache_max_bytes`: on small data the per-epoch decode and
    pipeline start-up cost more than the training itself.
    """
    ds = image_dataset(images_uri, storage, ["key", "image", "label", "split"], layout)
    ds = ds.map_batches(
        training_batch,
        fn_kwargs={
            "pre": pre,
            "max_pixels": max_pixels,
            "split": split,
            "classes": classes,
            "labelled_only": labelled_only,
        },
        batch_size=1024,
        num_cpus=0.5,
    )
    files = image_files(images_uri, storage, layout or ImageLayout()).values()
    rows = sum(uri_io.parquet_num_rows(f, storage) for f in files)
    small = rows * pre.channels * pre.input_size**2 * 4 <= cache_max_bytes
    return (ds.materialize() if small else ds), small


def build_task(config: dict[str, Any]) -> Task:
    """Classification training; with `bct`, BCT's influence loss through the old classifier;
    BT², d-Simplex and OCA through their heads (`compat_heads`)."""
    cfg = ModelConfig.model_validate(config["model"])
    pre, tc = cfg.preprocess, cfg.train
    net = EmbeddingNet(cfg.architecture, in_channels=pre.channels)
    if tc.loss == "dsimplex":
        return dsimplex_task(cfg, net)
    if tc.loss in ("bt2", "oca"):
        return rotated_task(cfg, net, config["bct"])
    shape = (-1, pre.channels, pre.input_size, pre.input_size)
    ce = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    bct = config.get("bct")
    if bct is not None:  # frozen: plain tensors, never parameters of the trained module
        w_old = torch.tensor(np.asarray(bct["weight"], dtype=np.float32))
        b_old = torch.tensor(np.asarray(bct["bias"], dtype=np.float32))

    def step(model: nn.Module, batch: dict[str, torch.Tensor]):
        x, y = batch["pixels"].view(shape).float(), batch["label"].long()
        emb, logits = model(x)
        if bct is None:
            loss = ce(logits, y)
        else:
            old_logits = emb @ w_old.to(emb.device).T + b_old.to(emb.device)
            loss = bct_loss(logits, old_logits, y, tc.bct_lambda, tc.label_smoothing)
        return loss, len(y), {"accuracy": float((logits.argmax(1) == y).sum())}

    return Task(save=net, train=LogitsHead(net), step=step)


def compat_meta(loss: str, old: dict[str, Any] | None) -> dict[str, Any]:
    """model.json's compatibility fields: the loss, the old model it is compatible with and, for
    BT² / OCA, `compat_dims`: how many leading dims of the embedding compare to old rows."""
    if loss == "independent":
        return {}
    out: dict[str, Any] = {"compat_loss": loss}
    if old is not None:
        out["bct_from"] = old["from_model"]
    if loss in ("bt2", "oca") and old is not None:
        out["compat_dims"] = int(np.asarray(old["weight"]).shape[1])
    return out


def train_embedder(
    cfg: ModelConfig,
    images_uri: str,
    out_dir: str | Path,
    storage: StorageConfig | None = None,
    results_dir: str | Path = ".carryover/ray_results",
    max_pixels: int = 64_000_000,
    bct: dict[str, Any] | None = None,
    layout: ImageLayout | None = None,
) -> TrainResult:
    """Train `cfg` on the image shards' train split with Ray Train; cached by config hash.

    `bct` (weight, bias, from_model) is the frozen, synthesised old classifier that BCT's
    influence loss (and BT²'s, OCA's compatibility losses) reads; cfg.train.loss says which.
    """
    h = config_hash(cfg.model_dump(mode="json"), images_uri, bct)
    if (done := reuse(out_dir, h, TrainResult)) is not None:
        return done
    tc, started = cfg.train, time.perf_counter()
    ds, small = image_training_dataset(
        images_uri,
        storage,
        cfg.preprocess,
        max_pixels,
        tc.classes,
        "train",
        tc.cache_max_bytes,
        layout=layout,
    )
    config = {"model": cfg.model_dump(mode="json"), "bct": bct}
    name = f"train-{cfg.name}-{h}"
    job = TrainingRun("pipeline.train.embedder:build_task", config, ds, tc, name, small, started)
    fitted = run_training(job, results_dir)
    tr = TrainResult(
        model_name=cfg.name,
        model_dir=str(out_dir),
        images_uri=images_uri,
        epochs=tc.epochs,
        final_accuracy=float(fitted.metrics.get("accuracy", float("nan"))),
        num_workers=tc.num_workers,
        use_gpu=tc.use_gpu,
        **fitted.result_fields(h),
    )
    extra = compat_meta(tc.loss, bct)
    meta = embedder_meta(
        cfg, config_hash=h, train_result=asdict(tr), trained_classes=tc.classes, **extra
    )
    install_checkpoint(fitted.checkpoint, out_dir, meta)
    return tr
