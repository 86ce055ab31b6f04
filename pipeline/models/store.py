"""Load embedders without unpickling: safetensors + JSON, TorchScript, ONNX, MLflow URIs."""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from pipeline.config import ArchitectureConfig, ModelConfig, PreprocessConfig, StorageConfig
from pipeline.io import uri as uri_io
from pipeline.models import onnx_embedder
from pipeline.models.backbone import EmbeddingNet

MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "carryover-model/1"


class ModelLoadError(ValueError):
    """A model could not be loaded or does not match its config; the message says which."""


@dataclass
class ModelBlob:
    """A model as bytes: what travels to Ray workers so they need no shared filesystem."""

    kind: str  # "carryover" | "torchscript" | "onnx" | "pickle"
    name: str
    preprocess: PreprocessConfig
    embedding_dim: int
    files: dict[str, bytes] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """sha256 over the model's files: which exact weights produced a shard."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name])
        return "sha256:" + h.hexdigest()


def save_model_dir(model: nn.Module, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `weights.safetensors` and `model.json` (architecture, preprocess, provenance)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    (out / WEIGHTS_FILE).write_bytes(save(state))
    (out / MODEL_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True))
    return out


def load_state(data: bytes, what: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes. Never unpickles: a pickle (or anything else) planted in
    place of the weights is refused with ModelLoadError naming the file."""
    try:
        return load(data)
    except (SafetensorError, ValueError) as e:
        raise ModelLoadError(f"{what}: not a safetensors file ({e}); refused") from None


