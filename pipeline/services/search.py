"""Serving-side search: neighbours of a key or an image file from a gallery version's index."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load

from pipeline.config import ConfigError, ModelConfig
from pipeline.context import Context
from pipeline.data.decode import decode_images
from pipeline.data.shards import DataError
from pipeline.models.compat import ADAPTERS, build_adapter
from pipeline.models.store import MODEL_FILE, WEIGHTS_FILE, build_model, resolve_blob
from pipeline.services.steps import image_layout, image_shards, load_index, version_embeddings


class QueryError(DataError):
    """A search query the gallery cannot answer: a key it lacks, a file that is no image."""


def read_image_file(image: Path) -> bytes:
    """The bytes of a query image file; a missing or unreadable one is the user's mistake."""
    if not image.is_file():
        raise FileNotFoundError(f"no such image file: {image}")
    try:
        return image.read_bytes()
    except OSError as e:  # permission denied and the like: one line, not a traceback
        raise QueryError(f"{image}: cannot read it: {e.strerror or e}") from None


def model_for_version(ctx: Context, version: str) -> ModelConfig:
    """The model that produced a version: from the config if named there, else the registry."""
    m = ctx.gallery.manifest(version)
    rv = m.get("registry_version")
    registered = f"models:/{m.get('registry_model') or ctx.registry_name()}/{rv}"
    for model in (ctx.cfg.old_model, ctx.cfg.new_model):
        if model.name == m.get("model"):
            # an imported version's model is in the registry, not in this config or workdir
            here = model.uri is not None or (ctx.model_dir(model) / MODEL_FILE).exists()
            return model if here or rv is None else model.model_copy(update={"uri": registered})
    if rv is None:
        raise ConfigError(
            f"version {version!r} was made by model {m.get('model')!r}, which is "
            "neither old_model nor new_model in the config and is not registered"
        )
    return ModelConfig(name=str(m.get("model")), uri=registered)


def embed_image_file(ctx: Context, version: str, image: Path) -> np.ndarray:
    """Embed one image file with the model that produced `version`."""
    data = read_image_file(image)
    return embed_bytes(ctx, model_for_version(ctx, version), data, str(image))


def embed_bytes(ctx: Context, model: ModelConfig, data: bytes, what: str) -> np.ndarray:
    """Embed one encoded image with `model`; a bad image names `what`."""
    blob = resolve_blob(model, ctx.model_dir(model), ctx.cfg.storage, ctx.cfg.tracking_uri)
    dec = decode_images([data], blob.preprocess, ctx.cfg.embed.max_decoded_pixels)
    if not dec.ok[0]:  # not an image, or too large to decode: the query is at fault
        raise QueryError(f"{what}: {dec.errors[0]}")
    with torch.inference_mode():
        return build_model(blob)(torch.from_numpy(dec.pixels)).numpy()


def _adapter_meta(ctx: Context, kind: str) -> tuple[Path, dict[str, Any]]:
    """The directory and metadata of a fitted query adapter (saved by `evaluate`)."""
    if kind not in ADAPTERS:  # it names a directory: "../x" must not reach the filesystem
        raise ConfigError(f"--adapter {kind!r}: expected one of {', '.join(ADAPTERS)}")
    d = Path(ctx.cfg.workdir) / "models" / f"adapter-{kind}"
    if not (d / MODEL_FILE).exists():
        raise FileNotFoundError(
            f"no fitted {kind!r} adapter at {d}: run `carryover evaluate` (adapters.kinds)"
        )
    return d, json.loads((d / MODEL_FILE).read_text())


def adapter_version(ctx: Context, kind: str) -> str:
    """The version an adapter's queries are searched in: one holding the embeddings of the
    model it maps into (the old model's): the serving version when it does, else the newest
    such version."""
    g = ctx.gallery
    space = _adapter_meta(ctx, kind)[1].get("to_model")
    cur = g.current()
    if cur is not None and g.manifest(cur).get("model") == space:
        return cur
    held = [v for v in g.versions() if g.manifest(v).get("model") == space]
    if not held:
        raise ConfigError(
            f"the {kind} adapter maps queries into {space!r}'s space, and no version of "
            f"{g.uri} holds {space!r} embeddings"
        )
    return held[-1]


