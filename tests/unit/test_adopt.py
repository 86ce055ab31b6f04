"""`carryover import`'s readers and checks on tiny files: Parquet and clip-retrieval's .npy +
metadata layout, dimensions, row counts, columns, keys, rejected rows, shard plans."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import AdoptConfig, StorageConfig
from pipeline.data.embeddings import (
    check_dim,
    check_keys,
    find_sources,
    iter_rows,
    list_vectors,
)
from pipeline.data.shards import DataError
from pipeline.embed.quality import NON_FINITE, ZERO_NORM
from pipeline.io import uri as uri_io
from pipeline.services.adopt import NULL_EMBEDDING, REASONS, plan_shards, row_reasons

runner = CliRunner()
DIM = 8


def _vectors(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    e = np.random.default_rng(seed).standard_normal((n, DIM))
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(dtype)


def _parquet(path: Path, keys: list, emb: np.ndarray | list, fixed: bool = True) -> str:
    if fixed:
        col = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(emb).ravel()), DIM)
    else:
        col = pa.array([None if v is None else list(v) for v in emb], pa.list_(pa.float64()))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": keys, "embedding": col}), path)
    return str(path)


def _clip(root: Path, parts: list[tuple[str, np.ndarray, list[str]]]) -> Path:
    """clip-retrieval's output: img_emb/img_emb_N.npy beside metadata/metadata_N.parquet."""
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for n, emb, paths in parts:
        np.save(root / "img_emb" / f"img_emb_{n}.npy", emb)
        table = pa.table({"image_path": paths, "caption": ["c"] * len(paths)})
        pq.write_table(table, root / "metadata" / f"metadata_{n}.parquet")
    return root


def _rows(sources, batch_rows: int = 7):
    out = [list(iter_rows(f, sources.columns, DIM, None, batch_rows)) for f in sources.files]
    keys = [k for bs in out for b in bs for k in b.keys.to_pylist()]
    emb = np.concatenate([b.embeddings for bs in out for b in bs])
    return keys, emb


# ---------------------------------------------------------------- readers


def test_parquet_layout_streams_keys_and_float32_vectors(tmp_path: Path) -> None:
    a, b = _vectors(10, 1), _vectors(5, 2)
    _parquet(tmp_path / "in" / "a.parquet", [f"a{i}" for i in range(10)], a)
    _parquet(tmp_path / "in" / "b.parquet", list(range(5)), b)  # integer keys become strings
    s = find_sources(str(tmp_path / "in"), AdoptConfig(), None)
    assert (s.layout, s.rows, s.dim, len(s.files)) == ("parquet", 15, DIM, 2)
    assert s.files[0].uri.endswith("/in/a.parquet") and s.files[0].size > 0
    keys, emb = _rows(s)
    assert keys == [f"a{i}" for i in range(10)] + ["0", "1", "2", "3", "4"]
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, np.concatenate([a, b]))


def test_npy_layout_pairs_files_by_number_and_reads_row_ranges(tmp_path: Path) -> None:
    a, b = _vectors(9, 1, np.float16), _vectors(4, 2, np.float16)
    parts = [
        ("00", a, [f"/x/a{i}.jpg" for i in range(9)]),
        ("01", b, [f"/x/b{i}.jpg" for i in range(4)]),
    ]
    root = _clip(tmp_path / "out" / "embeddings", parts)
    s = find_sources(str(tmp_path / "out"), AdoptConfig(), None)  # finds embeddings/ itself
    assert (s.layout, s.rows, s.dim, s.columns.key) == ("npy", 13, DIM, "image_path")
    assert [Path(f.metadata).name for f in s.files] == [
        "metadata_00.parquet",
        "metadata_01.parquet",
    ]
    assert Path(s.files[0].uri).parent == root / "img_emb"
    keys, emb = _rows(s, batch_rows=4)
    assert keys[:2] == ["/x/a0.jpg", "/x/a1.jpg"] and keys[-1] == "/x/b3.jpg"
    np.testing.assert_array_equal(emb, np.concatenate([a, b]).astype(np.float32))


