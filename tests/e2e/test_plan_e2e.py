"""The upgrade job graph end to end on real Ray: planned mixes, resume after SIGKILLs (mid-
execution, between manifest and promote), the MLflow server lost mid-run, failed validation,
`carryover plan` rules, dry run, adapter search during the upgrade."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.context import Context
from pipeline.data.prepare import prepare
from pipeline.flows import run_upgrade
from pipeline.gallery.lock import holder_of
from pipeline.gallery.store import Gallery, arrow_to_embeddings, embeddings_to_arrow
from pipeline.graph.dag import StageLog
from pipeline.io import uri
from pipeline.services import steps
from pipeline.services.search import search_gallery
from pipeline.services.upgrade import compute_plan
from pipeline.upgrade.validate import ValidationFailed
from tests.e2e.test_upgrade_e2e import TINY
from tests.fixtures.mlflow_server import _free_port, _stop, _wait_healthy
from tests.fixtures.ray_local import own_ray_env

pytestmark = pytest.mark.slow
SHARDS, ROWS = 8, 800


def _sets(workdir: Path, *extra: str) -> list[str]:
    return [*TINY, f"workdir={workdir}", "gallery_name=plan", *extra]


EXEC = ("plan.parallel_shards=1", "embed.batch_size=8")  # slow enough to be killed mid-way


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local) -> tuple[Path, dict[str, Any]]:
    """A gallery of 8 shards with v1 ingested, v2 + h trained and evaluated (shared, read-only),
    built the hard way: the first driver is SIGKILLed while Ray Train trains v2, a rerun
    finishes. Returns the workdir and what the kill left behind."""
    base = tmp_path_factory.mktemp("planned")
    cfg = load_config(None, _sets(base))
    prepare("digits", cfg.images_uri, SHARDS, cfg.storage, cfg.data, limit=ROWS)
    g = Gallery(cfg.gallery_uri)
    snapshots = base / "ray_results"
    p = _start_cli("upgrade", "-q", "--until", "evaluate", *_flags(_sets(base)))
    try:  # v2's first checkpoint is persisted: training is under way
        _kill_when(p, lambda: any(snapshots.glob("train-v2-*/checkpoint_manager_snapshot.json")))
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # reap what the dead driver's local Ray left
    left = {
        "stages": sorted(StageLog(g, "v2").done()),
        "v2_model": (base / "models" / "v2").exists(),
        "current": g.current(),
        "v1": g.manifest("v1") if g.has_version("v1") else None,
        "lock": holder_of(g.uri),
        "pid": p.pid,
    }
    report = run_upgrade(cfg, quiet=True, until="evaluate")
    return base, {"left": left, "report": report}


@pytest.fixture(scope="module")
def evaluated(trained) -> Path:
    return trained[0]


@pytest.fixture(scope="module")
def reference(evaluated, tmp_path_factory) -> Path:
    """An undisturbed upgrade: what every fault test's result must equal."""
    ref = _copy(evaluated, tmp_path_factory.mktemp("ref") / "wd")
    run_upgrade(load_config(None, _sets(ref, *EXEC)), quiet=True)
    return ref


def test_driver_killed_during_training_resumes_from_its_checkpoint(trained) -> None:
    base, facts = trained
    left, report = facts["left"], facts["report"]
    # killed inside new-model: the stages before it had finished, v2 did not exist
    assert left["stages"] == ["_identity", "ingest", "old-model", "side-info"], left
    assert not left["v2_model"] and left["current"] == "v1"
    assert left["v1"] is not None and left["v1"]["rows"] == ROWS  # CURRENT names a whole version
    assert left["lock"] is not None and left["lock"].pid == left["pid"]  # taken over by the rerun
    status = {k: v["status"] for k, v in report.stages.items()}
    assert {k: status[k] for k in ("old-model", "side-info", "ingest")} == dict.fromkeys(
        ("old-model", "side-info", "ingest"), "resumed"
    )
    assert status["new-model"] == status["evaluate"] == "done"
    # Ray Train went on from the persisted checkpoint instead of epoch 0
    meta = json.loads((base / "models" / "v2" / "model.json").read_text())
    assert 1 <= meta["train_result"]["resumed_from_epoch"] <= meta["train_result"]["epochs"]
    assert np.isfinite(meta["train_result"]["final_loss"])
    # the ingested version was not redone: the same commit records, the same files
    g = Gallery(str(base / "gallery"))
    assert g.manifest("v1")["shards"] == left["v1"]["shards"]
    assert g.current() == "v1" and holder_of(g.uri) is None


