"""Benchmark: a budgeted, planned upgrade vs all-transform and full backfill, on a gallery that
grew class by class (later shards hold classes the old model never saw) with one shard's
images gone. Prints the per-shard plan and a table of measured figures."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.data.prepare import prepare
from pipeline.display import plan_table
from pipeline.flows import demo_config, run_upgrade
from pipeline.gallery.store import Gallery
from pipeline.upgrade.plan import Plan


def variant(workdir: str, sets: list[str], target: str, budget: float, promote: bool, console):
    """One upgrade of the same gallery into `target` under a budget; its figures."""
    cfg = demo_config(
        workdir, [*sets, f"plan.target_version={target}", f"plan.budget_fraction={budget}"]
    )
    t0 = time.perf_counter()
    rep = run_upgrade(cfg, quiet=True, console=console, until=None if promote else "validate")
    plan = Plan.from_json(json.dumps(rep.plan))
    g = Gallery(cfg.gallery_uri, cfg.storage)
    sources: dict[str, int] = {}
    for s in g.manifest(target)["shards"]:
        for k, n in s["sources"].items():
            sources[k] = sources.get(k, 0) + n
    return {
        "target": target,
        "budget_fraction": budget,
        "methods": {k: v for k, v in plan.counts.items() if v},
        "reembed_rows": plan.reembed_rows,
        "total_rows": plan.total_rows,
        "expected_top1": plan.expected_top1,
        "curve_top1": plan.curve_top1,
        "measured_top1": rep.validation["top1"],
        "transform_top1": plan.transform_top1,
        "full_top1": plan.full_top1,
        "execute_seconds": rep.execute.get("seconds"),
        "rows_per_second": rep.execute.get("rows_per_second"),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "sources": sources,
        "plan": json.loads(plan.to_json()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default=".carryover-bench-upgrade")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--gone", type=int, default=2, help="shard whose images are deleted")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--set", "-s", action="append", default=[], help="config override")
    ap.add_argument("--out", default=None, help="JSON results (default <workdir>/results.json)")
    args = ap.parse_args()
    console = Console(width=160)
    cfg = demo_config(args.workdir, args.set)
    if not Path(cfg.images_uri).exists():
        prepare("digits", cfg.images_uri, args.shards, cfg.storage, cfg.data, order="label")
    # train + ingest + evaluate once; every variant below reuses them
    run_upgrade(cfg, quiet=True, console=console, until="evaluate")
    gone = Path(cfg.images_uri) / f"shard-{args.gone:05d}.parquet"
    gone.unlink(missing_ok=True)
    rows = [
        variant(args.workdir, args.set, "v2-transform", 0.0, False, console),
        variant(args.workdir, args.set, "v2-full", 1.0, False, console),
        variant(args.workdir, args.set, "v2", args.budget, True, console),
    ]
    console.print(plan_table(Plan.from_json(json.dumps(rows[-1]["plan"]))))
    t = Table(
        title=f"planned upgrade v1 → v2, {args.shards} shards, images of shard "
        f"{args.gone} gone (top-1 on the validation split, new-model queries)"
    )
    for c in (
        "version",
        "budget",
        "methods",
        "re-embedded",
        "expected",
        "curve est.",
        "measured",
        "execute s",
        "rows/s",
    ):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r["target"],
            f"{r['budget_fraction']:.0%}",
            ", ".join(f"{k} {v}" for k, v in r["methods"].items()),
            f"{r['reembed_rows']}/{r['total_rows']}",
            f"{r['expected_top1']:.2f}",
            f"{r['curve_top1']:.2f}" if r["curve_top1"] is not None else "-",
            f"{r['measured_top1']:.2f}",
            f"{r['execute_seconds']}",
            f"{r['rows_per_second']}",
        )
    console.print(t)
    out = Path(args.out or Path(args.workdir) / "results.json")
    out.write_text(json.dumps(rows, indent=2))
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
