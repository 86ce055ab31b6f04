"""Benchmark section "training": Ray Train steps/s of the embedder's real loop, 1 vs N workers.

What runs: `pipeline.train.loop.fit` (the real TorchTrainer, `worker_loop`, DDP, AdamW) with
the embedder task of `pipeline.train.embedder.build_task`, on a small materialised dataset of
decoded 16x16 single-channel images (`pixels`, `label`: the columns `training_batch` yields),
pulled into each worker once (`in_memory`, as `train_embedder` does for small data). The
global batch is fixed (`batch_size`, split evenly over the workers), so steps/s of N workers
over 1 worker is the speed-up of the same training. Timing covers the loop only: the task's
step is wrapped to sum the seconds between consecutive steps of the last epoch (the first
epoch warms up; the gap across an epoch boundary is not counted), and the loop reports those
sums with its own metrics. Ray start-up, dataset transfer and checkpointing are excluded.

On a GPU cluster (the settings docs/benchmarks.md quotes), per model being trained, e.g.
`new_model.train.*`:

- `new_model.train.use_gpu=true`: each Ray Train worker takes one GPU; the loop moves the
  model and batches to it (`ray.train.torch.prepare_model` / `get_device`).
- `new_model.train.num_workers` = the number of GPUs to train on (one worker per GPU, DDP).
- `new_model.train.cpus_per_worker` = the CPUs per GPU on the node, e.g. 4-8: it reserves
  them for the worker and sets its torch threads; keep some CPUs free on each node for Ray
  Data (decode) tasks.
- `new_model.train.batch_size` is per worker: the global batch is batch_size x num_workers.
  Raise it until the GPU is busy (e.g. 512-1024 for these small backbones) and scale `lr`
  with the global batch.
- `new_model.train.cache_max_bytes`: keep the decoded training split in the object store
  when it fits, so epochs do not decode again.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.data
from torch import nn

from pipeline.bench.common import Figure, stopwatch
from pipeline.config import ModelConfig, TrainConfig
from pipeline.runtime import ensure_ray
from pipeline.train.embedder import build_task
from pipeline.train.loop import Task, fit

SECTION = "training"
_EPOCHS = 2  # epoch 0 warms up (caches the shard, allocator, DDP buckets); epoch 1 is timed
_SIDE = 16


def timed_task(config: dict[str, Any]) -> Task:
    """The embedder task, its step also returning the seconds since the previous step.

    Between two step calls the loop runs one whole iteration (forward, backward, optimizer,
    next batch). The loop divides per-epoch sums by the epoch's rows before reporting; the
    caller multiplies back by `rows`.
    """
    task = build_task(config)
    per_epoch = int(config["bench_steps_per_epoch"])
    inner = task.step
    state = {"calls": 0, "last": 0.0}

    def step(model: nn.Module, batch: dict[str, Any]):
        now = time.perf_counter()
        first = state["calls"] % per_epoch == 0  # the gap before it spans an epoch boundary
        state["calls"] += 1
        loss, n, sums = inner(model, batch)
        if not first:
            sums = {**sums, "bench_seconds": now - state["last"], "bench_steps": 1.0}
        state["last"] = now
        return loss, n, sums

    return Task(save=task.save, train=task.train, step=step)


def _dataset(rows: int, classes: int, seed: int):
    """Decoded-looking images: a class-dependent pattern plus noise, normalised like
    PreprocessConfig's defaults, flattened as `training_batch` returns them."""
    rng = np.random.default_rng(seed)
    pattern = rng.standard_normal((classes, _SIDE * _SIDE), dtype=np.float32)
    label = rng.integers(0, classes, rows)
    pixels = 0.5 * pattern[label] + rng.standard_normal((rows, _SIDE * _SIDE), dtype=np.float32)
    items = [{"pixels": p, "label": int(y)} for p, y in zip(pixels, label, strict=True)]
    return ray.data.from_items(items).materialize()