def _copy(base: Path, dst: Path) -> Path:
    """A private copy of the evaluated workdir; recorded paths now point into the copy."""
    shutil.copytree(base, dst)
    for f in (dst / "gallery").rglob("*.json"):
        f.write_text(f.read_text().replace(str(base), str(dst)))
    return dst


def _strip_side_info(g: Gallery, version: str, shard_id: int) -> None:
    u = g.shard_uri(version, shard_id)
    uri.write_table(uri.read_table(u).drop_columns(["side_info"]), u)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, **kw
    )


def _flags(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def test_budgeted_upgrade_mixes_methods_and_beats_transform(evaluated, tmp_path) -> None:
    wd = _copy(evaluated, tmp_path / "wd")
    cfg = load_config(None, _sets(wd, "plan.no_side_info=backfill", "plan.budget_fraction=0.25"))
    ctx = Context(cfg, quiet=True)
    g = ctx.gallery
    (wd / "images" / "shard-00006.parquet").unlink()  # images gone: transform only
    _strip_side_info(g, "v1", 7)  # no side-info, no fallback h: full backfill

    # serving during the upgrade: the old version answers, also for new-model queries
    key = next(iter(g.iter_embeddings("v1", columns=("key",)))).column("key")[0].as_py()
    plain = search_gallery(ctx, key=key, k=5)
    via = search_gallery(ctx, key=key, k=5, adapter="procrustes")
    assert plain.version == via.version == "v1" and via.adapter == "procrustes"
    assert len(via.keys) == 5 and key not in via.keys

    report = run_upgrade(cfg, quiet=True)
    plan = {s["shard_id"]: s for s in report.plan["shards"]}
    assert plan[6]["method"] == "transform" and "images unavailable" in plan[6]["reason"]
    assert plan[7]["method"] == "full" and "no side-info" in plan[7]["reason"]
    assert {plan[i]["method"] for i in range(6)} == {"partial"}
    # ~25% of 800 images: shard 7's 100 mandatory rows, the rest by uncertainty
    assert report.plan["reembed_rows"] == 200
    assert g.current() == "v2" and report.serving == "v2"
    val = report.validation
    assert val["ok"] and val["top1"] > val["transform_top1"]
    assert val["top1"] >= val["expected_top1"] - val["tolerance"]
    # every row is accounted for, with its source
    recs = {r["shard_id"]: r for r in g.manifest("v2")["shards"]}
    assert sum(r["rows"] for r in recs.values()) == ROWS and g.manifest("v2")["rejected"] == 0
    assert recs[6]["sources"] == {"transform:v1->v2": recs[6]["rows"]}
    assert recs[7]["sources"] == {"backfill:v2": recs[7]["rows"]}
    for i in range(6):
        assert recs[i]["sources"]["backfill:v2"] == plan[i]["reembed_rows"] > 0
        assert recs[i]["reembed_rows"] + recs[i]["sources"]["transform:v1->v2"] == 100
    # partial rows are the shard's most uncertain ones: re-embedded rows carry no uncertainty
    t = uri.read_table(g.shard_uri("v2", 0))
    unc = t["uncertainty"].to_numpy(zero_copy_only=False)
    emb = np.array(t["source"].to_pylist()) == "backfill:v2"
    assert np.isnan(unc[emb]).all() and np.isfinite(unc[~emb]).all()
    # MLflow: stage completion and timings on the parent run, the plan as an artifact
    run = ctx.tracker.get_run(report.parent_run_id)
    assert run["tags"]["carryover.stage.execute"] == "done"
    assert run["metrics"]["stage_seconds_execute"] > 0
    assert (wd / "gallery" / "versions" / "v2" / "_graph" / "plan.json").exists()
    # lineage from the manifests and MLflow: every shard's method, source, run, transformation
    out = _cli("lineage", "--json", "--version", "v2", *_flags(_sets(wd)))
    assert out.returncode == 0, out.stderr
    (v2,) = json.loads(out.stdout)["versions"]
    assert v2["run_id"] == report.parent_run_id and v2["embedder"]["model"] == "v2"
    lin = {s["shard_id"]: s for s in v2["shards"]}
    assert {i: s["method"] for i, s in lin.items()} == {i: p["method"] for i, p in plan.items()}
    execute_runs = {s["run_id"] for s in lin.values()}
    assert len(execute_runs) == 1 and all(s["run_found"] for s in lin.values())
    (execute_run,) = execute_runs
    assert ctx.tracker.get_run(execute_run)["parent"] == report.parent_run_id
    assert all(s["source_version"] == "v1" for s in lin.values())
    assert lin[7]["transformation"] is None  # fully re-embedded: no transformation involved
    (h,) = lin[6]["transformation"]
    assert h["from_model"] == "v1" and h["to_model"] == "v2"
    info = ctx.tracker.model_version(h["registry_name"], h["registry_version"])
    assert info.run_id == h["run_id"] and info.tags["carryover.to_model"] == "v2"
    one = json.loads(_cli("lineage", "--json", "--shard", "6", *_flags(_sets(wd))).stdout)
    assert [[s["shard_id"] for s in v["shards"]] for v in one["versions"]] == [[6], [6]]
    # promotion moved the alias with CURRENT; rollback moves both back
    serving = ctx.tracker.get_alias("plan-embedder", "serving")
    assert serving.version == g.manifest("v2")["registry_version"]
    steps.rollback_step(ctx)
    assert g.current() == "v1"
    assert (
        ctx.tracker.get_alias("plan-embedder", "serving").version
        == g.manifest("v1")["registry_version"]
    )


def _start_cli(*args: str) -> subprocess.Popen:
    """A driver to SIGKILL: on a Ray of its own, as a crashed `carryover upgrade` would be."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=own_ray_env(),
    )


def _kill_when(p: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the driver as soon as `ready()` holds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready():
        assert p.poll() is None, f"the driver ended (exit {p.returncode}) before the kill point"
        time.sleep(0.02)
    assert ready(), "the kill point was never reached"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(1)


def test_sigkilled_upgrade_resumes_and_redoes_no_committed_shard(
    evaluated, reference, tmp_path
) -> None:
    wd = _copy(evaluated, tmp_path / "wd")
    sets = _sets(wd, *EXEC)
    g = Gallery(str(wd / "gallery"))
    run_upgrade(load_config(None, sets), quiet=True, until="plan")
    shards_dir = wd / "gallery" / "versions" / "v2" / "_shards"
    p = _start_cli("upgrade", "-q", *_flags(sets))
    try:
        _kill_when(p, lambda: bool(list(shards_dir.glob("*.json"))))  # mid-execution
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # reap what the dead driver's local Ray left
    committed = set(g.committed_shards("v2"))
    assert 1 <= len(committed) < SHARDS, committed
    assert not g.has_version("v2") and g.current() == "v1"
    held = holder_of(g.uri)  # the dead driver's lease is left behind, taken over on rerun
    assert held is not None and held.pid == p.pid and not held.expired

    # Second kill: between the manifest (written last by the index stage) and the promotion,
    # while the version is validated. The complete v1 keeps serving; v2 is complete, unserved.
    indexed = wd / "gallery" / "versions" / "v2" / "_graph" / "index.json"
    p = _start_cli("upgrade", "-q", *_flags(sets))
    try:
        _kill_when(p, indexed.exists)  # manifest written and recorded; validation under way
    finally:
        os.killpg(p.pid, signal.SIGKILL)
    assert g.has_version("v2") and g.current() == "v1"
    assert g.manifest("v2")["rows"] + g.manifest("v2")["rejected"] == ROWS

    r = _cli("upgrade", "-q", *_flags(sets))
    assert r.returncode == 0, r.stderr[-3000:]
    assert g.current() == "v2"
    attempts = g.attempts("v2")
    assert all(attempts[s] == 1 for s in committed), attempts  # committed shards not redone
    assert set(attempts) == set(range(SHARDS))
    ref = Gallery(str(reference / "gallery")).manifest("v2")["shards"]
    got = g.manifest("v2")["shards"]
    assert [s["checksum"] for s in got] == [s["checksum"] for s in ref]  # same result
    assert sum(s["rows"] for s in got) == ROWS
    assert holder_of(g.uri) is None
    # the last upgrade run points at the earlier run of each stage it did not redo
    tracker = Context(load_config(None, sets), quiet=True).tracker
    runs = tracker.search_runs(order_by=["attributes.start_time DESC"])
    tags = next(r for r in runs if r["name"] == "upgrade")["tags"]
    assert tags["carryover.stage.plan"] == "resumed" and tags["carryover.stage.promote"] == "done"
    assert tags["carryover.stage.execute"] == tags["carryover.stage.index"] == "resumed"
    assert tracker.get_run(tags["carryover.stage.plan.run_id"])["name"] == "plan"
    assert tracker.get_run(tags["carryover.stage.execute.run_id"])["name"] == "execute"


def test_killed_ray_data_actor_mid_backfill_changes_nothing(evaluated, reference, tmp_path) -> None:
    """SIGKILL the Ray Data actor while it re-embeds a shard: Ray restarts it and retries the
    shard; the upgrade completes with exactly the undisturbed run's files."""
    wd = _copy(evaluated, tmp_path / "wd")
    cfg = load_config(None, _sets(wd, *EXEC))
    g = Gallery(cfg.gallery_uri)
    run_upgrade(cfg, quiet=True, until="plan")
    plan = json.loads((wd / "gallery" / "versions" / "v2" / "_graph" / "plan.json").read_text())
    backfilled = {
        s["shard_id"] for s in plan["output"]["shards"] if s["method"] in ("partial", "full")
    }
    assert backfilled, plan
    attempts = wd / "gallery" / "versions" / "v2" / "_attempts"
    killed: list[dict[str, Any]] = []
    stop = threading.Event()

    def started() -> list[dict[str, Any]]:
        out = []
        for f in sorted(attempts.glob("shard-*.json")):
            with contextlib.suppress(OSError, ValueError):  # not yet written whole
                out.append(json.loads(f.read_text()))
        return out

    def kill_an_actor_mid_shard() -> None:
        while not stop.is_set():
            for rec in started():
                sid = rec["shard_id"]
                if sid in backfilled and sid not in g.committed_shards("v2"):
                    os.kill(rec["pid"], signal.SIGKILL)  # the actor, mid-shard
                    killed.append(rec)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_an_actor_mid_shard, daemon=True)
    killer.start()
    try:
        report = run_upgrade(cfg, quiet=True)
    finally:
        stop.set()
        killer.join()
    assert killed, "no backfilling actor was caught mid-shard"
    (rec,) = killed
    assert report.serving == "v2" and g.current() == "v2"
    tries = g.attempts("v2")
    assert tries[rec["shard_id"]] == 2, tries  # retried once, on a restarted actor
    assert all(n == 1 for sid, n in tries.items() if sid != rec["shard_id"]), tries
    ref_g = Gallery(str(reference / "gallery"))
    got, ref = g.manifest("v2"), ref_g.manifest("v2")
    assert [s["checksum"] for s in got["shards"]] == [s["checksum"] for s in ref["shards"]]
    assert got["rows"] == ref["rows"] == ROWS and got["rejected"] == 0
    for sid in range(SHARDS):  # the same keys, rows and embeddings, shard by shard
        a, b = uri.read_table(g.shard_uri("v2", sid)), uri.read_table(ref_g.shard_uri("v2", sid))
        assert a["key"].to_pylist() == b["key"].to_pylist()
        np.testing.assert_array_equal(
            arrow_to_embeddings(a["embedding"]), arrow_to_embeddings(b["embedding"])
        )


