"""Retrieval metrics against a brute-force reference, a hand-computed example and curve checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluate.metrics import backfill_curve, retrieval_metrics


def _reference(q, g, ql, gl, metric, exclude_self, ks=(1, 5)):
    """One query at a time, plain Python ranking with (distance, gallery index) ties."""
    hits = dict.fromkeys(ks, 0)
    aps, no_match = [], 0
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    for i in range(len(q)):
        if metric == "cosine":
            d = -(gn @ (q[i] / np.linalg.norm(q[i])))
        else:
            d = ((g - q[i]) ** 2).sum(1)
        idx = [j for j in range(len(g)) if not (exclude_self and j == i)]
        rel = [gl[j] == ql[i] for j in sorted(idx, key=lambda j: (d[j], j))]
        first = next((r for r, x in enumerate(rel) if x), None)
        for k in ks:
            hits[k] += first is not None and first < k
        if first is None:
            no_match += 1
            continue
        found, total = 0, 0.0
        for rank, x in enumerate(rel, 1):
            if x:
                found += 1
                total += found / rank
        aps.append(total / found)
    out = {f"top{k}": 100.0 * hits[k] / len(q) for k in ks}
    out["map"] = 100.0 * float(np.mean(aps))
    out["queries_without_match"] = float(no_match)
    return out


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_same_set_matches_reference(metric, exclude_self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    labels = rng.integers(0, 4, size=60)
    got = retrieval_metrics(x, x, labels, labels, metric, (1, 5), exclude_self, chunk=7)
    want = _reference(x, x, labels, labels, metric, exclude_self)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["num_queries"] == 60.0


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_distinct_sets_match_reference_and_count_queries_without_match(metric):
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(45, 5)), rng.normal(size=(70, 5))
    # Label 9 exists only among queries: those queries have no relevant gallery item.
    ql, gl = rng.integers(0, 3, size=45), rng.integers(0, 3, size=70)
    ql[:4] = 9
    got = retrieval_metrics(q, g, ql, gl, metric, (1, 5, 10), exclude_self=False, chunk=16)
    want = _reference(q, g, ql, gl, metric, False, ks=(1, 5, 10))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["queries_without_match"] == 4.0


def test_hand_computed_example_with_a_tie():
    # Points on a line; query 1 sits at distance 1 from both 0 (label a) and 2 (label b):
    # the stable tie-break ranks gallery index 0 first, so query 1 gets a top-1 hit.
    x = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [11.0, 0.0]])
    labels = np.array(["a", "a", "b", "a", "b"])
    got = retrieval_metrics(x, x, labels, labels, "l2", (1, 2), exclude_self=True)
    # Per-query AP: 5/6, 5/6, 1/4, 5/12, 1/2; first-hit ranks: 1, 1, 4, 3, 2.
    assert got["top1"] == pytest.approx(40.0)
    assert got["top2"] == pytest.approx(60.0)
    assert got["map"] == pytest.approx(100.0 * 34 / 60)
    assert got["queries_without_match"] == 0.0
    with_self = retrieval_metrics(x, x, labels, labels, "l2", (1,), exclude_self=False)
    assert with_self["top1"] == pytest.approx(100.0)


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=30)
    a = retrieval_metrics(x, x, labels, labels, "cosine", exclude_self=True)
    b = retrieval_metrics(
        torch.from_numpy(x),
        torch.from_numpy(x),
        torch.from_numpy(labels),
        torch.from_numpy(labels),
        "cosine",
        exclude_self=True,
        chunk=4,
    )
    assert a == b


def test_invalid_inputs_raise():
    x = np.zeros((3, 2)) + np.arange(3)[:, None]
    with pytest.raises(ValueError, match="exclude_self"):
        retrieval_metrics(x, x[:2], [0, 1, 0], [0, 1], exclude_self=True)
    with pytest.raises(ValueError, match="dim 2 but gallery has dim 3"):
        retrieval_metrics(x, np.ones((3, 3)), [0, 1, 0], [0, 1, 0])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(x, np.full((3, 2), np.nan), [0, 1, 0], [0, 1, 0])
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(x, x, [0, 1], [0, 1, 0])


def _curve_data(n=84, d=8, seed=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=n)
    centers = rng.normal(size=(5, d)) * 2
    g_new = centers[labels] + rng.normal(size=(n, d))
    g_transformed = g_new + rng.normal(size=(n, d)) * 1.5
    return g_new, g_transformed, labels, rng.permutation(n)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_backfill_curve_endpoints_points_and_auc(metric):
    g_new, g_tr, labels, order = _curve_data()
    curve = backfill_curve(g_tr, g_new, g_new, labels, order, metric)
    assert len(curve.fractions) == len(curve.top1) == len(curve.map) == 22
    assert curve.fractions[0] == 0.0 and curve.fractions[-1] == 1.0
    assert curve.fractions[1] == pytest.approx(1 / 21)
    none = retrieval_metrics(g_new, g_tr, labels, labels, metric, (1,), exclude_self=True)
    full = retrieval_metrics(g_new, g_new, labels, labels, metric, (1,), exclude_self=True)
    assert (curve.top1[0], curve.map[0]) == pytest.approx((none["top1"], none["map"]))
    assert (curve.top1[-1], curve.map[-1]) == pytest.approx((full["top1"], full["map"]))
    assert curve.auc_top1 == pytest.approx(float(np.mean(curve.top1)))
    assert curve.auc_map == pytest.approx(float(np.mean(curve.map)))
    # Point 7 = first round(7/21 * 84) = 28 rows of the order re-embedded.
    mixed = g_tr.copy()
    mixed[order[:28]] = g_new[order[:28]]
    mid = retrieval_metrics(g_new, mixed, labels, labels, metric, (1,), exclude_self=True)
    assert (curve.top1[7], curve.map[7]) == pytest.approx((mid["top1"], mid["map"]))


def test_backfill_curve_rejects_a_non_permutation():
    g_new, g_tr, labels, order = _curve_data(n=10)
    with pytest.raises(ValueError, match="permutation"):
        backfill_curve(g_tr, g_new, g_new, labels, np.zeros(10, dtype=int))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize(("n", "steps", "chunk"), [(84, 21, 1024), (30, 40, 7)])
def test_every_curve_point_equals_metrics_on_its_mixed_gallery(metric, n, steps, chunk):
    """The curve counts ranks per piece of the order instead of re-ranking at each point;
    every point must still equal a full ranking of that point's gallery (ties included, and
    more points than rows, so some pieces are empty)."""
    g_new, g_tr, labels, order = _curve_data(n=n)
    g_tr[3] = g_tr[5]  # exact ties between transformed rows
    g_tr[8] = g_new[8]  # and between a row's two versions
    curve = backfill_curve(g_tr, g_new, g_new, labels, order, metric, steps, chunk=chunk)
    for i in range(steps + 1):
        mixed = g_tr.copy()
        upto = round(i * n / steps)
        mixed[order[:upto]] = g_new[order[:upto]]
        want = retrieval_metrics(g_new, mixed, labels, labels, metric, (1,), exclude_self=True)
        assert (curve.top1[i], curve.map[i]) == pytest.approx((want["top1"], want["map"]))