def test_list_column_rows_of_another_length_are_named(tmp_path: Path) -> None:
    col = pa.array([[0.1] * DIM, None, [0.2] * (DIM - 1)], pa.list_(pa.float32()))
    with pytest.raises(DataError, match=r"f\.parquet: row 12: embedding has 7 values, expected 8"):
        list_vectors(col, DIM, "f.parquet", 10)
    emb, null = list_vectors(col.slice(0, 2), DIM, "f.parquet", 10)
    assert null.tolist() == [False, True] and emb[1].tolist() == [0.0] * DIM


def test_fixed_size_nulls_become_null_rows() -> None:
    values = pa.array(np.arange(3 * DIM, dtype=np.float32))
    col = pa.FixedSizeListArray.from_arrays(values, DIM, mask=pa.array([False, True, False]))
    emb, null = list_vectors(col.slice(1, 2), DIM, "f", 0)
    assert null.tolist() == [True, False]
    assert emb[0].tolist() == [0.0] * DIM and emb[1, 0] == 2 * DIM


# ---------------------------------------------------------------- file-level checks


def test_missing_columns_name_file_and_config_key(tmp_path: Path) -> None:
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": ["a"], "embedding": [[0.1] * DIM]}), f)
    with pytest.raises(DataError, match=r"a\.parquet: missing key column 'key'.*adopt\.key_column"):
        find_sources(str(f), AdoptConfig(), None)
    with pytest.raises(DataError, match=r"missing embedding column 'vec'"):
        find_sources(str(f), AdoptConfig(key_column="id", embedding_column="vec"), None)
    with pytest.raises(DataError, match=r"missing image column 'url'"):
        find_sources(str(f), AdoptConfig(key_column="id", image_column="url"), None)


def test_dimension_must_agree_across_files_and_with_the_model(tmp_path: Path) -> None:
    _parquet(tmp_path / "a.parquet", ["a"], _vectors(1))
    other = tmp_path / "b.parquet"
    pq.write_table(
        pa.table(
            {"key": ["b"], "embedding": pa.FixedSizeListArray.from_arrays(pa.array([0.5] * 4), 4)}
        ),
        other,
    )
    with pytest.raises(DataError, match=r"b\.parquet: 4-d embeddings, but .*a\.parquet holds 8-d"):
        find_sources(str(tmp_path), AdoptConfig(), None)
    other.unlink()
    s = find_sources(str(tmp_path), AdoptConfig(), None)
    with pytest.raises(
        DataError, match=r"a\.parquet: holds 8-d embeddings, but model 'm' makes 16"
    ):
        check_dim(s, 16, "m")


def test_npy_row_count_mismatch_and_missing_partner_are_named(tmp_path: Path) -> None:
    root = _clip(tmp_path / "c", [("0", _vectors(5), [f"k{i}" for i in range(4)])])
    with pytest.raises(DataError, match=r"img_emb_0\.npy: 5 rows, but .*metadata_0\.parquet has 4"):
        find_sources(str(root), AdoptConfig(), None)
    _clip(tmp_path / "d", [("0", _vectors(2), ["a", "b"])])
    np.save(tmp_path / "d" / "img_emb" / "img_emb_1.npy", _vectors(2))
    with pytest.raises(DataError, match=r"img_emb_1\.npy: no matching file number 1 in .*metadata"):
        find_sources(str(tmp_path / "d"), AdoptConfig(), None)


def test_npy_of_objects_or_wrong_shape_is_refused(tmp_path: Path) -> None:
    root = _clip(tmp_path / "c", [("0", _vectors(2), ["a", "b"])])
    np.save(root / "img_emb" / "img_emb_0.npy", np.array([{"x": 1}, None]), allow_pickle=True)
    with pytest.raises(DataError, match=r"img_emb_0\.npy: must hold a C-order 2-d array"):
        find_sources(str(root), AdoptConfig(), None)
    np.save(root / "img_emb" / "img_emb_0.npy", np.array([["a"] * DIM] * 2))
    with pytest.raises(DataError, match=r"img_emb_0\.npy: must hold float vectors, got dtype <U1"):
        find_sources(str(root), AdoptConfig(), None)


