"""A running upgrade's progress, as `carryover status` reads it: one small record per run
under `GALLERY/_jobs/_progress/<id>.json`, rewritten atomically at most about once a second.

The stage engine, the shard loops and the training driver report to the writer that
`activate` made current; with none active (a unit test, `carryover train`) reports go nowhere.
Writes are best effort: a storage hiccup never fails the upgrade it describes."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import StorageConfig
from pipeline.io import uri as uri_io
from pipeline.ops.journal import JOURNAL_DIR, check_job_id

PROGRESS_DIR = "_progress"
log = logging.getLogger(__name__)


@dataclass
class TrainingProgress:
    """Where a training stage is: epoch (0-based, in progress), step within it, last loss."""

    model: str
    epoch: int
    epochs: int
    step: int = 0
    steps: int | None = None  # steps per epoch, once known (after the first epoch)
    loss: float | None = None
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float:
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.epoch + min(within, 1.0)) / max(self.epochs, 1))

    @property
    def eta_s(self) -> float | None:
        f = self.fraction
        return round(self.elapsed_s * (1 - f) / f, 1) if f > 0 else None


@dataclass
class ProgressRecord:
    """One run's progress as stored: the stage it is in and its figures."""

    id: str
    gallery: str
    target: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    status: str = "RUNNING"
    stage: str | None = None
    stage_started_at: float | None = None
    stages_done: list[str] = field(default_factory=list)
    shards_done: int | None = None
    shards_total: int | None = None
    rows: int | None = None
    rows_per_s: float | None = None
    eta_s: float | None = None
    training: TrainingProgress | None = None
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.training is not None:
            d["training"]["eta_s"] = self.training.eta_s
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProgressRecord:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        t = known.get("training")
        if isinstance(t, dict):
            tf = TrainingProgress.__dataclass_fields__
            known["training"] = TrainingProgress(**{k: v for k, v in t.items() if k in tf})
        return cls(**known)


def progress_dir(gallery_uri: str) -> str:
    return uri_io.join(gallery_uri, JOURNAL_DIR, PROGRESS_DIR)


def progress_uri(gallery_uri: str, run_id: str) -> str:
    return uri_io.join(progress_dir(gallery_uri), f"{check_job_id(run_id)}.json")


def read_records(gallery_uri: str, storage: StorageConfig | None = None) -> list[ProgressRecord]:
    """Every progress record under the gallery (running runs, and runs that died running)."""
    out = []
    for name in uri_io.list_dir(progress_dir(gallery_uri), storage):
        if not name.endswith(".json"):
            continue
        try:
            d = uri_io.read_json(uri_io.join(progress_dir(gallery_uri), name), storage)
            out.append(ProgressRecord.from_dict(d))
        except (FileNotFoundError, ValueError, TypeError):
            continue  # finished (removed) meanwhile, or not one of ours
    return out


class ProgressWriter:
    """Keeps one run's record and writes it: at once on a stage change, else throttled."""

    def __init__(
        self,
        record: ProgressRecord,
        gallery_uri: str,
        storage: StorageConfig | None = None,
        interval_s: float = 1.0,
        quiet: bool = True,
        train_poll_s: float = 0.5,
    ) -> None:
        self.record, self.storage, self.interval = record, storage, interval_s
        self.uri = progress_uri(gallery_uri, record.id)
        self.quiet = quiet  # whether the terminal gets progress bars
        self.train_poll_s = train_poll_s  # how often the driver reads training's figures
        self._lock = threading.Lock()
        self._written = 0.0
        self._stage_shards0 = 0

    def stage(self, name: str) -> None:
        """A stage starts: its figures start empty."""
        with self._lock:
            r = self.record
            r.stage, r.stage_started_at = name, time.time()
            r.shards_done = r.shards_total = r.rows = r.rows_per_s = r.eta_s = None
            r.training = None
        self.flush(force=True)

    def stage_done(self, name: str) -> None:
        with self._lock:
            if name not in self.record.stages_done:
                self.record.stages_done.append(name)
        self.flush(force=True)

    def shards(self, done: int, total: int, rows: int, rows_per_s: float) -> None:
        """Shards done of the stage's total (including those committed by earlier runs)."""
        with self._lock:
            r = self.record
            if r.shards_done is None:
                self._stage_shards0 = done
            r.shards_done, r.shards_total, r.rows = done, total, rows
            r.rows_per_s = round(rows_per_s, 1)
            here = done - self._stage_shards0
            secs = time.time() - (r.stage_started_at or time.time())
            r.eta_s = round((total - done) * secs / here, 1) if here > 0 else None
        self.flush()

    def training(self, t: TrainingProgress) -> None:
        with self._lock:
            self.record.training = t
            self.record.eta_s = t.eta_s
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._written < self.interval:
                return
            self._written = now
            self.record.updated_at = time.time()
            data = self.record.to_dict()
        try:
            uri_io.write_json(self.uri, data, self.storage)
        except Exception as e:  # best effort: the upgrade matters more than its progress
            log.warning("progress record %s not written: %s", self.uri, e)

    def remove(self) -> None:
        """The run ended: its outcome lives in the journal; the record goes."""
        try:
            uri_io.delete(self.uri, self.storage)
        except Exception as e:
            log.warning("progress record %s not removed: %s", self.uri, e)


class _Nowhere(ProgressWriter):
    """Reports with no run to describe: dropped; no bars (nothing set up a terminal)."""

    def __init__(self) -> None:  # no record, no storage
        self.quiet, self.train_poll_s = True, 0.5

    def stage(self, name: str) -> None: ...
    def stage_done(self, name: str) -> None: ...
    def shards(self, done: int, total: int, rows: int, rows_per_s: float) -> None: ...
    def training(self, t: TrainingProgress) -> None: ...
    def flush(self, force: bool = False) -> None: ...
    def remove(self) -> None: ...


_NOWHERE = _Nowhere()
_active: ProgressWriter = _NOWHERE


def active() -> ProgressWriter:
    """The writer of the run in progress in this process (a no-op one when none)."""
    return _active


@contextlib.contextmanager
def activate(writer: ProgressWriter) -> Iterator[ProgressWriter]:
    global _active
    before, _active = _active, writer
    try:
        yield writer
    finally:
        _active = before
