"""Models of an upgrade: train or reuse, register in MLflow, resolve their bytes, BCT's head."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.cluster import train_storage
from pipeline.compat.classifier import LinearHead
from pipeline.compat.losses import synthesize_old_classifier
from pipeline.config import ConfigError, ModelConfig, SideInfoConfig
from pipeline.context import Context
from pipeline.data.sources import ImageLayout
from pipeline.embed.features import collect, paired_features
from pipeline.models.store import ModelBlob, ModelLoadError, build_model, load_trained, resolve_blob
from pipeline.runtime import ensure_ray
from pipeline.services.inputs import training_images
from pipeline.train.embedder import train_embedder
from pipeline.train.side_info import train_side_info

# Losses that read the old model's (synthesised) classifier while the new model trains.
OLD_CLASSIFIER_LOSSES = ("bct", "bt2", "oca")


@dataclass
class ModelStepResult:
    """A model made available to the upgrade: trained here or brought in."""

    name: str
    registry_name: str | None
    registry_version: int | None
    trained: bool
    cached: bool
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def train_step(ctx: Context, model: ModelConfig, aliases: tuple[str, ...] = ()) -> ModelStepResult:
    """Train (or reuse) a model on Ray Train and register it in MLflow with aliases.

    An embedder (independent or BCT) registers as `<gallery>-embedder`; FCT's side-info model
    (a `SideInfoConfig`) trains with SimCLR on the old model's classes, as `<gallery>-side-info`.
    """
    t0 = time.perf_counter()
    if model.uri is not None:  # brought from elsewhere: nothing to train
        return ModelStepResult(model.name, None, None, False, True, 0.0)
    ensure_ray(ctx.cfg.ray)
    side = isinstance(model, SideInfoConfig)
    kind = "side-info" if side else "embedder"
    train, classes = _trainer(ctx, model)
    with ctx.tracker.run(
        f"train-{model.name}", ctx.tags(step=f"train_{kind}", model=model.name)
    ) as run:
        tr = train()
        run.log_params({"model": model.model_dump(mode="json"), "images": ctx.cfg.images_uri})
        run.log_metrics(tr.metrics())
        run.log_inputs([training_images(ctx)])
        tags = {"model": model.name, "trained_classes": classes or "all"}
        if not side:
            tags["compat_loss"] = model.train.loss
        version = register(ctx, kind, ctx.model_dir(model), run, tr.config_hash, tags, aliases)
        run.set_tags(
            {"carryover.registry_version": str(version), "carryover.cached": str(tr.cached)}
        )
    secs = round(time.perf_counter() - t0, 2)
    return ModelStepResult(
        model.name, ctx.registry_name(kind), version, True, tr.cached, secs, tr.metrics()
    )


def _trainer(ctx: Context, model: ModelConfig) -> tuple[Any, list[int] | None]:
    """A zero-argument training call for the model's kind, and the classes it trains on."""
    args = (
        ctx.cfg.images_uri,
        ctx.model_dir(model),
        ctx.cfg.storage,
        train_storage(ctx.cfg),
        ctx.cfg.embed.max_decoded_pixels,
    )
    layout = ImageLayout.of(ctx.cfg.data)
    if isinstance(model, SideInfoConfig):
        # FCT: side-info learns from the data the old model saw, without its labels. A brought
        # old model was not trained here: its (demo) training classes say nothing of its data.
        old = ctx.cfg.old_model
        classes = model.train.classes or (None if old.uri else old.train.classes)
        return (lambda: train_side_info(model, classes, *args, layout=layout)), classes
    bct = None
    if model.train.loss in OLD_CLASSIFIER_LOSSES:
        bct = bct_classifier(ctx, model)
    return (lambda: train_embedder(model, *args, bct, layout=layout)), model.train.classes


def register(
    ctx: Context,
    kind: str,
    model_dir: str | Path,
    run: Any,
    config_hash: str,
    tags: dict[str, Any],
    aliases: tuple[str, ...] = (),
) -> int:
    """Register a model dir as `<gallery>-<kind>` once per config hash; move the aliases."""
    name = ctx.registry_name(kind)
    existing = find_model_version(ctx, "carryover.config_hash", config_hash, kind)
    if existing is None:
        return ctx.tracker.register_model(
            name,
            str(model_dir),
            run.run_id,
            tags=ctx.tags(config_hash=config_hash, **tags),
            aliases=list(aliases),
        )
    for a in aliases:
        ctx.tracker.set_alias(name, a, existing.version)
    return existing.version


def find_model_version(ctx: Context, tag: str, value: str, kind: str = "embedder") -> Any:
    """The newest registered version of `<gallery>-<kind>` whose tag equals value, if any."""
    for info in ctx.tracker.latest_versions(ctx.registry_name(kind), limit=1000):
        if info.tags.get(tag) == value:
            return info
    return None


