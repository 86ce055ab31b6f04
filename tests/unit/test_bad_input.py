"""Bad input catalogue (docs/reliability.md): one test per kind of bad input, each checking the
documented behaviour: an error naming the file/row/key, or a rejected row with its reason and
rows in = rows written + rows rejected. Ingest rows go through the stages the Ray pipeline maps
(decode → embed → shard sink), without Ray."""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import Result
from PIL import Image
from rich.progress import Progress
from safetensors.torch import save
from torch import nn
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import (
    ArchitectureConfig,
    ConfigError,
    EmbedConfig,
    IndexConfig,
    ModelConfig,
    PreprocessConfig,
    load_config,
)
from pipeline.data.decode import decode_batch, decode_images
from pipeline.data.prepare import prepare
from pipeline.data.shards import DataError, check_image_shards, make_image_table
from pipeline.embed.runner import _ShardSink, embed_images_to_version
from pipeline.embed.stages import EmbedStage, decode_stage
from pipeline.embed.transform import ChainSpec, TransformChain
from pipeline.gallery.index import build_index
from pipeline.gallery.store import (
    Gallery,
    GalleryError,
    arrow_to_embeddings,
    embedding_schema,
    embeddings_to_arrow,
    shard_file,
)
from pipeline.io import uri as uri_io
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.compat import Transformation
from pipeline.models.store import (
    ModelBlob,
    ModelLoadError,
    embedder_meta,
    resolve_blob,
    save_model_dir,
)
from pipeline.services.steps import image_shards
from pipeline.train.embedder import training_batch
from pipeline.upgrade.facts import reembed_order, scan_shard
from pipeline.upgrade.validate import ValidationReport, check_keys_and_values

PRE = PreprocessConfig(input_size=8, channels=1, mean=[0.5], std=[0.5])
RGB = PreprocessConfig(input_size=8, channels=3, mean=[0.5], std=[0.5])
DIM = 4
MAX_PIXELS = 10_000
runner = CliRunner()


def _encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    return _encode(Image.fromarray(arr))


GOOD = _png(np.full((8, 8), 200, np.uint8))
NOISE = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _out(res: Result) -> str:
    """The command's output (stdout and stderr) with rich's line wrapping undone."""
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> ModelBlob:
    """A tiny untrained embedder (training is not what is under test)."""
    d = tmp_path_factory.mktemp("model") / "m"
    cfg = ModelConfig(
        name="m",
        architecture=ArchitectureConfig(widths=[4], embedding_dim=DIM, num_classes=2),
        preprocess=PRE,
    )
    torch.manual_seed(0)
    save_model_dir(EmbeddingNet(cfg.architecture, in_channels=1).eval(), embedder_meta(cfg), d)
    return resolve_blob(ModelConfig(name="m", uri=str(d)))


def _ingest(tmp_path: Path, blob: ModelBlob, keys: list, images: list, batch_size: int = 3) -> dict:
    """One image shard through decode_stage → EmbedStage → _ShardSink, batch by batch, as
    `embed_images_to_version` maps them on Ray; returns the commit record, rows and rejects."""
    g = Gallery(str(tmp_path / "gallery"))
    stage = EmbedStage(blob)
    progress = Progress(disable=True)
    task = progress.add_task("embed", total=len(keys))
    sink = _ShardSink(g, "v1", DIM, {0: len(keys)}, {0: {}}, "embed:m", progress, task)
    for lo in range(0, len(keys), batch_size):
        img = np.empty(len(images[lo : lo + batch_size]), dtype=object)
        img[:] = images[lo : lo + batch_size]
        batch = {
            "key": np.array(keys[lo : lo + batch_size], dtype=object),
            "image": img,
            "path": np.array(["images/shard-00000.parquet"] * len(img), dtype=object),
        }
        sink.add(stage(decode_stage(batch, PRE, MAX_PIXELS, {"images/shard-00000.parquet": 0})))
    (rec,) = sink.records
    written = uri_io.read_table(g.shard_uri("v1", 0))
    rows = []
    if uri_io.exists(g.rejects_uri("v1", 0)):
        t = uri_io.read_table(g.rejects_uri("v1", 0)).to_pydict()
        rows = list(zip(t["key"], t["reason"], strict=True))
    rejects = dict(rows)
    assert rec["rows_in"] == len(keys) == rec["rows"] + rec["rejected"]  # nothing silently lost
    assert rec["rows"] == written.num_rows and rec["rejected"] == len(rows)
    emb = arrow_to_embeddings(written["embedding"])
    assert np.isfinite(emb).all()
    return {"rec": rec, "keys": written["key"].to_pylist(), "rejects": rejects}


