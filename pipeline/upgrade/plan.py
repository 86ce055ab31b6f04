"""Backfill planner: per shard skip, transform, partial, full or blocked under a re-embed budget."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from pipeline.upgrade.work import ShardWork, id_ranges

METHODS = ("skip", "transform", "partial", "full", "blocked")
# Only when nothing was measured (no throughput profile, no explicit rate): applying h is a small
# network over stored vectors, taken as 50x cheaper per row than decoding and embedding an image.
TRANSFORM_SPEEDUP = 50.0
_BISECT_STEPS = 50
_TARGET_STEPS = 30
_MAX_ROUNDS = 50
_EPS = 1e-9
# Without an uncertainty head nothing ranks one row above another: the executor re-embeds a
# seeded random permutation's prefix, whose expected gain is linear in the rows re-embedded.
NO_Q_ORDER = "seeded random order (h has no uncertainty head)"


class PlanError(ValueError):
    """Invalid planner input; the message names the offending shard or setting."""


@dataclass(frozen=True)
class PlanSettings:
    """The plan.* settings that decide a plan. Each field is part of a version's identity, so
    a changed rule or budget refuses to resume a plan recorded under the old one: a new
    planner rule is a field here (and in PlanConfig), read in `rules()` or `make_plan`."""

    target_version: str | None
    budget_fraction: float | None
    budget_images: int | None
    budget_seconds: float | None
    target_top1: float | None
    target_recall: float | None
    full_threshold: float
    min_partial_fraction: float
    min_gain: float
    no_side_info: str
    max_chain_length: int | None = None

    @classmethod
    def of(cls, plan_config: Any) -> PlanSettings:
        """The settings of a `PlanConfig`."""
        return cls(**{f.name: getattr(plan_config, f.name) for f in fields(cls)})

    def rules(self, labelled: bool = True) -> PlanRules:
        """The rules; the quality target is top-1's on a labelled gallery, else recall's."""
        target = self.target_top1 if labelled else self.target_recall
        return PlanRules(
            self.full_threshold,
            self.min_partial_fraction,
            target,
            max_chain_length=self.max_chain_length,
        )


@dataclass
class ShardFacts:
    """What the planner knows about one gallery shard."""

    shard_id: int
    rows: int
    source_version: str
    space: str
    native_rows: int = 0
    has_side_info: bool = True
    images_available: bool = True
    transform: list[str] | None = None
    uncertainty: list[float] = field(default_factory=list)
    # Where the shard is and which chain maps it: carried into its ShardWork.
    chain: str | None = None
    source_uri: str = ""
    image_file: str | None = None
    # Rows past plan.max_chain_length once mapped (re-embedded whatever the budget), and the
    # rows still to upgrade by the number of maps they will have been through.
    forced_rows: int = 0
    hops: dict[int, int] = field(default_factory=dict)

    @property
    def nonnative(self) -> int:
        """Rows not yet embedded by the target model."""
        return max(self.rows - self.native_rows, 0)


@dataclass
class QualityCurve:
    """Quality (percent) after backfilling each fraction of the gallery in uncertainty order
    (random order when h has no uncertainty head). The quality is top-1 on a labelled gallery,
    else recall@k of the new model's own neighbours (`measure` names it; the `top1` names
    below hold whichever it is)."""

    fractions: list[float]
    top1: list[float]
    ordering: str = "uncertainty"
    measure: str = "top-1"

    def __post_init__(self) -> None:
        self.fractions = [float(x) for x in self.fractions]
        self.top1 = [float(y) for y in self.top1]
        if len(self.fractions) != len(self.top1):
            raise PlanError(
                f"curve {self.ordering!r}: {len(self.fractions)} fractions but "
                f"{len(self.top1)} top-1 values"
            )
        if len(self.fractions) < 2:
            raise PlanError(f"curve {self.ordering!r}: needs at least 2 points")
        if not all(math.isfinite(v) for v in self.fractions + self.top1):
            raise PlanError(f"curve {self.ordering!r}: NaN or infinite values")
        if any(b <= a for a, b in zip(self.fractions, self.fractions[1:], strict=False)):
            raise PlanError(f"curve {self.ordering!r}: fractions must be strictly ascending")
        if self.fractions[0] < 0.0 or self.fractions[-1] > 1.0:
            raise PlanError(f"curve {self.ordering!r}: fractions must lie in [0, 1]")

    @property
    def transform_top1(self) -> float:
        """Top-1 with nothing backfilled (every row transformed)."""
        return self.top1[0]

    @property
    def full_top1(self) -> float:
        """Top-1 with the whole gallery re-embedded."""
        return self.top1[-1]

    def at(self, f: float) -> float:
        """Top-1 after backfilling fraction `f` (linear interpolation, flat outside the points)."""
        return float(np.interp(f, self.fractions, self.top1))

    def slope(self, f: float) -> float:
        """Derivative of `at` (top-1 points per unit fraction) at `f`; right segment at a knot."""
        return float(self._slopes(np.asarray([f], dtype=float))[0])

    def _slopes(self, f: np.ndarray) -> np.ndarray:
        x, y = np.asarray(self.fractions), np.asarray(self.top1)
        seg = np.diff(y) / np.diff(x)
        i = np.clip(np.searchsorted(x, f, side="right") - 1, 0, len(seg) - 1)
        # `at` is flat outside the measured range, so its derivative is zero there.
        return np.where((f < x[0]) | (f > x[-1]), 0.0, seg[i])

    @classmethod
    def from_report(
        cls,
        curves: Mapping[str, Mapping[str, Any]],
        prefer: Sequence[str] = ("uncertainty", "random", "oracle"),
        key: str = "top1",
        measure: str = "top-1",
    ) -> QualityCurve:
        """The first usable ordering of `prefer` in `CompatReport.curves` (its `key` values:
        "top1", or "recall" for an unlabelled gallery); null points dropped."""
        for name in prefer:
            c = curves.get(name)
            if not c:
                continue
            pts = [
                (float(f), float(t))
                for f, t in zip(c.get("fractions") or [], c.get(key) or [], strict=False)
                if f is not None and t is not None and math.isfinite(f) and math.isfinite(t)
            ]
            try:
                return cls([f for f, _ in pts], [t for _, t in pts], name, measure)
            except PlanError:
                continue  # too few finite points or malformed: try the next ordering
        raise PlanError(
            f"no usable backfilling curve among {list(prefer)}; report has {sorted(curves)}"
        )


@dataclass
class Budget:
    """How much re-embedding is allowed; both None means unlimited."""

    images: int | None = None
    seconds: float | None = None
    embed_rows_per_second: float = 500.0
    scan_rows_per_second: float = 20000.0
    transform_rows_per_second: float | None = None  # measured; None: TRANSFORM_SPEEDUP × embed
    origin: str = ""  # where the limit came from (a config setting), named when it is exceeded
    # False: h is not clearly cheaper than the new model (measured): every shard whose images
    # are there is re-embedded whole instead of transformed.
    transform_pays: bool = True

    @property
    def transform_rate(self) -> float:
        return self.transform_rows_per_second or TRANSFORM_SPEEDUP * self.embed_rows_per_second


@dataclass
class PlanRules:
    """Thresholds that turn a re-embed fraction into a method."""

    full_threshold: float = 0.7
    min_partial_fraction: float = 0.01
    target_top1: float | None = None
    # False: re-embed only what no transformation can produce (re-embedding would not pay).
    spend_optional: bool = True
    # Most maps a row may have been through (the facts count the rows past it: forced_rows).
    max_chain_length: int | None = None


def pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


@dataclass
class Plan:
    """A backfill plan over every shard, with its cost and expected top-1."""

    target: str
    shards: list[ShardWork]
    budget: dict
    rules: dict
    reembed_rows: int
    total_rows: int
    cost_seconds: float
    transform_top1: float
    full_top1: float
    expected_top1: float
    curve_ordering: str
    warnings: list[str] = field(default_factory=list)
    # How expected_top1 was obtained: "curve" (the backfilling curve, per-shard gains) or
    # "simulated" (the plan replayed on the labelled validation rows); curve_top1 keeps the
    # curve's figure when the simulation replaced it.
    estimate: str = "curve"
    estimate_rows: int = 0
    curve_top1: float | None = None
    # What the *_top1 figures measure: "top-1" (labelled), or "R@k" (recall@k of the new
    # model's own neighbours, on an unlabelled gallery).
    measure: str = "top-1"
    # Rows still to upgrade by the maps each would have been through if mapped (JSON keys),
    # and how many of them pass plan.max_chain_length and are re-embedded whatever the budget.
    hops: dict[str, int] = field(default_factory=dict)
    forced_rows: int = 0
    # With the gallery generations behind: composed maps or a direct one, as measured.
    chain_choice: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every shard can be produced (none blocked)."""
        return all(s.method != "blocked" for s in self.shards)

    @property
    def counts(self) -> dict[str, int]:
        """Number of shards per method, every method present (zero when unused)."""
        out = dict.fromkeys(METHODS, 0)
        for s in self.shards:
            out[s.method] += 1
        return out

    def shard(self, shard_id: int) -> ShardWork:
        """The plan of shard `shard_id`."""
        for s in self.shards:
            if s.shard_id == shard_id:
                return s
        raise PlanError(f"no shard {shard_id} in the plan")

    def to_json(self) -> str:
        """Strict JSON of the whole plan."""
        return json.dumps(asdict(self), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Inverse of `to_json`."""
        d = json.loads(text)
        d["shards"] = [ShardWork.from_dict(s) for s in d["shards"]]
        return cls(**d)

    def summary(self) -> str:
        """One line: methods, rows re-embedded, cost and expected top-1."""
        methods = ", ".join(f"{n} {m}" for m, n in self.counts.items() if n)
        share = self.reembed_rows / self.total_rows if self.total_rows else 0.0
        line = (
            f"plan → {self.target}: {len(self.shards)} shards ({methods}); re-embed "
            f"{self.reembed_rows:,} of {self.total_rows:,} ({pct(share)}); est. "
            f"{self.cost_seconds:,.0f} s; {self.measure} {self.expected_top1:.2f} (transform-only "
            f"{self.transform_top1:.2f}, full {self.full_top1:.2f})"
        )
        return line if self.ok else line + "; BLOCKED shards"


# --- validation ---------------------------------------------------------------------------------


def _has_q(f: ShardFacts) -> bool:
    return len(f.uncertainty) > 0


def _validate_shard(f: ShardFacts) -> None:
    name = f"shard {f.shard_id}"
    if f.rows < 0:
        raise PlanError(f"{name}: negative rows ({f.rows})")
    if not 0 <= f.native_rows <= f.rows:
        raise PlanError(f"{name}: native_rows {f.native_rows} outside 0..rows ({f.rows})")
    # [] is the identity: the rows are already in the target space (an earlier transform).
    if f.transform is not None and not all(f.transform):
        raise PlanError(f"{name}: unnamed step in transformation chain {f.transform!r}")
    if _has_q(f):
        u = np.asarray(f.uncertainty, dtype=float)
        if u.ndim != 1 or len(u) < 2:
            raise PlanError(f"{name}: need at least 2 uncertainty quantiles, got {u.size}")
        if not np.isfinite(u).all():
            raise PlanError(f"{name}: NaN or infinite uncertainty quantiles")
        if np.any(np.diff(u) < 0):
            raise PlanError(f"{name}: uncertainty quantiles must be ascending")


def _validate(facts: Sequence[ShardFacts], budget: Budget, rules: PlanRules) -> None:
    if not facts:
        raise PlanError("no shards to plan")
    seen: set[int] = set()
    for f in facts:
        _validate_shard(f)
        if f.shard_id in seen:
            raise PlanError(f"shard {f.shard_id}: listed twice")
        seen.add(f.shard_id)
    if budget.images is not None and budget.images < 0:
        raise PlanError(f"budget images must be >= 0, got {budget.images}")
    if budget.seconds is not None and not 0 <= budget.seconds < math.inf:
        raise PlanError(f"budget seconds must be finite and >= 0, got {budget.seconds}")
    rates = (budget.embed_rows_per_second, budget.scan_rows_per_second, budget.transform_rate)
    if not all(0 < r < math.inf for r in rates):
        raise PlanError(f"budget throughputs (rows per second) must be finite and > 0, got {rates}")
    if not 0 < rules.full_threshold <= 1:
        raise PlanError(f"full_threshold must be in (0, 1], got {rules.full_threshold}")
    if not 0 <= rules.min_partial_fraction <= rules.full_threshold:
        raise PlanError(
            f"min_partial_fraction must be in [0, full_threshold], got {rules.min_partial_fraction}"
        )
    if rules.target_top1 is not None and not math.isfinite(rules.target_top1):
        raise PlanError(f"target_top1 must be finite, got {rules.target_top1}")


# --- uncertainty distributions ------------------------------------------------------------------


def _interp_cdf(k: np.ndarray, lo: np.ndarray, hi: np.ndarray, tau: Any, q: int) -> np.ndarray:
    """CDF from the index k of the last quantile <= tau and the quantiles around it."""
    width = np.where(hi > lo, hi - lo, 1.0)
    inner = (np.clip(k, 0, q - 2) + np.clip((tau - lo) / width, 0.0, 1.0)) / (q - 1)
    return np.where(k < 0, 0.0, np.where(k >= q - 1, 1.0, inner))


def _cdf(x: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Right-continuous CDF at each `tau` of one shard, from its evenly spaced quantiles `x`."""
    k = np.searchsorted(x, tau, side="right") - 1
    kk = np.clip(k, 0, len(x) - 2)
    return _interp_cdf(k, x[kk], x[kk + 1], tau, len(x))


def _cdf_rows(x: np.ndarray, tau: float) -> np.ndarray:
    """`_cdf` of many shards (one row of quantiles each) at one threshold."""
    q = x.shape[1]
    k = (x <= tau).sum(axis=1) - 1
    kk, r = np.clip(k, 0, q - 2), np.arange(len(x))
    return _interp_cdf(k, x[r, kk], x[r, kk + 1], tau, q)


class _Ordering:
    """The gallery's global uncertainty order: G(u) = fraction of all rows more uncertain than u."""

    def __init__(self, facts: Sequence[ShardFacts], total_rows: int) -> None:
        qs = [(np.asarray(f.uncertainty, float), f.nonnative) for f in facts if _has_q(f)]
        qs = [(x, m) for x, m in qs if m > 0]
        self.knots = np.unique(np.concatenate([x for x, _ in qs])) if qs else np.zeros(1)
        g = np.zeros(len(self.knots))
        for x, m in qs:
            g += m * (1.0 - _cdf(x, self.knots))
        self.g = g / max(total_rows, 1)

    def at(self, u: np.ndarray) -> np.ndarray:
        # Between knots every shard's CDF is linear in u, so G is too: interpolation is exact.
        return np.interp(u, self.knots, self.g)


class _Pool:
    """Eligible shards still competing for the budget, as arrays for a fast threshold search."""

    def __init__(self, facts: Sequence[ShardFacts]) -> None:
        self.ids = [f.shard_id for f in facts]
        self.rows = np.array([f.rows for f in facts], dtype=float)
        self.nonnative = np.array([f.nonnative for f in facts], dtype=float)
        self.has_q = np.array([_has_q(f) for f in facts], dtype=bool)
        by_q: dict[int, list[int]] = {}
        for i, f in enumerate(facts):
            if _has_q(f):
                by_q.setdefault(len(f.uncertainty), []).append(i)
        self.groups = [
            (np.array(idx), np.array([facts[i].uncertainty for i in idx], dtype=float))
            for _, idx in sorted(by_q.items())
        ]
        if self.groups:
            self.lo = min(float(x.min()) for _, x in self.groups) - 1.0
            self.hi = max(float(x.max()) for _, x in self.groups)
        else:
            self.lo, self.hi = 0.0, 1.0  # the parameter is then the fraction left out

    def counts(self, tau: float) -> np.ndarray:
        """Continuous re-embed counts at threshold `tau`, before rounding down."""
        c = np.zeros(len(self.ids))
        if self.groups:
            for idx, x in self.groups:
                c[idx] = self.nonnative[idx] * (1.0 - _cdf_rows(x, tau))
            q_rows = self.nonnative[self.has_q].sum()
            frac = c[self.has_q].sum() / q_rows if q_rows > 0 else 0.0
        else:
            frac = 1.0 - tau
        # Rows without an uncertainty have no order: they get the same share as the ordered ones.
        c[~self.has_q] = frac * self.nonnative[~self.has_q]
        return c


# --- cost model ---------------------------------------------------------------------------------


def _limit(budget: Budget) -> np.ndarray:
    """(images, seconds) allowed; infinity where that budget is not set."""
    images = math.inf if budget.images is None else float(budget.images)
    seconds = math.inf if budget.seconds is None else float(budget.seconds)
    return np.array([images, seconds])


def _full_cost(f: ShardFacts, budget: Budget) -> np.ndarray:
    return np.array([f.nonnative, f.nonnative / budget.embed_rows_per_second], dtype=float)


def _pool_cost(pool: _Pool, n: np.ndarray, budget: Budget) -> np.ndarray:
    partial = (n > 0) & (n < pool.nonnative)
    # Picking rows by key means reading the whole image shard to find them.
    seconds = n.sum() / budget.embed_rows_per_second
    seconds += pool.rows[partial].sum() / budget.scan_rows_per_second
    return np.array([n.sum(), seconds], dtype=float)


def _fits(cost: np.ndarray, remaining: np.ndarray) -> bool:
    return bool(np.all(cost <= remaining + _EPS))


def _shard_seconds(f: ShardFacts, method: str, n: int, budget: Budget) -> float:
    embed, scan = budget.embed_rows_per_second, budget.scan_rows_per_second
    transform = f.nonnative / budget.transform_rate
    if method == "transform":
        return transform
    if method == "partial":
        return transform + n / embed + f.rows / scan
    if method == "full":
        return n / embed
    return 0.0


# --- allocation ---------------------------------------------------------------------------------


@dataclass
class _Pick:
    method: str
    rows: int
    reason: str


def _take(c: np.ndarray) -> np.ndarray:
    return np.floor(c + _EPS).astype(np.int64)


def _threshold(pool: _Pool, remaining: np.ndarray, budget: Budget) -> tuple[np.ndarray, float]:
    """Rows per shard above the lowest global threshold whose cost fits `remaining`."""
    if not pool.ids:
        return np.zeros(0, dtype=np.int64), pool.hi

    def fits(c: np.ndarray) -> bool:
        return _fits(_pool_cost(pool, _take(c), budget), remaining)

    lo, hi = pool.lo, pool.hi
    if fits(pool.counts(lo)):
        return _take(pool.counts(lo)), lo
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fits(pool.counts(mid)) else (mid, hi)
    # Rows tied at one uncertainty (repeated quantiles) enter together; share out what the budget
    # allows of that jump pro rata between the two bracketing thresholds.
    c_hi, c_lo = pool.counts(hi), pool.counts(lo)
    a, b = 0.0, 1.0
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if fits(c_hi + mid * (c_lo - c_hi)) else (a, mid)
    return _take(c_hi + a * (c_lo - c_hi)), hi


def _promote(
    active: list[ShardFacts],
    n: np.ndarray,
    remaining: np.ndarray,
    budget: Budget,
    rules: PlanRules,
    picks: dict[int, _Pick],
) -> bool:
    """Shards whose share reaches full_threshold go full while their whole cost fits."""
    frac = n / np.array([f.nonnative for f in active], dtype=float)
    changed = False
    for i in sorted(range(len(active)), key=lambda i: (-frac[i], active[i].shard_id)):
        if frac[i] < rules.full_threshold:
            break
        cost = _full_cost(active[i], budget)
        if _fits(cost, remaining):
            remaining -= cost
            picks[active[i].shard_id] = _Pick(
                "full",
                active[i].nonnative,
                f"re-embed fraction {pct(frac[i])} ≥ full_threshold "
                f"{pct(rules.full_threshold)}: full",
            )
            changed = True
    return changed


def _demote(
    active: list[ShardFacts], n: np.ndarray, rules: PlanRules, picks: dict[int, _Pick]
) -> bool:
    """Shards with a sliver of rows are only transformed; their rows go back to the others."""
    changed = False
    for f, k in zip(active, n, strict=True):
        frac = k / f.nonnative
        if k > 0 and frac < rules.min_partial_fraction:
            picks[f.shard_id] = _Pick(
                "transform",
                0,
                f"re-embed fraction {pct(frac)} < min_partial_fraction "
                f"{pct(rules.min_partial_fraction)}: transform only",
            )
            changed = True
    return changed


def _final_pick(f: ShardFacts, k: int, tau: float, rules: PlanRules) -> _Pick:
    frac = k / f.nonnative
    if k <= 0:
        if _has_q(f):
            return _Pick("transform", 0, f"uncertainty below the budget's threshold (τ={tau:.2f})")
        return _Pick("transform", 0, "budget exhausted: transform only")
    if k >= f.nonnative:
        return _Pick("full", f.nonnative, "whole shard fits in the budget: full")
    if _has_q(f):
        reason = f"top {pct(frac)} by uncertainty (τ={tau:.2f})"
    else:
        reason = f"{pct(frac)} in {NO_Q_ORDER}"
    if frac >= rules.full_threshold:
        reason += "; a full re-embed would exceed the budget"
    return _Pick("partial", k, reason)


def _allocate(
    facts: list[ShardFacts], remaining: np.ndarray, budget: Budget, rules: PlanRules
) -> dict[int, _Pick]:
    """Methods and re-embed rows of the eligible shards within `remaining` (images, seconds)."""
    if np.all(np.isinf(remaining)):
        return {f.shard_id: _Pick("full", f.nonnative, "no budget limit: full") for f in facts}
    if np.any(remaining <= 0):
        return {
            f.shard_id: _Pick("transform", 0, "no re-embed budget: transform only") for f in facts
        }
    remaining = remaining.copy()
    picks: dict[int, _Pick] = {}
    active = list(facts)
    for _ in range(_MAX_ROUNDS):
        pool = _Pool(active)
        n, tau = _threshold(pool, remaining, budget)
        # Promotions first: a demotion decided before them could be undone by the rows they free.
        if not (
            _promote(active, n, remaining, budget, rules, picks) or _demote(active, n, rules, picks)
        ):
            break
        active = [f for f in active if f.shard_id not in picks]
    else:
        pool = _Pool(active)
        n, tau = _threshold(pool, remaining, budget)
    for f, k in zip(active, n, strict=True):
        picks[f.shard_id] = _final_pick(f, int(k), tau, rules)
    return picks


# --- expected quality ---------------------------------------------------------------------------


@dataclass
class _State:
    target: str
    curve: QualityCurve
    budget: Budget
    rules: PlanRules
    order: _Ordering
    total: int


def _shard_gain(f: ShardFacts, n: int, st: _State) -> float:
    """Top-1 points that re-embedding `n` of this shard's rows (most uncertain first) adds."""
    if n <= 0 or st.total <= 0:
        return 0.0
    curve = st.curve
    if not _has_q(f):
        return n / st.total * (curve.full_top1 - curve.transform_top1)
    x = np.asarray(f.uncertainty, dtype=float)
    bins = len(x) - 1
    per_bin = f.nonnative / bins
    take = np.clip(n - per_bin * np.arange(bins), 0.0, per_bin)  # rows from each bin, top first
    hi, lo = x[::-1][:-1], x[::-1][1:]
    # A partly taken bin holds its upper part: its middle is that part's middle.
    mid = hi - 0.5 * (take / per_bin) * (hi - lo)
    return float(np.sum(take / st.total * curve._slopes(st.order.at(mid))))


def _estimate(gains: float, st: _State) -> float:
    top = st.curve.top1
    return float(np.clip(st.curve.transform_top1 + gains, min(top), max(top)))


def _picks_gain(facts: list[ShardFacts], picks: dict[int, _Pick], st: _State) -> float:
    return sum(_shard_gain(f, picks[f.shard_id].rows, st) for f in facts)


def _spend(
    eligible: list[ShardFacts], pool_limit: np.ndarray, fixed_gain: float, st: _State
) -> tuple[dict[int, _Pick], np.ndarray, list[str]]:
    """Allocate the pool budget, trimmed to the smallest that reaches the target top-1 if set."""
    budget, rules = st.budget, st.rules
    picks = _allocate(eligible, pool_limit, budget, rules)
    target = rules.target_top1
    if target is None:
        return picks, pool_limit, []
    best = _estimate(fixed_gain + _picks_gain(eligible, picks, st), st)
    if best < target:
        return (
            picks,
            pool_limit,
            [
                f"target {st.curve.measure} {target:.2f} not reached: {best:.2f} expected "
                "with the whole budget"
            ],
        )
    zero = _allocate(eligible, np.zeros(2), budget, rules)
    if _estimate(fixed_gain, st) >= target:
        for p in zero.values():
            p.reason = f"target {st.curve.measure} reached without backfill"
        return zero, np.zeros(2), []
    full = np.sum([_full_cost(f, budget) for f in eligible], axis=0)
    # An unlimited budget is searched between nothing and re-embedding every eligible shard.
    base = full if np.all(np.isinf(pool_limit)) else pool_limit
    lo, hi = 0.0, 1.0
    for _ in range(_TARGET_STEPS):
        mid = 0.5 * (lo + hi)
        trial = _allocate(eligible, _scaled(base, mid), budget, rules)
        if _estimate(fixed_gain + _picks_gain(eligible, trial, st), st) >= target:
            hi, picks = mid, trial
        else:
            lo = mid
    for p in picks.values():
        if p.method == "transform":
            p.reason += f"; target {st.curve.measure} {target:.2f} reached"
    return picks, _scaled(base, hi), []


def _scaled(limit: np.ndarray, s: float) -> np.ndarray:
    # inf * 0 is NaN: an unset budget stays unset at any scale.
    return np.where(np.isinf(limit), math.inf, limit * s)


# --- the plan -----------------------------------------------------------------------------------


def _chain_note(f: ShardFacts) -> str:
    if f.transform == []:
        return f"rows already in the target space ({f.space})"
    chain = " → ".join(f.transform or [])
    if not f.has_side_info:
        return f"no side-info: {chain}"
    return f"composes {chain}" if len(f.transform or []) > 1 else ""


def _classify(f: ShardFacts, target: str, transform_pays: bool = True) -> _Pick | None:
    """The method forced by a shard's facts, or None when it competes for the budget."""
    if f.native_rows >= f.rows:
        return _Pick("skip", 0, f"already embedded by {target}")
    if f.transform is None:
        if not f.images_available:
            return _Pick("blocked", 0, f"no transformation from {f.space} and images gone")
        if not f.has_side_info:
            why = "no side-info and no side-info-free transformation"
        else:
            why = f"no transformation from {f.space} to {target}"
        return _Pick("full", f.nonnative, f"{why}: full backfill")
    if not f.images_available:
        note = _chain_note(f)
        return _Pick(
            "transform", 0, "images unavailable: transform only" + (f" ({note})" if note else "")
        )
    if not transform_pays:
        why = "h costs about as much as the new model (measured)"
        return _Pick("full", f.nonnative, f"{why}: full backfill")
    return None


def _ids(ids: list[int]) -> str:
    """[3] -> "shard 3"; [0, 1, 2, 5] -> "shards 0-2, 5"."""
    return f"shard{'s' if len(ids) > 1 else ''} {id_ranges(ids, ', ')}"


def _check_mandatory(
    mandatory: list[ShardFacts], picks: dict[int, _Pick], need: np.ndarray, budget: Budget
) -> None:
    """A budget is a ceiling: shards only a full backfill can produce must fit in it."""
    limit = _limit(budget)
    if np.all(need <= limit + _EPS):
        return
    why: dict[str, list[int]] = {}
    for f in mandatory:
        why.setdefault(picks[f.shard_id].reason.removesuffix(": full backfill"), []).append(
            f.shard_id
        )
    who = "; ".join(f"{_ids(ids)} ({w})" for w, ids in why.items())
    verb = "needs" if len(mandatory) == 1 else "need"
    if need[0] > limit[0] + _EPS:
        over = f"{int(need[0]):,} images to re-embed, over the budget of {int(limit[0]):,} images"
    else:
        over = f"{need[1]:,.1f} s to re-embed, over the budget of {limit[1]:,.1f} s"
    origin = f" ({budget.origin})" if budget.origin else ""
    raise PlanError(
        f"{who} {verb} {over}{origin}: only a full backfill can produce "
        f"{'it' if len(mandatory) == 1 else 'them'}; raise the budget or restore what h needs"
    )


def _forced_cost(f: ShardFacts, budget: Budget) -> np.ndarray:
    n = f.forced_rows
    return np.array([n, n / budget.embed_rows_per_second + f.rows / budget.scan_rows_per_second])


def _check_forced(
    eligible: list[ShardFacts], need: np.ndarray, budget: Budget, rules: PlanRules
) -> np.ndarray:
    """What re-embedding the rows past the chain-length limit costs; it must fit the budget
    beside the mandatory full backfills (the limit is a rule, not a wish)."""
    forced = [f for f in eligible if f.forced_rows > 0]
    cost = np.sum([_forced_cost(f, budget) for f in forced] or [np.zeros(2)], axis=0)
    limit = _limit(budget)
    if np.all(need + cost <= limit + _EPS):
        return cost
    rows = sum(f.forced_rows for f in forced)
    origin = f" ({budget.origin})" if budget.origin else ""
    raise PlanError(
        f"{rows:,} rows in {_ids([f.shard_id for f in forced])} would go through more than "
        f"plan.max_chain_length={rules.max_chain_length} maps and must be re-embedded, over "
        f"the budget{origin}: raise the budget or plan.max_chain_length"
    )


def _force_long_chains(
    eligible: list[ShardFacts], picks: dict[int, _Pick], rules: PlanRules
) -> None:
    """Rows past the chain-length limit come first in the executor's order: each shard
    re-embeds them on top of what the budget gave it."""
    for f in eligible:
        if f.forced_rows <= 0:
            continue
        p = picks[f.shard_id]
        rows = min(f.nonnative, p.rows + f.forced_rows)
        why = (
            f"{f.forced_rows:,} rows past plan.max_chain_length={rules.max_chain_length} "
            "maps re-embedded first"
        )
        method = "full" if rows >= f.nonnative else "partial"
        picks[f.shard_id] = _Pick(method, rows, f"{why}; {p.reason}")


def _stale_chains(facts: list[ShardFacts], picks: dict[int, _Pick], rules: PlanRules) -> list[str]:
    """A warning for rows past the limit that stay mapped: their images are gone."""
    ids = [
        f.shard_id for f in facts if f.forced_rows > 0 and picks[f.shard_id].method == "transform"
    ]
    if not ids:
        return []
    rows = sum(f.forced_rows for f in facts if f.shard_id in ids)
    return [
        f"{rows:,} rows in {_ids(ids)} go through more than plan.max_chain_length="
        f"{rules.max_chain_length} maps: their images are gone, so they are mapped again"
    ]


def _shard_plan(f: ShardFacts, p: _Pick, st: _State) -> ShardWork:
    return ShardWork(
        shard_id=f.shard_id,
        rows=f.rows,
        method=p.method,
        reembed_rows=int(p.rows),
        fraction=p.rows / f.rows if f.rows else 0.0,
        transform=list(f.transform) if f.transform is not None else None,
        cost_seconds=_shard_seconds(f, p.method, p.rows, st.budget),
        expected_gain=_shard_gain(f, p.rows, st) if p.method in ("partial", "full") else 0.0,
        reason=p.reason,
        images_available=f.images_available,
        has_side_info=f.has_side_info,
        space=f.space,
        source_version=f.source_version,
        chain=f.chain,
        source_uri=f.source_uri,
        image_file=f.image_file,
    )


def _budget_dict(budget: Budget, pool_limit: np.ndarray) -> dict:
    d = asdict(budget)
    # What the budget left for shards that compete for it, after mandatory fulls and the target.
    images = pool_limit[0]
    d["available_images"] = None if math.isinf(images) else int(math.floor(images + _EPS))
    d["available_seconds"] = None if math.isinf(pool_limit[1]) else float(pool_limit[1])
    return d


def make_plan(
    facts: list[ShardFacts],
    target: str,
    curve: QualityCurve,
    budget: Budget,
    rules: PlanRules = PlanRules(),
) -> Plan:
    """Decide each shard's method under `budget`; pure, deterministic (ties by shard_id)."""
    _validate(facts, budget, rules)
    facts = sorted(facts, key=lambda f: f.shard_id)
    total = sum(f.rows for f in facts)
    st = _State(target, curve, budget, rules, _Ordering(facts, total), total)
    pays = budget.transform_pays
    picks = {f.shard_id: p for f in facts if (p := _classify(f, target, pays)) is not None}
    eligible = [f for f in facts if f.shard_id not in picks]
    mandatory = [f for f in facts if f.shard_id in picks and picks[f.shard_id].method == "full"]
    need = np.sum([_full_cost(f, budget) for f in mandatory] or [np.zeros(2)], axis=0)
    _check_mandatory(mandatory, picks, need, budget)
    need = need + _check_forced(eligible, need, budget, rules)
    pool_limit = _limit(budget) - need if rules.spend_optional else np.zeros(2)
    fixed = sum(_shard_gain(f, f.nonnative, st) for f in mandatory)
    spent, pool_limit, warnings = _spend(eligible, pool_limit, fixed, st)
    if not rules.spend_optional:
        for p in spent.values():
            p.reason = "re-embedding would not pay: transform only"
    picks.update(spent)
    _force_long_chains(eligible, picks, rules)
    warnings += _stale_chains(facts, picks, rules)
    for f in eligible:
        note = _chain_note(f)
        picks[f.shard_id].reason += f"; {note}" if note else ""
    shards = [_shard_plan(f, picks[f.shard_id], st) for f in facts]
    blocked = [s for s in shards if s.method == "blocked"]
    if blocked:
        warnings.append(
            f"{len(blocked)} shard(s) blocked ({sum(s.rows for s in blocked):,} rows, ids "
            f"{[s.shard_id for s in blocked]}): no transformation and images gone"
        )
    return Plan(
        target=target,
        shards=shards,
        budget=_budget_dict(budget, pool_limit),
        rules=asdict(rules),
        reembed_rows=sum(s.reembed_rows for s in shards),
        total_rows=total,
        cost_seconds=float(sum(s.cost_seconds for s in shards)),
        transform_top1=curve.transform_top1,
        full_top1=curve.full_top1,
        expected_top1=_estimate(sum(s.expected_gain for s in shards), st),
        curve_ordering=curve.ordering,
        warnings=warnings,
        measure=curve.measure,
        hops=_hops_total(facts),
        forced_rows=sum(f.forced_rows for f in eligible),
    )


def _hops_total(facts: list[ShardFacts]) -> dict[str, int]:
    out: dict[int, int] = {}
    for f in facts:
        for k, v in f.hops.items():
            out[int(k)] = out.get(int(k), 0) + int(v)
    return {str(k): out[k] for k in sorted(out)}
