"""`carryover import`: adopt a gallery embedded elsewhere as a version, without re-embedding."""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.config import ConfigError, ModelConfig
from pipeline.context import Context
from pipeline.data.embeddings import (
    RowBatch,
    Sources,
    check_dim,
    check_keys,
    find_sources,
    iter_rows,
)
from pipeline.data.shards import DataError, image_shard_files
from pipeline.embed.quality import NON_FINITE, OVERFLOW, ZERO_NORM, row_problems
from pipeline.gallery.identity import GalleryIdentity
from pipeline.gallery.records import shard_record, version_manifest
from pipeline.gallery.store import (
    REJECT_SCHEMA,
    VERSION_PATTERN,
    Gallery,
    embedding_schema,
    embeddings_to_arrow,
)
from pipeline.io import uri as uri_io
from pipeline.io.redact import redact_text
from pipeline.models.store import (
    MODEL_FILE,
    ModelBlob,
    build_model,
    check_output_dim,
    resolve_blob,
)
from pipeline.services.models import register
from pipeline.services.steps import index_version

METHOD = "import"
IMPORT_FORMAT = "carryover-import/1"  # model.json of a brought model registered by an import
NULL_EMBEDDING = "embedding is null"
# row_problems speaks of a model run here; an imported row's fault is in the input file
REASONS = {
    NON_FINITE: "non-finite value (NaN/inf) in the embedding",
    ZERO_NORM: "zero-norm embedding (it normalises to nothing)",
    OVERFLOW: "embedding norm overflows float32",
}
IMAGE_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("image", pa.string())])


@dataclass(frozen=True)
class ImportRequest:
    """What to import: the input files, the version to create, the model that made them and
    where the images are (None: nowhere, or only in an image column)."""

    source: str
    version: str
    model: ModelConfig
    images: str | None = None


@dataclass(frozen=True)
class ShardPlan:
    """Rows [start, stop) of input file `file` become gallery shard `shard_id`."""

    shard_id: int
    file: int
    start: int
    stop: int


@dataclass
class ImportResult:
    """A version adopted from existing embedding files."""

    version: str
    source: str
    layout: str
    files: int
    rows: int
    rejected: int
    shards: int
    shards_written: int
    embedding_dim: int
    model: str
    model_uri: str | None
    images: dict[str, Any] | None
    index: dict[str, Any]
    run_id: str | None
    seconds: float
    skipped: bool = False


def plan_shards(sources: Sources, max_rows: int) -> list[ShardPlan]:
    """Consecutive row ranges of at most `max_rows`, file by file; ids in file order (the same
    files give the same plan, so a rerun finds its committed shards)."""
    out: list[ShardPlan] = []
    for i, f in enumerate(sources.files):
        for start in range(0, max(f.rows, 1), max_rows):
            out.append(ShardPlan(len(out), i, start, min(f.rows, start + max_rows)))
    return out


def origin(sources: Sources, p: ShardPlan) -> dict[str, Any]:
    """What a shard was made from: its commit record's `import_source` (reuse is by equality)."""
    return {
        **sources.files[p.file].fingerprint(),
        "start": p.start,
        "stop": p.stop,
        "columns": asdict(sources.columns),
    }


def model_blob(ctx: Context, model: ModelConfig) -> ModelBlob:
    """The model that made the embeddings, loaded and run once on a dummy batch: its output
    dimension is the one the files must have."""
    if model.uri is None and not (ctx.model_dir(model) / MODEL_FILE).exists():
        raise ConfigError(
            "import needs the model that made the embeddings: --model-uri (a TorchScript file, "
            "models:/NAME/VERSION or a carryover model dir) or old_model.uri"
        )
    blob = resolve_blob(model, ctx.model_dir(model), ctx.cfg.storage, ctx.cfg.tracking_uri)
    check_output_dim(build_model(blob), blob)
    return blob


