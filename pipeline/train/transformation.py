"""Ray Train task for FCT's transformation h(old, side) → new, with FastFill's uncertainty head."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load
from torch import nn

from pipeline.compat.losses import fastfill_loss, transformation_loss
from pipeline.compat.ridge import RidgeFit, fit_ridge
from pipeline.config import TransformationConfig
from pipeline.models.compat import Transformation, size_inner_dim, transformation_cost
from pipeline.models.store import MODEL_FILE, WEIGHTS_FILE, ModelLoadError
from pipeline.train.loop import (
    Task,
    TrainingRun,
    config_hash,
    install_checkpoint,
    reuse,
    run_training,
)

SKIP_MIN_DIM = 256  # from here up, h starts at the ridge map (see Transformation)


@dataclass
class TransformationResult:
    """What one transformation training run produced."""

    name: str
    model_dir: str
    from_model: str
    to_model: str
    side_info_model: str | None
    loss: str
    epochs: int
    train_rows: int
    final_loss: float
    final_mse: float
    seconds: float
    config_hash: str
    cached: bool = False
    resumed_from_epoch: int = 0  # > 0: a killed run went on from its last checkpoint
    inner_dim: int = 0
    h_params: float = 0.0
    h_mflops_per_row: float = 0.0  # what transforming a row costs (2 × multiply-adds)
    ridge_alpha: float | None = None  # linear_skip: the ridge penalty chosen on held-out pairs
    ridge_holdout_mse: float | None = None  # ... and the linear map's error there

    def metrics(self) -> dict[str, float]:
        ridge = {"ridge_holdout_mse": self.ridge_holdout_mse} if self.ridge_alpha else {}
        return {
            **ridge,
            "train_rows": self.train_rows,
            "final_loss": self.final_loss,
            "final_mse": self.final_mse,
            "h_params": self.h_params,
            "h_mflops_per_row": self.h_mflops_per_row,
            "train_seconds": self.seconds,
            "resumed_from_epoch": self.resumed_from_epoch,
        }


def build_task(config: dict[str, Any]) -> Task:
    """L2 regression to the new embedding (FCT), or FastFill's uncertainty-weighted loss."""
    tcfg = TransformationConfig.model_validate(config["transformation"])
    model = Transformation(**config["arch"])
    if config.get("skip") is not None:
        model.set_skip(config["skip"]["weight"], config["skip"]["bias"])
    side = model.side_dim > 0
    head = config["new_classifier"]  # None: FastFill's regression term alone
    if head is not None:
        w_new = torch.tensor(np.asarray(head["weight"], dtype=np.float32))
        b_new = torch.tensor(np.asarray(head["bias"], dtype=np.float32))
    cols = config["columns"]

    def step(m: nn.Module, batch: dict[str, torch.Tensor]):
        old, new = batch[cols["old"]].float(), batch[cols["new"]].float()
        pred, log_var = m(old, batch[cols["side"]].float() if side else None)
        mse = ((pred - new) ** 2).mean(1).sum().item()
        if tcfg.loss == "fct":
            loss = transformation_loss(pred, new)
        else:
            logits, y = None, None
            if head is not None:
                logits = pred @ w_new.to(pred.device).T + b_new.to(pred.device)
                y = batch["label"].long()
            loss = fastfill_loss(pred, log_var, new, logits, y, tcfg.label_smoothing)
        return loss, len(old), {"mse": mse}

    return Task(save=model, train=model, step=step)


def train_transformation(
    tcfg: TransformationConfig,
    features: Any,
    dims: dict[str, int],
    columns: dict[str, str | None],
    new_classifier: dict[str, list] | None,
    out_dir: str | Path,
    identity: dict[str, Any],
    results_dir: str | Path = ".carryover/ray_results",
    size_bytes: int | None = None,
) -> TransformationResult:
    """Train h on a features dataset (old, side, new columns named by `columns`) on Ray Train.

    `size_bytes`: the features' size where the caller knows it (streamed from files); at most
    `train.cache_max_bytes` and each worker holds its share in memory, else every epoch
    streams.
    `identity` names what the features came from (models, data): with the config it is the
    cache key, so the same upgrade reuses a trained transformation.
    """
    side_dim = dims.get("side", 0) if columns.get("side") else 0
    arch = architecture(tcfg, dims, side_dim)
    h = config_hash(tcfg.model_dump(mode="json"), arch, identity)
    if (done := reuse(out_dir, h, TransformationResult)) is not None:
        return done
    started = time.perf_counter()
    keep = [c for c in (columns["old"], columns.get("side"), columns["new"], "label") if c]
    features = features.select_columns(keep)  # only tensors travel to the workers
    ridge = linear_part(features, columns) if arch.get("linear_skip") else None
    job = TrainingRun(
        "pipeline.train.transformation:build_task",
        _task_config(tcfg, arch, new_classifier, columns, ridge),
        features,
        tcfg.train,
        f"transformation-{tcfg.name}-{h}",
        (features.size_bytes() if size_bytes is None else size_bytes) <= tcfg.train.cache_max_bytes,
        started,
    )
    fitted = run_training(job, results_dir)
    tr = TransformationResult(
        name=tcfg.name,
        model_dir=str(out_dir),
        from_model=identity.get("old", "?"),
        to_model=identity.get("new", "?"),
        side_info_model=identity.get("side") if side_dim else None,
        loss=tcfg.loss,
        epochs=tcfg.train.epochs,
        final_mse=float(fitted.metrics.get("mse", float("nan"))),
        inner_dim=arch["inner_dim"],
        ridge_alpha=ridge.alpha if ridge else None,
        ridge_holdout_mse=ridge.holdout_mse if ridge else None,
        **transformation_cost(arch),
        **fitted.result_fields(h),
    )
    install_checkpoint(fitted.checkpoint, out_dir, _model_meta(tcfg, arch, tr))
    return tr


