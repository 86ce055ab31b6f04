"""BT² and d-Simplex train on the real Ray Train loop from the small gallery's images and save
plain carryover embedders (BT²: wider, its compatible dims recorded); the d-Simplex pair is
compatible where an independent new model is not. (BT²'s compatibility is measured by
jobs/benchmark_compat.py: on this gallery's 2-epoch v1 and ~140 training rows it is not.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.context import Context
from pipeline.embed.features import collect, paired_features
from pipeline.evaluate.metrics import retrieval_metrics
from pipeline.services import models
from tests.e2e.conftest import SmallGallery, copy_of

pytestmark = pytest.mark.slow


def _variant(m, loss: str, dim: int):
    c = m.model_copy(update={"name": f"{m.name}-{loss}"}, deep=True)
    c.train.loss = loss
    c.architecture.embedding_dim = dim
    c.train.epochs = 10  # the shared v1 is weak (2 epochs): compatibility needs more steps
    return c


def _top1(q, g, labels) -> float:
    return retrieval_metrics(q, g, labels, labels, "cosine", (1,), True)["top1"]


def test_bt2_and_dsimplex_train_and_stay_compatible(
    small_gallery: SmallGallery, tmp_path: Path
) -> None:
    g = copy_of(small_gallery, tmp_path / "g")
    cfg = g.cfg
    ctx = Context(cfg, quiet=True)
    old, new = cfg.old_model, cfg.new_model
    d_old, k = old.architecture.embedding_dim, new.architecture.num_classes
    bt2 = _variant(new, "bt2", d_old + 8)
    pair = [_variant(old, "dsimplex", k - 1), _variant(new, "dsimplex", k - 1)]
    for m in (bt2, *pair):
        assert models.train_step(ctx, m).trained
    meta = json.loads((ctx.model_dir(bt2) / "model.json").read_text())
    assert (meta["compat_loss"], meta["compat_dims"], meta["bct_from"]) == ("bt2", d_old, old.name)
    assert meta["architecture"]["embedding_dim"] == d_old + 8
    names = (old, new, bt2, *pair)
    blobs = {m.name: models.blob_of(ctx, m) for m in names}
    val = collect(paired_features(cfg.images_uri, blobs, cfg.embed, cfg.storage, split="val"))
    y = val["label"]
    assert val[bt2.name].shape[1] == d_old + 8 and val[pair[1].name].shape[1] == k - 1
    independent = _top1(val[new.name], val[old.name], y)
    simplex = _top1(val[pair[1].name], val[pair[0].name], y)
    assert simplex > independent + 5, (simplex, independent)  # measured 31.3 vs 17.4
    bt2_top1 = _top1(val[bt2.name], val[bt2.name], y)
    assert bt2_top1 > 60, bt2_top1  # the whole vector retrieves new/new (measured 82.6)
