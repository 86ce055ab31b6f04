"""Nightly upgrades: at each cron tick, under the gallery's lock, compare the registry's
`candidate` and `serving` embedders and submit the upgrade when the candidate is newer.
Every tick (no-op, submitted, refused by the lock, failed, missed) goes into the journal."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from croniter import croniter

from pipeline.config import UpgradeConfig
from pipeline.context import Context, gallery_lock
from pipeline.gallery.lock import LockHeld
from pipeline.gallery.store import VERSION_PATTERN, space_of
from pipeline.ops import jobs
from pipeline.ops.journal import Journal, new_id

EXIT = {"noop": 0, "submitted": 0, "succeeded": 0, "failed": 1, "error": 1, "locked": 3}


@dataclass
class TickResult:
    """What one tick decided and did."""

    id: str
    at: float
    outcome: str  # noop | submitted | succeeded | failed | locked | error
    reason: str
    candidate: int | None = None
    serving: int | None = None
    job_id: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT[self.outcome]


@dataclass
class Decision:
    """Whether the candidate embedder should replace the one the gallery serves."""

    upgrade: bool
    reason: str
    registry_name: str
    candidate: Any = None  # ModelVersionInfo
    serving: Any = None
    source_model: str | None = None  # the model of the gallery's CURRENT version
    source_registry_version: int | None = None


def decide(cfg: UpgradeConfig) -> Decision:
    """Candidate newer than serving (by registry version), and the gallery serving something."""
    ctx = Context(cfg, quiet=True)
    sc, name = cfg.schedule, ctx.registry_name("embedder")
    cand = ctx.tracker.get_alias(name, sc.candidate_alias)
    serv = ctx.tracker.get_alias(name, sc.serving_alias)
    d = Decision(False, "", name, cand, serv)
    current = ctx.gallery.current()
    if cand is None:
        d.reason = f"no {name}@{sc.candidate_alias} in the registry: nothing to upgrade to"
    elif current is None:
        d.reason = f"gallery {cfg.gallery_uri} serves no version yet: ingest it first"
    elif serv is not None and cand.version <= serv.version:
        d.reason = (
            f"{name}@{sc.candidate_alias} (version {cand.version}) is not newer than "
            f"@{sc.serving_alias} (version {serv.version})"
        )
    elif "carryover.model" not in cand.tags:
        d.reason = f"{name} version {cand.version} has no carryover.model tag (its version name)"
    elif not re.fullmatch(VERSION_PATTERN, cand.tags["carryover.model"]):
        # it becomes a model directory and a gallery version: never a path like "../x"
        d.reason = (
            f"{name} version {cand.version}: carryover.model tag "
            f"{cand.tags['carryover.model']!r} is not a plain name; refused"
        )
    else:
        m = ctx.gallery.manifest(current)
        d.source_model = space_of(m, current)
        d.source_registry_version = m.get("registry_version") or (serv.version if serv else None)
        if d.source_registry_version is None:
            d.reason = f"gallery version {current!r} does not say which embedder produced it"
        else:
            d.upgrade = True
            d.reason = (
                f"{name}@{sc.candidate_alias} (version {cand.version}, "
                f"{cand.tags['carryover.model']}) is newer than the served "
                f"{d.source_model} (version {d.source_registry_version})"
            )
    return d


def upgrade_config(cfg: UpgradeConfig, d: Decision) -> UpgradeConfig:
    """The config the submitted upgrade runs with: old = the served embedder, new = the
    candidate, both pinned by registry version; the target version is the candidate's name."""
    old = cfg.old_model.model_copy(
        update={
            "name": d.source_model,
            "uri": f"models:/{d.registry_name}/{d.source_registry_version}",
        }
    )
    new = cfg.new_model.model_copy(
        update={
            "name": d.candidate.tags["carryover.model"],
            "uri": f"models:/{d.registry_name}/{d.candidate.version}",
        }
    )
    plan = cfg.plan.model_copy(update={"target_version": None})
    return cfg.model_copy(update={"old_model": old, "new_model": new, "plan": plan})


def _journal(cfg: UpgradeConfig) -> Journal:
    return Journal(cfg.gallery_uri, cfg.storage)


def _record(cfg: UpgradeConfig, r: TickResult, status: str, **extra: Any) -> None:
    _journal(cfg).put(
        {
            "kind": "tick",
            "trigger": "schedule",
            "gallery": cfg.gallery_name,
            "status": status,
            "message": r.reason,
            "created_at": r.at,
            **{k: v for k, v in asdict(r).items() if k not in ("at", "reason")},
            **extra,
        }
    )


