"""Ray Data wiring: stream image shards → decode → embed (actor pool) → per-shard gallery files."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.config import EmbedConfig, PreprocessConfig, StorageConfig
from pipeline.data.shards import read_footer
from pipeline.data.sources import ImageLayout
from pipeline.embed.errors import quiet_own_errors, user_error
from pipeline.embed.read import image_rows_dataset
from pipeline.embed.stages import DecodeEmbedStage, EmbedStage, decode_stage
from pipeline.gallery.records import shard_record
from pipeline.gallery.store import (
    REJECT_SCHEMA,
    Gallery,
    embedding_schema,
    embeddings_to_arrow,
)
from pipeline.io import uri as uri_io
from pipeline.models.store import ModelBlob, ModelLoadError

# Where Ray Data logs a failed task on the driver (with tracebacks).


@dataclass
class EmbedResult:
    """What an embedding run wrote."""

    images_uri: str
    gallery_uri: str
    version: str
    shards_written: int
    shards_skipped: int
    rows_in: int
    rows_written: int
    rows_rejected: int
    seconds: float
    rows_per_second: float
    records: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            k: getattr(self, k)
            for k in (
                "shards_written",
                "shards_skipped",
                "rows_in",
                "rows_written",
                "rows_rejected",
                "seconds",
                "rows_per_second",
            )
        }


class PassRejected(ModelLoadError):
    """An embedding pass rejected more rows than `embed.max_rejected_fraction` allows."""


class _ShardSink:
    """Driver-side router: appends rows to each shard's file, commits a shard when complete.

    A shard is complete when written + rejected rows equal the rows its image file holds; only
    then is its file closed (made visible) and its commit record written.
    """

    def __init__(
        self,
        gallery: Gallery,
        version: str,
        dim: int,
        expected: dict[int, int],
        meta: dict[int, dict[str, Any]],
        source: str,
        progress: Progress,
        task: Any,
        side_dim: int = 0,
        max_rejected_fraction: float = 1.0,
        base: tuple[int, int] = (0, 0),
        min_rows: int = 1,
    ):
        self.g, self.version, self.dim, self.source = gallery, version, dim, source
        self.schema = embedding_schema(dim, side_dim)
        self.expected, self.meta = expected, meta
        self.writers: dict[int, uri_io.ParquetStreamWriter] = {}
        self.rejects: dict[int, list[tuple[str, str]]] = {}
        self.seen: dict[int, int] = dict.fromkeys(expected, 0)
        self.keys: dict[int, set[str]] = {}  # keys written per open shard
        self.records: list[dict[str, Any]] = []
        self.t0: dict[int, float] = {}
        self.progress, self.task = progress, task
        self.max_rejected = max_rejected_fraction
        # rows in / rejected of shards committed before this pass, and of this pass so far
        self.base, self.min_rows, self.committed_rejected = base, min_rows, 0
        self.workers: dict[int, set[str]] = {}  # which actors (node:pid) embedded each shard

    def _writer(self, sid: int) -> uri_io.ParquetStreamWriter:
        if sid not in self.writers:
            self.t0[sid] = time.perf_counter()
            self.writers[sid] = uri_io.ParquetStreamWriter(
                self.g.shard_uri(self.version, sid), self.schema, self.g.storage
            )
        return self.writers[sid]

    def _key_errors(self, sid: int, keys: np.ndarray, error: np.ndarray) -> np.ndarray:
        """`error` with null keys and repeats of a key already seen in this shard rejected:
        the gallery maps search results by key, and which of two rows is right is unknowable.
        Memory: the keys of the shards in flight, never the gallery's."""
        seen = self.keys.setdefault(sid, set())
        out = error.astype(object)
        for i, k in enumerate(keys.tolist()):
            if out[i]:
                continue  # already rejected (decode): its key is not taken
            if k is None:
                out[i] = "key is null"
            elif k in seen:
                out[i] = "duplicate key in this shard (the first row with it is kept)"
            else:
                seen.add(k)
        return out

    def add(self, batch: dict[str, np.ndarray]) -> None:
        shards = batch["shard"]
        for sid in np.unique(shards):
            sid = int(sid)
            m = shards == sid
            error = batch["error"].copy()
            error[m] = self._key_errors(sid, batch["key"][m], batch["error"][m])
            batch = {**batch, "error": error}
            ok = m & (batch["error"] == "")
            bad = m & ~ok
            if ok.any():
                keys = batch["key"][ok]
                cols = [
                    pa.array(keys, pa.string()),
                    embeddings_to_arrow(batch["embedding"][ok]),
                    pa.array(np.full(len(keys), self.source, dtype=object), pa.string()),
                ]
                if "side_info" in self.schema.names:
                    cols.append(embeddings_to_arrow(batch["side_info"][ok]))
                self._writer(sid).write(pa.record_batch(cols, schema=self.schema))
            if bad.any():
                self.rejects.setdefault(sid, []).extend(
                    zip(batch["key"][bad].tolist(), batch["error"][bad].tolist(), strict=True)
                )
            if "worker" in batch:
                self.workers.setdefault(sid, set()).update(batch["worker"][m].tolist())
            self.seen[sid] += int(m.sum())
            self.progress.advance(self.task, int(m.sum()))
            if self.seen[sid] == self.expected[sid]:
                self._commit(sid)

    def _commit(self, sid: int) -> None:
        rej = self.rejects.pop(sid, [])
        self._check_rejected(sid, rej)
        w = self._writer(sid)
        w.close()
        if rej:
            keys, reasons = zip(*rej, strict=True)
            uri_io.write_table(
                pa.table({"key": list(keys), "reason": list(reasons)}, schema=REJECT_SCHEMA),
                self.g.rejects_uri(self.version, sid),
                self.g.storage,
            )
        rec = shard_record(
            sid,
            rows=w.rows,
            rejected=len(rej),
            rows_in=self.expected[sid],
            checksum=self.g.file_checksum(self.g.shard_uri(self.version, sid)),
            seconds=time.perf_counter() - self.t0[sid],
            workers=sorted(self.workers.pop(sid, ())),
            **self.meta[sid],
        )
        self.g.commit_shard(self.version, rec)
        self.records.append(rec)
        self.committed_rejected += len(rej)
        del self.writers[sid]
        self.keys.pop(sid, None)

    def _check_rejected(self, sid: int, rej: list[tuple[str, str]]) -> None:
        """Stop the pass, before this shard commits, once more than the allowed share of the
        rows read so far (committed shards of earlier runs included) was rejected. Judged once
        `min_rows` rows were read (or all of them): a few bad images in a small first shard
        are rows to reject, not a broken model."""
        n_in = self.base[0] + sum(self.seen.values())
        n_rej = self.base[1] + self.committed_rejected + len(rej)
        n_rej += sum(len(r) for r in self.rejects.values())
        total = self.base[0] + sum(self.expected.values())
        if n_in < min(self.min_rows, total) or n_rej <= self.max_rejected * n_in:
            return
        reasons = [r for _, r in rej] or [r for v in self.rejects.values() for _, r in v]
        top = max(set(reasons), key=reasons.count) if reasons else "?"
        self.abort()
        raise PassRejected(
            f"{n_rej} of {n_in} rows read so far were rejected, over "
            f"embed.max_rejected_fraction={self.max_rejected} (most: {top}); stopped before "
            f"shard {sid} ({self.meta[sid].get('image_file', '?')}) was kept"
        )

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        self.writers.clear()