def load_adapter(ctx: Context, kind: str, version: str) -> torch.nn.Module:
    """A fitted query adapter (new → old space), saved by `evaluate`; no unpickling. It must
    map into the space of `version`'s model."""
    d, meta = _adapter_meta(ctx, kind)
    space = ctx.gallery.manifest(version).get("model")
    if meta.get("to_model") != space:
        raise ConfigError(
            f"the {kind} adapter maps into {meta.get('to_model')!r}'s space, but version "
            f"{version!r} holds {space!r} embeddings"
        )
    adapter = build_adapter(meta["adapter"])
    adapter.load_state_dict(load((d / WEIGHTS_FILE).read_bytes()))
    return adapter.eval()


def image_bytes_of_key(ctx: Context, key: str) -> bytes:
    """The encoded image of a key, found by scanning the image shards (filter on key)."""
    layout = image_layout(ctx.cfg)
    for f in image_shards(ctx.cfg).values():
        for b in layout.read(f, ctx.cfg.storage, ["key", "image"]):
            t = pa.Table.from_batches([b])
            t = t.filter(pc.equal(t["key"], key))
            if t.num_rows:
                return t["image"][0].as_py()
    raise QueryError(f"key {key!r} has no image in {ctx.cfg.images_uri}")


@dataclass
class SearchResult:
    """Top-k neighbours of one query: keys, scores and each row's stored label (None where
    the image shards have none or no longer hold the key)."""

    version: str
    adapter: str | None
    keys: list[str]
    scores: list[float]
    labels: list[int | None] = field(default_factory=list)


def labels_of(ctx: Context, keys: list[str]) -> list[int | None]:
    """The stored label of each key, read from the image shards (label and key columns
    only); None where a row has none or the images are gone."""
    found: dict[str, int | None] = {}
    want = pa.array(keys, pa.string())
    layout = image_layout(ctx.cfg)
    try:
        files = image_shards(ctx.cfg).values()
    except FileNotFoundError:  # an imported gallery without image shards
        return [None] * len(keys)
    for f in files:
        for b in layout.read(f, ctx.cfg.storage, ["key", "label"]):
            t = pa.Table.from_batches([b])
            t = t.filter(pc.is_in(t["key"], value_set=want))
            found.update(zip(t["key"].to_pylist(), t["label"].to_pylist(), strict=True))
        if len(found) == len(set(keys)):
            break
    return [found.get(k) for k in keys]


def search_gallery(
    ctx: Context,
    key: str | None = None,
    image: Path | None = None,
    k: int = 10,
    version: str | None = None,
    adapter: str | None = None,
) -> SearchResult:
    """Top-k neighbours; a key query excludes the row itself from its own results.

    With `adapter`, the query is embedded by the NEW model and mapped by the query adapter
    into the old model's space, and searched in the version holding that space (the serving
    one, else the newest; `version` overrides): new-model queries served by the old index.
    """
    if adapter is not None and version is None:
        version = adapter_version(ctx, adapter)
    version, idx = load_index(ctx, version)
    if adapter is not None:
        data = read_image_file(Path(image)) if image is not None else image_bytes_of_key(ctx, key)
        with torch.inference_mode():
            new = embed_bytes(ctx, ctx.cfg.new_model, data, str(image or key))
            q = load_adapter(ctx, adapter, version)(torch.from_numpy(new))
        scores, keys = idx.search(q.numpy(), k + (key is not None))
        pairs = [(kk, s) for kk, s in zip(keys[0], scores[0], strict=True) if kk != key][:k]
    elif key is not None:
        found, q = version_embeddings(ctx.gallery, version, pa.array([key]))
        if not len(found):
            raise QueryError(f"key {key!r} is not in version {version} of {ctx.gallery.uri}")
        scores, keys = idx.search(q, k + 1)
        pairs = [(kk, s) for kk, s in zip(keys[0], scores[0], strict=True) if kk != key][:k]
    else:
        q = embed_image_file(ctx, version, Path(image))
        scores, keys = idx.search(q, k)
        pairs = list(zip(keys[0], scores[0], strict=True))
    hits = [str(p[0]) for p in pairs]
    return SearchResult(version, adapter, hits, [float(p[1]) for p in pairs], labels_of(ctx, hits))