# ---------------------------------------------------------------- image rows (ingest)

REJECTED_ROWS = {
    # cut inside the pixel data: the header still opens, decoding fails
    "truncated_png": (_png(NOISE)[:-60], "cannot decode image: OSError: image file is truncated"),
    "truncated_jpeg": (
        _encode(Image.fromarray(NOISE), "JPEG")[:300],
        "cannot decode image: OSError: ",
    ),
    "non_image": (b"%PDF-1.4 not an image", "cannot decode image: not a recognised image format"),
    "zero_byte": (b"", "empty image bytes"),
    "null_image": (None, "empty image bytes"),
    "huge": (_png(np.zeros((200, 100), np.uint8)), "image too large: 100x200"),
    "decompression_bomb": (_png_header_only(100_000, 100_000), "image too large: "),
    "float_nan_pixels": (
        _encode(Image.fromarray(np.full((8, 8), np.nan, np.float32), "F"), "TIFF"),
        "image has NaN or infinite pixel values",
    ),
}


@pytest.mark.parametrize("kind", sorted(REJECTED_ROWS))
def test_bad_image_row_is_rejected_with_reason(tmp_path: Path, blob: ModelBlob, kind: str) -> None:
    data, reason = REJECTED_ROWS[kind]
    got = _ingest(tmp_path, blob, ["ok-1", kind, "ok-2", "ok-3"], [GOOD, data, GOOD, GOOD])
    assert got["keys"] == ["ok-1", "ok-2", "ok-3"]
    assert list(got["rejects"]) == [kind]
    assert got["rejects"][kind].startswith(reason)
    assert not re.search(r"0x[0-9a-f]{6}", got["rejects"][kind])  # no memory addresses


def test_bad_image_rows_never_reach_a_training_batch() -> None:
    bad = [data for data, _ in REJECTED_ROWS.values()]
    images = np.empty(len(bad) + 1, dtype=object)
    images[:] = [GOOD, *bad]
    batch = {
        "key": np.array([f"k{i}" for i in range(len(images))], dtype=object),
        "image": images,
        "label": np.arange(len(images)),
        "split": np.array(["train"] * len(images), dtype=object),
    }
    out = training_batch(batch, PRE, MAX_PIXELS, "train", None)
    assert out["label"].tolist() == [0]  # only the good row; a NaN pixel would poison the loss
    assert np.isfinite(out["pixels"]).all()


def test_unlabelled_rows_train_only_a_self_supervised_model() -> None:
    images = np.empty(3, dtype=object)
    images[:] = [GOOD, GOOD, GOOD]
    batch = {
        "key": np.array(["a", "b", "c"], dtype=object),
        "image": images,
        "label": np.array([2.0, np.nan, 0.0]),  # b has no label
        "split": np.array(["train"] * 3, dtype=object),
    }
    assert training_batch(batch, PRE, MAX_PIXELS, "train", None)["label"].tolist() == [2, 0]
    out = training_batch(batch, PRE, MAX_PIXELS, "train", None, labelled_only=False)
    assert out["label"].tolist() == [2, -1, 0] and len(out["pixels"]) == 3


def _mode_image(kind: str) -> bytes:
    a = np.zeros((8, 8), np.uint8)
    a[:, :4] = 255  # left half white
    if kind == "grayscale":
        return _png(a)
    if kind == "rgb":
        return _png(np.repeat(a[..., None], 3, axis=2))
    if kind == "rgba":  # white everywhere, opaque only on the left: composited over black
        rgba = np.full((8, 8, 4), 255, np.uint8)
        rgba[:, 4:, 3] = 0
        return _png(rgba)
    if kind == "gray_alpha":
        return _encode(Image.fromarray(np.stack([np.full_like(a, 255), a], axis=2), "LA"))
    if kind == "palette":
        return _encode(Image.fromarray(a).convert("P"))
    if kind == "bilevel":
        return _encode(Image.fromarray(a > 0))
    if kind == "gray16":
        return _png(a.astype(np.uint16) * 257)
    if kind == "cmyk_jpeg":
        cmyk = np.zeros((8, 8, 4), np.uint8)
        cmyk[:, 4:, 3] = 255  # full black ink on the right
        return _encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100)
    raise AssertionError(kind)


IMAGE_MODES = ["grayscale", "rgb", "rgba", "gray_alpha", "palette", "bilevel", "gray16"]


