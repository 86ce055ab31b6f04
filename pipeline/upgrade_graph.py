"""The upgrade graph: models → h → evaluate → plan → execute → index → validate → promote."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from io import StringIO
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, dump_config
from pipeline.context import Context
from pipeline.display import plan_table, validation_table
from pipeline.graph.dag import Stage, StageLog, StageRun
from pipeline.io import uri as uri_io
from pipeline.services import compat_steps as cs
from pipeline.services import models, steps
from pipeline.services.inputs import gallery_version_ref
from pipeline.services.upgrade import (
    compute_plan,
    execute_plan,
    finalize_target,
    load_report,
    validate_target,
)
from pipeline.tracking import flatten
from pipeline.upgrade.plan import Plan, PlanSettings
from pipeline.upgrade.validate import ValidationFailed

# Config sections whose change makes an in-progress version a different upgrade; the plan's
# are every field of PlanSettings, so a new planner setting is part of the identity.
IDENTITY_KEYS = (
    "gallery",
    "images",
    "old_model",
    "new_model",
    "side_info",
    "transformation",
    "data",
    *(f"plan.{f.name}" for f in fields(PlanSettings)),
)


def config_identity(cfg: Any) -> dict[str, Any]:
    """The config's IDENTITY_KEYS, flattened: what `_identity.json` records for a version."""
    flat = flatten(dump_config(cfg))
    return {
        k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in IDENTITY_KEYS)
    }


def check_identity(ctx: Context, log: StageLog, restart: bool) -> None:
    """A rerun must be the same upgrade: refuse (or, with restart, discard) one begun with a
    different config, so a resumed version never mixes two plans."""
    g, target = ctx.gallery, ctx.cfg.target_version
    ident = config_identity(ctx.cfg)
    rec = log.get("_identity")
    if restart and g.has_version(target) and g.current() == target:
        raise ConfigError(f"--restart: {target!r} is the serving version; roll back first")
    if restart:
        uri_io.delete(g.version_uri(target), g.storage)
        rec = None
    if rec is None:
        log.put("_identity", {"output": ident, "seconds": 0})
        return
    changed = sorted(
        k for k in set(ident) | set(rec["output"]) if ident.get(k) != rec["output"].get(k)
    )
    # Plan settings only bind once a plan is recorded: before that, changing them is fine.
    if log.get("plan") is None:
        changed = [k for k in changed if not k.startswith("plan.")]
    if changed:
        raise ConfigError(
            f"version {target!r} was started with a different config ({', '.join(changed[:6])}"
            f"{'…' if len(changed) > 6 else ''} changed): rerun with the same config, or "
            "--restart to discard it, or set plan.target_version"
        )
    log.put("_identity", {"output": ident, "seconds": 0})


def plan_of(output: dict[str, Any]) -> Plan:
    """The plan a stage record holds. A record written before each shard's work carried its
    source and chain kept them beside the plan, under "_work": they are merged back."""
    legacy = {w["shard_id"]: w for w in output.get("_work") or []}
    shards = [
        {**s, **{k: legacy[s["shard_id"]].get(k) for k in _LEGACY_KEYS}}
        if s["shard_id"] in legacy
        else s
        for s in output["shards"]
    ]
    plan = {k: v for k, v in output.items() if not k.startswith("_")}
    return Plan.from_json(json.dumps({**plan, "shards": shards}))


_LEGACY_KEYS = ("chain", "source_uri", "image_file")


def print_plan(plan: Plan, console: Console) -> None:
    console.print(plan_table(plan))
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")


def _optional(fn: Any) -> Any:
    """A stage whose step returns a result dataclass, or None when it has nothing to do."""
    return lambda _, r: asdict(res) if (res := fn(r)) is not None else None


