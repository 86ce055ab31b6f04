"""The gallery lock (local disk and a real S3 endpoint), the job journal, schedule decisions
against a real SQLite MLflow registry, and what travels with a submitted job."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import yaml
from croniter import croniter

from pipeline.config import ConfigError, StorageConfig, load_config
from pipeline.context import Context
from pipeline.gallery.lock import GalleryLock, LockHeld, LockLost, break_lock, holder_of
from pipeline.gallery.store import Gallery
from pipeline.ops import jobs
from pipeline.ops.journal import Journal
from pipeline.ops.schedule import decide, missed_since, upgrade_config
from pipeline.upgrade.work import id_ranges as _id_ranges

# Generous on purpose: these wait on events, and only a very loaded machine takes long.
WAIT_S = 120.0


def _race(uri: str, n: int, q, done=None) -> None:
    try:
        GalleryLock(uri, ttl_seconds=60, owner=f"p{n}").acquire()
        q.put(n)
    except LockHeld:
        q.put(-1)
    if done is not None:
        done.wait(30)  # stay alive: a dead holder's lease on this host may be taken over


def _lock_semantics(uri: str, storage: StorageConfig | None) -> None:
    a = GalleryLock(uri, storage, ttl_seconds=30, owner="a", purpose="upgrade to v2")
    info = a.acquire()
    assert info.owner == "a" and info.token == a.token and not info.expired
    with pytest.raises(LockHeld, match=r"locked by a \(upgrade to v2\) on .* since .*expires"):
        GalleryLock(uri, storage, owner="b").acquire()
    # a submitted job adopts the lease with the submitter's token, keeping its start time
    job = GalleryLock(uri, storage, ttl_seconds=30, owner="job", token=a.token)
    adopted = job.acquire()
    assert adopted.owner == "job" and adopted.acquired_at == info.acquired_at
    a.renew()  # co-holders with the same token both renew
    assert holder_of(uri, storage).owner == "a"
    assert job.release() and holder_of(uri, storage) is None
    assert not a.release()  # already gone: nothing to do
    with pytest.raises(LockLost):
        a.renew()
    # an expired lease is taken over; its old holder learns it lost it
    old = GalleryLock(uri, storage, ttl_seconds=0.2, owner="crashed")
    old.acquire()
    time.sleep(0.3)
    new = GalleryLock(uri, storage, ttl_seconds=30, owner="next")
    assert new.acquire().owner == "next"
    with pytest.raises(LockLost, match="now: next"):
        old.renew()
    assert break_lock(uri, storage).owner == "next" and holder_of(uri, storage) is None


def test_lock_on_local_disk(tmp_path: Path) -> None:
    _lock_semantics(str(tmp_path / "gallery"), None)


@pytest.mark.slow
def test_lock_on_s3_conditional_writes(s3_server) -> None:
    storage = StorageConfig(endpoint_url=s3_server.endpoint_url)
    _lock_semantics(s3_server.uri("locktest", "gallery"), storage)


def test_lock_race_has_one_winner(tmp_path: Path) -> None:
    uri = str(tmp_path / "gallery")
    ctx = mp.get_context("fork")
    q, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(uri, i, q, done)) for i in range(6)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=WAIT_S) for _ in procs)
    assert holder_of(uri).owner == f"p{got[-1]}"
    done.set()
    for p in procs:
        p.join(30)
    assert got.count(-1) == 5 and got[-1] >= 0


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    uri = str(tmp_path / "gallery")
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_race, args=(uri, 0, ctx.Queue()))
    p.start()
    p.join(30)  # it took the lease (TTL 60 s) and exited without releasing it
    assert holder_of(uri).owner == "p0" and not holder_of(uri).expired
    assert GalleryLock(uri, owner="resumer").acquire().owner == "resumer"


def test_heartbeat_keeps_the_lease(tmp_path: Path) -> None:
    uri = str(tmp_path / "gallery")
    # A TTL far above any scheduling stall of a loaded machine; the heartbeat renews every
    # third of it. Waits on the renewal record itself, not on the clock.
    with GalleryLock(uri, ttl_seconds=6, owner="long") as lock:
        first = holder_of(uri).expires_at
        deadline = time.monotonic() + WAIT_S
        while holder_of(uri).expires_at <= first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder_of(uri).expires_at > first and lock.lost is None
        with pytest.raises(LockHeld):
            GalleryLock(uri, owner="other").acquire()
    assert holder_of(uri) is None


def test_journal_orders_and_updates(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "g"))
    j.put({"id": "tick-1", "kind": "tick", "status": "NOOP", "created_at": 1.0})
    j.put({"id": "job-2", "kind": "job", "status": "PENDING", "created_at": 2.0})
    j.update("job-2", status="SUCCEEDED")
    assert [e["id"] for e in j.entries()] == ["job-2", "tick-1"]
    assert j.get("job-2")["status"] == "SUCCEEDED" and j.entries(kind="tick")[0]["id"] == "tick-1"
    j.write_log("job-2", "line 1\nline 2\n")
    assert j.read_log("job-2") == "line 1\nline 2\n" and j.read_log("tick-1") is None


def test_missed_ticks() -> None:
    day = 24 * 3600.0
    t0 = croniter("0 2 * * *", 0).get_next(float)  # 1970-01-01 02:00 UTC
    assert missed_since("0 2 * * *", None, t0 + 10 * day) == []
    assert missed_since("0 2 * * *", t0, t0 + day + 60) == []  # today's tick is this one
    missed = missed_since("0 2 * * *", t0, t0 + 3 * day + 60)
    assert missed == [t0 + day, t0 + 2 * day]


def test_bad_cron_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"schedule.cron: .*'0 25 \* \* \*' is not a 5-field"):
        load_config(None, ["schedule.cron=0 25 * * *"])
    with pytest.raises(ConfigError, match="schedule.cron"):
        load_config(None, ["schedule.cron=@nightly please"])


def test_job_config_is_absolute_and_has_no_secrets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "workdir=rel/wd",
            "images=s3://bucket/images",
            "storage.access_key_id=AKIAXXXX",
            "storage.secret_access_key=very-secret",
            "new_model.uri=models:/g-embedder@candidate",
        ],
    )
    data = jobs.job_config(cfg)
    assert (
        data["workdir"] == str(tmp_path / "rel" / "wd") and data["images"] == "s3://bucket/images"
    )
    assert data["storage"]["access_key_id"] is None and data["storage"]["secret_access_key"] is None
    assert data["new_model"]["uri"] == "models:/g-embedder@candidate"
    assert "very-secret" not in json.dumps(data)
    bundle = jobs.make_bundle(cfg, "upgrade", tmp_path / "bundle")
    assert (bundle / "jobs" / "upgrade.py").is_file() and (
        bundle / "pipeline" / "cli" / "commands.py"
    ).is_file()
    assert not list(bundle.rglob("__pycache__"))
    again = load_config(bundle / "config.yaml")  # the job can load what travels
    assert again.workdir == data["workdir"] and again.storage.secret_access_key is None
    with pytest.raises(ConfigError, match=r"--job 'nope'.*choose one of \[.*'upgrade'"):
        jobs.make_bundle(cfg, "nope", tmp_path / "b2")


def test_env_and_token_sources(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FORWARD_ME", "v1")
    env = jobs._env(["A=1", "FORWARD_ME"], "tok", "job-1")
    assert env["A"] == "1" and env["FORWARD_ME"] == "v1" and env["CARRYOVER_LOCK_TOKEN"] == "tok"
    assert env["CARRYOVER_JOB_ID"] == "job-1"
    with pytest.raises(ConfigError, match="--env NOT_SET_HERE: not set"):
        jobs._env(["NOT_SET_HERE"], None, "j")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        jobs._env(["1BAD=x"], None, "j")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert jobs.find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.find_token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert jobs.find_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.find_token() == "from-env"
    (tmp_path / "f").write_text("from-file")
    assert jobs.find_token(tmp_path / "f") == "from-file"  # an explicit file wins
    with pytest.raises(ConfigError, match="--token-file .*missing: no such file"):
        jobs.find_token(tmp_path / "missing")
    with pytest.raises(ConfigError, match="expected the Ray dashboard's job API"):
        jobs.connect("127.0.0.1:8265")


def test_unreachable_job_api_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(jobs.JobsError, match=rf"cannot reach Ray's job API at .*:{port}"):
        jobs.connect(f"http://127.0.0.1:{port}")


def test_shard_id_ranges() -> None:
    assert _id_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _id_ranges([3]) == "3" and _id_ranges([]) == ""


def _register(ctx: Context, tmp_path: Path, model: str, aliases: list[str]) -> int:
    d = tmp_path / "models" / model
    d.mkdir(parents=True)
    (d / "model.json").write_text(json.dumps({"format": "carryover-model/1", "name": model}))
    with ctx.tracker.run(f"train-{model}") as run:
        return ctx.tracker.register_model(
            ctx.registry_name("embedder"),
            d,
            run.run_id,
            tags=ctx.tags(model=model),
            aliases=aliases,
        )


def _serve(g: Gallery, version: str, model: str, registry_version: int) -> None:
    meta = {"model": model, "registry_version": registry_version}
    g.finalize(version, meta)
    g.promote(version)


def test_schedule_decides_from_the_registry(tmp_path: Path) -> None:
    cfg = load_config(None, [f"workdir={tmp_path}", "gallery_name=sched", "plan.target_version=x"])
    ctx = Context(cfg, quiet=True)
    d = decide(cfg)
    assert not d.upgrade and "no sched-embedder@candidate" in d.reason
    v1 = _register(ctx, tmp_path, "v1", ["candidate", "serving"])
    d = decide(cfg)
    assert not d.upgrade and "serves no version yet" in d.reason
    _serve(ctx.gallery, "v1", "v1", v1)
    d = decide(cfg)
    assert not d.upgrade and "(version 1) is not newer than @serving (version 1)" in d.reason
    v2 = _register(ctx, tmp_path, "v2", ["candidate"])
    d = decide(cfg)
    assert d.upgrade and d.source_model == "v1" and d.candidate.version == v2
    up = upgrade_config(cfg, d)
    assert up.old_model.uri == "models:/sched-embedder/1" and up.old_model.name == "v1"
    assert up.new_model.uri == "models:/sched-embedder/2" and up.new_model.name == "v2"
    assert up.target_version == "v2"  # the candidate's name, not a fixed plan.target_version
    assert yaml.safe_load(yaml.safe_dump(jobs.job_config(up)))["new_model"]["name"] == "v2"


def test_once_journals_missed_ticks_then_a_noop(tmp_path: Path) -> None:
    from pipeline.ops.schedule import run_schedule

    cfg = load_config(None, [f"workdir={tmp_path}", "gallery_name=miss"])
    j = Journal(cfg.gallery_uri)
    three_days_ago = time.time() - 3 * 24 * 3600 - 60
    j.put({"id": "tick-old", "kind": "tick", "status": "NOOP", "created_at": three_days_ago})
    r = run_schedule(cfg, None, once=True, echo=lambda _: None)
    assert r.outcome == "noop" and r.exit_code == 0 and "no miss-embedder@candidate" in r.reason
    ticks = j.entries(kind="tick")
    assert [t["status"] for t in ticks] == ["NOOP", "MISSED", "NOOP"]
    missed = ticks[1]
    assert missed["missed"] == 2 and "2 tick(s) missed" in missed["message"]
    assert holder_of(cfg.gallery_uri) is None  # the tick released the lock


@pytest.mark.slow
def test_submit_without_address_runs_here_and_journals(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    }
    sets = ["--set", f"workdir={tmp_path}", "--set", "gallery_name=local"]
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", *sets],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 1, (
        out.stdout + out.stderr
    )  # no images: the job fails (exit 2), clearly
    text = " ".join(out.stdout.split())  # rich may wrap long lines
    assert "error: no such file or directory:" in text and "local job local-local-" in text
    (entry,) = Journal(str(tmp_path / "gallery")).entries()
    assert entry["status"] == "FAILED" and entry["exit_code"] == 2 and entry["trigger"] == "manual"
    logs = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "jobs", "logs", entry["id"], *sets],
        capture_output=True,
        text=True,
        env=env,
    )
    assert logs.returncode == 0 and "no such file or directory" in " ".join(logs.stdout.split())