@pytest.mark.parametrize("kind", IMAGE_MODES + ["cmyk_jpeg"])
@pytest.mark.parametrize("pre", [PRE, RGB], ids=["to_gray", "to_rgb"])
def test_unusual_image_modes_decode_to_the_model_input(kind: str, pre: PreprocessConfig) -> None:
    res = decode_images([_mode_image(kind)], pre, MAX_PIXELS)
    assert res.ok.tolist() == [True] and res.errors == [None]
    px = res.pixels[0]
    assert px.shape == (pre.channels, 8, 8) and np.isfinite(px).all()
    tol = 0.1 if kind == "cmyk_jpeg" else 1e-5
    np.testing.assert_allclose(px[:, :, :4], 1.0, atol=tol)  # white (x/255 - 0.5) / 0.5
    np.testing.assert_allclose(px[:, :, 4:], -1.0, atol=tol)  # black


@pytest.mark.parametrize("kind", IMAGE_MODES)
def test_unusual_image_modes_are_ingested(tmp_path: Path, blob: ModelBlob, kind: str) -> None:
    got = _ingest(tmp_path, blob, ["a", kind], [GOOD, _mode_image(kind)])
    assert got["keys"] == ["a", kind] and got["rejects"] == {}


def test_model_output_with_nan_rejects_the_row(tmp_path: Path) -> None:
    class NanWhenBright(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dim = DIM

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.flatten(1).mean(1, keepdim=True).expand(-1, self.dim)
            # dark images embed to a usable (non-zero) vector, bright ones to NaN
            return torch.where(m > 0, torch.full_like(m, float("nan")), m - 1.0)

    path = tmp_path / "nan.pt"
    torch.jit.save(torch.jit.script(NanWhenBright()), str(path))
    nan_blob = resolve_blob(
        ModelConfig(
            name="nan",
            uri=str(path),
            preprocess=PRE,
            architecture=ArchitectureConfig(embedding_dim=DIM),
        )
    )
    dark = _png(np.zeros((8, 8), np.uint8))
    got = _ingest(tmp_path, nan_blob, ["dark", "bright"], [dark, GOOD])
    assert got["keys"] == ["dark"]
    assert got["rejects"] == {"bright": "model produced a non-finite embedding or side-info"}


# ---------------------------------------------------------------- image shards (files)


def _shard(path: Path, **cols: list) -> str:
    uri_io.write_table(pa.table(cols), str(path))
    return str(path)


def _image_shard(path: Path, keys: list) -> str:
    table = make_image_table(keys, [GOOD] * len(keys), [0] * len(keys), ["train"] * len(keys))
    uri_io.write_table(table, str(path))
    return str(path)


def test_duplicate_keys_name_both_rows(tmp_path: Path) -> None:
    a = _image_shard(tmp_path / "shard-00000.parquet", ["k0", "k1", "k2"])
    b = _image_shard(tmp_path / "shard-00001.parquet", ["k3", "k1"])
    with pytest.raises(DataError) as e:
        check_image_shards([a, b])
    assert str(e.value) == f"{b}: row 1: duplicate key 'k1' (first at {a} row 1)"
    same = _image_shard(tmp_path / "same.parquet", ["x", "y", "x"])
    with pytest.raises(DataError, match=r"same.parquet: row 2: duplicate key 'x' .*row 0\)"):
        check_image_shards([same])
    nulls = _image_shard(tmp_path / "nulls.parquet", ["x", None])
    with pytest.raises(DataError, match=r"nulls.parquet: row 1: key is null"):
        check_image_shards([nulls])
    assert check_image_shards([a]) == [3]


def test_duplicate_and_null_keys_in_a_shard_are_quarantined(tmp_path: Path, blob) -> None:
    # Repeats inside one batch and across batches; the first row with a key is the one kept.
    keys = ["a", "b", "a", None, "c", "a"]
    got = _ingest(tmp_path, blob, keys, [GOOD] * len(keys), batch_size=2)
    assert got["keys"] == ["a", "b", "c"] and got["rec"]["rejected"] == 3
    assert got["rejects"] == {
        "a": "duplicate key in this shard (the first row with it is kept)",
        None: "key is null",
    }


def test_a_key_shared_by_two_shards_is_named_by_the_index() -> None:
    # Keys are unique per shard by the ingest; one repeated across shards stops the index.
    batches = [(np.array(["a", "b"], object), np.eye(2, DIM, dtype=np.float32))] * 2
    with pytest.raises(ValueError, match="gallery keys must be unique.*'a' is in more than one"):
        build_index(iter(batches), DIM, IndexConfig())


@pytest.mark.parametrize(
    ("cols", "message"),
    [
        ({"key": ["a"], "label": [1]}, "missing required column 'image' (has key, label)"),
        ({"image": [GOOD]}, "missing required column 'key'"),
        ({"key": [1], "image": [GOOD]}, "column 'key' must be string, got int64"),
        ({"key": ["a"], "image": ["not bytes"]}, "column 'image' must be binary, got string"),
        ({"key": ["a"], "image": [GOOD], "label": ["cat"]}, "column 'label' must be integer"),
        ({"key": ["a"], "image": [GOOD], "split": [1]}, "column 'split' must be string"),
    ],
    ids=["no_image", "no_key", "int_key", "str_image", "str_label", "int_split"],
)
def test_missing_or_mistyped_image_column_names_file_and_column(
    tmp_path: Path, cols: dict, message: str
) -> None:
    f = _shard(tmp_path / "shard-00000.parquet", **cols)
    with pytest.raises(DataError) as e:
        check_image_shards([f])
    assert str(e.value).startswith(f"{f}: {message}")


def test_missing_column_in_a_batch_names_the_column() -> None:
    with pytest.raises(ValueError, match=r"batch has no 'image' column \(has \['key'\]\)"):
        decode_batch({"key": np.array(["a"], object)}, PRE, MAX_PIXELS)


def test_missing_or_mistyped_gallery_column_names_the_file(tmp_path: Path) -> None:
    g = Gallery(str(tmp_path / "gallery"))
    rec = {"shard_id": 0, "path": shard_file(0), "rows": 1}
    uri_io.write_table(pa.table({"key": ["a"], "emb": [[1.0, 2.0]]}), g.shard_uri("v", 0))
    with pytest.raises(GalleryError, match=r"shard-00000.parquet: missing column\(s\) \['embed"):
        list(g.iter_embeddings("v", records=[rec]))
    ragged = pa.table({"key": ["a"], "embedding": [[1.0, 2.0]]})  # variable-length lists
    uri_io.write_table(ragged, g.shard_uri("v", 0))
    with pytest.raises(GalleryError, match="'embedding' must be a fixed-size list of float32"):
        list(g.iter_embeddings("v", records=[rec]))
    with pytest.raises(ValueError, match="must be a fixed-size list of float32, got list<"):
        arrow_to_embeddings(ragged["embedding"])


def test_empty_shard_commits_zero_rows(tmp_path: Path, blob: ModelBlob) -> None:
    # An image shard with no rows is complete from the start (no Ray work is even started).
    empty = _image_shard(tmp_path / "images" / "shard-00000.parquet", [])
    assert check_image_shards([empty]) == [0]
    g = Gallery(str(tmp_path / "gallery"))
    res = embed_images_to_version(
        {0: empty}, g, "v1", blob, EmbedConfig(), {}, "embed:m", quiet=True
    )
    assert (res.rows_in, res.rows_written, res.rows_rejected, res.shards_written) == (0, 0, 0, 1)
    rec = g.committed_shards("v1")[0]
    assert (rec["rows"], rec["rejected"], rec["rows_in"]) == (0, 0, 0)
    assert uri_io.read_table(g.shard_uri("v1", 0)).num_rows == 0
    # ... and an empty gallery shard scans as zero rows for the planner.
    assert len(scan_shard(g.shard_uri("v1", 0), None, None, "v2").keys) == 0


def test_zero_byte_shard_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "shard-00000.parquet"
    f.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{f}: not a readable Parquet file"):
        check_image_shards([str(f)])


def test_prepare_refuses_to_write_empty_shards(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        ["data", "prepare", "--source", "synthetic", "--synthetic-n", "2", "--shards", "3"]
        + ["--out", str(tmp_path / "o")],
    )
    assert res.exit_code == 2
    assert "source 'synthetic' has 2 rows, fewer than shards=3" in _out(res)


# ---------------------------------------------------------------- paths


def test_nonexistent_paths_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}.yaml"):
        load_config(f"{missing}.yaml")
    with pytest.raises(FileNotFoundError, match=f"no such file: {missing}/shard-00000.parquet"):
        check_image_shards([f"{missing}/shard-00000.parquet"])
    with pytest.raises(FileNotFoundError, match=f"source not found: {missing}.npz"):
        prepare(f"{missing}.npz", str(tmp_path / "o"), 1, None, load_config().data)
    with pytest.raises(FileNotFoundError, match=f"no such file: {missing}.pt"):
        resolve_blob(ModelConfig(name="m", uri=f"{missing}.pt"))
    with pytest.raises(FileNotFoundError, match=f"no such file or directory: {missing}"):
        image_shards(load_config(None, [f"images={missing}"]))
    for args, text in [
        (["config", "-c", f"{missing}.yaml"], f"config file not found: {missing}.yaml"),
        (["versions", str(missing)], f"no gallery at {missing}"),
        (["data", "prepare", "--source", f"{missing}/", "--out", str(tmp_path)], "not found"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert text in _out(res)


def test_a_long_error_is_one_line_and_not_markup(tmp_path: Path) -> None:
    missing = tmp_path / ("d" * 150) / "[bold]gallery"
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "versions", str(missing)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.splitlines() == [f"error: no gallery at {missing}"]


def test_unreadable_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match=f"cannot read config file {binary}: 'utf-8' codec"):
        load_config(binary)
    res = runner.invoke(app, ["config", "-c", str(binary)])
    assert res.exit_code == 2 and f"cannot read config file {binary}" in _out(res)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(b"PK\x03\x04 cut short")
    res = runner.invoke(app, ["data", "prepare", "--source", str(cut), "--out", str(tmp_path)])
    assert res.exit_code == 2 and f"{cut}: not a readable .npz file" in _out(res)
    # A file the folder source cannot read (tests may run as root: permissions are simulated).
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    locked = tmp_path / "imgs" / "cat" / "locked.png"
    locked.write_bytes(GOOD)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=f"{locked}: cannot read: Permission denied"):
        prepare(str(tmp_path / "imgs"), str(tmp_path / "o"), 1, None, load_config().data)