def embed_images_to_version(
    image_files: dict[int, str],
    gallery: Gallery,
    version: str,
    blob: ModelBlob,
    embed_cfg: EmbedConfig,
    shard_meta: dict[int, dict[str, Any]],
    source: str,
    storage: StorageConfig | None = None,
    quiet: bool = False,
    side_blob: ModelBlob | None = None,
    layout: ImageLayout | None = None,
) -> EmbedResult:
    """Embed every image of the given shards (id → image file URI) into a gallery version,
    read through their layout (rows its status column refuses are recorded as rejected).

    With `side_blob`, each row also stores FCT's side-information. Shards already committed
    in this version are skipped, so a rerun after a crash resumes.
    """
    t0 = time.perf_counter()
    done = _reusable(gallery.committed_shards(version), blob)
    todo = {sid: f for sid, f in image_files.items() if sid not in done}
    layout = layout or ImageLayout()
    expected = {sid: _image_shard_rows(f, storage, layout) for sid, f in todo.items()}
    rows_in = sum(expected.values())
    progress = _progress(version, quiet)
    task = progress.add_task("embed", total=rows_in)
    sink = _ShardSink(
        gallery,
        version,
        blob.embedding_dim,
        expected,
        {
            sid: {**shard_meta.get(sid, {}), "image_file": todo[sid], "model_digest": blob.digest}
            for sid in todo
        },
        source,
        progress,
        task,
        side_blob.embedding_dim if side_blob else 0,
        embed_cfg.max_rejected_fraction,
        (
            sum(int(r.get("rows_in", r.get("rows", 0))) for r in done.values()),
            sum(int(r.get("rejected", 0)) for r in done.values()),
        ),
        embed_cfg.probe_rows,
    )
    for sid in [s for s, n in expected.items() if n == 0]:
        sink._commit(sid)  # an empty input shard is complete from the start
    live = {sid: f for sid, f in todo.items() if expected[sid] > 0}
    if live:
        _stream_into(sink, progress, live, blob, embed_cfg, storage, side_blob, layout)
    missing = [sid for sid in live if sink.seen[sid] != expected[sid]]
    if missing:
        raise RuntimeError(f"shards {missing} did not receive all their rows; rerun to resume")
    images_uri = str(next(iter(image_files.values()), ""))
    return _result(images_uri, gallery, version, sink, len(done), rows_in, t0)


