"""ResNet-50 embedder in plain torch (torchvision is unavailable here): the papers' backbone."""

from __future__ import annotations

import torch
from torch import nn

# (bottleneck width, blocks) per stage; each block's output is 4x its width.
RESNET50_STAGES: tuple[tuple[int, int], ...] = ((64, 3), (128, 4), (256, 6), (512, 3))
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce → 3x3 (strided, as torchvision's v1.5) → 1x1 expand, plus a shortcut."""

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * EXPANSION
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetEmbedder(nn.Module):
    """7x7/2 stem + 3x3/2 max-pool, bottleneck stages, global average pool, linear embedding."""

    def __init__(
        self,
        stages: tuple[tuple[int, int], ...] = RESNET50_STAGES,
        embedding_dim: int = 128,
        in_channels: int = 3,
    ):
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        c_in = 64
        for i, (width, n) in enumerate(stages):
            for b in range(n):
                # The first block of every stage but the first halves the resolution.
                blocks.append(Bottleneck(c_in, width, stride=2 if (i > 0 and b == 0) else 1))
                c_in = width * EXPANSION
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(c_in, embedding_dim)
        self.feature_dim = c_in
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, in_channels, H, W) images → (n, embedding_dim) embeddings."""
        return self.embed(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet50_embedder(embedding_dim: int = 128) -> nn.Module:
    """ResNet-50 (blocks [3, 4, 6, 3]) ending in a 2048 → embedding_dim linear layer."""
    return ResNetEmbedder(RESNET50_STAGES, embedding_dim=embedding_dim)
