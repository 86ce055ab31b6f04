"""`jobs/benchmark.py --tiny` runs every section end to end, so the script cannot rot. It
asserts what was written, never how fast anything was."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.upgrade.price import ThroughputProfile
from tests.fixtures.ray_local import own_ray_env

pytestmark = pytest.mark.slow


def test_benchmark_tiny_writes_report_figures_and_profile(tmp_path: Path) -> None:
    out, js, prof = tmp_path / "bench.md", tmp_path / "bench.json", tmp_path / "profile.json"
    r = subprocess.run(
        [
            sys.executable,
            "jobs/benchmark.py",
            "--tiny",
            "--workdir",
            str(tmp_path / "wd"),
            "--out",
            str(out),
            "--json",
            str(js),
            "--profile",
            str(prof),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[2],
        env=own_ray_env(),  # it measures its own process tree
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    figs = json.loads(js.read_text())
    sections = {f["section"] for f in figs}
    assert sections == {"transform", "memory", "backfill", "cost", "index", "training"} | {
        "evaluation",
        "serve",
    }
    for f in figs:
        assert math.isfinite(f["value"]) and f["value"] > 0, f
        if f["baseline_value"] is not None:
            assert math.isfinite(f["ratio"]) and f["ratio"] > 0, f
    (train,) = [f for f in figs if f["section"] == "training"]
    assert train["name"] == "steps/s (1 worker)" and train["extra"]["timed_steps"] == 3
    text = out.read_text()
    assert "## Targets" in text and "targets met." in text
    assert "| transform | transform rows/s |" in text and "## Machine" in text
    assert "python jobs/benchmark.py --tiny" in text
    p = ThroughputProfile.load(prof)
    cost = {f["name"]: f["value"] for f in figs if f["section"] == "cost"}
    assert p.transform_rows_per_second == pytest.approx(cost["transformation rows/s"])
    assert p.embed_images_per_second == pytest.approx(cost["resnet50 images/s"])
