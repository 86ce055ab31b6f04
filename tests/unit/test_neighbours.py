"""Label-free quality: recall@k of a gallery against the new model's own neighbourhoods."""

import numpy as np
import pytest

from pipeline.evaluate.neighbours import mixed_recall_curve, nearest, neighbour_recall, overlap


def _points(n: int = 60, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _brute(x: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = -(xn @ xn.T)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nearest_leaves_the_query_out_and_matches_brute_force(metric: str) -> None:
    x = _points()
    got = nearest(x, x, 5, metric)
    assert got.shape == (60, 5) and not (got == np.arange(60)[:, None]).any()
    if metric == "cosine":
        assert (np.sort(got, 1) == np.sort(_brute(x, 5), 1)).all()
    else:
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        assert (np.sort(got, 1) == np.sort(np.argsort(d, 1)[:, :5], 1)).all()


def test_recall_is_100_for_the_reference_itself_and_drops_with_noise() -> None:
    new = _points()
    ref = nearest(new, new, 10, "cosine")
    assert neighbour_recall(new, new, ref, "cosine") == 100.0
    rng = np.random.default_rng(1)
    close = new + 0.1 * rng.normal(size=new.shape).astype(np.float32)
    far = rng.normal(size=new.shape).astype(np.float32)
    r_close = neighbour_recall(new, close, ref, "cosine")
    r_far = neighbour_recall(new, far, ref, "cosine")
    assert 100.0 > r_close > r_far and r_far < 40.0


def test_overlap_counts_shared_neighbours_per_query() -> None:
    ref = np.array([[1, 2, 3, 4], [0, 2, 3, 4]])
    found = np.array([[4, 3, 9, 8], [0, 2, 3, 4]])
    assert overlap(found, ref).tolist() == [0.5, 1.0]


def test_mixed_curve_runs_from_the_transformed_gallery_to_the_new_one() -> None:
    new = _points()
    transformed = new + 0.5 * np.random.default_rng(2).normal(size=new.shape).astype(np.float32)
    ref = nearest(new, new, 10, "cosine")
    order = np.random.default_rng(3).permutation(60)
    curve = mixed_recall_curve(transformed, new, new, ref, order, "cosine", 6)
    assert len(curve) == 7 and curve[-1] == 100.0
    assert curve[0] == pytest.approx(neighbour_recall(new, transformed, ref, "cosine"))
    # Re-embedding the worst-transformed rows first climbs faster than a random order.
    err = ((transformed - new) ** 2).sum(1)
    worst_first = mixed_recall_curve(transformed, new, new, ref, np.argsort(-err), "cosine", 6)
    assert np.mean(worst_first) > np.mean(curve)


def test_k_must_leave_a_neighbour_to_find() -> None:
    x = _points(5)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        nearest(x, x, 5, "cosine")
