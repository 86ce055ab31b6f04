"""Small ResNet-style embedding backbones in plain torch (torchvision is unavailable here)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ArchitectureConfig


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class EmbeddingNet(nn.Module):
    """Backbone → linear embedding φ(x); a linear classifier on φ is used for training."""

    def __init__(self, arch: ArchitectureConfig, in_channels: int):
        super().__init__()
        w = arch.widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c_in = w[0]
        for i, c_out in enumerate(w):
            for b in range(arch.blocks_per_stage):
                layers.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and b == 0) else 1))
                c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(c_in, arch.embedding_dim)
        self.classifier = nn.Linear(arch.embedding_dim, arch.num_classes)
        self.embedding_dim = arch.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.embed(h)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, class logits) in one pass, for training."""
        emb = self.forward(x)
        return emb, self.classifier(emb)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
