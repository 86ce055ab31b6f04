"""Publish targets: URI parsing, rows of the published table, the Lance fragment sink, tag
moves on a real local Lance table, and the all-or-nothing move of every target's serving name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from pydantic import SecretStr
from ray.data.datasource import WriteResult

from pipeline.config import ConfigError, StorageConfig, UpgradeConfig
from pipeline.gallery.store import Gallery, GalleryError, embeddings_to_arrow
from pipeline.publish import serving, target
from pipeline.publish.lance_sink import LanceFragmentSink
from pipeline.publish.lancedb import (
    VERSION_TAG,
    LanceDBTarget,
    lance_storage_options,
    partitions,
    recall,
    sub_vectors,
)
from pipeline.publish.rows import publish_schema, to_publish_rows
from pipeline.publish.target import Published, TargetInfo, TargetURI, parse_target


def test_parse_target_local_relative_and_s3(tmp_path: Path, monkeypatch) -> None:
    assert parse_target("lancedb:///data/db/") == TargetURI("lancedb", "/data/db")
    monkeypatch.chdir(tmp_path)
    rel = parse_target("lancedb://rel/db")
    assert rel.location == str(tmp_path / "rel" / "db") and not rel.is_s3
    s3 = parse_target("lancedb://s3://bucket/pre/fix/")
    assert (s3.location, s3.is_s3, str(s3)) == (
        "s3://bucket/pre/fix",
        True,
        "lancedb://s3://bucket/pre/fix",
    )


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/plain/path",
        "qdrant://host/c",
        "lancedb://",
        "lancedb:///",
        "lancedb://gs://b/p",
        "lancedb://s3://",
        "lancedb://a\nb",
    ],
)
def test_parse_target_refuses_with_the_uri(bad: str) -> None:
    with pytest.raises(ConfigError, match="--to"):
        parse_target(bad)


def test_lance_storage_options_from_the_storage_config() -> None:
    st = StorageConfig(
        endpoint_url="http://127.0.0.1:9000",
        access_key_id=SecretStr("AK"),
        secret_access_key=SecretStr("SK"),
    )
    opts = lance_storage_options(st)
    assert opts["aws_endpoint"] == "http://127.0.0.1:9000" and opts["allow_http"] == "true"
    assert (opts["aws_access_key_id"], opts["aws_secret_access_key"]) == ("AK", "SK")
    assert lance_storage_options(StorageConfig(anon=True))["aws_skip_signature"] == "true"


def test_index_sizing_and_recall() -> None:
    assert [partitions(n, 4096) for n in (1, 4096, 4097, 1_000_000)] == [1, 1, 2, 245]
    assert sub_vectors(128, 8) == 16 and sub_vectors(36, 8) == 4 and sub_vectors(4, 8) == 1
    assert sub_vectors(30, 8) == 3  # a divisor of the dimension
    assert recall([["a", "b"], ["c", "x"]], [["a", "b"], ["c", "d"]]) == 0.75


def test_rows_join_labels_and_fill_missing_columns() -> None:
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    batch = pa.RecordBatch.from_pydict(
        {"key": ["a", "b", "c"], "embedding": embeddings_to_arrow(emb), "source": ["s"] * 3}
    )
    labels = pa.table({"key": ["c", "a"], "label": [7, 5]})
    out = to_publish_rows(batch, labels, "v2", publish_schema(4), "m2")
    assert out.schema == publish_schema(4)
    assert out["label"].to_pylist() == [5, None, 7]
    assert out["uncertainty"].null_count == 3 and out["version"].to_pylist() == ["v2"] * 3
    assert np.array_equal(np.stack(out["embedding"].to_numpy(zero_copy_only=False)), emb)
    assert to_publish_rows(batch, None, "v2", publish_schema(4), "m2")["label"].null_count == 3
    # a shard written before rows kept chains: embedded rows, by the version's model
    assert out["chain"].to_pylist() == ["m2"] * 3 and out["hops"].to_pylist() == [0] * 3


def test_rows_keep_their_chains() -> None:
    emb = np.ones((3, 4), np.float32)
    chains = {"chain": ["m3", "m2>m3", "m1>m2>m3"], "hops": pa.array([0, 1, 2], pa.int32())}
    batch = pa.RecordBatch.from_pydict(
        {"key": list("abc"), "embedding": embeddings_to_arrow(emb)} | chains
    )
    out = to_publish_rows(batch, None, "v3", publish_schema(4), "m3")
    assert out["chain"].to_pylist() == chains["chain"] and out["hops"].to_pylist() == [0, 1, 2]
    old = batch.drop_columns(["chain", "hops"]).append_column(
        "source", pa.array(["transform:m2->m3"] * 3)
    )
    assert (
        to_publish_rows(old, None, "v3", publish_schema(4), "m3")["chain"].to_pylist()
        == ["m2>m3"] * 3
    )


def _table(n: int, dim: int = 8, seed: int = 0) -> pa.Table:
    emb = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    batch = pa.RecordBatch.from_pydict(
        {"key": [f"k{i}" for i in range(n)], "embedding": embeddings_to_arrow(emb)}
    )
    return to_publish_rows(batch, None, "v", publish_schema(dim), "m")


def test_sink_writes_fragments_then_commits_once(tmp_path: Path) -> None:
    uri = str(tmp_path / "t.lance")
    sink = LanceFragmentSink(uri, publish_schema(8), max_rows_per_file=40)
    parts = [sink.write([_table(50, seed=s)], None) for s in (1, 2)]  # two write tasks
    assert not os.path.exists(os.path.join(uri, "_versions"))  # nothing visible before commit
    sink.on_write_complete(WriteResult(num_rows=100, size_bytes=0, write_returns=parts))
    ds = lance.dataset(uri)
    assert (sink.committed_version, sink.rows, ds.count_rows()) == (ds.version, 100, 100)
    assert len(ds.get_fragments()) == 4  # 40-row files: 2 per task


def test_a_table_published_before_chains_takes_the_new_columns(tmp_path: Path) -> None:
    uri = str(tmp_path / "t.lance")
    before = _table(30).drop_columns(["chain", "hops"])  # what earlier releases published
    lance.write_dataset(before, uri).tags.create("gallery-v1", 1)
    sink = LanceFragmentSink(uri, publish_schema(8))
    parts = [sink.write([_table(20, seed=1)], None)]
    sink.on_write_complete(WriteResult(num_rows=20, size_bytes=0, write_returns=parts))
    now = lance.dataset(uri)
    assert now.schema == publish_schema(8) and now.to_table().equals(_table(20, seed=1))
    assert lance.dataset(uri, version="gallery-v1").count_rows() == 30  # still readable


def _lance_target(tmp_path: Path, versions: list[str]) -> LanceDBTarget:
    """A LanceDB target whose table holds `versions`, written as publish writes them."""
    cfg = UpgradeConfig(gallery_name="g")
    t = LanceDBTarget(parse_target(f"lancedb://{tmp_path}/db"), Gallery(str(tmp_path / "g")), cfg)
    for i, v in enumerate(versions):
        ds = lance.write_dataset(_table(20, seed=i), t.table_uri, mode="overwrite")
        t._tag(ds, VERSION_TAG + v, ds.version)
    return t


def test_tag_moves_on_a_real_table(tmp_path: Path) -> None:
    t = _lance_target(tmp_path, ["v1", "v2"])
    assert t.describe().versions == {"v1": 1, "v2": 2} and t.describe().serving is None
    t.point("serving", "v1")
    assert t.describe().serving == "v1"
    assert lance.dataset(t.table_uri, version="serving").version == 1  # what readers open
    t.point("serving", "v2")
    assert t.describe().serving == "v2"
    with pytest.raises(GalleryError, match="no version 'v9'"):
        t.point("serving", "v9")
    assert t.describe().serving == "v2"
    t.point("serving", None)
    assert t.describe().serving is None


@dataclass
class FakeTarget:
    """An in-memory target: the protocol's three methods, a failure switch."""

    uri: TargetURI
    held: dict[str, int] = field(default_factory=lambda: {"v1": 1, "v2": 2})
    serving: str | None = "v1"
    fail: bool = False

    def publish(self, version: str) -> Published:
        self.held[version] = max(self.held.values()) + 1
        return Published(str(self.uri), "t", version, self.held[version], 3, "none")

    def point(self, serving: str, version: str | None) -> None:
        if self.fail and version == "v2":
            raise OSError("target down")
        self.serving = version

    def describe(self) -> TargetInfo:
        return TargetInfo(str(self.uri), "fake", "t", "serving", dict(self.held), self.serving)


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch) -> tuple[Gallery, list[FakeTarget]]:
    g = Gallery(str(tmp_path / "g"))
    made = [FakeTarget(TargetURI("fake", f"/db{i}")) for i in range(2)]
    by_uri = {str(f.uri): f for f in made}
    monkeypatch.setitem(target.KINDS, "fake", "test")
    monkeypatch.setitem(serving.OPENERS, "fake", lambda uri, g, cfg: by_uri[str(uri)])
    for f in made:
        target.record_published(g, f.publish("v0"), "fake")
    return g, made