def test_failed_validation_leaves_current_and_serving_alias(evaluated, tmp_path) -> None:
    wd = _copy(evaluated, tmp_path / "wd")
    cfg = load_config(None, _sets(wd))
    ctx = Context(cfg, quiet=True)
    g = ctx.gallery
    alias_before = ctx.tracker.get_alias("plan-embedder", "serving")
    run_upgrade(cfg, quiet=True, until="index")
    # corrupt the built version: every row keeps its key but gets another row's embedding
    rng = np.random.default_rng(0)
    for s in g.manifest("v2")["shards"]:
        u = g.shard_uri("v2", s["shard_id"])
        t = uri.read_table(u)
        emb = arrow_to_embeddings(t["embedding"])[rng.permutation(t.num_rows)]
        i = t.schema.get_field_index("embedding")
        uri.write_table(t.set_column(i, "embedding", embeddings_to_arrow(emb)), u)
    with pytest.raises(ValidationFailed, match="retrieval.*FAIL|FAIL"):
        run_upgrade(cfg, quiet=True)
    assert g.current() == "v1"
    after = ctx.tracker.get_alias("plan-embedder", "serving")
    assert after is not None and alias_before is not None
    assert after.version == alias_before.version == g.manifest("v1")["registry_version"]
    assert not (wd / "gallery" / "versions" / "v2" / "_graph" / "validate.json").exists()
    # the CLI reports it with exit code 1 and the failing check
    r = _cli("upgrade", "-q", *_flags(_sets(wd)))
    assert r.returncode == 1 and "failed validation" in r.stderr and "retrieval" in r.stderr
    assert g.current() == "v1"


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_plan_cli_shows_the_rules_and_dry_run_changes_nothing(evaluated, tmp_path) -> None:
    wd = _copy(evaluated, tmp_path / "wd")
    sets = _sets(wd)
    before = _listing(wd / "gallery")
    r = _cli("upgrade", "--dry-run", *_flags(sets))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dry run" in r.stdout and "pending" in r.stdout and "backfill plan" in r.stdout
    assert _listing(wd / "gallery") == before  # nothing written

    g = Gallery(str(wd / "gallery"))
    for sid in (2, 3):
        (wd / "images" / f"shard-{sid:05d}.parquet").unlink()
    for sid in (3, 4):
        _strip_side_info(g, "v1", sid)
    out = wd / "plan.json"
    r = _cli("plan", "--out", str(out), *_flags(sets))
    assert r.returncode == 0, r.stderr[-3000:]
    shards = {s["shard_id"]: s for s in json.loads(out.read_text())["shards"]}
    assert shards[2]["method"] == "transform" and "images unavailable" in shards[2]["reason"]
    # no side-info: the side-info-free transformation (trained for these shards)
    assert shards[3]["method"] == "transform" and "fct-noside" in shards[3]["reason"]
    # h without side-info is less sure of its rows, so the global order may give this shard
    # most of its rows (then it is re-embedded fully); either way it is not transform-only
    assert shards[4]["transform"] == ["fct-noside"] and shards[4]["method"] in ("partial", "full")
    assert "no side-info: fct-noside" in shards[4]["reason"]
    assert "images unavailable" in r.stdout and "no side-info" in r.stdout

    r = _cli("plan", "--out", str(out), *_flags([*sets, "plan.no_side_info=backfill"]))
    assert r.returncode == 1  # shard 3 has neither side-info nor images: blocked
    shards = {s["shard_id"]: s for s in json.loads(out.read_text())["shards"]}
    assert shards[3]["method"] == "blocked" and "images gone" in shards[3]["reason"]
    assert shards[4]["method"] == "full" and "no side-info" in shards[4]["reason"]
    assert "blocked" in r.stdout


