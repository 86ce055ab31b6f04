"""Models: safetensors round trip, TorchScript and MLflow URIs as embedders, pickles refused."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ArchitectureConfig, ModelConfig, PreprocessConfig, load_config
from pipeline.context import Context
from pipeline.data.decode import decode_batch
from pipeline.embed.stages import DecodeEmbedStage, EmbedStage
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.store import (
    ModelLoadError,
    build_model,
    check_output_dim,
    embedder_meta,
    resolve_blob,
    save_model_dir,
)
from pipeline.services.models import _trainer

ARCH = ArchitectureConfig(widths=[4, 8], embedding_dim=6, num_classes=3)
PRE = PreprocessConfig(input_size=8)


def _net() -> EmbeddingNet:
    torch.manual_seed(0)
    return EmbeddingNet(ARCH, in_channels=1).eval()


def _x() -> torch.Tensor:
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_backbone_shapes() -> None:
    emb, logits = _net().logits(_x())
    assert emb.shape == (3, 6) and logits.shape == (3, 3)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    net = _net()
    cfg = ModelConfig(name="m", architecture=ARCH, preprocess=PRE)
    save_model_dir(net, embedder_meta(cfg), tmp_path / "m")
    assert not any(p.suffix in (".pt", ".pkl") for p in (tmp_path / "m").iterdir())
    blob = resolve_blob(ModelConfig(name="m", uri=str(tmp_path / "m")))
    model = build_model(blob)
    with torch.inference_mode():
        torch.testing.assert_close(model(_x()), net(_x()))


def test_torchscript_file_as_embedder(tmp_path: Path) -> None:
    net = _net()
    path = tmp_path / "user_model.pt"
    torch.jit.save(torch.jit.trace(net, _x()), str(path))
    cfg = ModelConfig(
        name="ts", uri=str(path), preprocess=PRE, architecture=ArchitectureConfig(embedding_dim=6)
    )
    blob = resolve_blob(cfg)
    assert blob.kind == "torchscript"
    stage = EmbedStage(blob)
    batch = {
        "key": np.array(["a", "b", "c"], dtype=object),
        "pixels": _x().reshape(3, -1).numpy(),
        "error": np.array(["", "bad", ""], dtype=object),
        "shard": np.zeros(3, np.int64),
    }
    out = stage(batch)
    with torch.inference_mode():
        ref = net(_x()).numpy()
    np.testing.assert_allclose(out["embedding"][[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-6)
    assert (out["embedding"][1] == 0).all()  # the rejected row is not embedded


def _png(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_side_info_at_its_own_lower_resolution(tmp_path: Path) -> None:
    """Side-info decoded at its own input size from the same bytes: what the side model sees
    at ingest is what it sees anywhere it is run on the image alone."""
    old = tmp_path / "old.pt"
    torch.jit.save(torch.jit.trace(_net(), _x()), str(old))
    side_arch = ArchitectureConfig(widths=[4], embedding_dim=3, num_classes=2)
    torch.manual_seed(2)
    side_net = EmbeddingNet(side_arch, in_channels=1).eval()
    small = PreprocessConfig(input_size=4)
    side_path = tmp_path / "side.pt"
    torch.jit.save(torch.jit.trace(side_net, torch.randn(2, 1, 4, 4)), str(side_path))
    arch = ArchitectureConfig(embedding_dim=6)
    old_blob = resolve_blob(ModelConfig(name="o", uri=str(old), preprocess=PRE, architecture=arch))
    side_cfg = ModelConfig(
        name="s",
        uri=str(side_path),
        preprocess=small,
        architecture=ArchitectureConfig(embedding_dim=3),
    )
    side_blob = resolve_blob(side_cfg)
    images = np.empty(3, dtype=object)
    images[:] = [_png(0), b"not an image", _png(1)]
    batch = {
        "key": np.array(["a", "b", "c"], dtype=object),
        "image": images,
        "path": np.array(["p"] * 3, dtype=object),
    }
    out = DecodeEmbedStage(old_blob, 1, side_blob, 10**6, {"p": 0})(batch)
    assert list(out["error"] == "") == [True, False, True]
    direct = decode_batch(batch, small, 10**6)["pixels"][[0, 2]]
    with torch.inference_mode():
        ref = side_net(torch.from_numpy(direct).view(-1, 1, 4, 4)).numpy()
    np.testing.assert_allclose(out["side_info"][[0, 2]], ref, rtol=1e-5, atol=1e-6)
    assert out["side_info"].shape == (3, 3) and out["embedding"].shape == (3, 6)


def test_output_size_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(_net(), _x()), str(path))
    blob = resolve_blob(
        ModelConfig(
            name="ts",
            uri=str(path),
            preprocess=PRE,
            architecture=ArchitectureConfig(embedding_dim=64),
        )
    )
    with pytest.raises(ModelLoadError, match=r"outputs shape \(2, 6\).*embedding_dim=64"):
        check_output_dim(build_model(blob), blob)


class _Evil:
    def __reduce__(self):
        return (Path.write_text, (Path("/tmp/carryover-pwned"), "pwned"))


def test_planted_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ModelLoadError, match="not a TorchScript archive"):
        resolve_blob(ModelConfig(name="evil", uri=str(path)))
    assert not Path("/tmp/carryover-pwned").exists()


def test_mlflow_uri_as_embedder(tmp_path: Path) -> None:
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "t", str(tmp_path / "art"))
    net = _net()
    cfg = ModelConfig(name="m", architecture=ARCH, preprocess=PRE)
    d = save_model_dir(net, embedder_meta(cfg), tmp_path / "m")
    with tracker.run("train") as run:
        v = tracker.register_model("g-embedder", d, run.run_id, aliases=["candidate"])
    blob = resolve_blob(ModelConfig(name="x", uri="models:/g-embedder@candidate"), tracking_uri=uri)
    assert blob.kind == "carryover" and v == 1
    with torch.inference_mode():
        torch.testing.assert_close(build_model(blob)(_x()), net(_x()))
    # a TorchScript model registered by someone else works too
    ts_dir = tmp_path / "ts"
    ts_dir.mkdir()
    torch.jit.save(torch.jit.trace(net, _x()), str(ts_dir / "model.pt"))
    (ts_dir / "model.json").write_text("{}")  # not carryover's format: found by its TorchScript
    with tracker.run("ext") as run:
        tracker.register_model("ext-embedder", ts_dir, run.run_id, aliases=["serving"])
    blob = resolve_blob(
        ModelConfig(
            name="y",
            uri="models:/ext-embedder@serving",
            preprocess=PRE,
            architecture=ArchitectureConfig(embedding_dim=6),
        ),
        tracking_uri=uri,
    )
    assert blob.kind == "torchscript"
    with torch.inference_mode():
        torch.testing.assert_close(build_model(blob)(_x()), net(_x()))
    with pytest.raises(Exception, match="models:/nope@serving"):
        resolve_blob(ModelConfig(name="z", uri="models:/nope@serving"), tracking_uri=uri)


def test_side_info_of_a_brought_old_model_trains_on_every_class(tmp_path: Path) -> None:
    # The demo's old model trains on classes 0-4 and side-info on the same data; a model that
    # is brought (never trained here) says nothing of its data: no class filter applies.
    own = load_config(None, [f"workdir={tmp_path}"])
    assert _trainer(Context(own), own.side_info_model)[1] == [0, 1, 2, 3, 4]
    brought = load_config(None, [f"workdir={tmp_path}", "old_model.uri=models:/x/1"])
    assert _trainer(Context(brought), brought.side_info_model)[1] is None
