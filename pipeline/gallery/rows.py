"""Rows of given keys in a gallery version, in the order of the keys (streamed): the one reader
that evaluation, validation, the plan's replay and the versions' metrics share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.gallery.store import Gallery, arrow_to_embeddings
from pipeline.io import uri as uri_io

# A version's shards may hold side-info or not (an ingest without FCT's side model).
OPTIONAL_COLUMNS = ("side_info",)


@dataclass(frozen=True)
class KeyedRows:
    """The rows of `keys` a version holds, each array in the order of the keys.

    `found[i]`: key i is in the version; `shard[i]`: its shard id (-1 when not found);
    `values[column]`: (n, d) float32, zeros where not found. An optional column (side-info)
    is None when no row of the keys has it; `present[column][i]`: key i has a value there.
    """

    found: np.ndarray
    shard: np.ndarray
    values: dict[str, np.ndarray | None] = field(default_factory=dict)
    present: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, column: str) -> np.ndarray | None:
        return self.values[column]


def read_rows(
    g: Gallery, version: str, keys: list[str], columns: Iterable[str] = ("embedding",)
) -> KeyedRows:
    """`columns` of the given keys in a version, streamed shard by shard."""
    wanted = tuple(columns)
    pos = {k: i for i, k in enumerate(keys)}
    want = pa.array(keys, pa.string())
    found = np.zeros(len(keys), dtype=bool)
    shard = np.full(len(keys), -1, np.int64)
    values: dict[str, np.ndarray | None] = dict.fromkeys(wanted)
    has: dict[str, np.ndarray] = {c: np.zeros(len(keys), dtype=bool) for c in wanted}
    m = g.manifest(version)
    for rec in m["shards"]:
        for b in g.iter_embeddings(version, _columns(g, version, rec, wanted), records=[rec]):
            t = pa.Table.from_batches([b])
            t = t.filter(pc.is_in(t["key"], value_set=want))
            if not t.num_rows:
                continue
            idx = np.array([pos[k] for k in t["key"].to_pylist()], dtype=np.int64)
            found[idx], shard[idx] = True, int(rec["shard_id"])
            for c in wanted:
                if c not in t.column_names:
                    continue
                col = t[c].combine_chunks()
                ok = ~np.asarray(col.is_null(), dtype=bool)
                if not ok.any():
                    continue
                vals = arrow_to_embeddings(col.filter(pa.array(ok)))
                if values[c] is None:
                    values[c] = np.zeros((len(keys), vals.shape[1]), np.float32)
                values[c][idx[ok]], has[c][idx[ok]] = vals, True
    for c in wanted:
        if values[c] is None and c not in OPTIONAL_COLUMNS:
            values[c] = np.zeros((len(keys), m.get("embedding_dim") or 0), np.float32)
    return KeyedRows(found, shard, values, has)


def _columns(g: Gallery, version: str, rec: dict, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """ "key" and the wanted columns this shard file has (an optional one may be absent)."""
    optional = [c for c in wanted if c in OPTIONAL_COLUMNS]
    uri = g.path("versions", version, rec["path"])
    present = set(uri_io.parquet_columns(uri, g.storage)) if optional else set()
    return ("key", *(c for c in wanted if c not in OPTIONAL_COLUMNS or c in present))
