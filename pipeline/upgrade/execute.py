"""The shard executor on Ray Data: transform | partial | full one ShardWork, then commit it."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import EmbedConfig, StorageConfig
from pipeline.data.decode import decode_batch
from pipeline.data.sources import ImageLayout
from pipeline.embed.probe import probe_model
from pipeline.embed.read import iter_image_rows
from pipeline.embed.stages import EmbedStage
from pipeline.embed.transform import ChainSpec, TransformChain
from pipeline.gallery.records import shard_record
from pipeline.gallery.store import (
    REJECT_SCHEMA,
    Gallery,
    GalleryError,
    arrow_to_embeddings,
    embedding_schema,
    embeddings_to_arrow,
)
from pipeline.io import uri as uri_io
from pipeline.io.uri import StorageError
from pipeline.models.store import ModelBlob
from pipeline.upgrade.facts import (
    READ_BATCH,
    ShardScan,
    columns,
    reembed_order,
    scan_shard,
    side_of,
)
from pipeline.upgrade.hops import accumulated, extended, stored_chains, stored_log_var
from pipeline.upgrade.plan import Plan
from pipeline.upgrade.pool import run_shards
from pipeline.upgrade.work import ShardWork


class ShardExecutor:
    """Ray Data actor: executes one shard of a plan and commits it.

    transform: h over the stored embeddings. partial: the shard's `reembed_rows` most
    uncertain rows are re-embedded from their images (read by key), the rest transformed.
    full: every row re-embedded. A row whose image is missing or undecodable keeps its
    transformed embedding (recorded under fallbacks/), or, with no transformation, is rejected.
    """

    def __init__(
        self,
        gallery_uri: str,
        storage: StorageConfig | None,
        target: str,
        target_model: str,
        chains: dict[str, ChainSpec],
        new_blob: ModelBlob,
        embed_cfg: EmbedConfig,
        side_dim: int,
        retries: int = 2,
        lineage: dict[str, Any] | None = None,
        layout: ImageLayout | None = None,
        max_hops: int | None = None,
    ):
        # Where each shard came from, for `carryover lineage`: the run, the new model's registry
        # version, and per chain the registered transformation versions it applies.
        self.lineage = lineage or {}
        self.layout = layout or ImageLayout()
        self.g = Gallery(gallery_uri, storage)
        self.target, self.model_name, self.max_hops = target, target_model, max_hops
        self.chains = {k: TransformChain(v) for k, v in chains.items()}
        self.embedder = EmbedStage(new_blob, embed_cfg.torch_threads)
        self.pre, self.cfg, self.retries = new_blob.preprocess, embed_cfg, retries
        self.schema = embedding_schema(
            new_blob.embedding_dim, side_dim, uncertainty=True, chains=True
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for w in batch["work"]:
            out.append(json.dumps(self._with_retries(ShardWork.from_dict(json.loads(w)))))
        return {"record": np.array(out)}

    def _with_retries(self, w: ShardWork) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                return self.execute(w)
            except (StorageError, OSError) as e:
                if attempt == self.retries:
                    raise RuntimeError(
                        f"shard {w.shard_id}: {type(e).__name__}: {e} "
                        f"(after {attempt + 1} attempts)"
                    ) from e
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def execute(self, w: ShardWork) -> dict[str, Any]:
        """Run one shard and commit it; returns its commit record."""
        t0 = time.perf_counter()
        self._record_attempt(w)
        chain = self.chains.get(w.chain) if w.chain else None
        timings: dict[str, float] = {}
        chosen: set[str] = set()
        if w.method in ("partial", "full"):
            t = time.perf_counter()
            scan = scan_shard(
                w.source_uri,
                self.g.storage,
                chain if w.method == "partial" else None,
                self.model_name,
                self.max_hops,
                w.space,
            )
            chosen = self._choose(scan, w)
            timings["select"] = time.perf_counter() - t
        t = time.perf_counter()
        new, errors = self._embed(w.image_file, chosen) if chosen else ({}, {})
        timings["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        rows, acc = self._write(w, chain, new, errors, chosen)
        timings["transform"] = acc.transform_seconds
        timings["write"] = time.perf_counter() - t - timings["transform"]
        rec = self._record(w, rows, acc, time.perf_counter() - t0, timings)
        self.g.commit_shard(self.target, rec)
        return rec

    def _record_attempt(self, w: ShardWork) -> None:
        """Who tried this shard, where and when (attempts/): read when a shard is retried."""
        uri_io.write_json(
            self.g.attempt_uri(self.target, w.shard_id, uuid.uuid4().hex[:10]),
            {
                "shard_id": w.shard_id,
                "method": w.method,
                "started_at": time.time(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "node_id": _node_id(),
            },
            self.g.storage,
        )

    def _record(
        self, w: ShardWork, rows: int, acc: _Merge, seconds: float, timings: dict[str, float]
    ) -> dict[str, Any]:
        """The shard's commit record: its ShardWork's method, chain and source, what went where."""
        c = self.chains.get(w.chain or "")
        transformed = any(k.startswith("transform:") for k in acc.counts)
        return shard_record(
            w.shard_id,
            rows=rows,
            rejected=len(acc.rejects),
            rows_in=acc.rows_in,
            checksum=self.g.file_checksum(self.g.shard_uri(self.target, w.shard_id)),
            seconds=seconds,
            method=w.method,
            reembed_rows=acc.reembedded,
            fallback_rows=len(acc.fallbacks),
            sources=acc.counts,
            hops={str(k): n for k, n in sorted(acc.hops.items())},
            chain=c.spec.label() if c else None,
            transformation=(
                self.lineage.get("chains", {}).get(w.chain or "") if transformed else None
            ),
            model=self.model_name,
            model_registry_version=self.lineage.get("model_registry_version"),
            run_id=self.lineage.get("run_id"),
            source_version=w.source_version,
            image_file=w.image_file,
            timings={k: round(v, 3) for k, v in timings.items()},
        )

    def _choose(self, scan: ShardScan, w: ShardWork) -> set[str]:
        """The keys to re-embed: all non-native rows (full) or the first `reembed_rows` of the
        re-embed order (partial)."""
        order = reembed_order(scan)
        pick = order if w.method == "full" else order[: w.reembed_rows]
        return set(scan.keys[pick].tolist())

    def _embed(
        self, image_file: str | None, chosen: set[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """New-model embeddings of the chosen keys, read by key from the shard's image file."""
        if not image_file or not uri_io.exists(image_file, self.g.storage):
            return {}, dict.fromkeys(chosen, f"image file gone: {image_file}")
        new: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        want = pa.array(sorted(chosen), pa.string())
        for b in iter_image_rows(image_file, self.g.storage, 1024, self.layout):
            t = pa.Table.from_batches([b])
            t = t.filter(pc.is_in(t["key"], value_set=want))
            for k, why in zip(*_refused(t), strict=True):  # the source's own verdict stands
                errors[k] = f"re-embed failed: {why}"
            t = t.filter(pc.equal(t["reject"], ""))
            for lo in range(0, t.num_rows, self.cfg.batch_size):
                part = t.slice(lo, self.cfg.batch_size)
                dec = decode_batch(
                    {
                        "key": part["key"].to_numpy(zero_copy_only=False),
                        "image": part["image"].to_pylist(),
                    },
                    self.pre,
                    self.cfg.max_decoded_pixels,
                )
                dec["shard"] = np.zeros(len(dec["key"]), np.int64)
                out = self.embedder(dec)
                for k, e, err in zip(out["key"], out["embedding"], out["error"], strict=True):
                    if err:
                        errors[k] = f"re-embed failed: {err}"
                    else:
                        new[k] = e
        for k in chosen - new.keys() - errors.keys():
            errors[k] = f"no image for this key in {image_file}"
        return new, errors

    def _write(
        self,
        w: ShardWork,
        chain: TransformChain | None,
        new: dict[str, np.ndarray],
        errors: dict[str, str],
        chosen: set[str],
    ) -> tuple[int, _Merge]:
        """Pass over the source shard in order: new embedding, else transformed, else rejected.
        Returns the rows written and what went where."""
        writer = uri_io.ParquetStreamWriter(
            self.g.shard_uri(self.target, w.shard_id), self.schema, self.g.storage
        )
        acc = _Merge(new, errors, chosen, w.space, self.model_name)
        try:
            cols = columns(w.source_uri, self.g.storage)
            for b in uri_io.iter_parquet_batches(w.source_uri, self.g.storage, cols, READ_BATCH):
                writer.write(acc.batch(b, chain, self.schema))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self._side_tables(w.shard_id, acc.rejects, acc.fallbacks)
        return writer.rows, acc

    def _side_tables(self, sid: int, rejects: list, fallbacks: list) -> None:
        for rows, uri in (
            (rejects, self.g.rejects_uri(self.target, sid)),
            (fallbacks, self.g.fallbacks_uri(self.target, sid)),
        ):
            if rows:
                k, r = zip(*rows, strict=True)
                uri_io.write_table(
                    pa.table({"key": list(k), "reason": list(r)}, schema=REJECT_SCHEMA),
                    uri,
                    self.g.storage,
                )


