"""The search service's logic without Ray: a Searcher's answers, the swap when CURRENT moves,
labels read from image shards, and the refusals before any Serve starts."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.config import ConfigError, IndexConfig, load_config
from pipeline.context import Context
from pipeline.gallery.index import build_index
from pipeline.serve import run
from pipeline.serve.searcher import (
    Hit,
    LiveSearcher,
    ModelUnavailable,
    Searcher,
    SearchResult,
    UnknownKey,
    key_labels,
)
from pipeline.services.search import QueryError

KEYS = np.array([f"img/{i:03d}" for i in range(40)], dtype=object)


def _searcher(tmp_path: Path, kind: str = "flat", labels: np.ndarray | None = None) -> Searcher:
    vecs = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    idx = build_index([(KEYS, vecs)], 8, IndexConfig(kind=kind))
    ctx = Context(load_config(None, [f"workdir={tmp_path}"]))
    row_of = {k: i for i, k in enumerate(idx.keys)}
    return Searcher(ctx, "v1", idx, row_of, labels, None, "no model here")


def test_vector_query_finds_the_row_itself_first_with_its_label(tmp_path: Path) -> None:
    s = _searcher(tmp_path, labels=np.where(np.arange(40) % 2 == 0, np.arange(40) % 5, -1))
    v = s.index.index.reconstruct(6)
    res = s.by_vector(v, 3)
    assert [h.key for h in res.hits][0] == "img/006" and len(res.hits) == 3
    assert res.hits[0].label == 1 and res.hits[0].score == pytest.approx(1.0, abs=1e-5)
    out = res.to_json()
    assert out["version"] == "v1" and out["hits"][0] == {
        "key": "img/006",
        "score": pytest.approx(1.0, abs=1e-5),
        "version": "v1",
        "label": 1,
    }
    odd = next(h for h in out["hits"] if int(h["key"][-3:]) % 2)
    assert "label" not in odd  # an unlabelled row has no label key, not a null


def test_key_query_leaves_the_key_out_and_matches_a_vector_query(tmp_path: Path) -> None:
    s = _searcher(tmp_path)
    by_key = s.by_key("img/010", 5)
    by_vec = s.by_vector(s.index.index.reconstruct(10), 6)
    assert "img/010" not in [h.key for h in by_key.hits] and len(by_key.hits) == 5
    assert [h.key for h in by_key.hits] == [h.key for h in by_vec.hits][1:]
    with pytest.raises(UnknownKey, match="'nope' is not in version v1"):
        s.by_key("nope", 5)


def test_key_query_on_an_ivf_index_reads_rows_back(tmp_path: Path) -> None:
    vecs = np.random.default_rng(1).normal(size=(400, 8)).astype(np.float32)
    keys = np.array([f"k{i}" for i in range(400)], dtype=object)
    idx = build_index([(keys, vecs)], 8, IndexConfig(kind="ivf"))
    faiss.extract_index_ivf(idx.index).make_direct_map()
    s = Searcher(None, "v1", idx, {k: i for i, k in enumerate(keys)}, None, None)
    assert np.allclose(s._stored("k7"), vecs[7] / np.linalg.norm(vecs[7]), atol=1e-5)


def test_bad_queries_are_the_callers_mistake(tmp_path: Path) -> None:
    s = _searcher(tmp_path)
    with pytest.raises(QueryError, match="3 values; version v1 holds 8-d"):
        s.by_vector([1.0, 2.0, 3.0], 5)
    with pytest.raises(QueryError, match="NaN"):
        s.by_vector([float("nan")] * 8, 5)
    with pytest.raises(ModelUnavailable, match="no model here"):
        s.by_image(b"\x89PNG", 5)


@dataclass
class _Fake:
    version: str

    def info(self) -> dict:
        return {"version": self.version}


def test_live_searcher_swaps_only_after_the_new_version_loaded() -> None:
    current = ["v1"]
    loading, release = threading.Event(), threading.Event()

    def load(v: str) -> _Fake:
        if v == "v2":
            loading.set()
            assert release.wait(10)
        return _Fake(v)

    live = LiveSearcher(load, lambda: current[0])
    assert live.searcher.version == "v1" and not live.refresh()
    current[0] = "v2"
    t = threading.Thread(target=live.refresh)
    t.start()
    assert loading.wait(10)
    assert live.searcher.version == "v1"  # requests during the load: the old version
    release.set()
    t.join(10)
    assert live.searcher.version == "v2" and live.swaps == 1
    assert live.info() == {"version": "v2", "swaps": 1, "last_error": None}


def test_a_version_that_fails_to_load_leaves_the_old_one_serving() -> None:
    current, calls = ["v1"], []

    def load(v: str) -> _Fake:
        calls.append(v)
        if v == "bad":
            raise FileNotFoundError("no complete index at .../bad/index")
        return _Fake(v)

    live = LiveSearcher(load, lambda: current[0], retry_seconds=3600)
    current[0] = "bad"
    assert not live.refresh() and not live.refresh()  # the second is not retried yet
    assert calls == ["v1", "bad"] and live.searcher.version == "v1"
    assert "no complete index" in live.last_error
    current[0] = "v1"  # rolled back: nothing to load, still v1
    assert not live.refresh() and live.searcher.version == "v1"


def test_no_serving_version_is_refused() -> None:
    with pytest.raises(QueryError, match="no serving version"):
        LiveSearcher(_Fake, lambda: None)


def test_labels_come_from_the_image_shards(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    t = pa.table({"key": ["b", "a", "c"], "label": pa.array([1, 0, None], pa.int64())})
    pq.write_table(t, images / "shard-00000.parquet")
    ctx = Context(load_config(None, [f"workdir={tmp_path}", f"images={images}"]))
    got = key_labels(ctx, np.array(["a", "c", "zz", "b"], dtype=object))
    assert got.tolist() == [0, -1, -1, 1]
    assert key_labels(Context(load_config(None, [f"images={tmp_path / 'none'}"])), KEYS) is None


def test_a_running_serve_is_refused_not_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    actors = [{"name": "SERVE_CONTROLLER_ACTOR", "namespace": "serve"}]
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces: actors)
    with pytest.raises(run.ServeConflict, match="Ray Serve already runs"):
        run.check_no_serve()
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces: [])
    run.check_no_serve()


def test_a_port_in_use_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match=f"serve.port {s.getsockname()[1]} .* not free"):
            run.check_port_free("127.0.0.1", s.getsockname()[1])


def test_result_json_keeps_hits_in_rank_order() -> None:
    r = SearchResult("v2", "l2", [Hit("a", 0.1), Hit("b", 0.5, 3)], adapter="procrustes")
    assert r.to_json() == {
        "version": "v2",
        "metric": "l2",
        "adapter": "procrustes",
        "hits": [
            {"key": "a", "score": 0.1, "version": "v2"},
            {"key": "b", "score": 0.5, "version": "v2", "label": 3},
        ],
    }
