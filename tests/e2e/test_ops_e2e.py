"""Operations on a real Ray head (`ray start --head`, token auth): `carryover submit` of an
upgrade, `carryover jobs`, nightly ticks around a moved `candidate` alias with the gallery
lock refusing a concurrent tick, and lineage from MLflow and the manifests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.context import Context
from pipeline.data.prepare import prepare
from pipeline.gallery.lock import holder_of
from tests.e2e.test_upgrade_e2e import TINY

pytestmark = pytest.mark.slow
FAST = [
    *TINY,
    "gallery_name=ops",
    "side_info.enabled=false",
    "adapters.kinds=[procrustes]",
    "evaluate.orderings=[uncertainty]",
    "old_model.train.epochs=1",
    "new_model.train.epochs=2",
    "transformation.train.epochs=2",
    "schedule.poll_seconds=1",
]


def _carryover(*args: str, env: dict | None = None, timeout: float = 900):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _flags(wd: Path, *extra: str) -> list[str]:
    return [a for s in [*FAST, f"workdir={wd}", *extra] for a in ("--set", s)]


@pytest.fixture(scope="module")
def submitted(ray_head, tmp_path_factory) -> dict:
    """A demo-sized upgrade (v1 ingest → planned v2) submitted to the head and finished."""
    wd = tmp_path_factory.mktemp("ops")
    cfg = load_config(None, [*FAST, f"workdir={wd}"])
    prepare("digits", cfg.images_uri, 4, cfg.storage, cfg.data, limit=400)
    head = ["--address", ray_head.address, "--token-file", str(ray_head.token_file)]
    sub = _carryover("submit", *head, *_flags(wd))
    assert sub.returncode == 0, sub.stderr + sub.stdout
    job_id = sub.stdout.strip().splitlines()[-1]
    assert job_id.startswith("carryover-ops-") and "CARRYOVER_JOB_ID" in sub.stdout
    st = _carryover("jobs", "status", job_id, "--wait", "--timeout", "800", *head, *_flags(wd))
    return {"wd": wd, "cfg": cfg, "job_id": job_id, "head": head, "status": st}


def test_submitted_upgrade_succeeds_with_logs_and_lineage(submitted) -> None:
    wd, cfg, job_id, head = (submitted[k] for k in ("wd", "cfg", "job_id", "head"))
    st = submitted["status"]
    assert st.returncode == 0 and f"{job_id}: SUCCEEDED" in st.stdout, st.stdout + st.stderr
    logs = _carryover("jobs", "logs", job_id, *head, *_flags(wd))
    assert logs.returncode == 0
    for text in ("▶ promote", "validation of v2", "MLflow parent run"):
        assert text in logs.stdout
    listed = json.loads(_carryover("jobs", "list", "--json", *head, *_flags(wd)).stdout)["jobs"]
    row = next(r for r in listed if r["id"] == job_id)
    assert row["status"] == "SUCCEEDED" and row["trigger"] == "manual" and row["job"] == "upgrade"

    ctx = Context(cfg, quiet=True)
    assert ctx.gallery.current() == "v2" and holder_of(cfg.gallery_uri) is None
    lin = json.loads(_carryover("lineage", "--json", *_flags(wd)).stdout)
    assert lin["serving"] == "v2" and [v["version"] for v in lin["versions"]] == ["v1", "v2"]
    v1, v2 = lin["versions"]
    assert v2["embedder"]["name"] == "ops-embedder" and "serving" in v2["embedder"]["aliases"]
    assert v2["source_version"] == "v1" and len(v2["shards"]) == 4
    tracker = ctx.tracker
    for shard in v2["shards"]:
        assert shard["method"] in ("transform", "partial", "full")
        assert shard["source_version"] == "v1" and shard["run_found"] is True
        assert tracker.get_run(shard["run_id"])["name"] == "execute"
        if shard["method"] != "full":
            (h,) = shard["transformation"]
            info = tracker.model_version(h["registry_name"], h["registry_version"])
            assert info.tags["carryover.from_model"] == "v1" and info.run_id == h["run_id"]
    assert all(s["method"] == "embed" and s["run_found"] for s in v1["shards"])
    # one parent run per upgrade, tagged with the Ray job, a child run per stage
    parent = tracker.get_run(v2["run_id"])
    assert parent["name"] == "upgrade" and parent["tags"]["carryover.job_id"] == job_id
    assert parent["tags"]["carryover.to_version"] == "v2"
    kids = tracker.search_runs(f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")
    names = {k["name"] for k in kids}
    assert {"ingest", "transformation", "plan", "execute", "validate", "promote"} <= names
    execute = next(k for k in kids if k["name"] == "execute")
    assert execute["tags"]["carryover.shards"] == "0-3"
    assert execute["tags"]["carryover.from_version"] == "v1"
    assert {"plan.json", "manifest.json", "config.yaml"} <= set(
        tracker.list_artifacts(parent["run_id"])
    )


def test_nightly_ticks_noop_then_upgrade_and_lock_refuses(submitted, ray_head) -> None:
    wd, cfg, head = submitted["wd"], submitted["cfg"], submitted["head"]
    tick = ["schedule", "--once", *head, *_flags(wd)]
    first = _carryover(*tick)
    assert first.returncode == 0 and "noop" in first.stdout, first.stdout + first.stderr
    assert "(version 2) is not newer than @serving (version 2)" in first.stdout.replace("\n", " ")

    # a new embedder becomes the candidate
    train = _carryover(
        "train", "--which", "new", "--alias", "candidate",
        *_flags(wd, "new_model.name=v3", "new_model.train.epochs=1"),
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    ctx = Context(cfg, quiet=True)
    assert ctx.tracker.get_alias("ops-embedder", "candidate").version == 3

    second = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *tick],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 600  # a job start on a loaded machine
    while (h := holder_of(cfg.gallery_uri)) is None or "upgrade to v3" not in h.purpose:
        assert second.poll() is None and time.time() < deadline, second.stdout.read()
        time.sleep(0.5)  # the submitted job has adopted the tick's lease
    third = _carryover(*tick)
    assert third.returncode == 3, third.stdout + third.stderr
    text = third.stdout.replace("\n", " ")
    assert "locked: tick refused: gallery" in text and "(upgrade to v3)" in text
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0 and "succeeded" in out, out

    assert ctx.gallery.current() == "v3" and holder_of(cfg.gallery_uri) is None
    serving = ctx.tracker.get_alias("ops-embedder", "serving")
    assert serving.version == 3 and ctx.gallery.manifest("v3")["source_version"] == "v2"
    ticks = json.loads(_carryover("jobs", "list", "--json", *head, *_flags(wd)).stdout)["jobs"]
    statuses = [r["status"] for r in ticks if r["kind"] == "tick"]
    assert statuses[:3] == ["LOCKED", "SUCCEEDED", "NOOP"]
    job = next(r for r in ticks if r["kind"] == "job" and r.get("trigger") == "schedule")
    assert job["status"] == "SUCCEEDED" and job["target"] == "v3"
    again = _carryover(*tick)  # serving caught up: back to no-ops
    assert again.returncode == 0 and "(version 3) is not newer" in again.stdout.replace("\n", " ")


def test_job_api_errors_are_clear(ray_head, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    no_token = _carryover("jobs", "list", "--address", ray_head.address, env=env)
    assert no_token.returncode == 1 and "requires a token and none was found" in no_token.stderr
    (tmp_path / "wrong").write_text("not-the-token")
    wrong = _carryover(
        "jobs", "list", "--address", ray_head.address, "--token-file", str(tmp_path / "wrong")
    )
    assert wrong.returncode == 1 and "refused the token" in wrong.stderr
    gone = _carryover("jobs", "list", "--address", "http://127.0.0.1:9", env=env)
    assert gone.returncode == 1 and "cannot reach Ray's job API at http://127.0.0.1:9" in (
        gone.stderr
    )
    # Ray's SDK would let these override --address; the address given on the command line wins
    elsewhere = {"RAY_ADDRESS": "127.0.0.1:9", "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}
    given = _carryover(
        "jobs", "list", "--address", ray_head.address, "--token-file", str(ray_head.token_file),
        env={**os.environ, **elsewhere},
    )  # fmt: skip
    assert given.returncode == 0, given.stderr