class UpgradeStages:
    """The stages' bodies: each gets its inputs and its StageRun from the engine."""

    def __init__(self, ctx: Context, console: Console, estimate: Any = None) -> None:
        self.ctx, self.cfg, self.console = ctx, ctx.cfg, console
        # The first estimate found re-embedding everything cheaper, and the config says act
        # on it: no side-info model and no h are trained; the plan backfills every shard.
        self.backfill_only = (
            estimate is not None
            and estimate.cheaper == "full backfill"
            and ctx.cfg.plan.when_backfill_cheaper == "backfill"
        )

    def ingest(self, _: dict, r: StageRun) -> dict[str, Any]:
        ctx, old = self.ctx, self.cfg.old_model
        cur = ctx.gallery.current()
        if cur is not None:
            return {"source_version": cur, "ingested": False}
        v = steps.embed_version_step(ctx, old, "embed", models.side_blob(ctx))
        steps.promote_step(ctx, old.name)
        return {"source_version": old.name, "ingested": True, **asdict(v)}

    def transformation(self, _: dict, r: StageRun) -> dict[str, Any] | None:
        if self.backfill_only:
            self.console.print("re-embedding every image is cheaper: no h is trained")
            return None
        out = cs.train_transformation_step(self.ctx)
        if out is not None:  # what transforming a row costs, beside what the model does
            self.console.print(
                f"h: width {out['inner_dim']}, {out['h_params'] / 1e6:.2f} M parameters, "
                f"{out['h_mflops_per_row']:.1f} MFLOP per row"
            )
        direct = cs.train_direct_step(self.ctx)
        if out is not None and direct is not None:  # the gallery is generations behind
            self.console.print(
                f"direct h from {direct['from_model']}: the evaluation measures it against "
                "the registered maps composed"
            )
            out["direct"] = direct
        return out

    def evaluate(self, _: dict, r: StageRun) -> dict[str, Any]:
        report, files = cs.evaluate_compat_step(self.ctx, register_adapters=True)
        return {"report": json.loads(report.to_json()), "files": files}

    def plan(self, inp: dict, r: StageRun) -> dict[str, Any]:
        source, report = inp["ingest"]["source_version"], inp["evaluate"]["report"]
        p, _ = compute_plan(self.ctx, source, report, self.ctx.quiet)
        print_plan(p, self.console)
        r.log_dict(json.loads(p.to_json()), "plan.json")
        if r.run is not None:  # what this upgrade's models cost, beside what the plan spends
            rates = {
                k: p.budget.get(k) for k in ("embed_rows_per_second", "transform_rows_per_second")
            }
            r.run.log_metrics({k: v for k, v in rates.items() if v})
        return json.loads(p.to_json())

    def execute(self, inp: dict, r: StageRun) -> dict[str, Any]:
        # the upgrade run (parent) lists the same inputs: the UI leads from it to data and models
        return execute_plan(self.ctx, plan_of(inp["plan"]), r.run, self.ctx.quiet, r.parent)

    def index(self, inp: dict, r: StageRun) -> dict[str, Any]:
        parent_id = r.parent.run_id if r.parent is not None else None
        plan = plan_of(inp["plan"])
        out = finalize_target(self.ctx, plan, parent_id)
        r.log_dict(self.ctx.gallery.manifest(self.cfg.target_version), "manifest.json")
        built = gallery_version_ref(
            self.ctx.gallery, self.cfg.gallery_name, self.cfg.target_version, "built"
        )
        for run in {id(x): x for x in (r.run, r.parent) if x is not None}.values():
            run.log_inputs([built])
        return out

    def validate(self, inp: dict, _: StageRun) -> dict[str, Any]:
        rep = validate_target(self.ctx, plan_of(inp["plan"]))
        if not rep.ok:
            buf = StringIO()
            Console(file=buf, width=140).print(validation_table(rep))
            raise ValidationFailed(
                f"version {rep.version!r} failed validation; CURRENT stays "
                f"{self.ctx.gallery.current()!r}\n" + buf.getvalue()
            )
        return rep.to_dict()

    def _side_info(self) -> Any:
        return None if self.backfill_only else models.train_side_info_step(self.ctx)

    def graph(self) -> list[Stage]:
        """The graph's nodes, in a topological order."""
        ctx, old, new = self.ctx, self.cfg.old_model, self.cfg.new_model
        return [
            Stage("old-model", _optional(lambda r: models.train_step(ctx, old))),
            Stage("side-info", _optional(lambda r: self._side_info())),
            Stage("ingest", self.ingest, ("old-model", "side-info")),
            Stage(
                "new-model",
                _optional(lambda r: models.train_step(ctx, new, ("candidate",))),
            ),
            Stage("transformation", self.transformation, ("ingest", "new-model")),
            Stage("evaluate", self.evaluate, ("transformation",)),
            Stage("plan", self.plan, ("ingest", "evaluate")),
            Stage("execute", self.execute, ("plan",)),
            Stage("index", self.index, ("plan", "execute")),
            Stage("validate", self.validate, ("plan", "index")),
            Stage(
                "promote",
                lambda _, r: steps.promote_step(ctx, self.cfg.target_version),
                ("validate",),
            ),
        ]


