"""Image-shard format: Parquet schema, deterministic train/val split and shard file names."""

from __future__ import annotations

import hashlib
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.io import uri as uri_io

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("label", pa.int64()),
        pa.field("split", pa.string()),
    ]
)
SPLITS = ("train", "val")

_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
# Hashes of keys held in memory at once by `check_image_shards`: 64 Mi x 8 B = 512 MiB. A
# gallery with more rows spills them to local disk in partitions of at most this many.
KEY_HASH_BUDGET = 1 << 26
_warned: set[tuple[str, ...]] = set()  # stray-file warnings already given in this process


class DataError(ValueError):
    """Input data is malformed (an image shard, a prepare source); the message names the file,
    and the row and key where one is at fault."""


def split_for_key(key: str, val_fraction: float, seed: int) -> str:
    """'val' or 'train' from a hash of the key, so a row keeps its split across reruns."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    # Top 53 bits give a float in [0, 1) with no rounding bias.
    u = (int.from_bytes(digest, "big") >> 11) / float(1 << 53)
    return "val" if u < val_fraction else "train"


def shard_name(i: int) -> str:
    """File name of shard `i`: shard-00000.parquet."""
    if i < 0:
        raise ValueError(f"shard id must be >= 0, got {i}")
    return f"shard-{i:05d}.parquet"


def shard_id_from_name(name: str) -> int:
    """Inverse of `shard_name`; accepts a bare name or a path/URI ending in one."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    m = _SHARD_RE.match(base)
    if not m:
        raise ValueError(f"not a shard file name (expected shard-NNNNN.parquet): {name!r}")
    return int(m.group(1))


def make_image_table(
    keys: list[str], images: list[bytes], labels: list[int | None], splits: list[str]
) -> pa.Table:
    """Build one shard's table with IMAGE_SCHEMA."""
    return pa.table(
        {"key": keys, "image": images, "label": labels, "split": splits}, schema=IMAGE_SCHEMA
    )


def _type_ok(column: str, typ: pa.DataType) -> bool:
    if column == "key" or column == "split":
        return pa.types.is_string(typ) or pa.types.is_large_string(typ)
    if column == "image":
        return pa.types.is_binary(typ) or pa.types.is_large_binary(typ)
    if column == "label":
        return pa.types.is_integer(typ) or pa.types.is_null(typ)
    return True


