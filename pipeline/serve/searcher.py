"""A gallery version held in memory for queries: its faiss index, key lookup, labels, model.

A `Searcher` never changes once loaded; `LiveSearcher` replaces the whole object when CURRENT
moves (promote, rollback): the new one is loaded fully first, then one reference assignment
swaps it in, so a request always runs on one complete version and none waits for a load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import PreprocessConfig
from pipeline.context import Context
from pipeline.data.decode import decode_images
from pipeline.data.shards import DataError
from pipeline.gallery.index import GalleryIndex
from pipeline.io import uri as uri_io
from pipeline.models.store import build_model, resolve_blob
from pipeline.services.search import (
    QueryError,
    image_bytes_of_key,
    load_adapter,
    model_for_version,
)
from pipeline.services.steps import image_shards, load_index, version_embeddings

log = logging.getLogger(__name__)


class UnknownKey(QueryError):
    """A key query for a key the served version does not hold (HTTP 404)."""


class ModelUnavailable(RuntimeError):
    """An image query while the version's model could not be loaded (HTTP 503)."""


@dataclass(frozen=True)
class Hit:
    """One neighbour: its key, score (cosine: similarity; l2: squared distance), label."""

    key: str
    score: float
    label: int | None = None


@dataclass(frozen=True)
class SearchResult:
    """Top-k hits of one query against one version."""

    version: str
    metric: str
    hits: list[Hit]
    adapter: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The service's answer (labels only where the images have them)."""
        hits = []
        for h in self.hits:
            d: dict[str, Any] = {"key": h.key, "score": h.score, "version": self.version}
            if h.label is not None:
                d["label"] = h.label
            hits.append(d)
        return {
            "version": self.version,
            "metric": self.metric,
            "adapter": self.adapter,
            "hits": hits,
        }


@dataclass
class Embedder:
    """One model ready to embed encoded images (built once, used by every query)."""

    name: str
    model: torch.nn.Module
    preprocess: PreprocessConfig
    max_pixels: int

    def __call__(self, data: bytes, what: str) -> np.ndarray:
        dec = decode_images([data], self.preprocess, self.max_pixels)
        if not dec.ok[0]:  # not an image, or too large to decode: the query is at fault
            raise QueryError(f"{what}: {dec.errors[0]}")
        with torch.inference_mode():
            return self.model(torch.from_numpy(dec.pixels)).numpy()


def load_embedder(ctx: Context, model) -> Embedder:
    """The embedder of a model config (trained dir, TorchScript file or models:/ URI)."""
    blob = resolve_blob(model, ctx.model_dir(model), ctx.cfg.storage, ctx.cfg.tracking_uri)
    pixels = ctx.cfg.embed.max_decoded_pixels
    return Embedder(model.name, build_model(blob), blob.preprocess, pixels)


def key_labels(ctx: Context, keys: np.ndarray) -> np.ndarray | None:
    """Each key's label from the image shards (-1: none), or None when no shard has labels."""
    try:
        files = list(image_shards(ctx.cfg).values())
    except (FileNotFoundError, DataError):  # a gallery served without its images
        return None
    found_keys, found_labels = [], []
    for f in files:
        if "label" not in uri_io.parquet_columns(f, ctx.cfg.storage):
            continue
        for b in uri_io.iter_parquet_batches(f, ctx.cfg.storage, ["key", "label"]):
            found_keys.append(b.column(0))
            found_labels.append(b.column(1))
    if not found_keys:
        return None
    value_set = pa.chunked_array(found_keys, pa.string()).combine_chunks()
    labels = pc.fill_null(pa.chunked_array(found_labels).cast(pa.int64()), -1).to_numpy()
    pos = pc.index_in(pa.array(keys.tolist(), pa.string()), value_set=value_set)
    pos = pc.fill_null(pos, -1).to_numpy(zero_copy_only=False)
    return np.where(pos >= 0, labels[np.maximum(pos, 0)], -1)


