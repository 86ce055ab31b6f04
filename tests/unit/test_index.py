"""faiss gallery index: exact flat search, IVF recall, save/load round trip, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.config import IndexConfig
from pipeline.gallery.index import GalleryIndex, build_index


def _batches(keys, vecs, size):
    return [(keys[i : i + size], vecs[i : i + size]) for i in range(0, len(vecs), size)]


def _brute_force(g, q, metric, k):
    if metric == "cosine":
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        return np.argsort(-(qn @ gn.T), axis=1, kind="stable")[:, :k]
    d = (q**2).sum(1)[:, None] + (g**2).sum(1)[None, :] - 2 * q @ g.T
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def _clustered(n, d, centers, seed):
    # Centres depend only on (centers, d): queries and gallery share clusters, not points.
    c = np.random.default_rng(centers * 1000 + d).normal(size=(centers, d)).astype(np.float32) * 4
    rng = np.random.default_rng(seed)
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_index_returns_exact_neighbours(metric):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(20, 16)).astype(np.float32)
    keys = np.array([f"img/{i:05d}.png" for i in range(500)], dtype=object)
    batches = _batches(keys, g, 64)
    batches.insert(2, (keys[:0], g[:0]))  # an empty batch is skipped, not an error
    idx = build_index(batches, 16, IndexConfig(metric=metric))
    assert idx.kind == "flat" and idx.rows == 500
    scores, got = idx.search(q, 5)
    want = _brute_force(g, q, metric, 5)
    np.testing.assert_array_equal(got, keys[want])
    if metric == "l2":
        np.testing.assert_allclose(scores, ((q[:, None] - g[want]) ** 2).sum(-1), rtol=1e-4)
    else:
        assert np.all(np.diff(scores, axis=1) <= 1e-6) and np.all(scores <= 1.0 + 1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ivf_recall_at_10_on_clustered_vectors(metric):
    n, d = 20_000, 32
    g = _clustered(n, d, centers=200, seed=1)
    q = _clustered(200, d, centers=200, seed=99)
    keys = np.array([f"k{i}" for i in range(n)], dtype=object)
    start = time.perf_counter()
    # flat_max_rows below n and no total_rows: auto must buffer, then pick IVF.
    cfg = IndexConfig(metric=metric, kind="auto", flat_max_rows=5_000)
    idx = build_index(_batches(keys, g, 4096), d, cfg)
    _, got = idx.search(q, 10)
    elapsed = time.perf_counter() - start
    want = keys[_brute_force(g, q, metric, 10)]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want, strict=True)])
    assert idx.kind == "ivf" and idx.nprobe is not None and idx.rows == n
    assert recall >= 0.9, f"recall@10 {recall:.3f} with nprobe {idx.nprobe}"
    assert elapsed < 10.0


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    g = _clustered(3_000, 8, centers=20, seed=2)
    keys = np.array([f"s3://b/ü nicode/{i}?x=1#frag" for i in range(3_000)], dtype=object)
    idx = build_index(_batches(keys, g, 1000), 8, IndexConfig(kind=kind), total_rows=3_000)
    uri = str(tmp_path / "versions" / "v2" / "index")
    idx.save(uri)
    back = GalleryIndex.load(uri)
    q = g[:50] + 0.05
    s1, k1 = idx.search(q, 7)
    s2, k2 = back.search(q, 7)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(s1, s2)
    assert back.info() == idx.info()
    assert (back.kind, back.metric, back.dim, back.rows) == (kind, "cosine", 8, 3_000)
    assert list(back.keys[:2]) == ["s3://b/ü nicode/0?x=1#frag", "s3://b/ü nicode/1?x=1#frag"]


@pytest.mark.parametrize("kind", ["auto", "flat", "ivf"])
def test_empty_gallery_raises(kind):
    empty = [(np.array([], dtype=object), np.zeros((0, 4), np.float32))]
    with pytest.raises(ValueError, match="empty gallery"):
        build_index(empty, 4, IndexConfig(kind=kind))
    with pytest.raises(ValueError, match="empty gallery"):
        build_index([], 4, IndexConfig(kind=kind), total_rows=0)


def test_dimension_and_key_errors():
    g = np.eye(4, dtype=np.float32)
    keys = np.array(["a", "b", "c", "d"], dtype=object)
    idx = build_index([(keys, g)], 4, IndexConfig(metric="l2"))
    with pytest.raises(ValueError, match="query dim 3 does not match index dim 4"):
        idx.search(np.ones((2, 3), np.float32), 1)
    with pytest.raises(ValueError, match=r"expected \(n, 5\)"):
        build_index([(keys, g)], 5, IndexConfig())
    with pytest.raises(ValueError, match="unique"):
        build_index([(keys, g), (keys, g)], 4, IndexConfig())
    with pytest.raises(ValueError, match="string"):
        build_index([(np.arange(4), g)], 4, IndexConfig())
    _, got = idx.search(g[[2]], 10)  # k above the index size is capped, not padded
    assert got.shape == (1, 4) and got[0, 0] == "c"


def test_load_missing_index_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        GalleryIndex.load(str(tmp_path / "nothing"))
