"""A gallery's lineage from manifests and MLflow: each version's embedder, each shard's origin."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table

from pipeline.context import Context
from pipeline.gallery.store import GalleryError


@dataclass
class ShardLineage:
    """How one shard of a version was produced."""

    shard_id: int
    method: str
    rows: int
    source_version: str | None
    model: str | None
    run_id: str | None
    committed_at: float | None
    reembed_rows: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    # rows by the maps they went through since embedded from their image ("0", "1", ...)
    hops: dict[str, int] = field(default_factory=dict)
    transformation: list[dict[str, Any]] | None = None
    checksum: str | None = None
    run_found: bool | None = None
    source_file: str | None = None  # an imported shard: the input file its rows came from


@dataclass
class VersionLineage:
    """One gallery version: its embedder, how it was built, from what, by which run."""

    version: str
    serving: bool
    model: str | None
    method: str | None
    source_version: str | None
    created_at: float | None
    rows: int
    run_id: str | None
    embedder: dict[str, Any] | None
    run: dict[str, Any] | None
    plan: dict[str, Any] | None
    shards: list[ShardLineage] = field(default_factory=list)


@dataclass
class Lineage:
    gallery: str
    serving: str | None
    tracking_uri: str
    versions: list[VersionLineage] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def tables(self) -> list[Table]:
        t = Table(title=f"gallery {self.gallery} (serving: {self.serving})")
        for c in ("version", "model", "embedder", "method", "from", "rows", "run", "created"):
            t.add_column(c)
        for v in self.versions:
            emb = v.embedder or {}
            t.add_row(
                v.version + (" *" if v.serving else ""),
                str(v.model),
                f"{emb['name']}/{emb['version']}{' (missing!)' if emb['missing'] else ''}"
                if emb
                else "-",
                str(v.method),
                str(v.source_version or "-"),
                str(v.rows),
                str(v.run_id or "-"),
                _when(v.created_at),
            )
        out = [t]
        for v in self.versions:
            s = Table(title=f"shards of {v.version}")
            for c in ("shard", "method", "rows", "re-embedded", "maps: rows", "from"):
                s.add_column(c)
            s.add_column("transformation")
            s.add_column("run")
            s.add_column("committed")
            for sh in v.shards:
                tr = " → ".join(
                    f"{x.get('registry_name')}/{x.get('registry_version')}"
                    for x in sh.transformation or []
                )
                s.add_row(
                    str(sh.shard_id),
                    sh.method,
                    str(sh.rows),
                    str(sh.reembed_rows),
                    " ".join(f"{k}:{n}" for k, n in sh.hops.items()) or "-",
                    str(sh.source_version or sh.source_file or "images"),
                    tr or "-",
                    str(sh.run_id or "-") + ("" if sh.run_found is not False else " (missing!)"),
                    _when(sh.committed_at),
                )
            out.append(s)
        return out


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-"


def _shard(rec: dict[str, Any], manifest: dict[str, Any]) -> ShardLineage:
    # Ingest and full-backfill shards carry the version's run; planned ones their own.
    return ShardLineage(
        shard_id=int(rec["shard_id"]),
        method=str(rec.get("method") or manifest.get("method")),
        rows=int(rec.get("rows", 0)),
        source_version=rec.get("source_version"),
        model=rec.get("model") or manifest.get("model"),
        run_id=rec.get("run_id") or manifest.get("run_id"),
        committed_at=rec.get("committed_at") or manifest.get("created_at"),
        reembed_rows=int(rec.get("reembed_rows") or 0),
        sources=dict(rec.get("sources") or {}),
        hops=dict(rec.get("hops") or {}),
        transformation=rec.get("transformation"),
        checksum=rec.get("checksum"),
        source_file=(rec.get("import_source") or {}).get("uri"),
    )


class _Runs:
    """MLflow runs by id, fetched once each (None when the id is not in MLflow)."""

    def __init__(self, tracker: Any) -> None:
        self.tracker, self.seen = tracker, {}

    def get(self, run_id: str | None) -> dict[str, Any] | None:
        if not run_id:
            return None
        if run_id not in self.seen:
            try:
                r = self.tracker.get_run(run_id)
                self.seen[run_id] = {
                    k: r[k] for k in ("run_id", "name", "status", "start_time", "end_time")
                } | {"parent": r["parent"]}
            except Exception as e:
                if "not found" not in str(e).lower() and "RESOURCE_DOES_NOT_EXIST" not in str(e):
                    raise
                self.seen[run_id] = None
        return self.seen[run_id]


def gallery_lineage(ctx: Context, version: str | None = None, shard: int | None = None) -> Lineage:
    """Lineage of every complete version (or one), every shard (or one)."""
    g, tracker = ctx.gallery, ctx.tracker
    versions = g.versions()
    if version is not None and version not in versions:
        raise GalleryError(f"{g.uri}: no complete version {version!r}; versions: {versions}")
    serving = g.current()
    out = Lineage(g.uri, serving, ctx.cfg.tracking_uri)
    runs = _Runs(tracker)
    for v in [version] if version else versions:
        m = g.manifest(v)
        emb = None
        if m.get("registry_version") is not None:
            name = m.get("registry_model") or ctx.registry_name("embedder")
            info = tracker.model_version(name, int(m["registry_version"]))
            emb = {"name": name, "version": int(m["registry_version"]), "missing": True}
            if info is not None:
                emb = {
                    "name": info.name,
                    "version": info.version,
                    "run_id": info.run_id,
                    "aliases": info.aliases,
                    "model": info.tags.get("carryover.model"),
                    "missing": False,
                }
        shards = [_shard(r, m) for r in m["shards"]]
        if shard is not None:
            shards = [s for s in shards if s.shard_id == shard]
            if not shards:
                raise GalleryError(f"{g.uri}: version {v!r} has no shard {shard}")
        for s in shards:
            s.run_found = runs.get(s.run_id) is not None if s.run_id else None
        out.versions.append(
            VersionLineage(
                version=v,
                serving=v == serving,
                model=m.get("model"),
                method=m.get("method"),
                source_version=m.get("source_version"),
                created_at=m.get("created_at"),
                rows=int(m.get("rows", 0)),
                run_id=m.get("run_id"),
                embedder=emb,
                run=runs.get(m.get("run_id")),
                plan=m.get("plan"),
                shards=shards,
            )
        )
    return out
