"""A brought model (uri set) is never trained here: its training keys are refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.ops.jobs import job_config

runner = CliRunner()


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("old_model", "classes=[0,1]"),
        ("old_model", "epochs=3"),
        ("new_model", "lr=0.1"),
        ("side_info", "batch_size=8"),
    ],
)
def test_training_key_for_a_brought_model_is_refused(section: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{section}.uri=/m/e.onnx", f"{section}.train.{key}"])
    name = key.split("=")[0]
    assert str(e.value) == (
        f"defaults + overrides: {section}.train.{name} is set, but {section}.uri brings the "
        f"model (/m/e.onnx), which is not trained here: remove {section}.train"
    )


def test_yaml_section_counts_as_given(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("old_model:\n  uri: s3://b/old.pt\n  train:\n    epochs: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: old_model\.train\.epochs is set, but"):
        load_config(p)


def test_digits_defaults_do_not_apply_to_a_brought_model() -> None:
    trained = load_config(None, [])
    assert trained.old_model.train.classes == [0, 1, 2, 3, 4]  # the digits demo's old model
    assert trained.old_model.train.model_fields_set == set()  # a default, not given
    brought = load_config(None, ["old_model.uri=/m/old.pt"])
    assert brought.old_model.train.classes is None  # side-info trains on every class
    assert brought.old_model.train.epochs == 8 and brought.old_model.name == "v1"
    given = load_config(None, ["new_model.architecture.embedding_dim=12"])
    assert given.new_model.architecture.model_fields_set == {"embedding_dim"}
    assert given.new_model.architecture.widths == [16, 32, 64]  # the defaults still fill in


def test_cli_refuses_before_any_work(tmp_path: Path) -> None:
    sets = [f"workdir={tmp_path}", "old_model.uri=/m/old.onnx", "old_model.train.classes=[1]"]
    # Another test in this worker may have started Ray already: this command must not change it
    ray_before = ray.is_initialized()
    res = runner.invoke(app, ["ingest", "--quiet", *(x for s in sets for x in ("--set", s))])
    assert res.exit_code == 2, res.output
    assert " ".join(res.output.split()) == (
        "error: defaults + overrides: old_model.train.classes is set, but old_model.uri brings "
        "the model (/m/old.onnx), which is not trained here: remove old_model.train"
    )
    assert ray.is_initialized() is ray_before and list(tmp_path.iterdir()) == []


def test_a_job_config_with_brought_models_reloads(tmp_path: Path) -> None:
    """The scheduler brings both models into a config whose user trained them (demo keys):
    the job's config.yaml must load on the cluster as it does here."""
    cfg = load_config(
        None,
        [f"workdir={tmp_path}", "old_model.train.epochs=10", "new_model.architecture.widths=[4]"],
    )
    old = cfg.old_model.model_copy(update={"uri": "models:/g-embedder/1"})
    new = cfg.new_model.model_copy(update={"uri": "models:/g-embedder/2"})
    up = cfg.model_copy(update={"old_model": old, "new_model": new})
    data = yaml.safe_load(yaml.safe_dump(job_config(up)))
    assert "train" not in data["old_model"]
    assert data["new_model"]["architecture"] == {"widths": [4]}
    back = config_from_dict(data, "config.yaml")
    assert back.old_model.uri == "models:/g-embedder/1" and back.old_model.train.classes is None
    assert back.new_model.architecture.widths == [4]
    assert back.new_model.architecture.model_fields_set == {"widths"}