@dataclass
class Searcher:
    """One gallery version in memory: index, key → row id, labels, the version's model."""

    ctx: Context
    version: str
    index: GalleryIndex
    row_of: dict[str, int]
    labels: np.ndarray | None
    embedder: Embedder | None
    model_error: str | None = None
    loaded_at: float = field(default_factory=time.time)
    _adapted: dict[str, tuple[Embedder, torch.nn.Module]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, ctx: Context, version: str | None = None) -> Searcher:
        """Everything a query needs, read now (default: the serving version)."""
        version, index = load_index(ctx, version)
        row_of = {str(k): i for i, k in enumerate(index.keys)}
        if index.kind == "ivf":  # key queries read a row's vector back from the index
            faiss.extract_index_ivf(index.index).make_direct_map()
        embedder, why = None, None
        try:
            embedder = load_embedder(ctx, model_for_version(ctx, version))
        except Exception as e:  # key and vector queries still work; image queries say why
            why = f"model of version {version!r} not loaded: {e}"
            log.warning(why)
        return cls(ctx, version, index, row_of, key_labels(ctx, index.keys), embedder, why)

    def info(self) -> dict[str, Any]:
        """What /health reports about the version served."""
        return {
            "version": self.version,
            "rows": self.index.rows,
            "dim": self.index.dim,
            "metric": self.index.metric,
            "index_kind": self.index.kind,
            "model": self.embedder.name if self.embedder else None,
            "model_error": self.model_error,
            "labels": self.labels is not None,
            "loaded_at": self.loaded_at,
        }

    def by_vector(
        self, vector: np.ndarray, k: int, exclude: str | None = None, adapter: str | None = None
    ) -> SearchResult:
        """Top-k rows for a vector in this version's space (`exclude`: a key left out)."""
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.index.dim:
            raise QueryError(
                f"vector has {q.shape[1]} values; version {self.version} holds {self.index.dim}-d"
            )
        if not np.isfinite(q).all():
            raise QueryError("vector has NaN or infinite values")
        scores, keys = self.index.search(q, k + (exclude is not None))
        hits = [
            Hit(str(kk), float(s), self._label(kk))
            for kk, s in zip(keys[0], scores[0], strict=True)
            if kk is not None and kk != exclude
        ]
        return SearchResult(self.version, self.index.metric, hits[:k], adapter)

    def by_key(self, key: str, k: int, adapter: str | None = None) -> SearchResult:
        """Neighbours of a stored row, itself left out; with `adapter`, its image is embedded
        by the new model and mapped into this version's space."""
        if adapter is not None:
            data = image_bytes_of_key(self.ctx, key)
            return self.by_vector(self._adapt(adapter, data, key), k, key, adapter)
        if key not in self.row_of:
            raise UnknownKey(f"key {key!r} is not in version {self.version}")
        return self.by_vector(self._stored(key), k, exclude=key)

    def by_image(self, data: bytes, k: int, adapter: str | None = None) -> SearchResult:
        """Neighbours of an encoded image (the upload), by this version's model or adapted."""
        if adapter is not None:
            return self.by_vector(self._adapt(adapter, data, "upload"), k, adapter=adapter)
        if self.embedder is None:
            raise ModelUnavailable(self.model_error or "no model")
        return self.by_vector(self.embedder(data, "upload"), k)

    def _label(self, key: str) -> int | None:
        if self.labels is None:
            return None
        label = int(self.labels[self.row_of[key]])
        return None if label < 0 else label

    def _stored(self, key: str) -> np.ndarray:
        """The row's vector from the index (flat, HNSW; IVF via its direct map), else read."""
        try:
            return self.index.index.reconstruct(self.row_of[key])
        except RuntimeError:  # an index without reconstruction: read the row from its shard
            found, emb = version_embeddings(self.ctx.gallery, self.version, pa.array([key]))
            if not len(found):
                raise UnknownKey(f"key {key!r} is not in version {self.version}") from None
            return emb[0]

    def _adapt(self, kind: str, data: bytes, what: str) -> np.ndarray:
        """A new-model embedding of the image, mapped by the query adapter into this space."""
        with self._lock:  # load the new model and the adapter once per version
            if kind not in self._adapted:
                adapter = load_adapter(self.ctx, kind, self.version)
                self._adapted[kind] = (load_embedder(self.ctx, self.ctx.cfg.new_model), adapter)
        embedder, adapter = self._adapted[kind]
        new = embedder(data, what)
        with torch.inference_mode():
            return adapter(torch.from_numpy(new)).numpy()


class LiveSearcher:
    """The served `Searcher`, replaced when CURRENT moves: load fully, then swap.

    `current` reads the serving version (CURRENT); `load` builds a Searcher of a version. A
    version that fails to load is kept out for `retry_seconds` while the old one serves on.
    """

    def __init__(
        self,
        load: Callable[[str], Searcher],
        current: Callable[[], str | None],
        retry_seconds: float = 30.0,
    ) -> None:
        self._load, self._current, self.retry_seconds = load, current, retry_seconds
        first = current()
        if first is None:
            raise QueryError("the gallery has no serving version (nothing promoted yet)")
        self._searcher = load(first)
        self._refresh_lock = threading.Lock()
        self.swaps = 0
        self.last_error: str | None = None
        self._failed: tuple[str, float] | None = None

    @property
    def searcher(self) -> Searcher:
        """The version to answer with; a request takes it once and uses only that one."""
        return self._searcher

    def refresh(self) -> bool:
        """Swap in the serving version if CURRENT names another; True when it swapped."""
        with self._refresh_lock:  # one load at a time, whoever calls
            try:
                version = self._current()
            except Exception as e:  # storage hiccup: keep serving, say so in /health
                self.last_error = f"reading CURRENT: {e}"
                return False
            if version is None or version == self._searcher.version:
                return False
            if self._recently_failed(version):
                return False
            try:
                new = self._load(version)
            except Exception as e:  # a broken version must not take the service down
                self.last_error = f"loading version {version!r}: {e}"
                self._failed = (version, time.monotonic())
                log.warning("keeping version %s: %s", self._searcher.version, self.last_error)
                return False
            self._searcher = new  # one reference assignment: in-flight requests keep the old
            self.swaps, self.last_error, self._failed = self.swaps + 1, None, None
            return True

    def _recently_failed(self, version: str) -> bool:
        failed = self._failed
        return bool(failed and failed[0] == version) and (
            time.monotonic() - failed[1] < self.retry_seconds
        )

    def poll(self, seconds: float, stop: threading.Event) -> None:
        """Refresh every `seconds` until `stop` is set (a replica's background thread)."""
        while not stop.wait(seconds):
            self.refresh()

    def info(self) -> dict[str, Any]:
        """/health: the version served and how the swaps went."""
        return {**self._searcher.info(), "swaps": self.swaps, "last_error": self.last_error}
