"""The upgrade's steps as plain functions with typed results; CLI, jobs and the graph call them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ModelConfig, UpgradeConfig
from pipeline.context import Context
from pipeline.data.sources import ImageLayout, check_shards, image_files
from pipeline.embed.probe import probe_model
from pipeline.embed.quality import OutputStats
from pipeline.embed.runner import embed_images_to_version
from pipeline.evaluate.metrics import retrieval_metrics
from pipeline.gallery.identity import GalleryIdentity
from pipeline.gallery.index import GalleryIndex, build_index
from pipeline.gallery.records import version_manifest
from pipeline.gallery.rows import read_rows
from pipeline.gallery.store import Gallery, GalleryError, arrow_to_embeddings
from pipeline.io.redact import redact_text
from pipeline.models.store import resolve_blob
from pipeline.publish.serving import targets_moved
from pipeline.runtime import Timer, ensure_ray
from pipeline.services.inputs import gallery_version_ref, images_ref, model_ids
from pipeline.services.models import registry_version_of


def image_layout(cfg: UpgradeConfig) -> ImageLayout:
    """How the image shards are laid out and read (`data.source`)."""
    return ImageLayout.of(cfg.data)


def image_shards(cfg: UpgradeConfig) -> dict[int, str]:
    """Gallery shard id → image shard file (absolute URI), the id read from the file's name
    (shard-NNNNN.parquet; the last number in the name for other layouts)."""
    return image_files(cfg.images_uri, cfg.storage, image_layout(cfg))


@dataclass
class VersionStepResult:
    """A gallery version produced by embedding every image with one model."""

    version: str
    method: str
    rows: int
    rejected: int
    shards: int
    seconds: float
    rows_per_second: float
    index: dict[str, Any]
    run_id: str | None
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def _existing_version(version: str, method: str, m: dict[str, Any]) -> VersionStepResult:
    """A version that already has a manifest: reported as it is, nothing embedded."""
    return VersionStepResult(
        version,
        m.get("method", method),
        m["rows"],
        m["rejected"],
        len(m["shards"]),
        0.0,
        0.0,
        m.get("index", {}),
        m.get("run_id"),
        skipped=True,
    )


def _log_version_inputs(ctx: Context, run: Any, version: str, files: dict[int, str]) -> None:
    """The ingest/backfill run's lineage in MLflow: images in, version built, embedder used."""
    g, m = ctx.gallery, ctx.gallery.manifest(version)
    emb = m.get("registry_model") or ctx.registry_name()
    run.log_inputs(
        [
            images_ref(ctx.cfg.images_uri, files, ctx.cfg.storage, "images"),
            gallery_version_ref(g, ctx.cfg.gallery_name, version, "built"),
        ],
        model_ids(ctx, [(emb, m.get("registry_version"))]),
    )


def embed_version_step(
    ctx: Context,
    model: ModelConfig,
    method: str,
    side_blob: Any = None,
) -> VersionStepResult:
    """Embed all images with `model` into gallery version `model.name` (ingest or full backfill).

    With `side_blob` (ingest of the old model) each row also stores FCT's side-information.
    Resumable: committed shards are kept; a version with a manifest is left as it is.
    """
    g, version = ctx.gallery, model.name
    if g.has_version(version):
        return _existing_version(version, method, g.manifest(version))
    files = image_shards(ctx.cfg)
    # Before any model, MLflow or Ray work: a key two shards share would otherwise stop the
    # index build only after every row was decoded and embedded.
    check_shards(list(files.values()), ctx.cfg.storage, image_layout(ctx.cfg))
    timer = Timer()
    with ctx.tracker.run(f"{method}-{version}", ctx.tags(step=method, to_version=version)) as run:
        with timer("resolve_model"):
            blob = resolve_blob(model, ctx.model_dir(model), ctx.cfg.storage, ctx.cfg.tracking_uri)
        with timer("probe"):  # a broken model fails here, on real images, before any Ray work
            probe_model(
                blob,
                list(files.values()),
                ctx.cfg.storage,
                ctx.cfg.embed,
                side_blob,
                image_layout(ctx.cfg),
            )
        ensure_ray(ctx.cfg.ray)
        with timer("embed"):
            res = _embed_files(ctx, model, method, files, blob, side_blob, run.run_id)
        with timer("index"):
            records = list(g.committed_shards(version).values())
            index = index_version(ctx, version, records, blob.embedding_dim)
        meta = _manifest(ctx, model, method, blob, side_blob, index, run.run_id)
        manifest = g.finalize(version, {**meta, "rows_per_second": res.rows_per_second})
        run.log_metrics({**res.metrics(), **timer.metrics()})
        run.log_dict(manifest, "manifest.json")
        run.set_tags({"carryover.shards": ",".join(str(r["shard_id"]) for r in records)})
        _log_version_inputs(ctx, run, version, files)
    return VersionStepResult(
        version,
        method,
        manifest["rows"],
        manifest["rejected"],
        len(manifest["shards"]),
        res.seconds,
        res.rows_per_second,
        index,
        run.run_id,
        timings=timer.seconds,
    )


