"""Image-shard format: Parquet schema, deterministic train/val split and shard file names."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

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


def check_image_shards(files: Sequence[str], storage: StorageConfig | None = None) -> list[int]:
    """Rows per image shard, once every file is a readable image shard with unique keys.

    Reads footers and the key column only. Raises DataError naming the file (not Parquet,
    missing or mistyped column) or the file, row and key (null or duplicate key): which of
    two rows sharing a key is right cannot be guessed, and the gallery maps results by key.
    """
    rows: list[int] = []
    first: dict[str, tuple[int, int]] = {}
    for i, f in enumerate(files):
        schema, n = read_footer(f, storage)
        validate_image_table(schema, f)
        rows.append(n)
        row = 0
        for b in uri_io.iter_parquet_batches(f, storage, ["key"]):
            col = b.column(0)
            if col.null_count:
                bad = row + col.is_null().to_pylist().index(True)
                raise DataError(f"{f}: row {bad}: key is null")
            for r, k in enumerate(col.to_pylist(), start=row):
                j, rj = first.setdefault(k, (i, r))
                if (j, rj) != (i, r):
                    raise DataError(
                        f"{f}: row {r}: duplicate key {k!r} (first at {files[j]} row {rj})"
                    )
            row += b.num_rows
    return rows
