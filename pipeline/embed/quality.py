"""Degenerate model output: rows no index should serve, and models that collapse their inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NON_FINITE = "model produced a non-finite embedding or side-info"
ZERO_NORM = "model produced a zero-norm embedding (it normalises to nothing)"
OVERFLOW = "embedding norm overflows float32 (it normalises to a zero vector)"
# Below this a vector carries no direction: cosine search would divide by ~0.
MIN_NORM = 1e-12


def row_problems(emb: np.ndarray) -> np.ndarray:
    """Per row, why it cannot be stored ("" when it can): non-finite values, a zero norm, or
    a norm that overflows float32 (1e38-scale values: their squares are inf)."""
    emb = np.asarray(emb, dtype=np.float32)
    out = np.full(len(emb), "", dtype=object)
    finite = np.isfinite(emb).all(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", emb, emb, dtype=np.float32))
    out[finite & (norms < MIN_NORM)] = ZERO_NORM
    out[finite & ~np.isfinite(norms)] = OVERFLOW
    out[~finite] = NON_FINITE
    return out


def distinct_rows(a: np.ndarray) -> int:
    """How many distinct rows (exact bytes) a 2-d array holds."""
    if len(a) == 0:
        return 0
    a = np.ascontiguousarray(a)
    return len(np.unique(a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel()))


@dataclass
class OutputStats:
    """Counts over a stream of stored embeddings, for refusing a degenerate version."""

    rows: int = 0
    non_finite: int = 0
    zero_norm: int = 0
    overflow: int = 0
    distinct: int = 0  # summed over batches: duplicates across batches are not searched for

    def add(self, emb: np.ndarray) -> None:
        reasons = row_problems(emb)
        self.rows += len(emb)
        self.non_finite += int((reasons == NON_FINITE).sum())
        self.zero_norm += int((reasons == ZERO_NORM).sum())
        self.overflow += int((reasons == OVERFLOW).sum())
        self.distinct += distinct_rows(np.asarray(emb, np.float32))

    def problems(self, min_distinct_fraction: float) -> list[str]:
        """What makes these rows unfit to serve (empty when they are fine)."""
        out = []
        if self.non_finite:
            out.append(f"{self.non_finite} rows with NaN/inf")
        if self.zero_norm:
            out.append(f"{self.zero_norm} rows of zero norm")
        if self.overflow:
            out.append(f"{self.overflow} rows whose norm overflows float32")
        if self.rows > 1 and self.distinct < min_distinct_fraction * self.rows:
            out.append(
                f"only {self.distinct} distinct embeddings in {self.rows} rows (under "
                f"embed.min_distinct_fraction={min_distinct_fraction}): the model maps "
                "different images to the same vector"
            )
        return out