def _task_config(
    tcfg: TransformationConfig,
    arch: dict[str, Any],
    new_classifier: dict[str, list] | None,
    columns: dict[str, str | None],
    ridge: RidgeFit | None,
) -> dict[str, Any]:
    """What build_task gets on each worker: h's shape, its loss's inputs, its frozen skip."""
    return {
        "transformation": tcfg.model_dump(mode="json"),
        "arch": arch,
        "new_classifier": new_classifier,
        "columns": columns,
        "skip": {"weight": ridge.weight, "bias": ridge.bias} if ridge else None,
    }


def linear_part(features: Any, columns: dict[str, str | None]) -> RidgeFit:
    """The ridge map old → new over the training pairs, streamed (h's frozen skip)."""
    pairs = (
        (b[columns["old"]], b[columns["new"]])
        for b in features.iter_batches(batch_size=4096, batch_format="numpy")
    )
    return fit_ridge(pairs)


def architecture(tcfg: TransformationConfig, dims: dict[str, int], side_dim: int) -> dict:
    """h's constructor arguments; an unset inner_dim is sized to the cost limit, an unset
    linear_skip is on at production dimensions."""
    uncertainty = tcfg.loss == "fastfill"
    skip = tcfg.linear_skip
    if skip is None:
        skip = max(dims["old"], dims["new"]) >= SKIP_MIN_DIM
    inner = tcfg.inner_dim or size_inner_dim(
        dims["old"], dims["new"], side_dim, tcfg.max_mflops, uncertainty, skip
    )
    arch = {
        "old_dim": dims["old"],
        "new_dim": dims["new"],
        "side_dim": side_dim,
        "inner_dim": inner,
        "uncertainty": uncertainty,
    }
    return {**arch, "linear_skip": True} if skip else arch  # hashes as before without it


def _model_meta(tcfg: TransformationConfig, arch: dict, tr: TransformationResult) -> dict[str, Any]:
    """model.json of a trained transformation: its architecture, lineage and training result."""
    return {
        "kind": "transformation",
        "name": tcfg.name,
        "arch": arch,
        "from_model": tr.from_model,
        "to_model": tr.to_model,
        "side_info_model": tr.side_info_model,
        "loss": tcfg.loss,
        "config_hash": tr.config_hash,
        "train_result": asdict(tr),
    }


def load_transformation(d: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained transformation (eval mode) and its model.json, without unpickling."""
    d = Path(d)
    try:
        meta = json.loads((d / MODEL_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{d}: no readable {MODEL_FILE}: {e}") from None
    if meta.get("kind") != "transformation":
        raise ModelLoadError(f"{d}: not a transformation (kind={meta.get('kind')!r})")
    model = Transformation(**meta["arch"])
    model.load_state_dict(load((d / WEIGHTS_FILE).read_bytes()))
    return model.eval(), meta


def apply_transformation(
    model: nn.Module, old: np.ndarray, side: np.ndarray | None, batch: int = 8192
) -> tuple[np.ndarray, np.ndarray | None]:
    """h(old, side) in batches: transformed embeddings and (FastFill) log-variances."""
    preds, vars_ = [], []
    with torch.inference_mode():
        for lo in range(0, len(old), batch):
            s = None if side is None else torch.from_numpy(side[lo : lo + batch]).float()
            p, v = model(torch.from_numpy(old[lo : lo + batch]).float(), s)
            preds.append(p.numpy())
            if v is not None:
                vars_.append(v.reshape(-1).numpy())
    pred = np.concatenate(preds) if preds else np.zeros((0, model.new_dim), np.float32)
    return pred, (np.concatenate(vars_) if vars_ else None)
