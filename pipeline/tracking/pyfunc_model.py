"""carryover's MLflow pyfunc model, logged as "models from code": MLflow runs this file when
a registered model is loaded, and the weights come from the model's safetensors artifacts.

    model = mlflow.pyfunc.load_model("models:/<gallery>-embedder@serving")
    model.predict(pd.DataFrame({"image": [png_bytes, ...]}))         # (n, dim) float32
    h = mlflow.pyfunc.load_model("models:/<gallery>-transformation/1")
    h.predict({"embedding": old, "side_info": side})                    # (n, new_dim)

Nothing here is pickled: the file is code, the model dir is model.json + safetensors.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipeline.embed.predict import Predictor
from pipeline.tracking.mlmodel import ARTIFACT_KEY


def _array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, dict):
        x = x[name]
    elif isinstance(x, pd.DataFrame):
        x = np.stack(x[name].to_numpy()) if name in x else x.to_numpy()
    return np.asarray(x, dtype=np.float32)


class CarryoverModel(PythonModel):
    """One registered carryover model (embedder, side-info, transformation, query adapter)."""

    def load_context(self, context):  # noqa: ANN001 (MLflow reads predict's type hints)
        self.predictor = Predictor(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        p = self.predictor
        if p.io.kind == "transformation":
            side = _array(model_input, "side_info") if p.io.side_dim else None
            return p.transform(_array(model_input, "embedding"), side)
        if p.io.kind == "query-adapter":
            return p.adapt(_array(model_input, "embedding"))
        if isinstance(model_input, pd.DataFrame):
            return p.embed(model_input["image"].tolist())
        return p.embed(model_input)


mlflow.models.set_model(CarryoverModel())
