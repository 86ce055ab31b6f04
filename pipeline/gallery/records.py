"""The records a gallery version is made of: its manifest and each shard's commit record."""

from __future__ import annotations

import time
from typing import Any

from pipeline.gallery.identity import GalleryIdentity
from pipeline.gallery.store import Gallery, shard_file


def version_manifest(
    identity: GalleryIdentity,
    *,
    method: str,
    model: str,
    registry_version: int | None,
    embedding_dim: int,
    side_info_model: str | None,
    side_info_dim: int,
    index: dict[str, Any],
    run_id: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The fields a version's manifest records beside its shards (`Gallery.finalize` adds
    rows, rejected and the shard list): what built it, with which model, and its index.
    `extra`: what one kind of build adds (an upgrade's source_version and plan, an ingest's
    rows_per_second)."""
    return {
        **identity.manifest_fields(),
        "method": method,
        "model": model,
        "registry_version": registry_version,
        "embedding_dim": embedding_dim,
        "side_info_model": side_info_model,
        "side_info_dim": side_info_dim,
        "index": index,
        "run_id": run_id,
        **extra,
    }


def shard_record(
    shard_id: int,
    *,
    rows: int,
    rejected: int,
    rows_in: int,
    checksum: str,
    seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    """A shard's commit record (`Gallery.commit_shard`): its file, row counts, checksum and
    time. `extra`: what built it (method, model, run, source and for an upgrade its chain)."""
    return {
        "shard_id": shard_id,
        "path": shard_file(shard_id),
        "rows": rows,
        "rejected": rejected,
        "rows_in": rows_in,
        "checksum": checksum,
        "seconds": round(seconds, 3),
        "committed_at": time.time(),
        **extra,
    }


def version_summaries(g: Gallery) -> dict[str, dict[str, Any]]:
    """Per complete version: model, method, rows, rejected, shards, source and index kind."""
    versions = {}
    for v in g.versions():
        m = g.manifest(v)
        versions[v] = {
            k: m.get(k) for k in ("model", "method", "rows", "rejected", "source_version")
        } | {"shards": len(m["shards"]), "index": (m.get("index") or {}).get("kind")}
    return versions
