"""Gallery store: commit records, manifest last, promote/rollback."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.gallery.rows import read_rows
from pipeline.gallery.store import (
    Gallery,
    GalleryError,
    arrow_to_embeddings,
    embedding_schema,
    embeddings_to_arrow,
)
from pipeline.io import uri


def _version(g: Gallery, v: str, rows: int) -> None:
    emb = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    t = pa.table(
        [
            pa.array([f"{v}-{i}" for i in range(rows)]),
            embeddings_to_arrow(emb),
            pa.array(["embed:x"] * rows),
        ],
        schema=embedding_schema(4),
    )
    uri.write_table(t, g.shard_uri(v, 0))
    g.commit_shard(v, {"shard_id": 0, "path": "shard-00000.parquet", "rows": rows})
    assert not g.has_version(v)  # not visible before the manifest
    g.finalize(v, {"model": v})


def test_embeddings_arrow_round_trip() -> None:
    emb = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    back = arrow_to_embeddings(
        pa.chunked_array([embeddings_to_arrow(emb[:2]), embeddings_to_arrow(emb[2:])])
    )
    np.testing.assert_array_equal(back, emb)


def test_manifest_promote_rollback(tmp_path: Path) -> None:
    g = Gallery(str(tmp_path / "g"))
    with pytest.raises(GalleryError, match="no manifest"):
        g.promote("v1")
    _version(g, "v1", 3)
    _version(g, "v2", 5)
    assert g.versions() == ["v1", "v2"]
    assert g.manifest("v2")["rows"] == 5
    rows = sum(b.num_rows for b in g.iter_embeddings("v2"))
    assert rows == 5
    assert g.current() is None
    g.promote("v1")
    g.promote("v2")
    assert g.current() == "v2"
    state = g.rollback()
    assert state["version"] == "v1" and state["rolled_back_from"] == "v2"
    with pytest.raises(GalleryError, match="nothing to roll back"):
        g.rollback()


def _side_shard(g: Gallery, v: str, sid: int, keys: list[str], side: list | None) -> None:
    emb = np.array([[float(k[1:]), 1.0] for k in keys], np.float32)
    cols = {"key": pa.array(keys), "embedding": embeddings_to_arrow(emb)}
    if side is not None:
        cols["side_info"] = pa.array(side, pa.list_(pa.float32(), 2))
    uri.write_table(pa.table(cols), g.shard_uri(v, sid))
    g.commit_shard(v, {"shard_id": sid, "path": f"shard-{sid:05d}.parquet", "rows": len(keys)})


def test_read_rows_in_key_order_with_optional_side_info(tmp_path: Path) -> None:
    # One reader for "rows of these keys": shard ids, found, and side-info that some shards
    # lack (no column: a shard re-embedded without FCT's side model).
    g = Gallery(str(tmp_path / "g"))
    _side_shard(g, "v1", 0, ["k0", "k1", "k2"], [[0.5, 0.5], [1.5, 1.5], [2.5, 2.5]])
    _side_shard(g, "v1", 3, ["k3", "k4"], None)
    g.finalize("v1", {"model": "v1"})
    rows = read_rows(g, "v1", ["k4", "nope", "k2", "k1"], ("embedding", "side_info"))
    assert rows.found.tolist() == [True, False, True, True]
    assert rows.shard.tolist() == [3, -1, 0, 0]
    np.testing.assert_array_equal(rows["embedding"][:, 0], [4.0, 0.0, 2.0, 1.0])
    assert rows.present["side_info"].tolist() == [False, False, True, True]
    np.testing.assert_array_equal(rows["side_info"][:, 0], [0.0, 0.0, 2.5, 1.5])
    only = read_rows(g, "v1", ["k3"], ("embedding", "side_info"))
    assert only["side_info"] is None and only.found.tolist() == [True]
