"""A linear classifier fitted on a model's embeddings: FastFill's classification term for a new
model that ships without a head (TorchScript, ONNX, any pretrained backbone)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearHead:
    """logits = x @ weight.T + bias, with where it came from ("model" or "fitted")."""

    weight: np.ndarray  # (classes, d)
    bias: np.ndarray  # (classes,)
    source: str
    accuracy: float = float("nan")  # on the rows it was fitted on (a sanity figure)

    def to_config(self) -> dict[str, list]:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist()}


def fit_linear_head(
    x: np.ndarray, labels: np.ndarray, weight_decay: float = 1e-4, iters: int = 100, seed: int = 0
) -> LinearHead:
    """Multinomial logistic regression by full-batch L-BFGS on the labelled rows (label >= 0).

    A linear probe of the new embedding: what FastFill's frozen classifier is, for a model
    whose training head was not shipped."""
    keep = labels >= 0
    xs = torch.from_numpy(np.ascontiguousarray(x[keep], dtype=np.float32))
    ys = torch.from_numpy(labels[keep].astype(np.int64))
    classes = int(ys.max()) + 1 if len(ys) else 0
    if len(ys) < 2 or classes < 2:
        raise ValueError(f"need >= 2 labelled rows of >= 2 classes, got {len(ys)} of {classes}")
    torch.manual_seed(seed)
    w = torch.zeros(classes, xs.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.T + b, ys) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = float(((xs @ w.T + b).argmax(1) == ys).float().mean())
    return LinearHead(w.detach().numpy(), b.detach().numpy(), "fitted", acc)
