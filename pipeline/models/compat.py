"""Compatibility models: FCT/FastFill transformation, SimCLR head and new-to-old query adapters."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.choices import ADAPTER_KINDS
from pipeline.config import ConfigError

ADAPTERS = ADAPTER_KINDS
FCT_WIDTH = 16  # FCT's mixer width, in multiples of the new dimension (designed for 128-d)
WIDTH_STEP = 64  # a sized mixer is a multiple of this (GEMM-friendly)


class SizingError(ConfigError):
    """No transformation of these dimensions fits the cost limit (a config mistake: exit 2)."""


def transformation_macs(
    old_dim: int,
    new_dim: int,
    side_dim: int,
    inner_dim: int,
    uncertainty: bool = True,
    linear_skip: bool = False,
) -> int:
    """Multiply-adds per row of a Transformation: one per weight of its Linear layers."""
    o, n, s, w = old_dim, new_dim, side_dim, inner_dim
    macs = o * 2 * o + 2 * o * 2 * n  # old branch
    macs += o * n if linear_skip else 0
    if s:
        macs += s * 2 * s + 2 * s * 2 * n  # side branch
    mixed = 4 * n if s else 2 * n
    return macs + mixed * w + w * w + w * n + (w if uncertainty else 0)


def size_inner_dim(
    old_dim: int,
    new_dim: int,
    side_dim: int,
    max_mflops: float | None,
    uncertainty: bool = True,
    linear_skip: bool = False,
) -> int:
    """The mixer width: FCT's 16 × new dim (with `linear_skip`: half the new dim, see below),
    narrowed (to a multiple of 64; without a skip never below the new dim) until h costs at
    most `max_mflops` MFLOP (2 × multiply-adds) per row.

    At 128-d and below FCT's width fits any sane limit; at 1,280-d FCT's 20,480 would cost
    ~1.1 GFLOP a row, more than re-embedding with a mobile CNN. With a linear skip the MLP
    learns only what the ridge map leaves: on the real benchmark's 1,280-d pairs a 512-wide
    residual matched or beat 1,024 and 2,432 (docs/methods.md) at a fraction of the cost."""
    widest = FCT_WIDTH * new_dim
    if linear_skip:
        widest = max(WIDTH_STEP, (new_dim // 2) // WIDTH_STEP * WIDTH_STEP)
    narrowest = WIDTH_STEP if linear_skip else max(new_dim, WIDTH_STEP)  # the skip maps alone
    if max_mflops is None:
        return widest
    budget = max_mflops * 1e6 / 2

    def fits(w: int) -> bool:
        macs = transformation_macs(old_dim, new_dim, side_dim, w, uncertainty, linear_skip)
        return macs <= budget

    if fits(widest):
        return widest
    w = (widest // WIDTH_STEP) * WIDTH_STEP
    while w >= narrowest and not fits(w):
        w -= WIDTH_STEP
    if w < narrowest or not fits(w):
        least = transformation_macs(old_dim, new_dim, side_dim, narrowest, uncertainty, linear_skip)
        least = 2 * least / 1e6
        raise SizingError(
            f"transformation.max_mflops={max_mflops:g} is below the cheapest h for dimensions "
            f"old={old_dim}, side={side_dim}, new={new_dim} ({least:.1f} MFLOP/row): raise it"
        )
    return w


def transformation_cost(arch: dict[str, Any]) -> dict[str, float]:
    """Parameters and MFLOP per row of the Transformation `arch` builds (logged and printed)."""
    macs = transformation_macs(
        arch["old_dim"],
        arch["new_dim"],
        arch["side_dim"],
        arch["inner_dim"],
        arch["uncertainty"],
        arch.get("linear_skip", False),
    )
    with torch.device("meta"):  # count without allocating (FCT's width at 1,280-d is 2 GB)
        params = sum(p.numel() for p in Transformation(**arch).parameters())
    return {"h_params": float(params), "h_mflops_per_row": round(2 * macs / 1e6, 3)}


def _block(d_in: int, d_out: int) -> list[nn.Module]:
    return [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of `model` with every eval-mode BatchNorm1d that follows a Linear in a
    Sequential folded into that Linear (BN becomes Identity): one GEMM + bias per block instead
    of a GEMM and a normalisation pass. Outputs equal the original's up to float rounding."""
    out = copy.deepcopy(model).eval()
    for seq in [m for m in out.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(seq)):
            lin, bn = seq[i - 1], seq[i]
            if not (isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d)):
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue  # batch statistics only: nothing to fold
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.affine:
                    scale = scale * bn.weight
                shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
                bias = lin.bias if lin.bias is not None else torch.zeros_like(bn.running_mean)
                folded = nn.Linear(lin.in_features, lin.out_features)
                folded.weight.copy_(lin.weight * scale[:, None])
                folded.bias.copy_(bias * scale + shift)
            seq[i - 1], seq[i] = folded, nn.Identity()
    return out


