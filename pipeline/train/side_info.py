"""Ray Train task for FCT's side-information model: SimCLR contrastive training, no labels."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.compat.augment import simclr_augment
from pipeline.compat.losses import nt_xent
from pipeline.config import SideInfoConfig, StorageConfig
from pipeline.data.sources import ImageLayout
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.compat import SimCLRHead
from pipeline.models.store import embedder_meta
from pipeline.train.embedder import TrainResult, image_training_dataset
from pipeline.train.loop import (
    Task,
    TrainingRun,
    config_hash,
    install_checkpoint,
    reuse,
    run_training,
)


def build_task(config: dict[str, Any]) -> Task:
    """Two augmented views per image, one pass through backbone + projection, NT-Xent."""
    cfg = SideInfoConfig.model_validate(config["model"])
    pre = cfg.preprocess
    net = EmbeddingNet(cfg.architecture, in_channels=pre.channels)
    head = SimCLRHead(net, feature_dim=cfg.architecture.embedding_dim, proj_dim=cfg.proj_dim)
    shape = (-1, pre.channels, pre.input_size, pre.input_size)

    def step(model: nn.Module, batch: dict[str, torch.Tensor]):
        x = batch["pixels"].view(shape).float()
        views = torch.cat(
            [simclr_augment(x, strength=cfg.augment_strength) for _ in range(2)]
        )  # one forward over both views: DDP sees a single graph, BN sees both
        _, proj = model(views)
        z1, z2 = proj.chunk(2)
        return nt_xent(z1, z2, cfg.temperature), len(x), {}

    return Task(save=net, train=head, step=step)


def train_side_info(
    cfg: SideInfoConfig,
    classes: list[int] | None,
    images_uri: str,
    out_dir: str | Path,
    storage: StorageConfig | None = None,
    results_dir: str | Path = ".carryover/ray_results",
    max_pixels: int = 64_000_000,
    layout: ImageLayout | None = None,
) -> TrainResult:
    """Train the side-info model on the train split of `classes` (the old model's data)."""
    h = config_hash(cfg.model_dump(mode="json"), classes, images_uri, "simclr")
    if (done := reuse(out_dir, h, TrainResult)) is not None:
        return done
    started = time.perf_counter()
    ds, small = image_training_dataset(  # SimCLR needs no labels: unlabelled rows train too
        images_uri,
        storage,
        cfg.preprocess,
        max_pixels,
        classes,
        "train",
        cfg.train.cache_max_bytes,
        labelled_only=False,
        layout=layout,
    )
    config = {"model": cfg.model_dump(mode="json")}
    name = f"side-info-{cfg.name}-{h}"
    builder = "pipeline.train.side_info:build_task"
    job = TrainingRun(builder, config, ds, cfg.train, name, small, started)
    fitted = run_training(job, results_dir)
    tr = TrainResult(
        model_name=cfg.name,
        model_dir=str(out_dir),
        images_uri=images_uri,
        epochs=cfg.train.epochs,
        final_accuracy=float("nan"),  # self-supervised: no labels, no accuracy
        num_workers=cfg.train.num_workers,
        use_gpu=cfg.train.use_gpu,
        **fitted.result_fields(h),
    )
    meta = embedder_meta(
        cfg, config_hash=h, train_result=asdict(tr), trained_classes=classes, kind="side-info"
    )
    install_checkpoint(fitted.checkpoint, out_dir, meta)
    return tr
