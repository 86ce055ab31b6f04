"""Registered models are MLflow pyfunc models (from code, safetensors, no pickle) with a
signature; runs' input datasets are described from recorded digests, never loaded."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from pipeline.config import ArchitectureConfig, ModelConfig, PreprocessConfig
from pipeline.data.decode import decode_images
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.compat import ProcrustesAdapter, Transformation
from pipeline.models.store import embedder_meta, save_model_dir
from pipeline.tracking import Tracker
from pipeline.tracking.mlmodel import DatasetRef

ARCH = ArchitectureConfig(widths=[4, 8], embedding_dim=6, num_classes=3)
PRE = PreprocessConfig(input_size=8)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    root = tmp_path_factory.mktemp("mlflow-models")  # one store: its schema costs ~2 s
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)  # mlflow.pyfunc.load_model resolves models:/ through it
    mlflow.set_registry_uri(uri)
    yield Tracker(uri, "t", str(root / "art"))
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _png(seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _mlmodel_dir(tracker: Tracker, name: str, version: int) -> Path:
    uri = MlflowClient(tracker.tracking_uri).get_model_version_download_uri(name, str(version))
    return Path(mlflow.artifacts.download_artifacts(uri))


def test_embedder_round_trip_without_pickle(tracker: Tracker, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = EmbeddingNet(ARCH, in_channels=1).eval()
    d = save_model_dir(
        net, embedder_meta(ModelConfig(name="m", architecture=ARCH, preprocess=PRE)), tmp_path / "m"
    )
    with tracker.run("train") as run:
        v = tracker.register_model("g-embedder", d, run.run_id, aliases=["serving"])
    info = tracker.model_version("g-embedder", v)
    assert info is not None and info.model_id
    images = [_png(i) for i in range(5)]
    got = mlflow.pyfunc.load_model("models:/g-embedder@serving").predict(
        pd.DataFrame({"image": images})
    )
    x = torch.from_numpy(decode_images(images, PRE, 10**6).pixels.reshape(-1, 1, 8, 8))
    with torch.inference_mode():
        want = net(x).numpy()
    assert got.shape == (5, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    loaded = mlflow.pyfunc.load_model("models:/g-embedder@serving").unwrap_python_model()
    np.testing.assert_allclose(loaded.predictor.embed(x.numpy()), want, atol=1e-6)
    root = _mlmodel_dir(tracker, "g-embedder", v)
    files = {p.name for p in root.rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_model.py", "weights.safetensors", "model.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    sig = mlflow.models.get_model_info("models:/g-embedder@serving").signature
    assert sig.inputs.input_names() == ["image"] and sig.outputs.inputs[0].shape == (-1, 6)
    run_out = MlflowClient(tracker.tracking_uri).get_run(run.run_id).outputs.model_outputs
    assert [m.model_id for m in run_out] == [info.model_id]


def test_transformation_and_adapter_predict(tracker: Tracker, tmp_path: Path) -> None:
    torch.manual_seed(0)
    h = Transformation(old_dim=4, new_dim=6, side_dim=3, inner_dim=8).eval()
    meta = {"kind": "transformation", "arch": h.config(), "name": "fct"}
    ad = ProcrustesAdapter(6, 4).eval()
    with tracker.run("train") as run:
        vh = tracker.register_model(
            "g-transformation", save_model_dir(h, meta, tmp_path / "h"), run.run_id
        )
        a_meta = {"kind": "query-adapter", "adapter": ad.config()}
        va = tracker.register_model(
            "g-query-adapter", save_model_dir(ad, a_meta, tmp_path / "a"), run.run_id
        )
    rng = np.random.default_rng(0)
    old, side = (
        rng.normal(size=(7, 4)).astype(np.float32),
        rng.normal(size=(7, 3)).astype(np.float32),
    )
    got = mlflow.pyfunc.load_model(f"models:/g-transformation/{vh}").predict(
        {"embedding": old, "side_info": side}
    )
    with torch.inference_mode():
        want = h(torch.from_numpy(old), torch.from_numpy(side))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    new = rng.normal(size=(5, 6)).astype(np.float32)
    got = mlflow.pyfunc.load_model(f"models:/g-query-adapter/{va}").predict({"embedding": new})
    with torch.inference_mode():
        np.testing.assert_allclose(got, ad(torch.from_numpy(new)).numpy(), atol=1e-5)
    sig = mlflow.models.get_model_info(f"models:/g-transformation/{vh}").signature
    assert [s.shape for s in sig.inputs.inputs] == [(-1, 4), (-1, 3)]


def test_run_inputs_are_datasets_and_models(tracker: Tracker, tmp_path: Path) -> None:
    ref = DatasetRef(
        "small@v1", str(tmp_path / "gallery" / "versions" / "v1"), "abc123", "source", rows=40
    )
    with tracker.run("execute") as run:
        run.log_inputs([ref], ["m-does-not-matter"][:0])
    inputs = MlflowClient(tracker.tracking_uri).get_run(run.run_id).inputs.dataset_inputs
    (ds,) = inputs
    assert (ds.dataset.name, ds.dataset.digest, ds.dataset.source_type) == (
        "small@v1",
        "abc123",
        "local",
    )
    assert str(tmp_path / "gallery") in ds.dataset.source and '"num_rows": 40' in ds.dataset.profile
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "source"
