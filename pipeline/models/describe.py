"""What a model dir takes and returns, read from its model.json alone (no torch): the basis of
its MLflow signature and of the pyfunc wrapper's input handling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelIO:
    """A model's inputs and output: images or embeddings in, float32 rows out."""

    kind: str  # "embedder" | "side-info" | "transformation" | "query-adapter"
    output_dim: int
    input_dim: int | None = None  # embedding in (transformation, adapter); None: images
    side_dim: int = 0  # a transformation's side-info input (0: none)
    image_shape: tuple[int, int, int] | None = None  # (channels, size, size) of an embedder


def model_io(meta: dict[str, Any]) -> ModelIO:
    """Inputs and output of the model a model.json describes (KeyError when it cannot say)."""
    kind = str(meta.get("kind"))
    if kind == "transformation":
        a = meta["arch"]
        return ModelIO(kind, int(a["new_dim"]), int(a["old_dim"]), int(a.get("side_dim") or 0))
    if kind == "query-adapter":
        a = meta["adapter"]
        return ModelIO(kind, int(a["d_old"]), int(a["d_new"]))
    pre = meta["preprocess"]
    shape = (int(pre.get("channels", 1)), int(pre["input_size"]), int(pre["input_size"]))
    if "architecture" in meta:  # trained here (embedder or side-info)
        return ModelIO(kind, int(meta["architecture"]["embedding_dim"]), image_shape=shape)
    # an imported model (its kind says torchscript/onnx): an embedder of the stated dimension
    return ModelIO("embedder", int(meta["embedding_dim"]), image_shape=shape)


def describe_dir(d: str | Path) -> ModelIO | None:
    """The ModelIO of a model dir, or None when its model.json does not say (no signature)."""
    try:
        return model_io(json.loads((Path(d) / "model.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
