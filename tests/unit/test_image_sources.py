"""Image sources as users have them: img2dataset's layout read in place (column mapping, status
rows rejected with their reason, split by key hash), flat image folders, absolute file URIs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data.prepare import prepare
from pipeline.data.shards import DataError, split_for_key
from pipeline.data.sources import ImageLayout, check_shards, image_files
from pipeline.io import uri as uri_io


def _jpg(v: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), v, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _img2dataset_shard(path: Path, first: int, failed: set[int]) -> None:
    """One img2dataset output shard: key, jpg, caption, status, error_message (+ _stats)."""
    ids = range(first, first + 4)
    pq.write_table(
        pa.table(
            {
                "key": [f"{i:09d}" for i in ids],
                "jpg": [None if i in failed else _jpg(i) for i in ids],
                "caption": [f"c{i}" for i in ids],
                "status": ["failed_to_download" if i in failed else "success" for i in ids],
                "error_message": ["HTTP Error 404" if i in failed else None for i in ids],
            }
        ),
        path,
    )
    path.with_name(path.stem + "_stats.json").write_text("{}")


def _layout(*sets: str) -> ImageLayout:
    return ImageLayout.of(load_config(None, ["data.source.layout=img2dataset", *sets]).data)


def test_img2dataset_read_in_place(tmp_path: Path) -> None:
    _img2dataset_shard(tmp_path / "00000.parquet", 0, {1})
    _img2dataset_shard(tmp_path / "00001.parquet", 4, set())
    lay = _layout()
    files = image_files(str(tmp_path), None, lay)
    assert files == {0: str(tmp_path / "00000.parquet"), 1: str(tmp_path / "00001.parquet")}
    assert check_shards(list(files.values()), None, lay) == [4, 4]
    (b,) = lay.read(files[0], None, ["key", "image", "label", "split"])
    got = b.to_pydict()
    assert got["key"] == ["000000000", "000000001", "000000002", "000000003"]
    assert got["reject"] == ["", "HTTP Error 404", "", ""]
    assert got["label"] == [None] * 4
    assert got["split"] == [split_for_key(k, 0.3, 0) for k in got["key"]]
    assert got["image"][1] is None and got["image"][0][:2] == b"\xff\xd8"


def test_missing_mapped_column_names_file_and_key(tmp_path: Path) -> None:
    _img2dataset_shard(tmp_path / "00000.parquet", 0, set())
    f = str(tmp_path / "00000.parquet")
    with pytest.raises(
        DataError, match=r"00000.parquet: no column 'png' for image .*columns.image"
    ):
        check_shards([f], None, _layout("data.source.columns.image=png"))
    with pytest.raises(DataError, match=r"no column 'cls' for label"):
        check_shards([f], None, _layout("data.source.columns.label=cls"))
    # mapped to a column that is there: the caption cannot be a label (wrong type)
    with pytest.raises(DataError, match=r"column 'caption' \(label\) must be integer"):
        check_shards([f], None, _layout("data.source.columns.label=caption"))


def test_status_without_error_message_and_pattern(tmp_path: Path) -> None:
    t = pa.table({"id": [7, 8], "img": [_jpg(1), None], "ok": ["success", "failed_to_resize"]})
    pq.write_table(t, tmp_path / "train-00003.parquet")
    pq.write_table(t, tmp_path / "other.parquet")
    lay = ImageLayout.of(
        load_config(
            None,
            [
                "data.source.shard_pattern=train-*.parquet",
                "data.source.columns.key=id",
                "data.source.columns.image=img",
                "data.source.status_column=ok",
            ],
        ).data
    )
    files = image_files(str(tmp_path), None, lay)
    assert list(files) == [3]  # the last number in the name; other.parquet left out
    (b,) = lay.read(files[3], None, ["key", "image"])
    assert b.column("key").to_pylist() == ["7", "8"]
    assert b.column("reject").to_pylist() == ["", "status 'failed_to_resize'"]


def test_carryover_default_unchanged(tmp_path: Path) -> None:
    prepare("digits", str(tmp_path / "img"), 2, None, DataConfig(), limit=20)
    lay = ImageLayout.of(None)
    files = image_files(str(tmp_path / "img"), None, lay)
    assert [Path(f).name for f in files.values()] == ["shard-00000.parquet", "shard-00001.parquet"]
    (b,) = lay.read(files[0], None, ["key", "label", "split"])
    stored = pq.read_table(files[0])
    assert b.column("label").to_pylist() == stored["label"].to_pylist()
    assert b.column("split").to_pylist() == stored["split"].to_pylist()


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(5):
        (src / f"p{i}.jpg").write_bytes(_jpg(i * 40))
    (src / ".hidden.jpg").write_bytes(_jpg(1))
    (src / "notes.txt").write_text("x")
    res = prepare(str(src), str(tmp_path / "img"), 1, None, DataConfig())
    t = pq.read_table(res.files[0])
    assert res.rows == 5 and res.classes == []
    assert sorted(t["key"].to_pylist()) == [f"p{i}.jpg" for i in range(5)]
    assert t["label"].null_count == 5
    with pytest.raises(DataError, match="no labels to order"):
        prepare(str(src), str(tmp_path / "img2"), 1, None, DataConfig(), order="label")


def test_mixed_folder_labels_where_present(tmp_path: Path) -> None:
    src = tmp_path / "mixed"
    (src / "cat").mkdir(parents=True)
    (src / "loose.png").write_bytes(_jpg(3))
    (src / "cat" / "a.jpg").write_bytes(_jpg(9))
    res = prepare(str(src), str(tmp_path / "img"), 1, None, DataConfig())
    t = pq.read_table(res.files[0]).to_pydict()
    assert dict(zip(t["key"], t["label"], strict=True)) == {"loose.png": None, "cat/a.jpg": 0}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        prepare(str(empty), str(tmp_path / "img3"), 1, None, DataConfig())


def test_absolute_uris_and_old_relative_records(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    prepare("digits", ".carryover/images", 1, None, DataConfig(), limit=4)
    files = image_files(".carryover/images", None, ImageLayout.of(None))
    assert files[0] == str(tmp_path / ".carryover/images/shard-00000.parquet")
    assert (
        uri_io.absolute("s3://b/images/shard-00000.parquet") == "s3://b/images/shard-00000.parquet"
    )
    old = ".carryover/images/shard-00000.parquet"  # what a record held before
    work = "/srv/g/.carryover"
    assert uri_io.from_record(old, work) == "/srv/g/.carryover/images/shard-00000.parquet"
    assert uri_io.from_record("images/shard-00001.parquet", work) == (
        "/srv/g/.carryover/images/shard-00001.parquet"
    )
    assert uri_io.from_record("/abs/x.parquet", work) == "/abs/x.parquet"
    assert uri_io.from_record(None, work) is None


def test_adapter_queries_search_the_old_models_version(tmp_path: Path) -> None:
    """After promotion (v2 serving) an adapter's new→old queries go to v1, not to v2."""
    from pipeline.context import Context
    from pipeline.services.search import adapter_version

    cfg = load_config(None, [f"workdir={tmp_path}"])
    g = tmp_path / "gallery"
    for i, (v, model) in enumerate([("v1", "v1"), ("v2", "v2"), ("v3", "v2")]):
        (g / "versions" / v).mkdir(parents=True)
        m = {"model": model, "created_at": i, "shards": []}
        (g / "versions" / v / "manifest.json").write_text(json.dumps(m))
    (g / "CURRENT").write_text(json.dumps({"version": "v2"}))
    meta = tmp_path / "models" / "adapter-procrustes" / "model.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"adapter": {}, "from_model": "v2", "to_model": "v1"}))
    ctx = Context(cfg)
    assert adapter_version(ctx, "procrustes") == "v1"
    (g / "CURRENT").write_text(json.dumps({"version": "v1"}))
    assert adapter_version(ctx, "procrustes") == "v1"
    meta.write_text(json.dumps({"adapter": {}, "from_model": "v1", "to_model": "v2"}))
    (g / "CURRENT").write_text(json.dumps({"version": "v1"}))
    assert adapter_version(ctx, "procrustes") == "v3"  # the newest version of that model
    meta.write_text(json.dumps({"adapter": {}, "from_model": "v1", "to_model": "v9"}))
    with pytest.raises(ConfigError, match="no version of .* holds 'v9' embeddings"):
        adapter_version(ctx, "procrustes")
