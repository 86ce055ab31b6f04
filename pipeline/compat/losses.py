"""Training losses for compatible embeddings: SimCLR, BCT, BT², d-Simplex, OCA, FCT's
transformation and FastFill."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR NT-Xent over two views: each row's positive is its other view, all else negatives."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both be (N, d); got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = z @ z.T / temperature
    # A row is trivially most similar to itself; excluding it keeps it out of the softmax.
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    idx = torch.arange(n, device=z.device)
    targets = torch.cat([idx + n, idx])
    return F.cross_entropy(sim, targets)


def bct_loss(
    new_logits: Tensor,
    old_logits: Tensor,
    labels: Tensor,
    lam: float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """BCT: CE of the new classifier plus lam * CE of the frozen old classifier on new embeddings.

    Rows whose label the old classifier cannot score (label >= its class count) are left out of
    the influence term; it is zero when no row remains.
    """
    if new_logits.ndim != 2 or old_logits.ndim != 2:
        raise ValueError("new_logits and old_logits must be 2-D (N, classes)")
    if not (new_logits.shape[0] == old_logits.shape[0] == labels.shape[0]):
        raise ValueError(
            f"batch sizes differ: new_logits {new_logits.shape[0]}, "
            f"old_logits {old_logits.shape[0]}, labels {labels.shape[0]}"
        )
    labels = labels.long()
    new_term = F.cross_entropy(new_logits, labels, label_smoothing=label_smoothing)
    keep = labels < old_logits.shape[1]
    if not bool(keep.any()):
        # Multiply rather than build a fresh zero so the result stays on the autograd graph.
        return new_term + 0.0 * old_logits.sum()
    old_term = F.cross_entropy(old_logits[keep], labels[keep], label_smoothing=label_smoothing)
    return new_term + lam * old_term


def compatible_part(z: Tensor, old_dim: int) -> Tensor:
    """The first `old_dim` dims of embeddings `z` (N, d_new): BT²'s and OCA's part that
    compares to the old model's rows; the remaining dims are the new model's extra capacity."""
    if z.ndim != 2:
        raise ValueError(f"embeddings must be (N, d), got shape {tuple(z.shape)}")
    if not 0 < old_dim <= z.shape[1]:
        raise ValueError(
            f"the old space has {old_dim} dims; the new embedding has {z.shape[1]}: it must "
            "have at least as many"
        )
    return z[:, :old_dim]


def bt2_loss(
    psi: Tensor,
    new_logits: Tensor,
    old_weight: Tensor,
    old_bias: Tensor,
    labels: Tensor,
    lam: float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """BT²: CE of the new classifier (on the whole basis-transformed embedding `psi`) plus
    lam * CE of the frozen old classifier (old_weight (K_old, d_old), old_bias) on the first
    d_old dims of psi — BCT's influence loss on the compatible part only, so the extra dims
    are free to hold what the old space cannot."""
    if old_weight.ndim != 2 or old_bias.shape != (old_weight.shape[0],):
        raise ValueError(
            f"old classifier must be (K, d) and (K,); got {tuple(old_weight.shape)} and "
            f"{tuple(old_bias.shape)}"
        )
    part = compatible_part(psi, old_weight.shape[1])
    old_logits = part @ old_weight.T + old_bias
    return bct_loss(new_logits, old_logits, labels, lam, label_smoothing)


def dsimplex_vertices(num_classes: int, dim: int) -> Tensor:
    """The K vertices of a regular simplex centred on 0, unit norm, as rows (K, dim): pairwise
    cosine -1/(K-1), the first K-1 coordinates spanning it and zeros after (d-Simplex's
    fixed classifier). Built from the Helmert basis of the plane orthogonal to (1, ..., 1)."""
    k = num_classes
    if k < 2:
        raise ValueError(f"a simplex needs at least 2 classes, got {k}")
    if dim < k - 1:
        raise ValueError(f"{k} classes need at least {k - 1} dims for their simplex, got {dim}")
    helmert = torch.zeros(k - 1, k, dtype=torch.float64)
    for j in range(1, k):  # row j-1: j ones, then -j, then zeros; orthogonal to (1, ..., 1)
        helmert[j - 1, :j] = 1.0
        helmert[j - 1, j] = -float(j)
        helmert[j - 1] /= (j * (j + 1)) ** 0.5
    vertices = F.normalize(helmert.T, dim=1)  # one-hot class vectors in that plane's basis
    out = torch.zeros(k, dim, dtype=torch.float64)
    out[:, : k - 1] = vertices
    return out.float()


def dsimplex_loss(
    emb: Tensor, vertices: Tensor, labels: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    """d-Simplex: CE of the fixed classifier (no bias) whose rows are the simplex vertices."""
    if emb.ndim != 2 or vertices.ndim != 2 or emb.shape[1] != vertices.shape[1]:
        raise ValueError(
            f"embeddings (N, d) and vertices (K, d) must share d; got {tuple(emb.shape)} and "
            f"{tuple(vertices.shape)}"
        )
    if labels.shape != (emb.shape[0],):
        raise ValueError(f"labels must be ({emb.shape[0]},), got {tuple(labels.shape)}")
    return F.cross_entropy(emb @ vertices.T, labels.long(), label_smoothing=label_smoothing)


def oca_loss(
    new_logits: Tensor,
    projected: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    lam: float = 1.0,
    temperature: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """OCA: CE of the new classifier plus lam * a cosine-softmax CE (cos / temperature) of the
    orthogonally projected embedding `projected` (N, d_old) against the frozen old class
    prototypes (K_old, d_old): it aligns directions, not norms, with the old space. Rows whose
    class has no old prototype are left out of the second term (zero when none remain)."""
    if projected.ndim != 2 or prototypes.ndim != 2 or projected.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"projected (N, d_old) and prototypes (K, d_old) must share d_old; got "
            f"{tuple(projected.shape)} and {tuple(prototypes.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    cos = F.normalize(projected, dim=1) @ F.normalize(prototypes, dim=1).T
    return bct_loss(new_logits, cos / temperature, labels, lam, label_smoothing)


def synthesize_old_classifier(
    weight: Tensor,
    bias: Tensor,
    known_classes: list[int] | Tensor,
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    match_norm: bool = True,
) -> tuple[Tensor, Tensor]:
    """Extend the old classifier to num_classes rows, BCT-style.

    Rows of known classes are copied from the old classifier (row index = class label). Every
    other class present in labels gets the mean of the old model's features of that class and
    bias 0. With `match_norm` those rows are rescaled to the mean norm of the known rows and
    get the mean known bias: raw feature means are often several times longer than trained
    classifier rows, and would then claim every input, old classes included. Classes neither
    known nor present get a zero row with bias 0 (not -inf, which would make any cross-entropy
    on them infinite); the caller should not train on such labels.
    """
    if isinstance(known_classes, Tensor):
        known_classes = known_classes.tolist()
    known = [int(c) for c in known_classes]
    labels = _checked_inputs(weight, bias, known, features, labels, num_classes)
    d = weight.shape[1]
    w = torch.zeros(num_classes, d, dtype=weight.dtype, device=weight.device)
    b = torch.zeros(num_classes, dtype=bias.dtype, device=bias.device)
    feats = features.to(dtype=weight.dtype, device=weight.device)
    labels = labels.to(weight.device)
    known_set = set(known)
    for c in torch.unique(labels).tolist():
        if c not in known_set:
            w[c] = feats[labels == c].mean(dim=0)
    synthesised = [c for c in torch.unique(labels).tolist() if c not in known_set]
    if known:
        idx = torch.tensor(known, dtype=torch.long, device=weight.device)
        w[idx] = weight[idx].detach()
        b[idx] = bias[idx].detach()
        if match_norm and synthesised:
            new = torch.tensor(synthesised, dtype=torch.long, device=weight.device)
            norms = w[new].norm(dim=1, keepdim=True).clamp_min(1e-12)
            w[new] = w[new] / norms * w[idx].norm(dim=1).mean()
            b[new] = b[idx].mean()
    return w, b


def _checked_inputs(
    weight: Tensor,
    bias: Tensor,
    known: list[int],
    features: Tensor,
    labels: Tensor,
    num_classes: int,
) -> Tensor:
    """Raise on shapes or classes synthesize_old_classifier cannot use; the labels as int64."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be (classes, d), got shape {tuple(weight.shape)}")
    if bias.ndim != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    d = weight.shape[1]
    if features.ndim != 2 or features.shape[1] != d:
        raise ValueError(f"features must be (n, {d}), got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must be ({features.shape[0]},) to match features, got {tuple(labels.shape)}"
        )
    for c in known:
        if not 0 <= c < min(num_classes, weight.shape[0]):
            raise ValueError(
                f"known class {c} outside the old classifier ({weight.shape[0]} rows) "
                f"or num_classes ({num_classes})"
            )
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return labels


