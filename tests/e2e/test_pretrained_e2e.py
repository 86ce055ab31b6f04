"""A new model brought as TorchScript (no classifier head, as pretrained backbones come):
FastFill still ranks rows by uncertainty, through a linear head fitted on the labelled
training pairs, and the planned upgrade mixes transformed, partial and full shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.context import Context
from pipeline.data.prepare import prepare
from pipeline.flows import run_upgrade
from pipeline.gallery.store import Gallery
from pipeline.models.store import load_trained
from pipeline.services import models
from tests.e2e.test_upgrade_e2e import TINY

pytestmark = pytest.mark.slow
SHARDS, ROWS = 4, 800


def _torchscript_new_model(base: Path) -> Path:
    """Train a new model here, then keep only its embedding network as TorchScript."""
    cfg = load_config(None, [*TINY, f"workdir={base / 'trainer'}", "gallery_name=ts"])
    prepare("digits", cfg.images_uri, SHARDS, cfg.storage, cfg.data, limit=ROWS)
    models.train_step(Context(cfg, quiet=True), cfg.new_model)
    net, _ = load_trained(Path(cfg.workdir) / "models" / cfg.new_model.name)
    size = cfg.new_model.preprocess.input_size
    path = base / "v2.ts"
    torch.jit.save(torch.jit.trace(net.eval(), torch.zeros(2, 1, size, size)), str(path))
    return path


def test_torchscript_new_model_with_fastfill_uncertainty_and_partial_backfills(
    tmp_path: Path, ray_local
) -> None:
    ts = _torchscript_new_model(tmp_path)
    wd = tmp_path / "wd"
    sets = [
        *TINY,
        f"workdir={wd}",
        "gallery_name=ts",
        f"images={tmp_path / 'trainer' / 'images'}",
        "new_model.name=v2ts",
        f"new_model.uri={ts}",
        "plan.budget_fraction=0.3",
        "plan.min_gain=0",
    ]
    cfg = load_config(None, sets)
    report = run_upgrade(cfg, quiet=True)
    assert report.serving == "v2ts" and report.validation["ok"] is True
    h = report.transformation
    assert h["loss"] == "fastfill" and h["inner_dim"] == 16 * 32  # FCT's width fits the limit
    assert 0 < h["h_mflops_per_row"] < 64
    run = Context(cfg).tracker.search_runs("tags.carryover.step = 'train_transformation'")
    assert [r["tags"]["carryover.fastfill_classifier"] for r in run] == ["fitted"]
    curves = report.compat["curves"]
    assert curves["uncertainty"]["auc_top1"] > curves["random"]["auc_top1"], curves
    counts = report.plan["counts"]
    assert counts.get("partial", 0) + counts.get("full", 0) >= 1, counts
    assert Gallery(cfg.gallery_uri).manifest("v2ts")["rows"] == ROWS
