"""One Ray Train (TorchTrainer) worker loop for every model kind; a kind only supplies a Task."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save
from torch import nn

from pipeline.config import TrainConfig
from pipeline.io.uri import Location
from pipeline.models.store import (
    FORMAT,
    MODEL_FILE,
    WEIGHTS_FILE,
    restore_training_state,
    save_model_dir,
)
from pipeline.train.progress import WorkerReporter, watch_training

# step(model, batch) -> (loss, rows, sums): sums are per-epoch totals (e.g. correct predictions).
StepFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int, dict[str, float]]]


@dataclass
class Task:
    """What a model kind trains: the module to save, the module DDP wraps, and one step."""

    save: nn.Module
    train: nn.Module
    step: StepFn


@dataclass(frozen=True)
class TrainingRun:
    """One training job, the same shape for every model kind (embedder, side-info, h).

    `builder` ("module:function") makes the kind's Task on each worker from `config`; `name`
    is the Ray Train run's, so a killed run with the same name resumes from its checkpoint;
    `started` (perf_counter) counts the driver's own set-up in the reported seconds."""

    builder: str
    config: dict[str, Any]
    dataset: Any
    train: TrainConfig
    name: str
    in_memory: bool = False
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Fitted:
    """A finished TrainingRun: its last checkpoint and metrics."""

    checkpoint: Any
    metrics: dict[str, Any]
    seconds: float

    def result_fields(self, config_hash: str) -> dict[str, Any]:
        """The fields every kind's result dataclass shares."""
        m = self.metrics
        return {
            "train_rows": int(m.get("rows", 0)),
            "final_loss": float(m.get("loss", float("nan"))),
            "seconds": self.seconds,
            "config_hash": config_hash,
            "resumed_from_epoch": int(m.get("resumed_from_epoch", 0)),
        }


R = TypeVar("R")


def reuse(out_dir: str | Path, config_hash: str, result: type[R]) -> R | None:
    """The result of a model already trained into `out_dir` with this config hash, if any."""
    meta = cached_meta(out_dir, config_hash)
    return result(**{**meta["train_result"], "cached": True}) if meta is not None else None


def run_training(job: TrainingRun, results_dir: str | Path | Location) -> Fitted:
    """Run one TrainingRun on Ray Train (see `fit`)."""
    ckpt, metrics = fit(
        job.builder, job.config, job.dataset, job.train, job.name, results_dir, job.in_memory
    )
    return Fitted(ckpt, metrics, round(time.perf_counter() - job.started, 2))