def test_duplicate_and_null_keys_across_files_are_named(tmp_path: Path) -> None:
    _parquet(tmp_path / "a.parquet", ["x", "y", "z"], _vectors(3))
    _parquet(tmp_path / "b.parquet", ["w", "y"], _vectors(2))
    s = find_sources(str(tmp_path), AdoptConfig(), None)
    with pytest.raises(
        DataError, match=r"b\.parquet: row 1: duplicate key 'y' \(first at .*a\.parquet row 1\)"
    ):
        check_keys(s, None)
    _parquet(tmp_path / "b.parquet", ["w", None], _vectors(2))
    with pytest.raises(DataError, match=r"b\.parquet: row 1: key is null"):
        check_keys(find_sources(str(tmp_path), AdoptConfig(), None), None)


def test_no_input_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        find_sources(str(tmp_path / "nope"), AdoptConfig(), None)
    with pytest.raises(FileNotFoundError, match="no img_emb/img_emb_N.npy"):
        find_sources(str(tmp_path), AdoptConfig(layout="npy"), None)


# ---------------------------------------------------------------- rows and shards


def test_bad_rows_get_a_reason_each() -> None:
    emb = _vectors(4)
    emb[1, 2] = np.nan
    emb[2] = 0.0
    why = row_reasons(emb, np.array([False, False, False, True]))
    assert why.tolist() == ["", REASONS[NON_FINITE], REASONS[ZERO_NORM], NULL_EMBEDDING]


def test_shards_split_files_into_bounded_row_ranges(tmp_path: Path) -> None:
    _parquet(tmp_path / "a.parquet", [f"a{i}" for i in range(5)], _vectors(5))
    _parquet(tmp_path / "b.parquet", pa.array([], pa.string()), np.zeros((0, DIM), np.float32))
    _parquet(tmp_path / "c.parquet", ["c0", "c1"], _vectors(2))
    plan = plan_shards(find_sources(str(tmp_path), AdoptConfig(), None), 2)
    got = [(p.shard_id, p.file, p.start, p.stop) for p in plan]
    assert got == [(0, 0, 0, 2), (1, 0, 2, 4), (2, 0, 4, 5), (3, 1, 0, 0), (4, 2, 0, 2)]


# ---------------------------------------------------------------- the command


