"""Per-shard upgrade stages on Ray Data: facts (uncertainty after h) and execution
(transform | partial | full). The unit of work is a shard reference, never data."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import EmbedConfig, StorageConfig
from pipeline.embed.errors import quiet_own_errors, user_error
from pipeline.embed.read import iter_image_rows
from pipeline.embed.transform import ChainSpec, TransformChain
from pipeline.gallery.store import (
    REJECT_SCHEMA,
    Gallery,
    arrow_to_embeddings,
    embedding_schema,
    embeddings_to_arrow,
    shard_file,
)
from pipeline.io import uri as uri_io
from pipeline.models.store import ModelBlob

READ_BATCH = 8192


def native_sources(model: str) -> set[str]:
    """Row sources that mean "embedded by `model` itself" (nothing to upgrade)."""
    return {f"embed:{model}", f"backfill:{model}"}


def _columns(uri: str, storage: StorageConfig | None) -> list[str]:
    import pyarrow.parquet as pq

    loc = uri_io.resolve(uri, storage)
    with loc.fs.open_input_file(loc.path) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return [c for c in ("key", "embedding", "side_info", "source", "uncertainty") if c in names]


def _side_of(b: pa.RecordBatch) -> np.ndarray | None:
    """The batch's side-info, or None when the column is absent or any row lacks it."""
    if "side_info" not in b.schema.names or b.column("side_info").null_count:
        return None
    return arrow_to_embeddings(b.column("side_info"))


@dataclass
class ShardScan:
    """One streaming pass over a source shard: keys, native mask and log-variances.

    `chain_applied`: the chain mapped every row (an h without an uncertainty head, loss fct,
    applies with `log_var` None; a side-info h does not apply to a shard without side-info)."""

    keys: np.ndarray
    native: np.ndarray
    log_var: np.ndarray | None
    has_side_info: bool
    chain_applied: bool = False


def scan_shard(
    uri: str, storage: StorageConfig | None, chain: TransformChain | None, target_model: str
) -> ShardScan:
    """Keys, which rows are already native, and h's log-variance of each row (streamed).

    With the identity chain (rows already in the target space) the stored uncertainty is used.
    """
    cols = _columns(uri, storage)
    keys, native, lvs, has_side = [], [], [], "side_info" in cols
    own = list(native_sources(target_model))
    for b in uri_io.iter_parquet_batches(uri, storage, cols, READ_BATCH):
        keys.append(b.column("key").to_numpy(zero_copy_only=False))
        nat = np.zeros(b.num_rows, bool)
        if "source" in cols:
            nat = pc.is_in(b.column("source"), pa.array(own)).to_numpy(zero_copy_only=False)
        native.append(nat)
        side = _side_of(b)
        has_side = has_side and side is not None
        if chain is None:
            continue
        if not chain.spec.names:
            u = b.column("uncertainty") if "uncertainty" in cols else None
            lvs.append(
                np.full(b.num_rows, -np.inf, np.float32)
                if u is None
                else pc.fill_null(u, -np.inf).to_numpy(zero_copy_only=False)
            )
            continue
        if chain.spec.needs_side and side is None:
            chain = None  # this shard cannot use a side-info chain; the caller picks another
            lvs = []
            continue
        _, lv = chain(arrow_to_embeddings(b.column("embedding")), side)
        if lv is not None:
            lvs.append(lv)
    k = np.concatenate(keys) if keys else np.zeros(0, object)
    n = np.concatenate(native) if native else np.zeros(0, bool)
    lv = np.concatenate(lvs).astype(np.float32) if lvs and chain is not None else None
    return ShardScan(k, n, lv, has_side, chain is not None)


def reembed_order(scan: ShardScan) -> np.ndarray:
    """Row indices still to upgrade, the most deserving of re-embedding first: highest h
    log-variance (FastFill's order), or a seeded random order when the shard has none. The
    executor re-embeds a prefix of it; the plan's simulation ranks validation rows by it."""
    todo = np.flatnonzero(~scan.native)
    if scan.log_var is None or not np.isfinite(scan.log_var[todo]).any():
        return np.random.default_rng(0).permutation(todo)
    return todo[np.argsort(-scan.log_var[todo], kind="stable")]


