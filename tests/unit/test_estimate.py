"""The upgrade priced both ways before anything is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.context import Context
from pipeline.flows import demo_config, ensure_images
from pipeline.services.estimate import estimate_step
from pipeline.upgrade.estimate import UpgradeCosts, estimate_upgrade


def _costs(**kw) -> UpgradeCosts:
    base = dict(
        gallery_rows=1_000_000,
        train_pairs=100_000,
        budget_rows=250_000,
        new_images_per_second=100.0,
        old_images_per_second=200.0,
        side_images_per_second=1_000.0,
        side_train_images_per_second=500.0,
        side_train_images=100_000,
        side_epochs=10,
        h_train_rows_per_second=10_000.0,
        h_epochs=20,
        h_rows_per_second=50_000.0,
    )
    return UpgradeCosts(**{**base, **kw})


def test_each_part_of_the_transform_path_is_counted() -> None:
    est = estimate_upgrade(_costs())
    assert est.full_seconds == pytest.approx(10_000.0)  # 1M images at 100/s
    assert est.parts == {
        "side-info training": pytest.approx(2_000.0),  # 10 epochs x 100k / 500
        "side-info pass": 0.0,
        "training pairs": pytest.approx(100_000 * (1 / 100 + 1 / 200 + 1 / 1000)),
        "h training": pytest.approx(200.0),
        "transform": pytest.approx(20.0),
        "re-embed budget": pytest.approx(2_500.0),
    }
    assert est.transform_seconds == pytest.approx(sum(est.parts.values()))
    assert est.cheaper == "transform" and "transform is cheaper" in est.summary()


def test_a_small_gallery_is_cheaper_to_re_embed() -> None:
    est = estimate_upgrade(_costs(gallery_rows=20_000, train_pairs=14_000, budget_rows=5_000))
    assert est.cheaper == "full backfill" and est.to_dict()["cheaper"] == "full backfill"


def test_the_demo_is_estimated_from_its_own_models_before_training(tmp_path: Path) -> None:
    # Nothing is trained yet: the models are timed untrained from their configs, on the
    # gallery's own images. 1,797 digits: re-embedding them is far cheaper than training h.
    cfg = demo_config(str(tmp_path))
    ensure_images(cfg, "digits")
    est = estimate_step(Context(cfg, quiet=True))
    assert est is not None and est.cheaper == "full backfill"
    assert est.parts["side-info training"] > 0 and est.parts["h training"] > 0
    assert 0 < est.full_seconds < est.transform_seconds
    assert not (tmp_path / "models").exists()  # timing trains nothing
    res = CliRunner().invoke(app, ["plan", "--estimate", "--json", "--set", f"workdir={tmp_path}"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["cheaper"] == "full backfill" and out["transform_seconds"] > out["full_seconds"]
