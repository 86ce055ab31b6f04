"""The generations benchmark's outputs: a rich table per generation, the plot and the page."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.bench.generations import MILLION, StrategyResult

COLUMNS = (
    "strategy",
    "hops",
    "top-1",
    "mAP",
    "R@10",
    "gap %",
    "map train s",
    "map rows/s",
    "embed rows/s",
    "s (gallery)",
    "s (1 M rows)",
)


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def cells(r: StrategyResult) -> list[str]:
    """One row's cells, in COLUMNS order."""
    q, c = r.quality, r.cost
    out = [r.strategy, r.hops, f"{q.top1:.2f}", f"{q.map:.2f}", f"{q.recall:.1f}", _num(r.gap)]
    if c is None:
        return out + ["—"] * 5
    rate = "{:,.0f}"
    return out + [
        _num(c.train_seconds),
        _num(c.map_rate, rate),
        _num(c.embed_rate, rate),
        _num(c.seconds(r.rows)),
        _num(c.seconds(MILLION), "{:,.0f}"),
    ]


def table(generation: str, rows: Iterable[StrategyResult]) -> Table:
    """The rich table of one generation."""
    t = Table(title=f"generation {generation}: query = {generation}, gallery = what is stored")
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("strategy", "hops") else "right")
    for r in rows:
        t.add_row(*cells(r))
    return t


def markdown(rows: Iterable[StrategyResult]) -> str:
    """A Markdown table of the same rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


NOTES = "## Notes"  # a hand-written section the next run keeps
SHARED = "chained = direct"  # one hop: the first generation's row is both lines' first point


def _in_series(r: StrategyResult, series: str) -> bool:
    return r.strategy == series or (r.strategy == SHARED and series in ("chained", "direct"))


def _pyplot() -> Any:
    # start-up: matplotlib with pyplot costs ~0.5 s and only the plot needs it.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt  # start-up: as above, and only after use("Agg")

    return plt


def plot(results: list[StrategyResult], out: Path) -> Path:
    """Top-1 and R@10 per generation, one line per strategy (old/old dashed)."""
    plt = _pyplot()
    gens = list(dict.fromkeys(r.generation for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "top1", "top-1 (%)"), (axes[1], "recall", "recall@10 (%)")):
        for strat in dict.fromkeys(r.strategy for r in results if r.strategy != SHARED):
            pts = [(gens.index(r.generation), r) for r in results if _in_series(r, strat)]
            xs = [x for x, _ in pts]
            ys = [getattr(r.quality, key) for _, r in pts]
            style = "--" if strat.startswith("old/old") else "-o"
            ax.plot(xs, ys, style, label=strat)
        ax.set_xticks(range(len(gens)), gens)
        ax.set_xlabel("generation (query model)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Gallery quality per generation and strategy (MNIST, held-out split)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # room for the legend below the panels
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pick(results: list[StrategyResult], gen: str, prefix: str) -> StrategyResult | None:
    return next((r for r in results if r.generation == gen and r.strategy.startswith(prefix)), None)


def _hops(h: str) -> str:
    return f"{h} hop" if h == "1" else f"{h} hops"


def findings(results: list[StrategyResult]) -> list[str]:
    """ "What it shows", computed from the measured rows (the page is regenerated each run)."""
    gens = list(dict.fromkeys(r.generation for r in results))
    out = []
    chain = [(g, _pick(results, g, "chained")) for g in gens]
    gaps = ", ".join(
        f"{g} ({_hops(r.hops)}) {r.gap:.1f}%" for g, r in chain if r and r.gap is not None
    )
    out.append(f"Chained maps recover, of the old/old → new/new top-1 gap: {gaps}.")
    for g in gens[1:]:
        c, d = _pick(results, g, "chained"), _pick(results, g, "direct")
        if c and d:
            out.append(
                f"{g}: the direct map (1 hop) against {_hops(c.hops)} chained: top-1 "
                f"{d.quality.top1 - c.quality.top1:+.2f} points, mAP "
                f"{d.quality.map - c.quality.map:+.2f}, "
                f"R@10 {d.quality.recall - c.quality.recall:+.1f}."
            )
    last = gens[-1]
    b, d = _pick(results, last, "backfill"), _pick(results, last, "direct")
    if b and d and b.cost and d.cost:
        out.append(
            f"{last}: a backfill costs {b.cost.seconds(MILLION):,.0f} s per million rows against "
            f"{d.cost.seconds(MILLION):,.0f} s for the direct map (its training included), for "
            f"{b.quality.top1 - d.quality.top1:+.2f} points of top-1 and "
            f"{b.quality.recall - d.quality.recall:+.1f} of R@10."
        )
    for r in (x for x in results if x.generation == last and x.strategy.startswith("planned")):
        out.append(
            f"{last}, {r.strategy}: rows by hops since their last embedding {r.hops}; top-1 "
            f"{r.quality.top1:.2f} (gap {r.gap:.1f}%), R@10 {r.quality.recall:.1f}."
        )
    return out


def write(
    results: list[StrategyResult], figures: dict, out: Path, command: str
) -> tuple[Path, Path]:
    """docs-style page + plot under `out` (results-generations.md, img/generations.png)."""
    png = plot(results, out / "img" / "generations.png")
    s = figures["settings"]
    lines = [
        "# Results: a gallery through four model generations (MNIST)",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Data: `{Path(s['data']).name}`, {s['input_size']}×{s['input_size']} px, held-out split "
        f"{s['val_fraction']:.0%} (seed {s['seed']}), {results[0].rows:,} rows: query set = "
        f"gallery set, self-match excluded, {s['metric']} distance. Models: {s['model_epochs']} "
        f"epochs each, dim {s['embedding_dim']}; maps (FCT's h, no side-info): "
        f"{s['map_epochs']} epochs; chained and direct maps use FCT's loss (MSE), the planned "
        "gallery's uncertainty order FastFill's (h-ff, its log-variance ranks the rows).",
        "",
        "| model | classes | widths |",
        "|---|---|---|",
    ]
    for name, m in s["models"].items():
        c = m["classes"]
        classes = "all" if c is None else f"{c[0]}-{c[-1]}"
        lines.append(f"| {name} | {classes} | {'-'.join(map(str, m['widths']))} |")
    lines += ["", "Wall time per step (s):", "", "| step | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in figures["timings"].items()]
    for g in dict.fromkeys(r.generation for r in results):
        lines += ["", f"## Generation {g}", "", markdown([r for r in results if r.generation == g])]
    lines += ["", "![quality per generation](img/generations.png)", "", "## What it shows", ""]
    lines += [f"- {f}" for f in findings(results)]
    md = out / "results-generations.md"
    md.write_text("\n".join(lines) + "\n" + _kept_notes(md))
    return md, png


def _kept_notes(md: Path) -> str:
    """The page's hand-written notes (from NOTES on), kept when a run rewrites the rest."""
    old = md.read_text() if md.exists() else ""
    at = old.find(NOTES)
    return "" if at < 0 else "\n" + old[at:]
