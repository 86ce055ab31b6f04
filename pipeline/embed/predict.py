"""Registered model dirs as plain callables outside Ray: what the MLflow pyfunc wrapper serves.

A carryover model dir (model.json + weights.safetensors, or an imported model's own file) is
turned into a `Predictor`: embedders and side-info models map encoded images (or a float
tensor of their input size) to float32 embeddings, a transformation maps old embeddings (+
side-info) to the new space, a query adapter maps new queries to the old space. Weights are
read with safetensors (or TorchScript/ONNX for an imported model): nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import EmbedConfig, ModelConfig
from pipeline.data.decode import decode_images
from pipeline.embed.transform import TransformChain, chain_spec
from pipeline.models.compat import build_adapter
from pipeline.models.describe import model_io
from pipeline.models.store import (
    FORMAT,
    MODEL_FILE,
    WEIGHTS_FILE,
    ModelBlob,
    ModelLoadError,
    _blob_from_mlflow_dir,
    build_model,
    load_state,
    model_output,
    resolve_blob,
)

EMBEDDER_KINDS = ("embedder", "side-info")
BATCH_ROWS = 256
MAX_PIXELS = EmbedConfig().max_decoded_pixels


def read_meta(d: str | Path) -> dict[str, Any]:
    """A model dir's model.json; ModelLoadError naming the file when it is unreadable."""
    p = Path(d) / MODEL_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{p}: cannot read model description: {e}") from None


class Predictor:
    """A loaded model dir: `embed`/`transform`/`adapt` by kind, all returning float32 rows."""

    def __init__(self, d: str | Path) -> None:
        d = Path(d)
        meta = read_meta(d)
        try:
            self.meta, self.io = meta, model_io(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{d / MODEL_FILE}: does not describe a model ({e})") from None
        if self.io.kind == "transformation":
            self.chain = TransformChain(chain_spec([d]))
        elif self.io.kind == "query-adapter":
            self.net = build_adapter(meta["adapter"])
            self.net.load_state_dict(load_state((d / WEIGHTS_FILE).read_bytes(), d))
            self.net.eval()
        else:
            self.blob = _embedder_blob(d, meta)
            self.net = build_model(self.blob)

    def embed(self, images: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Encoded images (bytes), or a float tensor (n, channels, size, size) -> (n, dim)."""
        if self.io.image_shape is None:
            raise ModelLoadError(
                f"model {self.meta.get('name')!r} ({self.io.kind}) embeds no images"
            )
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            x = np.ascontiguousarray(images, dtype=np.float32)
            if x.shape[1:] != self.io.image_shape:
                raise ValueError(
                    f"expected images of shape (n, *{self.io.image_shape}), got {x.shape}"
                )
        else:
            res = decode_images(list(images), self.blob.preprocess, MAX_PIXELS)
            bad = [f"row {i}: {e}" for i, e in enumerate(res.errors) if e]
            if bad:
                raise ValueError(f"{len(bad)} image(s) could not be decoded: {'; '.join(bad[:3])}")
            x = res.pixels.reshape(-1, *self.io.image_shape)
        out = np.zeros((len(x), self.io.output_dim), np.float32)
        with torch.inference_mode():
            for i in range(0, len(x), BATCH_ROWS):
                xb = torch.from_numpy(np.ascontiguousarray(x[i : i + BATCH_ROWS]))
                out[i : i + BATCH_ROWS] = model_output(self.net(xb), len(xb), self.blob)
        return out

    def transform(self, old: np.ndarray, side: np.ndarray | None = None) -> np.ndarray:
        """A transformation's prediction for stored old embeddings (+ side-info)."""
        if self.io.kind != "transformation":
            raise ModelLoadError(f"model {self.meta.get('name')!r} is a {self.io.kind}")
        return self.chain(old, side)[0]

    def adapt(self, new: np.ndarray) -> np.ndarray:
        """A query adapter: new-model queries mapped into the old model's space."""
        if self.io.kind != "query-adapter":
            raise ModelLoadError(f"model {self.meta.get('name')!r} is a {self.io.kind}")
        with torch.inference_mode():
            out = self.net(torch.from_numpy(np.asarray(new, dtype=np.float32)))
        return out.numpy().astype(np.float32, copy=False)


def _embedder_blob(d: Path, meta: dict[str, Any]) -> ModelBlob:
    """The blob of a carryover or imported embedder dir (its own file found by suffix)."""
    if meta.get("format") == FORMAT:
        return resolve_blob(ModelConfig(name=meta.get("name", d.name), uri=str(d)))
    cfg = ModelConfig(
        name=meta.get("name", d.name),
        uri="models:/imported",
        preprocess=meta["preprocess"],
        architecture={"embedding_dim": int(meta["embedding_dim"])},
    )
    return _blob_from_mlflow_dir(d, cfg, str(d))