def _node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): where each attempt ran."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class _Merge:
    """Builds output batches of one shard: re-embedded rows take their new embedding, the
    rest the chain's prediction (identity keeps the stored row); tracks what went where."""

    def __init__(self, new, errors, chosen, space: str, model: str):
        self.new, self.errors, self.space, self.model = new, errors, space, model
        self.new_keys = pa.array(list(new), pa.string())
        self.chosen = pa.array(list(chosen), pa.string())
        self.rejects: list[tuple[str, str]] = []
        self.fallbacks: list[tuple[str, str]] = []
        self.counts: dict[str, int] = {}
        self.hops: dict[int, int] = {}  # rows written by the maps they have been through
        self.rows_in = self.reembedded = 0
        self.transform_seconds = 0.0  # inside h: the compute share of the write pass

    def batch(self, b: pa.RecordBatch, chain: TransformChain | None, schema: pa.Schema):
        n = b.num_rows
        self.rows_in += n
        keys = b.column("key").to_numpy(zero_copy_only=False)
        has_new = pc.is_in(b.column("key"), value_set=self.new_keys).to_numpy(zero_copy_only=False)
        was_chosen = pc.is_in(b.column("key"), value_set=self.chosen).to_numpy(zero_copy_only=False)
        out = _Rows.start(b, schema, self.model)
        rest = ~has_new
        if has_new.any():
            out.emb[has_new] = np.stack([self.new[k] for k in keys[has_new]])
        if chain is None:
            out.keep &= has_new
            self.rejects += [
                (k, self.errors.get(k, "no transformation applies and not re-embedded"))
                for k in keys[rest]
            ]
        elif rest.any():
            t = time.perf_counter()
            pred, lv = chain(arrow_to_embeddings(b.column("embedding")), side_of(b))
            self.transform_seconds += time.perf_counter() - t
            out.mapped(b, rest, (pred, lv), chain.spec, self.space)
            fb = rest & was_chosen
            self.fallbacks += [(k, self.errors.get(k, "not re-embedded")) for k in keys[fb]]
        self.reembedded += int(has_new.sum())
        keep = out.keep
        for s_, c in zip(*np.unique(out.source[keep].astype(str), return_counts=True), strict=True):
            self.counts[str(s_)] = self.counts.get(str(s_), 0) + int(c)
        for h, c in zip(*np.unique(out.hops[keep], return_counts=True), strict=True):
            self.hops[int(h)] = self.hops.get(int(h), 0) + int(c)
        return out.record_batch(b, schema)