def restore_training_state(d: str | Path, module: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Resume from a Ray Train checkpoint dir: weights from safetensors, the optimizer's state
    with `weights_only=True` (tensors and plain containers only), the next epoch to run."""
    d = Path(d)
    module.load_state_dict(
        load_state((d / "train.safetensors").read_bytes(), d / "train.safetensors")
    )
    try:
        state = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a planted pickle; corrupt files vary
        raise ModelLoadError(
            f"{d / 'optimizer.pt'}: refused: not a plain optimizer state dict ({e})"
        ) from None
    opt.load_state_dict(state)
    return int(json.loads((d / "progress.json").read_text())["epoch"]) + 1


def embedder_meta(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The model.json content for an EmbeddingNet trained from `cfg`."""
    return {
        "kind": "embedder",
        "name": cfg.name,
        "architecture": cfg.architecture.model_dump(),
        "preprocess": cfg.preprocess.model_dump(),
        **extra,
    }


def _blob_from_dir(d: Path, cfg: ModelConfig) -> ModelBlob:
    meta = json.loads((d / MODEL_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{d / MODEL_FILE}: unknown model format {meta.get('format')!r}")
    pre = PreprocessConfig.model_validate(meta.get("preprocess", cfg.preprocess.model_dump()))
    arch = ArchitectureConfig.model_validate(meta["architecture"])
    return ModelBlob(
        kind="carryover",
        name=meta.get("name", cfg.name),
        preprocess=pre,
        embedding_dim=arch.embedding_dim,
        files={WEIGHTS_FILE: (d / WEIGHTS_FILE).read_bytes()},
        meta=meta,
    )


def _is_torchscript(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _is_carryover_dir(d: Path) -> bool:
    try:
        return json.loads((d / MODEL_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _blob_from_mlflow_dir(d: Path, cfg: ModelConfig, uri: str) -> ModelBlob:
    if _is_carryover_dir(d):
        return _blob_from_dir(d, cfg)
    onnx_files = sorted(d.rglob("*.onnx"))  # mlflow.onnx's model.onnx
    if onnx_files:
        return _onnx_blob(onnx_files[0].read_bytes(), cfg, uri)
    candidates = sorted(p for p in d.rglob("*") if p.suffix in (".pt", ".pth", ".ts"))
    for p in candidates:
        data = p.read_bytes()
        if _is_torchscript(data):
            return _torchscript_blob(data, cfg)
    if candidates and cfg.allow_pickle:
        return ModelBlob(
            "pickle",
            cfg.name,
            cfg.preprocess,
            cfg.architecture.embedding_dim,
            {"model.pth": candidates[0].read_bytes()},
        )
    raise ModelLoadError(
        f"{uri}: no carryover model.json, TorchScript or .onnx file in the MLflow model; a pickled "
        "torch model is refused unless the config sets allow_pickle: true for it"
    )


def _torchscript_blob(data: bytes, cfg: ModelConfig) -> ModelBlob:
    return ModelBlob(
        "torchscript", cfg.name, cfg.preprocess, cfg.architecture.embedding_dim, {"model.ts": data}
    )


def resolve_blob(
    cfg: ModelConfig,
    trained_dir: str | Path | None = None,
    storage: StorageConfig | None = None,
    tracking_uri: str | None = None,
) -> ModelBlob:
    """Turn a model config into bytes: a trained dir, a TorchScript file, or models:/ URI."""
    if cfg.uri is None:
        if trained_dir is None or not (Path(trained_dir) / MODEL_FILE).exists():
            raise ModelLoadError(f"model {cfg.name!r} has no uri and has not been trained yet")
        return _blob_from_dir(Path(trained_dir), cfg)
    if cfg.uri.startswith("models:/"):
        # start-up: pipeline.tracking imports mlflow (~1.4 s), which a Ray worker loading a
        # model from a path never needs.
        from pipeline.tracking import download_model

        with tempfile.TemporaryDirectory() as tmp:
            d = Path(download_model(tracking_uri, cfg.uri, tmp))
            return _blob_from_mlflow_dir(d, cfg, cfg.uri)
    if not uri_io.is_s3(cfg.uri) and Path(cfg.uri).is_dir():
        if not (Path(cfg.uri) / MODEL_FILE).exists():
            raise ModelLoadError(f"{cfg.uri}: directory has no {MODEL_FILE}")
        return _blob_from_dir(Path(cfg.uri), cfg)
    data = uri_io.read_bytes(cfg.uri, storage)
    if _is_torchscript(data):
        return _torchscript_blob(data, cfg)
    if cfg.uri.endswith(".onnx") or onnx_embedder.looks_like_onnx(data):
        return _onnx_blob(data, cfg, cfg.uri)
    raise ModelLoadError(f"{cfg.uri}: not a TorchScript archive (torch.jit.save) nor an ONNX model")


def _onnx_blob(data: bytes, cfg: ModelConfig, uri: str) -> ModelBlob:
    """Check the graph against the preprocess; its embedding dim from the graph (or a run)."""
    try:
        sess = onnx_embedder.session(data)
        graph = onnx_embedder.check_graph(sess, cfg.preprocess)
        dim = graph.embedding_dim or onnx_embedder.probe_dim(sess, graph, cfg.preprocess)
    except onnx_embedder.OnnxError as e:
        raise ModelLoadError(f"{uri}: ONNX model {cfg.name!r}: {e}") from None
    given = cfg.architecture.embedding_dim
    if "embedding_dim" in cfg.architecture.model_fields_set and given != dim:
        raise ModelLoadError(
            f"{uri}: ONNX model {cfg.name!r} outputs {dim}-d embeddings, but the config sets "
            f"architecture.embedding_dim={given}: fix or remove the key"
        )
    meta = {"uri": uri, "graph": graph, "use_gpu": cfg.use_gpu}
    return ModelBlob("onnx", cfg.name, cfg.preprocess, dim, {"model.onnx": data}, meta)


def build_model(blob: ModelBlob) -> nn.Module:
    """Instantiate the embedder from a blob, in eval mode, on CPU."""
    if blob.kind == "carryover":
        arch = ArchitectureConfig.model_validate(blob.meta["architecture"])
        model: nn.Module = EmbeddingNet(arch, in_channels=blob.preprocess.channels)
        model.load_state_dict(load_state(blob.files[WEIGHTS_FILE], f"model {blob.name!r}"))
    elif blob.kind == "torchscript":
        try:  # TorchScript's own unpickler resolves only TorchScript types, never Python code
            model = torch.jit.load(io.BytesIO(blob.files["model.ts"]), map_location="cpu")
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(
                f"model {blob.name!r}: not a loadable TorchScript archive: {msg}"
            ) from None
    elif blob.kind == "onnx":
        m = blob.meta
        model = onnx_embedder.OnnxEmbedder(
            blob.files["model.onnx"], m["graph"], m["uri"], m["use_gpu"]
        )
    elif blob.kind == "pickle":
        # Only reached when the user opted in with allow_pickle for this model.
        model = torch.load(
            io.BytesIO(blob.files["model.pth"]), map_location="cpu", weights_only=False
        )
    else:
        raise ModelLoadError(f"unknown model kind {blob.kind!r}")
    return model.eval()


def check_output_dim(model: nn.Module, blob: ModelBlob) -> None:
    """Run one dummy batch: the output must be (n, embedding_dim) as the config says."""
    p = blob.preprocess
    x = torch.zeros(2, p.channels, p.input_size, p.input_size)
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as e:  # a user model may reject the configured input size
        raise ModelLoadError(
            f"model {blob.name!r} failed on input of shape {tuple(x.shape)} "
            f"(preprocess.input_size/channels): {e}"
        ) from e
    model_output(out, len(x), blob)


def model_output(out: Any, n: int, blob: ModelBlob) -> np.ndarray:
    """A model call's output as (n, embedding_dim) float32: exactly one row per input.

    Anything else (a row per batch from pooling over dim 0, an extra row, a 3-d tensor, a
    tuple) fails naming the model: numpy would otherwise broadcast one row over the batch.
    """
    shape = tuple(getattr(out, "shape", ()))
    if isinstance(out, torch.Tensor) and len(shape) == 2 and shape[0] == n:
        if shape[1] != blob.embedding_dim:
            raise ModelLoadError(
                f"model {blob.name!r} outputs shape {shape}, but the config says "
                f"architecture.embedding_dim={blob.embedding_dim}"
            )
    else:
        got = shape if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(
            f"model {blob.name!r} returned {got} for a batch of {n} inputs; expected "
            f"({n}, {blob.embedding_dim}): one row per input, of architecture.embedding_dim"
        )
    return out.detach().float().numpy()


def load_trained(d: str | Path) -> tuple[EmbeddingNet, dict[str, Any]]:
    """Load a carryover EmbeddingNet (with its classifier) from a model dir."""
    d = Path(d)
    meta = json.loads((d / MODEL_FILE).read_text())
    arch = ArchitectureConfig.model_validate(meta["architecture"])
    pre = PreprocessConfig.model_validate(meta["preprocess"])
    model = EmbeddingNet(arch, in_channels=pre.channels)
    model.load_state_dict(load_state((d / WEIGHTS_FILE).read_bytes(), d / WEIGHTS_FILE))
    return model.eval(), meta
