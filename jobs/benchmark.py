"""`make bench`: every hot path beside its physical floor, measured in one run on this machine.

Generates its own data, prints a table of ratios and writes docs/benchmarks.md (and a JSON of
the figures, and the measured throughput profile the planner prices work with). The defaults
finish in under 20 minutes on 2 cores; `--tiny` runs every section in seconds (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

SECTIONS = ("transform", "backfill", "cost", "index", "training", "evaluation", "serve")
TINY = {
    "rows": 20_000,
    "images": 2_000,
    "index_rows": 5_000,
    "eval_queries": 500,
    "train_steps": 3,
    "cost_seconds": 0.5,
    "cost_batch": 2,
    "cost_rows": 20_000,
    "workers": "1",
    "shards": 4,
    "serve_rows": 2_000,
    "serve_queries": 40,
    "serve_cli_runs": 1,
}


def run(args: argparse.Namespace, console: Console) -> list:
    """Each selected section in turn; returns all figures."""
    from pipeline.bench import backfill, cost, evaluation, index, serve, training, transform

    wd = Path(args.workdir or tempfile.mkdtemp(prefix="carryover-bench-"))
    todo = {
        "transform": lambda: transform.run_transform(wd, rows=args.rows, shards=args.shards),
        "backfill": lambda: backfill.run_backfill(wd, images=args.images, shards=args.shards),
        "cost": lambda: cost.run_cost(
            batch=args.cost_batch, seconds=args.cost_seconds, rows=args.cost_rows
        ),
        "index": lambda: index.run_index(rows=args.index_rows),
        "training": lambda: training.run_training(
            workers=tuple(int(w) for w in args.workers.split(",")), steps=args.train_steps
        ),
        "evaluation": lambda: evaluation.run_evaluation(
            queries=args.eval_queries, gallery=args.eval_queries
        ),
        "serve": lambda: serve.run_serve(
            wd, rows=args.serve_rows, queries=args.serve_queries, cli_runs=args.serve_cli_runs
        ),
    }
    figs = []
    for name in args.sections.split(","):
        if name not in todo:
            raise SystemExit(f"--sections: unknown section {name!r}; choose from {SECTIONS}")
        t0 = time.perf_counter()
        console.print(f"[bold cyan]▶ {name}[/]")
        got = todo[name]()
        figs.extend(got)
        console.print(f"[green]✓[/] {name} {time.perf_counter() - t0:.0f}s")
    if args.profile and "cost" in args.sections:
        profile_of(figs).save(args.profile)
        console.print(f"throughput profile: {args.profile} (plan.throughput_profile reads it)")
    return figs


def profile_of(figs: list):
    """The planner's throughput profile from the cost section's two measured rates."""
    from pipeline.bench.common import machine
    from pipeline.bench.profile import ThroughputProfile

    cost = {f.name: f for f in figs if f.section == "cost"}
    return ThroughputProfile(
        embed_images_per_second=cost["resnet50 images/s"].value,
        transform_rows_per_second=cost["transformation rows/s"].value,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        machine=machine(),
        model="ResNet-50 at 224 px (embed) vs the FCT-sized h for 128-d rows (transform)",
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.bench import training
    from pipeline.bench.common import machine
    from pipeline.bench.report import markdown, table

    console = Console(width=None if sys.stdout.isatty() else 160)
    t0 = time.perf_counter()
    figs = run(args, console)
    console.print(table(figs))
    command = "python jobs/benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    notes = {"Training on a GPU cluster": training.__doc__ or ""}
    text = markdown(figs, machine(), command.strip(), time.perf_counter() - t0, notes)
    if args.out:
        Path(args.out).write_text(text)
        console.print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps([f.to_dict() for f in figs], indent=2, default=str))
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--rows", type=int, default=1_000_000, help="transform: gallery rows")
    ap.add_argument("--shards", type=int, default=10, help="transform/backfill: shards")
    ap.add_argument("--images", type=int, default=100_000, help="backfill: images")
    ap.add_argument("--index-rows", type=int, default=1_000_000)
    ap.add_argument("--eval-queries", type=int, default=10_000, help="evaluation: queries=gallery")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--workers", default="1,2", help="training: worker counts")
    ap.add_argument("--cost-seconds", type=float, default=20.0, help="cost: ResNet-50 seconds")
    ap.add_argument("--cost-batch", type=int, default=16, help="cost: ResNet-50 batch")
    ap.add_argument("--cost-rows", type=int, default=200_000, help="cost: transformation rows")
    ap.add_argument("--serve-rows", type=int, default=100_000, help="serve: gallery rows")
    ap.add_argument("--serve-queries", type=int, default=2000, help="serve: HTTP queries")
    ap.add_argument("--serve-cli-runs", type=int, default=3, help="serve: CLI searches")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run in seconds")
    ap.add_argument("--workdir", help="where generated data goes (default: a temp dir)")
    ap.add_argument("--out", default="docs/benchmarks.md", help="markdown report ('' = none)")
    ap.add_argument("--json", help="also write the figures as JSON here")
    ap.add_argument("--profile", help="write the measured throughput profile (JSON) here")
    args = ap.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    return args


if __name__ == "__main__":
    raise SystemExit(main(parse()))
