"""`carryover status`: progress records, direct-run journalling, stale runs, the JSON shape."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.gallery.lock import GalleryLock
from pipeline.io import uri as uri_io
from pipeline.ops import progress as run_progress
from pipeline.ops.journal import JOB_ID_ENV, Journal
from pipeline.ops.progress import ProgressRecord, ProgressWriter, TrainingProgress, read_records
from pipeline.ops.runs import journalled_upgrade
from pipeline.ops.status import gallery_status

runner = CliRunner()


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(JOB_ID_ENV, raising=False)
    c = load_config(None, [f"workdir={tmp_path}", "gallery_name=st"])
    # a gallery serving v1 (CURRENT is what `status` reads; no version files needed)
    uri_io.write_json(uri_io.join(c.gallery_uri, "CURRENT"), {"version": "v1"}, c.storage)
    return c


def _lock(cfg) -> GalleryLock:
    return GalleryLock(cfg.gallery_uri, cfg.storage, 60, owner="carryover upgrade (cli)")


def test_writer_throttles_and_round_trips(tmp_path: Path) -> None:
    rec = ProgressRecord("upgrade-x-1", str(tmp_path), "v2")
    w = ProgressWriter(rec, str(tmp_path), interval_s=60.0)
    w.stage("execute")  # a stage change is written at once
    w.shards(3, 10, 300, 150.0)  # within the interval: kept, not written
    (got,) = read_records(str(tmp_path))
    assert (got.stage, got.shards_done) == ("execute", None)
    w.flush(force=True)
    (got,) = read_records(str(tmp_path))
    assert (got.shards_done, got.shards_total, got.rows, got.rows_per_s) == (3, 10, 300, 150.0)
    w.training(TrainingProgress("train-v2", epoch=1, epochs=4, step=5, steps=10, loss=0.5))
    w.flush(force=True)
    (got,) = read_records(str(tmp_path))
    assert got.training == TrainingProgress("train-v2", 1, 4, 5, 10, 0.5)
    assert got.training.fraction == pytest.approx(1.5 / 4)
    w.remove()
    assert read_records(str(tmp_path)) == []


def test_training_eta_from_fraction() -> None:
    t = TrainingProgress("h", epoch=1, epochs=4, step=0, steps=None, loss=1.0, elapsed_s=10.0)
    assert t.eta_s == pytest.approx(30.0)  # a quarter done in 10 s
    assert TrainingProgress("h", 0, 4).eta_s is None


@pytest.mark.parametrize(
    ("error", "status"),
    [(None, "SUCCEEDED"), (RuntimeError("boom\nmore"), "FAILED"), (KeyboardInterrupt(), "STOPPED")],
)
def test_direct_upgrade_is_journalled(cfg, error, status) -> None:
    seen_running = {}
    expect = pytest.raises(type(error)) if error else contextlib.nullcontext()
    with expect, journalled_upgrade(cfg, "carryover upgrade (cli)") as w:
        assert run_progress.active() is w
        w.stage("old-model")
        (entry,) = Journal(cfg.gallery_uri).entries(kind="upgrade")
        seen_running = entry
        if error:
            raise error
    assert (seen_running["status"], seen_running["trigger"]) == ("RUNNING", "direct")
    (entry,) = Journal(cfg.gallery_uri).entries(kind="upgrade")
    assert entry["status"] == status and entry["last_stage"] == "old-model"
    assert entry["ended_at"] >= entry["created_at"]
    if status == "FAILED":
        assert entry["message"] == "RuntimeError: boom"
    assert read_records(cfg.gallery_uri) == []  # the progress record goes with the run
    assert run_progress.active() is not w  # nothing reports to a finished run


def test_submitted_job_keeps_its_own_entry(cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JOB_ID_ENV, "carryover-st-1")
    with journalled_upgrade(cfg, "carryover upgrade (carryover-st-1)") as w:
        assert w.record.id == "carryover-st-1"
        assert [r.id for r in read_records(cfg.gallery_uri)] == ["carryover-st-1"]
    assert Journal(cfg.gallery_uri).entries() == []


def test_status_shows_the_running_upgrade_then_a_stale_one(cfg) -> None:
    lock = _lock(cfg)
    lock.acquire()
    with journalled_upgrade(cfg, lock.owner) as w:
        w.stage("execute")
        w.shards(2, 4, 200, 100.0)
        w.flush(force=True)
        st = gallery_status(cfg)
        assert st.serving == "v1" and st.lock is not None
        assert st.running is not None and st.running.stale is None
        assert st.running.progress["stage"] == "execute"
        assert st.running.progress["shards_done"] == 2
        assert st.running.progress["rows_per_s"] == 100.0
        lock.release()  # the holder vanished without finishing (a kill -9 leaves this)
        st = gallery_status(cfg)
        assert st.running is None
        (stale,) = st.upgrades
        assert (stale.status, stale.stale) == ("RUNNING", "its lock is gone")
        assert stale.progress["stage"] == "execute"
    st = gallery_status(cfg)
    assert st.running is None and st.upgrades[0].status == "SUCCEEDED"
    assert st.upgrades[0].stale is None


def test_status_json_shape_and_exit_codes(cfg, tmp_path: Path) -> None:
    with journalled_upgrade(cfg, "x"):
        pass
    res = runner.invoke(app, ["status", cfg.gallery_uri, "--json"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert set(d) == {"gallery", "serving", "versions", "lock", "running", "upgrades"}
    assert d["serving"] == "v1" and d["lock"] is None and d["running"] is None
    (u,) = d["upgrades"]
    assert (u["kind"], u["trigger"], u["status"]) == ("upgrade", "direct", "SUCCEEDED")
    res = runner.invoke(app, ["status", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no gallery at" in res.output
    res = runner.invoke(app, ["status", cfg.gallery_uri])
    assert res.exit_code == 0 and "serving v1" in res.output and "SUCCEEDED" in res.output


def test_a_dead_process_is_named(cfg) -> None:
    lock = _lock(cfg)
    lock.acquire()
    try:
        journal = Journal(cfg.gallery_uri)
        journal.put(
            {
                "id": "upgrade-st-dead",
                "kind": "upgrade",
                "status": "RUNNING",
                "host": lock.holder().host,
                "pid": 2**22 + 7,  # above pid_max's default: no such process
                "created_at": time.time(),
            }
        )
        (run,) = gallery_status(cfg).upgrades
        assert run.stale == f"its process {2**22 + 7} is gone"
    finally:
        lock.release()
