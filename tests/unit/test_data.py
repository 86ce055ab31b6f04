"""Unit tests for pipeline.data: shard format, prepare sources and image decoding."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import DataConfig, PreprocessConfig
from pipeline.data.decode import decode_batch, decode_images
from pipeline.data.prepare import encode_png, prepare, synthetic_images
from pipeline.data.shards import (
    IMAGE_SCHEMA,
    make_image_table,
    shard_id_from_name,
    shard_name,
    split_for_key,
    validate_image_table,
)
from pipeline.io import uri

DATA = DataConfig(val_fraction=0.3, seed=7)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _read_all(files: list[str]) -> pa.Table:
    return pa.concat_tables([uri.read_table(f) for f in files])


# ---------------------------------------------------------------- shards


def test_split_is_deterministic_and_fraction_close() -> None:
    keys = [f"k-{i}" for i in range(20000)]
    first = [split_for_key(k, 0.3, 0) for k in keys]
    again = [split_for_key(k, 0.3, 0) for k in keys]
    other_seed = [split_for_key(k, 0.3, 1) for k in keys]
    assert first == again
    assert set(first) == {"train", "val"}
    assert abs(first.count("val") / len(keys) - 0.3) < 0.02
    assert sum(a != b for a, b in zip(first, other_seed, strict=True)) > 4000
    assert split_for_key("x", 0.0, 0) == "train"
    assert split_for_key("x", 1.0, 0) == "val"
    with pytest.raises(ValueError, match="val_fraction"):
        split_for_key("x", 1.5, 0)


def test_shard_names_round_trip_and_reject_others() -> None:
    assert shard_name(0) == "shard-00000.parquet"
    assert shard_name(42) == "shard-00042.parquet"
    assert shard_id_from_name("shard-00042.parquet") == 42
    assert shard_id_from_name("s3://b/images/shard-00007.parquet") == 7
    assert shard_id_from_name(shard_name(123456)) == 123456
    for bad in (
        "shard-1.parquet",
        "shard-00001.csv",
        "part-00001.parquet",
        ".tmp-shard-00001.parquet",
    ):
        with pytest.raises(ValueError, match="not a shard file name"):
            shard_id_from_name(bad)
    with pytest.raises(ValueError, match=">= 0"):
        shard_name(-1)


def test_validate_image_table_names_file_and_column() -> None:
    good = make_image_table(["a"], [b"\x89PNG"], [None], ["train"])
    assert good.schema == IMAGE_SCHEMA
    assert validate_image_table(good, "mem://good") is None
    no_image = pa.table({"key": ["a"], "label": [1]})
    with pytest.raises(ValueError, match=r"mem://x.parquet: missing required column 'image'"):
        validate_image_table(no_image, "mem://x.parquet")
    str_image = pa.table({"key": ["a"], "image": ["not bytes"]})
    with pytest.raises(ValueError, match=r"mem://y.parquet: column 'image' must be binary"):
        validate_image_table(str_image, "mem://y.parquet")
    int_key = pa.table({"key": [1], "image": [b"x"]})
    with pytest.raises(ValueError, match=r"column 'key' must be string, got int64"):
        validate_image_table(int_key.schema, "mem://z.parquet")


# ---------------------------------------------------------------- prepare


def test_prepare_digits(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    out = str(tmp_path / "images")
    res = prepare("digits", out, 3, None, DATA)
    assert res.rows == 1797
    assert res.rows_per_shard == [599, 599, 599]
    assert [Path(f).name for f in res.files] == [shard_name(i) for i in range(3)]
    assert res.classes == [str(c) for c in range(10)]
    table = _read_all(res.files)
    validate_image_table(table, out)
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == 1797
    assert sorted(set(table.column("label").to_pylist())) == list(range(10))
    splits = table.column("split").to_pylist()
    assert set(splits) == {"train", "val"}
    assert splits.count("val") == res.val_rows
    assert abs(res.val_rows / 1797 - 0.3) < 0.05
    # Shuffled: the first shard is not the first 599 digits in order.
    assert keys[:599] != [f"digits-{i:07d}" for i in range(599)]
    digits = load_digits()
    expected = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    for key, png, label in zip(
        keys[:50], table.column("image").to_pylist(), table["label"], strict=False
    ):
        idx = int(key.split("-")[1])
        decoded = np.asarray(Image.open(io.BytesIO(png)))
        np.testing.assert_array_equal(decoded, expected[idx])
        assert label.as_py() == digits.target[idx]


def test_prepare_limit_and_stale_shards_removed(tmp_path: Path) -> None:
    out = str(tmp_path / "images")
    first = prepare("synthetic", out, 4, None, DATA, synthetic_n=40)
    assert first.rows_per_shard == [10, 10, 10, 10]
    second = prepare("synthetic", out, 2, None, DATA, synthetic_n=40, limit=15)
    assert second.rows == 15
    assert second.rows_per_shard == [8, 7]
    assert uri.parquet_files(out) == [uri.join(out, shard_name(0)), uri.join(out, shard_name(1))]


def test_prepare_npz_sorted_by_label_is_shuffled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 12, 10), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 20)
    path = tmp_path / "toy.npz"
    np.savez(path, images=images, labels=labels)
    res = prepare(str(path), str(tmp_path / "out"), 3, None, DATA)
    assert res.rows == 60
    assert res.classes == ["0", "1", "2"]
    first = uri.read_table(res.files[0])
    # Each shard mixes labels although the file is sorted by label.
    assert len(set(first.column("label").to_pylist())) == 3
    table = _read_all(res.files)
    for key, png, label in zip(
        table["key"].to_pylist(),
        table["image"].to_pylist(),
        table["label"].to_pylist(),
        strict=True,
    ):
        assert key.startswith("toy-")
        idx = int(key.split("-")[1])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), images[idx])
        assert label == labels[idx]


def test_prepare_label_order_grows_class_by_class(tmp_path: Path) -> None:
    """order=label: shards follow the labels (a gallery that grew category by category)."""
    res = prepare("synthetic", str(tmp_path / "out"), 5, None, DATA, synthetic_n=100, order="label")
    per_shard = [uri.read_table(f).column("label").to_pylist() for f in res.files]
    flat = [x for shard in per_shard for x in shard]
    assert flat == sorted(flat) and len(flat) == 100
    assert per_shard[0][0] == 0 and per_shard[-1][-1] == 9
    with pytest.raises(ValueError, match="order must be"):
        prepare("synthetic", str(tmp_path / "x"), 2, None, DATA, synthetic_n=10, order="date")


def test_prepare_npz_rgb_and_errors(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    good = tmp_path / "rgb.npz"
    np.savez(good, images=rgb, labels=np.arange(6))
    res = prepare(str(good), str(tmp_path / "out"), 2, None, DATA)
    table = _read_all(res.files)
    key0 = table["key"].to_pylist().index("rgb-0000000")
    img0 = Image.open(io.BytesIO(table["image"][key0].as_py()))
    assert img0.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img0), rgb[0])
    no_labels = tmp_path / "nolabels.npz"
    np.savez(no_labels, images=rgb)
    with pytest.raises(ValueError, match=r"nolabels.npz: missing array 'labels'"):
        prepare(str(no_labels), str(tmp_path / "o2"), 1, None, DATA)
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=rgb.astype(np.float32), labels=np.arange(6))
    with pytest.raises(ValueError, match=r"floats.npz: array 'images' must be uint8"):
        prepare(str(floats), str(tmp_path / "o3"), 1, None, DATA)


def test_prepare_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for cls, value in (("dog", 200), ("cat", 50)):
        (root / cls).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((6, 6), value + j, np.uint8)).save(root / cls / f"{j}.png")
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(root / "cat" / "x.bmp")
    (root / "cat" / "notes.txt").write_text("not an image")
    res = prepare(str(root), str(tmp_path / "out"), 2, None, DATA)
    assert res.classes == ["cat", "dog"]
    assert res.rows == 7
    table = _read_all(res.files)
    rows = {
        k: (img, lab)
        for k, img, lab in zip(
            *(table[c].to_pylist() for c in ("key", "image", "label")), strict=True
        )
    }
    assert sorted(rows) == [
        "cat/0.png",
        "cat/1.png",
        "cat/2.png",
        "cat/x.bmp",
        "dog/0.png",
        "dog/1.png",
        "dog/2.png",
    ]
    assert rows["dog/1.png"][1] == 1
    assert rows["cat/x.bmp"][1] == 0
    # PNGs are stored byte for byte; other formats are converted to PNG.
    assert rows["dog/1.png"][0] == (root / "dog" / "1.png").read_bytes()
    bmp = Image.open(io.BytesIO(rows["cat/x.bmp"][0]))
    assert bmp.format == "PNG"
    np.testing.assert_array_equal(np.asarray(bmp), np.full((4, 4, 3), 9, np.uint8))


def test_prepare_synthetic_is_seeded_and_learnable_shape() -> None:
    a_img, a_lab = synthetic_images(300, seed=3)
    b_img, b_lab = synthetic_images(2000, seed=3)
    c_img, _ = synthetic_images(300, seed=4)
    assert a_img.shape == (300, 28, 28) and a_img.dtype == np.uint8
    np.testing.assert_array_equal(a_img, b_img[:300])
    np.testing.assert_array_equal(a_lab, b_lab[:300])
    assert not np.array_equal(a_img, c_img)
    assert sorted(set(b_lab.tolist())) == list(range(10))

    # Class = bar orientation: class 0 is horizontal (ink spread along x), class 5 vertical.
    def ink_var(imgs: np.ndarray) -> tuple[float, float]:
        w = imgs.astype(float) ** 2  # squared, so the bar outweighs background noise
        ys, xs = np.mgrid[0:28, 0:28]
        mean_x = (w * xs).sum((1, 2)) / w.sum((1, 2))
        mean_y = (w * ys).sum((1, 2)) / w.sum((1, 2))
        var_x = (w * (xs - mean_x[:, None, None]) ** 2).sum((1, 2)) / w.sum((1, 2))
        var_y = (w * (ys - mean_y[:, None, None]) ** 2).sum((1, 2)) / w.sum((1, 2))
        return float(var_x.mean()), float(var_y.mean())

    hx, hy = ink_var(b_img[b_lab == 0])
    vx, vy = ink_var(b_img[b_lab == 5])
    assert hx > 2 * hy
    assert vy > 2 * vx


def test_prepare_synthetic_writes_shards(tmp_path: Path) -> None:
    res = prepare("synthetic", str(tmp_path / "s"), 2, None, DATA, synthetic_n=120)
    again = prepare("synthetic", str(tmp_path / "t"), 2, None, DATA, synthetic_n=120)
    assert res.rows == 120 and res.rows_per_shard == [60, 60]
    assert _read_all(res.files).equals(_read_all(again.files))
    keys = _read_all(res.files)["key"].to_pylist()
    assert sorted(keys) == [f"synthetic-{i:07d}" for i in range(120)]


def test_prepare_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        prepare(missing, str(tmp_path / "o"), 1, None, DATA)
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        prepare(str(tmp_path / "no/such/dir"), str(tmp_path / "o"), 1, None, DATA)
    with pytest.raises(ValueError, match=r"unknown source 'mnist'.*'digits', 'synthetic'"):
        prepare("mnist", str(tmp_path / "o"), 1, None, DATA)
    with pytest.raises(ValueError, match="shards must be >= 1"):
        prepare("synthetic", str(tmp_path / "o"), 0, None, DATA)
    with pytest.raises(ValueError, match="fewer than shards=5"):
        prepare("synthetic", str(tmp_path / "o"), 5, None, DATA, synthetic_n=3)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no images"):
        prepare(str(tmp_path / "empty"), str(tmp_path / "o"), 1, None, DATA)
    assert not uri.exists(str(tmp_path / "o"))


# ---------------------------------------------------------------- decode

GRAY8 = PreprocessConfig(input_size=8, channels=1, mean=[0.5], std=[0.5])
RGB8 = PreprocessConfig(input_size=8, channels=3, mean=[0.5], std=[0.5])


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decode_grayscale_and_constant_normalisation() -> None:
    pre = PreprocessConfig(input_size=8, channels=1, mean=[0.5], std=[0.25])
    res = decode_images([_png(np.full((8, 8), 51, np.uint8))], pre, 10_000)
    assert res.ok.tolist() == [True]
    assert res.errors == [None]
    assert res.pixels.shape == (1, 1, 8, 8) and res.pixels.dtype == np.float32
    # (51/255 - 0.5) / 0.25 = (0.2 - 0.5) / 0.25 = -1.2
    np.testing.assert_allclose(res.pixels, -1.2, atol=1e-6)


def test_decode_rgb_per_channel_normalisation_and_resize() -> None:
    pre = PreprocessConfig(input_size=4, channels=3, mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 1.0])
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 0, 51
    res = decode_images([_png(rgb)], pre, 10_000)
    assert res.pixels.shape == (1, 3, 4, 4)
    np.testing.assert_allclose(res.pixels[0, :, 0, 0], [1.0, -2.0, -0.3], atol=1e-6)
    np.testing.assert_allclose(res.pixels[0, 1], -2.0, atol=1e-6)
    # RGB -> 1 channel uses luminance (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B).
    gray = decode_images([_png(rgb)], GRAY8, 10_000).pixels
    lum = round(0.299 * 255 + 0.114 * 51)
    np.testing.assert_allclose(gray, (lum / 255 - 0.5) / 0.5, atol=1 / 255)
    # Grayscale -> 3 channels replicates the value.
    rep = decode_images([_png(np.full((8, 8), 255, np.uint8))], RGB8, 10_000).pixels
    np.testing.assert_allclose(rep, 1.0, atol=1e-6)


def test_decode_rgba_composites_over_black() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white, hidden where alpha is 0
    rgba[:4, :, 3] = 255  # top half opaque
    res = decode_images([_png(rgba)], RGB8, 10_000)
    assert res.ok.tolist() == [True]
    np.testing.assert_allclose(res.pixels[0, :, :4], 1.0, atol=1e-6)
    np.testing.assert_allclose(res.pixels[0, :, 4:], -1.0, atol=1e-6)


def test_decode_16bit_png_is_rescaled_not_clipped() -> None:
    arr = np.zeros((8, 8), np.uint16)
    arr[:, :4] = 65535
    arr[:, 4:] = 128 * 257
    png = _png(arr)
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    res = decode_images([png], GRAY8, 10_000)
    assert res.ok.tolist() == [True]
    np.testing.assert_allclose(res.pixels[0, 0, :, :4], 1.0, atol=1e-5)
    np.testing.assert_allclose(res.pixels[0, 0, :, 4:], (128 / 255 - 0.5) / 0.5, atol=1e-5)
    rgb = decode_images([png], RGB8, 10_000).pixels
    assert rgb.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(rgb[0, 2, :, :4], 1.0, atol=1e-5)


def test_decode_rejects_bad_rows_without_raising() -> None:
    good = _png(np.full((8, 8), 255, np.uint8))
    big = _png(np.zeros((32, 64), np.uint8))
    inputs = [good, b"", None, good[: len(good) // 2], b"hello, not an image", big, good]
    res = decode_images(inputs, GRAY8, max_pixels=1000)
    assert res.ok.tolist() == [True, False, False, False, False, False, True]
    assert res.pixels.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(res.pixels, 1.0, atol=1e-6)
    assert res.errors[0] is None and res.errors[6] is None
    assert res.errors[1] == "empty image bytes"
    assert res.errors[2] == "empty image bytes"
    assert res.errors[3].startswith("cannot decode image: ")
    assert res.errors[4].startswith("cannot decode image: ")
    assert res.errors[5] == "image too large: 64x32"


def test_decode_guards_decompression_bombs() -> None:
    # Past twice Pillow's MAX_IMAGE_PIXELS, Image.open itself raises before our size check.
    bomb = _huge_png_header(100_000, 100_000)
    res = decode_images([bomb, bomb], GRAY8, max_pixels=10**12)
    assert res.ok.tolist() == [False, False]
    assert res.pixels.shape == (0, 1, 8, 8)
    assert res.errors[0].startswith("image too large: ")
    small_limit = decode_images([bomb], GRAY8, max_pixels=1000)
    assert small_limit.errors[0].startswith("image too large")


def test_decode_jpeg_and_arrow_input() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(buf, format="JPEG", quality=95)
    arr = pa.array([buf.getvalue(), None], type=pa.binary())
    res = decode_images(arr, RGB8, 10**6)
    assert res.ok.tolist() == [True, False]
    assert res.pixels.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(res.pixels, (128 / 255 - 0.5) / 0.5, atol=2 / 255)


def test_decode_mean_std_length_mismatch() -> None:
    pre = PreprocessConfig(input_size=8, channels=3, mean=[0.1, 0.2], std=[0.5])
    with pytest.raises(ValueError, match="1 or 3 values"):
        decode_images([_png(np.zeros((8, 8), np.uint8))], pre, 10_000)


def test_decode_batch_keeps_every_row() -> None:
    good = _png(np.full((8, 8), 0, np.uint8))
    images = np.empty(3, dtype=object)
    images[:] = [good, b"junk", good]
    batch = {
        "key": np.array(["a", "b", "c"], dtype=object),
        "image": images,
        "label": np.array([3, 4, 5]),
        "split": np.array(["train", "val", "train"], dtype=object),
    }
    out = decode_batch(batch, GRAY8, 10_000)
    assert sorted(out) == ["error", "key", "label", "pixels"]
    assert out["key"].tolist() == ["a", "b", "c"]
    assert out["label"].tolist() == [3, 4, 5]
    assert out["pixels"].shape == (3, 64) and out["pixels"].dtype == np.float32
    np.testing.assert_allclose(out["pixels"][[0, 2]], -1.0, atol=1e-6)
    np.testing.assert_array_equal(out["pixels"][1], 0.0)
    assert out["error"][0] == "" and out["error"][2] == ""
    assert out["error"][1].startswith("cannot decode image: ")
    no_label = decode_batch({"key": batch["key"][:1], "image": images[:1]}, GRAY8, 10_000)
    assert sorted(no_label) == ["error", "key", "pixels"]
    with pytest.raises(ValueError, match="no 'image' column"):
        decode_batch({"key": batch["key"]}, GRAY8, 10_000)


def test_encode_png_squeezes_single_channel() -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    img = Image.open(io.BytesIO(encode_png(arr)))
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), arr[..., 0])
