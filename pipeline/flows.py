"""Whole flows built from the steps: the embedded demo and a full-backfill upgrade."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from pipeline import upgrade_graph as ug
from pipeline.cluster import check_cluster
from pipeline.config import UpgradeConfig, dump_config, load_config
from pipeline.context import Context, gallery_lock
from pipeline.data.prepare import prepare
from pipeline.display import plan_table, validation_table, versions_table
from pipeline.evaluate.report import CompatReport
from pipeline.gallery.lock import TOKEN_ENV
from pipeline.gallery.records import version_summaries
from pipeline.graph.dag import GraphError, OpenRun, Stage, StageLog, StageRun, run_stages
from pipeline.io import uri as uri_io
from pipeline.io.redact import redact_text
from pipeline.ops.journal import JOB_ID_ENV
from pipeline.ops.progress import ProgressWriter
from pipeline.ops.runs import journalled_upgrade
from pipeline.runtime import native_stderr_to, route_logs
from pipeline.services.estimate import estimate_step
from pipeline.tracking import ui_hint
from pipeline.upgrade.plan import Plan
from pipeline.upgrade.validate import ValidationReport


@dataclass
class UpgradeReport:
    """Everything a finished (or stopped) upgrade reports: stages, plan, validation, runs."""

    gallery: str
    serving: str | None
    target: str
    parent_run_id: str | None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    execute: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    ui_hint: str = ""
    transformation: dict[str, Any] = field(default_factory=dict)
    compat: dict[str, Any] = field(default_factory=dict)
    compat_files: dict[str, str] = field(default_factory=dict)
    stopped_after: str | None = None
    nothing_to_do: bool = False  # the target version was already built and serving


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
    until: str | None = None,
    restart: bool = False,
) -> UpgradeReport:
    """Run the upgrade graph (resuming any recorded stage) under the gallery's lock, one MLflow
    child run per stage under the upgrade's parent run, and report what it did."""
    ctx = Context(cfg, quiet=quiet)
    console = console or Console()
    names = [s.name for s in ug.upgrade_stages(ctx, console)]
    if until is not None and until not in names:
        raise GraphError(f"--until {until!r}: no such stage; stages: {', '.join(names)}")
    # From records alone, before Ray, MLflow or any cache: a finished upgrade rerun (a nightly
    # schedule, a retried job) must not open a run or rewrite a record.
    if not restart and finished_upgrade(ctx):
        return _nothing_to_do(ctx)
    log_file = route_logs(cfg.log_path)  # Ray's and MLflow's lines: never through the bars
    if not quiet:
        console.print(f"[dim]logs of Ray and MLflow: {log_file}[/]")
    # Connect to MLflow first: an unreachable server fails the upgrade here, in seconds,
    # before it takes the gallery's lock, prepares images or writes any record.
    tracker = ctx.tracker
    route_logs()  # mlflow set up its own console handler on import
    target = cfg.target_version
    job_id = os.environ.get(JOB_ID_ENV)
    owner = f"carryover upgrade ({job_id or 'cli'})"
    token = os.environ.get(TOKEN_ENV) or None
    with (
        native_stderr_to(log_file),
        gallery_lock(cfg, owner, f"upgrade to {target}", token) as lock,
        journalled_upgrade(cfg, owner, quiet) as progress,
    ):
        log = StageLog(ctx.gallery, target)
        ug.check_identity(ctx, log, restart)
        check_cluster(cfg)  # on several nodes, refuse local paths before any work
        if prepare_source:
            ensure_images(cfg, prepare_source)
        source = ctx.gallery.current() or cfg.old_model.name
        lineage = {"from_version": source, "to_version": target}
        if job_id:
            lineage["job_id"] = job_id
        with tracker.run("upgrade", ctx.tags(step="upgrade", **lineage)) as parent:
            parent.log_dict(dump_config(cfg), "config.yaml")  # secrets masked
            estimate = _estimate(ctx, log, console, parent)
            events = _StageEvents(console, parent, log, progress)
            results = run_stages(
                ug.upgrade_stages(ctx, console, estimate),
                log,
                events,
                until,
                _child_runs(ctx, lock, parent, lineage),
            )
    return _report(ctx, results, events.stages, parent.run_id, until)


def _estimate(ctx: Context, log: StageLog, console: Console, parent: Any) -> Any:
    """Before anything is trained (a rerun past the transformation has decided already): the
    whole upgrade priced both ways, printed and logged to the upgrade's run."""
    if log.get("transformation") is not None:
        return None
    est = estimate_step(ctx)
    if est is not None:
        console.print(est.summary())
        parent.log_dict(est.to_dict(), "estimate.json")
        parent.log_metrics(
            {
                "estimate_full_seconds": est.full_seconds,
                "estimate_transform_seconds": est.transform_seconds,
            }
        )
    return est


def _child_runs(ctx: Context, lock: Any, parent: Any, lineage: dict[str, str]) -> OpenRun:
    """The engine's run opener: each stage in its own MLflow run under the upgrade's, after
    renewing the gallery's lease (LockLost if another holder took the gallery meanwhile)."""

    @contextlib.contextmanager
    def open_run(stage: Stage) -> Iterator[StageRun]:
        lock.renew()
        tags = ctx.tags(step=stage.name, stage=stage.name, **lineage)
        with ctx.tracker.run(stage.name, tags) as child:  # nests under the upgrade run
            yield StageRun(child, parent)

    return open_run