def _result(
    images_uri: str,
    gallery: Gallery,
    version: str,
    sink: _ShardSink,
    skipped: int,
    rows_in: int,
    t0: float,
) -> EmbedResult:
    secs = time.perf_counter() - t0
    return EmbedResult(
        images_uri=images_uri,
        gallery_uri=gallery.uri,
        version=version,
        shards_written=len(sink.records),
        shards_skipped=skipped,
        rows_in=rows_in,
        rows_written=sum(r["rows"] for r in sink.records),
        rows_rejected=sum(r["rejected"] for r in sink.records),
        seconds=round(secs, 2),
        rows_per_second=round(rows_in / secs, 1) if secs else 0.0,
        records=sink.records,
    )


def _progress(version: str, quiet: bool) -> Progress:
    return Progress(
        TextColumn(f"embed {version}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rows"),
        TimeRemainingColumn(),
        disable=quiet,
        transient=False,
    )


def _stream_into(
    sink: _ShardSink,
    progress: Progress,
    live: dict[int, str],
    blob: ModelBlob,
    embed_cfg: EmbedConfig,
    storage: StorageConfig | None,
    side_blob: ModelBlob | None,
    layout: ImageLayout,
) -> None:
    """Read, decode and embed the shards with rows (id → image file) into the sink."""
    paths = {uri_io.resolve(f, storage).path: sid for sid, f in live.items()}
    ds = image_rows_dataset(
        {f: uri_io.resolve(f, storage).path for f in live.values()},
        storage.resolved() if storage is not None else None,  # workers may lack AWS_*
        embed_cfg.batch_size,
        embed_cfg.decode_num_cpus,
        layout,
    )
    ds = _pipeline(ds, blob, embed_cfg, paths, side_blob)
    try:
        with progress, quiet_own_errors():
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                sink.add(batch)
    except BaseException as e:
        sink.abort()  # nothing half-written becomes visible
        raise user_error(e) from None


def _reusable(records: dict[int, dict[str, Any]], blob: ModelBlob) -> dict[int, dict[str, Any]]:
    """Committed shards a rerun may keep: those the same model weights produced. A shard a
    broken model committed before it was fixed (same name, other weights) is redone."""
    return {sid: r for sid, r in records.items() if r.get("model_digest") in (None, blob.digest)}


def _image_shard_rows(file_uri: str, storage: StorageConfig | None, layout: ImageLayout) -> int:
    """Rows of an image shard, from its footer, once its columns are what the pipeline reads:
    a bad file stops the run before any image is decoded, naming the file and column."""
    schema, rows = read_footer(file_uri, storage)
    layout.present(schema, file_uri)
    return rows


def _pipeline(
    ds: Any,
    blob: ModelBlob,
    cfg: EmbedConfig,
    shard_of_path: dict[str, int],
    side_blob: ModelBlob | None = None,
) -> Any:
    """Decode in tasks, embed in an actor pool sized below the CPU count (no 2-CPU deadlock)."""
    pre: PreprocessConfig = blob.preprocess
    if cfg.fuse_decode:
        return ds.map_batches(
            DecodeEmbedStage,
            fn_constructor_kwargs={
                "blob": blob,
                "threads": cfg.torch_threads,
                "side_blob": side_blob,
                "max_pixels": cfg.max_decoded_pixels,
                "shard_of_path": shard_of_path,
            },
            batch_size=cfg.batch_size,
            num_cpus=cfg.actor_num_cpus,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        )
    ds = ds.map_batches(
        decode_stage,
        fn_kwargs={
            "pre": pre,
            "max_pixels": cfg.max_decoded_pixels,
            "shard_of_path": shard_of_path,
            "side_pre": side_blob.preprocess if side_blob is not None else None,
        },
        batch_size=cfg.batch_size,
        num_cpus=cfg.decode_num_cpus,
    )
    return ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={"blob": blob, "threads": cfg.torch_threads, "side_blob": side_blob},
        batch_size=cfg.batch_size,
        num_cpus=cfg.actor_num_cpus,
        # Ray Data restarts dead pool actors and retries their tasks by default (max_restarts=-1).
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
    )
