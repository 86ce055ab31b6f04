"""A compatibility study on one split: every method's sets, cases, matrix and curves, in top-1
and mAP where rows have labels and in recall@k against the new model's neighbours always."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.compat.orderings import backfill_order
from pipeline.evaluate.metrics import backfill_curve
from pipeline.evaluate.neighbours import measure_name, mixed_recall_curve, nearest, quality
from pipeline.evaluate.report import CompatReport, build_report
from pipeline.train.transformation import apply_transformation


@dataclass
class StudyInputs:
    """Embeddings of the same rows under each model, plus what maps between them; `labels`
    None for an unlabelled gallery.

    `sets` holds embedder outputs keyed by name (at least `old` and `new`); `side` is the
    side-information of those rows; `transformations` maps a name to (h, meta) where
    meta["side_info_model"] says whether h takes side-info; `adapters` maps new → old space.
    """

    labels: np.ndarray | None
    sets: dict[str, np.ndarray]
    old: str
    new: str
    side: np.ndarray | None = None
    transformations: dict[str, tuple[nn.Module, dict[str, Any]]] = field(default_factory=dict)
    adapters: dict[str, nn.Module] = field(default_factory=dict)
    bct: list[str] = field(default_factory=list)
    # the set a transformation maps, where it is not `old` (a direct map from an older space)
    inputs: dict[str, str] = field(default_factory=dict)
    # Further (case, query set, gallery set) over `sets`: e.g. BT²'s compatible dims vs old.
    extra_cases: list[tuple[str, str, str]] = field(default_factory=list)


def _transform(inp: StudyInputs) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    out, uncertainty = {}, {}
    for name, (model, meta) in inp.transformations.items():
        side = inp.side if meta.get("side_info_model") else None
        if meta.get("side_info_model") and side is None:
            raise ValueError(f"transformation {name!r} needs side-info but the rows have none")
        x = inp.sets[inp.inputs.get(name, inp.old)]
        pred, log_var = apply_transformation(model, x, side)
        out[name] = pred
        if log_var is not None:
            uncertainty[name] = log_var
    return out, uncertainty


def _adapt(inp: StudyInputs) -> dict[str, np.ndarray]:
    out = {}
    with torch.inference_mode():
        for kind, adapter in inp.adapters.items():
            x = torch.from_numpy(np.ascontiguousarray(inp.sets[inp.new], dtype=np.float32))
            out[f"adapter:{kind}"] = adapter.eval()(x).float().numpy()
    return out


@dataclass(frozen=True)
class ChainChoice:
    """Which of two ways to the new space the upgrade maps with: `compose` (the registered
    maps, then h) or `direct` (h from the serving space), by their measured quality."""

    chosen: str
    quality: dict[str, float]
    measure: str


def choose_chain(
    inp: StudyInputs, compose: str, direct: str, metric: str, k: int, min_gain: float
) -> ChainChoice:
    """Measure both candidates' galleries for new-model queries; the direct map wins unless
    composing is better by more than `min_gain` points (it applies one map, not several)."""
    transformed, _ = _transform(inp)
    q = {
        name: quality(inp.sets[inp.new], transformed[name], inp.labels, metric, k)
        for name in (compose, direct)
    }
    chosen = compose if q[compose] > q[direct] + min_gain else direct
    return ChainChoice(chosen, q, measure_name(inp.labels is not None, k))


def study_cases(inp: StudyInputs, transformed: list[str], adapted: list[str]) -> list[tuple]:
    """FCT's cases: old/old, new/new, BCT new/old, new vs each transformed gallery, adapters."""
    o, n = inp.old, inp.new
    cases = [("old/old", o, o), ("new/new", n, n)]
    if inp.sets[n].shape[1] == inp.sets[o].shape[1]:  # same space size: try it as is
        cases.append(("new/old (BCT)" if n in inp.bct else "new/old", n, o))
    for b in inp.bct:
        if b != n:
            cases += [(f"{b}/old (BCT)", b, o), (f"{b}/{b}", b, b)]
    cases += [(f"new/{t}", n, t) for t in transformed]
    cases += [(f"{a} new→old", a, o) for a in adapted]
    return cases + list(inp.extra_cases)


def compat_study(
    inp: StudyInputs,
    title: str,
    metric: str = "cosine",
    orderings: tuple[str, ...] = ("random", "uncertainty", "oracle"),
    steps: int = 21,
    seed: int = 0,
    curve_on: str | None = None,
    recall_k: int = 10,
) -> CompatReport:
    """Evaluate every case, the matrix across all sets, and the backfilling curves.

    Curves run on `curve_on` (default: the first transformation with an uncertainty head,
    else the first one): the gallery starts fully transformed and rows switch to the new
    model's embedding in each ordering's order; queries are new-model embeddings.
    """
    for role in (inp.old, inp.new):
        if role not in inp.sets:
            raise ValueError(f"study needs embeddings of {role!r}; have {sorted(inp.sets)}")
    transformed, uncertainty = _transform(inp)
    adapted = _adapt(inp)
    sets = {**inp.sets, **transformed, **adapted}
    cases = study_cases(inp, list(transformed), list(adapted))
    new = inp.sets[inp.new]
    ref = nearest(new, new, min(recall_k, len(new) - 1), metric) if recall_k else None
    report = build_report(title, sets, inp.labels, cases, metric, reference=ref)
    curve_on = curve_on or next(iter(uncertainty), next(iter(transformed), None))
    if curve_on is not None:
        g_t, g_n = transformed[curve_on], new
        for kind in orderings:
            if kind == "uncertainty" and curve_on not in uncertainty:
                continue  # an FCT model without FastFill's head has no uncertainty order
            order = backfill_order(
                kind,
                len(g_n),
                seed=seed,
                uncertainty=uncertainty.get(curve_on),
                transformed=g_t,
                new=g_n,
                metric="cosine" if metric == "cosine" else "l2",
            )
            curve = None
            if inp.labels is not None:
                curve = backfill_curve(g_t, g_n, g_n, inp.labels, order, metric, steps)
            recall = None
            if ref is not None:
                recall = mixed_recall_curve(g_t, g_n, g_n, ref, order, metric, steps)
            report.add_curve(kind, curve, recall)
        report.extra["curves_on"] = curve_on
    return report
