"""Compatibility steps: side-info model, BCT classifier, FCT/FastFill transformation, adapters."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cluster import train_storage, train_storage_uri
from pipeline.compat.classifier import LinearHead, fit_linear_head
from pipeline.context import Context
from pipeline.data.sources import ImageLayout
from pipeline.embed.features import StoredPairs, collect, paired_features, store_pairs
from pipeline.embed.transform import ChainSpec, TransformChain, chain_spec
from pipeline.evaluate.report import write_report
from pipeline.evaluate.study import ChainChoice, StudyInputs, choose_chain, compat_study
from pipeline.gallery.rows import read_rows
from pipeline.gallery.store import space_of
from pipeline.io import uri as uri_io
from pipeline.models.compat import fit_adapter
from pipeline.models.store import MODEL_FILE, save_model_dir
from pipeline.runtime import ensure_ray
from pipeline.services.inputs import model_ids, training_images
from pipeline.services.models import (
    blob_of,
    find_model_version,
    model_classifier,
    register,
    side_blob,
    side_info_stored,
)
from pipeline.services.steps import split_sample
from pipeline.train.loop import config_hash
from pipeline.train.transformation import (
    architecture,
    load_transformation,
    train_transformation,
)
from pipeline.upgrade.facts import find_chain

CLASSIFIER_FIT_ROWS = 20_000  # a linear probe needs a sample, not the whole split


def transformation_dir(ctx: Context, tc: Any = None) -> Path:
    return Path(ctx.cfg.workdir) / "models" / (tc or ctx.cfg.transformation).name


def no_side_info_config(ctx: Context) -> Any:
    """The side-info-free variant of the configured transformation (for shards without it)."""
    tc = ctx.cfg.transformation
    return tc.model_copy(update={"name": f"{tc.name}-noside", "side_info": False})


def train_transformation_step(
    ctx: Context,
    aliases: tuple[str, ...] = ("candidate",),
    tc: Any = None,
) -> dict[str, Any] | None:
    """Train h(old, side) → new on the train split's paired features; register it in MLflow.

    `tc` overrides the configured transformation (the side-info-free fallback uses it)."""
    tc, cfg = tc or ctx.cfg.transformation, ctx.cfg
    if not tc.enabled:
        return None
    t0 = time.perf_counter()
    blobs = {"old": blob_of(ctx, cfg.old_model), "new": blob_of(ctx, cfg.new_model)}
    # h takes side-info only when the stored rows have it (an imported gallery has none)
    side = side_blob(ctx) if tc.side_info and side_info_stored(ctx) else None
    if side is not None:
        blobs["side"] = side
    # h's size is known from the dimensions: a cost limit it cannot meet fails here, before
    # Ray starts or any training pair is embedded.
    dims = {k: b.embedding_dim for k, b in blobs.items()}
    architecture(tc, dims, dims.get("side", 0))
    ensure_ray(cfg.ray)  # after the models resolve: a missing one fails fast, without Ray
    identity = _transformation_identity(ctx, blobs, side is not None)
    with ctx.tracker.run(
        f"train-{tc.name}",
        ctx.tags(step="train_transformation", from_version=cfg.old_model.name),
    ) as run:
        pairs = _training_features(ctx, tc, blobs, identity)
        head = fastfill_classifier(ctx, tc, pairs.dataset)
        tr = train_transformation(
            tc,
            pairs.dataset,
            dims,
            {"old": "old", "side": "side" if side else None, "new": "new"},
            head.to_config() if head is not None else None,
            transformation_dir(ctx, tc),
            identity,
            train_storage(cfg),
            pairs.size_bytes,
        )
        run.log_params({"transformation": tc.model_dump(mode="json"), "identity": identity})
        run.log_metrics(tr.metrics())
        run.set_tags({"carryover.fastfill_classifier": head.source if head else "none"})
        run.log_inputs([training_images(ctx)], _model_ids_of(ctx, blobs))
        tags = {
            "model": tc.name,
            "from_model": cfg.old_model.name,
            "to_model": cfg.new_model.name,
            "side_info_model": tr.side_info_model or "none",
            "loss": tc.loss,
        }
        version = register(
            ctx, "transformation", transformation_dir(ctx, tc), run, tr.config_hash, tags, aliases
        )
        run.set_tags({"carryover.registry_version": str(version)})
    out = asdict(tr)
    out.update(registry_version=version, step_seconds=round(time.perf_counter() - t0, 2))
    return out


def _model_ids_of(ctx: Context, blobs: dict[str, Any]) -> list[str]:
    """The LoggedModels of the registered embedders h learns from (old, new, side-info)."""
    cfg = ctx.cfg
    kinds = {"old": ("embedder", cfg.old_model), "new": ("embedder", cfg.new_model)}
    kinds["side"] = ("side-info", cfg.side_info_model)
    used = []
    for key in blobs:
        kind, model = kinds[key]
        info = find_model_version(ctx, "carryover.model", model.name, kind)
        used.append((ctx.registry_name(kind), info.version if info else None))
    return model_ids(ctx, used)


def fastfill_classifier(ctx: Context, tc: Any, feats: Any) -> LinearHead | None:
    """FastFill's frozen classifier of new embeddings: the new model's own head; else, with
    `transformation.fit_classifier`, a linear head fitted on the training pairs' labelled
    rows; else None (the regression term alone)."""
    if tc.loss != "fastfill":
        return None
    if (head := model_classifier(ctx)) is not None:
        return head
    if not tc.fit_classifier:
        return None
    sample = collect(feats.select_columns(["new", "label"]).limit(CLASSIFIER_FIT_ROWS))
    labels = sample.get("label", np.zeros(0, np.int64))
    if len(np.unique(labels[labels >= 0])) < 2:
        return None  # an unlabelled gallery
    return fit_linear_head(sample["new"], labels, seed=ctx.cfg.data.seed)


def _transformation_identity(ctx: Context, blobs: dict[str, Any], side: bool) -> dict[str, Any]:
    """What h is trained from: the models (by config hash), side-info and images."""
    cfg = ctx.cfg
    return {
        "old": cfg.old_model.name,
        "new": cfg.new_model.name,
        "side": cfg.side_info.name if side else None,
        "images": cfg.images_uri,
        "models": {k: b.meta.get("config_hash") or b.name for k, b in blobs.items()},
    }


def _training_features(
    ctx: Context, tc: Any, blobs: dict[str, Any], identity: dict[str, Any]
) -> StoredPairs:
    """The train split's paired features, embedded once into Parquet beside the training
    checkpoints and streamed from there: training makes many passes over them, and embedding
    them again each pass would cost a full pass of every model."""
    cfg = ctx.cfg
    feats = paired_features(
        cfg.images_uri,
        blobs,
        cfg.embed,
        cfg.storage,
        augment_copies=tc.augment_copies,
        labelled_only=False,  # an unlabelled gallery trains h too
        layout=ImageLayout.of(cfg.data),
    )
    if tc.max_train_rows is not None:
        feats = feats.limit(tc.max_train_rows)
    key = config_hash(identity, tc.augment_copies, tc.max_train_rows, sorted(blobs))
    where = uri_io.join(train_storage_uri(cfg), "pairs", f"{tc.name}-{key}")
    dims = {k: b.embedding_dim for k, b in blobs.items()}
    return store_pairs(feats, where, dims, cfg.storage)


def fit_adapters_step(
    ctx: Context,
    new_train: np.ndarray,
    old_train: np.ndarray,
    register_adapters: bool = False,
) -> dict[str, Any]:
    """Fit each configured query adapter (new → old) on paired rows; save them, and with
    `register_adapters` log each to its own MLflow run and register it."""
    ac, cfg = ctx.cfg.adapters, ctx.cfg
    n = min(len(new_train), ac.sample_rows)
    idx = np.random.default_rng(cfg.data.seed).permutation(len(new_train))[:n]
    out: dict[str, Any] = {}
    for kind in ac.kinds:
        kw: dict[str, Any] = {}
        if kind == "low_rank":
            kw["rank"] = ac.rank
        elif kind == "residual_mlp":
            kw.update(hidden=ac.hidden, epochs=ac.epochs)
        t0 = time.perf_counter()
        torch.manual_seed(cfg.data.seed)
        adapter = fit_adapter(kind, new_train[idx], old_train[idx], seed=cfg.data.seed, **kw)
        d = Path(cfg.workdir) / "models" / f"adapter-{kind}"
        meta = {
            "kind": "query-adapter",
            "adapter": adapter.config(),
            "from_model": cfg.new_model.name,
            "to_model": cfg.old_model.name,
            "fit_rows": n,
        }
        save_model_dir(adapter, meta, d)
        out[kind] = {"adapter": adapter, "dir": str(d), "fit_seconds": time.perf_counter() - t0}
        if not register_adapters:
            continue
        weights_sum = float(sum(t.double().abs().sum() for t in adapter.state_dict().values()))
        with ctx.tracker.run(f"adapter-{kind}", ctx.tags(step="fit_adapter", adapter=kind)) as run:
            run.log_params({"adapter": adapter.config(), "fit_rows": n})
            tags = {"adapter": kind, "from_model": meta["from_model"], "to_model": meta["to_model"]}
            h = config_hash(meta, round(weights_sum, 6))
            out[kind]["registry_version"] = register(ctx, "query-adapter", d, run, h, tags)
    return out


@dataclass(frozen=True)
class OldSource:
    """Where evaluation reads the old model's gallery: the serving version, mapped into the
    old model's space by registered transformations when it is generations behind."""

    version: str
    space: str
    prefix: ChainSpec | None = None  # None: the version is in the old model's space


