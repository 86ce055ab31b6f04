"""Benchmark (not a test): a gallery taken through four model generations v1 → v2 → v3 → v4 on
MNIST. For each generation: chained maps (h12∘h23∘…), one direct map from v1, a full backfill,
and a nightly planned gallery (25% re-embedded, the rest mapped one step: rows of mixed chains),
each scored for the new model's queries (top-1, mAP, recall@10) and priced (maps trained, rows/s
measured, seconds for this gallery and for 1 M rows). Prints a table per generation; writes
docs/results-generations.md and docs/img/generations.png (--quick: under the workdir).

    python jobs/benchmark_generations.py [--data ../shared/data/mnist10k.npz] [--quick]
        [--workdir DIR] [--set key=value ...] [--json [PATH]]

Exit status: 0 done, 2 bad input (data file, config key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from pipeline.bench import generations as gb
from pipeline.bench import generations_page as page
from pipeline.config import ConfigError, load_config
from pipeline.embed.features import collect, paired_features
from pipeline.embed.rates import embed_rate
from pipeline.models.store import build_model
from pipeline.services import compat_steps as cs
from pipeline.services import models, steps

HERE = Path(__file__).resolve().parent
# name, classes (None: all), widths; dim, preprocess and train settings come from new_model.
GENERATIONS = [
    ("v1", [0, 1, 2, 3, 4], [8, 16, 32]),
    ("v2", [0, 1, 2, 3, 4, 5, 6], [12, 24, 48]),
    ("v3", [0, 1, 2, 3, 4, 5, 6, 7, 8], [16, 32, 64]),
    ("v4", None, [16, 32, 64]),
]
# FCT maps (MSE): h12, h23, h34 chained, h13, h14 direct. FastFill's one-step maps (-ff) carry
# the uncertainty that orders the planned gallery's re-embedding.
MAPS = [(0, 1, ""), (1, 2, ""), (2, 3, ""), (0, 2, ""), (0, 3, "")]
MAPS += [(0, 1, "-ff"), (1, 2, "-ff"), (2, 3, "-ff")]
QUICK = ["new_model.train.epochs=1", "transformation.train.epochs=2"]
FRACTION, ORDERS, RATE_ROWS = 0.25, ("uncertainty", "random"), 1024


def stdout_to_stderr() -> int:
    """Point fd 1 at stderr; returns a duplicate of the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    return saved


