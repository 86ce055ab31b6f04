"""Retrieval metrics, FCT protocol: CMC top-k, mAP over the full ranking, backfilling curves."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
Metric = Literal["cosine", "l2"]
_MAX_THREADS = 8


def _embeddings(x: ArrayLike, name: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (rows, dim) array, got shape {tuple(t.shape)}")
    # float64 keeps rankings identical to a numpy reference; near-ties flip in float32.
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


def _labels(q_labels: ArrayLike, g_labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Encode both label arrays to shared dense int ids (labels may be ints or strings)."""
    ql = np.asarray(q_labels.cpu() if isinstance(q_labels, torch.Tensor) else q_labels).ravel()
    gl = np.asarray(g_labels.cpu() if isinstance(g_labels, torch.Tensor) else g_labels).ravel()
    _, inv = np.unique(np.concatenate([ql, gl]), return_inverse=True)
    inv = inv.ravel().astype(np.int64)
    return inv[: len(ql)], inv[len(ql) :]


def _distances(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor | None) -> torch.Tensor:
    """Smaller is closer: negative cosine similarity, or squared L2 (same order as L2)."""
    if g_sq is None:
        return -(q @ g.T)
    return (q * q).sum(1, keepdim=True) + g_sq[None, :] - 2.0 * (q @ g.T)


def _keys(dist: np.ndarray) -> np.ndarray:
    """Unique, order-preserving int64 keys of each row's distances: (distance, column).

    numpy's SIMD quicksort on int64 is several times faster than a stable argsort, so the
    column index is packed into the low bits of an order-preserving integer image of the
    float64 distance: keys are unique within a row, hence their order equals a stable sort.
    Distances closer than ~2**-(52 - log2(cols)) relative become ties, broken by column
    (deterministic). Works in place: `dist` is a scratch buffer owned by the caller.
    """
    bits = max(1, (dist.shape[1] - 1).bit_length())
    dist += 0.0  # turns -0.0 into +0.0 so both zeros get one key
    key = dist.view(np.int64)
    key ^= (key >> 63) & np.int64(0x7FFFFFFFFFFFFFFF)  # negative floats: reverse magnitude
    key &= ~np.int64((1 << bits) - 1)
    key |= np.arange(dist.shape[1], dtype=np.int64)
    return key


def _stable_order(dist: np.ndarray) -> np.ndarray:
    """Column indices of each row sorted by (distance, column), from one int64 sort."""
    bits = max(1, (dist.shape[1] - 1).bit_length())
    key = _keys(dist)
    key.sort(axis=1)
    return key & np.int64((1 << bits) - 1)


