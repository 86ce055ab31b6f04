"""Compatibility report: case values, matrix, gap recovered, strict JSON and written plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rich.console import Console

from pipeline.evaluate.metrics import backfill_curve, retrieval_metrics
from pipeline.evaluate.neighbours import mixed_recall_curve, nearest, neighbour_recall
from pipeline.evaluate.report import (
    CompatCase,
    CompatReport,
    build_report,
    compatibility_matrix,
    evaluate_cases,
    write_report,
)

CASES = [
    ("old/old", "old", "old"),
    ("new/new", "new", "new"),
    ("new/old (BCT)", "new", "old"),
    ("new/FCT+side", "new", "fct"),
]


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    new = rng.normal(size=(3, 8))[labels] * 1.5 + rng.normal(size=(n, 8))
    old = new + rng.normal(size=(n, 8)) * 2.0
    fct = new + rng.normal(size=(n, 8)) * 0.8
    side = rng.normal(size=(3, 4))[labels] + rng.normal(size=(n, 4))
    sets = {"old": old, "new": new, "fct": fct, "side": side, "new_copy": new.copy()}
    return sets, labels


def _raise_on_constant(name):
    raise ValueError(f"non-strict JSON constant {name}")


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_cases_equal_direct_retrieval_metrics(metric):
    sets, labels = _data()
    cases = evaluate_cases(sets, labels, CASES, metric)
    assert [c.name for c in cases] == [name for name, _, _ in CASES]
    for c, (_, q, g) in zip(cases, CASES, strict=True):
        want = retrieval_metrics(sets[q], sets[g], labels, labels, metric, exclude_self=True)
        assert (c.query, c.gallery) == (q, g)
        assert c.top1 == pytest.approx(want["top1"])
        assert c.top5 == pytest.approx(want["top5"])
        assert c.map == pytest.approx(want["map"])
        assert c.num_queries == 60
    # Sanity that the data separate the cases: the noisier old model retrieves worse.
    assert cases[1].top1 > cases[0].top1


def test_matrix_nan_where_dims_differ_and_diagonal_self_excluded():
    sets, labels = _data()
    names, m = compatibility_matrix(sets, labels, value="map")
    assert names == list(sets)
    assert m.shape == (5, 5)
    s = names.index("side")
    for j, name in enumerate(names):
        assert math.isnan(m[s, j]) == (name != "side")
        assert math.isnan(m[j, s]) == (name != "side")
    for i, name in enumerate(names):
        x = sets[name]
        want = retrieval_metrics(x, x, labels, labels, exclude_self=True)["map"]
        assert m[i, i] == pytest.approx(want)
    # Without exclusion every diagonal top-1 would be 100: check the self-match really is gone.
    _, top1 = compatibility_matrix(sets, labels)
    assert top1[names.index("old"), names.index("old")] < 100.0


def test_identical_copy_scores_like_the_original():
    sets, labels = _data()
    names, m = compatibility_matrix(sets, labels)
    new, copy, old = names.index("new"), names.index("new_copy"), names.index("old")
    assert m[copy, copy] == pytest.approx(m[new, new])
    assert m[new, copy] == pytest.approx(m[new, new])
    assert m[copy, old] == pytest.approx(m[new, old])


def _report(cases, curves=None):
    return CompatReport(
        title="t",
        metric="cosine",
        num_rows=10,
        cases=cases,
        matrix_names=[],
        matrix=[],
        curves=curves or {},
    )


def test_gap_recovered_hand_example():
    cases = [
        CompatCase("old/old", "old", "old", 50.0, 60.0, 40.0, 10),
        CompatCase("new/new", "new", "new", 90.0, 95.0, 80.0, 10),
        CompatCase("new/old (BCT)", "new", "old", 86.0, 90.0, 70.0, 10),
    ]
    report = _report(cases)
    assert report.gap_recovered("new/old (BCT)") == pytest.approx(90.0)
    assert report.gap_recovered("old/old") == pytest.approx(0.0)
    assert math.isnan(report.gap_recovered("new/old (BCT)", low="old/old", high="old/old"))
    with pytest.raises(ValueError, match="no case 'nope'"):
        report.gap_recovered("nope")
    metrics = report.metrics()
    assert metrics["top1_new_old_bct"] == 86.0
    assert metrics["gap_recovered_new_old_bct"] == pytest.approx(90.0)


def _full_report():
    sets, labels = _data()
    report = build_report("study", sets, labels, CASES, extra={"adapter": "fct", "secs": 1.5})
    order = np.random.default_rng(5).permutation(len(labels))
    curve = backfill_curve(sets["fct"], sets["new"], sets["new"], labels, order, steps=5)
    report.add_curve("random", curve)
    # A NaN anywhere must still give strict JSON.
    report.cases.append(CompatCase("empty", "x", "y", 0.0, 0.0, float("nan"), 0))
    return report, sets, labels, curve


def test_build_report_matches_the_separate_functions():
    report, sets, labels, _ = _full_report()
    cases = evaluate_cases(sets, labels, CASES)
    assert report.cases[: len(CASES)] == cases
    names, m = compatibility_matrix(sets, labels)
    assert report.matrix_names == names
    got = np.array([[np.nan if v is None else v for v in row] for row in report.matrix])
    np.testing.assert_allclose(got, m)


def test_to_json_is_strict_and_metrics_are_flat():
    report, _, _, curve = _full_report()
    d = json.loads(report.to_json(), parse_constant=_raise_on_constant)
    assert d["cases"][-1]["map"] is None
    assert d["matrix"][list(d["matrix_names"]).index("side")][0] is None
    assert d["curves"]["random"]["auc_top1"] == pytest.approx(curve.auc_top1)
    metrics = report.metrics()
    assert metrics["auc_top1_random"] == pytest.approx(curve.auc_top1)
    assert metrics["top5_new_fct_side"] == report.cases[3].top5
    assert "map_empty" not in metrics  # NaN skipped
    assert all(k == k.lower() and k.replace("_", "").isalnum() for k in metrics)
    console = Console(record=True, width=120)
    console.print(report.table())
    console.print(report.curves_table())
    text = console.export_text()
    assert "new/old (BCT)" in text and "random" in text


def test_write_report_creates_pngs_and_json_round_trips(tmp_path):
    report, _, _, _ = _full_report()
    written = write_report(report, tmp_path / "out")
    expected = {"report.json", "backfill_curves.png", "compat_matrix.png", "cases.png"}
    assert set(written) == expected
    for name in expected - {"report.json"}:
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 5000
    text = (tmp_path / "out" / "report.json").read_text()
    back = json.loads(text, parse_constant=_raise_on_constant)
    for got, want in zip(back["cases"], report.cases, strict=True):
        assert got["name"] == want.name
        assert got["top1"] == pytest.approx(want.top1)
    again = CompatReport.from_json(text)
    assert again.cases[0] == report.cases[0]
    assert math.isnan(again.cases[-1].map)


def test_write_report_skips_empty_plots(tmp_path):
    written = write_report(_report([]), tmp_path)
    assert set(written) == {"report.json"}


def test_clear_errors():
    sets, labels = _data()
    with pytest.raises(ValueError, match="gallery set 'missing' is missing"):
        evaluate_cases(sets, labels, [("x", "new", "missing")])
    dims = "query set 'new' has dim 8 but gallery set 'side' has dim 4"
    with pytest.raises(ValueError, match=dims):
        evaluate_cases(sets, labels, [("x", "new", "side")])
    short = dict(sets, short=sets["new"][:50])
    with pytest.raises(ValueError, match="'new' has 60 rows but gallery set 'short' has 50"):
        evaluate_cases(short, labels, [("x", "new", "short")])
    with pytest.raises(ValueError, match="'short' has 50 rows but there are 60 labels"):
        compatibility_matrix(short, labels)
    with pytest.raises(ValueError, match="value must be"):
        compatibility_matrix(sets, labels, value="top3")


def test_an_unlabelled_report_is_measured_by_recall_against_new_neighbours(tmp_path):
    sets, _ = _data()
    ref = nearest(sets["new"], sets["new"], 5, "cosine")
    report = build_report("unlabelled", sets, None, CASES, reference=ref)
    assert not report.labelled and report.recall_k == 5 and report.matrix_value == "recall"
    by = {c.name: c for c in report.cases}
    assert by["new/new"].recall == 100.0 and math.isnan(by["new/new"].top1)
    assert by["new/FCT+side"].recall == pytest.approx(
        neighbour_recall(sets["new"], sets["fct"], ref, "cosine")
    )
    assert by["new/FCT+side"].recall > by["new/old (BCT)"].recall  # fct is nearer to new
    order = np.random.default_rng(5).permutation(60)
    recall = mixed_recall_curve(sets["fct"], sets["new"], sets["new"], ref, order, "cosine", 5)
    report.add_curve("random", None, recall)
    assert report.curves["random"]["auc_recall"] == pytest.approx(np.mean(recall))
    assert report.metrics()["recall_new_fct_side"] == by["new/FCT+side"].recall
    assert "top1_new_new" not in report.metrics()
    written = write_report(report, tmp_path)
    assert {"backfill_curves.png", "compat_matrix.png", "cases.png"} <= set(written)
    again = CompatReport.from_json((tmp_path / "report.json").read_text())
    assert again.recall_k == 5 and again.cases[1].recall == 100.0
    out = Console(width=160, record=True)
    out.print(report.table())
    out.print(report.curves_table())
    text = out.export_text()
    assert "R@5" in text and "top-1" not in text and "AUC R@k" in text


def test_a_labelled_report_carries_recall_beside_top1():
    sets, labels = _data()
    ref = nearest(sets["new"], sets["new"], 5, "cosine")
    report = build_report("both", sets, labels, CASES, reference=ref)
    assert report.labelled and report.matrix_value == "top1"
    assert report.cases[: len(CASES)] == [
        c.__class__(**{**c.__dict__, "recall": report.cases[i].recall})
        for i, c in enumerate(evaluate_cases(sets, labels, CASES))
    ]
    assert all(c.recall is not None for c in report.cases)
