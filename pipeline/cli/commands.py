"""The upgrade commands: data, train, ingest, import, backfill, evaluate, promote, rollback,
versions, search, config, upgrade, plan, demo, lineage, lock (jobs, submit, schedule: jobs.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from pipeline.choices import ADAPTER_KINDS, SHARD_ORDERS, TRAIN_TARGETS, UPGRADE_STAGES
from pipeline.cli.common import (
    EXIT_LOCKED,
    ConfigOpt,
    GalleryArg,
    JsonOpt,
    QuietOpt,
    SetOpt,
    VersionArg,
    YesOpt,
    _cfg,
    _ctx,
    _errors,
    _gallery_cfg,
    _target_cfg,
    app,
    choices,
    confirm,
    console,
    data_app,
    emit_json,
    err,
    lock_app,
)
from pipeline.config import ConfigError, dump_config

ShardOrder = choices("ShardOrder", SHARD_ORDERS)
TrainTarget = choices("TrainTarget", TRAIN_TARGETS)
AdapterKind = choices("AdapterKind", ADAPTER_KINDS)
UpgradeStage = choices("UpgradeStage", UPGRADE_STAGES)


@data_app.command("prepare")
@_errors
def data_prepare(
    source: Annotated[
        str,
        typer.Option(
            help="digits | synthetic | PATH.npz (images, labels) | DIR of images "
            "(flat: unlabelled, or in class sub-folders)"
        ),
    ],
    out: Annotated[str, typer.Option(help="output URI (local path or s3://bucket/prefix)")],
    shards: Annotated[int, typer.Option(min=1, help="number of Parquet shards")] = 4,
    synthetic_n: Annotated[int, typer.Option(min=1, help="rows for --source synthetic")] = 2000,
    limit: Annotated[int | None, typer.Option(min=1, help="keep at most this many rows")] = None,
    order: Annotated[
        ShardOrder,
        typer.Option(help="shuffled, or by label (shards grow class by class, like a drift)"),
    ] = ShardOrder.shuffle,
    yes: YesOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write Parquet image shards (key, PNG image, label, split) from a dataset. Over existing
    shards (which a gallery's backfills may read) it asks first (--yes: don't)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.data.prepare import prepare
    from pipeline.io.uri import list_dir

    cfg = _cfg(config, set_)
    if any(n.startswith("shard-") for n in list_dir(out, cfg.storage)):
        confirm(f"replace the image shards under {out}", yes)
    res = prepare(
        source,
        out,
        shards,
        cfg.storage,
        cfg.data,
        synthetic_n=synthetic_n,
        limit=limit,
        order=order.value,
    )
    console.print(
        f"wrote {res.rows} rows in {len(res.files)} shards to {res.out_uri} ({res.seconds:.1f}s)"
    )


@app.command()
@_errors
def train(
    which: Annotated[TrainTarget, typer.Option(help="which model to train")] = TrainTarget.new,
    alias: Annotated[list[str] | None, typer.Option(help="registry alias(es) to set")] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gallery: GalleryArg = None,
) -> None:
    """Train a model of the config on Ray Train and register it in MLflow.

    The transformation needs the old, new (and side-info) models trained first; it learns
    from their embeddings of the training split."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.cluster import check_cluster
    from pipeline.runtime import native_stderr_to, route_logs
    from pipeline.services import compat_steps, models

    cfg = _target_cfg(config, set_, gallery)
    check_cluster(cfg)  # on several nodes: shared storage for Ray Train, or refused
    ctx = _ctx(cfg, as_json)
    aliases = tuple(alias or ())
    log_file = route_logs(cfg.log_path)  # Ray's and MLflow's lines; stdout stays JSON
    err.print(f"[dim]logs of Ray and MLflow: {log_file}[/]")
    if which.value == "transformation":
        with native_stderr_to(log_file):
            out = compat_steps.train_transformation_step(ctx, aliases or ("candidate",))
        _print_result(out or {"enabled": False}, as_json)
        return
    model = {"old": cfg.old_model, "new": cfg.new_model, "side-info": cfg.side_info_model}
    with native_stderr_to(log_file):
        r = models.train_step(ctx, model[which.value], aliases)
    _print_result(r.__dict__, as_json)


def _print_result(obj: dict[str, Any], as_json: bool) -> None:
    """A command's result: indented JSON for a person, one line with --json."""
    if as_json:
        emit_json(obj)
    else:
        console.print_json(json.dumps(obj, default=str))


