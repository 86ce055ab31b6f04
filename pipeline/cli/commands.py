"""The upgrade commands: data, train, ingest, import, backfill, evaluate, promote, rollback,
versions, search, config, upgrade, plan, demo, submit, jobs, schedule, lineage, lock."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from pipeline.cli.common import (
    EXIT_LOCKED,
    AddressOpt,
    ConfigOpt,
    EnvOpt,
    GalleryArg,
    QuietOpt,
    SetOpt,
    TokenOpt,
    _cfg,
    _ctx,
    _errors,
    _gallery_cfg,
    app,
    console,
    data_app,
    err,
    jobs_app,
    lock_app,
)
from pipeline.config import ConfigError, dump_config


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
        str,
        typer.Option(help="shuffle | label (shards grow class by class, like a drifting gallery)"),
    ] = "shuffle",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write Parquet image shards (key, PNG image, label, split) from a dataset."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
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
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.cluster import check_cluster
    from pipeline.runtime import native_stderr_to, route_logs
    from pipeline.services import compat_steps, models

    cfg = _cfg(config, set_)
    check_cluster(cfg)  # on several nodes: shared storage for Ray Train, or refused
    ctx = _ctx(cfg)
    aliases = tuple(alias or ())
    log_file = route_logs(cfg.log_path)  # Ray's and MLflow's lines; stdout stays JSON
    err.print(f"[dim]logs of Ray and MLflow: {log_file}[/]")
    if which == "transformation":
        with native_stderr_to(log_file):
            out = compat_steps.train_transformation_step(ctx, aliases or ("candidate",))
        console.print_json(json.dumps(out or {"enabled": False}, default=str))
        return
    model = {"old": cfg.old_model, "new": cfg.new_model, "side-info": cfg.side_info_model}
    if which not in model:
        raise ConfigError(f"--which must be old, new, side-info or transformation, got {which!r}")
    with native_stderr_to(log_file):
        r = models.train_step(ctx, model[which], aliases)
    console.print_json(json.dumps(r.__dict__))


@app.command()
@_errors
def ingest(config: ConfigOpt = None, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Embed every image with the old model into gallery version <old_model.name>."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.cluster import check_cluster
    from pipeline.services import steps

    cfg = _cfg(config, set_)
    with _gallery_lock(cfg, f"ingest {cfg.old_model.name}"):  # before Ray: refused at once
        check_cluster(cfg)  # on several nodes: s3:// images and gallery, or refused
        ctx = _ctx(cfg, quiet)
        r = steps.embed_version_step(ctx, cfg.old_model, "embed")
        if ctx.gallery.current() is None:
            steps.promote_step(ctx, r.version)
    console.print_json(json.dumps(r.__dict__, default=str))


@app.command("import")
@_errors
def import_(
    source: Annotated[
        str,
        typer.Argument(
            help="existing embeddings: Parquet file(s) with key and embedding columns, or a "
            "clip-retrieval output folder (img_emb/*.npy + metadata/*.parquet); local or s3://"
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
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Adopt a gallery embedded elsewhere as a version, without re-embedding: checks keys,
    dimensions and values (naming file and row), records the model and where the images are.
    Column names: adopt.* keys. Rerunning the same import does nothing."""
    # start-up: torch and pyarrow (seconds); --help and parsing need neither
    from pipeline.services import adopt, steps

    cfg, _ = _gallery_cfg(config, set_, require=False)
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
        print(json.dumps(r.__dict__, default=str))
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
def backfill(config: ConfigOpt = None, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Full backfill: re-embed every image with the new model into version <new_model.name>."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.cluster import check_cluster
    from pipeline.services import steps

    cfg = _cfg(config, set_)
    with _gallery_lock(cfg, f"backfill {cfg.new_model.name}"):  # one writer of a version
        check_cluster(cfg)  # on several nodes: s3:// images and gallery, or refused
        r = steps.embed_version_step(_ctx(cfg, quiet), cfg.new_model, "full")
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
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services.compat_steps import evaluate_compat_step

    cfg = _cfg(config, set_)
    names = versions.split(",") if versions else None
    report, files = evaluate_compat_step(_ctx(cfg), names, report_dir)
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
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services import steps

    cfg, _ = _gallery_cfg(config, set_)
    with _gallery_lock(cfg, f"promote {version}"):  # never beside an upgrade's own promote
        state = steps.promote_step(_ctx(cfg), version)
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
    gallery: GalleryArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Restore the previously served version (CURRENT and the `serving` alias)."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services import steps

    cfg, _ = _gallery_cfg(config, set_, gallery)
    with _gallery_lock(cfg, "rollback"):
        state = steps.rollback_step(_ctx(cfg))
    console.print(f"rolled back {state['rolled_back_from']} → serving {state['version']}")


@app.command()
@_errors
def versions(
    gallery: GalleryArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """List the gallery's complete versions and which one is serving."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.display import versions_table
    from pipeline.gallery.records import version_summaries
    from pipeline.gallery.store import Gallery

    cfg, _ = _gallery_cfg(config, set_, gallery, uses_tracking=False)  # a mistyped path: exit 2
    g = Gallery(cfg.gallery_uri, cfg.storage)
    cur = g.current()
    console.print(versions_table(f"gallery {g.uri}", version_summaries(g), cur))


@app.command()
@_errors
def search(
    gallery: GalleryArg = None,
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
            "adapter (procrustes | low_rank | residual_mlp) into the old model's space; "
            "searches the version holding that space unless --version is given"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Nearest neighbours from the serving version, by key or by image file."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services.search import search_gallery

    if (key is None) == (image is None):
        raise ConfigError("give exactly one of --key or --image")
    cfg, _ = _gallery_cfg(config, set_, gallery)
    res = search_gallery(_ctx(cfg), key=key, image=image, k=k, version=version, adapter=adapter)
    if as_json:
        console.print_json(json.dumps(res.__dict__))
        return
    via = f" via {adapter} adapter" if adapter else ""
    t = Table(title=f"top {k} in {res.version} for {key or image}{via}")
    for c in ("rank", "key", "score", "label"):
        t.add_column(c)
    for i, (kk, s, y) in enumerate(zip(res.keys, res.scores, res.labels, strict=True), 1):
        t.add_row(str(i), str(kk), f"{s:.4f}", "" if y is None else str(y))
    console.print(t)


@app.command("config")
@_errors
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (all defaults filled in, secrets masked)."""
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
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.flows import print_summary, run_upgrade, write_report

    cfg = _cfg(config, set_)
    if dry_run:
        # start-up: torch and Ray (seconds); --help and parsing need neither
        from pipeline.upgrade_graph import dry_run as show

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
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="before anything is trained: price the whole upgrade both ways (train and "
            "apply h, or re-embed every image), timing this upgrade's models on a sample",
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="the estimate as JSON")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Per-shard plan (skip | transform | partial | full) under the budget, with expected
    cost, quality gain and a reason; printed as a table, saved as JSON, logged to MLflow.
    Exit 1 when a shard is blocked (no transformation and its images are gone)."""
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.services.estimate import estimate_step
    from pipeline.upgrade_graph import plan_command

    if estimate:
        est = estimate_step(_ctx(_cfg(config, set_), quiet))
        if est is None:
            raise ConfigError("nothing to estimate: no images to re-embed, or plan.measure_rows=0")
        console.print_json(json.dumps(est.to_dict())) if json_out else console.print(est.summary())
        return

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
    # start-up: torch and Ray (seconds); --help and parsing need neither
    from pipeline.flows import run_demo

    run_demo(workdir, set_, console, quiet)


# -- operations: jobs on a cluster, schedules, lineage, the lock ----------------------------
def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
@_errors
def submit(
    job_args: Annotated[
        list[str] | None, typer.Argument(help="arguments for the entrypoint, after --")
    ] = None,
    address: AddressOpt = None,
    job: Annotated[str, typer.Option(help="the jobs/<JOB>.py entrypoint")] = "upgrade",
    follow: Annotated[bool, typer.Option(help="stream the job's logs until it ends")] = False,
    env: EnvOpt = None,
    token_file: TokenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Submit a jobs/ entrypoint with the config to a Ray cluster's job API (the package and
    the resolved config travel as its working directory); prints the submission id.

    Without an address the job runs here, in the foreground, on a local Ray. Exit 0 once
    submitted (with --follow or locally: 0 if the job succeeded, 1 if it failed)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    cfg = _cfg(config, set_)
    addr = jobs.job_address(address, cfg)
    if addr is None:
        sub = jobs.run_here(cfg, job, job_args or [], env)
        console.print(f"local job {sub.id}: {sub.status}")
        raise typer.Exit(0 if sub.status == "SUCCEEDED" else 1)
    sub = jobs.submit(cfg, addr, job, job_args or [], env, token_file)
    console.print(f"submitted {sub.id} to {addr}: {sub.entrypoint}")
    console.print(f"environment: {', '.join(sub.env_names)} (values not shown)")
    if follow:
        rec = jobs.follow(sub.id, addr, token_file, lambda c: console.out(c, end=""))
        console.print(f"job {sub.id}: {rec['status']}")
        raise typer.Exit(0 if rec["status"] == "SUCCEEDED" else 1)
    console.print(f"follow: carryover jobs logs {sub.id} --address {addr} --follow")
    print(sub.id)  # the last line, alone, for scripts


def _journal(config: Path | None, set_: list[str] | None, gallery: str | None):
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops.journal import Journal

    if gallery:  # a journal may come before the first version: no gallery is no error here
        cfg, _ = _gallery_cfg(config, set_, gallery, require=False, uses_tracking=False)
    else:
        cfg = _cfg(config, set_)
    return cfg, Journal(cfg.gallery_uri, cfg.storage)


@jobs_app.command("list")
@_errors
def jobs_list(
    address: AddressOpt = None,
    gallery: Annotated[str | None, typer.Option(help="gallery URI (default: config)")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    token_file: TokenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """carryover's jobs on the cluster and the gallery's journal: submissions, local runs and
    scheduler ticks (no-op, submitted, refused by the lock, failed, missed), newest first."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    cfg, journal = _journal(config, set_, gallery)
    rows = jobs.list_jobs(jobs.job_address(address, cfg), token_file, journal)[:limit]
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    t = Table(title=f"jobs and ticks of {cfg.gallery_uri}")
    for c in ("when", "id", "kind", "trigger", "status", "detail"):
        t.add_column(c, overflow="fold")
    for r in rows:
        detail = r.get("message") or r.get("entrypoint") or ""
        if r.get("job_id"):
            detail = f"{detail} [job {r['job_id']}]"
        t.add_row(
            _when(r.get("created_at")),
            r["id"],
            str(r.get("kind")),
            str(r.get("trigger") or "-"),
            str(r.get("status")),
            detail,
        )
    console.print(t)


@jobs_app.command("status")
@_errors
def jobs_status(
    job_id: str,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option(help="poll until the job ends")] = False,
    timeout: Annotated[float | None, typer.Option(help="give up waiting after seconds")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    token_file: TokenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """A job's status. Exit 0 if it succeeded or is still running, 1 if it failed or was
    stopped (with --wait: once it ends; 4 if --timeout passed first)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    cfg, journal = _journal(config, set_, None)
    addr = jobs.job_address(address, cfg)
    if wait:
        rec = jobs.wait(job_id, addr, token_file, journal, timeout=timeout)
    else:
        rec = jobs.status(job_id, addr, token_file, journal)
    if as_json:
        console.print_json(json.dumps(rec, default=str))
    else:
        msg = f" — {rec['message']}" if rec.get("message") else ""
        console.print(f"{job_id}: {rec['status']}{msg}")
    if rec["status"] in ("FAILED", "STOPPED"):
        raise typer.Exit(1)
    if wait and rec["status"] not in jobs.TERMINAL:
        raise typer.Exit(4)


@jobs_app.command("logs")
@_errors
def jobs_logs(
    job_id: str,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option(help="stream until the job ends")] = False,
    token_file: TokenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """A job's driver logs (local jobs: from the gallery's journal)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    cfg, journal = _journal(config, set_, None)
    addr = jobs.job_address(address, cfg)
    if follow and addr:
        jobs.follow(job_id, addr, token_file, lambda c: console.out(c, end=""))
        return
    console.out(jobs.logs(job_id, addr, token_file, journal), end="")


@jobs_app.command("stop")
@_errors
def jobs_stop(
    job_id: str,
    address: AddressOpt = None,
    token_file: TokenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Ask the cluster to stop a job (its shards already committed stay; a rerun resumes)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    addr = jobs.job_address(address, _cfg(config, set_))
    if addr is None:
        raise ConfigError("jobs stop needs --address (a local job stops with Ctrl-C)")
    stopped = jobs.stop(job_id, addr, token_file)
    console.print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


@app.command()
@_errors
def schedule(
    cron: Annotated[
        str | None, typer.Option(help="5-field cron, e.g. '0 2 * * *' (default: schedule.cron)")
    ] = None,
    once: Annotated[
        bool, typer.Option(help="one tick now, then exit (for cron, systemd timers, tests)")
    ] = False,
    wait: Annotated[
        bool, typer.Option(help="wait for a submitted upgrade to end before the tick ends")
    ] = True,
    address: AddressOpt = None,
    env: EnvOpt = None,
    token_file: TokenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Nightly upgrades: at each tick, under the gallery's lock, upgrade when the registry's
    `candidate` embedder is newer than `serving`, else record a no-op. Every tick is in
    `carryover jobs list`. --once exits 0 (no-op or upgraded), 1 (the upgrade failed) or 3
    (another upgrade holds the gallery's lock)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops.schedule import run_schedule

    sets = list(set_ or []) + ([f"schedule.cron={json.dumps(cron)}"] if cron else [])  # quoted YAML
    cfg = _cfg(config, sets)
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    addr = jobs.job_address(address, cfg)
    echo = console.print
    if once:
        r = run_schedule(cfg, addr, token_file, once=True, wait=wait, env=env, echo=echo)
        style = {"locked": "yellow", "failed": "red", "error": "red"}.get(r.outcome, "green")
        console.print(f"[{style}]tick {r.id}: {r.outcome}[/]: {r.reason}")
        raise typer.Exit(r.exit_code)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    where = addr or "a local Ray"
    console.print(f"scheduling {cfg.gallery_uri} at '{cfg.schedule.cron}' on {where}; Ctrl-C stops")
    run_schedule(cfg, addr, token_file, once=False, wait=wait, env=env, echo=echo, stop=stop)


@app.command()
@_errors
def lineage(
    gallery: GalleryArg = None,
    version: Annotated[str | None, typer.Option(help="only this version")] = None,
    shard: Annotated[int | None, typer.Option(help="only this shard id")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Where every embedding came from: per version the embedder (registry version, run) that
    serves it; per shard the method, source version, transformation versions, run and time."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.services.lineage import gallery_lineage

    cfg, ident = _gallery_cfg(config, set_, gallery)
    lin = gallery_lineage(_ctx(cfg), version, shard)
    if as_json:
        print(lin.to_json())
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
    gallery: GalleryArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Who holds the gallery's upgrade lock, if anyone. Exit 3 while it is held."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.gallery.lock import holder_of

    cfg, _ = _gallery_cfg(config, set_, gallery, uses_tracking=False)
    info = holder_of(cfg.gallery_uri, cfg.storage)
    if info is None:
        console.print(f"{cfg.gallery_uri}: not locked")
        return
    console.print(f"{cfg.gallery_uri}: locked by {info.describe()}")
    if not info.expired:
        raise typer.Exit(EXIT_LOCKED)


@lock_app.command("break")
@_errors
def lock_break(
    gallery: GalleryArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Remove the lock whoever holds it: only when its holder is gone for sure (an upgrade it
    interrupts resumes later; two upgrades at once would not be safe)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.gallery.lock import break_lock

    cfg, _ = _gallery_cfg(config, set_, gallery, uses_tracking=False)
    info = break_lock(cfg.gallery_uri, cfg.storage)
    console.print(
        f"{cfg.gallery_uri}: removed the lock of {info.describe()}" if info else "not locked"
    )
