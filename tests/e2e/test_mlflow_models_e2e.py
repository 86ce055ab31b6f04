"""The upgraded small gallery's models load with mlflow.pyfunc and give the stored rows; the
upgrade's runs show their datasets and models through MLflow's own API."""

from __future__ import annotations

from collections.abc import Iterator

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipeline.context import Context
from pipeline.data.shards import image_shard_files

pytestmark = pytest.mark.slow


@pytest.fixture()
def ctx(small_gallery) -> Iterator[Context]:
    cfg = small_gallery.cfg
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    yield Context(cfg)
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _embedded_rows(ctx: Context, version: str) -> dict[str, np.ndarray]:
    """Rows of `version` its own model embedded (not transformed), by key."""
    out = {}
    for s in ctx.gallery.manifest(version)["shards"]:
        t = pq.read_table(ctx.gallery.shard_uri(version, int(s["shard_id"]))).to_pydict()
        for k, e, src in zip(t["key"], t["embedding"], t["source"], strict=True):
            if src.startswith(("embed:", "backfill:")):
                out[k] = np.asarray(e, np.float32)
    return out


def test_pyfunc_serving_embedder_matches_stored_rows(ctx: Context) -> None:
    g = ctx.gallery
    serving = g.current()
    rows = _embedded_rows(ctx, serving)
    sources = {s["method"] for s in g.manifest(serving)["shards"]}
    assert rows, f"no embedded rows in {serving} (shard methods {sources})"
    files = image_shard_files(ctx.cfg.images_uri)
    images = pd.concat(
        pq.read_table(f, columns=["key", "image"]).to_pandas() for f in files.values()
    )
    images = images[images["key"].isin(rows)].head(40)
    model = mlflow.pyfunc.load_model(f"models:/{ctx.registry_name()}@serving")
    got = model.predict(pd.DataFrame({"image": images["image"].tolist()}))
    want = np.stack([rows[k] for k in images["key"]])
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    sig = mlflow.models.get_model_info(f"models:/{ctx.registry_name()}@serving").signature
    assert sig.inputs.input_names() == ["image"] and sig.outputs.inputs[0].shape == (
        -1,
        got.shape[1],
    )


def test_upgrade_runs_show_datasets_and_models(ctx: Context) -> None:
    g, name, client = ctx.gallery, ctx.cfg.gallery_name, MlflowClient(ctx.cfg.tracking_uri)
    serving = g.current()
    m = g.manifest(serving)
    info = ctx.tracker.get_alias(ctx.registry_name(), "serving")
    assert info is not None and info.model_id
    upgrade = client.get_run(m["run_id"])
    by_name = {d.dataset.name: d for d in upgrade.inputs.dataset_inputs}
    src, built = f"{name}@{m['source_version']}", f"{name}@{serving}"
    assert {src, built} <= set(by_name), sorted(by_name)
    assert {t.key: t.value for t in by_name[built].tags}["mlflow.data.context"] == "built"
    assert str(g.version_uri(serving)) in by_name[built].dataset.source
    assert f'"num_rows": {m["rows"]}' in by_name[built].dataset.profile
    used = {mi.model_id for mi in upgrade.inputs.model_inputs}
    assert info.model_id in used
    (execute,) = ctx.tracker.search_runs(
        f"tags.`mlflow.parentRunId` = '{upgrade.info.run_id}' and attributes.run_name = 'execute'"
    )
    ex = client.get_run(execute["run_id"])
    assert src in {d.dataset.name for d in ex.inputs.dataset_inputs}
    assert info.model_id in {mi.model_id for mi in ex.inputs.model_inputs}
    trained = client.get_run(info.run_id)  # the training run made the model: its output
    assert info.model_id in {mo.model_id for mo in trained.outputs.model_outputs}
    assert "images" in {d.dataset.name for d in trained.inputs.dataset_inputs}
