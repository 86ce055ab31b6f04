"""The `carryover` command line: one dispatch table of typer commands."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, UpgradeConfig, dump_config, load_config

app = typer.Typer(
    help="carryover: upgrade the embedding model behind an image gallery on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Image shards: prepare Parquet shards from datasets.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
# Off a terminal (CI logs, `ray job logs`) rich would wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="upgrade YAML config")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="override a config key, e.g. --set new_model.train.epochs=3 (repeatable)",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


def _errors(fn):
    """Map known failures to one clear line and a meaningful exit code (2 = bad input)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from pipeline.gallery.store import GalleryError
        from pipeline.graph.dag import GraphError
        from pipeline.io.uri import StorageError
        from pipeline.models.store import ModelLoadError
        from pipeline.plan.planner import PlanError

        try:
            return fn(*a, **kw)
        except (ConfigError, FileNotFoundError, ModelLoadError, PlanError, GraphError) as e:
            err.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
        except (GalleryError, StorageError) as e:
            err.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(1) from None
        except Exception as e:
            if type(e).__name__ == "TrackingError":
                err.print(f"[bold red]tracking error:[/] {e}")
                raise typer.Exit(1) from None
            raise

    return wrapper


def _cfg(config: Path | None, sets: list[str] | None, gallery: str | None = None) -> UpgradeConfig:
    cfg = load_config(config, sets)
    if gallery:
        cfg.gallery = gallery
    return cfg


def _ctx(cfg: UpgradeConfig, quiet: bool = False):
    from pipeline.graph.steps import Context

    return Context(cfg, quiet=quiet)


