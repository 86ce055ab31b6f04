"""ResNet-50 embedder shape and size, the "cost" bench at tiny settings, throughput profiles."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pipeline.bench.cost import count_macs, linear_flops, run_cost
from pipeline.models.compat import Transformation
from pipeline.models.resnet import EXPANSION, RESNET50_STAGES, resnet50_embedder
from pipeline.upgrade.price import ThroughputProfile


def _expected_params(embedding_dim: int) -> int:
    """ResNet-50's parameter count from its layer shapes (conv weights + BN affine + linear)."""
    total = 3 * 64 * 7 * 7 + 2 * 64  # stem conv + BN
    c_in = 64
    for i, (w, n) in enumerate(RESNET50_STAGES):
        c_out = w * EXPANSION
        for b in range(n):
            total += c_in * w + 2 * w + 9 * w * w + 2 * w + w * c_out + 2 * c_out
            if b == 0 and (i > 0 or c_in != c_out):
                total += c_in * c_out + 2 * c_out  # projection shortcut
            c_in = c_out
    return total + c_in * embedding_dim + embedding_dim


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return resnet50_embedder(128).eval()


def test_resnet50_param_count(net: nn.Module) -> None:
    got = sum(p.numel() for p in net.parameters())
    fc = 2048 * 128 + 128
    assert got == _expected_params(128)
    # torchvision's ResNet-50 body (without its fc) has ~23.5M parameters.
    assert abs(got - (23.5e6 + fc)) / (23.5e6 + fc) < 0.05
    assert sum(p.numel() for p in resnet50_embedder(64).parameters()) == _expected_params(64)


def test_resnet50_output_shapes(net: nn.Module) -> None:
    with torch.inference_mode():
        small = net(torch.randn(1, 3, 64, 64))
        full = net(torch.randn(2, 3, 224, 224))
    assert small.shape == (1, 128)
    assert full.shape == (2, 128)
    assert torch.isfinite(full).all()


def test_count_macs_matches_layer_shapes() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, torch.randn(2, 3, 10, 10)) == 8 * 10 * 10 * 3 * 3 * 3
    lin = nn.Linear(5, 7)
    assert count_macs(lin, torch.randn(4, 5)) == 35
    h = Transformation(16, 16, side_dim=4, inner_dim=64, uncertainty=True).eval()
    # old 16→32→32, side 4→8→32, mixer 64→64→64, head 64→16, log-variance 64→1.
    per_row = 16 * 32 + 32 * 32 + 4 * 8 + 8 * 32 + 64 * 64 + 64 * 64 + 64 * 16 + 64
    assert linear_flops(h) == 2 * per_row
    assert count_macs(h, torch.randn(3, 16), torch.randn(3, 4)) == per_row


def test_run_cost_tiny() -> None:
    figs = run_cost(batch=2, seconds=0.5, dim=16, side_dim=4, rows=20_000)
    by_name = {f.name: f for f in figs}
    assert list(by_name) == [
        "resnet50 images/s",
        "transformation rows/s",
        "transform vs backfill cost",
    ]
    for f in figs:
        assert f.section == "cost"
        assert math.isfinite(f.value) and f.value > 0
        assert f.extra["torch_threads"] == torch.get_num_threads()
        json.dumps(f.to_dict())  # the bench report serialises every figure
    ratio = by_name["transform vs backfill cost"]
    assert ratio.baseline_value == by_name["resnet50 images/s"].value
    assert ratio.value == by_name["transformation rows/s"].value
    assert ratio.target is None and ratio.met is None
    assert ratio.ratio is not None and ratio.ratio > 0
    # ResNet-50 at 224: ~4.1 GMAC (torchvision's published figure), counted by hooks.
    assert 8.0e9 < ratio.extra["resnet50_flops_per_image"] < 8.4e9
    h = Transformation(16, 16, side_dim=4, uncertainty=True)
    assert ratio.extra["transformation_flops_per_row"] == linear_flops(h)


def test_profile_round_trip(tmp_path) -> None:
    prof = ThroughputProfile(
        embed_images_per_second=12.5,
        transform_rows_per_second=4000,
        measured_at="2026-01-01T00:00:00+00:00",
        machine={"cores": 2},
        model="ResNet-50",
        extra={"embed_batch": 16},
    )
    path = tmp_path / "sub" / "profile.json"
    prof.save(path)
    back = ThroughputProfile.load(path)
    assert back == prof
    assert back.scan_rows_per_second is None
    assert back.transform_speedup == pytest.approx(320.0)


def test_profile_rejects_bad_values(tmp_path) -> None:
    with pytest.raises(ValueError, match="embed_images_per_second"):
        ThroughputProfile(embed_images_per_second=0, transform_rows_per_second=1.0)
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"embed_images_per_second": 1.0}))
    with pytest.raises(ValueError, match="transform_rows_per_second"):
        ThroughputProfile.load(p)
    p.write_text(
        json.dumps({"embed_images_per_second": 1.0, "transform_rows_per_second": 2.0, "x": 1})
    )
    with pytest.raises(ValueError, match="unknown"):
        ThroughputProfile.load(p)