@dataclass
class _Rows:
    """One output batch being built: embeddings, where each came from, its chain and hops,
    and its accumulated log-variance. Rows start as re-embedded by the target model."""

    keys: np.ndarray
    emb: np.ndarray
    source: np.ndarray
    chain: np.ndarray
    hops: np.ndarray
    unc: np.ndarray
    keep: np.ndarray
    model: str

    @classmethod
    def start(cls, b: pa.RecordBatch, schema: pa.Schema, model: str) -> _Rows:
        n = b.num_rows
        return cls(
            keys=b.column("key").to_numpy(zero_copy_only=False),
            emb=np.zeros((n, schema.field("embedding").type.list_size), np.float32),
            source=np.full(n, f"backfill:{model}", object),
            chain=np.full(n, model, object),
            hops=np.zeros(n, np.int64),
            unc=np.full(n, np.nan, np.float32),
            keep=np.ones(n, bool),
            model=model,
        )

    def mapped(
        self, b: pa.RecordBatch, rest: np.ndarray, out: tuple, spec: ChainSpec, space: str
    ) -> None:
        """Rows `rest` take the chain's prediction `out` (embeddings, log-variance); their
        chain grows by its steps and their uncertainty accumulates. The identity keeps each
        stored row's source, chain and uncertainty."""
        pred, lv = out
        chain, hops = stored_chains(b, space)
        prior = stored_log_var(b)
        self.emb[rest] = pred[rest]
        if not spec.names:
            names = b.schema.names
            src = b.column("source").to_numpy(zero_copy_only=False) if "source" in names else None
            self.source[rest] = src[rest] if src is not None else f"embed:{space}"
        else:
            self.source[rest] = f"transform:{space}->{self.model}"
            steps = [m.get("to_model") or "?" for m in spec.metas]
            chain = extended(chain, [*steps[:-1], self.model])  # the last lands in the target
            hops, prior = hops + len(spec.names), accumulated(prior, lv)
        self.chain[rest], self.hops[rest] = chain[rest], hops[rest]
        if prior is not None:
            self.unc[rest] = prior[rest]

    def record_batch(self, b: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
        keep, names = self.keep, b.schema.names
        cols = [
            pa.array(self.keys[keep], pa.string()),
            embeddings_to_arrow(self.emb[keep]),
            pa.array(self.source[keep], pa.string()),
        ]
        if "side_info" in schema.names:
            if "side_info" in names:
                cols.append(b.column("side_info").filter(pa.array(keep)))
            else:
                cols.append(pa.nulls(int(keep.sum()), schema.field("side_info").type))
        u = self.unc[keep]
        cols.append(pa.array(u, pa.float32(), mask=np.isnan(u)))
        cols.append(pa.array(self.chain[keep], pa.string()))
        cols.append(pa.array(self.hops[keep], pa.int16()))
        return pa.record_batch(cols, schema=schema)


@dataclass(frozen=True)
class ExecutorSpec:
    """What every shard executor of one upgrade is built with, and how many run at once."""

    gallery_uri: str
    storage: StorageConfig | None  # credentials resolved on the driver
    target: str
    target_model: str
    chains: dict[str, ChainSpec]
    new_blob: ModelBlob
    embed_cfg: EmbedConfig
    side_dim: int
    retries: int
    lineage: dict[str, Any]
    num_cpus: float
    parallel: int
    layout: ImageLayout | None = None
    max_hops: int | None = None

    def actor_kwargs(self) -> dict[str, Any]:
        keep = ("num_cpus", "parallel")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in keep}