# ---------------------------------------------------------------- embeddings


def _version(g: Gallery, name: str, keys: list[str], emb: np.ndarray) -> None:
    """A finished gallery version of one shard."""
    d = emb.shape[1]
    cols = [
        pa.array(keys, pa.string()),
        embeddings_to_arrow(emb),
        pa.array([f"embed:{name}"] * len(keys), pa.string()),
    ]
    uri_io.write_table(pa.Table.from_arrays(cols, schema=embedding_schema(d)), g.shard_uri(name, 0))
    g.commit_shard(name, {"shard_id": 0, "path": shard_file(0), "rows": len(keys)})
    g.finalize(name, {"embedding_dim": d})


def _chain(old_dim: int = DIM) -> TransformChain:
    torch.manual_seed(0)
    h = Transformation(old_dim, DIM, inner_dim=8, uncertainty=True).eval()
    meta = {"kind": "transformation", "name": "h", "arch": h.config()}
    return TransformChain(ChainSpec(["h"], [meta], [save(h.state_dict())]))


def test_embeddings_of_the_wrong_dimension(tmp_path: Path) -> None:
    g = Gallery(str(tmp_path / "gallery"))
    keys = ["a", "b", "c"]
    _version(g, "v1", keys, np.eye(3, DIM, dtype=np.float32))
    _version(g, "v2", keys, np.eye(3, DIM + 1, dtype=np.float32))
    g.finalize("v2", {"embedding_dim": DIM})  # the manifest says 4-d, the shard holds 5-d
    with pytest.raises(GalleryError, match=r"v2/shard-00000.parquet: column 'embedding' holds 5-d"):
        list(g.iter_embeddings("v2"))
    report = ValidationReport("v2", "v1")
    check_keys_and_values(g, "v1", "v2", DIM, report)
    assert not report.ok
    assert {c["check"]: c["detail"] for c in report.checks}["dimension"] == "shard 0: dim 5"
    with pytest.raises(ValueError, match=r"transformation 'h' maps 4-d embeddings, got .*\(3, 5\)"):
        _chain()(np.eye(3, DIM + 1, dtype=np.float32), None)
    with pytest.raises(ValueError, match=r"embeddings have shape \(3, 5\), expected \(n, 4\)"):
        build_index(
            iter([(np.array(keys, object), np.eye(3, 5, dtype=np.float32))]), DIM, IndexConfig()
        )


