"""What a run read or built, described for MLflow's run inputs: gallery versions (digest over
their manifest's shard checksums), image shards (digest over file names and sizes: a listing,
never the images), and the LoggedModels behind registered model versions."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.context import Context
from pipeline.data.shards import image_shard_files
from pipeline.gallery.store import Gallery
from pipeline.io import uri as uri_io
from pipeline.io.redact import redact_text
from pipeline.tracking.mlmodel import DatasetRef


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:16]  # MLflow shows digests short; 64 bits tell versions apart


def gallery_version_ref(g: Gallery, name: str, version: str, context: str) -> DatasetRef:
    """A complete gallery version from its manifest: rows, shards and their checksums."""
    m = g.manifest(version)
    shards = sorted(m["shards"], key=lambda s: int(s["shard_id"]))
    digest = _digest(f"{s['shard_id']}:{s.get('checksum')}" for s in shards)
    profile = {
        "shards": len(shards),
        "embedding_dim": m.get("embedding_dim"),
        "model": m.get("model"),
    }
    return DatasetRef(
        name=f"{name}@{version}",
        source_uri=redact_text(g.version_uri(version)),
        digest=digest,
        context=context,
        rows=int(m.get("rows", 0)),
        profile=profile,
    )


def images_ref(images_uri: str, files: Mapping[int, str], storage: Any, context: str) -> DatasetRef:
    """The image shards a run read: one stat per shard file, no data read."""
    sizes = []
    for sid in sorted(files):
        loc = uri_io.resolve(files[sid], storage)
        sizes.append((sid, loc.fs.get_file_info(loc.path).size or 0))
    return DatasetRef(
        name="images",
        source_uri=redact_text(images_uri),
        digest=_digest(f"{sid}:{size}" for sid, size in sizes),
        context=context,
        profile={"shards": len(sizes), "bytes": sum(s for _, s in sizes)},
    )


def training_images(ctx: Context) -> DatasetRef:
    """The image shards a training run learned from."""
    files = image_shard_files(ctx.cfg.images_uri, ctx.cfg.storage)
    return images_ref(ctx.cfg.images_uri, files, ctx.cfg.storage, "training")


def model_ids(ctx: Context, versions: Iterable[tuple[str, int | None]]) -> list[str]:
    """The LoggedModel ids of (registered model, version) pairs that have one."""
    out = []
    for name, version in versions:
        info = ctx.tracker.model_version(name, version) if version is not None else None
        if info is not None and info.model_id:
            out.append(info.model_id)
    return out
