"""`jobs/benchmark_real.py --quick` runs every step of the real benchmark end to end (with tiny
random TorchScript models, so no wheel is needed): export, crops, the user's own embedding job,
adoption, backfill, three upgrades through the CLI, the ridge baseline and the page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_real_quick_writes_the_page_with_every_row(tmp_path: Path, ray_local) -> None:
    page, js = tmp_path / "real.md", tmp_path / "real.json"
    args = ["--quick", "--workdir", str(tmp_path / "wd"), "--out", str(page), "--json", str(js)]
    r = subprocess.run(
        [sys.executable, "jobs/benchmark_real.py", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        # its `carryover` commands join the session's Ray (RAY_ADDRESS) instead of each
        # starting one
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["quick"] is True and res["models"]["new"]["pretrained"] is False
    assert res["data"] == {"photos": 8, "crops_per_photo": 12, "images": 96}
    assert res["existing_max_abs_diff"] < 1e-4  # the user's job = carryover's own embedding
    ridge = res["ridge"]
    assert ridge["train_pairs"] + ridge["val_rows"] == 96
    assert ridge["new/new"]["recall"] == pytest.approx(100.0)
    assert 0 <= ridge["ridge"]["recall"] <= 100
    lab = {c["name"]: c for c in res["planned"]["compat"]["cases"]}
    unl = {c["name"]: c for c in res["unlabelled"]["compat"]["cases"]}
    assert lab["new/fct"]["top1"] is not None and unl["new/fct"]["top1"] is None
    # the adopted gallery has no side-info; the one carryover ingests has it, at 64 px
    assert res["planned"]["transformation"]["side_info_model"] is None
    assert res["side"]["transformation"]["side_info_model"] == "side-info"
    assert "new/fct" in {c["name"] for c in res["side"]["compat"]["cases"]}
    assert res["planned"]["plan"]["measure"] == "top-1"
    assert res["unlabelled"]["plan"]["measure"] == "R@10"
    text = page.read_text()
    assert "QUICK SMOKE RUN: tiny RANDOM models" in text
    assert "| **ridge old→new (baseline)** |" in text and "## Targets (issue 17)" in text
    assert text.count("| planned 25% (estimate → measured) |") == 1
