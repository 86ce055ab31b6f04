"""Backfill orderings: literal expected permutations, ties and input errors."""

import numpy as np
import pytest
import torch

from pipeline.compat.orderings import ORDERINGS, backfill_order


def test_uncertainty_is_descending_with_ties_by_index() -> None:
    u = np.array([0.1, 0.5, 0.3, 0.5, 0.0])
    order = backfill_order("uncertainty", 5, uncertainty=u)
    assert order.tolist() == [1, 3, 2, 0, 4]
    assert order.dtype == np.int64


def test_uncertainty_accepts_torch_column() -> None:
    u = torch.tensor([[2.0], [-1.0], [2.0], [3.0]])
    assert backfill_order("uncertainty", 4, uncertainty=u).tolist() == [3, 0, 2, 1]


def test_oracle_l2_descending_with_ties_by_index() -> None:
    new = np.zeros((5, 2))
    # l2 distances to the origin: 1, 3, 3, 0, 2.
    transformed = np.array([[1.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 0.0], [0.0, -2.0]])
    order = backfill_order("oracle", 5, transformed=transformed, new=new)
    assert order.tolist() == [1, 2, 4, 0, 3]


def test_oracle_cosine_ignores_norms() -> None:
    new = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # Cosine distances: 0 (same direction, longer), 1 (orthogonal), 2 (opposite), 1 (orthogonal).
    transformed = torch.tensor([[5.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -3.0]])
    order = backfill_order("oracle", 4, transformed=transformed, new=new, metric="cosine")
    assert order.tolist() == [2, 1, 3, 0]
    # Under l2 the long same-direction vector (distance 4) comes first instead.
    assert backfill_order("oracle", 4, transformed=transformed, new=new).tolist() == [0, 3, 2, 1]


def test_random_is_a_seeded_permutation() -> None:
    a = backfill_order("random", 6, seed=3)
    assert sorted(a.tolist()) == [0, 1, 2, 3, 4, 5]
    assert a.tolist() == backfill_order("random", 6, seed=3).tolist()
    assert a.tolist() == np.random.default_rng(3).permutation(6).tolist()
    assert a.dtype == np.int64


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="random.*uncertainty.*oracle"):
        backfill_order("greedy", 3)
    with pytest.raises(ValueError, match="needs uncertainty"):
        backfill_order("uncertainty", 3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        backfill_order("uncertainty", 3, uncertainty=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        backfill_order("uncertainty", 2, uncertainty=[1.0, float("nan")])
    with pytest.raises(ValueError, match="needs both"):
        backfill_order("oracle", 2, new=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="equal shape"):
        backfill_order("oracle", 2, transformed=np.zeros((2, 2)), new=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="expected n=3"):
        backfill_order("oracle", 3, transformed=np.zeros((2, 2)), new=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="unknown metric"):
        backfill_order("oracle", 2, transformed=np.zeros((2, 2)), new=np.zeros((2, 2)), metric="l1")
    assert ORDERINGS == ("random", "uncertainty", "oracle")