def test_embeddings_with_nan_or_inf(tmp_path: Path) -> None:
    g = Gallery(str(tmp_path / "gallery"))
    keys = [f"k{i}" for i in range(6)]
    old = np.random.default_rng(0).normal(size=(6, DIM)).astype(np.float32)
    old[2, 1], old[4, 0] = np.nan, np.inf
    _version(g, "v1", keys, old)
    # h: those rows come out NaN and most uncertain, so a partial backfill re-embeds them first.
    pred, log_var = _chain()(old, None)
    assert np.isnan(pred[[2, 4]]).all() and np.isfinite(np.delete(pred, [2, 4], axis=0)).all()
    assert np.isposinf(log_var[[2, 4]]).all() and np.isfinite(np.delete(log_var, [2, 4])).all()
    scan = scan_shard(g.shard_uri("v1", 0), None, _chain(), "v2")
    assert set(scan.keys[reembed_order(scan)[:2]].tolist()) == {"k2", "k4"}
    # Left transformed, they fail validation (the version is not promoted) ...
    _version(g, "v2", keys, pred)
    report = ValidationReport("v2", "v1")
    check_keys_and_values(g, "v1", "v2", DIM, report)
    assert {c["check"]: (c["ok"], c["detail"]) for c in report.checks}["finite"] == (
        False,
        "2 rows with NaN/inf",
    )
    # ... and the index refuses them.
    with pytest.raises(ValueError, match="embeddings contain NaN or infinite values"):
        build_index(iter([(np.array(keys, object), pred)]), DIM, IndexConfig())