def _builder(path: str) -> Callable[[dict[str, Any]], Task]:
    mod, _, fn = path.partition(":")
    return getattr(importlib.import_module(mod), fn)


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on each Ray Train worker: build the task, stream the shard, train, checkpoint."""
    # start-up: ray.train with its torch backend costs ~1.7 s to import, and this module is
    # also imported where nothing trains (transform actors and the study, via
    # train.transformation); only training pays it.
    import ray.train
    import ray.train.torch

    tc = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    torch.manual_seed(tc.seed + ctx.get_world_rank())
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    task = _builder(config["builder"])(config)
    params = [p for p in task.train.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume after a worker failure or a re-created trainer; nothing is unpickled
        with ckpt.as_directory() as d:
            start = restore_training_state(d, task.train, opt)
            if start >= tc.epochs:  # the driver died after the last checkpoint: report it again
                last = json.loads((Path(d) / "progress.json").read_text()).get("metrics", {})
                _report({**last, "resumed_from_epoch": start}, d, ctx.get_world_rank() == 0)
                return
    model = ray.train.torch.prepare_model(task.train)
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    batches = _EpochBatches(shard, tc.batch_size, device, bool(config.get("in_memory")), tc.seed)
    board = WorkerReporter(config.get("progress_board"), ctx.get_world_rank(), tc.epochs)
    for epoch in range(start, tc.epochs):
        # What an epoch draws and its learning rate depend on (seed, rank, epoch) only, so a run
        # resumed from a checkpoint draws what an undisturbed one would have at that epoch.
        torch.manual_seed((tc.seed * 1_000_003 + epoch) * 1009 + ctx.get_world_rank())
        for group in opt.param_groups:
            group["lr"] = cosine_lr(tc.lr, epoch, tc.epochs)
        tot, seen, sums = _train_epoch(task, model, opt, batches.epoch(epoch), epoch, board)
        metrics = {"epoch": epoch, "loss": tot / max(seen, 1), "rows": seen}
        metrics["resumed_from_epoch"] = start  # 0: a fresh run
        metrics.update({k: v / max(seen, 1) for k, v in sums.items()})
        # A report (+ checkpoint) synchronises the workers with the controller and costs
        # seconds: on small data, one per epoch takes longer than the epochs. Every rank
        # must make the same number of reports, so the schedule depends on the epoch only.
        every = max(1, tc.epochs // tc.reports)
        if (epoch + 1) % every and epoch != tc.epochs - 1:
            continue
        with tempfile.TemporaryDirectory() as d:
            if ctx.get_world_rank() == 0:
                _save_ckpt(task, opt, metrics, d, save_model_dir)
            _report(metrics, d, ctx.get_world_rank() == 0)


def _train_epoch(
    task: Task, model: nn.Module, opt: Any, batches: Any, epoch: int, board: WorkerReporter
) -> tuple[float, int, dict[str, float]]:
    """One epoch's steps: (loss summed over rows, rows, the task's per-epoch sums); rank 0
    tells the driver its step and running loss as it goes."""
    model.train()
    tot, seen, sums, steps = 0.0, 0, {}, 0
    for steps, batch in enumerate(batches, start=1):
        loss, n, s = task.step(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tot += loss.item() * n
        seen += n
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + v
        board.step(epoch, steps, tot / max(seen, 1))
    board.epoch_done(epoch, steps, tot / max(seen, 1))
    return tot, seen, sums


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine annealing to 0 over `epochs`, in closed form (a scheduler stepped from a restored
    optimizer would apply one step twice)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def _report(metrics: dict[str, Any], d: str, with_checkpoint: bool) -> None:
    """Every rank reports; rank 0 attaches the checkpoint in `d`."""
    import ray.train  # start-up: see worker_loop

    ckpt = ray.train.Checkpoint.from_directory(d) if with_checkpoint else None
    ray.train.report(metrics, checkpoint=ckpt)


class _EpochBatches:
    """Batches of one epoch: streamed from the dataset shard, or — when the caller says the
    data is small (`in_memory`) — pulled once and reshuffled per epoch from local tensors.

    On small data the per-epoch start-up of a streaming iterator costs more than the epoch.
    """

    def __init__(self, shard: Any, batch_size: int, device: Any, in_memory: bool, seed: int):
        self.shard, self.bs, self.device = shard, batch_size, device
        self.in_memory, self.seed = in_memory, seed
        self.cache: dict[str, torch.Tensor] | None = None

    def epoch(self, epoch: int):
        if not self.in_memory:
            yield from self.shard.iter_torch_batches(batch_size=self.bs, device=self.device)
            return
        if self.cache is None:
            parts: dict[str, list[torch.Tensor]] = {}
            for b in self.shard.iter_torch_batches(batch_size=4096, device=self.device):
                for k, v in b.items():
                    parts.setdefault(k, []).append(v)
            self.cache = {k: torch.cat(v) for k, v in parts.items()}
        n = len(next(iter(self.cache.values()), []))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen).to(self.device)
        for lo in range(0, n, self.bs):
            idx = perm[lo : lo + self.bs]
            yield {k: v[idx] for k, v in self.cache.items()}


def _save_ckpt(
    task: Task, opt: torch.optim.Optimizer, metrics: dict[str, Any], d: str, save_dir
) -> None:
    epoch = int(metrics["epoch"])
    save_dir(task.save, {"epoch": epoch}, d)  # weights.safetensors: the model to keep
    state = {k: v.detach().cpu().contiguous() for k, v in task.train.state_dict().items()}
    (Path(d) / "train.safetensors").write_bytes(save(state))
    torch.save(opt.state_dict(), Path(d) / "optimizer.pt")
    (Path(d) / "progress.json").write_text(json.dumps({"epoch": epoch, "metrics": metrics}))


def fit(
    builder: str,
    config: dict[str, Any],
    dataset: Any,
    tc: TrainConfig,
    name: str,
    results_dir: str | Path | Location,
    in_memory: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Run `worker_loop` with the task `builder` ("module:function") on Ray Train.

    `in_memory`: the (materialised, small) dataset is pulled into each worker once and
    reshuffled every epoch. Returns the final checkpoint and the last reported metrics.
    Re-running with the same name and results_dir resumes from the last checkpoint.
    `results_dir` may be a resolved s3:// Location: the storage every node of a cluster shares.
    The run's rank 0 reports epoch, step and loss to the driver, which draws them (see
    `watch_training`).
    """
    storage_path, storage_fs = _run_storage(results_dir)
    with watch_training(name, tc.epochs) as board:
        return _fit(builder, config, dataset, tc, name, storage_path, storage_fs, in_memory, board)