class Transformation(nn.Module):
    """FCT transformation h(old embedding, side info) -> new embedding, optionally with FastFill
    uncertainty: a head on the last hidden layer predicting the log-variance s of each sample.

    `linear_skip`: h = skip(old) + MLP(old, side), the skip a frozen linear map (set by the
    trainer to the closed-form ridge fit) and the MLP's output layer zero at the start, so
    training begins at the least-squares map and learns only what it leaves. At production
    dimensions (1,280-d) a plain MLP from random weights needs far more pairs than a gallery's
    training split holds before it even matches that linear map.
    """

    def __init__(
        self,
        old_dim: int,
        new_dim: int,
        side_dim: int = 0,
        inner_dim: int | None = None,
        uncertainty: bool = False,
        linear_skip: bool = False,
    ):
        super().__init__()
        for name, val in (("old_dim", old_dim), ("new_dim", new_dim)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        if side_dim < 0:
            raise ValueError(f"side_dim must be >= 0, got {side_dim}")
        self.old_dim, self.new_dim, self.side_dim = int(old_dim), int(new_dim), int(side_dim)
        self.inner_dim = int(inner_dim) if inner_dim is not None else FCT_WIDTH * self.new_dim
        self.uncertainty = bool(uncertainty)
        self.old_branch = nn.Sequential(
            *_block(old_dim, 2 * old_dim), *_block(2 * old_dim, 2 * new_dim)
        )
        self.side_branch: nn.Sequential | None = None
        if side_dim > 0:
            self.side_branch = nn.Sequential(
                *_block(side_dim, 2 * side_dim), *_block(2 * side_dim, 2 * new_dim)
            )
        mixed = 4 * new_dim if side_dim > 0 else 2 * new_dim
        self.mixer = nn.Sequential(
            *_block(mixed, self.inner_dim), *_block(self.inner_dim, self.inner_dim)
        )
        self.head = nn.Linear(self.inner_dim, new_dim)
        self.log_var_head = nn.Linear(self.inner_dim, 1) if self.uncertainty else None
        self.linear_skip = bool(linear_skip)
        self.skip: nn.Linear | None = None
        if self.linear_skip:
            self.skip = nn.Linear(old_dim, new_dim).requires_grad_(False)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_skip(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """The frozen linear part: y ≈ old @ weight.T + bias (weight (new_dim, old_dim))."""
        if self.skip is None:
            raise ValueError("this transformation was built without linear_skip")
        with torch.no_grad():
            self.skip.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.skip.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, old: Tensor, side: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(predicted new embedding (n, new_dim), log-variance (n,) or None)."""
        if old.ndim != 2 or old.shape[1] != self.old_dim:
            raise ValueError(f"old must be (n, {self.old_dim}), got {tuple(old.shape)}")
        h = self.old_branch(old)
        if self.side_branch is not None:
            if side is None:
                raise ValueError(f"this transformation needs side info of dim {self.side_dim}")
            if side.shape != (old.shape[0], self.side_dim):
                raise ValueError(
                    f"side must be ({old.shape[0]}, {self.side_dim}), got {tuple(side.shape)}"
                )
            h = torch.cat([h, self.side_branch(side)], dim=1)
        elif side is not None:
            raise ValueError("side info given but the transformation was built with side_dim=0")
        h = self.mixer(h)
        log_var = self.log_var_head(h)[:, 0] if self.log_var_head is not None else None
        out = self.head(h)
        return (out + self.skip(old) if self.skip is not None else out), log_var

    def config(self) -> dict[str, Any]:
        """Constructor kwargs, JSON-safe: Transformation(**cfg) rebuilds the architecture."""
        cfg = {
            "old_dim": self.old_dim,
            "new_dim": self.new_dim,
            "side_dim": self.side_dim,
            "inner_dim": self.inner_dim,
            "uncertainty": self.uncertainty,
        }
        return {**cfg, "linear_skip": True} if self.linear_skip else cfg  # as before the skip


class SimCLRHead(nn.Module):
    """Backbone plus SimCLR projection MLP: the loss uses the projection, retrieval the features."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int | None = None,
        hidden_dim: int | None = None,
        proj_dim: int = 128,
    ):
        super().__init__()
        if feature_dim is None:
            feature_dim = getattr(backbone, "embedding_dim", None)
            if feature_dim is None:
                raise ValueError("feature_dim not given and backbone has no embedding_dim")
        hidden_dim = hidden_dim or feature_dim
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, proj_dim),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(backbone features (n, d), projection (n, proj_dim))."""
        feats = self.backbone(x)
        return feats, self.projector(feats)


# ---------------------------------------------------------------- query adapters (new -> old)


def _float64(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _paired(new: Any, old: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _float64(new, "new"), _float64(old, "old")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"new has {x.shape[0]} rows but old has {y.shape[0]}; pairs must align")
    return x, y


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y ~ x @ w + b; centring separates the intercept from the slope."""
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    w = np.linalg.lstsq(x - xm, y - ym, rcond=None)[0]
    return w, ym - xm @ w


