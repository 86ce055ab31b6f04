"""Transformation chains: h, or h₂∘h₁ for a gallery two versions behind, over embedding batches."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load

from pipeline.models.compat import Transformation, fold_batchnorm
from pipeline.models.store import MODEL_FILE, WEIGHTS_FILE, ModelLoadError
from pipeline.train.transformation import apply_transformation


@dataclass
class ChainSpec:
    """What a worker needs to rebuild a chain anywhere on the cluster (no shared disk needed):
    each step's model.json and safetensors bytes. An empty chain is the identity."""

    names: list[str] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    weights: list[bytes] = field(default_factory=list)

    @property
    def needs_side(self) -> bool:
        return any(m["arch"]["side_dim"] for m in self.metas)

    @property
    def new_dim(self) -> int | None:
        return self.metas[-1]["arch"]["new_dim"] if self.metas else None

    def label(self) -> str:
        return " → ".join(self.names) if self.names else "identity"


def chain_spec(dirs: list[str | Path], names: list[str] | None = None) -> ChainSpec:
    """Read each transformation dir (model.json + weights) of a chain, in application order."""
    spec = ChainSpec()
    for i, d in enumerate(dirs):
        d = Path(d)
        try:
            meta = json.loads((d / MODEL_FILE).read_text())
            weights = (d / WEIGHTS_FILE).read_bytes()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{d}: cannot read transformation: {e}") from None
        if meta.get("kind") != "transformation":
            raise ModelLoadError(f"{d}: not a transformation (kind={meta.get('kind')!r})")
        if spec.metas and spec.metas[-1]["arch"]["new_dim"] != meta["arch"]["old_dim"]:
            raise ModelLoadError(f"{d}: its input dim does not match the previous step's output")
        spec.names.append(names[i] if names else meta.get("name", d.name))
        spec.metas.append(meta)
        spec.weights.append(weights)
    return spec


class TransformChain:
    """Apply a chain to (old, side) batches: the prediction and a log-variance when known.

    Composed steps add their variances (errors of independent steps add up), so the chain's
    log-variance is the log-sum-exp of the steps' log-variances.
    """

    def __init__(self, spec: ChainSpec):
        self.spec = spec
        self.models = []
        for meta, w in zip(spec.metas, spec.weights, strict=True):
            m = Transformation(**meta["arch"])
            m.load_state_dict(load(w))
            # Inference only: BatchNorm folded into the preceding Linear (~10% fewer passes).
            self.models.append(fold_batchnorm(m))

    def __call__(
        self, old: np.ndarray, side: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        # Arrow-backed arrays are read-only; torch wants writable memory (a cheap copy).
        x, log_var = np.array(old, dtype=np.float32), None
        side = None if side is None else np.array(side, dtype=np.float32)
        bad = None  # rows whose stored embedding (or side-info h uses) is NaN/inf
        if self.spec.metas:
            want = self.spec.metas[0]["arch"]["old_dim"]
            if x.ndim != 2 or x.shape[1] != want:
                raise ValueError(
                    f"transformation {self.spec.names[0]!r} maps {want}-d embeddings, "
                    f"got an array of shape {x.shape}"
                )
            bad = ~np.isfinite(x).all(axis=1)
            if self.spec.needs_side and side is not None and side.shape[:1] == x.shape[:1]:
                bad |= ~np.isfinite(side.reshape(len(side), -1)).all(axis=1)
        for m, meta in zip(self.models, self.spec.metas, strict=True):
            s = side if meta["arch"]["side_dim"] else None
            if meta["arch"]["side_dim"] and side is None:
                raise ValueError(f"transformation {meta.get('name')!r} needs side-info")
            x, lv = apply_transformation(m, x, s)
            if lv is not None:
                log_var = lv if log_var is None else np.logaddexp(log_var, lv)
        if bad is not None and bad.any():
            # A stored NaN/inf has no meaningful image under h: the row comes out NaN (validation
            # refuses to serve it) and most uncertain, so a partial backfill re-embeds it first
            # (argsort would rank a NaN log-variance last).
            x[bad] = np.nan
            if log_var is not None:
                log_var[bad] = np.inf
        return x.astype(np.float32, copy=False), log_var
