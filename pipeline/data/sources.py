"""Image shards as users have them: column mapping, shard naming and img2dataset's status rows.

Every reader of image shards goes through `ImageLayout.read`: it yields batches with the
pipeline's own column names (`key`, `image`, `label`, `split`, and `reject`: the reason a row
is refused before decoding, "" when it is not), whatever the files call them. Shards are read
in place, never copied.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DataConfig, StorageConfig
from pipeline.data.shards import (
    KEY_HASH_BUDGET,
    DataError,
    check_unique_keys,
    image_shard_files,
    read_footer,
    split_for_key,
    warn_strays,
)
from pipeline.io import uri as uri_io

CARRYOVER_PATTERN = "shard-*.parquet"
FIELDS = ("key", "image", "label", "split")
_DEFAULTS = {
    "carryover": {"pattern": CARRYOVER_PATTERN, "key": "key", "image": "image",
                  "label": "label", "split": "split", "status": None, "error": None},
    "img2dataset": {"pattern": "[0-9]*.parquet", "key": "key", "image": "jpg",
                    "label": None, "split": None, "status": "status", "error": "error_message"},
}  # fmt: skip
_LAST_NUMBER = re.compile(r"(\d+)\D*$")


@dataclass(frozen=True)
class ImageLayout:
    """Concrete column names of one image-shard layout; `required` names the optional fields
    (label, split, status) the config set explicitly: those must exist in every file."""

    pattern: str = CARRYOVER_PATTERN
    key: str = "key"
    image: str = "image"
    label: str | None = "label"
    split: str | None = "split"
    status: str | None = None
    error: str | None = None
    required: tuple[str, ...] = ()
    val_fraction: float = 0.3
    seed: int = 0

    @classmethod
    def of(cls, data: DataConfig | None) -> ImageLayout:
        """The layout `data.source` describes (carryover's own when None)."""
        data = data or DataConfig()
        src, d = data.source, _DEFAULTS[data.source.layout]
        cols = src.columns
        set_ = {f: getattr(cols, f) for f in FIELDS if getattr(cols, f) is not None}
        if src.status_column is not None:
            set_["status"] = src.status_column
        return cls(
            pattern=src.shard_pattern or d["pattern"],
            key=cols.key or d["key"],
            image=cols.image or d["image"],
            label=cols.label or d["label"],
            split=cols.split or d["split"],
            status=src.status_column or d["status"],
            error=src.error_column or d["error"],
            required=tuple(f for f in ("label", "split", "status") if f in set_),
            val_fraction=data.val_fraction,
            seed=data.seed,
        )

    def source_of(self, field: str) -> str | None:
        """The file's column for a pipeline field (key, image, label, split, status)."""
        return getattr(self, field)

    def present(self, schema: pa.Schema, uri: str) -> dict[str, str]:
        """Pipeline field -> file column of the fields this file has; DataError naming the file
        and column when a required one is missing or has the wrong type."""
        out: dict[str, str] = {}
        for field in (*FIELDS, "status", "error"):
            col = self.source_of(field)
            if col is None:
                continue
            if schema.get_field_index(col) < 0:
                if field in ("key", "image") or field in self.required:
                    raise DataError(
                        f"{uri}: no column {col!r} for {field} ({_key_of(field)}; "
                        f"the file has {', '.join(schema.names)})"
                    )
                continue
            typ = schema.field(col).type
            if not _type_ok(field, typ):
                raise DataError(
                    f"{uri}: column {col!r} ({field}) must be {_WANT[field]}, got {typ}"
                )
            out[field] = col
        return out

    def read(
        self,
        file_uri: str,
        storage: StorageConfig | None,
        fields: Sequence[str] = ("key", "image"),
        rows: int = 65536,
    ) -> Iterator[pa.RecordBatch]:
        """Batches of `fields` (plus `reject`) of one shard under the pipeline's names."""
        schema, _ = read_footer(file_uri, storage)
        have = self.present(schema, file_uri)
        wanted = [f for f in fields if f in have]
        if "image" in fields and "status" in have:
            wanted += ["status"] + (["error"] if "error" in have else [])
        cols = list(dict.fromkeys(have[f] for f in [*wanted, "key"]))
        for b in uri_io.iter_parquet_batches(file_uri, storage, cols, rows):
            yield self.canonical(b, have, fields)

    def canonical(
        self, b: pa.RecordBatch, have: dict[str, str], fields: Sequence[str]
    ) -> pa.RecordBatch:
        """One batch renamed to the pipeline's fields; a missing label is null, a missing
        split comes from the key's hash, `reject` holds the status column's verdict."""
        key = pc.cast(b.column(have["key"]), pa.string())
        out: dict[str, pa.Array] = {}
        for f in fields:
            if f == "key":
                out[f] = key
            elif f in have:
                out[f] = b.column(have[f])
            elif f == "label":
                out[f] = pa.nulls(b.num_rows, pa.int64())
            elif f == "split":
                splits = [split_for_key(k, self.val_fraction, self.seed) for k in key.to_pylist()]
                out[f] = pa.array(splits, pa.string())
        if "image" in fields:
            out["reject"] = _rejects(b, have)
        return pa.RecordBatch.from_pydict(out)


def _rejects(b: pa.RecordBatch, have: dict[str, str]) -> pa.Array:
    """Per row: "" when the row may be decoded, else why not (img2dataset's error_message)."""
    if "status" not in have:
        return pa.array(np.full(b.num_rows, "", dtype=object), pa.string())
    status = b.column(have["status"]).to_pylist()
    errors = b.column(have["error"]).to_pylist() if "error" in have else [None] * len(status)
    return pa.array(
        [
            "" if s == "success" else (e or f"status {s!r}")
            for s, e in zip(status, errors, strict=True)
        ],
        pa.string(),
    )


_WANT = {"key": "string or integer", "image": "binary", "label": "integer", "split": "string",
         "status": "string", "error": "string"}  # fmt: skip


def _type_ok(field: str, typ: pa.DataType) -> bool:
    if field == "key":
        return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)
    if field == "image":
        return pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_null(typ)
    if field == "label":
        return pa.types.is_integer(typ) or pa.types.is_null(typ)
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)


