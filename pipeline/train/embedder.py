"""Ray Train (TorchTrainer) loop that trains an embedding model with a classification head."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import ModelConfig, PreprocessConfig, StorageConfig
from pipeline.io import uri as uri_io
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.store import FORMAT, MODEL_FILE, embedder_meta, save_model_dir


@dataclass
class TrainResult:
    """What one training run produced."""

    model_name: str
    model_dir: str
    images_uri: str
    epochs: int
    train_rows: int
    final_loss: float
    final_accuracy: float
    seconds: float
    num_workers: int
    use_gpu: bool
    config_hash: str
    cached: bool = False

    def metrics(self) -> dict[str, float]:
        return {
            "train_rows": self.train_rows,
            "final_loss": self.final_loss,
            "final_accuracy": self.final_accuracy,
            "train_seconds": self.seconds,
        }


def config_hash(cfg: ModelConfig, images_uri: str) -> str:
    """Identity of a training run: same model config + data → same model (cache key)."""
    payload = json.dumps(
        {"model": cfg.model_dump(mode="json"), "images": images_uri}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def training_batch(
    batch: dict[str, np.ndarray],
    pre: PreprocessConfig,
    max_pixels: int,
    split: str | None,
    classes: list[int] | None,
) -> dict[str, np.ndarray]:
    """Decode a batch and keep the usable labelled rows of the split/classes asked for."""
    from pipeline.data.decode import decode_batch

    keep = np.ones(len(batch["key"]), dtype=bool)
    if split is not None and "split" in batch:
        keep &= batch["split"] == split
    labels = batch.get("label")
    if labels is None:
        raise ValueError("training needs a 'label' column in the image shards")
    labels = np.asarray(labels)
    keep &= ~np.isnan(labels.astype(np.float64))
    if classes is not None:
        keep &= np.isin(labels, classes)
    sub = {k: v[keep] for k, v in batch.items()}
    out = decode_batch(sub, pre, max_pixels)
    ok = out["error"] == ""
    return {"pixels": out["pixels"][ok], "label": sub["label"][ok].astype(np.int64)}


class _TrainHead(nn.Module):
    """Forward returns (embedding, logits) so DDP's hooks see the whole training graph."""

    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.logits(x)


def _save_ckpt(net: EmbeddingNet, opt: torch.optim.Optimizer, epoch: int, d: str) -> None:
    save_model_dir(net, {"epoch": epoch}, d)
    torch.save(opt.state_dict(), Path(d) / "optimizer.pt")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on each Ray Train worker: stream the dataset shard, train, report, checkpoint."""
    import ray.train
    import ray.train.torch
    from safetensors.torch import load

    cfg = ModelConfig.model_validate(config["model"])
    tc, pre = cfg.train, cfg.preprocess
    ctx = ray.train.get_context()
    torch.manual_seed(tc.seed + ctx.get_world_rank())
    torch.set_num_threads(max(1, int(config["threads"])))
    net = EmbeddingNet(cfg.architecture, in_channels=pre.channels)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume after a worker failure or a re-created trainer
        with ckpt.as_directory() as d:
            net.load_state_dict(load((Path(d) / "weights.safetensors").read_bytes()))
            opt.load_state_dict(torch.load(Path(d) / "optimizer.pt", weights_only=True))
            start = json.loads((Path(d) / MODEL_FILE).read_text())["epoch"] + 1
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs, last_epoch=start - 1)
    model = ray.train.torch.prepare_model(_TrainHead(net))
    device = ray.train.torch.get_device()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    shape = (-1, pre.channels, pre.input_size, pre.input_size)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, tc.epochs):
        model.train()
        tot_loss, correct, seen = 0.0, 0, 0
        for batch in shard.iter_torch_batches(batch_size=tc.batch_size, device=device):
            x, y = batch["pixels"].view(shape).float(), batch["label"].long()
            _, logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += float(loss) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        sched.step()
        metrics = {
            "epoch": epoch,
            "loss": tot_loss / max(seen, 1),
            "accuracy": correct / max(seen, 1),
            "rows": seen,
        }
        with tempfile.TemporaryDirectory() as d:
            if ctx.get_world_rank() == 0:
                _save_ckpt(net, opt, epoch, d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)


def image_dataset(
    images_uri: str,
    storage: StorageConfig | None,
    columns: list[str] | None = None,
):
    """A Ray Dataset over the Parquet image shards under a URI (local or s3://)."""
    import ray.data

    files = uri_io.parquet_files(images_uri, storage)
    if not files:
        raise FileNotFoundError(f"no Parquet image shards under {images_uri}")
    loc = uri_io.resolve(files[0], storage)
    paths = [uri_io.resolve(f, storage).path for f in files]
    return ray.data.read_parquet(paths, filesystem=loc.fs, columns=columns)


def train_embedder(
    cfg: ModelConfig,
    images_uri: str,
    out_dir: str | Path,
    storage: StorageConfig | None = None,
    results_dir: str | Path = ".carryover/ray_results",
    max_pixels: int = 64_000_000,
) -> TrainResult:
    """Train `cfg` on the image shards' train split with Ray Train; cached by config hash."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir = Path(out_dir)
    h = config_hash(cfg, images_uri)
    meta_path = out_dir / MODEL_FILE
    if meta_path.exists() and json.loads(meta_path.read_text()).get("config_hash") == h:
        meta = json.loads(meta_path.read_text())
        return TrainResult(**{**meta["train_result"], "cached": True})
    tc = cfg.train
    t0 = time.perf_counter()
    ds = image_dataset(images_uri, storage, columns=["key", "image", "label", "split"])
    ds = ds.map_batches(
        training_batch,
        fn_kwargs={
            "pre": cfg.preprocess,
            "max_pixels": max_pixels,
            "split": "train",
            "classes": tc.classes,
        },
        batch_size=1024,
        num_cpus=0.5,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": cfg.model_dump(mode="json"),
            "threads": max(1, int(tc.cpus_per_worker)),
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"train-{cfg.name}-{h}",
            storage_path=str(Path(results_dir).resolve()),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {cfg.name!r} produced no checkpoint (no training rows?)")
    m = result.metrics or {}
    tr = TrainResult(
        model_name=cfg.name,
        model_dir=str(out_dir),
        images_uri=images_uri,
        epochs=tc.epochs,
        train_rows=int(m.get("rows", 0)),
        final_loss=float(m.get("loss", float("nan"))),
        final_accuracy=float(m.get("accuracy", float("nan"))),
        seconds=round(time.perf_counter() - t0, 2),
        num_workers=tc.num_workers,
        use_gpu=tc.use_gpu,
        config_hash=h,
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        tmp.mkdir(parents=True)
        shutil.copy(Path(d) / "weights.safetensors", tmp / "weights.safetensors")
    meta = embedder_meta(cfg, config_hash=h, train_result=asdict(tr), trained_classes=tc.classes)
    (tmp / MODEL_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # the model dir appears whole or not at all
    return tr
