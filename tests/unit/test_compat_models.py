"""Compatibility models: transformation shapes and rebuild, query adapters, SimCLR augmentation."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from pipeline.compat.augment import simclr_augment
from pipeline.models.compat import (
    ADAPTERS,
    LowRankAdapter,
    ProcrustesAdapter,
    SimCLRHead,
    SizingError,
    Transformation,
    build_adapter,
    fit_adapter,
    size_inner_dim,
    transformation_cost,
    transformation_macs,
)


def test_transformation_shapes_with_side_info_and_uncertainty() -> None:
    t = Transformation(old_dim=4, new_dim=6, side_dim=3, uncertainty=True)
    assert t.inner_dim == 96
    pred, log_var = t(torch.randn(5, 4), torch.randn(5, 3))
    assert pred.shape == (5, 6)
    assert log_var is not None and log_var.shape == (5,)
    assert t.mixer[0].in_features == 4 * 6


@pytest.mark.parametrize("side_dim,uncertainty", [(0, False), (3, True)])
def test_macs_formula_counts_every_linear_weight(side_dim: int, uncertainty: bool) -> None:
    t = Transformation(5, 7, side_dim=side_dim, inner_dim=24, uncertainty=uncertainty)
    weights = sum(m.weight.numel() for m in t.modules() if isinstance(m, nn.Linear))
    assert transformation_macs(5, 7, side_dim, 24, uncertainty) == weights


def test_inner_dim_is_fcts_width_where_it_fits_and_narrowed_at_production_dims() -> None:
    # The demo's dimensions: FCT's 16 x 64 = 1,024 costs ~2.8 MFLOP/row, well under the limit.
    assert size_inner_dim(32, 64, 32, 64.0) == 1024
    # EfficientNet-Lite at 1,280-d: FCT's 20,480 would be ~1,100 MFLOP/row.
    wide = transformation_cost(
        {"old_dim": 1280, "new_dim": 1280, "side_dim": 32, "inner_dim": 20480, "uncertainty": True}
    )
    assert 1000 < wide["h_mflops_per_row"] < 1300 and wide["h_params"] > 5e8
    w = size_inner_dim(1280, 1280, 32, 64.0)
    assert w % 64 == 0 and 1280 <= w < 20480
    assert 2 * transformation_macs(1280, 1280, 32, w) <= 64e6
    assert 2 * transformation_macs(1280, 1280, 32, w + 64) > 64e6  # the widest that fits
    cost = transformation_cost(
        {"old_dim": 1280, "new_dim": 1280, "side_dim": 32, "inner_dim": w, "uncertainty": True}
    )
    assert cost["h_mflops_per_row"] <= 64.0
    assert size_inner_dim(1280, 1280, 32, None) == 20480  # no limit: FCT's rule


def test_a_cost_limit_below_the_cheapest_h_is_refused_with_the_key() -> None:
    with pytest.raises(SizingError, match=r"transformation.max_mflops=10 .*old=1280"):
        size_inner_dim(1280, 1280, 0, 10.0)


def test_transformation_without_side_info_has_no_log_var() -> None:
    t = Transformation(old_dim=4, new_dim=6, inner_dim=10)
    pred, log_var = t(torch.randn(3, 4))
    assert pred.shape == (3, 6)
    assert log_var is None
    assert t.mixer[0].in_features == 2 * 6
    assert t.side_branch is None


def test_transformation_side_info_must_match_side_dim() -> None:
    with pytest.raises(ValueError, match="side_dim=0"):
        Transformation(4, 6, inner_dim=8)(torch.randn(3, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match="needs side info"):
        Transformation(4, 6, side_dim=2, inner_dim=8)(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"side must be \(3, 2\)"):
        Transformation(4, 6, side_dim=2, inner_dim=8)(torch.randn(3, 4), torch.randn(3, 5))


def test_transformation_config_round_trip() -> None:
    t = Transformation(old_dim=4, new_dim=6, side_dim=2, inner_dim=12, uncertainty=True).eval()
    cfg = json.loads(json.dumps(t.config()))
    assert cfg == {"old_dim": 4, "new_dim": 6, "side_dim": 2, "inner_dim": 12, "uncertainty": True}
    rebuilt = Transformation(**cfg).eval()
    rebuilt.load_state_dict(load(save(t.state_dict())))
    old, side = torch.randn(3, 4), torch.randn(3, 2)
    (p1, s1), (p2, s2) = t(old, side), rebuilt(old, side)
    assert torch.equal(p1, p2) and s1 is not None and s2 is not None and torch.equal(s1, s2)


def test_simclr_head_returns_features_and_projection() -> None:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    head = SimCLRHead(backbone, feature_dim=5, hidden_dim=7, proj_dim=3)
    feats, proj = head(torch.randn(4, 3, 2, 2))
    assert feats.shape == (4, 5) and proj.shape == (4, 3)


def _rng_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_procrustes_recovers_an_exact_rotation_and_scale() -> None:
    rng = np.random.default_rng(0)
    q = _rng_orthogonal(6, rng)
    new = rng.standard_normal((50, 6))
    adapter = fit_adapter("procrustes", new, 2.5 * new @ q)
    assert isinstance(adapter, ProcrustesAdapter)
    assert np.allclose(adapter.weight.numpy(), q, atol=1e-5)
    assert adapter.scale == pytest.approx(2.5, rel=1e-5)
    out = adapter(torch.as_tensor(new, dtype=torch.float32)).numpy()
    assert np.allclose(out, 2.5 * new @ q, atol=1e-4)


def test_procrustes_handles_different_dims_with_semi_orthogonal_map() -> None:
    rng = np.random.default_rng(1)
    adapter = fit_adapter("procrustes", rng.standard_normal((40, 8)), rng.standard_normal((40, 5)))
    w = adapter.weight.numpy()
    assert w.shape == (8, 5)
    assert np.allclose(w.T @ w, np.eye(5), atol=1e-5)


def test_low_rank_recovers_an_exact_rank_r_affine_map() -> None:
    rng = np.random.default_rng(2)
    a0, b0 = rng.standard_normal((8, 2)), rng.standard_normal((2, 6))
    bias = rng.standard_normal(6)
    new = rng.standard_normal((60, 8))
    old = new @ a0 @ b0 + bias
    adapter = fit_adapter("low_rank", new, old, rank=2)
    assert isinstance(adapter, LowRankAdapter)
    assert adapter.a.shape == (8, 2) and adapter.b.shape == (2, 6)
    probe = rng.standard_normal((10, 8))
    got = adapter(torch.as_tensor(probe, dtype=torch.float32)).numpy()
    assert np.allclose(got, probe @ a0 @ b0 + bias, atol=1e-4)
    assert LowRankAdapter(40, 50).rank == 32


def test_residual_mlp_beats_the_linear_fit_on_a_nonlinear_target() -> None:
    rng = np.random.default_rng(3)
    new = rng.standard_normal((512, 4))
    old = new @ rng.standard_normal((4, 3)) + np.sin(2.0 * new[:, :3]) + new[:, 1:] ** 2
    x1 = np.hstack([new, np.ones((512, 1))])
    linear_mse = float(np.mean((x1 @ np.linalg.lstsq(x1, old, rcond=None)[0] - old) ** 2))
    adapter = fit_adapter("residual_mlp", new, old, seed=0, hidden=64, epochs=150)
    with torch.no_grad():
        pred = adapter(torch.as_tensor(new, dtype=torch.float32)).numpy()
    mlp_mse = float(np.mean((pred - old) ** 2))
    assert mlp_mse < 0.5 * linear_mse


@pytest.mark.parametrize("kind", ADAPTERS)
def test_adapter_rebuilds_from_config_and_state_dict(kind: str) -> None:
    rng = np.random.default_rng(4)
    new, old = rng.standard_normal((30, 5)), rng.standard_normal((30, 3))
    kw = {"epochs": 2, "hidden": 8} if kind == "residual_mlp" else {}
    fitted = fit_adapter(kind, new, old, seed=1, **kw)
    cfg = json.loads(json.dumps(fitted.config()))
    assert cfg["kind"] == kind and cfg["d_new"] == 5 and cfg["d_old"] == 3
    rebuilt = build_adapter(cfg)
    rebuilt.load_state_dict(load(save(fitted.state_dict())))
    probe = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.equal(fitted.eval()(probe), rebuilt.eval()(probe))


def test_adapter_errors() -> None:
    with pytest.raises(ValueError, match="procrustes.*low_rank.*residual_mlp"):
        fit_adapter("cca", np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="pairs must align"):
        fit_adapter("procrustes", np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="unknown adapter kind"):
        build_adapter({"kind": "nope", "d_new": 2, "d_old": 2})


def test_simclr_augment_is_deterministic_and_preserves_shape() -> None:
    x = torch.randn(8, 3, 16, 16)
    a = simclr_augment(x, torch.Generator().manual_seed(7))
    b = simclr_augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.shape == x.shape and a.dtype == x.dtype
    gen = torch.Generator().manual_seed(7)
    v1, v2 = simclr_augment(x, gen), simclr_augment(x, gen)
    assert (v1 - v2).abs().mean().item() > 0.1
    assert (v1 - x).abs().mean().item() > 0.1


def test_simclr_augment_strength_zero_is_identity_and_half_keeps_dtype() -> None:
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(simclr_augment(x, strength=0.0), x)
    h = simclr_augment(x.half(), torch.Generator().manual_seed(0))
    assert h.dtype == torch.float16 and h.shape == x.shape


def test_fold_batchnorm_keeps_outputs_and_removes_every_batchnorm() -> None:
    from pipeline.models.compat import fold_batchnorm

    torch.manual_seed(0)
    model = Transformation(old_dim=8, new_dim=6, side_dim=4, inner_dim=16, uncertainty=True)
    model.train()
    for _ in range(5):  # non-trivial running statistics and affine parameters
        model(torch.randn(32, 8) * 3 + 1, torch.randn(32, 4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())  # a copy
    old, side = torch.randn(64, 8), torch.randn(64, 4)
    with torch.no_grad():
        (p, v), (fp, fv) = model(old, side), folded(old, side)
    torch.testing.assert_close(fp, p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fv, v, rtol=1e-4, atol=1e-5)