def transformation_loss(pred: Tensor, target: Tensor) -> Tensor:
    """FCT transformation loss: mean squared error over rows and dims."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(pred, target)


def fastfill_loss(
    pred: Tensor,
    log_var: Tensor,
    target: Tensor,
    logits: Tensor | None,
    labels: Tensor | None,
    label_smoothing: float = 0.1,
) -> Tensor:
    """FastFill: mean of 0.5 * exp(-s) * (mse + ce) + 0.5 * s with s the predicted log-variance.

    logits are the frozen new classifier applied to pred; the learned s down-weights hard
    samples, and its magnitude later ranks images for backfilling. Rows labelled < 0 (no
    label), or every row when there is no classifier (logits None), keep the regression term
    alone: s is then the heteroscedastic variance of the L2 error, still an order of rows.
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    n = pred.shape[0]
    if log_var.ndim == 2 and log_var.shape[1] == 1:
        log_var = log_var[:, 0]
    if log_var.shape != (n,):
        raise ValueError(f"log_var must be ({n},) or ({n}, 1), got {tuple(log_var.shape)}")
    mse = ((pred - target) ** 2).mean(dim=1)
    if logits is None:
        return (0.5 * torch.exp(-log_var) * mse + 0.5 * log_var).mean()
    if labels is None or logits.ndim != 2 or logits.shape[0] != n or labels.shape != (n,):
        raise ValueError(f"logits must be ({n}, classes) and labels ({n},)")
    known = labels >= 0
    ce = F.cross_entropy(
        logits, labels.long().clamp(min=0), reduction="none", label_smoothing=label_smoothing
    )
    ce = torch.where(known, ce, torch.zeros_like(ce))
    return (0.5 * torch.exp(-log_var) * (mse + ce) + 0.5 * log_var).mean()
