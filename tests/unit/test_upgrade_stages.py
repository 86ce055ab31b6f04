"""Upgrade stages as plain callables (no Ray, no MLflow): chain search, the stage graph with
resume, transformation chains, and the per-shard facts / executor over a tiny local gallery."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save

from pipeline.config import ArchitectureConfig, EmbedConfig, ModelConfig, PreprocessConfig
from pipeline.data.decode import decode_batch
from pipeline.data.prepare import encode_png
from pipeline.embed.transform import ChainSpec, TransformChain, chain_spec
from pipeline.gallery.store import (
    Gallery,
    arrow_to_embeddings,
    embedding_schema,
    embeddings_to_arrow,
)
from pipeline.graph.dag import GraphError, Stage, StageLog, StageRun, check_order, run_stages
from pipeline.io import uri as uri_io
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.compat import Transformation
from pipeline.models.store import (
    MODEL_FILE,
    WEIGHTS_FILE,
    ModelLoadError,
    build_model,
    embedder_meta,
    resolve_blob,
    save_model_dir,
)
from pipeline.upgrade.execute import ShardExecutor
from pipeline.upgrade.facts import FactsStage, find_chain, reembed_order, scan_shard
from pipeline.upgrade.hops import stored_chains
from pipeline.upgrade.work import ShardWork

# --------------------------------------------------------------------------- find_chain


def test_find_chain_same_space_is_empty_chain() -> None:
    assert find_chain([("v1", "v2", "h12")], "v1", "v1") == []
    assert find_chain([], "v3", "v3") == []


def test_find_chain_direct_edge() -> None:
    assert find_chain([("v0", "v1", "h01"), ("v1", "v2", "h12")], "v1", "v2") == ["h12"]


def test_find_chain_composes_two_steps() -> None:
    edges = [("v2", "v3", "h23"), ("v1", "v2", "h12")]
    assert find_chain(edges, "v1", "v3") == ["h12", "h23"]


def test_find_chain_prefers_shortest_path() -> None:
    # The long path is registered first; the direct edge still wins.
    edges = [("v1", "v2", "h12"), ("v2", "v3", "h23"), ("v3", "v4", "h34"), ("v1", "v4", "h14")]
    assert find_chain(edges, "v1", "v4") == ["h14"]
    # Among two-step paths, the first one registered wins.
    edges2 = [("v1", "a", "h1a"), ("v1", "b", "h1b"), ("b", "v3", "hb3"), ("a", "v3", "ha3")]
    assert find_chain(edges2, "v1", "v3") == ["h1a", "ha3"]
    assert find_chain([("v1", "v2", "first"), ("v1", "v2", "second")], "v1", "v2") == ["first"]


def test_find_chain_unreachable_is_none() -> None:
    assert find_chain([("v2", "v1", "h21")], "v1", "v2") is None  # edges are directed
    assert find_chain([], "v1", "v2") is None
    assert find_chain([("v1", "v2", "h12")], "v1", "v9") is None


def test_find_chain_cycles_terminate() -> None:
    edges = [("v1", "v2", "a"), ("v2", "v1", "b"), ("v2", "v2", "c"), ("v2", "v3", "d")]
    assert find_chain(edges, "v1", "v9") is None
    assert find_chain(edges, "v1", "v3") == ["a", "d"]
    assert find_chain(edges, "v2", "v1") == ["b"]


# --------------------------------------------------------------------------- stage graph


def test_check_order_rejects_later_missing_and_duplicate_stages() -> None:
    def noop(_: dict[str, Any], __: StageRun) -> None:
        return None

    check_order([Stage("a", noop), Stage("b", noop, needs=("a",))])
    with pytest.raises(GraphError, match=r"'a' needs \['b'\]"):
        check_order([Stage("a", noop, needs=("b",)), Stage("b", noop)])
    with pytest.raises(GraphError, match=r"'a' needs \['ghost'\]"):
        check_order([Stage("a", noop, needs=("ghost",))])
    with pytest.raises(GraphError, match="'a' appears twice"):
        check_order([Stage("a", noop), Stage("a", noop)])


class _Counter:
    """Stage functions that count their calls and record their inputs."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.inputs: dict[str, dict[str, Any]] = {}

    def stage(self, name: str, value: Any, **kw: Any) -> Stage:
        def run(inputs: dict[str, Any], _: StageRun) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.inputs[name] = inputs
            return value

        return Stage(name, run, **kw)