def test_model_output_size_differs_from_config(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    net = EmbeddingNet(ArchitectureConfig(widths=[4], embedding_dim=6, num_classes=2), 1).eval()
    torch.jit.save(torch.jit.trace(net, torch.zeros(2, 1, 8, 8)), str(path))

    def blob_of(dim: int, pre: PreprocessConfig = PRE) -> ModelBlob:
        arch = ArchitectureConfig(embedding_dim=dim)
        return resolve_blob(
            ModelConfig(name="user", uri=str(path), preprocess=pre, architecture=arch)
        )

    EmbedStage(blob_of(6))  # matches: builds
    with pytest.raises(ModelLoadError) as e:
        EmbedStage(blob_of(DIM))
    assert str(e.value) == (
        "model 'user' outputs shape (2, 6), but the config says architecture.embedding_dim=4"
    )
    with pytest.raises(ModelLoadError, match=r"'user' failed on input of shape \(2, 3, 8, 8\)"):
        EmbedStage(blob_of(6, RGB))  # a 1-channel model given 3-channel input


# ---------------------------------------------------------------- config


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("gallery: s3://b/g\nnew_model: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"(?s)malformed YAML in {p}: .*line 2, column 12"):
        load_config(p)
    res = runner.invoke(app, ["config", "-c", str(p)])
    assert res.exit_code == 2 and f"malformed YAML in {p}" in _out(res)


def test_duplicate_yaml_key_is_refused(tmp_path: Path) -> None:
    # Plain YAML keeps the last of two equal keys: the first section would vanish silently.
    p = tmp_path / "dup.yaml"
    p.write_text("new_model:\n  name: v3\nplan: {}\nnew_model:\n  train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=rf"malformed YAML in {p}: duplicate key 'new_model'"):
        load_config(p)
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_config(None, ["new_model.train={epochs: 1, epochs: 2}"])
    # A key next to a `<<` merge overrides the merged one on purpose: not a duplicate.
    cfg = load_config(None, ["new_model.train={<<: {epochs: 3, lr: 0.1}, epochs: 4}"])
    assert (cfg.new_model.train.epochs, cfg.new_model.train.lr) == (4, 0.1)


def test_unknown_config_keys_name_their_path(tmp_path: Path) -> None:
    p = tmp_path / "typo.yaml"
    p.write_text("new_model:\n  train:\n    epochz: 3\nplann: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "new_model.train.epochz: unknown key" in str(e.value)
    assert "plann: unknown key" in str(e.value)
    res = runner.invoke(app, ["config", "--set", "embed.batchsize=3"])
    assert res.exit_code == 2 and "embed.batchsize: unknown key" in _out(res)


@pytest.mark.parametrize("cron", ["0 25 * * *", "nightly", "0 2 * *", "*/0 * * * *"])
def test_bad_cron_expression_names_the_key(cron: str) -> None:
    with pytest.raises(ConfigError, match=r"schedule\.cron: .*is not a 5-field cron"):
        load_config(None, [f"schedule.cron={cron!r}"])
    res = runner.invoke(app, ["schedule", "--once", "--cron", cron])
    assert res.exit_code == 2
    assert f"schedule.cron: Value error, {cron!r} is not a 5-field cron expression" in _out(res)
