"""The linear head fitted for FastFill when the new model ships without a classifier."""

import numpy as np
import pytest

from pipeline.compat.classifier import fit_linear_head


def _blobs(n: int, classes: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def test_fitted_head_separates_classes_and_ignores_unlabelled_rows() -> None:
    x_all, y_all = _blobs(600, 4, 16)
    x, y, held_out, y2 = x_all[:400], y_all[:400], x_all[400:], y_all[400:]
    y_partly = y.copy()
    y_partly[::3] = -1  # a third unlabelled
    head = fit_linear_head(x, y_partly)
    assert head.source == "fitted" and head.weight.shape == (4, 16) and head.bias.shape == (4,)
    assert head.accuracy > 0.95
    acc = float(((held_out @ head.weight.T + head.bias).argmax(1) == y2).mean())
    assert acc > 0.9
    cfg = head.to_config()
    assert len(cfg["weight"]) == 4 and len(cfg["weight"][0]) == 16


def test_fitting_needs_two_labelled_classes() -> None:
    x, _ = _blobs(10, 2, 4)
    with pytest.raises(ValueError, match="2 labelled rows of >= 2 classes"):
        fit_linear_head(x, np.zeros(10, np.int64))
    with pytest.raises(ValueError, match="got 0 of 0"):
        fit_linear_head(x, np.full(10, -1))
