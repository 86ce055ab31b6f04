"""Many model generations (jobs/benchmark_generations.py): what a gallery stores after each
nightly upgrade under each strategy — chained maps, one direct map, a full backfill, a planned
mix — its quality for the new model's queries, and what it costs. No Ray: the script trains
the models and maps and embeds the held-out split; this module maps, scores and prices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.embed.rates import transform_rate
from pipeline.embed.transform import TransformChain, chain_spec
from pipeline.evaluate.metrics import Metric, retrieval_metrics
from pipeline.evaluate.neighbours import nearest, neighbour_recall

MILLION = 1_000_000


@dataclass(frozen=True)
class Quality:
    """Retrieval quality (percent) of one stored gallery for the new model's queries."""

    top1: float
    map: float
    recall: float  # recall@k of the new model's own neighbours (label-free)


@dataclass(frozen=True)
class Cost:
    """What one strategy pays in one nightly upgrade: maps trained, rows mapped, rows embedded.

    `map_rate` / `embed_rate` are measured rows/s (None: that work is not done)."""

    train_seconds: float
    mapped_fraction: float
    embedded_fraction: float
    map_rate: float | None
    embed_rate: float | None

    def seconds(self, rows: int) -> float:
        """Seconds for a gallery of `rows`: training is a fixed cost, the rest scales."""
        return extrapolate(self, rows)


def extrapolate(cost: Cost, rows: int) -> float:
    """train + rows·mapped/map_rate + rows·embedded/embed_rate (a missing rate with work to do
    is an error: the figure would be silently wrong)."""
    secs = cost.train_seconds
    for frac, rate, what in (
        (cost.mapped_fraction, cost.map_rate, "map"),
        (cost.embedded_fraction, cost.embed_rate, "embed"),
    ):
        if frac <= 0:
            continue
        if not rate or rate <= 0:
            raise ValueError(f"{what} work of {frac:.0%} of the rows needs a measured rate")
        secs += rows * frac / rate
    return secs


@dataclass
class StrategyResult:
    """One row of a generation's table."""

    generation: str
    strategy: str
    hops: str  # "2", or the mix of a planned gallery: "0:25% 1:75%"
    quality: Quality
    gap: float | None  # percent of the old/old → new/new gap recovered (top-1)
    cost: Cost | None
    rows: int = 0

    def figures(self) -> dict:
        """Flat snake_case figures for the JSON file."""
        out = {"generation": self.generation, "strategy": self.strategy, "hops": self.hops}
        out["rows"] = self.rows
        out.update(top1=self.quality.top1, map=self.quality.map, recall_at_10=self.quality.recall)
        out["gap_recovered"] = self.gap
        if self.cost is not None:
            c = self.cost
            out.update(
                train_seconds=c.train_seconds,
                mapped_fraction=c.mapped_fraction,
                embedded_fraction=c.embedded_fraction,
                map_rows_per_s=c.map_rate,
                embed_rows_per_s=c.embed_rate,
                seconds_gallery=c.seconds(self.rows),
                seconds_1m=c.seconds(MILLION),
            )
        return out


def results_from_figures(rows: list[dict]) -> list[StrategyResult]:
    """StrategyResults back from the JSON figures (to rewrite the page without a rerun)."""
    out = []
    for f in rows:
        q = Quality(f["top1"], f["map"], f["recall_at_10"])
        cost = None
        if "train_seconds" in f:
            cost = Cost(
                f["train_seconds"],
                f["mapped_fraction"],
                f["embedded_fraction"],
                f["map_rows_per_s"],
                f["embed_rows_per_s"],
            )
        gap = f["gap_recovered"]
        out.append(
            StrategyResult(f["generation"], f["strategy"], f["hops"], q, gap, cost, f["rows"])
        )
    return out


def score(
    queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, ref: np.ndarray, metric: Metric
) -> Quality:
    """FCT's protocol (self-match excluded) and recall@k against the reference neighbours."""
    m = retrieval_metrics(queries, gallery, labels, labels, metric, exclude_self=True)
    return Quality(m["top1"], m["map"], neighbour_recall(queries, gallery, ref, metric))


def reference(queries: np.ndarray, k: int, metric: Metric) -> np.ndarray:
    """The new model's own k nearest neighbours of each row: recall@k's reference."""
    return nearest(queries, queries, min(k, len(queries) - 1), metric)


def gap_recovered(x: float, floor: float, ceiling: float) -> float | None:
    """(x − old/old) / (new/new − old/old) in percent; None when there is no gap."""
    return None if ceiling == floor else 100.0 * (x - floor) / (ceiling - floor)


@dataclass
class Planned:
    """A nightly planned gallery: each row's embedding, the maps applied since it was last
    embedded (hops) and its accumulated log-variance (−inf: embedded, exact)."""

    emb: np.ndarray
    hops: np.ndarray
    log_var: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def embedded(cls, emb: np.ndarray) -> Planned:
        n = len(emb)
        return cls(emb, np.zeros(n, np.int64), np.full(n, -np.inf))

    def mix(self) -> str:
        """The share of rows at each hop count, e.g. "0:25% 1:19% 2:56%"."""
        counts = np.bincount(self.hops)
        return " ".join(f"{h}:{100 * c / len(self.hops):.0f}%" for h, c in enumerate(counts) if c)


