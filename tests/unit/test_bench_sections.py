"""Benchmark sections at tiny sizes: the figures they return, not how fast they are."""

from __future__ import annotations

import math

import pytest

from pipeline.bench.common import Figure


def _check(figures: list[Figure], section: str, expected: dict[str, str]) -> None:
    assert [f.name for f in figures] == list(expected)
    for f in figures:
        assert f.section == section
        assert f.unit == expected[f.name], f.name
        assert math.isfinite(f.value) and f.value > 0, (f.name, f.value)
        if f.baseline_value is not None:
            assert math.isfinite(f.baseline_value) and f.baseline_value > 0, f.name
            assert f.baseline


def test_index_section_figures():
    from pipeline.bench.index import run_index

    figs = run_index(rows=2_000, dim=16, queries=50, seed=1)
    _check(figs, "index", {"queries/s": "queries/s", "recall@10": "fraction", "build seconds": "s"})
    qps, recall, build = figs
    assert qps.baseline == "flat index" and qps.target == 10.0
    # 2k rows is below IndexConfig().flat_max_rows: the auto index is exact.
    assert qps.extra["kind"] == "flat" and "kind=flat" in qps.note
    assert recall.value == 1.0 and recall.extra["target_recall"] == 0.95
    assert recall.target is None and recall.baseline_value is None
    assert build.higher_is_better is False


def test_index_embeddings_are_clustered_and_unit_norm():
    import numpy as np

    from pipeline.bench.index import clustered_embeddings

    g, g_label, q, q_label = clustered_embeddings(4_000, 128, 100, seed=0)
    assert g.shape == (4_000, 128) and q.shape == (100, 128)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, rtol=1e-5)
    # Structure for an index: a query's true neighbours come mostly from its own cluster
    # (15 clusters here: by chance, ~7% would).
    top10 = np.argsort(-(q @ g.T), axis=1)[:, :10]
    assert (g_label[top10] == q_label[:, None]).mean() > 0.9
    g2, *_ = clustered_embeddings(4_000, 128, 100, seed=0)
    np.testing.assert_array_equal(g, g2)


def test_evaluation_section_figures():
    from pipeline.bench.evaluation import run_evaluation

    figs = run_evaluation(queries=200, gallery=200, dim=32, seed=0)
    _check(
        figs,
        "evaluation",
        {
            "retrieval_metrics seconds": "s",
            "backfill_curve seconds": "s",
            "evaluation seconds": "s",
        },
    )
    assert all(f.higher_is_better is False for f in figs)
    metrics, curve, total = figs
    assert "floor" in metrics.baseline and metrics.target is None
    assert curve.baseline.startswith("re-rank") and curve.extra["points"] == 22
    # The fast curve and the per-point re-ranking are run on the same data: they must agree.
    assert curve.extra["curve_equals_rerank"] is True
    assert total.value == pytest.approx(metrics.value + curve.value) and total.target == 1.0
    assert 0 < metrics.extra["top1"] <= 100
