"""Checks before a planned version may serve: keys, finite values, dimension, retrieval."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.embed.quality import OutputStats
from pipeline.evaluate.neighbours import quality
from pipeline.gallery.rows import read_rows
from pipeline.gallery.store import Gallery, GalleryError, arrow_to_embeddings
from pipeline.io import uri as uri_io
from pipeline.upgrade.plan import Plan


@dataclass(frozen=True)
class ValidationRows:
    """The labelled validation rows the plan is replayed on, with their new-model embeddings
    (the queries) and whether each key was found among the images."""

    keys: list[str]
    labels: np.ndarray | None  # None: an unlabelled gallery, measured by recall@k
    new: np.ndarray
    found: np.ndarray


class ValidationFailed(GalleryError):
    """A built version failed its checks: it is not promoted; the message lists why."""


@dataclass
class ValidationReport:
    """Each check with its verdict and detail, plus the retrieval figures."""

    version: str
    source_version: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    top1: float | None = None
    expected_top1: float | None = None
    transform_top1: float | None = None
    full_top1: float | None = None
    tolerance: float = 0.0
    queries: int = 0
    measure: str = "top-1"  # what top1 and the estimates measure (else "R@k", unlabelled)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_keys_and_values(
    g: Gallery,
    source: str,
    target: str,
    dim: int,
    report: ValidationReport,
    min_distinct_fraction: float = 0.5,
) -> None:
    """Shard by shard (bounded memory): same keys as the source, finite, right dimension, no
    zero or overflowing norms, and distinct rows (a collapsed model writes one vector)."""
    src = {int(r["shard_id"]): r for r in g.manifest(source)["shards"]}
    tgt = {int(r["shard_id"]): r for r in g.manifest(target)["shards"]}
    missing_shards = sorted(set(src) - set(tgt))
    report.add(
        "shards",
        not missing_shards and set(tgt) == set(src),
        f"{len(tgt)} of {len(src)} shards"
        + (f"; missing {missing_shards}" if missing_shards else ""),
    )
    bad_keys, bad_dim, rows, stats = [], [], 0, OutputStats()
    for sid in sorted(set(src) & set(tgt)):
        want = _keys(g, source, src[sid]["path"])
        got, d = _scan(g, target, tgt[sid]["path"], stats)
        rows += len(got)
        if got != want:
            lost, extra = len(want - got), len(got - want)
            bad_keys.append(f"shard {sid}: {lost} missing, {extra} extra")
        if d not in (None, dim):
            bad_dim.append(f"shard {sid}: dim {d}")
    report.add(
        "keys", not bad_keys, "; ".join(bad_keys[:5]) or f"{rows} rows, same keys as {source}"
    )
    degenerate = stats.problems(0.0)  # every row finite, of a usable norm
    report.add("finite", not degenerate, "; ".join(degenerate) or "all finite, usable norms")
    report.add("dimension", not bad_dim, "; ".join(bad_dim[:5]) or f"{dim}-d everywhere")
    distinct = stats.problems(min_distinct_fraction)[len(degenerate) :]
    report.add(
        "distinct",
        not distinct,
        "; ".join(distinct) or f"{stats.distinct} distinct rows of {stats.rows}",
    )


def _keys(g: Gallery, version: str, path: str) -> set[str]:
    out: set[str] = set()
    for b in uri_io.iter_parquet_batches(g.path("versions", version, path), g.storage, ["key"]):
        out.update(b.column("key").to_pylist())
    return out


def _scan(g: Gallery, version: str, path: str, stats: OutputStats) -> tuple[set[str], int | None]:
    keys: set[str] = set()
    dim = None
    uri = g.path("versions", version, path)
    for b in uri_io.iter_parquet_batches(uri, g.storage, ["key", "embedding"]):
        keys.update(b.column("key").to_pylist())
        e = arrow_to_embeddings(b.column("embedding"))
        dim = e.shape[1]
        stats.add(e)
    return keys, dim


def check_retrieval(
    report: ValidationReport,
    gallery_vecs: np.ndarray,
    query_vecs: np.ndarray,
    labels: np.ndarray | None,
    metric: str,
    recall_k: int = 10,
) -> None:
    """Quality of new-model queries against the version's rows of the same keys (each
    query's own row excluded), against the plan's estimate minus the tolerance: top-1 with
    labels, else recall@k of the queries' own neighbours."""
    report.queries = len(query_vecs)
    if len(query_vecs) < 2:
        report.add("retrieval", False, "fewer than 2 validation rows to query with")
        return
    report.top1 = quality(query_vecs, gallery_vecs, labels, metric, recall_k)
    floor = (report.expected_top1 or 0.0) - report.tolerance
    ok = report.top1 >= floor
    report.add(
        "retrieval",
        ok,
        f"{report.measure} {report.top1:.2f} vs plan estimate {report.expected_top1:.2f} − "
        f"tolerance {report.tolerance:.1f} = {floor:.2f} (transform only "
        f"{report.transform_top1:.2f}, full {report.full_top1:.2f}; {len(query_vecs)} queries)",
    )


@dataclass(frozen=True)
class Tolerances:
    """How far a built version may fall short: top-1 points under the plan's estimate, and the
    least share of distinct rows (a collapsed model writes one vector)."""

    top1_drop: float
    min_distinct_fraction: float
    recall_k: int = 10


def validate_version(
    g: Gallery, target: str, plan: Plan, val: ValidationRows, tol: Tolerances, metric: str
) -> ValidationReport:
    """Keys, values, dimension and retrieval quality of the built version vs the plan."""
    source = plan.shards[0].source_version
    dim = int(g.manifest(target)["embedding_dim"])
    rep = ValidationReport(
        target,
        source,
        expected_top1=plan.expected_top1,
        transform_top1=plan.transform_top1,
        full_top1=plan.full_top1,
        tolerance=tol.top1_drop,
        measure=plan.measure,
    )
    check_keys_and_values(g, source, target, dim, rep, tol.min_distinct_fraction)
    rows = read_rows(g, target, val.keys)
    ok = rows.found & val.found
    labels = val.labels[ok] if val.labels is not None else None
    check_retrieval(rep, rows["embedding"][ok], val.new[ok], labels, metric, tol.recall_k)
    return rep
