"""MLflow faults (docs/reliability.md, Faults): a tracking server unreachable at start stops an
upgrade in seconds before any work. One lost mid-run is in test_plan_e2e.py, which has a trained
and evaluated gallery to upgrade from."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.prepare import prepare
from pipeline.flows import run_upgrade
from pipeline.tracking import TrackingError
from tests.e2e.test_upgrade_e2e import TINY


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
