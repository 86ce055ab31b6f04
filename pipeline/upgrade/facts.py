"""Per-shard facts for the planner (rows, side-info, images, chain, uncertainty), on Ray Data."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import StorageConfig
from pipeline.embed.transform import ChainSpec, TransformChain
from pipeline.gallery.store import Gallery, arrow_to_embeddings, space_of
from pipeline.io import uri as uri_io
from pipeline.upgrade.hops import accumulated, stored_chains, stored_log_var
from pipeline.upgrade.plan import ShardFacts
from pipeline.upgrade.pool import run_shards
from pipeline.upgrade.work import ShardSource, ShardWork

READ_BATCH = 8192


def find_chain(edges: list[tuple[str, str, str]], src: str, dst: str) -> list[str] | None:
    """Shortest chain of transformations (from, to, name) mapping space `src` to `dst`.

    [] when src == dst (already there); None when no chain exists. Ties: first registered.
    """
    if src == dst:
        return []
    prev: dict[str, tuple[str, str]] = {}
    seen, queue = {src}, deque([src])
    while queue:
        node = queue.popleft()
        for a, b, name in edges:
            if a != node or b in seen:
                continue
            prev[b] = (a, name)
            if b == dst:
                chain = []
                while b != src:
                    b, name = prev[b]
                    chain.append(name)
                return chain[::-1]
            seen.add(b)
            queue.append(b)
    return None


def shard_sources(
    g: Gallery, source_version: str, chains: dict[str, ChainSpec], workdir: str = ".carryover"
) -> list[ShardSource]:
    """One work item per shard of the source version: where its rows and images are (an image
    file recorded relative, before records were absolute, resolved by `uri_io.from_record`)."""
    m = g.manifest(source_version)
    space = space_of(m, source_version)
    chain = "identity" if "identity" in chains else None
    return [
        ShardSource(
            shard_id=int(r["shard_id"]),
            source_version=source_version,
            source_uri=g.path("versions", source_version, r["path"]),
            image_file=uri_io.from_record(r.get("image_file"), workdir),
            space=space,
            chain=chain,
        )
        for r in sorted(m["shards"], key=lambda r: int(r["shard_id"]))
    ]


def images_available(image_file: str | None, storage: StorageConfig | None) -> bool:
    return bool(image_file) and uri_io.exists(image_file, storage)


def gather_facts(
    g: Gallery,
    source_version: str,
    target_model: str,
    chains: dict[str, ChainSpec],
    scan: ScanSettings,
    progress: Callable[[dict[str, Any]], None] | None = None,
    probe_keys: list[str] | None = None,
) -> tuple[list[ShardFacts], dict[int, dict[str, int]]]:
    """Facts of every shard of the source version, and per shard the rank of each probe
    (validation) key in the executor's re-embed order.

    `chains` maps "identity" | "side" | "noside" to the chain for this source space.
    """
    work = shard_sources(g, source_version, chains, scan.workdir)
    kwargs = {
        "chains": chains,
        # credentials resolved on the driver: workers may not share its environment
        "storage": g.storage.resolved() if g.storage is not None else None,
        "target_model": target_model,
        "quantiles": scan.quantiles,
        "probe_keys": probe_keys,
        "max_hops": scan.max_hops,
    }
    by_id = {w.shard_id: w for w in work}
    facts: dict[int, ShardFacts] = {}
    ranks: dict[int, dict[str, int]] = {}
    for rec in run_shards(FactsStage, kwargs, work, scan.num_cpus, scan.parallel):
        w = by_id[rec["shard_id"]]
        ranks[w.shard_id] = rec.get("probe_ranks") or {}
        facts[w.shard_id] = _facts_of(w, rec, chains, g.storage)
        if progress is not None:
            progress(rec)
    return [facts[k] for k in sorted(facts)], ranks


def _facts_of(
    w: ShardSource, rec: dict[str, Any], chains: dict[str, ChainSpec], storage: StorageConfig | None
) -> ShardFacts:
    spec = chains.get(rec["chain"]) if rec["chain"] else None
    return ShardFacts(
        shard_id=w.shard_id,
        rows=rec["rows"],
        source_version=w.source_version,
        space=w.space,
        native_rows=rec["native_rows"],
        has_side_info=rec["has_side_info"],
        images_available=images_available(w.image_file, storage),
        transform=list(spec.names) if spec is not None else None,
        uncertainty=rec["uncertainty"],
        chain=rec["chain"],
        forced_rows=rec.get("forced_rows", 0),
        hops={int(k): v for k, v in (rec.get("hops") or {}).items()},
        source_uri=w.source_uri,
        image_file=w.image_file,
    )


@dataclass(frozen=True)
class ScanSettings:
    """How the facts scan runs: quantiles kept per shard, CPUs per actor, shards at once."""

    quantiles: int
    num_cpus: float
    parallel: int
    workdir: str = ".carryover"  # old relative image-file records are resolved against it
    max_hops: int | None = None  # plan.max_chain_length: rows mapped more often are re-embedded


def native_sources(model: str) -> set[str]:
    """Row sources that mean "embedded by `model` itself" (nothing to upgrade)."""
    return {f"embed:{model}", f"backfill:{model}"}


def columns(uri: str, storage: StorageConfig | None) -> list[str]:
    """The gallery columns a stored shard has, in the order a scan reads them."""
    names = uri_io.parquet_columns(uri, storage)
    wanted = ("key", "embedding", "side_info", "source", "uncertainty", "chain", "hops")
    return [c for c in wanted if c in names]


def side_of(b: pa.RecordBatch) -> np.ndarray | None:
    """The batch's side-info, or None when the column is absent or any row lacks it."""
    if "side_info" not in b.schema.names or b.column("side_info").null_count:
        return None
    return arrow_to_embeddings(b.column("side_info"))


