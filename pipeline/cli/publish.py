"""`carryover publish` and `carryover targets`: copies of versions in vector databases."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

import typer

from pipeline.cli.common import (
    ConfigOpt,
    GalleryArg,
    JsonOpt,
    QuietOpt,
    SetOpt,
    VersionArg,
    _errors,
    _gallery_cfg,
    app,
    console,
    emit_json,
    err,
)

ToOpt = Annotated[
    str,
    typer.Option(
        "--to",
        help="target: lancedb:///abs/path, lancedb://rel/path or lancedb://s3://bucket/prefix "
        "(s3 through storage.endpoint_url and the usual credentials)",
    ),
]


@app.command()
@_errors
def publish(
    version: VersionArg,
    gallery: GalleryArg = None,
    to: ToOpt = ...,  # type: ignore[assignment]
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Publish VERSION to a vector database (rows, ANN index); promote/rollback then move its
    `serving` tag with CURRENT. Exit 2: bad URI or unknown version; 1: the target failed."""
    # start-up: pyarrow, lance and Ray (seconds); --help and parsing need none of them
    from pipeline.context import gallery_lock
    from pipeline.gallery.store import Gallery
    from pipeline.publish.serving import publish_version
    from pipeline.publish.target import parse_target

    cfg, _ = _gallery_cfg(config, set_, gallery, uses_tracking=False)
    target = parse_target(to)  # a bad URI: exit 2 before the lock or Ray
    g = Gallery(cfg.gallery_uri, cfg.storage)
    with gallery_lock(cfg, "carryover publish", f"publish {version} to {target}"):
        if quiet or as_json:
            r = publish_version(cfg, g, version, to)
        else:
            with err.status(f"publishing {version} to {target} (rows, then the ANN index)"):
                r = publish_version(cfg, g, version, to)
    if as_json:
        emit_json(_result_dict(r))
        return
    p = r.published
    index = f"{p.index_type}, {p.partitions} partitions" if p.partitions else "no ANN index"
    console.print(
        f"published {p.version} to {p.target}: table {p.table!r} version "
        f"{p.table_version}, {p.rows} rows, {index}"
    )
    if p.nprobes:
        console.print(
            f"search with nprobes={p.nprobes} refine_factor={p.refine_factor}: "
            f"recall@10 {p.recall_at_10:.3f} vs exact"
        )
    serving = r.info.serving or "none (promote a published version to set it)"
    console.print(f"{r.info.serving_tag} tag: {serving}")


def _result_dict(r: Any) -> dict[str, Any]:
    return {
        "published": asdict(r.published),
        "target": asdict(r.info),
        "serving_moved": r.serving_moved,
    }


@app.command()
@_errors
def targets(
    gallery: GalleryArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the gallery's publish targets: versions held and the one each serving tag names."""
    # start-up: pyarrow and lance (seconds); --help and parsing need neither
    from pipeline.gallery.store import Gallery
    from pipeline.publish.serving import recorded_targets
    from pipeline.publish.target import read_records

    cfg, _ = _gallery_cfg(config, set_, gallery, uses_tracking=False)
    g = Gallery(cfg.gallery_uri, cfg.storage)
    records = read_records(g)
    infos = [t.describe() for t in recorded_targets(g, cfg)]
    if as_json:
        out = [{**asdict(i), "published": records[i.target]["published"]} for i in infos]
        emit_json({"gallery": g.uri, "current": g.current(), "targets": out})
        return
    if not infos:
        console.print(f"{g.uri}: no publish targets (carryover publish VERSION --to URI)")
    for i in infos:
        held = ", ".join(sorted(i.versions)) or "none"
        console.print(
            f"{i.target} table {i.table!r}: versions {held}; "
            f"{i.serving_tag} → {i.serving or 'none'}"
        )