def register_model(ctx: Context, model: ModelConfig, blob: ModelBlob, run: Any) -> tuple[str, int]:
    """The registry version of the gallery's embedder that holds `blob`: the one a models:/
    URI of this gallery names, else one registered here (once per weights digest)."""
    name = ctx.registry_name()
    if model.uri is not None and model.uri.startswith("models:/"):
        info = ctx.tracker.resolve(model.uri)
        if info.name == name:
            return name, info.version
    with tempfile.TemporaryDirectory(prefix="carryover-import-") as d:
        for fname, data in blob.files.items():
            (Path(d) / fname).write_bytes(data)
        meta = blob.meta if blob.kind == "carryover" else _brought_meta(model, blob)
        (Path(d) / MODEL_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        tags = {"model": model.name, "imported": "true", "source_uri": _shown(model.uri)}
        return name, register(ctx, "embedder", d, run, blob.digest, tags)


def _brought_meta(model: ModelConfig, blob: ModelBlob) -> dict[str, Any]:
    """model.json beside a brought model's own file (it is found by its suffix on load)."""
    return {
        "format": IMPORT_FORMAT,
        "kind": blob.kind,
        "name": model.name,
        "embedding_dim": blob.embedding_dim,
        "preprocess": blob.preprocess.model_dump(),
        "source": _shown(model.uri),
    }


def _shown(uri: str | None) -> str:
    return redact_text(uri) if uri else ""


def images_record(
    req: ImportRequest, sources: Sources, g: Gallery, storage: Any
) -> dict[str, Any] | None:
    """Where the images of the imported rows are, for later backfills: image shards by key,
    a path/URL column (kept per shard under the version's images/), or None (gone)."""
    shards = image_shard_files(req.images, storage) if req.images else None
    column = sources.columns.image
    if shards is None and column is None:
        return None
    return {
        "shards": _shown(req.images) or None,
        "shard_files": len(shards) if shards else None,
        "column": column,
        "paths": _shown(g.path("versions", req.version, "images")) if column else None,
    }


def row_reasons(emb: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Per row why it cannot be stored ("" when it can): null, non-finite, zero norm."""
    out = np.array([REASONS.get(r, r) for r in row_problems(emb)], dtype=object)
    out[null] = NULL_EMBEDDING
    return out


class _ShardWriter:
    """One gallery shard being written: its rows, its rejects and (with an image column) each
    kept row's image location; nothing is visible until `commit`."""

    def __init__(self, g: Gallery, version: str, p: ShardPlan, dim: int, source: str) -> None:
        self.g, self.version, self.p, self.source = g, version, p, source
        self.t0 = time.perf_counter()
        self.schema = embedding_schema(dim)
        uri = g.shard_uri(version, p.shard_id)
        self.out = uri_io.ParquetStreamWriter(uri, self.schema, g.storage)
        self.images: uri_io.ParquetStreamWriter | None = None  # opened by the first path
        self.rejects: list[tuple[str, str]] = []

    def add(self, b: RowBatch, lo: int, hi: int) -> None:
        """Rows [lo, hi) of the batch (positions in the batch): kept or rejected with a reason."""
        keys, emb = b.keys.slice(lo, hi - lo), b.embeddings[lo:hi]
        why = row_reasons(emb, b.null_embedding[lo:hi])
        ok = pa.array(why == "")
        kept = keys.filter(ok)
        source = pa.array([self.source] * len(kept), pa.string())
        emb_kept = embeddings_to_arrow(emb[why == ""])
        self.out.write(pa.record_batch([kept, emb_kept, source], schema=self.schema))
        if b.images is not None:
            paths = b.images.slice(lo, hi - lo).filter(ok).cast(pa.string())
            if self.images is None:
                uri = images_uri(self.g, self.version, self.p.shard_id)
                self.images = uri_io.ParquetStreamWriter(uri, IMAGE_SCHEMA, self.g.storage)
            self.images.write(pa.record_batch([kept, paths], schema=IMAGE_SCHEMA))
        bad = np.flatnonzero(why != "")
        if bad.size:
            bad_keys = keys.take(pa.array(bad)).to_pylist()
            self.rejects.extend(zip(bad_keys, why[bad].tolist(), strict=True))

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Close the file, write rejects and image paths, then the commit record (last)."""
        self.out.close()
        g, v, sid = self.g, self.version, self.p.shard_id
        if self.rejects:
            keys, reasons = zip(*self.rejects, strict=True)
            table = pa.table({"key": list(keys), "reason": list(reasons)}, schema=REJECT_SCHEMA)
            uri_io.write_table(table, g.rejects_uri(v, sid), g.storage)
        if self.images is not None:
            self.images.close()
        rec = shard_record(
            sid,
            rows=self.out.rows,
            rejected=len(self.rejects),
            rows_in=self.p.stop - self.p.start,
            checksum=g.file_checksum(g.shard_uri(v, sid)),
            seconds=time.perf_counter() - self.t0,
            **meta,
        )
        g.commit_shard(v, rec)
        return rec

    def abort(self) -> None:
        self.out.abort()
        if self.images is not None:
            self.images.abort()


def images_uri(g: Gallery, version: str, shard_id: int) -> str:
    """A shard's key → image path/URL table (an import with adopt.image_column)."""
    return g.path("versions", version, "images", f"shard-{shard_id:05d}.parquet")


@dataclass
class _Pass:
    """What one import pass needs while it streams: where rows go and the reject tally."""

    ctx: Context
    req: ImportRequest
    sources: Sources
    blob: ModelBlob
    meta: dict[str, Any]  # every commit record's what-built-it fields
    progress: Progress
    task: Any
    rows_in: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)

    def committed(self, rec: dict[str, Any], w: _ShardWriter) -> None:
        """Count a committed shard; stop once more rows were rejected than the config allows
        (a wrong column or a broken export, not a few bad rows)."""
        self.rows_in += rec["rows_in"]
        self.rejected += rec["rejected"]
        self.reasons.update(r for _, r in w.rejects)
        limit = self.ctx.cfg.embed.max_rejected_fraction
        if self.rejected > limit * self.rows_in:
            top = self.reasons.most_common(1)[0][0]
            f = self.sources.files[w.p.file].uri
            raise DataError(
                f"{f}: {self.rejected} of {self.rows_in} rows imported so far were rejected "
                f"(most: {top}), over embed.max_rejected_fraction={limit}; no version was made"
            )


def write_shards(ps: _Pass, plan: list[ShardPlan]) -> int:
    """Write every planned shard not already committed from the same input; returns how many
    were written. Committed shards of other input (the files changed) are redone."""
    g, version = ps.ctx.gallery, ps.req.version
    committed = g.committed_shards(version)
    for sid in set(committed) - {p.shard_id for p in plan}:  # a plan of earlier, other files
        uri_io.delete(g.record_uri(version, sid), g.storage)
    todo = [p for p in plan if not _reusable(committed.get(p.shard_id), ps, p)]
    for p in plan:
        if p not in todo:
            ps.rows_in += p.stop - p.start
            ps.rejected += int(committed[p.shard_id].get("rejected", 0))
    ps.progress.update(ps.task, total=sum(p.stop - p.start for p in todo))
    with ps.progress:
        for i in sorted({p.file for p in todo}):
            _write_file(ps, [p for p in todo if p.file == i])
    return len(todo)


def _reusable(rec: dict[str, Any] | None, ps: _Pass, p: ShardPlan) -> bool:
    return (
        rec is not None
        and rec.get("import_source") == origin(ps.sources, p)
        and rec.get("model_digest") == ps.blob.digest
    )


def _write_file(ps: _Pass, shards: list[ShardPlan]) -> None:
    """Stream one input file once, routing its rows to the planned shards in order."""
    src = ps.sources.files[shards[0].file]
    cfg, g = ps.ctx.cfg, ps.ctx.gallery
    source = f"embed:{ps.req.model.name}"  # the old model's own rows, as after an ingest
    pending, w = list(shards), None
    rows = iter_rows(
        src, ps.sources.columns, ps.blob.embedding_dim, cfg.storage, cfg.adopt.batch_rows
    )
    try:
        for b in rows:
            end = b.start + len(b.keys)
            while pending and pending[0].start < end:
                p = pending[0]
                lo, hi = max(p.start, b.start), min(p.stop, end)
                if hi <= lo:
                    break
                w = w or _ShardWriter(g, ps.req.version, p, ps.blob.embedding_dim, source)
                w.add(b, lo - b.start, hi - b.start)
                ps.progress.advance(ps.task, hi - lo)
                if hi < p.stop:
                    break
                meta = {**ps.meta, "import_source": origin(ps.sources, p)}
                ps.committed(w.commit(meta), w)
                pending, w = pending[1:], None
            if not pending:
                break
        for p in pending:  # a file of no rows has one empty shard; else the file shrank
            if p.stop > p.start:
                raise DataError(
                    f"{src.uri}: ended before row {p.start}; its footer said {src.rows}"
                )
            meta = {**ps.meta, "import_source": origin(ps.sources, p)}
            _ShardWriter(g, ps.req.version, p, ps.blob.embedding_dim, source).commit(meta)
    except BaseException:
        if w is not None:
            w.abort()  # nothing half-written becomes visible
        raise


def import_step(ctx: Context, req: ImportRequest) -> ImportResult:
    """Adopt existing embedding files as gallery version `req.version`.

    Checks before anything is written: files, columns, dimensions (against the model's
    output), row counts and unique keys. Then streams the rows into shards (bad rows
    rejected with a reason), registers the model, indexes and writes the manifest last.
    Rerunning keeps committed shards of the same input; a finished import does nothing."""
    t0, g, storage = time.perf_counter(), ctx.gallery, ctx.cfg.storage
    if not re.fullmatch(VERSION_PATTERN, req.version):
        raise ConfigError(f"--version {req.version!r} is not a plain name ({VERSION_PATTERN})")
    sources = find_sources(req.source, ctx.cfg.adopt, storage)
    if g.has_version(req.version):
        return _existing(g, req, sources)
    blob = model_blob(ctx, req.model)
    check_dim(sources, blob.embedding_dim, blob.name)
    images = images_record(req, sources, g, storage)
    check_keys(sources, storage)
    plan = plan_shards(sources, ctx.cfg.adopt.max_shard_rows)
    tags = ctx.tags(step=METHOD, to_version=req.version)
    with ctx.tracker.run(f"{METHOD}-{req.version}", tags) as run:
        model_name, rv = register_model(ctx, req.model, blob, run)
        meta = {
            "method": METHOD,
            "model": req.model.name,
            "source_version": None,
            "run_id": run.run_id,
            "model_digest": blob.digest,
        }
        ps = _Pass(ctx, req, sources, blob, meta, _progress(req.version, ctx.quiet), None)
        ps.task = ps.progress.add_task(METHOD, total=sources.rows)
        written = write_shards(ps, plan)
        records = list(g.committed_shards(req.version).values())
        index = index_version(ctx, req.version, records, blob.embedding_dim)
        extra = _manifest_extra(req, sources, blob, f"models:/{model_name}/{rv}", images)
        m = g.finalize(req.version, _manifest(ctx, req, blob, rv, index, run.run_id, extra))
        run.log_params({"source": _shown(req.source), "layout": sources.layout})
        run.log_metrics({"rows": m["rows"], "rejected": m["rejected"], "shards_written": written})
        run.log_dict(m, "manifest.json")
    return _result(m, sources, written, time.perf_counter() - t0)


def _manifest(
    ctx: Context,
    req: ImportRequest,
    blob: ModelBlob,
    rv: int,
    index: dict[str, Any],
    run_id: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return version_manifest(
        GalleryIdentity.of_config(ctx.cfg),
        method=METHOD,
        model=req.model.name,
        registry_version=rv,
        embedding_dim=blob.embedding_dim,
        side_info_model=None,
        side_info_dim=0,
        index=index,
        run_id=run_id,
        **extra,
    )


def _manifest_extra(
    req: ImportRequest,
    sources: Sources,
    blob: ModelBlob,
    model_uri: str,
    images: dict[str, Any] | None,
) -> dict[str, Any]:
    """What an import adds to its manifest: the input files, the model, where the images are."""
    return {
        "model_uri": model_uri,
        "model_source": _shown(req.model.uri) or None,
        "model_digest": blob.digest,
        "images": images,
        "import": {
            "source": _shown(sources.uri),
            "layout": sources.layout,
            "columns": asdict(sources.columns),
            "files": [{**f.fingerprint(), "mtime": f.mtime} for f in sources.files],
        },
    }


def _existing(g: Gallery, req: ImportRequest, sources: Sources) -> ImportResult:
    """A version of that name is complete: the same import again is done; anything else is
    refused (a version is never overwritten)."""
    m = g.manifest(req.version)
    files = [
        {k: f.get(k) for k in ("uri", "metadata", "rows", "size")}
        for f in (m.get("import") or {}).get("files", [])
    ]
    if m.get("method") != METHOD or files != [f.fingerprint() for f in sources.files]:
        raise ConfigError(
            f"{g.uri}: version {req.version!r} already exists ({m.get('method')} of model "
            f"{m.get('model')!r}, from other input): import under another name with --version"
        )
    return _result(m, sources, 0, 0.0, skipped=True)


def _result(
    m: dict[str, Any], sources: Sources, written: int, seconds: float, skipped: bool = False
) -> ImportResult:
    return ImportResult(
        version=m["version"],
        source=_shown(sources.uri),
        layout=sources.layout,
        files=len(sources.files),
        rows=m["rows"],
        rejected=m["rejected"],
        shards=len(m["shards"]),
        shards_written=written,
        embedding_dim=m["embedding_dim"],
        model=m["model"],
        model_uri=m.get("model_uri"),
        images=m.get("images"),
        index=m.get("index") or {},
        run_id=m.get("run_id"),
        seconds=round(seconds, 2),
        skipped=skipped,
    )


def _progress(version: str, quiet: bool) -> Progress:
    return Progress(
        TextColumn(f"import {version}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rows"),
        TimeRemainingColumn(),
        disable=quiet,
        transient=False,
    )
