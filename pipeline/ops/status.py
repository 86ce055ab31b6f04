"""`carryover status`: the serving version, the upgrade running now (stage, shards, rows/s,
ETA, training figures, the lock's holder) and the last upgrades, read from the gallery's own
records and journal only (no Ray, MLflow or torch), so it answers in about a second."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import UpgradeConfig
from pipeline.gallery.lock import LockInfo, holder_of
from pipeline.gallery.store import Gallery
from pipeline.io.redact import redact_text
from pipeline.ops.journal import Journal
from pipeline.ops.progress import ProgressRecord, read_records
from pipeline.ops.runs import UPGRADE_KIND

RUNNING = ("RUNNING", "PENDING")


@dataclass
class LockView:
    owner: str
    purpose: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float
    expired: bool
    text: str

    @classmethod
    def of(cls, info: LockInfo) -> LockView:
        return cls(
            info.owner,
            info.purpose,
            info.host,
            info.pid,
            info.acquired_at,
            info.expires_at,
            info.expired,
            info.describe(),
        )


@dataclass
class RunView:
    """One upgrade run: its journal entry's outcome and, while it runs, its progress."""

    id: str
    kind: str
    trigger: str | None
    status: str
    target: str | None
    created_at: float | None
    ended_at: float | None = None
    message: str | None = None
    stale: str | None = None  # why a RUNNING record is not believed (its lock is gone ...)
    progress: dict[str, Any] | None = None


@dataclass
class GalleryStatus:
    """What `carryover status` prints (and `--json` dumps as it is)."""

    gallery: str
    serving: str | None
    versions: list[str]
    lock: LockView | None
    running: RunView | None
    upgrades: list[RunView] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stale_reason(host: str | None, pid: int | None, lock: LockInfo | None) -> str | None:
    """Why a run that says it is running is not: None when the lock is held by that process
    (or by someone, for a run whose process is not recorded: a cluster job)."""
    if lock is None:
        return "its lock is gone"
    if lock.expired:
        return "its lock expired"
    if host is None or pid is None:
        return None
    if (lock.host, lock.pid) != (host, pid):
        if host == socket.gethostname() and not _alive(pid):
            return f"its process {pid} is gone"
        return f"the lock is held by another process ({lock.host} pid {lock.pid})"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_view(e: dict[str, Any], lock: LockInfo | None) -> RunView:
    status = str(e.get("status") or "?")
    stale = None
    if status in RUNNING and e.get("kind") == UPGRADE_KIND:
        stale = _stale_reason(e.get("host"), e.get("pid"), lock)
    return RunView(
        id=e["id"],
        kind=str(e.get("kind")),
        trigger=e.get("trigger"),
        status=status,
        target=e.get("target"),
        created_at=e.get("created_at"),
        ended_at=e.get("ended_at"),
        message=e.get("message"),
        stale=stale,
    )


def _is_upgrade(e: dict[str, Any]) -> bool:
    return e.get("kind") == UPGRADE_KIND or (e.get("kind") == "job" and e.get("job") == "upgrade")


def _attach(runs: dict[str, RunView], rec: ProgressRecord, lock: LockInfo | None) -> RunView:
    """A progress record joined to its run (a submitted job's record may have no entry yet)."""
    run = runs.get(rec.id) or RunView(rec.id, "job", None, "RUNNING", rec.target, rec.started_at)
    run.progress = rec.to_dict()
    if run.status in RUNNING or run.stale is None:
        run.stale = _stale_reason(rec.host, rec.pid, lock)
    return run


def gallery_status(cfg: UpgradeConfig, recent: int | None = None) -> GalleryStatus:
    """The gallery's status from CURRENT, the lock, the journal and the progress records."""
    g = Gallery(cfg.gallery_uri, cfg.storage)
    info = holder_of(cfg.gallery_uri, cfg.storage)
    journal = Journal(cfg.gallery_uri, cfg.storage)
    entries = [e for e in journal.entries(limit=200) if _is_upgrade(e)]
    runs = {e["id"]: _run_view(e, info) for e in entries}
    live = None
    for rec in sorted(read_records(cfg.gallery_uri, cfg.storage), key=lambda r: r.started_at):
        run = _attach(runs, rec, info)
        runs[run.id] = run
        if run.stale is None:
            live = run
    ordered = sorted(runs.values(), key=lambda r: r.created_at or 0, reverse=True)
    n = cfg.progress.recent_upgrades if recent is None else recent
    return GalleryStatus(
        gallery=redact_text(cfg.gallery_uri),
        serving=g.current(),
        versions=g.versions(),
        lock=LockView.of(info) if info else None,
        running=live,
        upgrades=[r for r in ordered if r is not live][:n],
    )