def old_source(ctx: Context) -> OldSource:
    """The serving version when it is in old_model's space or a registered chain reaches that
    space from it; else a stored version named after old_model."""
    g, old = ctx.gallery, ctx.cfg.old_model.name
    cur = g.current()
    space = space_of(g.manifest(cur), cur) if cur is not None else None
    if cur is not None and space == old:
        return OldSource(cur, old)
    found = registry_chain(ctx, space, old) if space is not None else None
    if cur is not None and found:
        return OldSource(cur, space, chain_spec([p for _, p in found], [n for n, _ in found]))
    if g.has_version(old):
        return OldSource(old, space_of(g.manifest(old), old))
    if cur is None:
        raise FileNotFoundError(f"{g.uri}: old version {old!r} is not in the gallery; ingest first")
    raise FileNotFoundError(
        f"{g.uri} serves {cur!r} (model {space!r}) and no registered transformation maps "
        f"{space!r} to old_model {old!r}: set old_model to {space!r}, or upgrade to {old!r} first"
    )


def _gallery_sets(
    ctx: Context, versions: list[str], keys: list[str], src: OldSource
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]:
    """Each version's embeddings of `keys` (aligned), the rows every version has, old side-info.
    The old model's set (under its name) is `src`'s rows, mapped by its chain prefix if any."""
    g, old = ctx.gallery, ctx.cfg.old_model.name
    sets, found, side = {}, np.ones(len(keys), dtype=bool), None
    for v in versions:
        with_side = v == src.version and bool(g.manifest(v).get("side_info_dim"))
        rows = read_rows(g, v, keys, ("embedding", "side_info") if with_side else ("embedding",))
        sets[v], found = rows["embedding"], found & rows.found
        if with_side:
            side, found = rows["side_info"], found & rows.present["side_info"]
    rows = sets.pop(src.version)
    if src.prefix is None:
        return {old: rows, **sets}, found, side
    # the stored rows stay beside the mapped ones: a direct map from their space reads them
    mapped, _ = TransformChain(src.prefix)(rows, side)
    return {old: mapped, src.version: rows, **sets}, found, side