def _chunk_stats(
    dist: np.ndarray, ql: np.ndarray, gl: np.ndarray, self_idx: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-hit rank (0-based, ng if none), AP and relevant count for each query in a chunk."""
    n, ng = dist.shape
    if self_idx is not None:
        # Pushing the self-match to +inf puts it strictly last (inputs are finite), so every
        # other item keeps its 1-based rank = position + 1 and no rank re-count is needed.
        dist[np.arange(n), self_idx] = np.inf
    order = _stable_order(dist)
    rel = gl[order] == ql[:, None]
    if self_idx is not None:
        rel[:, -1] &= order[:, -1] != self_idx
    rows, cols = np.nonzero(rel)  # row-major: each row's hits in rank order
    n_rel = np.bincount(rows, minlength=n)
    starts = np.cumsum(n_rel) - n_rel
    # The j-th relevant item of a row (1-based) sits at rank cols+1: precision there is j/rank.
    j = np.arange(len(rows)) - starts[rows] + 1
    ap = np.bincount(rows, weights=j / (cols + 1), minlength=n) / np.maximum(n_rel, 1)
    has = n_rel > 0
    first = np.full(n, ng, dtype=np.int64)
    first[has] = cols[starts[has]]
    return first, ap, n_rel


def _metrics(
    q: torch.Tensor,
    g: torch.Tensor,
    ql: np.ndarray,
    gl: np.ndarray,
    metric: Metric,
    topk: Sequence[int],
    exclude_self: bool,
    chunk: int,
) -> dict[str, float]:
    """Metrics on validated float64 embeddings and labels encoded as dense ints."""
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        g = torch.nn.functional.normalize(g, dim=1)
        g_sq = None
    else:
        g_sq = (g * g).sum(1)
    nq = q.shape[0]

    def run(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self_idx = np.arange(lo, hi) if exclude_self else None
        dist = _distances(q[lo:hi], g, g_sq).numpy()
        return _chunk_stats(dist, ql[lo:hi], gl, self_idx)

    # numpy's sort runs on one core but releases the GIL: threads over slices of a chunk use
    # every core while the slices together still hold only ~chunk x ng values at a time.
    # torch's thread count follows OMP_NUM_THREADS, which Ray sets to a task's CPUs.
    workers = max(1, min(_MAX_THREADS, torch.get_num_threads()))
    step = max(1, -(-chunk // workers))
    bounds = [(lo, min(lo + step, nq)) for lo in range(0, nq, step)]
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda b: run(*b), bounds))
    firsts, aps, nrels = zip(*parts, strict=True)
    first, ap, n_rel = np.concatenate(firsts), np.concatenate(aps), np.concatenate(nrels)
    has = n_rel > 0
    out = {f"top{k}": 100.0 * float(np.mean(first < k)) for k in topk}
    # Queries with nothing relevant have no defined AP: skip them (NaN if none has a match).
    out["map"] = 100.0 * float(ap[has].mean()) if has.any() else float("nan")
    out["queries_without_match"] = float((~has).sum())
    out["num_queries"] = float(nq)
    return out


def retrieval_metrics(
    queries: ArrayLike,
    gallery: ArrayLike,
    q_labels: ArrayLike,
    g_labels: ArrayLike,
    metric: Metric = "cosine",
    topk: Sequence[int] = (1, 5),
    exclude_self: bool = False,
    chunk: int = 1024,
) -> dict[str, float]:
    """CMC top-k and mAP (percent) of `queries` against `gallery`, FCT's protocol.

    A gallery item is relevant when its label equals the query's. `topk` entries are the
    fraction of all queries whose first relevant item ranks within k; `map` averages AP over
    the full ranking for queries with at least one relevant item (the others are counted in
    `queries_without_match`). `exclude_self=True` (query set = gallery set) drops gallery row
    i from query i's ranking. Work is chunked over queries: memory ~ chunk x len(gallery).
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    if chunk < 1 or not topk or min(topk) < 1:
        raise ValueError(f"chunk and every topk must be >= 1, got chunk={chunk}, topk={topk}")
    q, g = _embeddings(queries, "queries"), _embeddings(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but gallery has dim {g.shape[1]}")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"need queries and gallery rows, got {q.shape[0]} and {g.shape[0]}")
    ql, gl = _labels(q_labels, g_labels)
    if len(ql) != q.shape[0] or len(gl) != g.shape[0]:
        raise ValueError(
            f"labels do not match rows: {len(ql)} query labels for {q.shape[0]} queries, "
            f"{len(gl)} gallery labels for {g.shape[0]} gallery rows"
        )
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError(
            f"exclude_self needs query set = gallery set, got {q.shape[0]} vs {g.shape[0]} rows"
        )
    return _metrics(q, g, ql, gl, metric, tuple(topk), exclude_self, chunk)


@dataclass(frozen=True)
class BackfillCurve:
    """Metrics after re-embedding each fraction of the gallery; AUC = mean over the points."""

    fractions: list[float]
    top1: list[float]
    map: list[float]
    auc_top1: float
    auc_map: float

    def summary(self) -> dict[str, float]:
        """Scalar metrics for tracking: both AUCs and the two endpoints."""
        return {
            "auc_top1": self.auc_top1,
            "auc_map": self.auc_map,
            "top1_none_backfilled": self.top1[0],
            "top1_all_backfilled": self.top1[-1],
        }


def order_pieces(perm: np.ndarray, steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The order cut into steps + 1 pieces (piece 0 empty), and each gallery row's step."""
    n = len(perm)
    # Step i swaps in rows perm[round((i-1)n/steps) : round(i n/steps)]: piece i of the order.
    bounds = [round(i * n / steps) for i in range(steps + 1)]
    pieces = [perm[:0]] + [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    step_of = np.empty(n, dtype=np.int64)
    for i, cols in enumerate(pieces):
        step_of[cols] = i
    return pieces, step_of


def backfill_curve(
    g_transformed: ArrayLike,
    g_new: ArrayLike,
    queries: ArrayLike,
    labels: ArrayLike,
    order: ArrayLike,
    metric: Metric = "cosine",
    steps: int = 21,
    chunk: int = 1024,
) -> BackfillCurve:
    """Backfilling curve: at fractions 0, 1/steps, ..., 1 the first round(f*n) gallery rows of
    `order` use `g_new`, the rest `g_transformed`; queries are the new model's embeddings of
    the same set, so self-matches are excluded.
    """
    gt, gn = _embeddings(g_transformed, "g_transformed"), _embeddings(g_new, "g_new")
    q = _embeddings(queries, "queries")
    if gt.shape != gn.shape or q.shape != gn.shape:
        raise ValueError(
            f"g_transformed {tuple(gt.shape)}, g_new {tuple(gn.shape)} and queries "
            f"{tuple(q.shape)} must have the same shape (queries = gallery set)"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = gn.shape[0]
    perm = torch.as_tensor(np.asarray(order.cpu() if isinstance(order, torch.Tensor) else order))
    if perm.shape != (n,) or not torch.equal(torch.sort(perm).values, torch.arange(n)):
        raise ValueError(f"order must be a permutation of range({n})")
    ql, gl = _labels(labels, labels)
    if len(ql) != n:
        raise ValueError(f"{len(ql)} labels for {n} gallery rows")
    if metric == "cosine":
        q, gt, gn = (torch.nn.functional.normalize(x, dim=1) for x in (q, gt, gn))
        gt_sq = gn_sq = None
    else:
        gt_sq, gn_sq = (gt * gt).sum(1), (gn * gn).sum(1)
    pieces, step_of = order_pieces(perm.numpy(), steps)

    def run(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        kt = _keys(_distances(q[lo:hi], gt, gt_sq).numpy())
        kn = _keys(_distances(q[lo:hi], gn, gn_sq).numpy())
        return _curve_stats(kt, kn, ql[lo:hi], gl, np.arange(lo, hi), pieces, step_of)

    workers = max(1, min(_MAX_THREADS, torch.get_num_threads()))
    step = max(1, -(-chunk // workers))
    row_bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda b: run(*b), row_bounds))
    first = np.concatenate([p[0] for p in parts], axis=1)
    ap = np.concatenate([p[1] for p in parts], axis=1)
    has = np.concatenate([p[2] for p in parts]) > 0
    top1 = [100.0 * float(np.mean(f < 1)) for f in first]
    maps = [100.0 * float(a[has].mean()) if has.any() else float("nan") for a in ap]
    return BackfillCurve(
        fractions=[i / steps for i in range(steps + 1)],
        top1=top1,
        map=maps,
        auc_top1=float(np.mean(top1)),
        auc_map=float(np.mean(maps)),
    )


def _curve_stats(
    kt: np.ndarray,
    kn: np.ndarray,
    ql: np.ndarray,
    gl: np.ndarray,
    self_idx: np.ndarray,
    pieces: list[np.ndarray],
    step_of: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-hit rank and AP of each query at every curve point, plus relevant counts.

    `kt`/`kn` are the rows' keys against the transformed/new gallery. At point s a column c
    holds kn if it was swapped in by then (step_of[c] <= s), else kt, so the rank of a
    relevant item with key x is  sum over pieces v > s of #{kt in v < x}  +  sum over v <= s of
    #{kn in v < x}  + 1. Each piece is sorted once and only the relevant items' keys are
    searched in it: the work is about two sorts of each row instead of one per point.
    """
    n, ng = kt.shape
    points = len(pieces)
    r = np.arange(n)
    top = np.iinfo(np.int64).max
    kt[r, self_idx] = top  # the self-match counts as closer than nothing
    kn[r, self_idx] = top
    rel = gl[None, :] == ql[:, None]
    rel[r, self_idx] = False
    n_rel = rel.sum(1)
    kmax = int(n_rel.max()) if n else 0
    first = np.full((points, n), ng, dtype=np.int64)
    ap = np.zeros((points, n))
    if kmax == 0:
        return first, ap, n_rel
    rows, cols = np.nonzero(rel)
    slot = np.arange(len(rows)) - (np.cumsum(n_rel) - n_rel)[rows]
    x = np.full((n, 2 * kmax), top, dtype=np.int64)  # each relevant item: [its kt | its kn]
    x[rows, slot] = kt[rows, cols]
    x[rows, kmax + slot] = kn[rows, cols]
    swapped_at = np.full((n, kmax), points, dtype=np.int64)  # padding: never
    swapped_at[rows, slot] = step_of[cols]
    xs = torch.from_numpy(x)
    less_t = np.zeros((points, n, 2 * kmax), dtype=np.int64)
    less_n = np.zeros_like(less_t)
    for v, piece in enumerate(pieces):
        for keys, less in ((kt, less_t), (kn, less_n)):
            if len(piece):
                sorted_piece = np.ascontiguousarray(keys[:, piece])
                sorted_piece.sort(axis=1)
                less[v] = torch.searchsorted(torch.from_numpy(sorted_piece), xs)
    np.cumsum(less_t, axis=0, out=less_t)
    np.cumsum(less_n, axis=0, out=less_n)
    valid = np.arange(kmax)[None, :] < n_rel[:, None]
    j = np.arange(1, kmax + 1, dtype=np.float64)
    for s in range(points):
        less = less_t[-1] - less_t[s] + less_n[s]
        rank = np.where(swapped_at <= s, less[:, kmax:], less[:, :kmax]) + 1
        rank = np.sort(np.where(valid, rank, top), axis=1)
        ap[s] = np.where(valid, j / rank, 0.0).sum(1) / np.maximum(n_rel, 1)
        first[s] = np.where(n_rel > 0, rank[:, 0] - 1, ng)
    return first, ap, n_rel