def _manifest(
    ctx: Context,
    model: ModelConfig,
    method: str,
    blob: Any,
    side_blob: Any,
    index: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """The manifest of a version embedded by one model (an ingest or a full backfill)."""
    return version_manifest(
        GalleryIdentity.of_config(ctx.cfg),
        method=method,
        model=model.name,
        registry_version=registry_version_of(ctx, model),
        embedding_dim=blob.embedding_dim,
        side_info_model=side_blob.name if side_blob else None,
        side_info_dim=side_blob.embedding_dim if side_blob else 0,
        index=index,
        run_id=run_id,
    )


def _embed_files(
    ctx: Context,
    model: ModelConfig,
    method: str,
    files: dict[int, str],
    blob: Any,
    side_blob: Any,
    run_id: str,
) -> Any:
    """Every image shard embedded into the version, each shard's commit naming this run."""
    source = f"{'embed' if method == 'embed' else 'backfill'}:{model.name}"
    meta = {
        sid: {"method": method, "model": model.name, "source_version": None, "run_id": run_id}
        for sid in files
    }
    return embed_images_to_version(
        files,
        ctx.gallery,
        model.name,
        blob,
        ctx.cfg.embed,
        meta,
        source,
        ctx.cfg.storage,
        quiet=ctx.quiet,
        side_blob=side_blob,
        layout=image_layout(ctx.cfg),
    )


def index_version(ctx: Context, version: str, records: list[dict[str, Any]], dim: int) -> dict:
    """Build and save the faiss index of a version from its shard files, streaming."""
    g = ctx.gallery
    total = sum(r["rows"] for r in records)

    def batches(stats: OutputStats):
        for b in g.iter_embeddings(version, records=sorted(records, key=lambda r: r["shard_id"])):
            emb = arrow_to_embeddings(b.column("embedding"))
            stats.add(emb)  # the index reads every row anyway: check them on the way
            yield b.column("key").to_numpy(zero_copy_only=False), emb

    if total == 0:
        raise GalleryError(
            f"{g.uri}: version {version!r} has no rows to index: every row was rejected "
            f"(reasons under {g.path('versions', version, 'rejects')})"
        )
    stats = OutputStats()
    idx = build_index(batches(stats), dim, ctx.cfg.index, total_rows=total)
    if problems := stats.problems(ctx.cfg.embed.min_distinct_fraction):
        raise GalleryError(f"{g.uri}: version {version!r} is unfit to serve: {'; '.join(problems)}")
    idx.save(g.index_uri(version), ctx.cfg.storage)
    return idx.info()


def split_labels(
    cfg: UpgradeConfig, split: str = "val", cap: int | None = None, labelled_only: bool = True
) -> pa.Table:
    """Keys and labels of one split's labelled rows (every row, label null where it has none,
    unless `labelled_only`): a seeded uniform sample of at most `cap` rows.

    Streams the shards giving each row a random priority and keeps the `cap` lowest
    (bottom-k sampling), trimming as it goes: memory stays O(cap) however large the gallery.
    """
    rng = np.random.default_rng(cfg.data.seed)
    kept: pa.Table | None = None
    pending: list[pa.Table] = []
    layout = image_layout(cfg)
    for f in image_shards(cfg).values():
        for b in layout.read(f, cfg.storage, ["key", "label", "split"]):
            t = pa.Table.from_batches([b])
            mask = pc.equal(t["split"], split)
            if labelled_only:
                mask = pc.and_(mask, pc.is_valid(t["label"]))
            t = t.filter(mask).select(["key", "label"])
            pending.append(t.append_column("_p", pa.array(rng.random(t.num_rows))))
            if cap is not None and sum(x.num_rows for x in pending) > 2 * cap:
                kept = _lowest(pa.concat_tables(([kept] if kept else []) + pending), cap)
                pending = []
    allrows = pa.concat_tables(([kept] if kept else []) + pending) if (kept or pending) else None
    if allrows is None:
        return pa.table({"key": pa.array([], pa.string()), "label": pa.array([], pa.int64())})
    if cap is not None:
        allrows = _lowest(allrows, cap)
    return allrows.drop_columns(["_p"])


def _lowest(t: pa.Table, k: int) -> pa.Table:
    """The k rows of lowest priority `_p`, in their original order."""
    if t.num_rows <= k:
        return t
    idx = np.sort(np.argpartition(t["_p"].to_numpy(), k - 1)[:k])
    return t.take(idx)


def validation_labels(cfg: UpgradeConfig) -> pa.Table:
    """Keys and labels of the labelled validation split (seeded sample up to max_queries)."""
    return split_labels(cfg, "val", cfg.evaluate.max_queries)


@dataclass(frozen=True)
class SplitSample:
    """The rows a study, a plan's estimate and validation measure on: labelled rows where the
    split has labels of 2+ classes (top-1), else every row with labels None (recall@k)."""

    keys: list[str]
    labels: np.ndarray | None

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def split_sample(cfg: UpgradeConfig, split: str, cap: int | None) -> SplitSample:
    """The seeded sample of one split, labelled when the split has labels to measure by."""
    t = split_labels(cfg, split, cap)
    labels = np.asarray(t["label"].to_pylist(), dtype=np.int64)
    if t.num_rows >= 2 and len(np.unique(labels)) >= 2:
        return SplitSample(t["key"].to_pylist(), labels)
    return SplitSample(split_labels(cfg, split, cap, labelled_only=False)["key"].to_pylist(), None)


def version_embeddings(g: Gallery, version: str, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The keys a version holds of the given ones, and their embeddings (in the keys' order)."""
    names = keys.to_pylist()
    rows = read_rows(g, version, names)
    return np.asarray(names, dtype=object)[rows.found], rows["embedding"][rows.found]


def evaluate_versions(ctx: Context, versions: list[str]) -> dict[str, dict[str, float]]:
    """Top-1/top-5/mAP of each version on the validation split (query = gallery, self excluded)."""
    val = validation_labels(ctx.cfg)
    if val.num_rows < 2:
        raise ValueError(f"{ctx.cfg.images_uri}: fewer than 2 labelled validation rows")
    label_of = dict(zip(val["key"].to_pylist(), val["label"].to_pylist(), strict=True))
    out = {}
    for v in versions:
        keys, emb = version_embeddings(ctx.gallery, v, val["key"])
        if len(keys) < 2:
            raise GalleryError(f"version {v!r} holds fewer than 2 of the validation keys")
        labels = np.array([label_of[k] for k in keys])
        m = retrieval_metrics(
            emb, emb, labels, labels, metric=ctx.cfg.evaluate.metric, exclude_self=True
        )
        out[v] = {"top1": m["top1"], "top5": m["top5"], "map": m["map"], "queries": len(keys)}
    return out


def promote_step(ctx: Context, version: str) -> dict[str, Any]:
    """Move CURRENT and the registry's `serving` alias together: both move or neither."""
    g = ctx.gallery
    m = g.manifest(version)
    serving = _serving_of(ctx, version, m)  # checked before anything moves
    before = g.current_bytes()
    with targets_moved(g, ctx.cfg, version, f"promote {version}"):  # published copies first
        state = g.promote(
            version, {"model": m.get("model"), "registry_version": m.get("registry_version")}
        )
        _move_serving(ctx, serving, before, f"promote {version}")
    return state


def rollback_step(ctx: Context) -> dict[str, Any]:
    """Restore the previous version and point `serving` back at its model: both or neither."""
    g = ctx.gallery
    target = g.rollback_target()
    serving = _serving_of(ctx, target, g.manifest(target))
    before = g.current_bytes()
    with targets_moved(g, ctx.cfg, target, f"rollback to {target}"):
        state = g.rollback()
        _move_serving(ctx, serving, before, f"rollback to {target}")
    return state


def _serving_of(ctx: Context, version: str, m: dict[str, Any]) -> tuple[str, int] | None:
    """The registered model version that serves `version`, checked to exist (and the registry
    to answer) before CURRENT moves; None when the version records no registry version."""
    if m.get("registry_version") is None:
        return None
    name, rv = m.get("registry_model") or ctx.registry_name(), int(m["registry_version"])
    if ctx.tracker.model_version(name, rv) is None:
        where = redact_text(ctx.cfg.tracking_uri)
        hint = ""
        if "tracking_uri" not in m:  # an older manifest: the config's registry was a guess
            hint = " (the gallery does not record its tracking URI: --set tracking.uri=...)"
        raise GalleryError(
            f"{ctx.gallery.uri}: version {version!r} is served by {name}/{rv}, which is not in "
            f"the registry at {where}{hint}; nothing moved"
        )
    return name, rv


def _move_serving(
    ctx: Context, serving: tuple[str, int] | None, before: bytes | None, what: str
) -> None:
    """Second of the two moves: on failure put CURRENT back exactly as it was, then say so."""
    if serving is None:
        return
    name, rv = serving
    try:
        ctx.tracker.set_alias(name, "serving", rv)
    except BaseException as e:  # whatever stops the alias, CURRENT must not stay moved
        ctx.gallery.restore_current(before)
        if not isinstance(e, Exception):
            raise
        was = ctx.gallery.current() or "nothing"  # read back: the restore really happened
        why = redact_text((str(e).strip().splitlines() or [type(e).__name__])[0])
        raise GalleryError(
            f"{what}: could not move {name}@serving to {rv} ({why}); CURRENT stays at {was}"
        ) from None


def load_index(ctx: Context, version: str | None = None) -> tuple[str, GalleryIndex]:
    """The faiss index of a version (default: the serving one)."""
    g = ctx.gallery
    version = version or g.current()
    if version is None:
        raise GalleryError(f"{g.uri}: no serving version (nothing promoted yet)")
    return version, GalleryIndex.load(g.index_uri(version), ctx.cfg.storage)