def _log(tmp_path: Path) -> StageLog:
    return StageLog(Gallery(str(tmp_path / "gallery")), "v2")


def _graph(c: _Counter) -> list[Stage]:
    return [
        c.stage("a", {"x": 1}),
        c.stage("check", "ok", remember=False),
        c.stage("b", [2, 3], needs=("a",)),
        c.stage("c", "done", needs=("a", "b")),
    ]


def test_run_stages_in_order_passes_needs_and_records(tmp_path: Path) -> None:
    c, log, events = _Counter(), _log(tmp_path), []
    out = run_stages(_graph(c), log, lambda n, e, s: events.append((n, e)))
    assert out == {"a": {"x": 1}, "check": "ok", "b": [2, 3], "c": "done"}
    assert c.inputs == {
        "a": {},
        "check": {},
        "b": {"a": {"x": 1}},
        "c": {"a": {"x": 1}, "b": [2, 3]},
    }
    assert events == [
        ("a", "start"),
        ("a", "done"),
        ("check", "start"),
        ("check", "done"),
        ("b", "start"),
        ("b", "done"),
        ("c", "start"),
        ("c", "done"),
    ]
    assert sorted(log.done()) == ["a", "b", "c"]  # remember=False leaves no record
    assert log.get("b")["output"] == [2, 3]
    assert log.get("b")["stage"] == "b"
    assert log.get("check") is None


def test_run_stages_resumes_from_log(tmp_path: Path) -> None:
    c, log = _Counter(), _log(tmp_path)
    first = run_stages(_graph(c), log)
    events: list[tuple[str, str]] = []
    second = run_stages(_graph(c), StageLog(log.g, "v2"), lambda n, e, s: events.append((n, e)))
    assert second == first
    assert c.calls == {"a": 1, "check": 2, "b": 1, "c": 1}
    assert events == [
        ("a", "resumed"),
        ("check", "start"),
        ("check", "done"),
        ("b", "resumed"),
        ("c", "resumed"),
    ]


def test_run_stages_until_stops_after_stage(tmp_path: Path) -> None:
    c, log = _Counter(), _log(tmp_path)
    out = run_stages(_graph(c), log, until="b")
    assert out == {"a": {"x": 1}, "check": "ok", "b": [2, 3]}
    assert c.calls == {"a": 1, "check": 1, "b": 1}
    assert sorted(log.done()) == ["a", "b"]
    # Continuing later runs only what is left.
    run_stages(_graph(c), log)
    assert c.calls == {"a": 1, "check": 2, "b": 1, "c": 1}


def test_run_stages_unknown_until_raises_before_running(tmp_path: Path) -> None:
    c, log = _Counter(), _log(tmp_path)
    with pytest.raises(GraphError, match="'nope': no such stage"):
        run_stages(_graph(c), log, until="nope")
    assert c.calls == {}
    assert log.done() == []


def test_failing_stage_leaves_no_record_and_reruns(tmp_path: Path) -> None:
    c, log = _Counter(), _log(tmp_path)
    fails = {"left": 1}

    def flaky(inputs: dict[str, Any], _: StageRun) -> str:
        c.calls["b"] = c.calls.get("b", 0) + 1
        if fails["left"]:
            fails["left"] -= 1
            raise RuntimeError("boom")
        return f"b after {inputs['a']}"

    graph = [c.stage("a", 7), Stage("b", flaky, needs=("a",)), c.stage("c", 9, needs=("b",))]
    with pytest.raises(RuntimeError, match="boom"):
        run_stages(graph, log)
    assert log.done() == ["a"]
    assert log.get("b") is None
    assert c.calls == {"a": 1, "b": 1}
    out = run_stages(graph, log)
    assert out == {"a": 7, "b": "b after 7", "c": 9}
    assert c.calls == {"a": 1, "b": 2, "c": 1}


# --------------------------------------------------------------------------- transformation chains


def _transformation(
    seed: int, old_dim: int = 4, new_dim: int = 3, side_dim: int = 2
) -> Transformation:
    torch.manual_seed(seed)
    t = Transformation(
        old_dim=old_dim, new_dim=new_dim, side_dim=side_dim, inner_dim=8, uncertainty=True
    )
    # Non-trivial running statistics, so eval mode (not batch statistics) is what is checked.
    for m in t.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return t.eval()