def _torchscript(path: Path, dim: int) -> str:
    """A TorchScript model of the default old preprocess (1 x 16 x 16) → dim."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, dim))
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 16, 16)), str(path))
    return str(path)


def test_file_level_fault_is_one_line_exit_2_and_no_version(tmp_path: Path) -> None:
    _parquet(tmp_path / "in" / "a.parquet", ["x", "y"], _vectors(2))
    _parquet(tmp_path / "in" / "b.parquet", ["y"], _vectors(1))
    model = _torchscript(tmp_path / "m.ts", DIM)
    sets = [
        "--set",
        f"workdir={tmp_path / 'wd'}",
        "--set",
        f"old_model.architecture.embedding_dim={DIM}",
    ]
    r = runner.invoke(app, ["import", str(tmp_path / "in"), "--model-uri", model, *sets])
    assert r.exit_code == 2, r.output
    assert "duplicate key 'y'" in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not list((tmp_path / "wd").rglob("manifest.json"))
    r = runner.invoke(app, ["import", str(tmp_path / "in" / "a.parquet"), *sets])
    assert r.exit_code == 2 and "--model-uri" in " ".join(r.output.split())


def test_model_of_another_dimension_is_refused_before_writing(tmp_path: Path) -> None:
    _parquet(tmp_path / "a.parquet", ["x", "y"], _vectors(2))
    model = _torchscript(tmp_path / "m.ts", 16)
    sets = [
        "--set",
        f"workdir={tmp_path / 'wd'}",
        "--set",
        "old_model.architecture.embedding_dim=16",
    ]
    r = runner.invoke(app, ["import", str(tmp_path / "a.parquet"), "--model-uri", model, *sets])
    assert r.exit_code == 2, r.output
    assert "holds 8-d embeddings, but model 'v1' makes 16-d" in " ".join(r.output.split())
    assert not (tmp_path / "wd" / "gallery" / "versions").exists()


def test_mostly_bad_rows_stop_the_import_and_a_bad_version_name_is_refused(tmp_path: Path) -> None:
    emb = _vectors(4)
    emb[:3, 0] = np.inf
    _parquet(tmp_path / "a.parquet", ["w", "x", "y", "z"], emb)
    model = _torchscript(tmp_path / "m.ts", DIM)
    dim = f"old_model.architecture.embedding_dim={DIM}"
    sets = ["--set", f"workdir={tmp_path / 'wd'}", "--set", dim]
    args = ["import", str(tmp_path / "a.parquet"), "--model-uri", model, *sets]
    r = runner.invoke(app, [*args, "--version", "../x"])
    assert r.exit_code == 2 and "--version '../x' is not a plain name" in r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert "3 of 4 rows imported so far were rejected" in out
    assert "non-finite value (NaN/inf)" in out and "max_rejected_fraction=0.5" in out
    assert not list((tmp_path / "wd").rglob("manifest.json"))


def test_npy_layout_on_s3_imports_by_ranged_reads(tmp_path: Path, s3_server) -> None:
    """The same reader on a real S3 API (moto): .npy rows fetched by ranges, never whole; the
    gallery on S3 too, searchable after the import."""
    local = _clip(tmp_path / "c", [("0", _vectors(9, 1), [f"k{i}" for i in range(9)]),
                                   ("1", _vectors(3, 2), ["m0", "m1", "m2"])])  # fmt: skip
    storage = StorageConfig(endpoint_url=s3_server.endpoint_url)
    for f in local.rglob("*.*"):
        dst = s3_server.uri("adopt", "c", *f.relative_to(local).parts)
        uri_io.write_bytes(dst, f.read_bytes(), storage)
    s = find_sources(s3_server.uri("adopt", "c"), AdoptConfig(), storage)
    assert (s.layout, s.rows, s.dim) == ("npy", 12, DIM) and s.files[1].uri.startswith("s3://")
    keys = [
        k
        for f in s.files
        for b in iter_rows(f, s.columns, DIM, storage, 4)
        for k in b.keys.to_pylist()
    ]
    assert keys == [f"k{i}" for i in range(9)] + ["m0", "m1", "m2"]
    model = _torchscript(tmp_path / "m.ts", DIM)
    sets = [
        f"workdir={tmp_path / 'wd'}",
        f"old_model.architecture.embedding_dim={DIM}",
        f"gallery={s3_server.uri('adopt', 'gallery')}",
        f"storage.endpoint_url={s3_server.endpoint_url}",
    ]
    flags = [a for x in sets for a in ("--set", x)]
    r = runner.invoke(
        app, ["import", s3_server.uri("adopt", "c"), "--model-uri", model, "--json", *flags]
    )
    assert r.exit_code == 0, r.output
    (line,) = r.stdout.strip().splitlines()  # --json: one line on stdout, nothing else
    out = json.loads(line)
    assert (out["rows"], out["shards"], out["layout"]) == (12, 2, "npy")
    r = runner.invoke(app, ["search", "--key", "k0", "-k", "2", "--json", *flags])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["keys"] == _neighbours(
        np.concatenate([_vectors(9, 1), _vectors(3, 2)]), 0, 2
    )


def _neighbours(emb: np.ndarray, q: int, k: int) -> list[str]:
    keys = [f"k{i}" for i in range(9)] + ["m0", "m1", "m2"]
    scores = emb @ emb[q]
    scores[q] = -np.inf
    return [keys[i] for i in np.argsort(-scores)[:k]]