def _f32(a: np.ndarray | float) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


class ProcrustesAdapter(nn.Module):
    """old ~ scale * new @ W with W semi-orthogonal (d_new, d_old): a pure rotation, no centring."""

    def __init__(self, d_new: int, d_old: int, fit_scale: bool = True):
        super().__init__()
        self.d_new, self.d_old, self.fit_scale = int(d_new), int(d_old), bool(fit_scale)
        self.register_buffer("weight", torch.zeros(self.d_new, self.d_old))
        self.register_buffer("scale_factor", torch.ones(()))

    @property
    def scale(self) -> float:
        return float(self.scale_factor)

    @classmethod
    def fit(cls, new: Any, old: Any, seed: int = 0, fit_scale: bool = True) -> ProcrustesAdapter:
        """Closed form: W = U V^T from the SVD of new^T old; scale by least squares given W."""
        del seed  # deterministic; accepted so every adapter fits through one signature
        x, y = _paired(new, old)
        u, s, vt = np.linalg.svd(x.T @ y, full_matrices=False)
        w = u @ vt
        scale = 1.0
        if fit_scale:
            denom = float(np.sum((x @ w) ** 2))
            # trace(S) = <x W, y>, so this is argmin_c ||c x W - y||^2.
            scale = float(s.sum()) / denom if denom > 0 else 1.0
        m = cls(x.shape[1], y.shape[1], fit_scale=fit_scale)
        m.weight.copy_(_f32(w))
        m.scale_factor.copy_(_f32(scale))
        return m

    def forward(self, new: Tensor) -> Tensor:
        return self.scale_factor * (new.to(self.weight.dtype) @ self.weight)

    def config(self) -> dict[str, Any]:
        return {
            "kind": "procrustes",
            "d_new": self.d_new,
            "d_old": self.d_old,
            "fit_scale": self.fit_scale,
        }


