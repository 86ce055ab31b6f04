"""Backfill orderings: which gallery images to re-embed with the new model first."""

from __future__ import annotations

from typing import Any

import numpy as np

ORDERINGS = ("random", "uncertainty", "oracle")
METRICS = ("l2", "cosine")


def _as_numpy(x: Any, name: str) -> np.ndarray:
    """Accept numpy arrays, torch tensors or sequences; return a float64 numpy array."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch for numpy-only callers
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _descending_stable(scores: np.ndarray) -> np.ndarray:
    # Sorting the negated scores with a stable sort keeps ties in ascending index order.
    return np.argsort(-scores, kind="stable").astype(np.int64)


def _oracle_distances(transformed: Any, new: Any, n: int, metric: str) -> np.ndarray:
    t = _as_numpy(transformed, "transformed")
    v = _as_numpy(new, "new")
    if t.ndim != 2 or v.ndim != 2 or t.shape != v.shape:
        raise ValueError(
            f"transformed and new must both be (n, d) of equal shape; got {t.shape} and {v.shape}"
        )
    if t.shape[0] != n:
        raise ValueError(f"transformed/new have {t.shape[0]} rows, expected n={n}")
    if metric == "l2":
        return np.linalg.norm(t - v, axis=1)
    if metric == "cosine":
        norms = np.linalg.norm(t, axis=1) * np.linalg.norm(v, axis=1)
        # A zero vector has no direction; give it cos = 0 (distance 1) rather than NaN.
        cos = np.divide((t * v).sum(axis=1), norms, out=np.zeros(n), where=norms > 0)
        return 1.0 - cos
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def backfill_order(
    kind: str,
    n: int,
    *,
    seed: int = 0,
    uncertainty: Any = None,
    transformed: Any = None,
    new: Any = None,
    metric: str = "l2",
) -> np.ndarray:
    """Return an int64 permutation of range(n): the order in which to backfill gallery items.

    random: seeded permutation. uncertainty: highest predicted uncertainty first (FastFill).
    oracle: largest distance between the transformed old embedding and the true new one first.
    Ties go to the lower index.
    """
    if kind not in ORDERINGS:
        raise ValueError(f"unknown ordering {kind!r}; expected one of {ORDERINGS}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    n = int(n)
    if kind == "random":
        return np.random.default_rng(seed).permutation(n).astype(np.int64)
    if kind == "uncertainty":
        if uncertainty is None:
            raise ValueError("ordering 'uncertainty' needs uncertainty=")
        u = _as_numpy(uncertainty, "uncertainty")
        if u.ndim == 2 and u.shape[1] == 1:
            u = u[:, 0]
        if u.shape != (n,):
            raise ValueError(f"uncertainty must have shape ({n},), got {u.shape}")
        return _descending_stable(u)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if transformed is None or new is None:
        raise ValueError("ordering 'oracle' needs both transformed= and new=")
    return _descending_stable(_oracle_distances(transformed, new, n, metric))