def upgrade_stages(ctx: Context, console: Console, estimate: Any = None) -> list[Stage]:
    """The upgrade graph's stages, in a topological order."""
    return UpgradeStages(ctx, console, estimate).graph()


def _missing_for_plan(ctx: Context, source: str | None) -> list[str]:
    """The stages a plan needs that have not produced their outputs yet."""
    missing = []
    if source is None:
        missing.append("ingest (the gallery has no serving version)")
    if not (cs.transformation_dir(ctx) / "model.json").exists():
        missing.append("transformation")
    if not (cs.default_report_dir(ctx) / "report.json").exists():
        missing.append("evaluate")
    return missing


def dry_run(ctx: Context, console: Console) -> Plan | None:
    """Print the graph's stages (done / pending) and the plan; write and train nothing."""
    g, target = ctx.gallery, ctx.cfg.target_version
    log = StageLog(g, target)
    t = Table(title=f"upgrade graph → {target} (dry run: nothing is executed)")
    for c in ("stage", "needs", "status", "seconds"):
        t.add_column(c)
    for s in upgrade_stages(ctx, console):
        rec = log.get(s.name)
        status = "[green]done[/]" if rec else "pending"
        t.add_row(s.name, ", ".join(s.needs), status, f"{rec['seconds']:.1f}" if rec else "")
    console.print(t)
    rec = log.get("plan")
    if rec is not None:
        plan = plan_of(rec["output"])
        console.print(plan_table(plan))
        return plan
    ingest = log.get("ingest")
    source = ingest["output"]["source_version"] if ingest else g.current()
    missing = _missing_for_plan(ctx, source)
    if missing:
        console.print(f"the plan needs these stages first: {', '.join(missing)}")
        return None
    plan, _ = compute_plan(ctx, source, load_report(ctx), ctx.quiet, train_missing=False)
    print_plan(plan, console)
    return plan


def plan_command(
    ctx: Context, source: str | None, out: str | Path | None, console: Console
) -> tuple[Plan, Path]:
    """`carryover plan`: facts + plan from the trained models and the evaluation report;
    prints the table, saves the JSON and logs it to an MLflow run."""
    g = ctx.gallery
    source = source or g.current()
    if source is None:
        raise FileNotFoundError(f"{g.uri}: no serving version to plan from; ingest first")
    if not (cs.transformation_dir(ctx) / "model.json").exists():
        raise FileNotFoundError(
            f"no trained transformation at {cs.transformation_dir(ctx)}: run "
            "`carryover upgrade --until evaluate` (or `carryover train --which transformation`); "
            "`carryover plan --estimate` prices the upgrade before anything is trained"
        )
    plan, _ = compute_plan(ctx, source, load_report(ctx), ctx.quiet)
    path = Path(out or Path(ctx.cfg.workdir) / "plans" / f"{ctx.cfg.target_version}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.to_json())
    print_plan(plan, console)
    with ctx.tracker.run("plan", ctx.tags(step="plan", to_version=ctx.cfg.target_version)) as run:
        run.log_artifact(path)
        run.log_metrics(
            {
                "expected_top1": plan.expected_top1,
                "transform_top1": plan.transform_top1,
                "full_top1": plan.full_top1,
                "reembed_rows": plan.reembed_rows,
                **{f"shards_{k}": v for k, v in plan.counts.items()},
            }
        )
    return plan, path
