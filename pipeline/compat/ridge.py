"""Ridge least squares old → new from streamed batches: h's linear part, in closed form.

Only second moments are kept (d × d and d × k sums), so a million 1,280-d training pairs cost
~25 MB however many rows stream past. Every `holdout_every`-th row is held out; the ridge
penalty is the one with the lowest held-out error, computed from the held-out moments alone,
and the map is then refitted on every row with that penalty.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

# Penalties relative to the mean eigenvalue of the centred old-embedding covariance: scale-free
# across models whose embeddings differ in norm by orders of magnitude.
RELATIVE_ALPHAS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


@dataclass
class _Moments:
    """Sums over rows of [x, 1]ᵀ[x, 1] and [x, 1]ᵀy, and of ‖y‖²."""

    xx: np.ndarray | None = None  # (d + 1, d + 1)
    xy: np.ndarray | None = None  # (d + 1, k)
    yy: float = 0.0
    n: int = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if not len(x):
            return
        xa = np.hstack([x, np.ones((len(x), 1), x.dtype)]).astype(np.float64)
        y = y.astype(np.float64)
        if self.xx is None:
            self.xx = np.zeros((xa.shape[1], xa.shape[1]))
            self.xy = np.zeros((xa.shape[1], y.shape[1]))
        self.xx += xa.T @ xa
        self.xy += xa.T @ y
        self.yy += float(np.sum(y * y))
        self.n += len(x)

    def __add__(self, other: _Moments) -> _Moments:
        if other.xx is None:
            return self
        if self.xx is None:
            return other
        return _Moments(
            self.xx + other.xx, self.xy + other.xy, self.yy + other.yy, self.n + other.n
        )

    def solve(self, alpha: float) -> np.ndarray:
        """[W; b] (d + 1, k) minimising ‖y − xW − b‖² + alpha‖W‖² (intercept unpenalised)."""
        d = self.xx.shape[0] - 1
        mean_x, mean_y = self.xx[:d, d] / self.n, self.xy[d] / self.n
        sxx = self.xx[:d, :d] - self.n * np.outer(mean_x, mean_x)
        sxy = self.xy[:d] - self.n * np.outer(mean_x, mean_y)
        w = np.linalg.solve(sxx + alpha * np.eye(d), sxy)
        return np.vstack([w, (mean_y - mean_x @ w)[None]])

    def sse(self, wb: np.ndarray) -> float:
        """Σ‖y − [x, 1] wb‖² over these rows, from the moments alone."""
        return self.yy - 2 * float(np.sum(wb * self.xy)) + float(np.sum(wb * (self.xx @ wb)))

    def scale(self) -> float:
        """Mean eigenvalue of the centred covariance of x: the unit of the penalty grid."""
        d = self.xx.shape[0] - 1
        mean_x = self.xx[:d, d] / self.n
        return max(float(np.trace(self.xx[:d, :d]) / self.n - mean_x @ mean_x) / d, 1e-12)


@dataclass(frozen=True)
class RidgeFit:
    """y ≈ x @ weight.T + bias, with the penalty chosen on held-out rows and its error there."""

    weight: np.ndarray  # (k, d): nn.Linear's layout
    bias: np.ndarray  # (k,)
    alpha: float
    holdout_mse: float  # per element, on the held-out rows, before the refit on all rows
    rows: int
    holdout_rows: int
    tried: dict[float, float] = field(default_factory=dict)  # alpha -> held-out mse


def fit_ridge(batches: Iterable[tuple[np.ndarray, np.ndarray]], holdout_every: int = 5) -> RidgeFit:
    """Stream (x, y) batches; choose the penalty on every `holdout_every`-th row, refit on all."""
    fit, held, seen = _Moments(), _Moments(), 0
    for x, y in batches:
        out = (np.arange(seen, seen + len(x)) % holdout_every) == 0
        fit.add(x[~out], y[~out])
        held.add(x[out], y[out])
        seen += len(x)
    if seen <= holdout_every:
        raise ValueError(f"ridge needs at least {holdout_every + 1} training pairs, got {seen}")
    k = fit.xy.shape[1]
    unit = fit.scale() * fit.n
    tried = {a * unit: held.sse(fit.solve(a * unit)) / (held.n * k) for a in RELATIVE_ALPHAS}
    best = min(tried, key=tried.get)
    every = fit + held
    wb = every.solve(best * every.n / fit.n)  # the same penalty per row on more rows
    return RidgeFit(
        weight=wb[:-1].T.astype(np.float32),
        bias=wb[-1].astype(np.float32),
        alpha=float(best),
        holdout_mse=float(tried[best]),
        rows=seen,
        holdout_rows=held.n,
        tried={float(a): float(e) for a, e in tried.items()},
    )
