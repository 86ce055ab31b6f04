"""Prepare Parquet image shards from digits, a .npz, a folder of images or a synthetic generator."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.choices import SHARD_ORDERS
from pipeline.config import DataConfig, StorageConfig
from pipeline.data.shards import (
    DataError,
    make_image_table,
    shard_id_from_name,
    shard_name,
    split_for_key,
)
from pipeline.io import uri

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
# Stored as is: every consumer reads PNG and JPEG, and re-encoding JPEG as PNG bloats it.
_PASSTHROUGH_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})
VALID_SOURCES = (
    "'digits', 'synthetic', a path to a .npz file, or a directory of images (flat: unlabelled; "
    "or in class sub-folders)"
)

# Rows -> (keys, encoded images, labels) for the given source row indices.
EncodeFn = Callable[[np.ndarray], tuple[list[str], list[bytes], list[int | None]]]


@dataclass
class PrepareResult:
    """What `prepare` wrote, with timings in seconds."""

    out_uri: str
    files: list[str]
    rows: int
    rows_per_shard: list[int]
    classes: list[str]
    seconds: float
    source: str = ""
    val_rows: int = 0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Source:
    """A prepared source: how many rows, their class names and how to encode any subset."""

    name: str
    n: int
    classes: list[str]
    encode: EncodeFn
    labels: np.ndarray | None = None


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def _array_source(name: str, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> _Source:
    def encode(idx: np.ndarray) -> tuple[list[str], list[bytes], list[int]]:
        keys = [f"{name}-{int(i):07d}" for i in idx]
        return keys, [encode_png(images[i]) for i in idx], [int(labels[i]) for i in idx]

    return _Source(name, len(images), classes, encode, np.asarray(labels))


def _digits_source() -> _Source:
    from sklearn.datasets import load_digits  # start-up: importing scikit-learn takes ~1 s

    digits = load_digits()
    # load_digits holds 0..16 intensities; stretch to the full 8-bit range.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _array_source("digits", images, digits.target, [str(c) for c in range(10)])


def synthetic_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """n learnable grayscale images of 10 classes: a bar whose orientation is the class.

    Position, length, width, brightness and pixel noise vary per image. Each block of 1024
    images has its own seeded generator, so image i is the same whatever n is.
    """
    if n < 1:
        raise DataError(f"synthetic_n must be >= 1, got {n}")
    images = np.empty((n, size, size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    block = 1024
    for k, start in enumerate(range(0, n, block)):
        m = min(block, n - start)
        rng = np.random.default_rng([seed, k])
        lab = rng.integers(0, 10, block)[:m]
        angle = lab * (np.pi / 10) + rng.normal(0.0, 0.06, block)[:m]
        cx, cy = (size - 1) / 2 + rng.uniform(-size / 9, size / 9, (2, block))[:, :m]
        half = rng.uniform(size * 0.22, size * 0.38, block)[:m]
        width = rng.uniform(0.7, 1.6, block)[:m]
        ink = rng.uniform(0.6, 1.0, block)[:m]
        noise = rng.normal(0.0, 0.1, (block, size, size))[:m]
        ux, uy = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
        t = np.clip(dx * ux + dy * uy, -half[:, None, None], half[:, None, None])
        dist = np.hypot(dx - t * ux, dy - t * uy)
        img = ink[:, None, None] * np.clip(width[:, None, None] + 0.5 - dist, 0.0, 1.0) + noise
        images[start : start + m] = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
        labels[start : start + m] = lab
    return images, labels


def _npz_source(path: Path) -> _Source:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = npz.files
            arrays = {k: npz[k] for k in ("images", "labels") if k in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # empty, cut, pickled
        raise DataError(f"{path}: not a readable .npz file: {e}") from None
    for name in ("images", "labels"):
        if name not in arrays:
            raise DataError(f"{path}: missing array {name!r} (has {', '.join(names)})")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8:
        raise DataError(f"{path}: array 'images' must be uint8, got {images.dtype}")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3, 4))):
        raise DataError(
            f"{path}: array 'images' must be (N, H, W) or (N, H, W, C) with C in 1/3/4, "
            f"got shape {images.shape}"
        )
    if (
        labels.ndim != 1
        or len(labels) != len(images)
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DataError(
            f"{path}: array 'labels' must be integer (N,) with N={len(images)}, "
            f"got {labels.dtype} {labels.shape}"
        )
    classes = [str(c) for c in np.unique(labels)]
    return _array_source(path.stem, images, labels.astype(np.int64), classes)


def _image_bytes(path: Path) -> bytes:
    """File bytes, converted to PNG unless already PNG/JPEG."""
    try:
        data = path.read_bytes()
    except OSError as e:  # unreadable (permissions) or gone since the folder was listed
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.suffix.lower() in _PASSTHROUGH_EXTENSIONS:
        return data
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in _PNG_MODES:  # e.g. CMYK, which PNG cannot store
                img = img.convert("RGBA" if "A" in img.mode else "RGB")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
    except Exception as e:
        raise DataError(f"{path}: cannot convert to PNG: {e}") from e


def _images_in(folder: Path, root: Path, recursive: bool) -> list[str]:
    """Image files under `folder` (hidden ones left out), as sorted paths relative to root."""
    out: list[str] = []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        rel = p.relative_to(root)
        hidden = any(part.startswith(".") for part in rel.parts)
        if p.is_file() and not hidden and p.suffix.lower() in IMAGE_EXTENSIONS:
            out.append(rel.as_posix())
    return out


def _folder_source(root: Path) -> _Source:
    """Class sub-folders (labels by sorted folder name) and images directly in the folder
    (no label): a flat folder of images is an unlabelled gallery."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = _images_in(root, root, recursive=False)
    labels: list[int | None] = [None] * len(files)
    for label, cls in enumerate(classes):
        found = _images_in(root / cls, root, recursive=True)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(
            f"{root}: the folder has no images (expected {root}/<image>.jpg or "
            f"{root}/<class>/<image>.png; "
            f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )

    def encode(idx: np.ndarray) -> tuple[list[str], list[bytes], list[int | None]]:
        keys = [files[i] for i in idx]
        return keys, [_image_bytes(root / k) for k in keys], [labels[i] for i in idx]

    labelled = all(y is not None for y in labels)
    shown = classes if any(y is not None for y in labels) else []
    return _Source(root.name, len(files), shown, encode, np.asarray(labels) if labelled else None)


