"""Per-shard facts for the planner: rows, side-info, images, the chain that applies, and the
uncertainty distribution after transformation (computed on Ray Data, one shard per task)."""

from __future__ import annotations

from collections import deque
from typing import Any

from pipeline.config import StorageConfig
from pipeline.embed.transform import ChainSpec
from pipeline.gallery.store import Gallery
from pipeline.io import uri as uri_io
from pipeline.plan.planner import ShardFacts


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


def shard_work(g: Gallery, source_version: str) -> list[dict[str, Any]]:
    """One work item per shard of the source version: where its rows and images are."""
    m = g.manifest(source_version)
    space = m.get("model") or source_version
    return [
        {
            "shard_id": int(r["shard_id"]),
            "source_version": source_version,
            "source_uri": g.path("versions", source_version, r["path"]),
            "image_file": r.get("image_file"),
            "space": space,
        }
        for r in sorted(m["shards"], key=lambda r: int(r["shard_id"]))
    ]


def images_available(image_file: str | None, storage: StorageConfig | None) -> bool:
    return bool(image_file) and uri_io.exists(image_file, storage)


def gather_facts(
    g: Gallery,
    source_version: str,
    target_model: str,
    chains: dict[str, ChainSpec],
    quantiles: int,
    num_cpus: float,
    parallel: int,
    progress: Any = None,
    probe_keys: list[str] | None = None,
) -> tuple[list[ShardFacts], list[dict[str, Any]]]:
    """Facts of every shard of the source version (and the work items, with the chain key).

    `chains` maps "identity" | "side" | "noside" to the chain for this source space.
    """
    from pipeline.embed.upgrade import FactsStage, run_shards

    work = shard_work(g, source_version)
    for w in work:
        w["chain"] = "identity" if "identity" in chains else None
    kwargs = {
        "chains": chains,
        # credentials resolved on the driver: workers may not share its environment
        "storage": g.storage.resolved() if g.storage is not None else None,
        "target_model": target_model,
        "quantiles": quantiles,
        "probe_keys": probe_keys,
    }
    by_id = {w["shard_id"]: w for w in work}
    facts: dict[int, ShardFacts] = {}
    for rec in run_shards(FactsStage, kwargs, work, num_cpus, parallel):
        w = by_id[rec["shard_id"]]
        w["chain"] = rec["chain"]
        w["probe_ranks"] = rec.get("probe_ranks") or {}
        spec = chains.get(rec["chain"]) if rec["chain"] else None
        facts[w["shard_id"]] = ShardFacts(
            shard_id=w["shard_id"],
            rows=rec["rows"],
            source_version=source_version,
            space=w["space"],
            native_rows=rec["native_rows"],
            has_side_info=rec["has_side_info"],
            images_available=images_available(w["image_file"], g.storage),
            transform=list(spec.names) if spec is not None else None,
            uncertainty=rec["uncertainty"],
        )
        if progress is not None:
            progress(rec)
    return [facts[k] for k in sorted(facts)], work
