"""Whole flows built from the steps: the embedded demo and a full-backfill upgrade."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.config import UpgradeConfig, load_config
from pipeline.graph import compat_steps as cs
from pipeline.graph import steps
from pipeline.io import uri as uri_io


@dataclass
class UpgradeReport:
    """Everything a finished upgrade reports: per-version facts, metrics, runs, timings."""

    gallery: str
    serving: str | None
    parent_run_id: str | None
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    ui_hint: str = ""
    transformation: dict[str, Any] = field(default_factory=dict)
    compat: dict[str, Any] = field(default_factory=dict)
    compat_files: dict[str, str] = field(default_factory=dict)


def demo_config(workdir: str, overrides: list[str] | None = None) -> UpgradeConfig:
    """The embedded demo: digits, v1 on classes 0-4 (smaller), v2 on all classes (larger)."""
    base = [
        f"workdir={workdir}",
        "gallery_name=digits",
        "old_model.train.epochs=10",
        "new_model.train.epochs=10",
        "new_model.architecture.widths=[16,32,64]",
        "new_model.architecture.embedding_dim=64",
    ]
    return load_config(None, base + list(overrides or []))


def ensure_images(cfg: UpgradeConfig, source: str = "digits", shards: int = 4) -> dict[str, Any]:
    """Prepare image shards if the images URI holds none yet (the demo's first step)."""
    from pipeline.data.prepare import prepare

    if uri_io.exists(cfg.images_uri, cfg.storage) and uri_io.parquet_files(
        cfg.images_uri, cfg.storage
    ):
        return {"prepared": False}
    res = prepare(source, cfg.images_uri, shards, cfg.storage, cfg.data)
    return {"prepared": True, "rows": res.rows, "shards": len(res.files)}


def run_upgrade(
    cfg: UpgradeConfig,
    quiet: bool = False,
    console: Console | None = None,
    prepare_source: str | None = None,
) -> UpgradeReport:
    """Train v1 + side-info → ingest v1 → train v2 → train h → full backfill into v2 →
    evaluate (versions and compatibility) → promote v2."""
    ctx = steps.Context(cfg, quiet=quiet)
    console = console or Console()
    timings: dict[str, float] = {}
    old, new = cfg.old_model, cfg.new_model

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        console.print(f"[bold cyan]▶ {name}[/]")
        out = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t0, 2)
        return out

    if prepare_source:
        timed("prepare images", ensure_images, cfg, prepare_source)
    with ctx.tracker.run(
        "upgrade", ctx.tags(step="upgrade", from_version=old.name, to_version=new.name)
    ) as parent:
        pid = parent.run_id
        m_old = timed(f"train {old.name}", steps.train_step, ctx, old, pid)
        m_side = timed("train side-info", cs.train_side_info_step, ctx, pid)
        side = cs.side_blob(ctx) if m_side is not None else None
        v_old = timed(f"ingest {old.name}", steps.embed_version_step, ctx, old, "embed", pid, side)
        if ctx.gallery.current() is None:
            steps.promote_step(ctx, old.name)
        m_new = timed(f"train {new.name}", steps.train_step, ctx, new, pid, ("candidate",))
        trans = timed("train transformation", cs.train_transformation_step, ctx, pid)
        v_new = timed(f"backfill {new.name}", steps.embed_version_step, ctx, new, "full", pid)
        evals = timed("evaluate", steps.evaluate_versions, ctx, [old.name, new.name])
        compat, files = timed("evaluate compatibility", cs.evaluate_compat_step, ctx, pid)
        timed(f"promote {new.name}", steps.promote_step, ctx, new.name)
        for v, m in evals.items():
            parent.log_metrics({f"{v}_{k}": float(x) for k, x in m.items()})
        parent.log_metrics(compat.metrics())
        parent.log_metrics({f"{k.replace(' ', '_')}_seconds": s for k, s in timings.items()})
    report = UpgradeReport(
        gallery=cfg.gallery_uri,
        serving=ctx.gallery.current(),
        parent_run_id=pid,
        versions={v.version: {**asdict(v), **evals.get(v.version, {})} for v in (v_old, v_new)},
        models={m.name: asdict(m) for m in (m_old, m_side, m_new) if m is not None},
        transformation=trans or {},
        compat=json.loads(compat.to_json()),
        compat_files=files,
        timings=timings,
        tracking_uri=cfg.tracking_uri,
        ui_hint=_ui_hint(cfg.tracking_uri),
    )
    return report


def _ui_hint(tracking_uri: str) -> str:
    from pipeline.tracking import ui_hint

    return ui_hint(tracking_uri)


def summary_table(report: UpgradeReport) -> Table:
    """The closing summary: one row per version."""
    t = Table(title=f"carryover upgrade — gallery {report.gallery} (serving: {report.serving})")
    for col in (
        "version",
        "method",
        "rows",
        "rejected",
        "shards",
        "rows/s",
        "top-1",
        "top-5",
        "mAP",
        "MLflow run",
    ):
        t.add_column(
            col, justify="right" if col not in ("version", "method", "MLflow run") else "left"
        )
    for v, d in report.versions.items():
        t.add_row(
            v + (" *" if v == report.serving else ""),
            d["method"],
            str(d["rows"]),
            str(d["rejected"]),
            str(d["shards"]),
            f"{d['rows_per_second']:.0f}",
            f"{d.get('top1', float('nan')):.1f}",
            f"{d.get('top5', float('nan')):.1f}",
            f"{d.get('map', float('nan')):.1f}",
            str(d.get("run_id") or "-"),
        )
    return t


def print_summary(report: UpgradeReport, console: Console) -> None:
    console.print(summary_table(report))
    if report.compat:
        from pipeline.evaluate.report import CompatReport

        compat = CompatReport.from_json(json.dumps(report.compat))
        console.print(compat.table())
        if compat.curves:
            console.print(compat.curves_table())
        if report.compat_files:
            console.print(
                f"compatibility report: {Path(report.compat_files['report.json']).parent}"
            )
    tt = Table(title="timings (s)")
    tt.add_column("stage")
    tt.add_column("seconds", justify="right")
    for k, s in report.timings.items():
        tt.add_row(k, f"{s:.1f}")
    tt.add_row("[bold]total[/]", f"{sum(report.timings.values()):.1f}")
    console.print(tt)
    console.print(f"MLflow parent run: {report.parent_run_id}  tracking: {report.tracking_uri}")
    console.print(report.ui_hint)


def write_report(report: UpgradeReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(report), indent=2, default=str))


def run_demo(workdir: str, overrides: list[str] | None, console: Console, quiet: bool = False):
    """The embedded demo end to end; leaves report.json and the resolved config.yaml behind so
    later commands (`carryover evaluate -c <workdir>/config.yaml`) address the same gallery."""
    import yaml

    from pipeline.config import dump_config

    cfg = demo_config(workdir, overrides)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    cfg_path = Path(workdir) / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
    rep = run_upgrade(cfg, quiet=quiet, console=console, prepare_source="digits")
    print_summary(rep, console)
    write_report(rep, Path(workdir) / "report.json")
    console.print(f"report: {Path(workdir) / 'report.json'}  config: {cfg_path}")
    console.print(f"next: carryover evaluate -c {cfg_path}   carryover versions -c {cfg_path}")
    return rep
