"""`carryover status`: what the gallery serves, the upgrade running now and the last ones."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli.common import (
    ConfigOpt,
    GalleryArg,
    JsonOpt,
    SetOpt,
    _errors,
    _gallery_cfg,
    app,
    console,
    emit_json,
)


@app.command()
@_errors
def status(
    gallery: GalleryArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    recent: Annotated[
        int | None,
        typer.Option(min=0, help="how many finished upgrades to list (progress.recent_upgrades)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The serving version; a running upgrade's stage, shards done/total, rows/s, ETA,
    training epoch and loss, and the lock's holder; the last upgrades and how they ended.
    Reads the gallery's records only (no Ray or MLflow). Exit 2: no gallery there."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.ops.status import gallery_status

    cfg, _ = _gallery_cfg(config, set_, gallery, uses_tracking=False)  # no gallery: exit 2
    st = gallery_status(cfg, recent)
    if as_json:
        emit_json(st.to_dict())
        return
    console.print(f"gallery {escape(st.gallery)}: serving [bold]{st.serving or '-'}[/]")
    if st.lock is not None:
        console.print(f"lock: {escape(st.lock.text)}")
    if st.running is not None:
        _print_running(st.running)
    elif st.lock is None:
        console.print("no upgrade running")
    if st.upgrades:
        console.print(_upgrades_table(st.upgrades))


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _print_running(run: Any) -> None:
    p = run.progress or {}
    console.print(f"[bold cyan]running[/] {run.id} → {p.get('target') or run.target}")
    if p.get("stage"):
        since = time.time() - (p.get("stage_started_at") or time.time())
        done = ", ".join(p.get("stages_done") or []) or "-"
        console.print(f"  stage {p['stage']} (for {_secs(since)}); done: {done}")
    if p.get("shards_total"):
        rps = p.get("rows_per_s") or 0
        console.print(
            f"  shards {p['shards_done']}/{p['shards_total']}, {p.get('rows') or 0:,} rows, "
            f"{rps:,.0f} rows/s, ETA {_secs(p.get('eta_s'))}"
        )
    t = p.get("training")
    if t:
        loss = f"{t['loss']:.4f}" if t.get("loss") is not None else "-"
        steps = f"/{t['steps']}" if t.get("steps") else ""
        console.print(
            f"  training {t['model']}: epoch {min(t['epoch'] + 1, t['epochs'])}/{t['epochs']}, "
            f"step {t['step']}{steps}, loss {loss}, ETA {_secs(t.get('eta_s'))}"
        )
    if p.get("updated_at"):
        console.print(f"  [dim]updated {time.time() - p['updated_at']:.0f}s ago[/]")


def _upgrades_table(runs: list[Any]) -> Table:
    t = Table(title="last upgrades")
    for c in ("started", "id", "trigger", "target", "status", "took", "detail"):
        t.add_column(c, overflow="fold")
    for r in runs:
        took = _secs(r.ended_at - r.created_at) if r.ended_at and r.created_at else "-"
        state = r.status if r.stale is None else f"{r.status} (stale: {r.stale})"
        if r.progress and r.progress.get("stage"):
            detail = f"at stage {r.progress['stage']}"
        else:
            detail = r.message or ""
        t.add_row(
            _when(r.created_at),
            r.id,
            str(r.trigger or "-"),
            str(r.target or "-"),
            state,
            took,
            escape(detail),
        )
    return t