@app.command()
@_errors
def ingest(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """Embed every image with the old model into gallery version <old_model.name>."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.cluster import check_cluster
    from pipeline.services import steps

    cfg = _target_cfg(config, set_, gallery)
    with _gallery_lock(cfg, f"ingest {cfg.old_model.name}"):  # before Ray: refused at once
        check_cluster(cfg)  # on several nodes: s3:// images and gallery, or refused
        ctx = _ctx(cfg, quiet or as_json)
        r = steps.embed_version_step(ctx, cfg.old_model, "embed")
        if ctx.gallery.current() is None:
            steps.promote_step(ctx, r.version)
    _print_result(r.__dict__, as_json)


@app.command("import")
@_errors
def import_(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="existing embeddings: Parquet file(s) with key and embedding columns, or a "
            "clip-retrieval output folder (img_emb/*.npy + metadata/*.parquet); local or s3://",
        ),
    ],
    version: Annotated[
        str | None, typer.Option(help="gallery version to create (default: old_model.name)")
    ] = None,
    model_uri: Annotated[
        str | None,
        typer.Option(
            help="the model that made the embeddings: TorchScript file, models:/NAME/VERSION or "
            "carryover model dir (default: old_model.uri); registered in MLflow"
        ),
    ] = None,
    images: Annotated[
        str | None,
        typer.Option(help="image shards (shard-NNNNN.parquet) of these keys, for backfills"),
    ] = None,
    promote: Annotated[
        bool, typer.Option(help="serve the imported version (CURRENT and `serving`)")
    ] = True,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """Adopt a gallery embedded elsewhere as a version, without re-embedding: checks keys,
    dimensions and values (naming file and row), records the model and where the images are.
    Column names: adopt.* keys. Rerunning the same import does nothing."""
    # start-up: torch and pyarrow (seconds); --help and parsing need neither
    from pipeline.services import adopt, steps

    cfg, _ = _gallery_cfg(config, set_, gallery, require=False)
    if images:
        cfg.images = images
    model = cfg.old_model.model_copy(update={"uri": model_uri or cfg.old_model.uri})
    req = adopt.ImportRequest(source, version or model.name, model, cfg.images)
    with _gallery_lock(cfg, f"import {req.version}"):
        ctx = _ctx(cfg, quiet or as_json)
        r = adopt.import_step(ctx, req)
        if promote and ctx.gallery.current() != r.version:
            steps.promote_step(ctx, r.version)
    if as_json:
        emit_json(r.__dict__)
        return
    state = "already imported" if r.skipped else f"imported in {r.seconds:.1f}s"
    console.print(
        f"{r.version}: {r.rows} rows ({r.rejected} rejected) from {r.files} {r.layout} "
        f"file(s) in {r.shards} shards, {r.embedding_dim}-d, model {r.model_uri}: {state}"
    )
    where = r.images or {}
    console.print(f"images: {where.get('shards') or where.get('column') or 'none recorded'}")


@app.command()
@_errors
def backfill(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """Full backfill: re-embed every image with the new model into version <new_model.name>."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.cluster import check_cluster
    from pipeline.services import steps

    cfg = _target_cfg(config, set_, gallery, require=True)
    with _gallery_lock(cfg, f"backfill {cfg.new_model.name}"):  # one writer of a version
        check_cluster(cfg)  # on several nodes: s3:// images and gallery, or refused
        r = steps.embed_version_step(_ctx(cfg, quiet or as_json), cfg.new_model, "full")
    _print_result(r.__dict__, as_json)


@app.command()
@_errors
def evaluate(
    versions: Annotated[
        str | None, typer.Option(help="comma-separated versions (default all)")
    ] = None,
    report_dir: Annotated[
        Path | None, typer.Option(help="where report.json and the plots go")
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gallery: GalleryArg = None,
) -> None:
    """FCT's protocol on the validation split: old/old, new/new, BCT, transformed, adapters,
    the compatibility matrix and backfilling curves; JSON report, PNG plots, MLflow run."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services.compat_steps import evaluate_compat_step

    cfg = _target_cfg(config, set_, gallery, require=True)
    names = versions.split(",") if versions else None
    report, files = evaluate_compat_step(_ctx(cfg, as_json), names, report_dir)
    if as_json:
        emit_json(
            {
                "report": json.loads(report.to_json()),
                "files": {k: str(v) for k, v in files.items()},
                "run_id": report.extra.get("run_id"),
            }
        )
        return
    _print_compat(report, files)


def _print_compat(report: Any, files: dict[str, Any]) -> None:
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
def promote(
    version: VersionArg,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """Serve VERSION: move CURRENT and the MLflow `serving` alias together (`rollback`
    undoes it)."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services import steps

    cfg, _ = _gallery_cfg(config, set_, gallery)
    with _gallery_lock(cfg, f"promote {version}"):  # never beside an upgrade's own promote
        state = steps.promote_step(_ctx(cfg, as_json), version)
    if as_json:
        emit_json(state)
        return
    console.print(f"serving {state['version']} (previous: {state['history'][:1] or '-'})")


def _gallery_lock(cfg: Any, purpose: str) -> Any:
    """The gallery's lease for a command that moves CURRENT: refused (exit 3) while an upgrade
    or another promote holds it, so no two writers interleave CURRENT's history."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.context import gallery_lock

    return gallery_lock(cfg, f"carryover {purpose.split()[0]}", purpose)


@app.command()
@_errors
def rollback(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """Restore the previously served version (CURRENT and the `serving` alias): searches
    switch at once. Asks first (--yes: don't)."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services import steps

    cfg, _ = _gallery_cfg(config, set_, gallery)
    confirm(f"roll back the serving version of {cfg.gallery_uri}", yes)
    with _gallery_lock(cfg, "rollback"):
        state = steps.rollback_step(_ctx(cfg, as_json))
    if as_json:
        emit_json(state)
        return
    console.print(f"rolled back {state['rolled_back_from']} → serving {state['version']}")


@app.command()
@_errors
def versions(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """List the gallery's complete versions and which one is serving."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.display import versions_table
    from pipeline.gallery.records import version_summaries
    from pipeline.gallery.store import Gallery

    cfg, _ = _gallery_cfg(config, set_, gallery, uses_tracking=False)  # a mistyped path: exit 2
    g = Gallery(cfg.gallery_uri, cfg.storage)
    cur = g.current()
    if as_json:
        emit_json({"gallery": g.uri, "serving": cur, "versions": version_summaries(g)})
        return
    console.print(versions_table(f"gallery {g.uri}", version_summaries(g), cur))


@app.command()
@_errors
def search(
    key: Annotated[str | None, typer.Option(help="query by a gallery row's key")] = None,
    image: Annotated[Path | None, typer.Option(help="query by an image file")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="neighbours to return")] = 10,
    version: Annotated[
        str | None, typer.Option(help="search this version, not the serving one")
    ] = None,
    adapter: Annotated[
        AdapterKind | None,
        typer.Option(
            help="embed the query with the NEW model and map it through this query "
            "adapter into the old model's space; searches the version holding that space "
            "unless --version is given"
        ),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gallery: GalleryArg = None,
) -> None:
    """Nearest neighbours from the serving version, by key or by image file."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services.search import search_gallery

    if (key is None) == (image is None):
        raise ConfigError("give exactly one of --key or --image")
    cfg, _ = _gallery_cfg(config, set_, gallery)
    kind = adapter.value if adapter else None
    ctx = _ctx(cfg, as_json)
    res = search_gallery(ctx, key=key, image=image, k=k, version=version, adapter=kind)
    if as_json:
        emit_json(res.__dict__)
        return
    via = f" via {kind} adapter" if kind else ""
    t = Table(title=f"top {k} in {res.version} for {key or image}{via}")
    for c in ("rank", "key", "score", "label"):
        t.add_column(c)
    for i, (kk, s, y) in enumerate(zip(res.keys, res.scores, res.labels, strict=True), 1):
        t.add_row(str(i), str(kk), f"{s:.4f}", "" if y is None else str(y))
    console.print(t)


@app.command("config")
@_errors
def show_config(config: ConfigOpt = None, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Print the resolved config (all defaults filled in, secrets masked) as YAML, or JSON."""
    data = dump_config(_cfg(config, set_))
    if as_json:
        emit_json(data)
        return
    console.print(yaml.safe_dump(data, sort_keys=False))


@app.command()
@_errors
def upgrade(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the stages and the plan; run nothing")
    ] = False,
    until: Annotated[UpgradeStage | None, typer.Option(help="stop after this stage")] = None,
    restart: Annotated[
        bool,
        typer.Option(
            help="discard an unfinished target version (its shards and records) and start it "
            "again; asks first (--yes: don't)"
        ),
    ] = False,
    yes: YesOpt = False,
    report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
    as_json: JsonOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """Upgrade the gallery: models → transformation → evaluate → plan → execute each shard
    (transform | partial | full) → index → validate → promote. Rerunning resumes."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.flows import print_summary, run_upgrade, write_report

    cfg = _target_cfg(config, set_, gallery)
    out = err if as_json else console  # in JSON mode stdout carries the report alone
    if dry_run:
        # start-up: torch and Ray (seconds); --help and parsing need neither
        from pipeline.upgrade_graph import dry_run as show

        p = show(_ctx(cfg, quiet or as_json), out)
        if as_json:
            plan = json.loads(p.to_json()) if p is not None else None
            emit_json({"dry_run": True, "target": cfg.target_version, "plan": plan})
        return
    if restart:
        confirm(f"discard the unfinished version {cfg.target_version} and start it again", yes)
    stop_at = until.value if until else None
    # progress bars write to stdout: off in JSON mode
    rep = run_upgrade(cfg, quiet=quiet or as_json, console=out, until=stop_at, restart=restart)
    print_summary(rep, out)
    if report:
        write_report(rep, report)
    if as_json:
        emit_json(json.loads(json.dumps(asdict(rep), default=str)))


@app.command()
@_errors
def plan(
    source: Annotated[
        str | None, typer.Option("--from", help="version to upgrade (default: the serving one)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="where the plan JSON goes")] = None,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="before anything is trained: price the whole upgrade both ways (train and "
            "apply h, or re-embed every image), timing this upgrade's models on a sample",
        ),
    ] = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """Per-shard plan (skip | transform | partial | full) under the budget, with expected
    cost, quality gain and a reason; printed as a table, saved as JSON, logged to MLflow.
    Exit 1 when a shard is blocked (no transformation and its images are gone)."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services.estimate import estimate_step
    from pipeline.upgrade_graph import plan_command

    cfg = _target_cfg(config, set_, gallery, require=not estimate)
    ctx = _ctx(cfg, quiet or json_out)
    if estimate:
        est = estimate_step(ctx)
        if est is None:
            raise ConfigError("nothing to estimate: no images to re-embed, or plan.measure_rows=0")
        emit_json(est.to_dict()) if json_out else console.print(est.summary())
        return
    p, path = plan_command(ctx, source, out, err if json_out else console)
    if json_out:
        emit_json({"path": str(path), "ok": p.ok, "plan": json.loads(p.to_json())})
    else:
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
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.flows import run_demo

    run_demo(workdir, set_, console, quiet)


# -- what the gallery holds and who holds it ---------------------------------------------
@app.command()
@_errors
def lineage(
    version: Annotated[str | None, typer.Option(help="only this version")] = None,
    shard: Annotated[int | None, typer.Option(help="only this shard id")] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gallery: GalleryArg = None,
) -> None:
    """Where every embedding came from: per version the embedder (registry version, run) that
    serves it; per shard the method, source version, transformation versions, run and time."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.services.lineage import gallery_lineage

    cfg, ident = _gallery_cfg(config, set_, gallery)
    lin = gallery_lineage(_ctx(cfg), version, shard)
    if as_json:
        emit_json(json.loads(lin.to_json()))
        return
    for t in lin.tables():
        console.print(t)
    # An older gallery does not say where its models are: an embedder not found may be there.
    legacy = ident is None or ident.tracking_uri is None
    note = " (the config's: this gallery's manifests do not record theirs)" if legacy else ""
    console.print(f"runs and models: {lin.tracking_uri}{note}")


@lock_app.command("show")
@_errors
def lock_show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """Who holds the gallery's upgrade lock, if anyone. Exit 3 while it is held."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.gallery.lock import holder_of

    cfg, _ = _gallery_cfg(config, set_, gallery, uses_tracking=False)
    info = holder_of(cfg.gallery_uri, cfg.storage)
    if as_json:
        emit_json(_lock_json(cfg.gallery_uri, info))
        if info is not None and not info.expired:
            raise typer.Exit(EXIT_LOCKED)
        return
    if info is None:
        console.print(f"{cfg.gallery_uri}: not locked")
        return
    console.print(f"{cfg.gallery_uri}: locked by {info.describe()}")
    if not info.expired:
        raise typer.Exit(EXIT_LOCKED)


@lock_app.command("break")
@_errors
def lock_break(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
    gallery: GalleryArg = None,
) -> None:
    """Remove the lock whoever holds it: only when its holder is gone for sure (an upgrade it
    interrupts resumes later; two upgrades at once would not be safe). Asks first (--yes:
    don't)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.gallery.lock import break_lock

    cfg, _ = _gallery_cfg(config, set_, gallery, uses_tracking=False)
    confirm(f"break the upgrade lock of {cfg.gallery_uri}", yes)
    info = break_lock(cfg.gallery_uri, cfg.storage)
    if as_json:
        emit_json(_lock_json(cfg.gallery_uri, info) | {"removed": info is not None})
        return
    console.print(
        f"{cfg.gallery_uri}: removed the lock of {info.describe()}" if info else "not locked"
    )


def _lock_json(uri: str, info: Any) -> dict[str, Any]:
    """The lock's state for --json: who holds it (None: nobody) and whether it has expired."""
    # the token stays out: whoever has it can renew or release the lease as its holder
    holder = {k: v for k, v in asdict(info).items() if k != "token"} if info else None
    return {"gallery": uri, "locked": info is not None and not info.expired, "holder": holder}
