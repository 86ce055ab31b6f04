"""Label-free retrieval quality: the share of the new model's own k nearest neighbours that a
gallery keeps (recall@k against the fully re-embedded sample, as Drift-Adapter reports it).

Rows of every set are the same images in the same order; queries are the new model's
embeddings of them, and each query's own row is left out of its neighbours."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.evaluate.metrics import ArrayLike, Metric, order_pieces, retrieval_metrics

CHUNK = 1024  # queries per distance block: memory ~ CHUNK x gallery rows


def _prepared(x: ArrayLike, metric: Metric) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D (rows, dim) array, got shape {tuple(t.shape)}")
    return torch.nn.functional.normalize(t, dim=1) if metric == "cosine" else t


def _distances(q: torch.Tensor, g: torch.Tensor, metric: Metric, lo: int) -> torch.Tensor:
    """Query block q (rows lo.. of the set) against g; a row's own column is pushed last."""
    d = -(q @ g.T) if metric == "cosine" else torch.cdist(q, g).square()
    rows = torch.arange(len(q))
    d[rows, rows + lo] = torch.inf
    return d


def nearest(queries: ArrayLike, gallery: ArrayLike, k: int, metric: Metric) -> np.ndarray:
    """(n, k) indices of each query's k nearest gallery rows, its own row excluded."""
    q, g = _prepared(queries, metric), _prepared(gallery, metric)
    if q.shape != g.shape:
        raise ValueError(f"queries {tuple(q.shape)} and gallery {tuple(g.shape)} must match")
    if not 1 <= k < len(g):
        raise ValueError(f"k must be in [1, {len(g) - 1}], got {k}")
    out = [
        torch.topk(_distances(q[lo : lo + CHUNK], g, metric, lo), k, largest=False).indices
        for lo in range(0, len(q), CHUNK)
    ]
    return torch.cat(out).numpy()


def overlap(found: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per query: the share of its reference neighbours that `found` holds too."""
    if found.shape != reference.shape:
        raise ValueError(f"found {found.shape} and reference {reference.shape} must match")
    hits = (found[:, :, None] == reference[:, None, :]).any(axis=2).sum(axis=1)
    return hits / reference.shape[1]


def neighbour_recall(
    queries: ArrayLike, gallery: ArrayLike, reference: np.ndarray, metric: Metric
) -> float:
    """Recall@k (percent) of `gallery` for `queries` against the reference neighbours."""
    found = nearest(queries, gallery, reference.shape[1], metric)
    return 100.0 * float(overlap(found, reference).mean())


def mixed_recall_curve(
    g_transformed: ArrayLike,
    g_new: ArrayLike,
    queries: ArrayLike,
    reference: np.ndarray,
    order: np.ndarray,
    metric: Metric,
    steps: int,
) -> list[float]:
    """Recall@k (percent) at fractions 0, 1/steps, ..., 1 of the gallery re-embedded in
    `order` (the rest transformed): the label-free backfilling curve."""
    gt, gn, q = (_prepared(x, metric) for x in (g_transformed, g_new, queries))
    n, k = len(gn), reference.shape[1]
    _, step_of = order_pieces(np.asarray(order), steps)  # the labelled curve's cut points
    swapped = [torch.from_numpy(step_of <= s) for s in range(steps + 1)]
    sums = np.zeros(steps + 1)
    for lo in range(0, n, CHUNK):
        dt = _distances(q[lo : lo + CHUNK], gt, metric, lo)
        dn = _distances(q[lo : lo + CHUNK], gn, metric, lo)
        ref = reference[lo : lo + CHUNK]
        for s, cols in enumerate(swapped):
            idx = torch.topk(torch.where(cols[None, :], dn, dt), k, largest=False).indices
            sums[s] += overlap(idx.numpy(), ref).sum()
    return [100.0 * float(v) / n for v in sums]


def measure_name(labelled: bool, k: int) -> str:
    """How an upgrade's quality figures are labelled: top-1, or recall@k without labels."""
    return "top-1" if labelled else f"R@{k}"


def quality(
    queries: ArrayLike, gallery: ArrayLike, labels: np.ndarray | None, metric: Metric, k: int
) -> float:
    """An upgrade's measure of `gallery` for new-model `queries` of the same rows (percent):
    top-1 where rows have labels, else recall@k of the queries' own neighbours."""
    if labels is not None:
        m = retrieval_metrics(queries, gallery, labels, labels, metric, exclude_self=True)
        return float(m["top1"])
    ref = nearest(queries, queries, min(k, len(queries) - 1), metric)
    return neighbour_recall(queries, gallery, ref, metric)
