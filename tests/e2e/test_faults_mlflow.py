"""MLflow faults (docs/reliability.md, Faults): a tracking server unreachable at start stops an
upgrade in seconds before any work; one lost mid-run fails the upgrade cleanly (error named,
lock released, CURRENT untouched), and once it is back a rerun resumes and completes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.prepare import prepare
from pipeline.flows import run_upgrade
from pipeline.gallery.lock import holder_of
from pipeline.gallery.store import Gallery
from pipeline.graph import steps
from pipeline.tracking import TrackingError
from tests.e2e.test_upgrade_e2e import TINY
from tests.fixtures.mlflow_server import _free_port, _stop, _wait_healthy

# MLflow retries a failed request for about four minutes by default; a test need not wait.
QUICK_MLFLOW = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def _dead_uri() -> str:
    with socket.socket() as s:  # a port nothing listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _flags(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def test_unreachable_server_at_start_stops_before_any_work(tmp_path: Path) -> None:
    dead = _dead_uri()
    sets = [*TINY, f"workdir={tmp_path}", "gallery_name=faults", f"tracking.uri={dead}"]
    cfg = load_config(None, sets)
    prepare("digits", cfg.images_uri, 2, cfg.storage, cfg.data, limit=40)
    images = sorted((tmp_path / "images").iterdir())
    start = time.monotonic()
    res = CliRunner().invoke(app, ["upgrade", "-q", *_flags(sets)])
    took = time.monotonic() - start
    out = " ".join(res.output.split())  # rich's line wrapping undone
    assert res.exit_code == 1, out
    assert out.startswith(f"tracking error: MLflow tracking server {dead} is unreachable"), out
    assert "Traceback" not in out
    assert took < 15, took  # seconds, not MLflow's minutes of retries
    # nothing started: no gallery (no lock, no stage record), no model, images as they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    assert sorted((tmp_path / "images").iterdir()) == images
    # the demo's path prepares images inside the upgrade: not before MLflow answers either
    fresh = load_config(None, [*sets[:-3], f"workdir={tmp_path / 'demo'}", f"tracking.uri={dead}"])
    with pytest.raises(TrackingError, match="is unreachable"):
        run_upgrade(fresh, quiet=True, prepare_source="digits")
    assert not (tmp_path / "demo").exists()


class _Server:
    """A `mlflow server` this test stops and starts again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
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
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "mlflow"
    root.mkdir()
    s = _Server(root)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.slow
def test_server_lost_mid_run_fails_cleanly_and_resumes(
    tmp_path: Path, server, ray_local, monkeypatch: pytest.MonkeyPatch
) -> None:
    wd = tmp_path / "wd"
    sets = [
        *TINY,
        f"workdir={wd}",
        "gallery_name=faults",
        f"tracking.uri={server.uri}",
        "plan.parallel_shards=1",
        "embed.batch_size=8",
    ]
    cfg = load_config(None, sets)
    prepare("digits", cfg.images_uri, 4, cfg.storage, cfg.data, limit=400)
    run_upgrade(cfg, quiet=True, until="plan")
    g = Gallery(cfg.gallery_uri)
    shards_dir = wd / "gallery" / "versions" / "v2" / "_shards"
    open_run = steps.Context(cfg).tracker.run("open-when-lost")  # a stage's run, left open
    open_run.__enter__()

    # the upgrade goes on in another process; the server dies once a shard is committed
    p = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "upgrade", "-q", *_flags(sets)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **QUICK_MLFLOW},
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(shards_dir.glob("*.json")):
            assert p.poll() is None, p.communicate()
            time.sleep(0.02)
        server.kill()
        _, err = p.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):  # reap what the driver's Ray left
            os.killpg(p.pid, signal.SIGKILL)
    err = " ".join(err.split())
    assert p.returncode == 1, err[-3000:]
    assert "tracking error:" in err and f"127.0.0.1', port={server.port}" in err, err[-3000:]
    assert "Traceback" not in err
    committed = set(g.committed_shards("v2"))
    assert 1 <= len(committed) <= 4, committed
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
    assert set(attempts) == set(range(4)) and report.execute["shards_resumed"] == len(committed)
    assert sum(s["rows"] for s in g.manifest("v2")["shards"]) == 400
    # MLflow has both attempts: the lost one could not be told it ended
    tracker = steps.Context(load_config(None, sets), quiet=True).tracker
    runs = tracker.search_runs("attributes.run_name = 'execute'")
    assert sorted(r["status"] for r in runs) == ["FINISHED", "RUNNING"]
    assert tracker.search_runs("attributes.run_name = 'open-when-lost'")[0]["status"] == "RUNNING"
