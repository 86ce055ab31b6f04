"""Rows of given keys in a gallery version, in the order of the keys (streamed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.gallery.store import Gallery, arrow_to_embeddings


def version_rows(
    g: Gallery, version: str, keys: list[str], column: str = "embedding"
) -> tuple[np.ndarray, np.ndarray]:
    """`column` of the given keys in a version, in the order of `keys` (streamed).

    Returns (values (n, d) float32, found mask); rows of keys the version lacks are zeros.
    """
    pos = {k: i for i, k in enumerate(keys)}
    value_set = pa.array(keys, pa.string())
    out: np.ndarray | None = None
    found = np.zeros(len(keys), dtype=bool)
    for b in g.iter_embeddings(version, columns=("key", column)):
        t = pa.Table.from_batches([b])
        t = t.filter(pc.is_in(t["key"], value_set=value_set))
        if not t.num_rows:
            continue
        vals = arrow_to_embeddings(t[column])
        if out is None:
            out = np.zeros((len(keys), vals.shape[1]), np.float32)
        idx = np.array([pos[k] for k in t["key"].to_pylist()], dtype=np.int64)
        out[idx], found[idx] = vals, True
    return (out if out is not None else np.zeros((len(keys), 0), np.float32)), found
