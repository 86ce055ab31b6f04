"""faiss index per gallery version: streaming build, search returning keys, save and load."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline.config import IndexConfig, StorageConfig
from pipeline.io.uri import (
    delete,
    join,
    read_bytes,
    read_json,
    read_table,
    write_bytes,
    write_json,
    write_table,
)

INDEX_FILE = "index.faiss"
KEYS_FILE = "index_keys.parquet"
META_FILE = "index.json"

_MIN_TRAIN_ROWS = 10_000
_TRAIN_ROWS_PER_LIST = 50
_UNKNOWN_SIZE_BUFFER = 100_000  # explicit IVF with no row count: size nlist from this many rows
_TUNE_QUERIES = 256
_TUNE_K = 10
_TARGET_RECALL = 0.95
_HNSW_M = 32
_HNSW_EF_SEARCH = 128
# auto: an IVF that needs this fraction of its lists probed is no faster than flat search
# (measured: nprobe 1024 of 4000 on 1M x 128-D, 2 threads, gave 0.96x the flat queries/s),
# so flat, exact, is built instead.
_AUTO_MAX_PROBE_FRACTION = 0.25


@dataclass
class GalleryIndex:
    """A faiss index and the gallery keys in insertion order (faiss id i = keys[i])."""

    index: faiss.Index
    keys: np.ndarray
    metric: str
    dim: int
    kind: str
    nprobe: int | None = None
    estimated_recall: float | None = None

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest k rows per query: (scores or distances (nq,k), keys (nq,k) object array).

        Cosine returns inner products of normalised vectors (higher is closer); l2 returns
        squared L2 distances (lower is closer). k is capped at the index size; a slot that an
        approximate index could not fill has key None.
        """
        x = np.array(vectors, dtype=np.float32, order="C", copy=True)  # copy: normalised in place
        if x.ndim != 2:
            raise ValueError(f"queries must be 2-D (n, dim), got shape {x.shape}")
        if x.shape[1] != self.dim:
            raise ValueError(f"query dim {x.shape[1]} does not match index dim {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.metric == "cosine":
            faiss.normalize_L2(x)
        dist, ids = self.index.search(x, min(k, self.rows))
        keys = np.full(ids.shape, None, dtype=object)
        found = ids >= 0  # faiss pads with -1, which would otherwise index the last key
        keys[found] = self.keys[ids[found]]
        return dist, keys

    def info(self) -> dict[str, Any]:
        """What index.json records: enough to load and to report the index in tracking."""
        return {
            "metric": self.metric,
            "dim": self.dim,
            "kind": self.kind,
            "rows": self.rows,
            "nprobe": self.nprobe,
            "estimated_recall_at_10": self.estimated_recall,
            "faiss_version": faiss.__version__,
        }

    def save(self, uri: str, storage: StorageConfig | None = None) -> None:
        """Write index.faiss, index_keys.parquet, then index.json (last: marks it complete)."""
        # Drop an old index.json first so a reader never pairs it with half-replaced files.
        delete(join(uri, META_FILE), storage)
        write_bytes(join(uri, INDEX_FILE), faiss.serialize_index(self.index).tobytes(), storage)
        table = pa.table({"key": pa.array(self.keys.tolist(), type=pa.string())})
        write_table(table, join(uri, KEYS_FILE), storage)
        write_json(join(uri, META_FILE), self.info(), storage)

    @classmethod
    def load(cls, uri: str, storage: StorageConfig | None = None) -> GalleryIndex:
        """Load an index written by `save`; refuses one whose parts disagree."""
        try:
            meta = read_json(join(uri, META_FILE), storage)
        except FileNotFoundError:
            raise FileNotFoundError(f"no complete index at {uri} ({META_FILE} missing)") from None
        raw = read_bytes(join(uri, INDEX_FILE), storage)
        index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
        keys = read_table(join(uri, KEYS_FILE), storage, columns=["key"]).column("key")
        keys = np.asarray(keys.to_pylist(), dtype=object)
        if not (index.ntotal == len(keys) == meta["rows"]) or index.d != meta["dim"]:
            raise ValueError(
                f"index at {uri} is inconsistent: {index.ntotal} vectors of dim {index.d}, "
                f"{len(keys)} keys, {META_FILE} says {meta['rows']} rows of dim {meta['dim']}"
            )
        out = cls(index, keys, meta["metric"], int(meta["dim"]), meta["kind"])
        out.nprobe, out.estimated_recall = meta.get("nprobe"), meta.get("estimated_recall_at_10")
        if out.nprobe is not None:
            faiss.extract_index_ivf(index).nprobe = int(out.nprobe)
        return out


def _checked(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, metric: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validate each batch and yield (keys as str objects, float32 C-contiguous vectors)."""
    for i, (keys, emb) in enumerate(batches):
        vecs = np.array(emb, dtype=np.float32, order="C", copy=True)
        if vecs.ndim != 2 or vecs.shape[1] != dim:
            raise ValueError(f"batch {i}: embeddings have shape {vecs.shape}, expected (n, {dim})")
        keys = np.asarray(keys, dtype=object).ravel()
        if len(keys) != len(vecs):
            raise ValueError(f"batch {i}: {len(keys)} keys for {len(vecs)} embeddings")
        if not all(isinstance(k, str) for k in keys):
            raise ValueError(f"batch {i}: every key must be a string")
        if not np.isfinite(vecs).all():
            raise ValueError(f"batch {i}: embeddings contain NaN or infinite values")
        if len(vecs) == 0:
            continue
        if metric == "cosine":
            faiss.normalize_L2(vecs)
        yield keys, vecs


def _take(
    stream: Iterator[tuple[np.ndarray, np.ndarray]], rows: int
) -> tuple[list[np.ndarray], list[np.ndarray], bool]:
    """Buffer batches until at least `rows` rows; also report whether the stream ended."""
    keys, vecs, n = [], [], 0
    while n < rows:
        nxt = next(stream, None)
        if nxt is None:
            return keys, vecs, True
        keys.append(nxt[0])
        vecs.append(nxt[1])
        n += len(nxt[1])
    return keys, vecs, False


def _nlist(rows: int) -> int:
    # ~4*sqrt(n) lists, but k-means wants >= 39 training points per list.
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39))


def _train_rows(nlist: int) -> int:
    return max(_TRAIN_ROWS_PER_LIST * nlist, _MIN_TRAIN_ROWS) + _TUNE_QUERIES


def _buffer_rows(kind: str, cfg: IndexConfig, total_rows: int | None) -> int:
    """Rows to hold before creating the index: IVF trains on them, auto decides from them."""
    if kind in ("flat", "hnsw"):
        return 0
    if kind == "auto":  # only when total_rows is unknown: is the gallery above flat_max_rows?
        return cfg.flat_max_rows + 1
    return _train_rows(_nlist(total_rows)) if total_rows is not None else _UNKNOWN_SIZE_BUFFER


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def _flat(dim: int, metric: str) -> faiss.Index:
    return faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)


def _recall_at(probe: faiss.IndexIVF, queries: np.ndarray, truth: np.ndarray, nprobe: int) -> float:
    probe.nprobe = nprobe
    _, got = probe.search(queries, _TUNE_K)
    return float((got[:, :, None] == truth[:, None, :]).any(2).mean())


def _tune_nprobe(trained: faiss.IndexIVF, sample: np.ndarray, metric: str) -> tuple[int, float]:
    """Smallest nprobe whose recall@10 on held-out sample rows reaches the target.

    Doubling finds the power of two that reaches it, bisection the smallest nprobe between
    it and its half (recall never falls as nprobe grows: more lists, a superset of
    candidates); search time grows ~linearly in nprobe, so the doubling step alone could
    cost up to 2x the queries/s. The final index holds more rows per list, so true
    neighbours sit closer to the query and recall at the same nprobe is typically no lower
    than on the sample.
    """
    nq = min(_TUNE_QUERIES, len(sample) // 10)
    base, queries = sample[: len(sample) - nq], sample[len(sample) - nq :]
    if nq < 1 or len(base) < _TUNE_K:
        return trained.nlist, 1.0  # too few rows to measure: probe every list (exact)
    exact = _flat(trained.d, metric)
    exact.add(base)
    _, truth = exact.search(queries, _TUNE_K)
    probe = faiss.clone_index(trained)
    probe.add(base)
    miss, hit = 0, 1  # largest nprobe known to miss the target (0: none), candidate
    recall = _recall_at(probe, queries, truth, hit)
    while recall < _TARGET_RECALL and hit < trained.nlist:
        miss, hit = hit, min(2 * hit, trained.nlist)
        recall = _recall_at(probe, queries, truth, hit)
    if recall < _TARGET_RECALL:
        return hit, recall  # every list probed (reachable only through ties)
    while hit - miss > 1:
        mid = (miss + hit) // 2
        r = _recall_at(probe, queries, truth, mid)
        if r >= _TARGET_RECALL:
            hit, recall = mid, r
        else:
            miss = mid
    return hit, recall


def _new_index(
    kind: str, dim: int, metric: str, rows: int, sample: np.ndarray, auto: bool = False
) -> tuple[faiss.Index, str, int | None, float | None]:
    """An empty index of `kind` (and that kind), trained and tuned on `sample` when it is
    IVF; with `auto`, flat instead of an IVF that must probe a quarter of its lists or more."""
    if kind == "flat":
        return _flat(dim, metric), kind, None, 1.0
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, _HNSW_M, _faiss_metric(metric))
        index.hnsw.efSearch = _HNSW_EF_SEARCH
        return index, kind, None, None
    nlist = min(_nlist(rows), max(1, len(sample) // 39))
    index = faiss.IndexIVFFlat(_flat(dim, metric), dim, nlist, _faiss_metric(metric))
    index.train(sample[: _train_rows(nlist)])
    nprobe, recall = _tune_nprobe(index, sample, metric)
    if auto and nlist > 1 and nprobe >= _AUTO_MAX_PROBE_FRACTION * nlist:
        return _flat(dim, metric), "flat", None, 1.0
    index.nprobe = nprobe
    return index, kind, nprobe, recall


def build_index(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    dim: int,
    cfg: IndexConfig,
    total_rows: int | None = None,
) -> GalleryIndex:
    """Build a faiss index from (keys, embeddings) batches, streaming (bounded extra memory).

    kind auto: flat up to `cfg.flat_max_rows` rows, else IVF (nlist ~ 4*sqrt(n), trained on
    the first ~max(50*nlist, 10k) rows, the smallest nprobe reaching recall@10 >= 0.95 on
    held-out rows), or flat after all where that nprobe is a quarter of the lists or more
    (such an IVF is no faster than exact search).
    Pass `total_rows` when known (from the manifest): it avoids buffering to decide the kind
    and sizes nlist for the whole gallery instead of the buffered part.
    """
    kind = cfg.kind
    if kind == "auto" and total_rows is not None:
        kind = "flat" if total_rows <= cfg.flat_max_rows else "ivf"
    stream = _checked(batches, dim, cfg.metric)
    head_keys, head_vecs, ended = _take(stream, _buffer_rows(kind, cfg, total_rows))
    if kind == "auto":
        kind = "flat" if ended else "ivf"
    sample = np.concatenate(head_vecs) if head_vecs else np.zeros((0, dim), np.float32)
    if kind == "ivf" and len(sample) == 0:
        raise ValueError("cannot build an index over an empty gallery (no rows in any batch)")
    rows = total_rows if total_rows is not None else len(sample)
    auto = cfg.kind == "auto"
    index, kind, nprobe, recall = _new_index(
        kind, dim, cfg.metric, max(rows, len(sample)), sample, auto
    )
    keys = list(head_keys)
    if len(sample):
        index.add(sample)
    del sample, head_vecs  # the buffered rows now live in the index only
    for batch_keys, vecs in stream:
        index.add(vecs)
        keys.append(batch_keys)
    if index.ntotal == 0:
        raise ValueError("cannot build an index over an empty gallery (no rows in any batch)")
    all_keys = np.concatenate(keys)
    seen: set[str] = set()
    for k in all_keys.tolist():
        if k in seen:
            raise ValueError(
                f"gallery keys must be unique (search results map ids back to keys): {k!r} is "
                "in more than one row; two image shards share it"
            )
        seen.add(k)
    return GalleryIndex(index, all_keys, cfg.metric, dim, kind, nprobe, recall)
