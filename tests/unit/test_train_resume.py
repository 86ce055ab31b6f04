"""Ray Train resumption: a rerun of a training run goes on from its persisted checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load

from pipeline.config import load_config
from pipeline.train.loop import fit
from tests.unit.test_train_tasks import _features, _transformation_config

pytestmark = pytest.mark.slow


def _weights(ckpt) -> dict[str, np.ndarray]:
    with ckpt.as_directory() as d:
        return load((Path(d) / "weights.safetensors").read_bytes())


def test_rerun_after_the_last_checkpoint_returns_it_without_training(
    tmp_path: Path, ray_local
) -> None:
    """The driver died after the final checkpoint was persisted but before the model was
    installed: the rerun must hand back that checkpoint and its metrics, not fail or retrain."""
    import ray.data

    feats = {k: v.numpy() for k, v in _features().items()}
    ds = ray.data.from_items(
        [{k: feats[k][i] for k in feats} for i in range(len(feats["label"]))]
    ).materialize()
    config = _transformation_config("fct", True)
    tc = load_config(None, ["transformation.train.epochs=2", "transformation.train.batch_size=16"])
    tc = tc.transformation.train
    config["transformation"]["train"] = tc.model_dump(mode="json")
    first, m1 = fit("pipeline.train.transformation:build_task", config, ds, tc, "h", tmp_path, True)
    again, m2 = fit("pipeline.train.transformation:build_task", config, ds, tc, "h", tmp_path, True)
    assert m1["resumed_from_epoch"] == 0 and m2["resumed_from_epoch"] == tc.epochs
    assert m2["loss"] == m1["loss"] and m2["epoch"] == m1["epoch"] == tc.epochs - 1
    w1, w2 = _weights(first), _weights(again)
    assert w1.keys() == w2.keys() and all(np.array_equal(w1[k], w2[k]) for k in w1)