def _steps_per_second(workers: int, steps: int, batch_size: int, cpus: float, seed: int):
    """(steps/s, loop seconds, fit wall seconds, per-worker batch) of one fit: `workers`
    workers of `cpus` CPUs (and torch threads) each."""
    per_worker = max(1, batch_size // workers)
    rows = (steps + 1) * per_worker * workers  # steps+1 per epoch: `steps` gaps are timed
    tc = TrainConfig(
        epochs=_EPOCHS,
        batch_size=per_worker,
        num_workers=workers,
        cpus_per_worker=cpus,
        reports=1,
        seed=seed,
    )
    cfg = ModelConfig(name="bench", train=tc)
    ds = _dataset(rows, cfg.architecture.num_classes, seed)
    config = {"model": cfg.model_dump(mode="json"), "bct": None, "bench_steps_per_epoch": steps + 1}
    with tempfile.TemporaryDirectory() as results, stopwatch() as wall:
        _, m = fit(
            "pipeline.bench.training:timed_task",
            config,
            ds,
            tc,
            f"bench-train-{workers}w",
            results,
            in_memory=True,
        )
    loop_s = m["bench_seconds"] * m["rows"]
    timed = round(m["bench_steps"] * m["rows"])
    if timed != steps:
        raise RuntimeError(f"{workers} workers: timed {timed} steps, expected {steps}")
    return steps / loop_s, loop_s, wall(), per_worker


def run_training(
    workers: tuple[int, ...] = (1, 2),
    steps: int = 30,
    batch_size: int = 128,
    seed: int = 0,
    cpus_per_worker: float = TrainConfig().cpus_per_worker,
) -> list[Figure]:
    """Steps/s of the embedder's Ray Train loop per worker count, on CPU, same global batch.

    Each worker gets `cpus_per_worker` (TrainConfig's default: 1 CPU, 1 torch thread), so
    N workers use N times the CPUs of one: the question is whether a second worker on the
    machine's second core pays off, as the pipeline is configured."""
    ensure_ray()
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if max(workers) * cpus_per_worker > cpus:  # Ray Train would wait for them forever
        raise ValueError(
            f"{max(workers)} workers x {cpus_per_worker:g} CPUs need more than the "
            f"{cpus:g} CPUs of this Ray cluster"
        )
    figures, rate = [], {}
    for n in workers:
        sps, loop_s, wall_s, per_worker = _steps_per_second(
            n, steps, batch_size, cpus_per_worker, seed
        )
        rate[n] = sps
        figures.append(_worker_figure(n, sps, loop_s, wall_s, per_worker, steps, cpus_per_worker))
    if 1 in rate and len(rate) > 1:
        figures.append(_speed_up_figure(rate, cpus, cpus_per_worker))
    return figures


def _worker_figure(
    n: int,
    sps: float,
    loop_s: float,
    wall_s: float,
    per_worker: int,
    steps: int,
    cpus_per_worker: float,
) -> Figure:
    return Figure(
        SECTION,
        f"steps/s ({n} worker{'s' if n > 1 else ''})",
        sps,
        "steps/s",
        note=f"real fit() + embedder task (default ResNet-style net, 16x16x1), CPU, "
        f"{n} x {cpus_per_worker:g} CPU, global batch {per_worker * n} "
        f"({per_worker}/worker), {steps} timed steps of the warm epoch",
        extra={
            "workers": n,
            "cpus_per_worker": cpus_per_worker,
            "batch_per_worker": per_worker,
            "global_batch": per_worker * n,
            "timed_steps": steps,
            "loop_seconds": loop_s,
            "fit_wall_seconds": wall_s,
            "rows_per_second": sps * per_worker * n,
        },
    )


def _speed_up_figure(rate: dict[int, float], cpus: float, cpus_per_worker: float) -> Figure:
    top = max(rate)
    return Figure(
        SECTION,
        f"steps/s ({top} workers vs 1)",
        rate[top],
        "steps/s",
        baseline="1 worker",
        baseline_value=rate[1],
        note=f"same global batch, so the ratio is the speed-up; {cpus_per_worker:g} "
        f"CPU per worker: {top} workers take {top * cpus_per_worker:g} of the "
        f"{cpus:g} CPUs, sharing them with Ray's own processes and the driver, "
        f"and add DDP's all-reduce",
        extra={"cpus": cpus, "cpus_per_worker": cpus_per_worker},
    )
