"""Operations: submit jobs to a Ray cluster (or run them here), the `jobs` sub-app over the
gallery's journal, and nightly `schedule` ticks."""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pipeline.cli.common import (
    AddressOpt,
    ConfigOpt,
    EnvOpt,
    GalleryAliasOpt,
    GalleryArg,
    JobIdArg,
    JsonOpt,
    SetOpt,
    TokenOpt,
    _cfg,
    _errors,
    _gallery_cfg,
    _target_cfg,
    app,
    console,
    emit_json,
    err,
    jobs_app,
    pick_gallery,
)
from pipeline.config import ConfigError

RuntimeEnvOpt = Annotated[
    Path | None,
    typer.Option(
        "--runtime-env",
        help="a runtime_env (YAML or JSON file) for the job, as `ray job submit` takes: pip, "
        "conda, py_modules, env_vars, ...; merged with carryover's (docs/cli.md)",
    ),
]
RuntimeEnvJsonOpt = Annotated[
    str | None,
    typer.Option("--runtime-env-json", help="a runtime_env as JSON (updates --runtime-env's)"),
]
NumCpusOpt = Annotated[
    float | None,
    typer.Option("--entrypoint-num-cpus", min=0, help="CPUs to reserve for the entrypoint"),
]
NumGpusOpt = Annotated[
    float | None,
    typer.Option("--entrypoint-num-gpus", min=0, help="GPUs to reserve for the entrypoint"),
]
MemoryOpt = Annotated[
    int | None,
    typer.Option("--entrypoint-memory", min=0, help="memory (bytes) to reserve for it"),
]
ResourcesOpt = Annotated[
    str | None,
    typer.Option(
        "--entrypoint-resources",
        help="custom resources to reserve for it, as JSON: '{\"accelerator_type:H100\": 1}'",
    ),
]


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def job_options(
    runtime_env: Path | None,
    runtime_env_json: str | None,
    num_cpus: float | None,
    num_gpus: float | None,
    memory: int | None,
    resources: str | None,
) -> Any:
    """submit's pass-through options as a JobOptions (files and JSON read and checked)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    return jobs.JobOptions(
        runtime_env=jobs.load_runtime_env(runtime_env, runtime_env_json),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        memory=memory,
        resources=jobs.parse_resources(resources),
    )


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
    runtime_env: RuntimeEnvOpt = None,
    runtime_env_json: RuntimeEnvJsonOpt = None,
    num_cpus: NumCpusOpt = None,
    num_gpus: NumGpusOpt = None,
    memory: MemoryOpt = None,
    resources: ResourcesOpt = None,
    token_file: TokenOpt = None,
    gallery: Annotated[
        str | None,
        typer.Option(
            "--gallery",
            help="gallery URI (default: the config's; an option here: what follows -- is the "
            "job's)",
        ),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Submit a jobs/ entrypoint with the config to a Ray cluster's job API (the package and
    the resolved config travel as its working directory); prints the submission id.

    Without an address the job runs here, in the foreground, on a local Ray. Exit 0 once
    submitted (with --follow or locally: 0 if the job succeeded, 1 if it failed)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    cfg = _target_cfg(config, set_, gallery)
    opts = job_options(runtime_env, runtime_env_json, num_cpus, num_gpus, memory, resources)
    addr = jobs.job_address(address, cfg)
    out = err if as_json else console
    if addr is None:
        _run_here(cfg, job, job_args or [], env, opts, as_json)
    sub = jobs.submit(cfg, addr, job, job_args or [], env, token_file, options=opts)
    out.print(f"submitted {sub.id} to {addr}: {sub.entrypoint}")
    out.print(f"environment: {', '.join(sub.env_names)} (values not shown)")
    if follow:
        rec = jobs.follow(sub.id, addr, token_file, lambda c: out.out(c, end=""))
        sub.status = rec["status"]
        _say_submitted(sub, as_json, f"job {sub.id}: {rec['status']}")
        raise typer.Exit(0 if rec["status"] == "SUCCEEDED" else 1)
    out.print(f"follow: carryover jobs logs {sub.id} --address {addr} --follow")
    if as_json:
        emit_json(asdict(sub))
    else:
        print(sub.id)  # the last line, alone, for scripts


def _run_here(cfg: Any, job: str, args: list[str], env: Any, opts: Any, as_json: bool) -> None:
    """submit without an address: the job runs here, in the foreground; exit 0 or 1."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    if opts.given():
        raise ConfigError(
            "--runtime-env and --entrypoint-* apply to a cluster submission: give --address"
        )
    echo = (lambda line: err.out(line, end="")) if as_json else None
    sub = jobs.run_here(cfg, job, args, env, **({"echo": echo} if echo else {}))
    _say_submitted(sub, as_json, f"local job {sub.id}: {sub.status}")
    raise typer.Exit(0 if sub.status == "SUCCEEDED" else 1)


