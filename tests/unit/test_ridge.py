"""h's linear part: a streamed ridge fit whose penalty is chosen on held-out rows."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.compat.ridge import fit_ridge
from pipeline.models.compat import Transformation, transformation_cost, transformation_macs


def _pairs(n: int, d: int, k: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32) * 3.0 + 1.0
    w = rng.normal(size=(k, d)).astype(np.float32)
    y = x @ w.T + 0.5 + noise * rng.normal(size=(n, k)).astype(np.float32)
    return x, y, w


def test_streamed_ridge_recovers_a_linear_map_whatever_the_batching() -> None:
    x, y, w = _pairs(600, 8, 5, noise=0.01)
    whole = fit_ridge([(x, y)])
    batched = fit_ridge((x[i : i + 37], y[i : i + 37]) for i in range(0, len(x), 37))
    assert np.allclose(whole.weight, batched.weight, atol=1e-4)
    assert np.abs(whole.weight - w).max() < 0.01 and np.abs(whole.bias - 0.5).max() < 0.01
    assert whole.rows == 600 and whole.holdout_rows == 120
    assert whole.alpha == min(whole.tried)  # no noise to shrink against: the smallest penalty
    assert whole.holdout_mse < 1e-3


def test_ridge_shrinks_when_pairs_are_few_and_noisy() -> None:
    x, y, _ = _pairs(60, 40, 5, noise=20.0, seed=1)
    fit = fit_ridge([(x, y)])
    assert fit.alpha > min(fit.tried)  # held-out error prefers a penalty
    assert fit.holdout_mse == pytest.approx(min(fit.tried.values()))


def test_too_few_pairs_for_a_held_out_row_is_an_error() -> None:
    x, y, _ = _pairs(3, 2, 2, noise=0.0)
    with pytest.raises(ValueError, match="at least 6 training pairs, got 3"):
        fit_ridge([(x, y)])


def test_a_linear_skip_h_starts_at_the_ridge_map_and_keeps_it_frozen() -> None:
    x, y, _ = _pairs(200, 6, 4, noise=0.1)
    fit = fit_ridge([(x, y)])
    h = Transformation(6, 4, inner_dim=16, uncertainty=True, linear_skip=True)
    h.set_skip(fit.weight, fit.bias)
    pred, log_var = h.eval()(torch.from_numpy(x))
    assert np.allclose(pred.detach().numpy(), x @ fit.weight.T + fit.bias, atol=1e-4)
    assert log_var is not None and log_var.shape == (200,)
    assert not any(p.requires_grad for p in h.skip.parameters())
    assert Transformation(**h.config()).linear_skip  # rebuilt from model.json with its skip
    weights = sum(m.weight.numel() for m in h.modules() if isinstance(m, nn.Linear))
    assert transformation_macs(6, 4, 0, 16, True, linear_skip=True) == weights
    arch = {**h.config()}
    assert transformation_cost(arch)["h_params"] == sum(p.numel() for p in h.parameters())
    with pytest.raises(ValueError, match="without linear_skip"):
        Transformation(6, 4, inner_dim=16).set_skip(fit.weight, fit.bias)


def test_a_residual_h_is_half_the_new_dim_wide_and_still_within_the_cost_limit() -> None:
    from pipeline.models.compat import size_inner_dim

    assert size_inner_dim(1280, 1280, 0, 64.0, linear_skip=True) == 640
    assert size_inner_dim(512, 512, 0, None, linear_skip=True) == 256
    w = size_inner_dim(1280, 1280, 32, 25.0, linear_skip=True)  # the limit narrows it further
    assert w % 64 == 0 and w < 640
    assert 2 * transformation_macs(1280, 1280, 32, w, True, linear_skip=True) <= 25e6
