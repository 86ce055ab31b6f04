"""The benchmark's table (terminal) and docs/benchmarks.md (table, machine, command)."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.table import Table

from pipeline.bench.common import Figure


def _num(v: float | None) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _target(f: Figure) -> str:
    if f.target is None:
        return "—"
    return f"{'≥' if f.higher_is_better else '≤'} {f.target:g}×"


def _met(f: Figure) -> str:
    return {True: "yes", False: "NO", None: "—"}[f.met]


def table(figs: list[Figure]) -> Table:
    t = Table(title="carryover benchmark: each figure beside its baseline, measured in one run")
    for c in ("section", "figure", "value", "unit", "baseline", "baseline value", "ratio"):
        t.add_column(c, justify="right" if c in ("value", "baseline value", "ratio") else "left")
    t.add_column("target")
    t.add_column("met")
    for f in figs:
        t.add_row(
            f.section,
            f.name,
            _num(f.value),
            f.unit,
            f.baseline or "—",
            _num(f.baseline_value),
            "—" if f.ratio is None else f"{f.ratio:.2f}×",
            _target(f),
            _met(f),
        )
    return t


def _targets(figs: list[Figure]) -> list[str]:
    """How many targets were met; for each one missed: the gap, the profile, what was tried."""
    judged = [f for f in figs if f.met is not None]
    missed = [f for f in judged if not f.met]
    lines = ["", "## Targets", "", f"{len(judged) - len(missed)} of {len(judged)} targets met."]
    for f in missed:
        lines += [
            "",
            f"### Not met: {f.section} / {f.name}",
            "",
            f"- gap: {f.ratio:.2f}× against a target of {_target(f)} "
            f"({_num(f.value)} {f.unit} vs {_num(f.baseline_value)} {f.unit} for {f.baseline})",
            f"- profile: {f.note or '—'}",
            f"- already done: {f.tried or '—'}",
        ]
    return lines


def markdown(
    figs: list[Figure],
    machine: dict[str, Any],
    command: str,
    seconds: float,
    notes: dict[str, str] | None = None,
) -> str:
    """The whole docs/benchmarks.md: what was run, where, the table, each figure's note."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {when} in {seconds / 60:.1f} min. Every figure is",
        "measured in that run, beside its baseline measured in the same process tree; nothing",
        "here is typed in by hand. Rerun it to refresh this page.",
        "A real upgrade (photographs, pretrained 1,280-d models) is `make bench-real`:",
        "[results-real.md](results-real.md).",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        "",
        "## Figures",
        "",
        "| section | figure | value | unit | baseline | baseline value | ratio | target | met |",
        "|---|---|---:|---|---|---:|---:|---|---|",
    ]
    for f in figs:
        ratio = "—" if f.ratio is None else f"{f.ratio:.2f}×"
        lines.append(
            f"| {f.section} | {f.name} | {_num(f.value)} | {f.unit} | {f.baseline or '—'} | "
            f"{_num(f.baseline_value)} | {ratio} | {_target(f)} | {_met(f)} |"
        )
    lines += _targets(figs)
    lines += ["", "## Notes per figure", ""]
    for f in figs:
        if f.note:
            lines.append(f"- **{f.section} / {f.name}**: {f.note}")
    for title, text in (notes or {}).items():
        lines += ["", f"## {title}", "", text.strip()]
    lines += [
        "",
        "## Raw figures",
        "",
        "```json",
        json.dumps([f.to_dict() for f in figs], indent=1, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)