class FactsStage:
    """Ray Data actor: per source shard, rows, native rows, side-info presence and the
    quantiles of h's log-variance over the rows still to upgrade."""

    def __init__(
        self,
        chains: dict[str, ChainSpec],
        storage: StorageConfig | None,
        target_model: str,
        quantiles: int,
        probe_keys: list[str] | None = None,
    ):
        self.chains = {k: TransformChain(v) for k, v in chains.items()}
        self.storage, self.target, self.q = storage, target_model, quantiles
        # Validation keys: their rank in the executor's order lets the plan's simulation pick
        # exactly the rows a partial backfill will re-embed.
        self.probe = pa.array(sorted(set(probe_keys or [])), pa.string())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"record": np.array([json.dumps(self.one(json.loads(w))) for w in batch["work"]])}

    def one(self, w: dict[str, Any]) -> dict[str, Any]:
        order = [w["chain"]] if w["chain"] == "identity" else ["side", "noside"]
        order = [c for c in order if c in self.chains]
        scan, used = None, None
        for name in order:
            scan = scan_shard(w["source_uri"], self.storage, self.chains[name], self.target)
            # Found whether or not h has an uncertainty head: without one (loss fct) the
            # planner gives the shard no quantiles and partial backfills a seeded random order.
            if scan.chain_applied:
                used = name
                break
        if scan is None:  # no chain at all: still count rows and side-info
            scan = scan_shard(w["source_uri"], self.storage, None, self.target)
        todo = ~scan.native
        qs: list[float] = []
        if used is not None and scan.log_var is not None and todo.any():
            vals = scan.log_var[todo]
            vals = vals[np.isfinite(vals)]  # rows with no stored uncertainty have no order
            if len(vals):
                qs = np.quantile(vals, np.linspace(0, 1, self.q)).astype(float).tolist()
        ranks: dict[str, int] = {}
        if len(self.probe) and todo.any():
            order = reembed_order(scan)
            ordered = pa.array(scan.keys[order], pa.string())
            hit = np.flatnonzero(pc.is_in(ordered, value_set=self.probe).to_numpy(False))
            ranks = dict(zip(ordered.take(pa.array(hit)).to_pylist(), hit.tolist(), strict=True))
        return {
            "shard_id": w["shard_id"],
            "rows": int(len(scan.keys)),
            "native_rows": int(scan.native.sum()),
            "has_side_info": bool(scan.has_side_info),
            "chain": used,
            "uncertainty": qs,
            "probe_ranks": ranks,
        }


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
    ):
        from pipeline.embed.stages import EmbedStage

        # Where each shard came from, for `carryover lineage`: the run, the new model's registry
        # version, and per chain the registered transformation versions it applies.
        self.lineage = lineage or {}
        self.g = Gallery(gallery_uri, storage)
        self.target, self.model_name = target, target_model
        self.chains = {k: TransformChain(v) for k, v in chains.items()}
        self.embedder = EmbedStage(new_blob, embed_cfg.torch_threads)
        self.pre, self.cfg, self.retries = new_blob.preprocess, embed_cfg, retries
        self.schema = embedding_schema(new_blob.embedding_dim, side_dim, uncertainty=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for w in batch["work"]:
            out.append(json.dumps(self._with_retries(json.loads(w))))
        return {"record": np.array(out)}

    def _with_retries(self, w: dict[str, Any]) -> dict[str, Any]:
        from pipeline.io.uri import StorageError

        for attempt in range(self.retries + 1):
            try:
                return self.execute(w)
            except (StorageError, OSError) as e:
                if attempt == self.retries:
                    raise RuntimeError(
                        f"shard {w['shard_id']}: {type(e).__name__}: {e} "
                        f"(after {attempt + 1} attempts)"
                    ) from e
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def execute(self, w: dict[str, Any]) -> dict[str, Any]:
        """Run one shard and commit it; returns its commit record."""
        t0, sid = time.perf_counter(), int(w["shard_id"])
        uri_io.write_json(
            self.g.attempt_uri(self.target, sid, uuid.uuid4().hex[:10]),
            {
                "shard_id": sid,
                "method": w["method"],
                "started_at": time.time(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "node_id": _node_id(),
            },
            self.g.storage,
        )
        chain = self.chains.get(w["chain"]) if w.get("chain") else None
        src = w["source_uri"]
        timings: dict[str, float] = {}
        chosen: set[str] = set()
        if w["method"] in ("partial", "full"):
            t = time.perf_counter()
            scan = scan_shard(
                src, self.g.storage, chain if w["method"] == "partial" else None, self.model_name
            )
            chosen = self._choose(scan, w)
            timings["select"] = time.perf_counter() - t
        t = time.perf_counter()
        new, errors = self._embed(w.get("image_file"), chosen) if chosen else ({}, {})
        timings["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        rec, timings["transform"] = self._write(w, src, chain, new, errors, chosen)
        timings["write"] = time.perf_counter() - t - timings["transform"]
        rec.update(
            seconds=round(time.perf_counter() - t0, 3),
            timings={k: round(v, 3) for k, v in timings.items()},
            committed_at=time.time(),
        )
        self.g.commit_shard(self.target, rec)
        return rec

    def _choose(self, scan: ShardScan, w: dict[str, Any]) -> set[str]:
        """The keys to re-embed: all non-native rows (full) or the first `reembed_rows` of the
        re-embed order (partial)."""
        order = reembed_order(scan)
        pick = order if w["method"] == "full" else order[: int(w["reembed_rows"])]
        return set(scan.keys[pick].tolist())

    def _embed(
        self, image_file: str | None, chosen: set[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """New-model embeddings of the chosen keys, read by key from the shard's image file."""
        from pipeline.data.decode import decode_batch

        if not image_file or not uri_io.exists(image_file, self.g.storage):
            return {}, dict.fromkeys(chosen, f"image file gone: {image_file}")
        new: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        want = pa.array(sorted(chosen), pa.string())
        for b in iter_image_rows(image_file, self.g.storage, 1024):
            t = pa.Table.from_batches([b])
            t = t.filter(pc.is_in(t["key"], value_set=want))
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
        w: dict[str, Any],
        src: str,
        chain: TransformChain | None,
        new: dict[str, np.ndarray],
        errors: dict[str, str],
        chosen: set[str],
    ) -> tuple[dict[str, Any], float]:
        """Pass over the source shard in order: new embedding, else transformed, else rejected.
        Returns the commit record and the seconds spent inside the transformation."""
        sid = int(w["shard_id"])
        out_uri = self.g.shard_uri(self.target, sid)
        writer = uri_io.ParquetStreamWriter(out_uri, self.schema, self.g.storage)
        acc = _Merge(new, errors, chosen, w["space"], self.model_name)
        try:
            cols = _columns(src, self.g.storage)
            for b in uri_io.iter_parquet_batches(src, self.g.storage, cols, READ_BATCH):
                writer.write(acc.batch(b, chain, self.schema))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self._side_tables(sid, acc.rejects, acc.fallbacks)
        c = self.chains.get(w.get("chain") or "")
        rec = {
            "shard_id": sid,
            "path": shard_file(sid),
            "rows": writer.rows,
            "rejected": len(acc.rejects),
            "rows_in": acc.rows_in,
            "method": w["method"],
            "reembed_rows": acc.reembedded,
            "fallback_rows": len(acc.fallbacks),
            "sources": acc.counts,
            "chain": c.spec.label() if c else None,
            "transformation": (
                self.lineage.get("chains", {}).get(w.get("chain") or "")
                if any(k.startswith("transform:") for k in acc.counts)
                else None
            ),
            "model": self.model_name,
            "model_registry_version": self.lineage.get("model_registry_version"),
            "run_id": self.lineage.get("run_id"),
            "source_version": w["source_version"],
            "image_file": w.get("image_file"),
            "checksum": self.g.file_checksum(out_uri),
        }
        return rec, acc.transform_seconds

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
    import ray

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
        self.rows_in = self.reembedded = 0
        self.transform_seconds = 0.0  # inside h: the compute share of the write pass

    def batch(self, b: pa.RecordBatch, chain: TransformChain | None, schema: pa.Schema):
        n, names = b.num_rows, b.schema.names
        self.rows_in += n
        keys = b.column("key").to_numpy(zero_copy_only=False)
        side = _side_of(b)
        has_new = pc.is_in(b.column("key"), value_set=self.new_keys).to_numpy(zero_copy_only=False)
        was_chosen = pc.is_in(b.column("key"), value_set=self.chosen).to_numpy(zero_copy_only=False)
        emb = np.zeros((n, schema.field("embedding").type.list_size), np.float32)
        unc = np.full(n, np.nan, np.float32)
        source = np.full(n, f"backfill:{self.model}", object)
        keep = np.ones(n, bool)
        rest = ~has_new
        if has_new.any():
            emb[has_new] = np.stack([self.new[k] for k in keys[has_new]])
        if chain is None:
            keep &= has_new
            self.rejects += [
                (k, self.errors.get(k, "no transformation applies and not re-embedded"))
                for k in keys[rest]
            ]
        elif rest.any():
            t = time.perf_counter()
            pred, lv = chain(arrow_to_embeddings(b.column("embedding")), side)
            self.transform_seconds += time.perf_counter() - t
            emb[rest] = pred[rest]
            if not chain.spec.names:  # identity: rows already in the target space
                source[rest] = (
                    b.column("source").to_numpy(zero_copy_only=False)[rest]
                    if "source" in names
                    else f"embed:{self.space}"
                )
                if "uncertainty" in names:
                    u = pc.fill_null(b.column("uncertainty"), np.nan).to_numpy(zero_copy_only=False)
                    unc[rest] = u[rest]
            else:
                source[rest] = f"transform:{self.space}->{self.model}"
                if lv is not None:
                    unc[rest] = lv[rest]
            fb = rest & was_chosen
            self.fallbacks += [(k, self.errors.get(k, "not re-embedded")) for k in keys[fb]]
        self.reembedded += int(has_new.sum())
        for s_, c in zip(*np.unique(source[keep].astype(str), return_counts=True), strict=True):
            self.counts[str(s_)] = self.counts.get(str(s_), 0) + int(c)
        cols = [
            pa.array(keys[keep], pa.string()),
            embeddings_to_arrow(emb[keep]),
            pa.array(source[keep], pa.string()),
        ]
        if "side_info" in schema.names:
            if "side_info" in names:
                cols.append(b.column("side_info").filter(pa.array(keep)))
            else:
                cols.append(pa.nulls(int(keep.sum()), schema.field("side_info").type))
        cols.append(pa.array(unc[keep], pa.float32(), mask=np.isnan(unc[keep])))
        return pa.record_batch(cols, schema=schema)


def run_shards(
    stage: type,
    kwargs: dict[str, Any],
    work: list[dict[str, Any]],
    num_cpus: float,
    parallel: int,
) -> Iterator[dict[str, Any]]:
    """Run a shard stage over work items on a Ray Data actor pool; yield each shard's record
    as it completes. One block per shard, so shards really run in parallel."""
    import ray.data

    if not work:
        return
    items = [{"work": json.dumps(w)} for w in work]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(parallel, len(items)))),
    )
    try:
        with quiet_own_errors():
            for row in ds.iter_rows():
                yield json.loads(row["record"])
    except Exception as e:  # a corrupt image file, a broken model: one line, not a Ray trace
        raise user_error(e) from None
