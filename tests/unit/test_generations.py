"""Generations: rows' chains and accumulated uncertainty, and the choice between composing
the registered maps and a direct map from the serving space."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pipeline.evaluate.study import StudyInputs, choose_chain
from pipeline.upgrade.hops import accumulated, extended, stored_chains


class _Matrix(nn.Module):
    """A linear map h(x) = x @ w with no uncertainty head (the study's transformation API)."""

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = torch.from_numpy(w.astype(np.float32))
        self.new_dim = w.shape[1]

    def forward(self, x: torch.Tensor, side: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return x @ self.w, None


def _inputs() -> StudyInputs:
    """30 rows of 3 classes: the new space, the serving space (a rotation of it) and the
    old model's space reached by composing (a scramble of the rows: useless)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    new = (np.eye(3)[labels] * 5 + rng.normal(0, 0.3, (30, 3))).astype(np.float32)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    sets = {"new": new, "old": new[rng.permutation(30)], "v1": new @ rot.T}
    inp = StudyInputs(labels=labels, sets=sets, old="old", new="new")
    inp.transformations = {"fct": (_Matrix(np.eye(3)), {}), "fct-direct": (_Matrix(rot), {})}
    inp.inputs["fct-direct"] = "v1"
    return inp


def test_the_better_way_wins_and_a_tie_goes_to_the_single_map() -> None:
    inp = _inputs()
    c = choose_chain(inp, "fct", "fct-direct", "cosine", 5, 0.5)
    assert c.chosen == "fct-direct" and c.measure == "top-1"
    assert c.quality["fct-direct"] == 100.0 and c.quality["fct"] < 60.0
    # composing better by more than min_gain: compose; within it: the one map
    inp.transformations["fct"], inp.transformations["fct-direct"] = (
        inp.transformations["fct-direct"],
        (_Matrix(np.eye(3)), {}),
    )
    inp.inputs = {"fct": "v1", "fct-direct": "old"}
    assert choose_chain(inp, "fct", "fct-direct", "cosine", 5, 0.5).chosen == "fct"
    assert choose_chain(inp, "fct", "fct-direct", "cosine", 5, 100.0).chosen == "fct-direct"
    unlabelled = choose_chain(_unlabelled(), "fct", "fct-direct", "cosine", 5, 0.5)
    assert unlabelled.measure == "R@5" and unlabelled.chosen == "fct-direct"


def _unlabelled() -> StudyInputs:
    inp = _inputs()
    inp.labels = None
    return inp


def test_chains_derive_from_older_records_and_grow_by_each_map() -> None:
    b = pa.record_batch(
        {"key": ["a", "b", "c"], "source": ["embed:v1", "transform:v0->v1", "backfill:v1"]}
    )
    chain, hops = stored_chains(b, "v1")
    assert chain.tolist() == ["v1", "v0>v1", "v1"] and hops.tolist() == [0, 1, 0]
    assert extended(chain, ["v2", "v3"]).tolist() == ["v1>v2>v3", "v0>v1>v2>v3", "v1>v2>v3"]
    assert stored_chains(pa.record_batch({"key": ["a"]}), "v9")[0].tolist() == ["v9"]


def test_uncertainty_adds_up_in_variance() -> None:
    prior = np.array([np.nan, 0.0, np.inf], np.float32)
    step = np.array([1.0, 0.0, 0.0], np.float32)
    np.testing.assert_allclose(accumulated(prior, step), [1.0, np.log(2.0), np.inf], rtol=1e-6)
    assert accumulated(prior, None) is prior and accumulated(None, step) is step
