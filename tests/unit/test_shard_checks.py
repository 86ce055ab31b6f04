"""Checks on image shards before any embedding: shard ids from file names, keys unique across
shards (hashed, memory-bounded), unreadable row groups named by file and row group."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data import shards
from pipeline.data.shards import (
    DataError,
    check_image_shards,
    make_image_table,
    shard_name,
)
from pipeline.embed.read import iter_image_rows
from pipeline.gallery.store import Gallery
from pipeline.services.steps import image_shards

runner = CliRunner()


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_shard(path: Path, keys: list[str], row_group_size: int | None = None) -> str:
    rng = np.random.default_rng(len(keys))
    images = [_png(int(v)) for v in rng.integers(0, 256, len(keys))]
    table = make_image_table(keys, images, [0] * len(keys), ["train"] * len(keys))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def _out(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- shard ids from names


def test_shard_ids_come_from_file_names_and_strays_are_named(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    a = _image_shard(images / shard_name(0), ["k0"])
    c = _image_shard(images / shard_name(2), ["k2"])
    _image_shard(images / "aaa-notes.parquet", ["n"])
    cfg = load_config(None, [f"images={images}", f"workdir={tmp_path}"])
    assert image_shards(cfg) == {0: a, 2: c}
    err = capsys.readouterr().err
    warning = f"warning: {images}: ignored 1 file not named shard-NNNNN.parquet: aaa-notes.parquet"
    assert err == warning + "\n"
    image_shards(cfg)  # the same stray is named once per process, not once per call
    assert capsys.readouterr().err == ""
    # A URI naming one file directly: that file, with the id its name gives (else 0).
    assert image_shards(load_config(None, [f"images={c}"])) == {2: c}


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            ["shard-00000.parquet", "shard-abc.parquet"],
            "{d}/shard-abc.parquet: looks like an image shard but is not named "
            "shard-NNNNN.parquet (five or more digits): rename it or move it out of the "
            "images folder",
        ),
        (
            ["shard-00001.parquet", "shard-000001.parquet"],
            "{d}: shard-00001.parquet and shard-000001.parquet both have shard id 1",
        ),
    ],
    ids=["malformed", "duplicate_id"],
)
def test_malformed_shard_names_are_refused(tmp_path: Path, names: list[str], message: str) -> None:
    for n in names:
        _image_shard(tmp_path / n, [n])
    with pytest.raises(DataError) as e:
        image_shards(load_config(None, [f"images={tmp_path}"]))
    assert str(e.value) == message.format(d=tmp_path)


def test_only_strays_is_no_shards(tmp_path: Path) -> None:
    _image_shard(tmp_path / "notes.parquet", ["n"])
    with pytest.raises(FileNotFoundError) as e:
        image_shards(load_config(None, [f"images={tmp_path}"]))
    assert str(e.value) == f"no Parquet image shards (shard-NNNNN.parquet) under {tmp_path}"


# ---------------------------------------------------------------- keys unique across shards


def test_duplicate_key_is_named_with_spilled_hash_partitions(tmp_path: Path) -> None:
    files = [
        _image_shard(tmp_path / shard_name(i), [f"k{i}-{j}" for j in range(40)]) for i in range(3)
    ]
    # 120 rows over a budget of 16 hashes: 8 partitions spilled to disk, same answer.
    assert check_image_shards(files, hash_budget=16) == [40, 40, 40]
    dup = _image_shard(tmp_path / shard_name(3), ["new", "k1-7"])
    with pytest.raises(DataError) as e:
        check_image_shards([*files, dup], hash_budget=16)
    assert str(e.value) == f"{dup}: row 1: duplicate key 'k1-7' (first at {files[1]} row 7)"


def test_hash_collisions_are_not_duplicates(tmp_path: Path, monkeypatch) -> None:
    # Every key hashes alike: all are suspects, and the exact second pass clears them.
    monkeypatch.setattr(shards, "_key_hashes", lambda col: np.zeros(len(col), np.uint64))
    files = [_image_shard(tmp_path / shard_name(i), [f"k{i}", f"j{i}"]) for i in range(2)]
    assert check_image_shards(files) == [2, 2]
    assert check_image_shards(files, hash_budget=1) == [2, 2]


def tiny_model(path: Path) -> str:
    """A TorchScript embedder that needs no training: mean-pooled 8x8 input to 4 numbers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    torch.jit.save(torch.jit.script(net), str(path))
    return str(path)


def test_key_in_two_shards_stops_ingest_before_embedding(tmp_path: Path) -> None:
    images = tmp_path / "images"
    a = _image_shard(images / shard_name(0), ["a", "b"])
    b = _image_shard(images / shard_name(1), ["c", "a"])
    sets = [
        f"workdir={tmp_path}",
        f"images={images}",
        f"gallery={tmp_path / 'gallery'}",
        f"old_model.uri={tiny_model(tmp_path / 'm.pt')}",
        "old_model.preprocess.input_size=8",
        "old_model.architecture.embedding_dim=4",
    ]
    res = runner.invoke(app, ["ingest", "--quiet", *(x for s in sets for x in ("--set", s))])
    assert res.exit_code == 2, res.output
    assert _out(res.output) == f"error: {b}: row 1: duplicate key 'a' (first at {a} row 0)"
    g = Gallery(str(tmp_path / "gallery"))
    assert g.committed_shards("v1") == {} and g.current() is None


# ---------------------------------------------------------------- unreadable data pages


def flip_mid_page(path: str, row_group: int = 0, column: str = "image", n: int = 64) -> int:
    """Invert `n` bytes in the middle of a column chunk's pages (the footer stays intact);
    returns the offset of the first byte flipped."""
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(row_group).column(meta.schema.to_arrow_schema().get_field_index(column))
    start = col.dictionary_page_offset or col.data_page_offset
    at = start + col.total_compressed_size // 2 - n // 2
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(n)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))
    return at


def test_corrupt_row_group_is_named_by_the_read(tmp_path: Path) -> None:
    f = _image_shard(tmp_path / shard_name(0), [f"k{i}" for i in range(300)], row_group_size=100)
    flip_mid_page(f, row_group=1)
    # The checks before embedding read footers and keys only: a corrupt image page passes ...
    assert check_image_shards([f]) == [300]
    # ... and the read that meets it names the file and the row group, in one line.
    with pytest.raises(DataError) as e:
        sum(b.num_rows for b in iter_image_rows(f, None, 50))
    assert str(e.value).startswith(f"{f}: row group 1 (rows 100-199) cannot be read: ")
    assert "\n" not in str(e.value)
