"""The labelled-split sample used by evaluation: exact size, seeded, one split, O(cap) memory."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from pipeline.data.prepare import prepare
from pipeline.services.steps import split_labels


def test_split_sample_is_seeded_exact_and_of_one_split(tmp_path: Path) -> None:
    cfg = load_config(None, [f"workdir={tmp_path}"])
    prepare("synthetic", cfg.images_uri, 3, cfg.storage, cfg.data, synthetic_n=400)
    full = split_labels(cfg, "val")
    train = split_labels(cfg, "train")
    assert full.num_rows + train.num_rows == 400
    assert not set(full["key"].to_pylist()) & set(train["key"].to_pylist())
    sample = split_labels(cfg, "val", cap=25)
    assert sample.num_rows == 25 and sample.schema.names == ["key", "label"]
    assert set(sample["key"].to_pylist()) <= set(full["key"].to_pylist())
    assert sample.equals(split_labels(cfg, "val", cap=25))  # same seed, same rows
    other = split_labels(load_config(None, [f"workdir={tmp_path}", "data.seed=1"]), "val", 25)
    assert not other.equals(sample)
    assert split_labels(cfg, "val", cap=10_000).num_rows == full.num_rows
