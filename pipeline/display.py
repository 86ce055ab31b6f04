"""Tables and progress bars of the upgrade: the edge that renders plans, validation and versions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.upgrade.plan import Plan, pct

if TYPE_CHECKING:  # start-up: validate imports the metrics (torch, ~1.5 s); tables only read it
    from pipeline.upgrade.validate import ValidationReport


def _budget_text(plan: Plan) -> str:
    images, seconds = plan.budget.get("images"), plan.budget.get("seconds")
    parts = [f"{images:,} images"] if images is not None else []
    parts += [f"{seconds:,.0f} s"] if seconds is not None else []
    return " / ".join(parts) or "unlimited"


def _estimate_text(plan: Plan) -> str:
    if plan.estimate == "simulated":
        curve = f", curve {plan.curve_top1:.2f}" if plan.curve_top1 is not None else ""
        return f"simulated on {plan.estimate_rows:,} validation rows{curve}"
    return f"from the {plan.curve_ordering} backfilling curve"


def _plan_caption(plan: Plan) -> str:
    share = plan.reembed_rows / plan.total_rows if plan.total_rows else 0.0
    lines = [
        f"re-embed {plan.reembed_rows:,} of {plan.total_rows:,} images ({pct(share)}) · "
        f"budget {_budget_text(plan)} · est. cost {plan.cost_seconds:,.1f} s · "
        f"expected {plan.measure} {plan.expected_top1:.2f} (transform-only "
        f"{plan.transform_top1:.2f}, full {plan.full_top1:.2f}; {_estimate_text(plan)})"
    ]
    eps, tps = (
        plan.budget.get("embed_rows_per_second"),
        plan.budget.get("transform_rows_per_second"),
    )
    if eps and tps:
        lines.append(
            f"priced: new model {eps:,.0f} images/s, h {tps:,.0f} rows/s "
            f"(a transform costs 1/{tps / eps:,.0f} of a re-embedding)"
        )
    if any(int(k) > 1 for k in plan.hops):
        mix = ", ".join(f"{n:,} × {k}" for k, n in plan.hops.items())
        lines.append(
            f"rows to upgrade by maps since embedded, if mapped: {mix}; "
            f"{plan.forced_rows:,} past plan.max_chain_length re-embedded first"
        )
    if plan.chain_choice:
        q, name = plan.chain_choice["quality"], plan.chain_choice["chosen"]
        figs = ", ".join(f"{k} {v:.2f}" for k, v in q.items())
        lines.append(f"maps with {name} ({plan.chain_choice['measure']}: {figs})")
    lines += [f"warning: {escape(w)}" for w in plan.warnings]
    return "\n".join(lines)


def plan_table(plan: Plan) -> Table:
    """One row per shard: method, re-embed rows, availability, cost, gain and reason."""
    t = Table(title=f"backfill plan → {plan.target}", caption=_plan_caption(plan))
    for name in ("shard", "rows", "method", "re-embed", "images", "side-info", "space"):
        t.add_column(name, justify="right" if name in ("shard", "rows", "re-embed") else "left")
    t.add_column("cost (s)", justify="right")
    t.add_column(f"+{plan.measure}", justify="right")
    t.add_column("reason", overflow="fold")
    for s in plan.shards:
        t.add_row(
            str(s.shard_id),
            f"{s.rows:,}",
            s.method,
            f"{s.reembed_rows:,} ({pct(s.fraction)})",
            "yes" if s.images_available else "gone",
            "yes" if s.has_side_info else "no",
            escape(s.space),
            f"{s.cost_seconds:,.1f}",
            f"{s.expected_gain:+.2f}",
            escape(s.reason),
        )
    return t


def validation_table(report: ValidationReport) -> Table:
    """Each check with pass/FAIL and its detail."""
    t = Table(title=f"validation of {report.version} (from {report.source_version})")
    for c in ("check", "result", "detail"):
        t.add_column(c)
    for c in report.checks:
        t.add_row(c["check"], "[green]pass[/]" if c["ok"] else "[red]FAIL[/]", c["detail"])
    return t


def shard_progress(label: str, total: int, quiet: bool) -> Progress:
    """Shards done/total, rows, rows/s and ETA."""
    p = Progress(
        TextColumn(f"{label}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} shards"),
        TextColumn("{task.fields[rows]:,} rows  {task.fields[rps]:,.0f} rows/s"),
        TimeRemainingColumn(),
        disable=quiet,
    )
    p.add_task(label, total=total, rows=0, rps=0.0)
    return p


def training_progress(label: str, epochs: int, quiet: bool) -> Progress:
    """One training stage: epoch, step, loss and ETA (from what rank 0 reports)."""
    p = Progress(
        TextColumn(f"{label}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}/{task.total:.0f}"),
        TextColumn("step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        disable=quiet,
    )
    p.add_task(label, total=epochs, epoch=1, step="0", loss="-")
    return p


def versions_table(title: str, versions: dict[str, dict[str, Any]], serving: str | None) -> Table:
    """One row per gallery version; the serving one starred."""
    t = Table(title=title)
    for col in ("version", "model", "method", "rows", "rejected", "shards", "from", "index"):
        t.add_column(col, justify="right" if col in ("rows", "rejected", "shards") else "left")
    for v, d in versions.items():
        t.add_row(
            v + (" *" if v == serving else ""),
            str(d["model"]),
            str(d["method"]),
            str(d["rows"]),
            str(d["rejected"]),
            str(d["shards"]),
            str(d.get("source_version") or "-"),
            str(d.get("index") or "-"),
        )
    return t