def _save_transformation(t: Transformation, d: Path, name: str = "h") -> Path:
    d.mkdir(parents=True)
    meta = {"kind": "transformation", "arch": t.config(), "name": name}
    (d / MODEL_FILE).write_text(json.dumps(meta))
    (d / WEIGHTS_FILE).write_bytes(save({k: v.contiguous() for k, v in t.state_dict().items()}))
    return d


def _forward(t: Transformation, old: np.ndarray, side: np.ndarray | None):
    with torch.inference_mode():
        p, lv = t(torch.from_numpy(old), None if side is None else torch.from_numpy(side))
    return p.numpy(), lv.numpy()


def _rand(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.normal(size=(n, d)).astype(np.float32)


def test_chain_spec_round_trip_matches_module_forward(tmp_path: Path) -> None:
    t = _transformation(0)
    spec = chain_spec([_save_transformation(t, tmp_path / "h")])
    assert spec.names == ["h"]
    assert spec.needs_side is True
    assert spec.new_dim == 3
    assert spec.label() == "h"
    rng = np.random.default_rng(0)
    old, side = _rand(rng, 6, 4), _rand(rng, 6, 2)
    pred, lv = TransformChain(spec)(old, side)
    ref_pred, ref_lv = _forward(t, old, side)
    assert pred.dtype == np.float32 and pred.shape == (6, 3)
    np.testing.assert_allclose(pred, ref_pred, rtol=1e-6, atol=1e-6)
    assert lv is not None
    np.testing.assert_allclose(lv, ref_lv, rtol=1e-6, atol=1e-6)
    assert np.ptp(lv) > 0  # rows differ in uncertainty


def test_empty_chain_is_identity() -> None:
    spec = ChainSpec()
    assert spec.label() == "identity"
    assert spec.new_dim is None
    assert spec.needs_side is False
    old = _rand(np.random.default_rng(1), 5, 3)
    pred, lv = TransformChain(spec)(old, None)
    np.testing.assert_array_equal(pred, old)
    assert lv is None


def test_two_step_chain_adds_variances(tmp_path: Path) -> None:
    t1, t2 = _transformation(1), _transformation(2, old_dim=3, new_dim=3, side_dim=0)
    spec = chain_spec(
        [_save_transformation(t1, tmp_path / "h1"), _save_transformation(t2, tmp_path / "h2")],
        names=["h12", "h23"],
    )
    assert spec.names == ["h12", "h23"]
    assert spec.label() == "h12 → h23"
    rng = np.random.default_rng(2)
    old, side = _rand(rng, 7, 4), _rand(rng, 7, 2)
    pred, lv = TransformChain(spec)(old, side)
    p1, lv1 = _forward(t1, old, side)
    p2, lv2 = _forward(t2, p1, None)
    np.testing.assert_allclose(pred, p2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lv, np.logaddexp(lv1, lv2), rtol=1e-5, atol=1e-6)
    assert np.all(lv > np.maximum(lv1, lv2))


def test_chain_dim_mismatch_raises(tmp_path: Path) -> None:
    d1 = _save_transformation(_transformation(1), tmp_path / "h1")  # 4 -> 3
    d2 = _save_transformation(_transformation(2, old_dim=5, side_dim=0), tmp_path / "h2")
    with pytest.raises(ModelLoadError, match="does not match the previous step"):
        chain_spec([d1, d2])


def test_chain_needing_side_info_without_it_raises(tmp_path: Path) -> None:
    spec = chain_spec([_save_transformation(_transformation(0), tmp_path / "h")])
    with pytest.raises(ValueError, match="needs side-info"):
        TransformChain(spec)(_rand(np.random.default_rng(0), 3, 4), None)


# --------------------------------------------------------------------------- shard stages

N_ROWS = 12
PRE = PreprocessConfig(input_size=8, channels=1)
ARCH = ArchitectureConfig(widths=[4, 8], embedding_dim=3, num_classes=3)


@dataclass
class World:
    g: Gallery
    blob: Any
    spec: ChainSpec
    keys: list[str]
    old: np.ndarray
    side: np.ndarray
    log_var: np.ndarray  # h's log-variance per row
    pred: np.ndarray  # h's prediction per row
    images: dict[str, bytes]  # good PNGs by key
    missing: str  # no image row for this key
    junk: str  # undecodable bytes for this key
    image_file: str

    def work(self, method: str, chain: str | None = "side", reembed: int = 0) -> ShardWork:
        return ShardWork(
            shard_id=0,
            source_version="v1",
            source_uri=self.g.shard_uri("v1", 0),
            image_file=self.image_file,
            space="v1",
            method=method,
            reembed_rows=reembed,
            chain=chain,
        )

    def run(self, w: ShardWork, chains: dict[str, ChainSpec] | None = None) -> dict:
        ex = ShardExecutor(
            self.g.uri,
            None,
            "v2",
            "v2",
            {"side": self.spec} if chains is None else chains,
            self.blob,
            EmbedConfig(batch_size=4),
            side_dim=2,
            retries=0,
        )
        out = ex({"work": np.array([json.dumps(w.to_dict())])})
        assert list(out) == ["record"] and len(out["record"]) == 1
        return json.loads(out["record"][0])

    def output(self) -> dict[str, dict[str, Any]]:
        t = uri_io.read_table(self.g.shard_uri("v2", 0))
        emb = arrow_to_embeddings(t["embedding"])
        cols = [t[c].to_pylist() for c in ("key", "source", "uncertainty", "side_info")]
        return {
            k: {"emb": emb[i], "source": s, "unc": u, "side": side}
            for i, (k, s, u, side) in enumerate(zip(*cols, strict=True))
        }

    def model_embedding(self, keys: list[str]) -> np.ndarray:
        dec = decode_batch(
            {"key": np.array(keys, object), "image": [self.images[k] for k in keys]},
            PRE,
            64_000_000,
        )
        assert (dec["error"] == "").all()
        with torch.inference_mode():
            x = torch.from_numpy(dec["pixels"]).view(-1, 1, 8, 8)
            return build_model(self.blob)(x).numpy()


def _side_table(uri: str) -> pa.Table:
    return uri_io.read_table(uri)


def _world(tmp_path: Path, with_side: bool = True) -> World:
    rng = np.random.default_rng(42)
    g = Gallery(str(tmp_path / "gallery"))
    torch.manual_seed(0)
    net = EmbeddingNet(ARCH, in_channels=1).eval()
    meta = embedder_meta(ModelConfig(name="v2", architecture=ARCH, preprocess=PRE))
    model_dir = save_model_dir(net, meta, tmp_path / "m")
    blob = resolve_blob(ModelConfig(name="v2", uri=str(model_dir)))
    t = _transformation(0)
    spec = chain_spec([_save_transformation(t, tmp_path / "h")])

    keys = [f"k{i:02d}" for i in range(N_ROWS)]
    old, side = _rand(rng, N_ROWS, 4), _rand(rng, N_ROWS, 2)
    cols = [pa.array(keys), embeddings_to_arrow(old), pa.array(["embed:v1"] * N_ROWS)]
    schema = embedding_schema(4, 2)
    if with_side:
        cols.append(embeddings_to_arrow(side))
    else:
        schema = embedding_schema(4)
    uri_io.write_table(pa.table(cols, schema=schema), g.shard_uri("v1", 0))
    pred, log_var = _forward(t, old, side)

    # The two most uncertain rows have a missing and an undecodable image.
    order = np.argsort(-log_var, kind="stable")
    missing, junk = keys[order[0]], keys[order[1]]
    images = {
        k: encode_png(rng.integers(0, 256, size=(8, 8), dtype=np.uint8))
        for k in keys
        if k not in (missing, junk)
    }
    img_keys = [k for k in keys if k != missing]
    image_file = str(tmp_path / "images" / "part-0.parquet")
    uri_io.write_table(
        pa.table(
            {
                "key": img_keys,
                "image": [images.get(k, b"junk") for k in img_keys],
                "label": [i % 3 for i in range(len(img_keys))],
                "split": ["gallery"] * len(img_keys),
            }
        ),
        image_file,
    )
    return World(g, blob, spec, keys, old, side, log_var, pred, images, missing, junk, image_file)


def test_world_is_what_the_tests_assume(tmp_path: Path) -> None:
    w = _world(tmp_path)
    assert w.blob.embedding_dim == 3 and w.blob.preprocess.input_size == 8
    assert len(np.unique(w.log_var)) == N_ROWS  # a strict uncertainty order
    assert len(w.images) == N_ROWS - 2


def test_transform_every_row(tmp_path: Path) -> None:
    w = _world(tmp_path)
    rec = w.run(w.work("transform"))
    out = w.output()
    assert list(out) == w.keys
    assert {r["source"] for r in out.values()} == {"transform:v1->v2"}
    for i, k in enumerate(w.keys):
        np.testing.assert_allclose(out[k]["emb"], w.pred[i], rtol=1e-5, atol=1e-6)
        assert out[k]["unc"] == pytest.approx(float(w.log_var[i]), rel=1e-5, abs=1e-6)
        assert out[k]["side"] == pytest.approx(w.side[i].tolist())
    assert rec["rows"] == N_ROWS and rec["rejected"] == 0 and rec["rows_in"] == N_ROWS
    assert rec["reembed_rows"] == 0 and rec["fallback_rows"] == 0
    assert rec["sources"] == {"transform:v1->v2": N_ROWS}
    assert rec["chain"] == "h" and rec["method"] == "transform"
    assert w.g.committed_shards("v2") == {0: rec}
    assert w.g.attempts("v2") == {0: 1}
    assert rec["checksum"] == w.g.file_checksum(w.g.shard_uri("v2", 0))
    assert not uri_io.exists(w.g.rejects_uri("v2", 0))
    assert not uri_io.exists(w.g.fallbacks_uri("v2", 0))


def test_partial_reembeds_most_uncertain_rows(tmp_path: Path) -> None:
    w = _world(tmp_path)
    rec = w.run(w.work("partial", reembed=4))
    out = w.output()
    top4 = [w.keys[i] for i in np.argsort(-w.log_var)[:4]]
    assert top4[:2] == [w.missing, w.junk]
    good = top4[2:]
    new = w.model_embedding(good)
    for j, k in enumerate(good):
        assert out[k]["source"] == "backfill:v2" and out[k]["unc"] is None
        np.testing.assert_allclose(out[k]["emb"], new[j], rtol=1e-5, atol=1e-6)
        assert not np.allclose(out[k]["emb"], w.pred[w.keys.index(k)])
    for i, k in enumerate(w.keys):
        if k not in good:
            assert out[k]["source"] == "transform:v1->v2"
            np.testing.assert_allclose(out[k]["emb"], w.pred[i], rtol=1e-5, atol=1e-6)
            assert out[k]["unc"] == pytest.approx(float(w.log_var[i]), rel=1e-5, abs=1e-6)
        assert out[k]["side"] == pytest.approx(w.side[i].tolist())
    fb = _side_table(w.g.fallbacks_uri("v2", 0)).to_pydict()
    reasons = dict(zip(fb["key"], fb["reason"], strict=True))
    assert sorted(reasons) == sorted([w.missing, w.junk])
    assert "no image for this key" in reasons[w.missing]
    assert "re-embed failed" in reasons[w.junk] and "cannot decode" in reasons[w.junk]
    assert rec["rows"] == N_ROWS and rec["rejected"] == 0
    assert rec["reembed_rows"] == 2 and rec["fallback_rows"] == 2
    assert rec["sources"] == {"backfill:v2": 2, "transform:v1->v2": N_ROWS - 2}
    assert not uri_io.exists(w.g.rejects_uri("v2", 0))


def test_full_reembeds_every_row_with_an_image(tmp_path: Path) -> None:
    w = _world(tmp_path)
    rec = w.run(w.work("full"))
    out = w.output()
    good = [k for k in w.keys if k in w.images]
    new = w.model_embedding(good)
    for j, k in enumerate(good):
        assert out[k]["source"] == "backfill:v2" and out[k]["unc"] is None
        np.testing.assert_allclose(out[k]["emb"], new[j], rtol=1e-5, atol=1e-6)
    for k in (w.missing, w.junk):
        i = w.keys.index(k)
        assert out[k]["source"] == "transform:v1->v2"
        np.testing.assert_allclose(out[k]["emb"], w.pred[i], rtol=1e-5, atol=1e-6)
    fb = _side_table(w.g.fallbacks_uri("v2", 0)).to_pydict()
    assert sorted(fb["key"]) == sorted([w.missing, w.junk])
    assert all(r for r in fb["reason"])
    assert rec["rows"] == N_ROWS and rec["rejected"] == 0
    assert rec["sources"] == {"backfill:v2": N_ROWS - 2, "transform:v1->v2": 2}


def test_full_without_transformation_rejects_rows_without_image(tmp_path: Path) -> None:
    w = _world(tmp_path)
    rec = w.run(w.work("full", chain=None))
    out = w.output()
    assert sorted(out) == sorted(w.images)
    assert {r["source"] for r in out.values()} == {"backfill:v2"}
    rej = _side_table(w.g.rejects_uri("v2", 0)).to_pydict()
    reasons = dict(zip(rej["key"], rej["reason"], strict=True))
    assert sorted(reasons) == sorted([w.missing, w.junk])
    assert "no image for this key" in reasons[w.missing]
    assert "re-embed failed" in reasons[w.junk]
    assert rec["rows"] == N_ROWS - 2 and rec["rejected"] == 2
    assert rec["rows"] + rec["rejected"] == N_ROWS
    assert rec["chain"] is None
    assert not uri_io.exists(w.g.fallbacks_uri("v2", 0))


def test_shard_without_side_info_and_no_chain_is_rejected(tmp_path: Path) -> None:
    w = _world(tmp_path, with_side=False)
    rec = w.run(w.work("transform", chain=None))
    assert rec["rows"] == 0 and rec["rejected"] == N_ROWS
    assert uri_io.read_table(w.g.shard_uri("v2", 0)).num_rows == 0
    rej = _side_table(w.g.rejects_uri("v2", 0)).to_pydict()
    assert rej["key"] == w.keys
    assert set(rej["reason"]) == {"no transformation applies and not re-embedded"}
    assert w.g.committed_shards("v2")[0]["rejected"] == N_ROWS


def test_facts_without_side_info_has_no_chain(tmp_path: Path) -> None:
    w = _world(tmp_path, with_side=False)
    facts = FactsStage({"side": w.spec}, None, "v2", 11).one(w.work("transform", chain=None))
    assert facts == {
        "shard_id": 0,
        "rows": N_ROWS,
        "native_rows": 0,
        "has_side_info": False,
        "chain": None,
        "uncertainty": [],
        "probe_ranks": {},
        "forced_rows": 0,
        "hops": {},
    }


def test_probe_ranks_name_exactly_the_rows_a_partial_backfill_reembeds(tmp_path: Path) -> None:
    w = _world(tmp_path)
    probe = w.keys[::2] + ["not-in-this-shard"]
    facts = FactsStage({"side": w.spec}, None, "v2", 11, probe).one(w.work("transform", None))
    ranks = facts["probe_ranks"]
    assert set(ranks) == set(w.keys[::2])  # every probe key of the shard, nothing else
    w.run(w.work("partial", reembed=6))
    chosen = {k for k, r in w.output().items() if r["source"] != "transform:v1->v2"}
    chosen |= set(_side_table(w.g.fallbacks_uri("v2", 0)).to_pydict()["key"])  # image failed
    # the simulation's rule (rank < reembed_rows) is the executor's choice, row for row
    assert {k for k, r in ranks.items() if r < 6} == chosen & set(ranks)
    assert sorted(ranks.values()) == sorted(set(ranks.values()))


def test_facts_with_side_info_uses_side_chain(tmp_path: Path) -> None:
    w = _world(tmp_path)
    stage = FactsStage({"side": w.spec}, None, "v2", 11)
    out = stage({"work": np.array([json.dumps(w.work("transform", chain=None).to_dict())])})
    facts = json.loads(out["record"][0])
    assert facts["chain"] == "side"
    assert facts["rows"] == N_ROWS and facts["native_rows"] == 0
    assert facts["has_side_info"] is True
    q = np.array(facts["uncertainty"])
    assert q.shape == (11,)
    assert np.all(np.diff(q) >= 0)
    ref = np.quantile(w.log_var, np.linspace(0, 1, 11))
    np.testing.assert_allclose(q, ref, rtol=1e-5, atol=1e-5)


def _v2_shard(w: World, uncertainty: list[float | None]) -> str:
    """A v2-space shard: first half backfilled (native), second half transformed."""
    half = N_ROWS // 2
    sources = ["backfill:v2"] * half + ["transform:v1->v2"] * (N_ROWS - half)
    t = pa.table(
        [
            pa.array(w.keys),
            embeddings_to_arrow(w.pred),
            pa.array(sources),
            embeddings_to_arrow(w.side),
            pa.array(uncertainty, pa.float32()),
        ],
        schema=embedding_schema(3, 2, uncertainty=True),
    )
    uri = w.g.shard_uri("v2a", 0)
    uri_io.write_table(t, uri)
    return uri


def _identity_work(w: World, uri: str) -> ShardWork:
    return replace(w.work("transform", chain="identity"), source_uri=uri, space="v2")


def test_facts_identity_chain_counts_native_rows(tmp_path: Path) -> None:
    w = _world(tmp_path)
    half = N_ROWS // 2
    lv = [None] * half + [float(x) for x in w.log_var[half:]]
    uri = _v2_shard(w, lv)
    facts = FactsStage({"identity": ChainSpec()}, None, "v2", 11).one(_identity_work(w, uri))
    assert facts["chain"] == "identity"
    assert facts["rows"] == N_ROWS and facts["native_rows"] == half
    ref = np.quantile(w.log_var[half:], np.linspace(0, 1, 11))
    np.testing.assert_allclose(facts["uncertainty"], ref, rtol=1e-5, atol=1e-5)


def test_identity_transform_keeps_rows(tmp_path: Path) -> None:
    w = _world(tmp_path)
    half = N_ROWS // 2
    lv = [None] * half + [float(x) for x in w.log_var[half:]]
    uri = _v2_shard(w, lv)
    rec = w.run(_identity_work(w, uri), chains={"identity": ChainSpec()})
    out = w.output()
    for i, k in enumerate(w.keys):
        np.testing.assert_array_equal(out[k]["emb"], w.pred[i])
        assert out[k]["source"] == ("backfill:v2" if i < half else "transform:v1->v2")
        assert out[k]["unc"] == (None if i < half else pytest.approx(float(w.log_var[i])))
    assert rec["rows"] == N_ROWS and rec["chain"] == "identity"
    assert rec["sources"] == {"backfill:v2": half, "transform:v1->v2": N_ROWS - half}


def test_facts_identity_without_stored_uncertainty_reports_none(tmp_path: Path) -> None:
    w = _world(tmp_path)
    uri = _v2_shard(w, [None] * N_ROWS)  # transformed by an h without an uncertainty head
    facts = FactsStage({"identity": ChainSpec()}, None, "v2", 11).one(_identity_work(w, uri))
    assert facts["native_rows"] == N_ROWS // 2
    # no stored uncertainty: no order, which the planner treats as a uniform share
    assert facts["uncertainty"] == []


# --------------------------------------------------------------------------- h without uncertainty


def _fct_spec(tmp_path: Path, side_dim: int = 2, name: str = "fct") -> tuple[Transformation, Any]:
    """A transformation trained with loss=fct: no uncertainty head (a TorchScript new model)."""
    torch.manual_seed(3)
    t = Transformation(old_dim=4, new_dim=3, side_dim=side_dim, inner_dim=8).eval()
    return t, chain_spec([_save_transformation(t, tmp_path / name, name)])


def test_facts_accept_a_transformation_without_uncertainty(tmp_path: Path) -> None:
    w = _world(tmp_path)
    _, spec = _fct_spec(tmp_path)
    assert spec.needs_side and spec.metas[0]["arch"]["uncertainty"] is False
    probe = list(w.keys)
    facts = FactsStage({"side": spec}, None, "v2", 11, probe).one(w.work("transform", None))
    # found and used for transform; no uncertainty quantiles: the planner's seeded random order
    assert facts["chain"] == "side" and facts["uncertainty"] == []
    assert facts["rows"] == N_ROWS and facts["has_side_info"] is True
    assert sorted(facts["probe_ranks"].values()) == list(range(N_ROWS))
    # a shard without side-info takes the side-info-free h, also without uncertainty
    bare = _world(tmp_path / "bare", with_side=False)
    _, noside = _fct_spec(tmp_path, side_dim=0, name="fct-noside")
    chains = {"side": spec, "noside": noside}
    assert FactsStage(chains, None, "v2", 11).one(bare.work("transform", None))["chain"] == "noside"
    # only a side-info h and no side-info: nothing applies
    alone = FactsStage({"side": spec}, None, "v2", 11).one(bare.work("transform", None))
    assert alone["chain"] is None


def test_partial_with_an_fct_transformation_reembeds_the_probe_prefix(tmp_path: Path) -> None:
    w = _world(tmp_path)
    t, spec = _fct_spec(tmp_path)
    facts = FactsStage({"side": spec}, None, "v2", 11, list(w.keys)).one(w.work("transform", None))
    ranks = facts["probe_ranks"]
    rec = w.run(w.work("partial", reembed=5), chains={"side": spec})
    out = w.output()
    chosen = {k for k, r in out.items() if r["source"] == "backfill:v2"}
    if uri_io.exists(w.g.fallbacks_uri("v2", 0)):  # a chosen row whose image failed
        chosen |= set(_side_table(w.g.fallbacks_uri("v2", 0)).to_pydict()["key"])
    assert chosen == {k for k, r in ranks.items() if r < 5}  # the simulation's rows, exactly
    pred, _ = TransformChain(spec)(w.old, w.side)
    for i, k in enumerate(w.keys):
        if k not in chosen:
            assert out[k]["source"] == "transform:v1->v2" and out[k]["unc"] is None
            np.testing.assert_allclose(out[k]["emb"], pred[i], rtol=1e-5, atol=1e-6)
    assert rec["rows"] == N_ROWS and rec["rejected"] == 0 and rec["method"] == "partial"


def _restore_as_mapped_once(w: World, rows: int) -> None:
    """Rewrite the source shard: its first `rows` rows were mapped v0 → v1 by an earlier
    upgrade (chain "v0>v1", one hop, a stored log-variance of 0), the rest embedded by v1."""
    n = len(w.keys)
    first = np.arange(n) < rows
    cols = [
        pa.array(w.keys),
        embeddings_to_arrow(w.old),
        pa.array(np.where(first, "transform:v0->v1", "embed:v1").tolist()),
        embeddings_to_arrow(w.side),
        pa.array(np.where(first, 0.0, np.nan).astype(np.float32), mask=~first),
        pa.array(np.where(first, "v0>v1", "v1").tolist()),
        pa.array(first.astype(np.int16)),
    ]
    schema = embedding_schema(4, 2, uncertainty=True, chains=True)
    uri_io.write_table(pa.table(cols, schema=schema), w.g.shard_uri("v1", 0))


def test_rows_keep_their_chain_and_accumulate_uncertainty(tmp_path: Path) -> None:
    """A row mapped a second time records both maps, two hops, and the two maps' variances
    summed; a row embedded by v1 starts its chain there."""
    w = _world(tmp_path)
    _restore_as_mapped_once(w, 3)
    w.run(w.work("transform"))
    t = uri_io.read_table(w.g.shard_uri("v2", 0)).to_pydict()
    assert t["chain"] == ["v0>v1>v2"] * 3 + ["v1>v2"] * (N_ROWS - 3)
    assert t["hops"] == [2] * 3 + [1] * (N_ROWS - 3)
    want = np.where(np.arange(N_ROWS) < 3, np.logaddexp(0.0, w.log_var), w.log_var)
    np.testing.assert_allclose(t["uncertainty"], want, rtol=1e-5)


def test_rows_past_the_chain_limit_are_reembedded_first(tmp_path: Path) -> None:
    """With at most one map per row, the rows already mapped once come first in the re-embed
    order, ahead of rows h is less sure of; the facts count them."""
    w = _world(tmp_path)
    _restore_as_mapped_once(w, 3)
    chain = TransformChain(w.spec)
    scan = scan_shard(w.g.shard_uri("v1", 0), None, chain, "v2", max_hops=1, space="v1")
    assert scan.forced.tolist() == [True] * 3 + [False] * (N_ROWS - 3)
    assert sorted(reembed_order(scan)[:3].tolist()) == [0, 1, 2]
    facts = FactsStage({"side": w.spec}, None, "v2", 11, max_hops=1).one(w.work("transform"))
    assert facts["forced_rows"] == 3 and facts["hops"] == {"1": N_ROWS - 3, "2": 3}
    stored = uri_io.read_table(w.g.shard_uri("v1", 0))
    derived = stored.drop_columns(["chain", "hops"]).to_batches()[0]
    assert stored_chains(derived, "v1")[1].tolist() == [1] * 3 + [0] * (N_ROWS - 3)
