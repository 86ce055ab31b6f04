"""Compat end to end on a local Ray: BCT, a gallery without side-info, `carryover evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.context import Context
from pipeline.data.prepare import prepare
from pipeline.flows import run_upgrade
from tests.e2e.test_upgrade_e2e import TINY

pytestmark = pytest.mark.slow


def test_bct_upgrade_without_side_info_and_the_evaluate_cli(tmp_path: Path, ray_local) -> None:
    sets = TINY + [
        f"workdir={tmp_path}",
        "gallery_name=bct",
        "side_info.enabled=false",  # a gallery ingested without side-info stays upgradable
        "new_model.train.loss=bct",
        "old_model.train.epochs=5",
        "new_model.train.epochs=6",
        "transformation.loss=fct",
        "adapters.kinds=[procrustes,low_rank]",
    ]
    cfg = load_config(None, sets)
    prepare("digits", cfg.images_uri, 3, cfg.storage, cfg.data, limit=600)
    report = run_upgrade(cfg, quiet=True)
    ctx = Context(cfg)
    assert ctx.gallery.manifest("v1")["side_info_dim"] == 0
    meta = json.loads((tmp_path / "models" / "fct" / "model.json").read_text())
    assert meta["arch"]["side_dim"] == 0 and meta["arch"]["uncertainty"] is False
    assert meta["side_info_model"] is None and meta["loss"] == "fct"
    v2 = json.loads((tmp_path / "models" / "v2" / "model.json").read_text())
    assert v2["compat_loss"] == "bct" and v2["bct_from"] == "v1"
    cases = {c["name"]: c for c in report.compat["cases"]}
    # BCT: new queries against the untouched old gallery work well above chance (10 classes,
    # an independently trained model scores ~10 here); the benchmark checks BCT > old/old
    top1 = {k: round(c["top1"], 1) for k, c in cases.items()}
    assert cases["new/old (BCT)"]["top1"] > 20, top1
    # an FCT model without FastFill's head has no uncertainty order
    assert set(report.compat["curves"]) == {"random", "oracle"}
    assert len(ctx.tracker.latest_versions("bct-side-info")) == 0

    out = tmp_path / "cli-report"
    flags = [a for s in sets for a in ("--set", s)]
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "evaluate", "--report-dir", str(out), *flags],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "new/old (BCT)" in p.stdout and "backfilling curves" in p.stdout
    for name in ("backfill_curves.png", "compat_matrix.png", "cases.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    again = json.loads((out / "report.json").read_text())
    # same data, same models, seeded adapters: the CLI reproduces the flow's numbers
    for c in again["cases"]:
        assert c["top1"] == pytest.approx(cases[c["name"]]["top1"], abs=1e-6)
    # the planned v2 mixes transformed and re-embedded rows: its own entry, beside the new model
    assert again["matrix_names"][:3] == ["v1", "v2 (planned)", "v2"]
    run = ctx.tracker.get_run(again["extra"]["run_id"])
    assert run["metrics"]["top1_old_old"] == pytest.approx(cases["old/old"]["top1"])

    # an old model the gallery cannot reach (not served, no registered map) fails clearly, exit 2
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "evaluate", *flags, "--set", "old_model.name=v0"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "no registered transformation maps 'v2' to old_model 'v0'" in bad.stderr