def registry_version_of(ctx: Context, model: ModelConfig) -> int | None:
    """The registry version holding this model (trained here), if any."""
    if model.uri is not None and model.uri.startswith("models:/"):
        return ctx.tracker.resolve(model.uri).version
    info = find_model_version(ctx, "carryover.model", model.name)
    return info.version if info else None


def blob_of(ctx: Context, model: Any) -> ModelBlob:
    """The bytes of a configured model (trained in this workdir, or its uri)."""
    return resolve_blob(model, ctx.model_dir(model), ctx.cfg.storage, ctx.cfg.tracking_uri)


def side_blob(ctx: Context) -> ModelBlob | None:
    """The side-info model for ingest (with its own preprocess), or None when disabled."""
    sc = ctx.cfg.side_info_model
    return blob_of(ctx, sc) if sc.enabled else None


def side_info_stored(ctx: Context) -> bool:
    """The serving version's rows carry side-info, or an ingest still to come will write it.
    An adopted gallery (`carryover import`) has none: side-info would feed no h."""
    g = ctx.gallery
    current = g.current()
    return current is None or bool(g.manifest(current).get("side_info_dim"))


def train_side_info_step(ctx: Context) -> ModelStepResult | None:
    """Train (or reuse) the SimCLR side-info model; None when side-info is disabled, or when
    the gallery's rows have none to use it with."""
    sc = ctx.cfg.side_info_model
    return train_step(ctx, sc) if sc.enabled and side_info_stored(ctx) else None


def bct_classifier(ctx: Context, model: ModelConfig | None = None) -> dict[str, Any]:
    """BCT's frozen old classifier (also read by BT² and OCA): the old model's rows for the
    classes it was trained on, class means of its train-split features for every other class
    (synthesised weights). `model` (default new_model) is checked against the old space."""
    old, model = ctx.cfg.old_model, model or ctx.cfg.new_model
    net, meta = _with_classifier(ctx, old)
    if net is None:
        raise ModelLoadError(
            f"new_model.train.loss={model.train.loss} needs the old model's classifier: train "
            "the old model here or bring a carryover model (models:/...); TorchScript has no "
            "classifier"
        )
    _check_old_space(model, net.classifier.in_features)
    known = meta.get("trained_classes") or list(range(net.classifier.out_features))
    ensure_ray(ctx.cfg.ray)
    feats = collect(
        paired_features(
            ctx.cfg.images_uri,
            {"old": blob_of(ctx, old)},
            ctx.cfg.embed,
            ctx.cfg.storage,
            layout=ImageLayout.of(ctx.cfg.data),
        )
    )
    w, b = synthesize_old_classifier(
        net.classifier.weight.detach(),
        net.classifier.bias.detach(),
        known,
        torch.from_numpy(feats["old"]),
        torch.from_numpy(feats["label"]),
        ctx.cfg.new_model.architecture.num_classes,
    )
    return {"weight": w.tolist(), "bias": b.tolist(), "from_model": old.name, "known": known}


def _check_old_space(model: ModelConfig, old_dim: int) -> None:
    """BCT compares the whole embedding to old rows; BT² and OCA its first old_dim dims."""
    dim, loss = model.architecture.embedding_dim, model.train.loss
    if loss == "bct" and dim != old_dim:
        raise ConfigError(
            f"new_model.architecture.embedding_dim={dim}: loss=bct needs the old model's "
            f"{old_dim} dims (bt2 or oca add extra dims)"
        )
    if dim < old_dim:
        raise ConfigError(
            f"new_model.architecture.embedding_dim={dim}: loss={loss} needs at least the old "
            f"model's {old_dim} dims (the extra dims are embedding_dim - {old_dim})"
        )


def model_classifier(ctx: Context) -> LinearHead | None:
    """The new model's own classifier head, if it has one (a carryover embedder)."""
    net, _ = _with_classifier(ctx, ctx.cfg.new_model)
    if net is None:
        return None
    w, b = net.classifier.weight.detach().numpy(), net.classifier.bias.detach().numpy()
    return LinearHead(w, b, "model")


def _with_classifier(ctx: Context, model: Any) -> tuple[Any, dict[str, Any]]:
    """A carryover embedder with its classifier head (trained here, or from the registry),
    and its model.json; (None, {}) for a TorchScript model, which has no head."""
    if model.uri is None:
        return load_trained(ctx.model_dir(model))
    blob = blob_of(ctx, model)
    if blob.kind != "carryover":
        return None, {}
    return build_model(blob), blob.meta