def _computed_new(ctx: Context, split: str, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """New-model embeddings of a split computed from the images (new version not built yet)."""
    blob = blob_of(ctx, ctx.cfg.new_model)  # resolved once: a models:/ URI downloads
    cfg = ctx.cfg
    feats = collect(
        paired_features(
            cfg.images_uri,
            {"new": blob},
            cfg.embed,
            cfg.storage,
            split,
            labelled_only=False,
            layout=ImageLayout.of(cfg.data),
        )
    )
    pos = {k: i for i, k in enumerate(feats.get("key", []))}
    found = np.array([k in pos for k in keys], dtype=bool)
    out = np.zeros((len(keys), blob.embedding_dim), np.float32)
    out[found] = feats["new"][[pos[k] for k in keys if k in pos]]
    return out, found


def study_inputs(ctx: Context, split: str, cap: int, versions: list[str] | None = None):
    """Labels (None: unlabelled) and per-version embeddings of one split's sampled rows, read
    from the gallery."""
    cfg, g = ctx.cfg, ctx.gallery
    old, new = cfg.old_model.name, cfg.new_model.name
    src = old_source(ctx)
    sample = split_sample(cfg, split, cap)
    keys, labels = sample.keys, sample.labels
    versions = [v for v in (versions or g.versions()) if g.has_version(v)]
    versions = [src.version] + [v for v in versions if v not in (src.version, old)]
    sets, found, side = _gallery_sets(ctx, versions, keys, src)
    if new in sets and g.manifest(new).get("method") == "planned":
        # a planned version mixes transformed and re-embedded rows: it is not the new model's
        # own embedding, so it joins the matrix under its own name and "new" is computed
        sets[f"{new} (planned)"] = sets.pop(new)
    if new not in sets:
        sets[new], f = _computed_new(ctx, split, keys)
        found &= f
    if found.sum() < 2:
        raise ValueError(f"fewer than 2 sampled {split!r} rows are in every version")
    sets = {k: v[found] for k, v in sets.items()}
    labels = labels[found] if labels is not None else None
    return labels, sets, (side[found] if side is not None else None)


def registry_chain(ctx: Context, src: str, dst: str) -> list[tuple[str, Path]] | None:
    """Registered transformations composing `src` → `dst` (downloaded), or None."""
    name = ctx.registry_name("transformation")
    edges, by = [], {}
    for info in reversed(ctx.tracker.latest_versions(name, limit=1000)):
        a, b = info.tags.get("carryover.from_model"), info.tags.get("carryover.to_model")
        if a and b:
            label = f"{info.tags.get('carryover.model', 'h')}@{info.version}"
            edges.append((a, b, label))
            by[label] = info
    chain = find_chain(edges, src, dst)
    if chain is None:
        return None
    out = []
    for label in chain:
        info = by[label]
        d = Path(ctx.cfg.workdir) / "models" / "_registry" / f"{name}-{info.version}"
        if not (d / "model.json").exists():
            d = Path(ctx.tracker.download_model(f"models:/{name}/{info.version}", d))
        out.append((label, d))
    return out


def evaluate_compat_step(
    ctx: Context,
    versions: list[str] | None = None,
    report_dir: str | Path | None = None,
    register_adapters: bool = False,
) -> tuple[Any, dict[str, str]]:
    """FCT's protocol on the validation split: cases, matrix, backfilling curves, adapters.

    Writes report.json and the plots to `report_dir` and logs them to an MLflow run (nested
    under the run open around the call: the upgrade's evaluate stage).
    """
    cfg = ctx.cfg
    t0 = time.perf_counter()
    ensure_ray(cfg.ray)
    old, new = cfg.old_model.name, cfg.new_model.name
    labels, sets, side = study_inputs(ctx, "val", cfg.evaluate.max_queries, versions)
    inp = StudyInputs(labels=labels, sets=sets, old=old, new=new, side=side)
    inp.bct = [v for v in sets if v != old and _is_bct(ctx, v)]
    if transformation_dir(ctx).exists():
        model, meta = load_transformation(transformation_dir(ctx))
        if meta["arch"]["side_dim"] and side is None:
            raise ValueError(
                f"transformation {cfg.transformation.name!r} needs side-info but "
                f"version {old!r} was ingested without it"
            )
        inp.transformations[cfg.transformation.name] = (model, meta)
    choice = _chain_choice(ctx, inp)
    if cfg.adapters.kinds:
        _, tr_sets, _ = study_inputs(ctx, "train", cfg.adapters.sample_rows, [old, new])
        fitted = fit_adapters_step(ctx, tr_sets[new], tr_sets[old], register_adapters)
        inp.adapters = {k: v["adapter"] for k, v in fitted.items()}
    report = compat_study(
        inp,
        f"{cfg.gallery_name}: {old} → {new}",
        cfg.evaluate.metric,
        tuple(cfg.evaluate.orderings),
        cfg.evaluate.curve_steps,
        cfg.data.seed,
        recall_k=cfg.evaluate.recall_k,
        curve_on=choice.chosen if choice is not None else None,
    )
    report.extra.update(versions=list(sets), evaluate_seconds=round(time.perf_counter() - t0, 2))
    if choice is not None:
        report.extra["chain_choice"] = asdict(choice)
    out = Path(report_dir or default_report_dir(ctx))
    with ctx.tracker.run(
        "evaluate-compat",
        ctx.tags(step="evaluate", from_version=old, to_version=new),
    ) as run:
        report.extra["run_id"] = run.run_id  # the JSON report points at its MLflow run
        files = write_report(report, out)
        run.log_params({"evaluate": cfg.evaluate.model_dump(mode="json"), "versions": list(sets)})
        run.log_metrics(report.metrics())
        for f in files.values():
            run.log_artifact(f, "compat")
    return report, files


def direct_config(ctx: Context) -> Any:
    """The direct map's config: the configured transformation under its own name."""
    tc = ctx.cfg.transformation
    return tc.model_copy(update={"name": f"{tc.name}-direct"})


def _chain_choice(ctx: Context, inp: StudyInputs) -> ChainChoice | None:
    """With the gallery generations behind and a direct map trained from its space: which
    of the two the upgrade maps with (the direct map joins the study's transformations)."""
    cfg, src = ctx.cfg, old_source(ctx)
    d = transformation_dir(ctx, direct_config(ctx))
    if src.prefix is None or cfg.transformation.name not in inp.transformations:
        return None
    if not (d / MODEL_FILE).exists():
        return None
    model, meta = load_transformation(d)
    if meta.get("from_model") != src.space or meta.get("to_model") != cfg.new_model.name:
        return None  # a direct map of another upgrade
    name = direct_config(ctx).name
    inp.transformations[name], inp.inputs[name] = (model, meta), src.version
    k, metric = cfg.evaluate.recall_k, cfg.evaluate.metric
    return choose_chain(inp, cfg.transformation.name, name, metric, k, cfg.plan.min_gain)


def train_direct_step(ctx: Context) -> dict[str, Any] | None:
    """When the gallery serves a model older than old_model (a registered chain maps it
    there): h from that model straight to the new one, registered like any transformation.
    None when not configured, not behind, or the serving model is not in the registry."""
    if not ctx.cfg.transformation.direct or not ctx.cfg.transformation.enabled:
        return None
    src = old_source(ctx)
    rv = ctx.gallery.manifest(src.version).get("registry_version")
    if src.prefix is None or rv is None:
        return None
    uri = f"models:/{ctx.registry_name()}/{rv}"
    old = ctx.cfg.old_model.model_copy(update={"name": src.space, "uri": uri})
    direct = Context(ctx.cfg.model_copy(update={"old_model": old}), quiet=ctx.quiet)
    return train_transformation_step(direct, tc=direct_config(ctx))


def default_report_dir(ctx: Context) -> Path:
    """Where `evaluate` writes report.json and the plots unless told otherwise."""
    cfg = ctx.cfg
    old, new = cfg.old_model.name, cfg.new_model.name
    return Path(cfg.evaluate.report_dir or Path(cfg.workdir) / "reports" / f"{old}-to-{new}")


def _is_bct(ctx: Context, version: str) -> bool:
    """Whether a gallery version's model was trained with BCT's influence loss (here)."""
    g = ctx.gallery
    # the new model's set is computed from the images before its version exists
    model = g.manifest(version).get("model") if g.has_version(version) else version
    p = Path(ctx.cfg.workdir) / "models" / str(model) / MODEL_FILE
    try:
        return json.loads(p.read_text()).get("compat_loss") == "bct"
    except (OSError, ValueError):
        return False
