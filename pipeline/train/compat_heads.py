"""Training heads of the compatibility losses beyond BCT (BT², d-Simplex, OCA): each a Task for
the one Ray Train loop, saving a plain EmbeddingNet that any carryover reader loads."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from pipeline.compat.losses import (
    bt2_loss,
    compatible_part,
    dsimplex_loss,
    dsimplex_vertices,
    oca_loss,
)
from pipeline.config import ModelConfig
from pipeline.models.backbone import EmbeddingNet
from pipeline.train.loop import Task


class RotatedHead(nn.Module):
    """BT² / OCA: the net's embedding φ, an orthogonal map Q (identity at the start, learned),
    and ψ = Qφ. forward returns (φ, ψ, logits); the classifier reads ψ (BT²) or φ (OCA)."""

    def __init__(self, net: EmbeddingNet, classifier_on_rotated: bool):
        super().__init__()
        self.net = net
        d = net.embedding_dim
        rot = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            rot.weight.copy_(torch.eye(d))
        self.rotation = orthogonal(rot)
        self.on_rotated = classifier_on_rotated

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        phi = self.net(x)
        psi = self.rotation(phi)
        return phi, psi, self.net.classifier(psi if self.on_rotated else phi)

    def folded_state(self) -> dict[str, torch.Tensor]:
        """The EmbeddingNet whose embedding is ψ: Q folded into the embedding layer (and into
        the classifier when it read φ), so the stored vector's first d_old dims are the
        compatible part. Q is orthogonal: new/new distances are those of φ."""
        q = self.rotation.weight.detach()
        state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        state["embed.weight"] = q @ state["embed.weight"]
        state["embed.bias"] = q @ state["embed.bias"]
        if not self.on_rotated:
            state["classifier.weight"] = state["classifier.weight"] @ q.T
        return state


class FoldedNet(nn.Module):
    """What a BT² / OCA run saves: its head's EmbeddingNet state with Q folded in."""

    def __init__(self, head: RotatedHead):
        super().__init__()
        self._head = [head]  # a list: not a submodule, so nothing is saved twice

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore
        return self._head[0].folded_state()


class LogitsHead(nn.Module):
    """Forward returns (embedding, logits) so DDP's hooks see the whole training graph."""

    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.logits(x)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((logits.argmax(1) == y).sum())}


def dsimplex_task(cfg: ModelConfig, net: EmbeddingNet) -> Task:
    """d-Simplex: the classifier is fixed to the simplex's vertices (bias 0) and never trained."""
    a, tc = cfg.architecture, cfg.train
    vertices = dsimplex_vertices(a.num_classes, a.embedding_dim)
    with torch.no_grad():
        net.classifier.weight.copy_(vertices)
        net.classifier.bias.zero_()
    net.classifier.requires_grad_(False)  # the loop's optimizer takes trainable params only
    shape = (-1, cfg.preprocess.channels, cfg.preprocess.input_size, cfg.preprocess.input_size)

    def step(model: nn.Module, batch: dict[str, torch.Tensor]):
        x, y = batch["pixels"].view(shape).float(), batch["label"].long()
        emb, logits = model(x)
        loss = dsimplex_loss(emb, vertices.to(emb.device), y, tc.label_smoothing)
        return loss, len(y), _accuracy(logits, y)

    return Task(save=net, train=LogitsHead(net), step=step)


def rotated_task(cfg: ModelConfig, net: EmbeddingNet, old: dict[str, Any]) -> Task:
    """BT² or OCA (cfg.train.loss) against the frozen old classifier `old` (weight, bias)."""
    tc, cc = cfg.train, cfg.train.compat
    # frozen: plain tensors, never parameters of the trained module
    w_old = torch.tensor(np.asarray(old["weight"], dtype=np.float32))
    b_old = torch.tensor(np.asarray(old["bias"], dtype=np.float32))
    if w_old.shape[1] > net.embedding_dim:
        raise ValueError(
            f"{tc.loss}: the new embedding ({net.embedding_dim} dims) is smaller than the old "
            f"one ({w_old.shape[1]})"
        )
    bt2 = tc.loss == "bt2"
    head = RotatedHead(net, classifier_on_rotated=bt2)
    shape = (-1, cfg.preprocess.channels, cfg.preprocess.input_size, cfg.preprocess.input_size)

    def step(model: nn.Module, batch: dict[str, torch.Tensor]):
        x, y = batch["pixels"].view(shape).float(), batch["label"].long()
        _, psi, logits = model(x)
        w, b = w_old.to(psi.device), b_old.to(psi.device)
        if bt2:
            loss = bt2_loss(psi, logits, w, b, y, cc.bt2_lambda, tc.label_smoothing)
        else:
            part = compatible_part(psi, w.shape[1])
            loss = oca_loss(
                logits, part, w, y, cc.oca_lambda, cc.oca_temperature, tc.label_smoothing
            )
        return loss, len(y), _accuracy(logits, y)

    return Task(save=FoldedNet(head), train=head, step=step)
