"""Where Ray Train keeps checkpoints, which locations workers need shared, and the records
that say an upgrade is already finished (no Ray, no MLflow)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from pipeline.cluster import train_storage, train_storage_uri, worker_locations
from pipeline.config import load_config
from pipeline.context import Context
from pipeline.flows import finished_upgrade, print_summary, run_upgrade
from pipeline.graph.dag import StageLog
from pipeline.io import uri
from pipeline.upgrade_graph import config_identity


def test_train_storage_follows_the_gallery_or_the_setting(tmp_path: Path) -> None:
    local = load_config(None, [f"workdir={tmp_path}"])
    assert train_storage_uri(local) == str(tmp_path / "ray_results")
    assert not train_storage(local).is_s3
    on_s3 = load_config(None, [f"workdir={tmp_path}", "gallery=s3://b/g", "images=s3://b/i"])
    assert train_storage_uri(on_s3) == "s3://b/g/_ray_results"
    loc = train_storage(on_s3)
    assert loc.is_s3 and loc.path == "b/g/_ray_results"
    assert worker_locations(on_s3) == {
        "gallery": "s3://b/g",
        "images": "s3://b/i",
        "ray.storage_path": "s3://b/g/_ray_results",
    }
    chosen = load_config(None, [f"workdir={tmp_path}", "ray.storage_path=s3://c/rr"])
    assert train_storage_uri(chosen) == "s3://c/rr"


def _finished(workdir: Path, sets: list[str]) -> Context:
    """A gallery whose records say v2 was built with `sets` and serves."""
    ctx = Context(load_config(None, [f"workdir={workdir}", *sets]))
    g = ctx.gallery
    uri.write_json(g.path("versions", "v2", "manifest.json"), {"shards": [], "rows": 0})
    StageLog(g, "v2").put("_identity", {"output": config_identity(ctx.cfg), "seconds": 0})
    uri.write_json(g.path("CURRENT"), {"version": "v2", "history": ["v1", "v2"]})
    return ctx


def test_finished_upgrade_is_decided_from_records(tmp_path: Path) -> None:
    ctx = _finished(tmp_path, ["plan.budget_fraction=0.25"])
    assert finished_upgrade(ctx) is True
    # a config that would build a different version is not finished
    other = Context(load_config(None, [f"workdir={tmp_path}", "plan.budget_fraction=0.5"]))
    assert finished_upgrade(other) is False
    # settings outside the identity (where it runs, tracking) do not matter
    moved = ["plan.budget_fraction=0.25", "ray.address=10.0.0.1:6379", "tracking.experiment=x"]
    assert finished_upgrade(Context(load_config(None, [f"workdir={tmp_path}", *moved])))
    # another target, or CURRENT rolled back: not finished
    v3 = ["plan.budget_fraction=0.25", "plan.target_version=v3"]
    assert finished_upgrade(Context(load_config(None, [f"workdir={tmp_path}", *v3]))) is False
    uri.write_json(ctx.gallery.path("CURRENT"), {"version": "v1", "history": ["v1"]})
    assert finished_upgrade(ctx) is False


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_rerun_of_a_finished_upgrade_opens_no_run(tmp_path: Path, monkeypatch) -> None:
    def no_tracking(self):
        raise AssertionError("MLflow was used")

    sets = ["plan.budget_fraction=0.25"]
    ctx = _finished(tmp_path, sets)
    before = _listing(tmp_path / "gallery")
    monkeypatch.setattr(Context, "tracker", property(no_tracking))
    out = io.StringIO()
    cfg = load_config(None, [f"workdir={tmp_path}", *sets])
    report = run_upgrade(cfg, console=Console(file=out))
    print_summary(report, Console(file=out))
    assert out.getvalue() == "v2 is already serving: nothing to do\n"
    assert report.nothing_to_do and report.parent_run_id is None and report.stages == {}
    assert report.serving == "v2" and list(report.versions) == ["v2"]
    assert _listing(tmp_path / "gallery") == before  # not a record written, not even the lock
    assert ctx.gallery.current() == "v2"
