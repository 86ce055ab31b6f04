"""Image rows for Ray Data: one read task per image shard, streaming it in small blocks.

A unit of work is a shard reference, never data: the dataset starts as one row per shard file,
and each read task yields that file's rows in blocks of `rows` rows. Every actor of the embed
pool then gets work however small or few the files are (a Parquet read of small files may come
back as one block, and one block feeds one actor), and a file that cannot be decoded is named
with its row group instead of surfacing as a bare Arrow error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from pipeline.config import StorageConfig
from pipeline.data.shards import DataError
from pipeline.data.sources import ImageLayout
from pipeline.io import uri as uri_io
from pipeline.io.uri import StorageError


def image_rows_dataset(
    files: dict[str, str],
    storage: StorageConfig | None,
    rows: int,
    num_cpus: float,
    layout: ImageLayout | None = None,
) -> Any:
    """Ray Dataset of `key`, `image`, `reject`, `path` rows from image shard files (URI →
    path tag), read through the shards' layout."""
    items = [{"file": f, "path": p} for f, p in files.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        read_image_rows,
        fn_kwargs={"storage": storage, "rows": rows, "layout": layout},
        batch_size=1,
        num_cpus=num_cpus,
    )


def read_image_rows(
    batch: dict[str, np.ndarray],
    storage: StorageConfig | None,
    rows: int,
    layout: ImageLayout | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage: each input row names a shard file; yields its rows, `rows` at a time
    (`reject`: why a row is refused before decoding, "" when it is not)."""
    for file_uri, path in zip(batch["file"].tolist(), batch["path"].tolist(), strict=True):
        for b in iter_image_rows(file_uri, storage, rows, layout):
            images = np.empty(b.num_rows, dtype=object)  # bytes stay objects, never 'S' width
            images[:] = b.column("image").to_pylist()
            yield {
                "key": b.column("key").to_numpy(zero_copy_only=False),
                "image": images,
                "reject": b.column("reject").to_numpy(zero_copy_only=False),
                "path": np.full(b.num_rows, path, dtype=object),
            }


def iter_image_rows(
    file_uri: str, storage: StorageConfig | None, rows: int, layout: ImageLayout | None = None
) -> Iterator[pa.RecordBatch]:
    """`key`, `image`, `reject` batches of one shard (transient errors retried by `uri_io`); a
    page that stays unreadable is a DataError naming the file and its row group."""
    seen = 0
    try:
        for b in (layout or ImageLayout()).read(file_uri, storage, ["key", "image"], rows):
            yield b
            seen += b.num_rows
    except (StorageError, OSError, pa.ArrowException) as e:
        raise unreadable(file_uri, storage, seen, e) from None


def unreadable(
    file_uri: str, storage: StorageConfig | None, row: int, err: BaseException
) -> Exception:
    """The error for a read that failed at `row`: DataError naming the row group when the file
    opens (its data is corrupt), the storage error itself when even the footer cannot be read."""
    cause = err.__cause__ or err
    try:
        loc = uri_io.resolve(file_uri, storage)
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowException):
        return err if isinstance(err, StorageError) else StorageError(f"read {file_uri}: {err}")
    lo = rg = hi = 0
    for rg in range(meta.num_row_groups):
        hi = lo + meta.row_group(rg).num_rows
        if row < hi:
            break
        lo = hi
    return DataError(
        f"{file_uri}: row group {rg} (rows {lo}-{hi - 1}) cannot be read: "
        f"{type(cause).__name__}: {cause}; fix or replace the file and rerun"
    )