def _key_of(field: str) -> str:
    if field == "status":
        return "data.source.status_column"
    return f"data.source.columns.{field}"


def shard_files(uri: str, storage: StorageConfig | None, pattern: str) -> dict[int, str]:
    """Shard id -> file of the Parquet files under `uri` whose names match `pattern`, the id
    being the last number in the name (00012.parquet -> 12). Other files are left out and
    named once on stderr; a name without a number, or two with one id, raise DataError."""
    files = uri_io.parquet_files(uri, storage)
    out: dict[int, str] = {}
    strays: list[str] = []
    for f in files:
        name = f.rstrip("/").rsplit("/", 1)[-1]
        if files != [uri] and not fnmatch.fnmatchcase(name, pattern):
            strays.append(name)
            continue
        m = _LAST_NUMBER.search(name.removesuffix(".parquet"))
        if m is None:
            if files == [uri]:
                return {0: uri}
            raise DataError(f"{f}: no shard number in the name (data.source.shard_pattern)")
        sid = int(m.group(1))
        if sid in out:
            other = out[sid].rsplit("/", 1)[-1]
            raise DataError(f"{uri}: {name} and {other} both have shard id {sid}")
        out[sid] = f
    warn_strays(uri, strays, pattern)
    if not out:
        raise FileNotFoundError(f"no Parquet image shards ({pattern}) under {uri}")
    return dict(sorted(out.items()))


def image_files(uri: str, storage: StorageConfig | None, layout: ImageLayout) -> dict[int, str]:
    """Shard id -> image shard file under `uri` for a layout, as absolute URIs."""
    if layout.pattern == CARRYOVER_PATTERN:
        files = image_shard_files(uri, storage)  # its stricter checks of carryover's own names
    else:
        files = shard_files(uri, storage, layout.pattern)
    return {sid: uri_io.absolute(f) for sid, f in files.items()}


def check_shards(
    files: Sequence[str],
    storage: StorageConfig | None,
    layout: ImageLayout,
    hash_budget: int = KEY_HASH_BUDGET,
) -> list[int]:
    """`check_image_shards` for any layout: rows per file, once every file has the layout's
    columns (footers first) and every key is present and unique across files."""
    rows: list[int] = []
    for f in files:
        schema, n = read_footer(f, storage)
        layout.present(schema, f)
        rows.append(n)

    def keys(i: int) -> Iterator[pa.Array]:
        for b in layout.read(files[i], storage, ["key"]):
            yield b.column(0)

    check_unique_keys(files, keys, sum(rows), hash_budget)
    return rows