@dataclass
class ShardScan:
    """One streaming pass over a source shard: keys, native mask and log-variances.

    `chain_applied`: the chain mapped every row (an h without an uncertainty head, loss fct,
    applies with `log_var` None; a side-info h does not apply to a shard without side-info).
    `log_var` accumulates each row's stored uncertainty with the chain's (errors add up over
    generations); `hops`: the maps each row will have been through once this chain maps it;
    `forced`: rows whose hops would pass the chain-length limit (re-embedded first, always)."""

    keys: np.ndarray
    native: np.ndarray
    log_var: np.ndarray | None
    has_side_info: bool
    chain_applied: bool = False
    hops: np.ndarray | None = None
    forced: np.ndarray | None = None


def scan_shard(
    uri: str,
    storage: StorageConfig | None,
    chain: TransformChain | None,
    target_model: str,
    max_hops: int | None = None,
    space: str = "",
) -> ShardScan:
    """Keys, which rows are already native, each row's hops and accumulated log-variance
    (its stored uncertainty and h's), streamed.

    With the identity chain (rows already in the target space) the stored uncertainty is used.
    """
    cols = columns(uri, storage)
    keys, native, lvs, hops, has_side = [], [], [], [], "side_info" in cols
    own = list(native_sources(target_model))
    steps = len(chain.spec.names) if chain is not None else 0
    for b in uri_io.iter_parquet_batches(uri, storage, cols, READ_BATCH):
        keys.append(b.column("key").to_numpy(zero_copy_only=False))
        nat = np.zeros(b.num_rows, bool)
        if "source" in cols:
            nat = pc.is_in(b.column("source"), pa.array(own)).to_numpy(zero_copy_only=False)
        native.append(nat)
        hops.append(stored_chains(b, space)[1] + steps)
        side = side_of(b)
        has_side = has_side and side is not None
        if chain is None:
            continue
        prior = stored_log_var(b)
        if not chain.spec.names:
            lvs.append(np.full(b.num_rows, -np.inf, np.float32) if prior is None else prior)
            continue
        if chain.spec.needs_side and side is None:
            chain = None  # this shard cannot use a side-info chain; the caller picks another
            lvs = []
            continue
        _, lv = chain(arrow_to_embeddings(b.column("embedding")), side)
        lv = accumulated(prior, lv)
        if lv is not None:
            lvs.append(lv)
    k = np.concatenate(keys) if keys else np.zeros(0, object)
    n = np.concatenate(native) if native else np.zeros(0, bool)
    lv = np.concatenate(lvs).astype(np.float32) if lvs and chain is not None else None
    h = np.concatenate(hops) if hops else np.zeros(0, np.int64)
    forced = (h > max_hops) & ~n if max_hops is not None and chain is not None else None
    return ShardScan(k, n, lv, has_side, chain is not None, h, forced)


def reembed_order(scan: ShardScan) -> np.ndarray:
    """Row indices still to upgrade, the most deserving of re-embedding first: rows past the
    chain-length limit, then the highest accumulated log-variance (FastFill's order), or,
    where no row has one, the most hops first in a seeded random order. The executor
    re-embeds a prefix of it; the plan's simulation ranks validation rows by it."""
    todo = np.flatnonzero(~scan.native)
    if scan.log_var is None or not np.isfinite(scan.log_var[todo]).any():
        todo = np.random.default_rng(0).permutation(todo)
        score = np.zeros(len(todo)) if scan.hops is None else scan.hops[todo].astype(float)
    else:
        lv = scan.log_var[todo].astype(float)
        score = np.where(np.isnan(lv), -np.inf, lv)  # a row with no uncertainty ranks last
    if scan.forced is not None:
        score = np.where(scan.forced[todo], np.inf, score)
    return todo[np.argsort(-score, kind="stable")]


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
        max_hops: int | None = None,
    ):
        self.chains = {k: TransformChain(v) for k, v in chains.items()}
        self.storage, self.target, self.q = storage, target_model, quantiles
        self.max_hops = max_hops
        # Validation keys: their rank in the executor's order lets the plan's simulation pick
        # exactly the rows a partial backfill will re-embed.
        self.probe = pa.array(sorted(set(probe_keys or [])), pa.string())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "record": np.array(
                [json.dumps(self.one(ShardSource.from_dict(json.loads(w)))) for w in batch["work"]]
            )
        }

    def one(self, w: ShardSource | ShardWork) -> dict[str, Any]:
        order = [w.chain] if w.chain == "identity" else ["side", "noside"]
        order = [c for c in order if c in self.chains]
        scan, used = None, None
        for name in order:
            scan = scan_shard(
                w.source_uri, self.storage, self.chains[name], self.target, self.max_hops, w.space
            )
            # Found whether or not h has an uncertainty head: without one (loss fct) the
            # planner gives the shard no quantiles and partial backfills a seeded random order.
            if scan.chain_applied:
                used = name
                break
        if scan is None:  # no chain at all: still count rows and side-info
            scan = scan_shard(w.source_uri, self.storage, None, self.target, space=w.space)
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
            "shard_id": w.shard_id,
            "rows": int(len(scan.keys)),
            "native_rows": int(scan.native.sum()),
            "has_side_info": bool(scan.has_side_info),
            "chain": used,
            "uncertainty": qs,
            "probe_ranks": ranks,
            "forced_rows": int(scan.forced.sum()) if scan.forced is not None else 0,
            "hops": _histogram(scan.hops[todo]) if used is not None else {},
        }


def _histogram(hops: np.ndarray) -> dict[str, int]:
    """Rows per number of maps (as JSON keys): how far the rows still to upgrade are."""
    vals, counts = np.unique(hops, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(vals, counts, strict=True)}
