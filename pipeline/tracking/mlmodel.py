"""Registered models as MLflow 3 LoggedModels: a pyfunc ("models from code") with a signature,
the carryover model dir (model.json + safetensors) as its artifacts; runs' input datasets."""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from pipeline.models.describe import ModelIO, describe_dir
from pipeline.tracking.params import to_tags

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
ARTIFACT_KEY = "model"  # the carryover model dir among the pyfunc's artifacts
# What loading needs besides MLflow itself; carryover provides the `pipeline` package.
_REQUIREMENTS = ("torch", "safetensors", "numpy", "pandas", "carryover")
CONTEXT_TAG = "mlflow.data.context"  # MLflow's own key: the UI shows it beside the dataset


@dataclass(frozen=True)
class DatasetRef:
    """A run's input as MLflow shows it: a name, where it lives and a digest of its contents
    (from recorded checksums or file listings: the data itself is never read)."""

    name: str
    source_uri: str
    digest: str
    context: str  # "images" | "source" | "built" | "training": what the run did with it
    rows: int | None = None
    profile: dict[str, object] = field(default_factory=dict)


def _requirements() -> list[str]:
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def signature(io: ModelIO) -> ModelSignature:
    """Embedders take encoded images (`image`: bytes); transformations take `embedding` (+
    `side_info`), adapters `embedding`; every model returns float32 rows of its output dim."""
    f32 = np.dtype(np.float32)
    if io.image_shape is not None:
        inputs = Schema([ColSpec(DataType.binary, "image")])
    else:
        specs = [TensorSpec(f32, (-1, int(io.input_dim or 0)), "embedding")]
        if io.side_dim:
            specs.append(TensorSpec(f32, (-1, io.side_dim), "side_info"))
        inputs = Schema(specs)
    return ModelSignature(inputs, Schema([TensorSpec(f32, (-1, io.output_dim), "embedding")]))


def log_logged_model(
    client: MlflowClient,
    run_id: str,
    name: str,
    model_dir: str | Path,
    tags: dict[str, str],
) -> tuple[str, str]:
    """Log `model_dir` as a LoggedModel output of run `run_id`; returns (model id, its
    artifact location: the concrete URI a model version's source names). A dir
    whose model.json does not describe its inputs (a foreign model) gets no signature."""
    io = describe_dir(model_dir)
    exp = client.get_run(run_id).info.experiment_id
    lm = client._create_logged_model(
        exp,
        name=name,
        source_run_id=run_id,
        tags=to_tags(tags),
        model_type=f"carryover-{io.kind if io else 'model'}",
        flavor="python_function",
    )
    mm = Model(artifact_path=lm.artifact_location, run_id=run_id, model_id=lm.model_id)
    with tempfile.TemporaryDirectory(prefix="carryover-mlmodel-") as tmp, warnings.catch_warnings():
        # "no input example": the signature says it all (an example would load the model)
        warnings.simplefilter("ignore", UserWarning)
        path = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(PYFUNC_CODE),
            artifacts={ARTIFACT_KEY: str(model_dir)},
            signature=signature(io) if io else None,
            pip_requirements=_requirements(),
            mlflow_model=mm,
        )
        client.log_model_artifacts(lm.model_id, str(path))
    client.finalize_logged_model(lm.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=0)])
    return lm.model_id, lm.artifact_location


def dataset_input(ref: DatasetRef) -> DatasetInput:
    """A DatasetRef as MLflow's dataset input entity (a meta dataset: no data loaded)."""
    profile = {"num_rows": ref.rows, **ref.profile} if ref.rows is not None else ref.profile
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both local
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(ref.source_uri)
    ds = MetaDataset(source, name=ref.name, digest=ref.digest)
    entity = Dataset(
        name=ds.name,
        digest=ds.digest,
        source_type=ds.source._get_source_type(),
        source=ds.source.to_json(),
        profile=json.dumps(profile, sort_keys=True, default=str) if profile else None,
    )
    return DatasetInput(entity, tags=[InputTag(CONTEXT_TAG, ref.context)])
