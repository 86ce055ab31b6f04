"""Rows of a published table, as plain stages over batches: one read task per gallery shard
(its rows streamed in blocks), labels joined from the shard's image file where it has them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import StorageConfig
from pipeline.data.shards import DataError
from pipeline.gallery.store import Gallery, check_embedding_type
from pipeline.io import uri as uri_io
from pipeline.upgrade.hops import stored_chains

GALLERY_COLUMNS = ("key", "embedding", "source", "uncertainty", "chain", "hops")


def publish_schema(dim: int) -> pa.Schema:
    """key, the embedding as a fixed-size float32 vector, label (null where unknown), how the
    row was produced, FastFill's uncertainty (null where embedded), the models it went through
    since its image was last embedded (chain, hops: docs/generations.md), the gallery version."""
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("label", pa.int64()),
            pa.field("source", pa.string()),
            pa.field("uncertainty", pa.float32()),
            pa.field("chain", pa.string()),
            pa.field("hops", pa.int32()),
            pa.field("version", pa.string()),
        ]
    )


def shard_items(g: Gallery, version: str, records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One work item per shard: its gallery file and the image file its labels come from."""
    return [
        {"file": g.path("versions", version, r["path"]), "image_file": r.get("image_file") or ""}
        for r in records
    ]


def labels_of(image_file: str, storage: StorageConfig | None) -> pa.Table | None:
    """key → label of a shard's image file; None when there is no such file or no label."""
    if not image_file or not uri_io.exists(image_file, storage):
        return None
    if "label" not in uri_io.parquet_columns(image_file, storage):
        return None
    return uri_io.read_table(image_file, storage, columns=["key", "label"])


def to_publish_rows(
    batch: pa.RecordBatch, labels: pa.Table | None, version: str, schema: pa.Schema, space: str
) -> pa.Table:
    """One gallery batch as rows of the published table (columns a shard lacks become nulls);
    `space` is the version's model, the chain of rows a shard written before chains has."""
    n = batch.num_rows
    cols: dict[str, Any] = {"key": batch.column("key"), "embedding": batch.column("embedding")}
    if labels is not None:
        pos = pc.index_in(batch.column("key"), value_set=labels.column("key"))
        cols["label"] = pc.take(labels.column("label"), pos).cast(pa.int64())
    for name in ("source", "uncertainty"):
        if name in batch.schema.names:
            cols[name] = batch.column(name)
    chain, hops = stored_chains(batch, space)
    cols["chain"], cols["hops"] = pa.array(chain, pa.string()), pa.array(hops)
    cols["version"] = pa.array(np.full(n, version, dtype=object), pa.string())
    arrays = [cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def read_publish_rows(
    batch: dict[str, np.ndarray],
    storage: StorageConfig | None,
    version: str,
    space: str,
    dim: int,
    rows: int,
) -> Iterator[pa.Table]:
    """Ray Data stage: each input row names a gallery shard; yields its rows, `rows` at a time."""
    schema = publish_schema(dim)
    for file_uri, image_file in zip(
        batch["file"].tolist(), batch["image_file"].tolist(), strict=True
    ):
        labels = labels_of(image_file, storage)
        have = uri_io.parquet_columns(file_uri, storage)
        columns = [c for c in GALLERY_COLUMNS if c in have]
        if "key" not in columns or "embedding" not in columns:
            raise DataError(f"{file_uri}: needs 'key' and 'embedding' columns (has {have})")
        for b in uri_io.iter_parquet_batches(file_uri, storage, columns, rows):
            if why := check_embedding_type(b.schema.field("embedding").type, dim):
                raise DataError(f"{file_uri}: column 'embedding' {why}")
            yield to_publish_rows(b, labels, version, schema, space)