FCT_ONLY = (
    "transformation.name=fctonly",
    "transformation.loss=fct",  # no uncertainty head, as a TorchScript new model forces
    "plan.target_version=v2fct",
    "adapters.kinds=[]",
)


def test_fct_upgrade_keeps_to_its_budget_and_its_estimates(evaluated, tmp_path) -> None:
    """An h without uncertainty is found by the planner of the upgrade that trained it: a 0%
    budget transforms every shard; an over-budget plan stops with exit 2 before execution."""
    wd = _copy(evaluated, tmp_path / "wd")
    cfg = load_config(None, _sets(wd, *FCT_ONLY, "plan.budget_fraction=0.0"))
    report = run_upgrade(cfg, quiet=True)
    shards = report.plan["shards"]
    assert [s["method"] for s in shards] == ["transform"] * SHARDS, [s["reason"] for s in shards]
    assert all(s["transform"] == ["fctonly"] for s in shards)
    assert report.plan["reembed_rows"] == 0 and report.execute["reembedded_rows"] == 0
    g = Gallery(cfg.gallery_uri)
    assert g.current() == "v2fct"
    assert {k for r in g.manifest("v2fct")["shards"] for k in r["sources"]} == {"transform:v1->v2"}
    # "transform only" is the evaluation's own measurement of this h on the same rows
    ev = json.loads((wd / "reports" / "v1-to-v2" / "report.json").read_text())
    fct = next(c["top1"] for c in ev["cases"] if c["name"] == "new/fctonly")
    plan, val = report.plan, report.validation
    assert plan["estimate"] == "simulated" and plan["transform_top1"] == pytest.approx(fct, abs=0.2)
    assert val["transform_top1"] == plan["transform_top1"]
    # nothing re-embedded: what validation measures is the transform-only figure
    assert val["top1"] == pytest.approx(plan["transform_top1"], abs=1e-6)
    assert plan["expected_top1"] == pytest.approx(plan["transform_top1"], abs=1e-6)

    # a partial budget: the fct h's rows in a seeded random order, the estimate replayed on them
    ctx = Context(load_config(None, _sets(wd, *FCT_ONLY, "plan.budget_fraction=0.25")))
    p, _ = compute_plan(ctx, "v1", ev, quiet=True, train_missing=False)
    assert 0 < p.reembed_rows <= 200
    partial = [s for s in p.shards if s.method == "partial"]
    assert partial and all("seeded random order" in s.reason for s in partial)
    assert p.transform_top1 == pytest.approx(fct, abs=0.2)

    # a shard only a full backfill can produce, and a 0% budget: refused before execution
    _strip_side_info(g, "v1", 5)
    sets = _sets(wd, *FCT_ONLY, "plan.budget_fraction=0.0", "plan.no_side_info=backfill")
    r = _cli("plan", "--from", "v1", "--out", str(wd / "none.json"), *_flags(sets))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, err[-3000:]
    assert "shard 5 (no side-info and no side-info-free transformation) needs 100 images" in err
    assert "over the budget of 0 images (plan.budget_fraction=0.0" in err
    assert "Traceback" not in err and not (wd / "none.json").exists()