@contextmanager
def stdout_restored(saved: int):
    sys.stdout.flush()
    os.dup2(saved, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(2, 1)  # anything Ray prints on shutdown stays off stdout


class Clock:
    """Wall time per step, each announced with a ▶ line."""

    def __init__(self, console: Console):
        self.console, self.secs = console, {}

    def __call__(self, name, fn, *a):
        t0 = time.perf_counter()
        self.console.print(f"[bold cyan]▶ {name}[/]")
        out = fn(*a)
        self.secs[name] = round(time.perf_counter() - t0, 1)
        return out


def generation_models(cfg) -> list:
    base = cfg.new_model
    out = []
    for name, classes, widths in GENERATIONS:
        m = base.model_copy(update={"name": name}, deep=True)
        m.train.classes, m.architecture.widths = classes, widths
        out.append(m)
    return out


def classes_label(m) -> str:
    c = m.train.classes
    return "classes all" if c is None else f"classes {c[0]}-{c[-1]}"


def train_all(cfg, gens, clock: Clock) -> tuple[dict, dict]:
    """Every model and map: directories of h<a><b> and each map's training seconds."""
    ctx = steps.Context(cfg, quiet=True)
    for m in gens:
        clock(f"train {m.name} ({classes_label(m)})", models.train_step, ctx, m)
    dirs, secs = {}, {}
    for a, b, kind in MAPS:
        name = f"h{a + 1}{b + 1}{kind}"
        loss = "fastfill" if kind else "fct"
        tc = cfg.transformation.model_copy(update={"name": name, "loss": loss})
        pair = {"old_model": gens[a], "new_model": gens[b], "transformation": tc}
        vctx = steps.Context(cfg.model_copy(update=pair), quiet=True)
        t0 = time.perf_counter()
        clock(f"train {name} ({gens[a].name} → {gens[b].name})", cs.train_transformation_step, vctx)
        secs[name], dirs[name] = time.perf_counter() - t0, cs.transformation_dir(vctx)
    return dirs, secs


def held_out(cfg, blobs: dict) -> dict:
    """Every model's embeddings of the held-out split's rows (same rows, same order)."""
    ds = paired_features(cfg.images_uri, blobs, cfg.embed, cfg.storage, split="val")
    return collect(ds)


def embed_rates(cfg, blobs: dict) -> dict[str, float]:
    """Each model's rows/s (decode + embed) on a sample of the images, on the driver."""
    files = list(steps.image_shards(cfg).values())
    layout = steps.image_layout(cfg)
    out = {}
    for name, b in blobs.items():
        pre = b.preprocess
        out[name], _ = embed_rate(
            build_model(b), pre, files, cfg.storage, cfg.embed, RATE_ROWS, layout
        )
    return out


def settings(cfg, gens, data: str, quick: bool) -> dict:
    """What the page states about the run."""
    return {
        "data": data,
        "quick": quick,
        "val_fraction": cfg.data.val_fraction,
        "seed": cfg.data.seed,
        "input_size": cfg.new_model.preprocess.input_size,
        "embedding_dim": cfg.new_model.architecture.embedding_dim,
        "model_epochs": cfg.new_model.train.epochs,
        "map_epochs": cfg.transformation.train.epochs,
        "models": {
            m.name: {"classes": m.train.classes, "widths": m.architecture.widths} for m in gens
        },
        "fraction": FRACTION,
        "metric": cfg.evaluate.metric,
    }


def main(data: str, config: str, overrides: list[str], quick: bool, json_to: str | None) -> int:
    # --json alone: the one JSON line goes to stdout, everything else to stderr (Ray's worker
    # logs included: they are printed on the driver's fd 1, so fd 1 points at stderr meanwhile)
    console = Console(width=None if sys.stdout.isatty() else 150, stderr=json_to == "-")
    quiet_fd = stdout_to_stderr() if json_to == "-" else None
    cfg = load_config(config, overrides)
    clock = Clock(console)
    t0 = time.perf_counter()

    from pipeline.flows import ensure_images  # start-up: pulls Ray Data and the gallery stack

    clock("prepare images", ensure_images, cfg, data, 8)
    gens = generation_models(cfg)
    dirs, map_secs = train_all(cfg, gens, clock)
    ctx = steps.Context(cfg, quiet=True)
    blobs = {m.name: models.blob_of(ctx, m) for m in gens}
    val = clock("features of the held-out split", held_out, cfg, blobs)
    inp = gb.Inputs(
        names=[m.name for m in gens],
        sets={m.name: val[m.name] for m in gens},
        labels=val["label"],
        maps=dirs,
        map_seconds=map_secs,
        embed_rates=clock("embedding rows/s of each model", embed_rates, cfg, blobs),
        metric=cfg.evaluate.metric,
        k=cfg.evaluate.recall_k,
        fraction=FRACTION,
        orders=ORDERS,
        seed=cfg.data.seed,
    )
    results = clock("map, score and price every strategy", gb.evaluate_generations, inp)
    for g in gens[1:]:
        console.print(page.table(g.name, [r for r in results if r.generation == g.name]))
    clock.secs["total"] = round(time.perf_counter() - t0, 1)
    console.print(f"wall time per step (s): {clock.secs}")
    figures = {"settings": settings(cfg, gens, data, quick), "timings": clock.secs}
    figures["command"] = "python jobs/benchmark_generations.py " + " ".join(sys.argv[1:])
    figures["results"] = [r.figures() for r in results]
    out = Path(cfg.workdir) / "page" if quick else HERE.parent / "docs"
    files = page.write(results, figures, out, figures["command"])
    console.print(f"page: {files[0]}  plot: {files[1]}")
    if json_to == "-":
        with stdout_restored(quiet_fd):
            print(json.dumps(figures, separators=(",", ":")), flush=True)
    elif json_to:
        Path(json_to).write_text(json.dumps(figures, indent=1))
        console.print(f"figures: {json_to}")
    return 0


def replot(path: str) -> int:
    """Rewrite docs/results-generations.md and the plot from a saved --json file."""
    figures = json.loads(Path(path).read_text())
    results = gb.results_from_figures(figures["results"])
    md, png = page.write(results, figures, HERE.parent / "docs", figures["command"])
    print(f"page: {md}  plot: {png}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--data",
        default=str(HERE.parent.parent / "shared/data/mnist10k.npz"),
        help="an .npz with images and labels (default: the shared MNIST)",
    )
    ap.add_argument(
        "--config",
        default=str(HERE / "configs/benchmark_generations.yaml"),
        help="settings (default: jobs/configs/benchmark_generations.yaml)",
    )
    ap.add_argument("--workdir", help="default: the config's (.carryover/bench-generations)")
    ap.add_argument("--set", "-s", action="append", default=[], help="key=value override")
    ap.add_argument("--quick", action="store_true", help="tiny epochs: a smoke run")
    ap.add_argument(
        "--json", nargs="?", const="-", metavar="PATH", help="write the figures (alone: stdout)"
    )
    ap.add_argument("--replot", metavar="JSON", help="only rewrite the page from a --json file")
    args = ap.parse_args()
    if args.replot:
        raise SystemExit(replot(args.replot))
    if not Path(args.data).is_file():
        print(f"error: {args.data} not found (pass --data PATH.npz)", file=sys.stderr)
        raise SystemExit(2)
    sets = (QUICK if args.quick else []) + args.set
    sets += [f"workdir={args.workdir}"] if args.workdir else []
    try:
        raise SystemExit(main(args.data, args.config, sets, args.quick, args.json))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