@data_app.command("prepare")
@_errors
def data_prepare(
    source: Annotated[
        str,
        typer.Option(
            help="digits | synthetic | PATH.npz (images, labels) | DIR of class sub-folders"
        ),
    ],
    out: Annotated[str, typer.Option(help="output URI (local path or s3://bucket/prefix)")],
    shards: Annotated[int, typer.Option(min=1, help="number of Parquet shards")] = 4,
    synthetic_n: Annotated[int, typer.Option(min=1, help="rows for --source synthetic")] = 2000,
    limit: Annotated[int | None, typer.Option(min=1, help="keep at most this many rows")] = None,
    order: Annotated[
        str,
        typer.Option(help="shuffle | label (shards grow class by class, like a drifting gallery)"),
    ] = "shuffle",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write Parquet image shards (key, PNG image, label, split) from a dataset."""
    from pipeline.data.prepare import prepare

    cfg = _cfg(config, set_)
    if order not in ("shuffle", "label"):
        raise ConfigError(f"--order must be shuffle or label, got {order!r}")
    res = prepare(
        source,
        out,
        shards,
        cfg.storage,
        cfg.data,
        synthetic_n=synthetic_n,
        limit=limit,
        order=order,
    )
    console.print(
        f"wrote {res.rows} rows in {len(res.files)} shards to {res.out_uri} ({res.seconds:.1f}s)"
    )


@app.command()
@_errors
def train(
    which: Annotated[
        str, typer.Option(help="old | new | side-info | transformation: which model to train")
    ] = "new",
    alias: Annotated[list[str] | None, typer.Option(help="registry alias(es) to set")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train a model of the config on Ray Train and register it in MLflow.

    The transformation needs the old, new (and side-info) models trained first; it learns
    from their embeddings of the training split."""
    from pipeline.graph import compat_steps, steps

    cfg = _cfg(config, set_)
    ctx = _ctx(cfg)
    aliases = tuple(alias or ())
    if which == "transformation":
        out = compat_steps.train_transformation_step(ctx, None, aliases or ("candidate",))
        console.print_json(json.dumps(out or {"enabled": False}, default=str))
        return
    model = {"old": cfg.old_model, "new": cfg.new_model, "side-info": cfg.side_info_model}
    if which not in model:
        raise ConfigError(f"--which must be old, new, side-info or transformation, got {which!r}")
    r = steps.train_step(ctx, model[which], None, aliases)
    console.print_json(json.dumps(r.__dict__))


@app.command()
@_errors
def ingest(config: ConfigOpt = None, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Embed every image with the old model into gallery version <old_model.name>."""
    from pipeline.graph import steps

    cfg = _cfg(config, set_)
    ctx = _ctx(cfg, quiet)
    r = steps.embed_version_step(ctx, cfg.old_model, "embed", None)
    if ctx.gallery.current() is None:
        steps.promote_step(ctx, r.version)
    console.print_json(json.dumps(r.__dict__, default=str))


@app.command()
@_errors
def backfill(config: ConfigOpt = None, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Full backfill: re-embed every image with the new model into version <new_model.name>."""
    from pipeline.graph import steps

    cfg = _cfg(config, set_)
    r = steps.embed_version_step(_ctx(cfg, quiet), cfg.new_model, "full", None)
    console.print_json(json.dumps(r.__dict__, default=str))


@app.command()
@_errors
def evaluate(
    versions: Annotated[
        str | None, typer.Option(help="comma-separated versions (default all)")
    ] = None,
    report_dir: Annotated[
        Path | None, typer.Option(help="where report.json and the plots go")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """FCT's protocol on the validation split: old/old, new/new, BCT, transformed, adapters,
    the compatibility matrix and backfilling curves; JSON report, PNG plots, MLflow run."""
    from pipeline.graph.compat_steps import evaluate_compat_step

    cfg = _cfg(config, set_)
    names = versions.split(",") if versions else None
    report, files = evaluate_compat_step(_ctx(cfg), None, names, report_dir)
    console.print(report.table())
    if report.curves:
        console.print(report.curves_table())
    names = report.matrix_names
    t = Table(title=f"compatibility matrix ({report.matrix_value}; rows: queries, cols: gallery)")
    t.add_column("query \\ gallery")
    for n in names:
        t.add_column(n, justify="right")
    for n, row in zip(names, report.matrix, strict=True):
        t.add_row(n, *("—" if v is None else f"{v:.1f}" for v in row))
    console.print(t)
    console.print(f"report: {files['report.json']}  plots: {', '.join(sorted(files))}")
    console.print(f"MLflow run: {report.extra.get('run_id')}")


@app.command()
@_errors
def promote(version: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Serve VERSION: move CURRENT and the MLflow `serving` alias together."""
    from pipeline.graph import steps

    state = steps.promote_step(_ctx(_cfg(config, set_)), version)
    console.print(f"serving {state['version']} (previous: {state['history'][:1] or '-'})")


@app.command()
@_errors
def rollback(
    gallery: Annotated[str | None, typer.Argument(help="gallery URI (default: config)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Restore the previously served version (CURRENT and the `serving` alias)."""
    from pipeline.graph import steps

    state = steps.rollback_step(_ctx(_cfg(config, set_, gallery)))
    console.print(f"rolled back {state['rolled_back_from']} → serving {state['version']}")


@app.command()
@_errors
def versions(
    gallery: Annotated[str | None, typer.Argument(help="gallery URI (default: config)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """List the gallery's complete versions and which one is serving."""
    from pipeline.gallery.store import Gallery

    cfg = _cfg(config, set_, gallery)
    g = Gallery(cfg.gallery_uri, cfg.storage)
    cur = g.current()
    t = Table(title=f"gallery {g.uri}")
    for c in ("version", "serving", "model", "method", "rows", "rejected", "shards", "index"):
        t.add_column(c)
    for v in g.versions():
        m = g.manifest(v)
        t.add_row(
            v,
            "*" if v == cur else "",
            str(m.get("model")),
            str(m.get("method")),
            str(m["rows"]),
            str(m["rejected"]),
            str(len(m["shards"])),
            str(m.get("index", {}).get("kind")),
        )
    console.print(t)


@app.command()
@_errors
def search(
    gallery: Annotated[str | None, typer.Argument(help="gallery URI (default: config)")] = None,
    key: Annotated[str | None, typer.Option(help="query by a gallery row's key")] = None,
    image: Annotated[Path | None, typer.Option(help="query by an image file")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="neighbours to return")] = 10,
    version: Annotated[
        str | None, typer.Option(help="search this version, not the serving one")
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            help="embed the query with the NEW model and map it through this query "
            "adapter (procrustes | low_rank | residual_mlp) into the serving space"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Nearest neighbours from the serving version, by key or by image file."""
    from pipeline.graph.search import search_gallery

    if (key is None) == (image is None):
        raise ConfigError("give exactly one of --key or --image")
    cfg = _cfg(config, set_, gallery)
    res = search_gallery(_ctx(cfg), key=key, image=image, k=k, version=version, adapter=adapter)
    if as_json:
        console.print_json(json.dumps(res))
        return
    via = f" via {adapter} adapter" if adapter else ""
    t = Table(title=f"top {k} in {res['version']} for {key or image}{via}")
    for c in ("rank", "key", "score"):
        t.add_column(c)
    for i, (kk, s) in enumerate(zip(res["keys"], res["scores"], strict=True), 1):
        t.add_row(str(i), str(kk), f"{s:.4f}")
    console.print(t)


@app.command("config")
@_errors
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (all defaults filled in, secrets masked)."""
    import yaml

    console.print(yaml.safe_dump(dump_config(_cfg(config, set_)), sort_keys=False))


@app.command()
@_errors
def upgrade(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the stages and the plan; run nothing")
    ] = False,
    until: Annotated[
        str | None, typer.Option(help="stop after this stage (e.g. plan, execute, validate)")
    ] = None,
    restart: Annotated[
        bool, typer.Option(help="discard an unfinished target version and start it again")
    ] = False,
    report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
) -> None:
    """Upgrade the gallery: models → transformation → evaluate → plan → execute each shard
    (transform | partial | full) → index → validate → promote. Rerunning resumes."""
    from pipeline.flows import print_summary, run_upgrade, write_report

    cfg = _cfg(config, set_)
    if dry_run:
        from pipeline.graph.upgrade import dry_run as show

        show(_ctx(cfg, quiet), console)
        return
    rep = run_upgrade(cfg, quiet=quiet, console=console, until=until, restart=restart)
    print_summary(rep, console)
    if report:
        write_report(rep, report)


@app.command()
@_errors
def plan(
    source: Annotated[
        str | None, typer.Option("--from", help="version to upgrade (default: the serving one)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="where the plan JSON goes")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Per-shard plan (skip | transform | partial | full) under the budget, with expected
    cost, quality gain and a reason; printed as a table, saved as JSON, logged to MLflow.
    Exit 1 when a shard is blocked (no transformation and its images are gone)."""
    from pipeline.graph.upgrade import plan_command

    p, path = plan_command(_ctx(_cfg(config, set_), quiet), source, out, console)
    console.print(f"plan: {path}")
    if not p.ok:
        raise typer.Exit(1)


@app.command()
@_errors
def demo(
    workdir: Annotated[
        str, typer.Option(help="where images, gallery, models, MLflow live")
    ] = ".carryover-demo",
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The embedded demo: digits → v1 (classes 0-4) + side-info → v2 (all) → FCT/FastFill
    transformation → backfill → compatibility report → promote."""
    from pipeline.flows import run_demo

    run_demo(workdir, set_, console, quiet)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
