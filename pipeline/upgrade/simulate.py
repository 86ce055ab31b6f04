"""The plan replayed on the labelled validation rows: its expected top-1 before any shard runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.embed.transform import ChainSpec, TransformChain
from pipeline.evaluate.neighbours import quality
from pipeline.gallery.rows import read_rows
from pipeline.gallery.store import Gallery
from pipeline.upgrade.plan import Plan, ShardFacts
from pipeline.upgrade.validate import ValidationRows


def _kept_rows(
    reembed_rows: int, names: list[str], ranks: dict[str, int], lv: Any, f: ShardFacts
) -> Any:
    """Which of a partial shard's validation rows keep their transformed embedding."""
    if ranks:  # exactly the rows the executor will re-embed: its order's prefix
        rank = np.array([ranks.get(k, -1) for k in names])
        return (rank < 0) | (rank >= reembed_rows)
    # approximate: the shard's uncertainty quantiles, or a random share without them
    frac = reembed_rows / max(f.rows - f.native_rows, 1)
    if lv is None or not f.uncertainty:
        return np.random.default_rng(0).random(len(names)) >= frac
    q = np.linspace(0, 1, max(len(f.uncertainty), 2))
    return lv < np.interp(1 - frac, q, f.uncertainty)


@dataclass(frozen=True)
class _Replay:
    """The validation rows present in both the source version and the images."""

    names: list[str]
    new: np.ndarray
    shard: np.ndarray
    labels: np.ndarray | None
    old: np.ndarray
    side: np.ndarray | None


def _replay_rows(g: Gallery, source: str, val: ValidationRows) -> _Replay | None:
    src = read_rows(g, source, val.keys, ("embedding", "side_info"))
    ok = val.found & src.found
    if ok.sum() < 2:
        return None
    idx = np.flatnonzero(ok)
    side = src["side_info"]
    return _Replay(
        [val.keys[i] for i in idx],
        val.new[idx],
        src.shard[idx],
        val.labels[idx] if val.labels is not None else None,
        src["embedding"][idx],
        side[idx] if side is not None else None,
    )


def _planned_rows(
    plan: Plan,
    facts: list[ShardFacts],
    ranks: dict[int, dict[str, int]],
    chains: dict[str, ChainSpec],
    r: _Replay,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Each row's embedding under transformation only and under the plan, and the shards whose
    validation rows no transformation reaches."""
    built = {k: TransformChain(v) for k, v in chains.items()}
    by_fact = {f.shard_id: f for f in facts}
    trans, planned = r.new.copy(), r.new.copy()
    unreached: list[int] = []  # shards with validation rows no transformation reaches
    for sp in plan.shards:
        idx = np.flatnonzero(r.shard == sp.shard_id)
        chain = built.get(sp.chain or "")
        if len(idx) and chain is None:
            unreached.append(sp.shard_id)
        if not len(idx) or chain is None:
            continue  # no transformation: these rows are re-embedded in any plan
        s = r.side[idx] if r.side is not None and chain.spec.needs_side else None
        pred, lv = chain(r.old[idx], s)
        trans[idx] = pred
        if sp.method in ("transform", "skip"):
            planned[idx] = pred
        elif sp.method == "partial":
            names = [r.names[i] for i in idx]
            got = ranks.get(sp.shard_id) or {}
            keep = _kept_rows(sp.reembed_rows, names, got, lv, by_fact[sp.shard_id])
            planned[idx[keep]] = pred[keep]
    return trans, planned, unreached


def simulate_plan(
    plan: Plan,
    facts: list[ShardFacts],
    ranks: dict[int, dict[str, int]],
    chains: dict[str, ChainSpec],
    g: Gallery,
    val: ValidationRows,
    metric: str,
    recall_k: int = 10,
) -> None:
    """Replay the plan on the validation rows: each row takes the embedding the plan will give
    it (new, transformed or kept), queries are new-model embeddings. Sets the plan's expected,
    transform-only and full quality from it (top-1, or recall@k without labels; the curve's
    figure is kept)."""
    if len(val.keys) < 2:
        return
    r = _replay_rows(g, plan.shards[0].source_version, val)
    if r is None:
        return
    trans, planned, unreached = _planned_rows(plan, facts, ranks, chains, r)

    def top1(gal: np.ndarray) -> float:
        return quality(r.new, gal, r.labels, metric, recall_k)

    plan.curve_top1 = plan.expected_top1
    plan.expected_top1 = top1(planned)
    plan.full_top1 = top1(r.new)
    plan.estimate, plan.estimate_rows = "simulated", len(r.names)
    if unreached:
        # Rows no h reaches would count as re-embedded, so "transform only" would be a mix:
        # keep the evaluation's figure (h on every validation row) and say so.
        plan.warnings.append(
            f"transform-only {plan.measure} {plan.transform_top1:.2f} is the evaluation's: the "
            f"validation rows of shards {unreached} have no transformation to replay"
        )
    else:
        plan.transform_top1 = top1(trans)