def _fit(
    builder: str,
    config: dict[str, Any],
    dataset: Any,
    tc: TrainConfig,
    name: str,
    storage_path: str,
    storage_fs: Any,
    in_memory: bool,
    board: str | None,
) -> tuple[Any, dict[str, Any]]:
    # start-up: see worker_loop
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            **config,
            "builder": builder,
            "train": tc.model_dump(mode="json"),
            "in_memory": in_memory,
            "progress_board": board,
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {name!r} produced no checkpoint (no training rows?)")
    return result.checkpoint, dict(result.metrics or {})


def _run_storage(results_dir: str | Path | Location) -> tuple[str, Any]:
    """Ray Train's storage_path and filesystem: an s3:// Location's, or a local directory."""
    if isinstance(results_dir, Location) and results_dir.is_s3:
        return results_dir.path, results_dir.fs
    path = results_dir.path if isinstance(results_dir, Location) else results_dir
    return str(Path(path).resolve()), None


def cached_meta(out_dir: str | Path, config_hash: str) -> dict[str, Any] | None:
    """The model.json of a model dir already trained with this config hash, if any."""
    p = Path(out_dir) / MODEL_FILE
    if p.exists():
        meta = json.loads(p.read_text())
        if meta.get("config_hash") == config_hash:
            return meta
    return None


def install_checkpoint(checkpoint: Any, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Copy the checkpoint's weights into `out_dir` with its model.json, atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with checkpoint.as_directory() as d:
        shutil.copy(Path(d) / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
    (tmp / MODEL_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2, default=str))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the model dir appears whole or not at all
    return out


def config_hash(*parts: Any) -> str:
    """Identity of a training run: same config + data + inputs → same model (cache key)."""
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def task_rate(builder: str, config: dict[str, Any], batch: dict[str, torch.Tensor], steps: int = 3):
    """Training rows/s of one process on `batch` (random rows of the right shapes): the
    kind's own Task and step, forward + backward + optimizer, after one warm-up step. What an
    upgrade's estimate multiplies by epochs and rows before anything is trained."""
    task = _builder(builder)(config)
    opt = torch.optim.AdamW(task.train.parameters(), lr=1e-4)
    task.train.train()

    def one() -> int:
        loss, n, _ = task.step(task.train, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return n

    one()
    t0 = time.perf_counter()
    rows = sum(one() for _ in range(steps))
    return rows / max(time.perf_counter() - t0, 1e-9)
