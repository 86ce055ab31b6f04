"""An upgrade run in the gallery's journal: a direct `carryover upgrade` gets an entry (kind
upgrade, trigger direct) that goes RUNNING → SUCCEEDED / FAILED / STOPPED whatever ends it;
a submitted job keeps its own entry (`jobs.submit`). Both write a progress record meanwhile."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from pipeline.config import UpgradeConfig
from pipeline.io.redact import redact_text
from pipeline.ops.journal import JOB_ID_ENV, Journal, new_id
from pipeline.ops.progress import ProgressRecord, ProgressWriter, activate

UPGRADE_KIND = "upgrade"


def _outcome(e: BaseException | None) -> tuple[str, str | None]:
    if e is None:
        return "SUCCEEDED", None
    if isinstance(e, KeyboardInterrupt):
        return "STOPPED", "interrupted (Ctrl-C)"
    if isinstance(e, SystemExit):
        return ("SUCCEEDED", None) if not e.code else ("STOPPED", f"exit {e.code}")
    lines = str(e).strip().splitlines()
    return "FAILED", redact_text(f"{type(e).__name__}: {lines[0] if lines else ''}".strip())


def _entry(cfg: UpgradeConfig, run_id: str, owner: str) -> dict[str, Any]:
    return {
        "id": run_id,
        "kind": UPGRADE_KIND,
        "trigger": "direct",
        "gallery": cfg.gallery_name,
        "target": cfg.target_version,
        "status": "RUNNING",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "lock_owner": owner,
        "created_at": time.time(),
    }


@contextlib.contextmanager
def journalled_upgrade(
    cfg: UpgradeConfig, owner: str, quiet: bool = False
) -> Iterator[ProgressWriter]:
    """Around an upgrade holding the gallery's lock: its journal entry (direct runs) and its
    progress record, made current for the stages to report to."""
    job_id = os.environ.get(JOB_ID_ENV)
    run_id = job_id or new_id(UPGRADE_KIND, cfg.gallery_name)
    journal = Journal(cfg.gallery_uri, cfg.storage)
    if job_id is None:
        journal.put(_entry(cfg, run_id, owner))
    record = ProgressRecord(run_id, redact_text(cfg.gallery_uri), cfg.target_version)
    pc = cfg.progress
    writer = ProgressWriter(
        record,
        cfg.gallery_uri,
        cfg.storage,
        pc.write_interval_seconds,
        quiet,
        pc.train_poll_seconds,
    )
    writer.flush(force=True)
    failure: BaseException | None = None
    try:
        with activate(writer):
            yield writer
    except BaseException as e:
        failure = e
        raise
    finally:
        status, message = _outcome(failure)
        if job_id is None:
            journal.update(
                run_id,
                status=status,
                message=message,
                ended_at=time.time(),
                stages_done=record.stages_done,
                last_stage=record.stage,
            )
        writer.remove()