class _StageEvents:
    """Prints each stage's start and end, tags the parent run with it and puts it in the
    run's progress record."""

    def __init__(self, console: Console, parent: Any, log: StageLog, progress: ProgressWriter):
        self.console, self.parent, self.log, self.progress = console, parent, log, progress
        self.stages: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, event: str, secs: float) -> None:
        console, parent = self.console, self.parent
        if event == "start":
            console.print(f"[bold cyan]▶ {name}[/]")
            self.progress.stage(name)
            route_logs()  # Ray Train and Ray Data set up their loggers again as they start
            return
        self.progress.stage_done(name)
        self.stages[name] = {"status": event, "seconds": secs}
        mark = "✓" if event == "done" else "↻"
        note = "" if event == "done" else " (done in an earlier run)"
        console.print(f"[green]{mark}[/] {name} [dim]{secs:.1f}s{note}[/]")
        parent.set_tags({f"carryover.stage.{name}": event})
        if event == "resumed":  # point at the run of the upgrade attempt that did it
            earlier = (self.log.get(name) or {}).get("run_id")
            if earlier:
                parent.set_tags({f"carryover.stage.{name}.run_id": earlier})
        if event == "done":
            parent.log_metrics({f"stage_seconds_{name.replace('-', '_')}": secs})


def finished_upgrade(ctx: Context) -> bool:
    """The records say this config's upgrade is done: the target version has a manifest,
    CURRENT names it, and its recorded identity is this config's (a config that would build
    a different version is not finished)."""
    g, target = ctx.gallery, ctx.cfg.target_version
    if g.current() != target or not g.has_version(target):
        return False
    rec = StageLog(g, target).get("_identity")
    ident = json.loads(json.dumps(ug.config_identity(ctx.cfg)))  # as the record stores it
    return rec is not None and rec.get("output") == ident


def _nothing_to_do(ctx: Context) -> UpgradeReport:
    cfg = ctx.cfg
    return UpgradeReport(
        gallery=redact_text(cfg.gallery_uri),
        serving=cfg.target_version,
        target=cfg.target_version,
        parent_run_id=None,
        versions=version_summaries(ctx.gallery),
        tracking_uri=redact_text(cfg.tracking_uri),
        nothing_to_do=True,
    )


def _report(ctx: Context, results: dict, stages: dict, run_id: str, until: str | None):
    cfg, g = ctx.cfg, ctx.gallery
    plan = {k: v for k, v in (results.get("plan") or {}).items() if not k.startswith("_")}
    ev = results.get("evaluate") or {}
    versions = version_summaries(g)
    # The report is printed and written to files: URIs lose any user:password@ they carry.
    return UpgradeReport(
        gallery=redact_text(cfg.gallery_uri),
        serving=g.current(),
        target=cfg.target_version,
        parent_run_id=run_id,
        stages=stages,
        versions=versions,
        plan=plan,
        execute=results.get("execute") or {},
        validation=results.get("validate") or {},
        timings={k: v["seconds"] for k, v in stages.items()},
        tracking_uri=redact_text(cfg.tracking_uri),
        ui_hint=ui_hint(cfg.tracking_uri),
        transformation=results.get("transformation") or {},
        compat=ev.get("report") or {},
        compat_files=ev.get("files") or {},
        stopped_after=until if until and "promote" not in results else None,
    )


def print_summary(report: UpgradeReport, console: Console) -> None:
    """The upgrade's versions, compatibility report, plan, validation and stage times."""
    if report.nothing_to_do:
        console.print(f"{report.target} is already serving: nothing to do")
        return
    title = f"gallery {report.gallery} (serving: {report.serving})"
    console.print(versions_table(title, report.versions, report.serving))
    if report.compat:
        compat = CompatReport.from_json(json.dumps(report.compat))
        console.print(compat.table())
        if compat.curves:
            console.print(compat.curves_table())
        if report.compat_files:
            console.print(
                f"compatibility report: {Path(report.compat_files['report.json']).parent}"
            )
    # The plan stage prints the table as it plans (before the long execute stage): repeat it
    # here only when this run did not plan (the plan was resumed from an earlier run).
    if report.plan and report.stages.get("plan", {}).get("status") != "done":
        console.print(plan_table(Plan.from_json(json.dumps(report.plan))))
    if report.validation:
        v = {k: x for k, x in report.validation.items() if k != "ok"}
        console.print(validation_table(ValidationReport(**v)))
    tt = Table(title="stages (s)")
    tt.add_column("stage")
    tt.add_column("status")
    tt.add_column("seconds", justify="right")
    for k, d in report.stages.items():
        tt.add_row(k, d["status"], f"{d['seconds']:.1f}")
    tt.add_row("[bold]total[/]", "", f"{sum(report.timings.values()):.1f}")
    console.print(tt)
    if report.stopped_after:
        console.print(f"stopped after stage {report.stopped_after!r} (--until); rerun to go on")
    console.print(f"MLflow parent run: {report.parent_run_id}  tracking: {report.tracking_uri}")
    console.print(report.ui_hint)


def write_report(report: UpgradeReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(report), indent=2, default=str))


def run_demo(workdir: str, overrides: list[str] | None, console: Console, quiet: bool = False):
    """The embedded demo end to end; leaves report.json and the resolved config.yaml behind so
    later commands (`carryover evaluate -c <workdir>/config.yaml`) address the same gallery."""
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
