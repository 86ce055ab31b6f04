"""The generations benchmark's pure logic: cost extrapolation, one nightly planned step."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench import generations_page as page
from pipeline.bench.generations import (
    Cost,
    Planned,
    Quality,
    StrategyResult,
    extrapolate,
    gap_recovered,
    nightly_step,
)


def test_extrapolate_keeps_training_fixed_and_scales_the_rest() -> None:
    c = Cost(
        train_seconds=30.0,
        mapped_fraction=0.75,
        embedded_fraction=0.25,
        map_rate=1e5,
        embed_rate=1e3,
    )
    assert extrapolate(c, 1_000_000) == pytest.approx(30 + 7.5 + 250)
    assert c.seconds(0) == 30.0
    backfill = Cost(0.0, 0.0, 1.0, None, 500.0)
    assert backfill.seconds(1000) == pytest.approx(2.0)


def test_extrapolate_refuses_work_without_a_rate() -> None:
    with pytest.raises(ValueError, match="map work"):
        extrapolate(Cost(0.0, 1.0, 0.0, None, None), 10)


def test_gap_recovered() -> None:
    assert gap_recovered(60.0, 40.0, 80.0) == pytest.approx(50.0)
    assert gap_recovered(50.0, 50.0, 50.0) is None


def test_nightly_step_re_embeds_the_most_uncertain_rows_and_counts_hops() -> None:
    n, d = 8, 3
    prev = Planned.embedded(np.zeros((n, d), np.float32))
    mapped, fresh = np.ones((n, d), np.float32), np.full((n, d), 2.0, np.float32)
    lv = np.arange(n, dtype=np.float64)  # row 7 most uncertain
    night1 = nightly_step(prev, mapped, lv, fresh, 0.25, "uncertainty")
    assert sorted(np.flatnonzero(night1.hops == 0)) == [6, 7]
    assert (night1.emb[[6, 7]] == 2.0).all() and (night1.emb[:6] == 1.0).all()
    assert night1.mix() == "0:25% 1:75%"
    # next night, a flat step variance: the accumulated variance decides (rows 4, 5)
    night2 = nightly_step(night1, mapped, np.zeros(n), fresh, 0.25, "uncertainty")
    assert sorted(np.flatnonzero(night2.hops == 0)) == [4, 5]
    assert night2.mix() == "0:25% 1:25% 2:50%"


def test_nightly_step_random_order_is_seeded_and_needs_variance_for_uncertainty() -> None:
    prev = Planned.embedded(np.zeros((20, 2), np.float32))
    m, f = np.ones((20, 2), np.float32), np.full((20, 2), 2.0, np.float32)
    a = nightly_step(prev, m, None, f, 0.5, "random", seed=3)
    b = nightly_step(prev, m, None, f, 0.5, "random", seed=3)
    assert (a.hops == b.hops).all() and (a.hops == 0).sum() == 10
    with pytest.raises(ValueError, match="log-variance"):
        nightly_step(prev, m, None, f, 0.5, "uncertainty")


def _result(gen: str, strategy: str, hops: str, top1: float, cost: Cost | None):
    return StrategyResult(gen, strategy, hops, Quality(top1, top1 - 5, top1 / 2), None, cost, 100)


def test_page_states_the_measured_findings_and_keeps_hand_written_notes(tmp_path) -> None:
    fct, embed = Cost(10.0, 1.0, 0.0, 1e4, None), Cost(0.0, 0.0, 1.0, None, 1e3)
    results = [
        _result("v2", "chained = direct", "1", 80.0, fct),
        _result("v3", "chained", "2", 70.0, fct),
        _result("v3", "direct", "1", 85.0, fct),
        _result("v3", "backfill", "0", 90.0, embed),
    ]
    text = "\n".join(page.findings(results))
    assert "v3: the direct map (1 hop) against 2 hops chained: top-1 +15.00 points" in text
    assert "1,000 s per million rows against 110 s" in text
    figures = {
        "settings": {
            "data": "d.npz",
            "input_size": 16,
            "val_fraction": 0.3,
            "seed": 0,
            "metric": "cosine",
            "model_epochs": 1,
            "embedding_dim": 8,
            "map_epochs": 1,
            "models": {"v1": {"classes": None, "widths": [4]}},
        },
        "timings": {"total": 1.0},
    }
    md, png = page.write(results, figures, tmp_path, "cmd")
    assert png.stat().st_size > 0 and "| direct | 1 | 85.00 |" in md.read_text()
    md.write_text(md.read_text() + "\n## Notes\n\nkept.\n")
    page.write(results, figures, tmp_path, "cmd")
    assert md.read_text().count("## Notes") == 1 and md.read_text().endswith("kept.\n")
