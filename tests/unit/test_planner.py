"""Backfill planner: methods per shard, budget and cost model, quality estimate, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from pipeline.config import PlanConfig
from pipeline.display import plan_table
from pipeline.upgrade.plan import (
    Budget,
    Plan,
    PlanError,
    PlanRules,
    QualityCurve,
    ShardFacts,
    make_plan,
)
from pipeline.upgrade.price import MeasuredRates, price_budget
from pipeline.upgrade_graph import plan_of

FRACTIONS = [i / 20 for i in range(21)]
# Concave like a real uncertainty-ordered curve: the first rows backfilled gain the most.
CURVE = QualityCurve(FRACTIONS, [60.0 + 20.0 * (1.0 - (1.0 - f) ** 2) for f in FRACTIONS])


def _q(lo: float, hi: float, n: int = 11) -> list[float]:
    return [float(v) for v in np.linspace(lo, hi, n)]


def _shard(sid: int, rows: int = 10_000, **kw) -> ShardFacts:
    kw.setdefault("transform", ["fct-v1-v2"])
    kw.setdefault("uncertainty", _q(-4.0, -1.0))
    kw.setdefault("space", "v1")
    return ShardFacts(shard_id=sid, rows=rows, source_version="g1", **kw)


def _gallery() -> list[ShardFacts]:
    """80k rows: 2 shards of new content, 3 ordinary, 2 with images gone, 1 without side-info."""
    return [
        _shard(0, 5_000, uncertainty=_q(-1.0, 1.0)),
        _shard(1, 5_000, uncertainty=_q(-1.2, 0.8)),
        _shard(2, 15_000, uncertainty=_q(-4.0, -0.5)),
        _shard(3, 15_000, uncertainty=_q(-4.5, -1.5)),
        _shard(4, 15_000, uncertainty=_q(-5.0, -2.5)),
        _shard(5, images_available=False),
        _shard(6, images_available=False, has_side_info=False, transform=["fct-v1-v2-noside"]),
        _shard(7, 5_000, has_side_info=False, transform=None, uncertainty=[]),
    ]


def _plan(budget: Budget, facts=None, rules: PlanRules | None = None, curve=CURVE) -> Plan:
    return make_plan(facts or _gallery(), "v2", curve, budget, rules or PlanRules())


def test_curve_interpolation_slope_and_report_pick():
    c = QualityCurve([0.0, 0.5, 1.0], [50.0, 70.0, 80.0])
    assert (c.transform_top1, c.full_top1) == (50.0, 80.0)
    assert c.at(0.25) == pytest.approx(60.0)
    assert c.slope(0.25) == pytest.approx(40.0)
    assert c.slope(0.75) == pytest.approx(20.0)
    curves = {
        "random": {"fractions": [0.0, 1.0], "top1": [50.0, 80.0], "auc_top1": 65.0},
        "uncertainty": {"fractions": [0.0, 0.5, 1.0], "top1": [50.0, None, None]},
    }
    picked = QualityCurve.from_report(curves)
    assert picked.ordering == "random"  # uncertainty has one finite point only
    assert picked.top1 == [50.0, 80.0]
    with pytest.raises(PlanError, match="no usable backfilling curve"):
        QualityCurve.from_report({"oracle": {"fractions": [], "top1": []}}, prefer=("random",))


def test_zero_budget_transforms_every_eligible_shard():
    facts = [_shard(i) for i in range(4)]
    plan = _plan(Budget(images=0), facts)
    assert [s.method for s in plan.shards] == ["transform"] * 4
    assert plan.reembed_rows == 0
    assert plan.expected_top1 == CURVE.transform_top1
    assert plan.shard(2).cost_seconds == pytest.approx(10_000 / (50 * 500.0))
    # a measured transformation throughput (the profile's) prices transforms, not the constant
    measured = _plan(Budget(images=0, transform_rows_per_second=2_000_000.0), facts)
    assert measured.shard(2).cost_seconds == pytest.approx(10_000 / 2_000_000.0)
    with pytest.raises(PlanError, match="throughputs"):
        _plan(Budget(images=0, transform_rows_per_second=float("inf")), facts)


def test_unlimited_budget_backfills_every_eligible_shard():
    facts = [_shard(i, uncertainty=_q(-4.0 + i, -1.0 + i)) for i in range(4)]
    plan = _plan(Budget(), facts)
    assert plan.counts["full"] == 4
    assert plan.reembed_rows == plan.total_rows == 40_000
    assert plan.expected_top1 == pytest.approx(CURVE.full_top1, abs=0.3)
    assert plan.cost_seconds == pytest.approx(40_000 / 500.0)
    assert plan.budget["available_images"] is None


def test_quarter_budget_mixes_methods_and_favours_uncertain_shards():
    budget = 20_000  # 25% of the 80k rows
    plan = _plan(Budget(images=budget))
    methods = {s.shard_id: s.method for s in plan.shards}
    assert {"transform", "partial", "full"} <= set(methods.values())
    assert methods[0] == methods[1] == "full"  # new content crosses full_threshold
    assert "full_threshold" in plan.shard(0).reason
    for sid in (5, 6):
        assert methods[sid] == "transform"
        assert plan.shard(sid).reason.startswith("images unavailable: transform only")
    assert "no side-info: fct-v1-v2-noside" in plan.shard(6).reason
    assert methods[7] == "full"
    assert plan.shard(7).reason == (
        "no side-info and no side-info-free transformation: full backfill"
    )
    assert plan.reembed_rows <= budget
    # Rows go to the highest-uncertainty shards first.
    fracs = [plan.shard(sid).fraction for sid in (2, 3, 4)]
    assert fracs[0] > fracs[1] >= fracs[2]
    assert plan.shard(2).method == "partial"
    assert "by uncertainty" in plan.shard(2).reason
    assert plan.shard(4).reembed_rows == 0
    assert plan.transform_top1 < plan.expected_top1 < plan.full_top1
    assert plan.ok


def test_mandatory_fulls_over_budget_raise_naming_shards_and_budget():
    # A budget is a ceiling: a shard that can only be fully backfilled does not overrun it.
    with pytest.raises(PlanError) as e:
        _plan(Budget(images=1_000))
    msg = str(e.value)
    assert "\n" not in msg
    assert "shard 7 (no side-info and no side-info-free transformation)" in msg
    assert "needs 5,000 images to re-embed, over the budget of 1,000 images" in msg
    named = Budget(images=1_000, origin="plan.budget_fraction=0.0125 of 80,000 rows")
    with pytest.raises(PlanError, match=r"1,000 images \(plan.budget_fraction=0.0125 of 80,000"):
        _plan(named)
    seconds = Budget(seconds=5.0, embed_rows_per_second=500.0)
    with pytest.raises(PlanError, match=r"needs 10\.0 s to re-embed, over the budget of 5\.0 s"):
        _plan(seconds)
    # exactly the mandatory rows: allowed, nothing else re-embedded
    plan = _plan(Budget(images=5_000))
    assert plan.shard(7).method == "full" and plan.reembed_rows == 5_000
    assert plan.counts["partial"] == 0 and plan.ok


def test_zero_budget_never_reembeds():
    facts = [_shard(0), _shard(1, uncertainty=[]), _shard(2, native_rows=10_000)]
    plan = _plan(Budget(images=0), facts)
    assert plan.reembed_rows == 0
    assert [s.method for s in plan.shards] == ["transform", "transform", "skip"]
    assert plan.budget["available_images"] == 0
    # a shard no transformation reaches cannot be produced within 0 images: refused up front
    facts.append(_shard(3, 2_000, transform=None, uncertainty=[]))
    with pytest.raises(
        PlanError,
        match=r"shard 3 \(no transformation from v1 to v2\) needs "
        r"2,000 images to re-embed, over the budget of 0 images",
    ):
        _plan(Budget(images=0), facts)
    with pytest.raises(PlanError, match="over the budget of 0 images"):
        _plan(Budget(images=0, seconds=100.0), facts)


def test_transformation_without_uncertainty_transforms_within_budget():
    # loss=fct (e.g. a TorchScript new model): h is found, but ranks no row above another
    facts = [_shard(i, uncertainty=[]) for i in range(4)]
    plan = _plan(Budget(images=2_000), facts)
    assert plan.reembed_rows <= 2_000
    assert [s.method for s in plan.shards] == ["partial"] * 4
    assert [s.reembed_rows for s in plan.shards] == [500] * 4
    assert plan.shard(0).reason == "5.0% in seeded random order (h has no uncertainty head)"
    assert plan.shard(0).transform == ["fct-v1-v2"]
    # the estimate follows the random order: gain linear in the rows, not the ordered curve's
    assert plan.expected_top1 == pytest.approx(60.0 + 0.05 * 20.0)
    assert plan.expected_top1 < CURVE.at(0.05)
    zero = _plan(Budget(images=0), facts)
    assert {s.method for s in zero.shards} == {"transform"} and zero.reembed_rows == 0


def test_mandatory_only_rules_reembed_what_must_be_and_nothing_else():
    # plan.min_gain: re-embedding would not pay, yet the budget still bounds what must be
    rules = PlanRules(spend_optional=False)
    plan = _plan(Budget(images=20_000), rules=rules)
    assert plan.shard(7).method == "full"
    assert plan.reembed_rows == 5_000
    assert plan.counts["partial"] == 0
    assert plan.shard(2).reason == "re-embedding would not pay: transform only"
    assert plan.budget["images"] == 20_000 and plan.budget["available_images"] == 0
    with pytest.raises(PlanError, match="over the budget of 1,000 images"):
        _plan(Budget(images=1_000), rules=rules)


def test_blocked_shard_makes_plan_not_ok():
    facts = [_shard(0), _shard(1, transform=None, images_available=False, uncertainty=[])]
    plan = _plan(Budget(images=1_000), facts)
    assert not plan.ok
    assert plan.shard(1).method == "blocked"
    assert plan.shard(1).reason == "no transformation from v1 and images gone"
    assert plan.counts["blocked"] == 1
    assert any("blocked" in w for w in plan.warnings)


def test_native_shards_skip_and_composition_is_explained():
    facts = [
        _shard(0, native_rows=10_000),
        _shard(1, space="v0", transform=["fct-v0-v1", "fct-v1-v2"]),
        _shard(2, transform=None, uncertainty=[]),
    ]
    plan = _plan(Budget(images=10_000), facts)  # exactly shard 2's mandatory full backfill
    assert plan.shard(0).method == "skip"
    assert plan.shard(0).reason == "already embedded by v2"
    assert plan.shard(0).cost_seconds == 0.0
    assert "composes fct-v0-v1 → fct-v1-v2" in plan.shard(1).reason
    assert plan.shard(1).transform == ["fct-v0-v1", "fct-v1-v2"]
    assert plan.shard(2).reason == "no transformation from v1 to v2: full backfill"


def test_partly_native_shard_reembeds_only_the_rest():
    plan = _plan(Budget(), [_shard(0, native_rows=4_000)])
    assert plan.shard(0).method == "full"
    assert plan.shard(0).reembed_rows == 6_000
    assert plan.shard(0).fraction == pytest.approx(0.6)


def test_seconds_budget_holds_under_the_cost_model():
    budget = Budget(seconds=25.0, embed_rows_per_second=500.0, scan_rows_per_second=20_000.0)
    facts = [_shard(i, uncertainty=_q(-4.0 + 0.5 * i, -1.0 + 0.5 * i)) for i in range(4)]
    plan = _plan(budget, facts)
    reembed_s = 0.0
    for s in plan.shards:
        if s.method == "partial":
            reembed_s += s.reembed_rows / 500.0 + s.rows / 20_000.0
        elif s.method == "full":
            reembed_s += s.reembed_rows / 500.0
    assert plan.reembed_rows > 0
    assert reembed_s <= 25.0 + 1e-6
    assert reembed_s > 24.0  # the budget is used, not just respected
    # An images budget of the same rows spends more rows: the seconds also pay the scans.
    by_images = _plan(Budget(images=25 * 500), facts)
    assert by_images.reembed_rows == 25 * 500 > plan.reembed_rows


def test_target_stops_spending_early():
    budget = Budget(images=40_000)
    whole = _plan(budget)
    target = (whole.transform_top1 + whole.expected_top1) / 2
    plan = _plan(budget, rules=PlanRules(target_top1=target))
    assert plan.reembed_rows < whole.reembed_rows
    assert plan.expected_top1 >= target
    assert plan.expected_top1 < whole.expected_top1
    assert plan.warnings == []
    assert plan.budget["available_images"] < 40_000 - 5_000


def test_unreachable_target_warns_and_spends_the_whole_budget():
    plan = _plan(Budget(images=20_000), rules=PlanRules(target_top1=99.0))
    assert plan.reembed_rows == 20_000
    assert any("target top-1 99.00 not reached" in w for w in plan.warnings)


def test_target_reached_by_transform_alone():
    facts = [_shard(i) for i in range(3)]
    plan = _plan(Budget(images=10_000), facts, PlanRules(target_top1=59.0))
    assert plan.reembed_rows == 0
    assert {s.reason for s in plan.shards} == {"target top-1 reached without backfill"}


def test_bigger_budget_never_lowers_the_estimate():
    # from 5,000: shard 7's mandatory full backfill
    estimates = [_plan(Budget(images=b)).expected_top1 for b in range(5_000, 80_001, 5_000)]
    assert all(b >= a - 1e-9 for a, b in zip(estimates, estimates[1:], strict=False))
    assert estimates[-1] > estimates[0]


def test_shards_without_uncertainty_share_a_uniform_fraction():
    facts = [_shard(i, rows=1_000 * (i + 1), uncertainty=[]) for i in range(4)]
    plan = _plan(Budget(images=3_000), facts)
    assert [s.method for s in plan.shards] == ["partial"] * 4
    assert [s.reembed_rows for s in plan.shards] == [300, 600, 900, 1_200]
    assert "seeded random order" in plan.shard(0).reason
    assert plan.expected_top1 == pytest.approx(60.0 + 0.3 * 20.0)


def test_json_round_trip_and_table():
    plan = _plan(Budget(images=20_000))
    back = Plan.from_json(plan.to_json())
    assert back == plan
    console = Console(record=True, width=250)
    console.print(plan_table(plan))
    text = console.export_text()
    for word in ("transform", "partial", "full", "gone", "images unavailable", "by uncertainty"):
        assert word in text
    assert "re-embed 20,000 of 80,000 images (25%)" in text
    assert "budget 20,000 images" in text
    summary = plan.summary()
    assert "\n" not in summary
    assert "re-embed 20,000 of 80,000" in summary


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        ([], "no shards"),
        ([_shard(3, rows=-1)], "shard 3: negative rows"),
        ([_shard(4, native_rows=11_000)], "shard 4: native_rows"),
        ([_shard(5, uncertainty=[0.0, -1.0, 1.0])], "shard 5: uncertainty quantiles"),
        ([_shard(6), _shard(6)], "shard 6: listed twice"),
    ],
)
def test_bad_facts_raise(facts, message):
    with pytest.raises(PlanError, match=message):
        make_plan(facts, "v2", CURVE, Budget(images=10))


def test_negative_budget_raises():
    with pytest.raises(PlanError, match="budget images"):
        make_plan([_shard(0)], "v2", CURVE, Budget(images=-1))


def test_plan_record_round_trips_its_work_and_reads_an_older_record():
    facts = [_shard(0, chain="side", source_uri="s/0.parquet", image_file="i/0.parquet")]
    plan = _plan(Budget(images=2_000), facts)
    record = json.loads(plan.to_json())
    assert plan_of(record) == plan and plan.shards[0].chain == "side"
    # Written before the plan carried each shard's source and chain: they sat under "_work".
    for s in record["shards"]:
        for k in ("chain", "source_uri", "image_file"):
            s.pop(k)
    record["_work"] = [
        {"shard_id": 0, "chain": "side", "source_uri": "s/0.parquet", "image_file": "i/0.parquet"}
    ]
    assert plan_of(record) == plan


def _pc(**kw) -> PlanConfig:
    return PlanConfig(**kw)


def test_prices_come_from_the_upgrades_own_models_before_the_old_models_ingest() -> None:
    facts = [_shard(i) for i in range(4)]
    measured = MeasuredRates(embed_images_per_second=120.0, transform_rows_per_second=9_000.0)
    budget, notes = price_budget(_pc(), facts, "v1", 800.0, measured)
    assert budget.embed_rows_per_second == 120.0  # the new model, not v1's ingest rate
    assert budget.transform_rows_per_second == 9_000.0 and budget.transform_pays
    assert budget.images == 10_000 and notes == []  # 25% of 40k rows
    assert measured.transform_speedup == pytest.approx(75.0)
    # configured rates still win over measured ones
    set_rates = _pc(embed_rows_per_second=50.0, transform_rows_per_second=5_000.0)
    budget, _ = price_budget(set_rates, facts, "v1", 800.0, measured)
    assert (budget.embed_rows_per_second, budget.transform_rows_per_second) == (50.0, 5_000.0)


def test_a_transformation_as_slow_as_the_new_model_is_replaced_by_a_full_backfill() -> None:
    # A 1,280-d h at FCT's width: ~1 GFLOP a row, about what re-embedding costs.
    facts = [_shard(0), _shard(1), _shard(2, images_available=False)]
    measured = MeasuredRates(embed_images_per_second=100.0, transform_rows_per_second=150.0)
    budget, notes = price_budget(_pc(), facts, "v1", None, measured)
    assert not budget.transform_pays and budget.images is None
    assert "not 2× cheaper (plan.min_transform_speedup)" in notes[0]
    plan = make_plan(facts, "v2", CURVE, budget, PlanRules())
    assert [s.method for s in plan.shards] == ["full", "full", "transform"]
    assert "h costs about as much as the new model" in plan.shards[0].reason
    assert plan.reembed_rows == 20_000


def test_an_unlabelled_curve_plans_in_recall_and_says_so() -> None:
    curves = {"uncertainty": {"fractions": [0.0, 0.5, 1.0], "recall": [70.0, 92.0, 100.0]}}
    curve = QualityCurve.from_report(curves, key="recall", measure="R@10")
    plan = make_plan([_shard(0), _shard(1)], "v2", curve, Budget(images=5_000), PlanRules())
    assert plan.measure == "R@10" and plan.transform_top1 == 70.0 and plan.full_top1 == 100.0
    assert "R@10" in plan.summary()
    out = Console(width=200, record=True)
    out.print(plan_table(plan))
    text = out.export_text()
    assert "+R@10" in text and "expected R@10" in text


def test_rows_past_the_chain_limit_are_reembedded_whatever_the_budget():
    """Rows a second map would take past plan.max_chain_length are re-embedded on top of
    what the budget buys; more of them than the budget allows is refused, naming the rule."""
    rules = PlanRules(max_chain_length=1)
    hops = {1: 8_000, 2: 2_000}
    facts = [_shard(0, forced_rows=2_000, hops=hops), _shard(1), _shard(2, forced_rows=10_000)]
    plan = _plan(Budget(images=13_000), facts, rules)
    s0, s1, s2 = plan.shards
    assert s0.method == "partial" and s0.reembed_rows >= 2_000
    assert "2,000 rows past plan.max_chain_length=1 maps re-embedded first" in s0.reason
    assert s2.method == "full" and s2.reembed_rows == 10_000
    assert plan.reembed_rows <= 13_000 and plan.forced_rows == 12_000
    assert plan.hops == {"1": 8_000, "2": 2_000}
    assert "past plan.max_chain_length" in plan_table_text(plan)
    with pytest.raises(PlanError, match=r"12,000 rows in shards 0, 2 would go through more than"):
        _plan(Budget(images=11_000), facts, rules)
    gone = [_shard(0, forced_rows=500, images_available=False)]
    plan = _plan(Budget(images=0), gone, rules)
    assert plan.shards[0].method == "transform" and "their images are gone" in plan.warnings[0]


def plan_table_text(plan: Plan) -> str:
    console = Console(width=200, record=True)
    console.print(plan_table(plan))
    return console.export_text()
