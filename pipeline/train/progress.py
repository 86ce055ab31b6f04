"""Training progress from Ray Train's rank-0 worker to the driver: the worker puts its epoch,
step and loss on a named 0-CPU actor (fire and forget, throttled); the driver polls it, draws a
progress bar with an ETA and hands the figures to the run's progress record."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

from pipeline.display import training_progress
from pipeline.ops import progress as run_progress
from pipeline.ops.progress import TrainingProgress

PUT_EVERY_S = 0.5  # a worker's puts at most this often (each is one small actor call)


class _Board:
    """The actor: the latest figures rank 0 put (the driver reads, never waits on workers)."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None

    def put(self, figures: dict[str, Any]) -> None:
        self.latest = figures

    def get(self) -> dict[str, Any] | None:
        return self.latest


class WorkerReporter:
    """In a worker: rank 0 puts its figures on the board; other ranks and runs without a
    board (a bare `fit`) do nothing. A lost board never stops training."""

    def __init__(self, board: str | None, rank: int, epochs: int) -> None:
        self.epochs, self.actor, self._last = epochs, None, 0.0
        self.steps: int | None = None
        if board and rank == 0:
            # start-up: ray (~0.4 s); the module is imported where nothing trains
            import ray

            with contextlib.suppress(ValueError):
                self.actor = ray.get_actor(board)

    def step(self, epoch: int, step: int, loss: float, force: bool = False) -> None:
        now = time.monotonic()
        if self.actor is None or (not force and now - self._last < PUT_EVERY_S):
            return
        self._last = now
        figures = {"epoch": epoch, "epochs": self.epochs, "step": step, "steps": self.steps}
        with contextlib.suppress(Exception):
            self.actor.put.remote({**figures, "loss": float(loss)})

    def epoch_done(self, epoch: int, steps: int, loss: float) -> None:
        self.steps = steps  # the next epochs' step count (a streamed epoch's is known after)
        self.step(epoch, steps, loss, force=True)


def _label(run_name: str) -> str:
    """`train-v2-<hash>` → `train-v2`."""
    head, _, tail = run_name.rpartition("-")
    return head if head and len(tail) >= 8 else run_name


@contextlib.contextmanager
def watch_training(run_name: str, epochs: int) -> Iterator[str | None]:
    """Around `trainer.fit()`: the board's name for the workers; a bar while it trains."""
    # start-up: ray (~0.4 s); only training pays it
    import ray

    if not ray.is_initialized():
        yield None
        return
    writer = run_progress.active()
    poll_s = writer.train_poll_s
    name = f"carryover-progress-{secrets.token_hex(6)}"
    board = ray.remote(num_cpus=0)(_Board).options(name=name).remote()
    label = _label(run_name)
    bar = training_progress(label, epochs, writer.quiet)
    stop = threading.Event()
    t0 = time.monotonic()

    def poll() -> None:
        while not stop.wait(poll_s):
            with contextlib.suppress(Exception):
                got = ray.get(board.get.remote(), timeout=max(poll_s * 4, 2.0))
                if got:
                    t = TrainingProgress(model=label, elapsed_s=time.monotonic() - t0, **got)
                    bar.update(bar.task_ids[0], completed=t.fraction * epochs, **_fields(t))
                    writer.training(t)

    thread = threading.Thread(target=poll, name="training-progress", daemon=True)
    try:
        with bar:
            thread.start()
            yield name
            bar.update(bar.task_ids[0], completed=epochs, epoch=epochs)
    finally:
        stop.set()
        thread.join(timeout=poll_s * 4 + 5)
        with contextlib.suppress(Exception):
            ray.kill(board)


def _fields(t: TrainingProgress) -> dict[str, Any]:
    return {
        "epoch": min(t.epoch + 1, t.epochs),
        "step": f"{t.step}/{t.steps}" if t.steps else str(t.step),
        "loss": f"{t.loss:.4f}" if t.loss is not None else "-",
    }