def pending_work(plan: Plan, done: Collection[int]) -> list[ShardWork]:
    """The plan's shards not committed yet; a blocked plan raises naming its shards."""
    if not plan.ok:
        blocked = [s.shard_id for s in plan.shards if s.method == "blocked"]
        raise GalleryError(f"the plan has blocked shards {blocked}: see `carryover plan`")
    return [w for w in plan.shards if w.shard_id not in done]


def _refused(t: pa.Table) -> tuple[list[str], list[str]]:
    """Keys and reasons of the rows the image source itself refuses (img2dataset's status)."""
    bad = t.filter(pc.not_equal(t["reject"], ""))
    return bad["key"].to_pylist(), bad["reject"].to_pylist()


def probe_new_model(
    blob: ModelBlob,
    work: list[ShardWork],
    storage: StorageConfig | None,
    embed_cfg: EmbedConfig,
    layout: ImageLayout | None = None,
) -> None:
    """Before shards re-embed with the new model, try it on a sample of their images: a
    collapsed or NaN model is refused before any shard is written with it."""
    files = [
        w.image_file
        for w in work
        if w.method in ("partial", "full") and w.image_file and uri_io.exists(w.image_file, storage)
    ]
    if files:
        probe_model(blob, files, storage, embed_cfg, layout=layout)


def execute_shards(spec: ExecutorSpec, work: list[ShardWork]) -> Iterator[dict[str, Any]]:
    """Each shard's commit record as its executor finishes it."""
    yield from run_shards(ShardExecutor, spec.actor_kwargs(), work, spec.num_cpus, spec.parallel)


def execution_summary(records: list[dict[str, Any]], resumed: int, secs: float) -> dict[str, Any]:
    """The execute stage's output: shards run and resumed, rows and where they came from."""
    rows = sum(r["rows"] for r in records)
    return {
        "shards_executed": len(records),
        "shards_resumed": resumed,
        "rows": rows,
        "reembedded_rows": sum(r["reembed_rows"] for r in records),
        "fallback_rows": sum(r["fallback_rows"] for r in records),
        "rejected_rows": sum(r["rejected"] for r in records),
        "seconds": round(secs, 2),
        "rows_per_second": round(rows / secs, 1) if secs and rows else 0.0,
    }