def test_targets_move_together(fakes) -> None:
    assert isinstance(fakes[1][0], target.Target)
    g, (a, b) = fakes
    with serving.targets_moved(g, UpgradeConfig(), "v2", "promote v2"):
        pass
    assert (a.serving, b.serving) == ("v2", "v2")


def test_a_failing_target_puts_the_others_back(fakes) -> None:
    g, (a, b) = fakes
    b.fail = True
    ran = []
    moved = serving.targets_moved(g, UpgradeConfig(), "v2", "promote v2")
    with pytest.raises(GalleryError, match=r"move serving on fake:///db1 \(target down"), moved:
        ran.append(1)
    assert (a.serving, b.serving, ran) == ("v1", "v1", [])


def test_a_failing_body_puts_every_target_back(fakes) -> None:
    g, (a, b) = fakes
    moved = serving.targets_moved(g, UpgradeConfig(), "v2", "promote v2")
    with pytest.raises(RuntimeError), moved:
        raise RuntimeError("alias refused")
    assert (a.serving, b.serving) == ("v1", "v1")


def test_a_missing_version_is_published_or_refused(fakes) -> None:
    g, (a, b) = fakes
    cfg = UpgradeConfig()
    cfg.publish.auto_publish = False
    with (
        pytest.raises(GalleryError, match="holds no 'v3'.*nothing moved"),
        serving.targets_moved(g, cfg, "v3", "promote v3"),
    ):
        pass
    assert (a.serving, b.serving) == ("v1", "v1")
    with serving.targets_moved(g, UpgradeConfig(), "v3", "promote v3"):
        pass
    assert (a.serving, "v3" in b.held) == ("v3", True)
    assert "v3" in target.read_records(g)[str(a.uri)]["published"]
