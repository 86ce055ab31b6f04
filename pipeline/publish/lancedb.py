"""LanceDB target: one table per gallery, one table version per published gallery version
(tagged `gallery-<version>`), an ANN index tuned to a recall, and the serving tag that
promote and rollback move (a Lance tag names a table version: moving it is one atomic write)."""

from __future__ import annotations

import math
import time
from typing import Any

import lance
import numpy as np
import ray.data

from pipeline.config import StorageConfig, UpgradeConfig
from pipeline.embed.errors import quiet_own_errors, user_error
from pipeline.gallery.store import Gallery, GalleryError, arrow_to_embeddings, space_of
from pipeline.io import uri as uri_io
from pipeline.publish.lance_sink import LanceFragmentSink
from pipeline.publish.rows import publish_schema, read_publish_rows, shard_items
from pipeline.publish.target import Published, TargetInfo, TargetURI
from pipeline.runtime import ensure_ray

VERSION_TAG = "gallery-"
_K = 10


def lance_storage_options(storage: StorageConfig | None) -> dict[str, str]:
    """Lance's object-store options from the gallery's storage config (endpoint, credentials
    from the config or AWS_* as `uri_io` uses them). Never logged: they hold secrets."""
    st = (storage or StorageConfig()).resolved()
    opts = {"aws_region": st.region}
    if st.endpoint_url:
        opts["aws_endpoint"] = st.endpoint_url
        if st.endpoint_url.startswith("http://"):
            opts["allow_http"] = "true"
    if st.anon:
        opts["aws_skip_signature"] = "true"
    elif st.access_key_id and st.secret_access_key:
        opts["aws_access_key_id"] = st.access_key_id.get_secret_value()
        opts["aws_secret_access_key"] = st.secret_access_key.get_secret_value()
    return opts


