"""The generations benchmark's pure logic: cost extrapolation, one nightly planned step."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench.generations import Cost, Planned, extrapolate, gap_recovered, nightly_step


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
