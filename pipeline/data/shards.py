"""Image-shard format: Parquet schema, deterministic train/val split and shard file names."""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

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
    """Raise ValueError naming `uri` and the column if the table is not an image shard."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    for column in ("key", "image"):
        if schema.get_field_index(column) < 0:
            raise ValueError(
                f"{uri}: missing required column {column!r} (has {', '.join(schema.names)})"
            )
    expected = {"key": "string", "image": "binary", "label": "integer", "split": "string"}
    for column, want in expected.items():
        idx = schema.get_field_index(column)
        if idx >= 0 and not _type_ok(column, schema.field(idx).type):
            got = schema.field(idx).type
            raise ValueError(f"{uri}: column {column!r} must be {want}, got {got}")