def tick(
    cfg: UpgradeConfig,
    address: str | None,
    token_file: str | Path | None = None,
    wait: bool = True,
    env: list[str] | None = None,
    echo: Callable[[str], None] = print,
) -> TickResult:
    """One tick: lock the gallery, decide, submit (and wait, unless `wait` is False)."""
    r = TickResult(new_id("tick", cfg.gallery_name), time.time(), "error", "")
    lock = gallery_lock(cfg, f"schedule tick {r.id}", "scheduled upgrade")
    try:
        lock.acquire()
    except LockHeld as e:
        r.outcome, r.reason = "locked", f"tick refused: {e}"
        _record(cfg, r, "LOCKED")
        return r
    lock.start_heartbeat()
    handed_over = False
    try:
        d = decide(cfg)
        r.candidate = d.candidate.version if d.candidate else None
        r.serving = d.serving.version if d.serving else None
        r.reason = d.reason
        if not d.upgrade:
            r.outcome = "noop"
            _record(cfg, r, "NOOP")
            return r
        handed_over = _upgrade(cfg, r, d, address, token_file, wait, env, echo, lock.token)
        return r
    except Exception as e:
        r.outcome, r.reason = "error", f"{type(e).__name__}: {e}"
        _record(cfg, r, "FAILED")
        raise
    finally:
        if handed_over:
            lock.stop_heartbeat()
        else:
            lock.release()  # a no-op when the finished job already released it


def _upgrade(
    cfg: UpgradeConfig,
    r: TickResult,
    d: Decision,
    address: str | None,
    token_file: str | Path | None,
    wait: bool,
    env: list[str] | None,
    echo: Callable[[str], None],
    lock_token: str,
) -> bool:
    """Run the upgrade job here, or submit it (and wait, unless `wait` is False), recording
    the tick in `r`; True when the job has adopted the lease (we stop renewing it)."""
    up = upgrade_config(cfg, d)
    echo(f"tick {r.id}: {d.reason}: upgrading {cfg.gallery_name} to {up.target_version}")
    if address is None:
        sub = jobs.run_here(up, cfg.schedule.job, [], env, "schedule", lock_token)
        r.job_id, final = sub.id, sub.status
    else:
        job = cfg.schedule.job
        sub = jobs.submit(up, address, job, [], env, token_file, "schedule", lock_token)
        r.job_id, r.outcome = sub.id, "submitted"
        _record(cfg, r, "SUBMITTED", target=up.target_version)
        if not wait:
            return True
        final = jobs.wait(
            sub.id, address, token_file, _journal(cfg), poll=cfg.schedule.poll_seconds
        )["status"]
    r.outcome = "succeeded" if final == "SUCCEEDED" else "failed"
    r.reason += f"; job {sub.id} {final}"
    _record(cfg, r, final, target=up.target_version)
    return False


def missed_since(cron: str, last: float | None, now: float) -> list[float]:
    """Scheduled times after the last tick that no tick served (all but the newest)."""
    if last is None:
        return []
    it, times = croniter(cron, last), []
    while (t := it.get_next(float)) <= now and len(times) < 1000:
        times.append(t)
    return times[:-1]


def _record_missed(cfg: UpgradeConfig, times: list[float], why: str) -> None:
    if not times:
        return
    fmt = "%Y-%m-%d %H:%M UTC"
    span = time.strftime(fmt, time.gmtime(times[0]))
    if len(times) > 1:
        span += f" … {time.strftime(fmt, time.gmtime(times[-1]))}"
    r = TickResult(new_id("missed", cfg.gallery_name), times[-1], "noop", "")
    r.reason = f"{len(times)} tick(s) missed ({span}): {why}"
    _record(cfg, r, "MISSED", missed=len(times))


def last_tick(cfg: UpgradeConfig) -> float | None:
    ticks = _journal(cfg).entries(limit=200, kind="tick")
    ticks = [e for e in ticks if e.get("status") != "MISSED"]
    return ticks[0]["created_at"] if ticks else None


def run_schedule(
    cfg: UpgradeConfig,
    address: str | None,
    token_file: str | Path | None = None,
    once: bool = False,
    wait: bool = True,
    env: list[str] | None = None,
    echo: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> TickResult | None:
    """`once`: record the ticks missed since the last one, then tick now. Otherwise tick at
    every cron time until `stop` is set; a tick that starts later than the misfire grace
    (the machine slept, or the previous tick ran long) is recorded as missed, not run."""
    cron, grace = cfg.schedule.cron, cfg.schedule.misfire_grace_seconds
    stop = stop or threading.Event()
    if once:
        _record_missed(cfg, missed_since(cron, last_tick(cfg), time.time()), "no scheduler ran")
        return tick(cfg, address, token_file, wait, env, echo)
    it, result = croniter(cron, time.time()), None
    while not stop.is_set():
        due = it.get_next(float)
        echo(f"next tick {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(due))}")
        while not stop.is_set() and time.time() < due:
            stop.wait(min(60.0, max(0.0, due - time.time())))
        if stop.is_set():
            break
        late = time.time() - due
        if late > grace:
            _record_missed(cfg, [due], f"started {late:.0f}s late (grace {grace:.0f}s)")
            continue
        try:
            result = tick(cfg, address, token_file, wait, env, echo)
            echo(f"tick {result.id}: {result.outcome}: {result.reason}")
        except Exception as e:  # journalled by tick(); the scheduler keeps going
            echo(f"tick failed: {type(e).__name__}: {e}")
    return result