def _say_submitted(sub: Any, as_json: bool, line: str) -> None:
    if as_json:
        emit_json(asdict(sub))
    else:
        console.print(line)


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
    limit: Annotated[int, typer.Option(min=1)] = 30,
    as_json: JsonOpt = False,
    token_file: TokenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gallery_opt: GalleryAliasOpt = None,
    gallery: GalleryArg = None,
) -> None:
    """carryover's jobs on the cluster and the gallery's journal: submissions, local runs and
    scheduler ticks (no-op, submitted, refused by the lock, failed, missed), newest first.
    --json: {"gallery": URI, "jobs": [...]}."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    cfg, journal = _journal(config, set_, pick_gallery(gallery, gallery_opt))
    rows = jobs.list_jobs(jobs.job_address(address, cfg), token_file, journal)[:limit]
    if as_json:
        emit_json({"gallery": cfg.gallery_uri, "jobs": rows})
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
    job_id: JobIdArg,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option(help="poll until the job ends")] = False,
    timeout: Annotated[float | None, typer.Option(help="give up waiting after seconds")] = None,
    as_json: JsonOpt = False,
    token_file: TokenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gallery: GalleryArg = None,
) -> None:
    """A job's status. Exit 0 if it succeeded or is still running, 1 if it failed or was
    stopped (with --wait: once it ends; 4 if --timeout passed first)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    cfg, journal = _journal(config, set_, gallery)
    addr = jobs.job_address(address, cfg)
    if wait:
        rec = jobs.wait(job_id, addr, token_file, journal, timeout=timeout)
    else:
        rec = jobs.status(job_id, addr, token_file, journal)
    if as_json:
        emit_json(rec)
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
    job_id: JobIdArg,
    address: AddressOpt = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="stream until the job ends (exit 0: it succeeded, 1: not)"
        ),
    ] = False,
    token_file: TokenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gallery: GalleryArg = None,
) -> None:
    """A job's driver logs (local jobs: from the gallery's journal, which a running local job
    updates every few seconds)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs

    cfg, journal = _journal(config, set_, gallery)
    addr = jobs.job_address(address, cfg)
    if not follow:
        console.out(jobs.logs(job_id, addr, token_file, journal), end="")
        return
    echo = lambda c: console.out(c, end="")  # noqa: E731
    if addr and not job_id.startswith(f"{jobs.LOCAL}-"):
        rec = jobs.follow(job_id, addr, token_file, echo)
    else:
        rec = jobs.follow_local(job_id, journal, echo)
    if rec["status"] != "SUCCEEDED":
        err.print(f"job {job_id}: {rec['status']}")
        raise typer.Exit(1)


@jobs_app.command("stop")
@_errors
def jobs_stop(
    job_id: JobIdArg,
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
    as_json: Annotated[
        bool, typer.Option("--json", help="with --once: the tick as one JSON line on stdout")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gallery: GalleryArg = None,
) -> None:
    """Nightly upgrades: at each tick, under the gallery's lock, upgrade when the registry's
    `candidate` embedder is newer than `serving`, else record a no-op. Every tick is in
    `carryover jobs list`. --once exits 0 (no-op or upgraded), 1 (the upgrade failed) or 3
    (another upgrade holds the gallery's lock)."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops import jobs
    from pipeline.ops.schedule import run_schedule

    sets = list(set_ or []) + ([f"schedule.cron={json.dumps(cron)}"] if cron else [])  # quoted YAML
    cfg = _target_cfg(config, sets, gallery)
    addr = jobs.job_address(address, cfg)
    out = err if as_json else console
    if once:
        r = run_schedule(cfg, addr, token_file, once=True, wait=wait, env=env, echo=out.print)
        style = {"locked": "yellow", "failed": "red", "error": "red"}.get(r.outcome, "green")
        out.print(f"[{style}]tick {r.id}: {r.outcome}[/]: {r.reason}")
        if as_json:
            emit_json(asdict(r))
        raise typer.Exit(r.exit_code)
    if as_json:
        raise ConfigError("--json needs --once (a running schedule reports each tick as a line)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    where = addr or "a local Ray"
    console.print(f"scheduling {cfg.gallery_uri} at '{cfg.schedule.cron}' on {where}; Ctrl-C stops")
    run_schedule(
        cfg, addr, token_file, once=False, wait=wait, env=env, echo=console.print, stop=stop
    )