# MLflow retries a failed request for about four minutes by default; a test need not wait.
QUICK_MLFLOW = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class _Server:
    """A `mlflow server` this test stops and starts again on the same port and store."""

    def __init__(self, root: Path, db: Path) -> None:
        self.root, self.db, self.port = root, db, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.db}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = self.root / "server.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
            )
        _wait_healthy(self.proc, self.uri, log)

    def kill(self) -> None:
        # SIGKILL, not a graceful stop: the server vanishes as a crashed host would.
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


@pytest.mark.slow
def test_server_lost_mid_run_fails_cleanly_and_resumes(
    evaluated, tmp_path: Path, ray_local, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plan suite's trained and evaluated gallery, its MLflow store now behind a real
    # server: only execution onwards runs here.
    wd = _copy(evaluated, tmp_path / "wd")
    (tmp_path / "mlflow").mkdir()
    server = _Server(tmp_path / "mlflow", wd / "mlflow.db")
    server.start()
    try:
        _lost_mid_run(wd, server, monkeypatch)
    finally:
        server.stop()


def _lost_mid_run(wd: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = (f"tracking.uri={server.uri}", *EXEC)
    sets = _sets(wd, *extra)
    cfg = load_config(None, sets)
    run_upgrade(cfg, quiet=True, until="plan")
    g = Gallery(cfg.gallery_uri)
    shards_dir = wd / "gallery" / "versions" / "v2" / "_shards"
    open_run = Context(cfg).tracker.run("open-when-lost")  # a stage's run, left open
    open_run.__enter__()

    # the upgrade goes on in another process; the server dies once a shard is committed
    p = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "upgrade", "-q", *_flags(sets)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**own_ray_env(), **QUICK_MLFLOW},
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(shards_dir.glob("*.json")):
            assert p.poll() is None, p.communicate()
            time.sleep(0.02)
        server.kill()
        _, err = p.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):  # reap what the driver's Ray left
            os.killpg(p.pid, signal.SIGKILL)
    err = " ".join(err.split())
    assert p.returncode == 1, err[-3000:]
    assert "tracking error:" in err and f"127.0.0.1', port={server.port}" in err, err[-3000:]
    assert "Traceback" not in err
    committed = set(g.committed_shards("v2"))  # the stage notices at its next MLflow call
    assert 1 <= len(committed) <= SHARDS, committed
    assert holder_of(g.uri) is None  # the lock was released on the way out
    assert g.current() == "v1" and not g.has_version("v2")
    assert (wd / "gallery" / "versions" / "v2" / "_graph" / "plan.json").exists()
    assert not (wd / "gallery" / "versions" / "v2" / "_graph" / "execute.json").exists()
    # A stage failing while the server is gone ends its run at once, its own error standing:
    # marking the run FAILED is skipped, not retried call after call (each for ~4 minutes
    # with MLflow's defaults, ~12 s here).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    start = time.monotonic()
    assert open_run.__exit__(ValueError, ValueError("stage failed"), None) is False
    assert time.monotonic() - start < 5

    # back on the same port and store: the rerun resumes, redoing no committed shard
    server.start()
    report = run_upgrade(load_config(None, sets), quiet=True)
    assert report.serving == "v2" and g.current() == "v2"
    assert {k: v["status"] for k, v in report.stages.items()} == {
        **dict.fromkeys(
            ["old-model", "side-info", "ingest", "new-model", "transformation", "evaluate", "plan"],
            "resumed",
        ),
        **dict.fromkeys(["execute", "index", "validate", "promote"], "done"),
    }
    attempts = g.attempts("v2")
    assert all(attempts[s] == 1 for s in committed), attempts
    assert set(attempts) == set(range(SHARDS))
    assert report.execute["shards_resumed"] == len(committed)
    assert sum(s["rows"] for s in g.manifest("v2")["shards"]) == ROWS
    # MLflow has both attempts: the lost one could not be told it ended
    tracker = Context(load_config(None, sets), quiet=True).tracker
    runs = tracker.search_runs("attributes.run_name = 'execute'")
    assert sorted(r["status"] for r in runs) == ["FINISHED", "RUNNING"]
    assert tracker.search_runs("attributes.run_name = 'open-when-lost'")[0]["status"] == "RUNNING"