def _open_source(source: str, data: DataConfig, synthetic_n: int) -> _Source:
    if source == "digits":
        return _digits_source()
    if source == "synthetic":
        images, labels = synthetic_images(synthetic_n, data.seed)
        return _array_source("synthetic", images, labels, [str(c) for c in range(10)])
    path = Path(source).expanduser()
    looks_like_path = source.endswith(".npz") or "/" in source or source.startswith((".", "~"))
    if not path.exists():
        if looks_like_path:
            raise FileNotFoundError(f"source not found: {source}")
        raise DataError(f"unknown source {source!r}: expected {VALID_SOURCES}")
    if path.is_dir():
        return _folder_source(path)
    if path.suffix.lower() == ".npz":
        return _npz_source(path)
    raise DataError(f"source {source!r} is a file but not a .npz: expected {VALID_SOURCES}")


def _remove_stale_shards(out_uri: str, keep: int, storage: StorageConfig | None) -> None:
    # A rerun with fewer shards must not leave old shards behind to be read as data.
    for name in uri.list_dir(out_uri, storage):
        try:
            sid = shard_id_from_name(name)
        except ValueError:
            continue
        if sid >= keep:
            uri.delete(uri.join(out_uri, name), storage)


def _row_order(src: _Source, source: str, seed: int, limit: int | None, order: str) -> np.ndarray:
    """The source's row indices in shard order: shuffled (seeded), or grouped by label."""
    # Shuffle before sharding: array sources are often sorted by label.
    if order not in SHARD_ORDERS:
        raise DataError(f"order must be one of {', '.join(SHARD_ORDERS)}, got {order!r}")
    perm = np.random.default_rng(seed).permutation(src.n)[:limit]
    if order == "label":
        if src.labels is None:
            raise DataError(f"source {source!r} has no labels to order the shards by")
        perm = perm[np.argsort(src.labels[perm], kind="stable")]
    return perm


def _write_shards(
    src: _Source,
    order: np.ndarray,
    shards: int,
    out_uri: str,
    storage: StorageConfig | None,
    data: DataConfig,
    timings: dict[str, float],
) -> tuple[list[str], list[int], int]:
    """Encode and write the rows as `shards` shards; (files, rows per shard, val rows).
    Adds the seconds spent to `timings`."""
    files: list[str] = []
    rows_per_shard: list[int] = []
    val_rows = 0
    for i, idx in enumerate(np.array_split(order, shards)):
        t = time.perf_counter()
        keys, images, labels = src.encode(idx)
        splits = [split_for_key(k, data.val_fraction, data.seed) for k in keys]
        table = make_image_table(keys, images, labels, splits)
        timings["encode"] += time.perf_counter() - t
        t = time.perf_counter()
        file_uri = uri.join(out_uri, shard_name(i))
        uri.write_table(table, file_uri, storage)
        timings["write"] += time.perf_counter() - t
        files.append(file_uri)
        rows_per_shard.append(table.num_rows)
        val_rows += splits.count("val")
    return files, rows_per_shard, val_rows


def prepare(
    source: str,
    out_uri: str,
    shards: int,
    storage: StorageConfig | None,
    data: DataConfig,
    synthetic_n: int = 2000,
    limit: int | None = None,
    order: str = "shuffle",
) -> PrepareResult:
    """Write `source` as `shards` shuffled Parquet shards shard-00000.parquet... under out_uri.

    order="label" keeps the shuffle within a label but sorts shards by label, like a gallery
    that grew category by category: later shards hold content the old model never saw.
    """
    t0 = time.perf_counter()
    if shards < 1:
        raise DataError(f"shards must be >= 1, got {shards}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    src = _open_source(source, data, synthetic_n)
    if src.n == 0:
        raise DataError(f"source {source!r} has no images")
    perm = _row_order(src, source, data.seed, limit, order)
    if len(perm) < shards:
        raise DataError(f"source {source!r} has {len(perm)} rows, fewer than shards={shards}")
    timings = {"read": time.perf_counter() - t0, "encode": 0.0, "write": 0.0}
    files, rows_per_shard, val_rows = _write_shards(
        src, perm, shards, out_uri, storage, data, timings
    )
    _remove_stale_shards(out_uri, shards, storage)
    return PrepareResult(
        out_uri=out_uri,
        files=files,
        rows=sum(rows_per_shard),
        rows_per_shard=rows_per_shard,
        classes=src.classes,
        seconds=time.perf_counter() - t0,
        source=src.name,
        val_rows=val_rows,
        timings=timings,
    )
