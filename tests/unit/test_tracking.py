"""Tracking against a real SQLite MLflow store (and, marked slow, a real `mlflow server`)."""

from __future__ import annotations

import json
import pickle
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.tracking import Tracker, TrackingError, download_model, to_params, ui_hint
from pipeline.tracking.mlflow_store import parse_model_uri

MODEL = "demo-embedder"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    # One store per module: creating the SQLite schema costs ~2 s.
    root = tmp_path_factory.mktemp("mlflow-local")
    return Tracker(f"sqlite:///{root / 'db' / 'mlflow.db'}", "unit", str(root / "mlartifacts"))


def _model_dir(path: Path, seed: int) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"fc.weight": torch.randn(4, 3, generator=g)}, str(path / "weights.safetensors"))
    (path / "model.json").write_text(json.dumps({"format": "carryover-model/1", "seed": seed}))
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_nested_runs_read_back(store: Tracker) -> None:
    with store.run("upgrade", tags={"gallery": "demo"}) as parent:
        parent.log_params({"train": {"lr": 0.002, "epochs": 3}, "classes": [0, 1]})
        with store.run("embed-shard", tags={"shard": "00007"}, parent_run_id=parent.run_id) as c:
            c.log_metrics({"rows": 128.0, "seconds": 0.5}, step=1)
            c.set_tags({"method": "transform"})
    runs = {r["run_id"]: r for r in store.search_runs("tags.gallery = 'demo'")}
    assert list(runs) == [parent.run_id]
    p = runs[parent.run_id]
    assert p["params"] == {"train.lr": "0.002", "train.epochs": "3", "classes": "[0, 1]"}
    assert (p["name"], p["status"], p["parent"]) == ("upgrade", "FINISHED", None)
    child = store.get_run(c.run_id)
    assert child["parent"] == parent.run_id
    assert child["metrics"] == {"rows": 128.0, "seconds": 0.5}
    assert child["tags"]["shard"] == "00007" and child["tags"]["method"] == "transform"
    found = store.search_runs(f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert [r["run_id"] for r in found] == [c.run_id]


def test_run_nests_under_the_open_run(store: Tracker) -> None:
    # The graph engine opens a stage's run; a step started inside it nests there unasked.
    with store.run("stage") as stage:
        with store.run("step") as step, store.run("inner") as inner:
            pass
        with store.run("elsewhere", parent_run_id=inner.run_id) as explicit:
            pass
    with store.run("after") as after:
        pass
    parents = {
        h.run_id: store.get_run(h.run_id)["parent"] for h in (stage, step, inner, explicit, after)
    }
    assert parents == {
        stage.run_id: None,
        step.run_id: stage.run_id,
        inner.run_id: step.run_id,
        explicit.run_id: inner.run_id,
        after.run_id: None,
    }


def test_child_runs_from_threads_keep_their_parent(store: Tracker) -> None:
    # Shards run concurrently: each child must land under the right parent with its own metrics.
    def shard(i: int, parent: str) -> str:
        with store.run(f"shard-{i}", tags={"shard": str(i)}, parent_run_id=parent) as r:
            r.log_metrics({"rows": float(10 * i)})
        return r.run_id

    with store.run("threaded") as parent, ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda i: shard(i, parent.run_id), range(8)))
    children = store.search_runs(f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted(r["run_id"] for r in children) == sorted(ids)
    assert {r["tags"]["shard"]: r["metrics"]["rows"] for r in children} == {
        str(i): 10.0 * i for i in range(8)
    }
    assert {r["status"] for r in children} == {"FINISHED"}


def test_failing_run_ends_failed(store: Tracker) -> None:
    with pytest.raises(ValueError, match="boom"), store.run("doomed") as r:
        raise ValueError("boom")
    run = store.get_run(r.run_id)
    assert run["status"] == "FAILED"
    assert run["tags"]["carryover.error"] == "ValueError: boom"


def test_secret_params_are_masked(store: Tracker) -> None:
    params = {
        "storage": {"access_key_id": "AKIA123", "secret_access_key": "s3cr3t", "region": "x"},
        "db_password": "hunter2",
        "api_token": "tok",
        "endpoint": "https://user:pw@example.com/path",
    }
    with store.run("secrets") as r:
        r.log_params(params)
    logged = store.get_run(r.run_id)["params"]
    assert logged == {
        "storage.access_key_id": "***",
        "storage.secret_access_key": "***",
        "storage.region": "x",
        "db_password": "***",
        "api_token": "***",
        "endpoint": "https://***:***@example.com/path",
    }


def test_long_param_values_are_truncated() -> None:
    out = to_params({"k": "x" * 10_000})
    assert len(out["k"]) == 6000 and out["k"].endswith("...")


def _register_round_trip(tracker: Tracker, tmp_path: Path) -> None:
    v1_dir, v2_dir = _model_dir(tmp_path / "v1", 1), _model_dir(tmp_path / "v2", 2)
    with tracker.run("train-v1") as r1:
        v1 = tracker.register_model(MODEL, v1_dir, r1.run_id, {"kind": "embedder"}, ["serving"])
    with tracker.run("train-v2") as r2:
        v2 = tracker.register_model(MODEL, v2_dir, r2.run_id, {"kind": "embedder"}, ["candidate"])
    assert v2 == v1 + 1
    serving = tracker.get_alias(MODEL, "serving")
    assert serving is not None
    assert (serving.version, serving.run_id, serving.tags) == (v1, r1.run_id, {"kind": "embedder"})

    tracker.set_alias(MODEL, "serving", v2)  # promote
    tracker.delete_alias(MODEL, "candidate")
    assert tracker.get_alias(MODEL, "serving").version == v2  # type: ignore[union-attr]
    assert tracker.get_alias(MODEL, "candidate") is None
    latest = tracker.latest_versions(MODEL, limit=2)
    assert [(m.version, m.aliases) for m in latest] == [(v2, ["serving"]), (v1, [])]

    got = Path(tracker.download_model(f"models:/{MODEL}@serving", tmp_path / "dl-serving"))
    assert _files(got) == _files(v2_dir)
    got = Path(tracker.download_model(f"models:/{MODEL}/{v1}", tmp_path / "dl-v1"))
    assert _files(got) == _files(v1_dir)
    with pytest.raises(TrackingError, match=f"models:/{MODEL}@nope"):
        tracker.download_model(f"models:/{MODEL}@nope", tmp_path / "dl-missing")


def test_register_and_download_sqlite(store: Tracker, tmp_path: Path) -> None:
    _register_round_trip(store, tmp_path)
    # The module-level helper (used by pipeline.models.store) reads the same registry.
    got = Path(download_model(store.tracking_uri, f"models:/{MODEL}@serving", tmp_path / "dl2"))
    assert _files(got) == _files(tmp_path / "v2")


def test_missing_model_and_bad_uri(store: Tracker, tmp_path: Path) -> None:
    assert store.get_alias("no-such-model", "serving") is None
    assert store.latest_versions("no-such-model") == []
    with pytest.raises(TrackingError, match="models:/no-such-model/3"):
        store.download_model("models:/no-such-model/3", tmp_path)
    with pytest.raises(TrackingError, match="expected models:/NAME@ALIAS"):
        store.download_model("runs:/abc/model", tmp_path)
    with pytest.raises(TrackingError, match="has no model.json"):
        store.register_model("x", tmp_path, "run-id", {})


def test_parse_model_uri() -> None:
    assert parse_model_uri("models:/a-b@serving") == ("a-b", "serving", None)
    assert parse_model_uri("models:/a.b/12") == ("a.b", None, 12)


def test_unreachable_server_fails_fast() -> None:
    with socket.socket() as s:  # a port nothing listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"http://127.0.0.1:{port}"):
        Tracker(f"http://127.0.0.1:{port}", "unit")
    assert time.monotonic() - start < 10


def test_tracker_pickles_to_same_experiment(store: Tracker) -> None:
    # Ray ships trackers and run handles to workers by pickling.
    again = pickle.loads(pickle.dumps(store))
    assert again.experiment_id == store.experiment_id
    with store.run("outer") as r:
        handle = pickle.loads(pickle.dumps(r))
        handle.log_metrics({"from_worker": 2.0})
    assert store.get_run(r.run_id)["metrics"] == {"from_worker": 2.0}


def test_ui_hint() -> None:
    assert ui_hint("http://mlflow:5000") == "MLflow UI: open http://mlflow:5000"
    hint = ui_hint("sqlite:////x/mlflow.db")
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in hint


@pytest.mark.slow
def test_register_and_download_server(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(mlflow_server, "unit-server", str(tmp_path / "ignored-local-artifacts"))
    _register_round_trip(tracker, tmp_path)
    source = tracker.get_alias(MODEL, "serving").source  # type: ignore[union-attr]
    assert source.startswith("mlflow-artifacts:/")  # proxied by the server, not a local path
    assert not (tmp_path / "ignored-local-artifacts").exists()