def validate_image_table(table: pa.Table | pa.Schema, uri: str) -> None:
    """Raise DataError naming `uri` and the column if the table is not an image shard."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    for column in ("key", "image"):
        if schema.get_field_index(column) < 0:
            raise DataError(
                f"{uri}: missing required column {column!r} (has {', '.join(schema.names)})"
            )
    expected = {"key": "string", "image": "binary", "label": "integer", "split": "string"}
    for column, want in expected.items():
        idx = schema.get_field_index(column)
        if idx >= 0 and not _type_ok(column, schema.field(idx).type):
            got = schema.field(idx).type
            raise DataError(f"{uri}: column {column!r} must be {want}, got {got}")


def read_footer(file_uri: str, storage: StorageConfig | None) -> tuple[pa.Schema, int]:
    """(schema, rows) of a Parquet file from its footer alone; DataError if it is not one."""
    loc = uri_io.resolve(file_uri, storage)

    def _footer() -> tuple[pa.Schema, int]:
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata.num_rows

    try:
        return uri_io.with_retries(_footer, f"read footer of {file_uri}")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {file_uri}") from None
    except pa.ArrowInvalid as e:  # zero bytes, truncated, or not Parquet at all
        raise DataError(f"{file_uri}: not a readable Parquet file: {e}") from None


def image_shard_files(uri: str, storage: StorageConfig | None = None) -> dict[int, str]:
    """Shard id -> file of the image shards a URI names, ids taken from `shard-NNNNN.parquet`.

    Other Parquet files beside them are left out, named once on stderr: a stray file taken
    for a shard would shift every shard id. A name that starts like a shard but is malformed,
    or two names with one id, raise DataError (which file is meant cannot be guessed).
    """
    files = uri_io.parquet_files(uri, storage)
    if files == [uri]:  # the URI names one file: that file, whatever its name
        m = _SHARD_RE.match(uri.rstrip("/").rsplit("/", 1)[-1])
        return {int(m.group(1)) if m else 0: uri}
    out: dict[int, str] = {}
    strays: list[str] = []
    for f in files:
        name = f.rsplit("/", 1)[-1]
        m = _SHARD_RE.match(name)
        if m is None and name.startswith("shard-"):
            raise DataError(
                f"{f}: looks like an image shard but is not named shard-NNNNN.parquet "
                "(five or more digits): rename it or move it out of the images folder"
            )
        if m is None:
            strays.append(name)
            continue
        sid = int(m.group(1))
        if sid in out:
            other = out[sid].rsplit("/", 1)[-1]
            raise DataError(f"{uri}: {name} and {other} both have shard id {sid}")
        out[sid] = f
    warn_strays(uri, strays)
    if not out:
        raise FileNotFoundError(f"no Parquet image shards (shard-NNNNN.parquet) under {uri}")
    return dict(sorted(out.items()))


def warn_strays(uri: str, strays: list[str], pattern: str = "shard-NNNNN.parquet") -> None:
    """One warning line naming the files left out, once per process and folder content."""
    if not strays or (uri, *strays) in _warned:
        return
    _warned.add((uri, *strays))
    n = len(strays)
    print(
        f"warning: {uri}: ignored {n} file{'s' if n > 1 else ''} not named "
        f"{pattern}: {', '.join(strays)}",
        file=sys.stderr,
    )


def check_image_shards(
    files: Sequence[str],
    storage: StorageConfig | None = None,
    hash_budget: int = KEY_HASH_BUDGET,
) -> list[int]:
    """Rows per image shard, once every file is a readable image shard with unique keys.

    Reads footers, then the key column only. Raises DataError naming the file (not Parquet,
    missing or mistyped column) or the file, row and key (null or duplicate key): which of
    two rows sharing a key is right cannot be guessed, and the gallery maps results by key.
    Memory: 64-bit key hashes, at most `hash_budget` of them at once (beyond that they spill
    to local disk, 8 B a row); suspects are then confirmed exactly by a second key pass.
    """
    rows: list[int] = []
    for f in files:  # every footer first: a wrong schema fails before any column is read
        schema, n = read_footer(f, storage)
        validate_image_table(schema, f)
        rows.append(n)
    check_unique_keys(files, lambda i: _key_columns(files[i], storage), sum(rows), hash_budget)
    return rows


def check_unique_keys(
    names: Sequence[str],
    key_columns: Callable[[int], Iterator[pa.Array]],
    total_rows: int,
    hash_budget: int = KEY_HASH_BUDGET,
) -> None:
    """Raise DataError naming the file, row and key of the first null or duplicate key.

    `key_columns(i)` streams the keys of file `names[i]` in row order (it is read twice when
    a hash repeats). Memory: 64-bit key hashes, at most `hash_budget` at once (the rest spill
    to local disk, 8 B a row); suspects are then confirmed exactly by a second key pass."""
    with _HashPartitions(total_rows, hash_budget) as parts:
        for i, f in enumerate(names):
            row = 0
            for col in key_columns(i):
                if col.null_count:
                    bad = row + col.is_null().to_pylist().index(True)
                    raise DataError(f"{f}: row {bad}: key is null")
                parts.add(_key_hashes(col))
                row += len(col)
        suspects = parts.repeated()
    if suspects.size:
        _name_duplicate(names, key_columns, suspects)


def _key_columns(file_uri: str, storage: StorageConfig | None) -> Iterator[pa.Array]:
    for b in uri_io.iter_parquet_batches(file_uri, storage, ["key"]):
        yield b.column(0)


def _key_hashes(col: pa.Array) -> np.ndarray:
    """64-bit hashes of string keys (vectorised: ~0.2 s per million keys)."""
    # start-up: pandas (~0.4 s) ships with Ray Data; deferred so importing this module stays
    # light.
    from pandas.util import hash_array

    return hash_array(col.to_numpy(zero_copy_only=False), categorize=False)


def _name_duplicate(
    files: Sequence[str], key_columns: Callable[[int], Iterator[pa.Array]], suspects: np.ndarray
) -> None:
    """Second pass over the keys whose hash repeats: raise DataError at the first real
    duplicate, in file order; distinct keys sharing a hash (a 64-bit collision) pass."""
    first: dict[str, tuple[int, int]] = {}
    for i, f in enumerate(files):
        row = 0
        for col in key_columns(i):
            for r in np.flatnonzero(np.isin(_key_hashes(col), suspects)).tolist():
                k = col[r].as_py()
                j, rj = first.setdefault(k, (i, row + r))
                if (j, rj) != (i, row + r):
                    raise DataError(
                        f"{f}: row {row + r}: duplicate key {k!r} (first at {files[j]} row {rj})"
                    )
            row += len(col)


class _HashPartitions:
    """uint64 hashes split by their top bits into partitions of about `budget` each: in memory
    when one partition holds them all, else appended to files in a temporary folder."""

    MAX_SUSPECTS = 1 << 20  # repeated hashes kept for the exact pass (8 MiB)

    def __init__(self, total: int, budget: int):
        n = max(1, -(-total // max(1, budget)))
        self.bits = (n - 1).bit_length()  # 2**bits partitions
        self.mem: list[np.ndarray] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="carryover-keys-") if self.bits else None

    def __enter__(self) -> _HashPartitions:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()

    def _file(self, p: int) -> Path:
        return Path(self.tmp.name) / f"{p:05d}.u64"

    def add(self, h: np.ndarray) -> None:
        if self.tmp is None:
            self.mem.append(h)
            return
        part = h >> np.uint64(64 - self.bits)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange((1 << self.bits) + 1))
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            with open(self._file(p), "ab") as out:
                h[order[bounds[p] : bounds[p + 1]]].tofile(out)

    def repeated(self) -> np.ndarray:
        """Hash values seen more than once (at most MAX_SUSPECTS of them)."""
        found: list[np.ndarray] = []
        for p in range(1 << self.bits):
            if self.tmp is None:
                h = np.concatenate(self.mem) if self.mem else np.empty(0, np.uint64)
                self.mem = []  # one copy of the hashes at a time
            else:
                f = self._file(p)
                h = np.fromfile(f, np.uint64) if f.exists() else np.empty(0, np.uint64)
            h.sort()
            found.append(np.unique(h[1:][h[1:] == h[:-1]]))
            if sum(len(x) for x in found) >= self.MAX_SUSPECTS:
                break
        return np.concatenate(found)[: self.MAX_SUSPECTS]
