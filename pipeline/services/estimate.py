"""Before anything is trained: the whole upgrade priced both ways from short measurements of
this upgrade's own models on the gallery's own images (pipeline/upgrade/estimate.py adds up)."""

from __future__ import annotations

import pyarrow.compute as pc
import torch
from torch import nn

from pipeline.config import ModelConfig, PreprocessConfig
from pipeline.context import Context
from pipeline.embed.rates import embed_rate, h_rate
from pipeline.io import uri as uri_io
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.store import MODEL_FILE, build_model
from pipeline.services import models, steps
from pipeline.train.loop import task_rate
from pipeline.train.transformation import architecture
from pipeline.upgrade.estimate import UpgradeCosts, UpgradeEstimate, estimate_upgrade

TIMING_BATCH = 64  # rows per timed training step


def _timed_model(ctx: Context, m: ModelConfig) -> tuple[nn.Module, PreprocessConfig, int]:
    """The model to time: brought or trained already, else untrained from its config (a
    network costs the same before training)."""
    if m.uri is not None or (ctx.model_dir(m) / MODEL_FILE).exists():
        blob = models.blob_of(ctx, m)
        return build_model(blob), blob.preprocess, blob.embedding_dim
    net = EmbeddingNet(m.architecture, in_channels=m.preprocess.channels)
    return net, m.preprocess, m.architecture.embedding_dim


def _split_rows(ctx: Context, split: str) -> int:
    """Rows of one split in the image shards (reads the split column only)."""
    n = 0
    for f in steps.image_shards(ctx.cfg).values():
        for b in steps.image_layout(ctx.cfg).read(f, ctx.cfg.storage, ["key", "split"]):
            n += int(pc.sum(pc.equal(b.column("split"), split)).as_py() or 0)
    return n


def _gallery_rows(ctx: Context) -> int:
    g = ctx.gallery
    if (cur := g.current()) is not None:
        return int(g.manifest(cur)["rows"])
    files = steps.image_shards(ctx.cfg).values()
    return sum(uri_io.parquet_num_rows(f, ctx.cfg.storage) for f in files)


def _rate(ctx: Context, m: ModelConfig, files: list[str]) -> tuple[float | None, int]:
    """Images/s of decoding and embedding a sample of the gallery's images with `m`."""
    net, pre, dim = _timed_model(ctx, m)
    rate, _ = embed_rate(
        net,
        pre,
        files,
        ctx.cfg.storage,
        ctx.cfg.embed,
        ctx.cfg.plan.measure_rows,
        steps.image_layout(ctx.cfg),
    )
    return rate, dim


def _side_training_rate(ctx: Context) -> float | None:
    """SimCLR's training images/s, or None when side-info is off or trained already."""
    sc = ctx.cfg.side_info_model
    if not sc.enabled or (ctx.model_dir(sc) / MODEL_FILE).exists():
        return None
    pre = sc.preprocess
    pixels = torch.rand(TIMING_BATCH, pre.channels * pre.input_size**2)
    config = {"model": sc.model_dump(mode="json")}
    return task_rate("pipeline.train.side_info:build_task", config, {"pixels": pixels})


def _h_rates(ctx: Context, dims: dict[str, int]) -> tuple[float, float]:
    """h's training rows/s and inference rows/s, for the architecture it will have."""
    tc = ctx.cfg.transformation
    arch = architecture(tc, dims, dims.get("side", 0))
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randn(TIMING_BATCH, d, generator=g) for k, d in dims.items()}
    batch["label"] = torch.full((TIMING_BATCH,), -1)
    config = {
        "transformation": tc.model_dump(mode="json"),
        "arch": arch,
        "new_classifier": None,
        "columns": {"old": "old", "side": "side" if "side" in dims else None, "new": "new"},
    }
    train = task_rate("pipeline.train.transformation:build_task", config, batch)
    return train, h_rate(arch)


def estimate_step(ctx: Context) -> UpgradeEstimate | None:
    """Both paths priced from the models timed on the gallery's own images; None when there
    is nothing to compare (no images to re-embed, plan.measure_rows 0, no transformation)."""
    cfg = ctx.cfg
    try:
        files = list(steps.image_shards(cfg).values())
    except FileNotFoundError:
        files = []
    if not files or not cfg.plan.measure_rows or not cfg.transformation.enabled:
        return None
    rows, train = _gallery_rows(ctx), _split_rows(ctx, "train")
    new_rps, new_dim = _rate(ctx, cfg.new_model, files)
    old_rps, old_dim = _rate(ctx, cfg.old_model, files)
    if not new_rps or not old_rps:
        return None
    dims = {"old": old_dim, "new": new_dim}
    side_rps = None
    if cfg.side_info.enabled and cfg.transformation.side_info and models.side_info_stored(ctx):
        side_rps, dims["side"] = _rate(ctx, cfg.side_info_model, files)
    h_train, h_infer = _h_rates(ctx, dims)
    tc, pc_ = cfg.transformation, cfg.plan
    pairs = min(train, tc.max_train_rows or train) * (1 + tc.augment_copies)
    budget = [pc_.budget_images] if pc_.budget_images is not None else []
    budget += [int(pc_.budget_fraction * rows)] if pc_.budget_fraction is not None else []
    costs = UpgradeCosts(
        gallery_rows=rows,
        train_pairs=pairs,
        budget_rows=min(budget) if budget else rows,
        new_images_per_second=new_rps,
        old_images_per_second=old_rps,
        side_images_per_second=side_rps,
        side_train_images_per_second=_side_training_rate(ctx) if side_rps else None,
        side_train_images=train,
        side_epochs=cfg.side_info.train.epochs,
        h_train_rows_per_second=h_train,
        h_epochs=tc.train.epochs,
        h_rows_per_second=h_infer,
    )
    return estimate_upgrade(costs)