def nightly_step(
    prev: Planned,
    mapped: np.ndarray,
    step_log_var: np.ndarray | None,
    fresh: np.ndarray,
    fraction: float,
    order: str,
    seed: int = 0,
) -> Planned:
    """One night: every row mapped by the one-step h (`mapped`, from `prev.emb`), then the
    `fraction` of rows first in `order` re-embedded with the new model (`fresh`).

    "uncertainty" re-embeds the rows whose accumulated variance (the steps' variances add, as
    in TransformChain) is highest; "random" a seeded random share."""
    n = len(prev.emb)
    if mapped.shape[0] != n or fresh.shape != mapped.shape:
        raise ValueError(f"mapped {mapped.shape} and fresh {fresh.shape} must have {n} rows")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    lv = prev.log_var if step_log_var is None else np.logaddexp(prev.log_var, step_log_var)
    if order == "uncertainty":
        if step_log_var is None:
            raise ValueError("the uncertainty order needs h's log-variance (FastFill's head)")
        ranked = np.argsort(-lv, kind="stable")
    elif order == "random":
        ranked = np.random.default_rng(seed).permutation(n)
    else:
        raise ValueError(f"order must be 'uncertainty' or 'random', got {order!r}")
    redo = ranked[: int(round(fraction * n))]
    emb, hops, lv = mapped.copy(), prev.hops + 1, lv.copy()
    emb[redo], hops[redo], lv[redo] = fresh[redo], 0, -np.inf
    return Planned(emb, hops, lv)


@dataclass
class Inputs:
    """What scoring needs: held-out embeddings per model (same rows), labels, each map's dir
    and training seconds, each model's measured embedding rows/s."""

    names: list[str]  # generations in order, v1 first
    sets: dict[str, np.ndarray]
    labels: np.ndarray
    maps: dict[str, Path]  # "h12" → transformation dir
    map_seconds: dict[str, float]
    embed_rates: dict[str, float]
    metric: Metric = "cosine"
    k: int = 10
    fraction: float = 0.25
    orders: tuple[str, ...] = ("uncertainty", "random")
    seed: int = 0


def _chain(inp: Inputs, steps: list[str]) -> TransformChain:
    return TransformChain(chain_spec([inp.maps[s] for s in steps], steps))


def _hop(i: int) -> str:
    return f"h{i}{i + 1}"


@dataclass
class _Scorer:
    """Scores galleries for one generation's queries and collects its rows."""

    generation: str
    queries: np.ndarray
    inp: Inputs
    floor: Quality
    rows: list[StrategyResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ref = reference(self.queries, self.inp.k, self.inp.metric)
        self.top = score(self.queries, self.queries, self.inp.labels, self.ref, self.inp.metric)
        # old/old's R@10: the old system's own neighbours against this generation's reference
        v1 = self.inp.sets[self.inp.names[0]]
        recall = neighbour_recall(v1, v1, self.ref, self.inp.metric)
        floor = Quality(self.floor.top1, self.floor.map, recall)
        self.rows.append(StrategyResult(self.generation, "old/old (v1/v1)", "—", floor, 0.0, None))

    def __call__(self, strategy: str, hops: str, gallery: np.ndarray, cost: Cost | None) -> None:
        q = score(self.queries, gallery, self.inp.labels, self.ref, self.inp.metric)
        gap = gap_recovered(q.top1, self.floor.top1, self.top.top1)
        self.rows.append(StrategyResult(self.generation, strategy, hops, q, gap, cost))


def evaluate_generations(inp: Inputs) -> list[StrategyResult]:
    """Every generation's rows: old/old, chained, direct, backfill and the planned galleries."""
    v1 = inp.sets[inp.names[0]]
    floor = score(v1, v1, inp.labels, reference(v1, inp.k, inp.metric), inp.metric)
    chained, planned = v1, {o: Planned.embedded(v1) for o in inp.orders}
    out: list[StrategyResult] = []
    for i, g in enumerate(inp.names[1:], start=1):
        q, hop, train = inp.sets[g], _chain(inp, [_hop(i)]), inp.map_seconds[_hop(i)]
        row = _Scorer(g, q, inp, floor)
        cost = Cost(train, 1.0, 0.0, transform_rate(hop, chained, None), None)
        chained = hop(chained, None)[0]
        row("chained" if i > 1 else "chained = direct", str(i), chained, cost)  # page.SHARED
        if i > 1:
            direct = _chain(inp, [f"h1{i + 1}"])
            rate = transform_rate(direct, v1, None)
            cost = Cost(inp.map_seconds[f"h1{i + 1}"], 1.0, 0.0, rate, None)
            row("direct", "1", direct(v1, None)[0], cost)
        row("backfill", "0", q, Cost(0.0, 0.0, 1.0, None, inp.embed_rates[g]))
        f = inp.fraction
        for order in inp.orders:
            # FastFill's one-step map where the order needs its uncertainty, FCT's otherwise
            name = _hop(i) + ("-ff" if order == "uncertainty" else "")
            step, prev = _chain(inp, [name]), planned[order]
            mapped, lv = step(prev.emb, None)
            planned[order] = nightly_step(prev, mapped, lv, q, f, order, inp.seed + i)
            rate = transform_rate(step, prev.emb, None)
            cost = Cost(inp.map_seconds[name], 1 - f, f, rate, inp.embed_rates[g])
            label = f"planned {f:.0%} ({'FastFill, uncertainty' if name != _hop(i) else order})"
            row(label, planned[order].mix(), planned[order].emb, cost)
        for r in row.rows:
            r.rows = len(v1)
        out += row.rows
    return out