class LowRankAdapter(nn.Module):
    """old ~ new @ A @ B + b with A (d_new, r), B (r, d_old): reduced-rank regression."""

    def __init__(self, d_new: int, d_old: int, rank: int | None = None):
        super().__init__()
        self.d_new, self.d_old = int(d_new), int(d_old)
        self.rank = int(rank) if rank is not None else min(32, self.d_new, self.d_old)
        if not 1 <= self.rank <= min(self.d_new, self.d_old):
            raise ValueError(f"rank must be in [1, {min(self.d_new, self.d_old)}], got {rank}")
        self.register_buffer("a", torch.zeros(self.d_new, self.rank))
        self.register_buffer("b", torch.zeros(self.rank, self.d_old))
        self.register_buffer("bias", torch.zeros(self.d_old))

    @classmethod
    def fit(cls, new: Any, old: Any, seed: int = 0, rank: int | None = None) -> LowRankAdapter:
        """OLS with intercept, then project the (centred) fitted values onto their top-r right
        singular vectors: the optimal rank-r map under squared error."""
        del seed  # closed form, deterministic
        x, y = _paired(new, old)
        m = cls(x.shape[1], y.shape[1], rank=rank)
        w, _ = _ols(x, y)
        xm = x.mean(axis=0)
        # The intercept stays full rank, so the rank limit acts on the centred fit only.
        vt = np.linalg.svd((x - xm) @ w, full_matrices=False)[2]
        v = vt[: m.rank].T
        a, b = w @ v, v.T
        m.a.copy_(_f32(a))
        m.b.copy_(_f32(b))
        m.bias.copy_(_f32(y.mean(axis=0) - xm @ a @ b))
        return m

    def forward(self, new: Tensor) -> Tensor:
        return (new.to(self.a.dtype) @ self.a) @ self.b + self.bias

    def config(self) -> dict[str, Any]:
        return {"kind": "low_rank", "d_new": self.d_new, "d_old": self.d_old, "rank": self.rank}


class ResidualMLPAdapter(nn.Module):
    """old ~ new @ W + b + MLP(new): a least-squares linear map plus a learned residual."""

    def __init__(self, d_new: int, d_old: int, hidden: int = 256):
        super().__init__()
        self.d_new, self.d_old, self.hidden = int(d_new), int(d_old), int(hidden)
        self.linear = nn.Linear(self.d_new, self.d_old)
        self.mlp = nn.Sequential(
            nn.Linear(self.d_new, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.d_old)
        )
        # Zero last layer: training starts exactly at the closed-form linear fit.
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    @classmethod
    def fit(
        cls,
        new: Any,
        old: Any,
        seed: int = 0,
        hidden: int = 256,
        epochs: int = 200,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
    ) -> ResidualMLPAdapter:
        """Closed-form linear init, then Adam on MSE over all parameters (seeded, on CPU)."""
        x, y = _paired(new, old)
        # Fork the global RNG so the seeded init neither depends on nor disturbs the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = cls(x.shape[1], y.shape[1], hidden=hidden)
        w, b = _ols(x, y)
        with torch.no_grad():
            m.linear.weight.copy_(_f32(w.T))
            m.linear.bias.copy_(_f32(b))
        _train_mse(m, _f32(x), _f32(y), seed, epochs, batch_size, lr, weight_decay)
        return m.eval()

    def forward(self, new: Tensor) -> Tensor:
        new = new.to(self.linear.weight.dtype)
        return self.linear(new) + self.mlp(new)

    def config(self) -> dict[str, Any]:
        return {
            "kind": "residual_mlp",
            "d_new": self.d_new,
            "d_old": self.d_old,
            "hidden": self.hidden,
        }


def _train_mse(
    m: nn.Module,
    x: Tensor,
    y: Tensor,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
) -> None:
    opt = torch.optim.Adam(m.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    m.train()
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
            loss = torch.mean((m(x[idx]) - y[idx]) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


_ADAPTER_CLASSES: dict[str, type[nn.Module]] = {
    "procrustes": ProcrustesAdapter,
    "low_rank": LowRankAdapter,
    "residual_mlp": ResidualMLPAdapter,
}


def fit_adapter(kind: str, new: Any, old: Any, seed: int = 0, **kw: Any) -> nn.Module:
    """Fit a new->old query adapter of the given kind on paired (n, d_new), (n, d_old) rows."""
    if kind not in _ADAPTER_CLASSES:
        raise ValueError(f"unknown adapter {kind!r}; expected one of {ADAPTERS}")
    return _ADAPTER_CLASSES[kind].fit(new, old, seed=seed, **kw)


def build_adapter(config: dict[str, Any]) -> nn.Module:
    """Rebuild an unfitted adapter from its config(), ready for load_state_dict."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind not in _ADAPTER_CLASSES:
        raise ValueError(f"unknown adapter kind {kind!r} in config; expected one of {ADAPTERS}")
    try:
        return _ADAPTER_CLASSES[kind](**cfg)
    except TypeError as e:
        raise ValueError(f"bad {kind} adapter config {config}: {e}") from e