def sub_vectors(dim: int, dims_per_sub_vector: int) -> int:
    """PQ sub-vectors for `dim`: about dim / dims_per_sub_vector, and a divisor of dim."""
    s = max(1, dim // dims_per_sub_vector)
    while dim % s:
        s -= 1
    return s


def partitions(rows: int, rows_per_partition: int) -> int:
    """IVF partitions sized to the row count (Lance trains each on a sample of 256 rows)."""
    return max(1, math.ceil(rows / rows_per_partition))


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    """Mean share of each query's true neighbours that were found."""
    hits = [len(set(f) & set(t)) / max(1, len(t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


class LanceDBTarget:
    """A LanceDB database (a local folder or s3:// prefix) holding the gallery's table."""

    def __init__(self, uri: TargetURI, gallery: Gallery, cfg: UpgradeConfig):
        self.uri = uri
        self.gallery = gallery
        self.cfg = cfg
        self.pcfg = cfg.publish
        self.table = cfg.publish.table or cfg.gallery_name
        self.metric = cfg.index.metric
        self.options = lance_storage_options(cfg.storage) if uri.is_s3 else None
        self.table_uri = uri_io.join(uri.location, f"{self.table}.lance")

    # -- the protocol -------------------------------------------------------------------------
    def publish(self, version: str) -> Published:
        """Write the version's rows (Ray Data, streamed), index them, tag the table version."""
        m = self.gallery.manifest(version)
        dim = int(m["embedding_dim"])
        t0 = time.perf_counter()
        table_version, rows = self._write(version, m, dim)
        t1 = time.perf_counter()
        ds = self._open(table_version)
        index_type, parts, ds = self._index(ds, rows, dim)
        t2 = time.perf_counter()
        nprobes, rec = self._tune(ds, parts) if parts else (None, None)
        t3 = time.perf_counter()
        self._tag(ds, VERSION_TAG + version, ds.version)
        refine = self.pcfg.refine_factor if index_type == "IVF_PQ" else None
        return Published(
            target=str(self.uri),
            table=self.table,
            version=version,
            table_version=ds.version,
            rows=rows,
            index_type=index_type,
            partitions=parts,
            nprobes=nprobes,
            refine_factor=refine,
            recall_at_10=rec,
            seconds={
                "write": round(t1 - t0, 3),
                "index": round(t2 - t1, 3),
                "tune": round(t3 - t2, 3),
            },
        )

    def point(self, serving: str, version: str | None) -> None:
        """Move the serving tag to the table version holding `version` (None: remove it)."""
        ds = self._open()
        tags = ds.tags.list()
        if version is None:
            if serving in tags:
                ds.tags.delete(serving)
            return
        if VERSION_TAG + version not in tags:
            raise GalleryError(f"{self.uri}: table {self.table!r} holds no version {version!r}")
        self._tag(ds, serving, tags[VERSION_TAG + version]["version"])

    def describe(self) -> TargetInfo:
        """Gallery versions the table holds and the one its serving tag names (read from Lance)."""
        try:
            tags = self._open().tags.list()
        except GalleryError:
            tags = {}
        versions = {
            name[len(VERSION_TAG) :]: int(t["version"])
            for name, t in tags.items()
            if name.startswith(VERSION_TAG)
        }
        at = tags.get(self.pcfg.serving_tag, {}).get("version")
        serving = next((v for v, tv in versions.items() if tv == at), None)
        return TargetInfo(
            str(self.uri), self.uri.kind, self.table, self.pcfg.serving_tag, versions, serving
        )

    # -- the steps ----------------------------------------------------------------------------
    def _open(self, version: int | str | None = None) -> lance.LanceDataset:
        try:
            return lance.dataset(self.table_uri, version=version, storage_options=self.options)
        except (ValueError, OSError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise GalleryError(f"{self.uri}: cannot open table {self.table!r}: {why}") from None

    def _write(self, version: str, m: dict[str, Any], dim: int) -> tuple[int, int]:
        """One Overwrite commit of every shard's rows: (its table version, rows written)."""
        schema, records = publish_schema(dim), m.get("shards", [])
        sink = LanceFragmentSink(self.table_uri, schema, self.options, self.pcfg.max_rows_per_file)
        if not records:
            ds = lance.write_dataset(
                schema.empty_table(), self.table_uri, mode="overwrite", storage_options=self.options
            )
            return ds.version, 0
        ensure_ray(self.cfg.ray)
        items = shard_items(self.gallery, version, records)
        kwargs = {
            "storage": self.gallery.storage,
            "version": version,
            "space": space_of(m, version),
            "dim": dim,
        }
        rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_publish_rows,
            fn_kwargs={**kwargs, "rows": self.pcfg.read_rows},
            batch_size=1,
            num_cpus=0.5,  # two cores: reads and fragment writes share them (DESIGN.md)
        )
        try:
            with quiet_own_errors():
                rows.write_datasink(sink)
        except Exception as e:
            raise user_error(e) from None
        if sink.committed_version is None:
            raise GalleryError(f"{self.uri}: the write of {version!r} committed nothing")
        return sink.committed_version, sink.rows

    def _index(
        self, ds: lance.LanceDataset, rows: int, dim: int
    ) -> tuple[str, int | None, lance.LanceDataset]:
        """Build the ANN index (a new table version); none for a table a scan answers exactly."""
        kind = self.pcfg.index_type
        if kind == "none" or rows < self.pcfg.min_rows_for_index:
            return "none", None, ds
        parts = partitions(rows, self.pcfg.rows_per_partition)
        kw: dict[str, Any] = {"num_partitions": parts}
        if kind == "IVF_PQ":
            kw["num_sub_vectors"] = sub_vectors(dim, self.pcfg.sub_vector_dims)
        ds = ds.create_index("embedding", index_type=kind, metric=self.metric, replace=True, **kw)
        return kind, parts, ds

    def _knn(self, ds: lance.LanceDataset, q: np.ndarray, **kw: Any) -> list[str]:
        nearest = {"column": "embedding", "q": q, "k": _K, "metric": self.metric, **kw}
        # no _distance column wanted (pylance 14 warns once per query unless told so)
        t = ds.to_table(columns=["key"], nearest=nearest, disable_scoring_autoprojection=True)
        return t.column("key").to_pylist()

    def _tune(self, ds: lance.LanceDataset, parts: int) -> tuple[int, float]:
        """The fewest probed partitions whose recall@10 against an exact scan reaches the
        target, on a sample of the table's own rows as queries (doubling up to all)."""
        n = ds.count_rows()
        pick = np.unique(np.linspace(0, n - 1, min(self.pcfg.tune_queries, n)).astype(np.int64))
        queries = arrow_to_embeddings(ds.take(pick, columns=["embedding"]).column("embedding"))
        truth = [self._knn(ds, q, use_index=False) for q in queries]
        refine = self.pcfg.refine_factor if self.pcfg.index_type == "IVF_PQ" else None
        probes = 1
        while True:
            found = [self._knn(ds, q, nprobes=probes, refine_factor=refine) for q in queries]
            rec = recall(found, truth)
            if rec >= self.pcfg.target_recall or probes >= parts:
                return probes, round(rec, 4)
            probes = min(parts, probes * 2)

    def _tag(self, ds: lance.LanceDataset, name: str, table_version: int) -> None:
        """Create or move a tag: one atomic write of the tag's file."""
        if name in ds.tags.list():
            ds.tags.update(name, table_version)
        else:
            ds.tags.create(name, table_version)


def open_lancedb(uri: TargetURI, gallery: Gallery, cfg: UpgradeConfig) -> LanceDBTarget:
    return LanceDBTarget(uri, gallery, cfg)
