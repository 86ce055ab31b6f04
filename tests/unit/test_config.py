"""Config: defaults, YAML + overrides, errors that name the key."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, dump_config, load_config


def test_defaults_and_partial_section_keep_section_defaults() -> None:
    cfg = load_config(None, ["old_model.train.epochs=3"])
    assert cfg.old_model.train.epochs == 3
    assert cfg.old_model.name == "v1"
    assert cfg.old_model.train.classes == [0, 1, 2, 3, 4]
    assert cfg.new_model.name == "v2"
    assert cfg.gallery_uri.endswith(".carryover/gallery")


def test_yaml_file_and_override_values_parse_as_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("gallery: s3://b/g\nnew_model:\n  architecture:\n    widths: [4, 8]\n")
    cfg = load_config(p, ["new_model.train.lr=0.01", "new_model.train.classes=[1,2]"])
    assert cfg.gallery_uri == "s3://b/g"
    assert cfg.new_model.architecture.widths == [4, 8]
    assert cfg.new_model.train.lr == 0.01
    assert cfg.new_model.train.classes == [1, 2]


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"new_model\.train\.epochz: unknown key"):
        load_config(None, ["new_model.train.epochz=3"])


def test_bad_value_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"new_model\.train\.epochs: .*'abc'"):
        load_config(None, ["new_model.train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"embed\.batch_size"):
        load_config(None, ["embed.batch_size=0"])


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("gallery: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML in .*bad.yaml"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_override_syntax_error() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["new_model.train.epochs"])


def test_secrets_masked_in_dump() -> None:
    cfg = load_config(None, ["storage.secret_access_key=hunter2"])
    assert cfg.storage.secret_access_key.get_secret_value() == "hunter2"
    assert "hunter2" not in str(dump_config(cfg))


def test_example_configs_validate() -> None:
    for p in Path("jobs/configs").glob("*.yaml"):
        load_config(p)


@pytest.mark.parametrize(
    "sets,message",
    [
        (["new_model.name=v1"], "old_model.name and new_model.name are both 'v1'"),
        (
            ["plan.when_backfill_cheaper=backfill", "plan.measure_rows=0"],
            "plan.when_backfill_cheaper=backfill needs the estimate",
        ),
        (
            ["evaluate.recall_k=20", "evaluate.max_queries=10"],
            "evaluate.recall_k=20 must be below evaluate.max_queries=10",
        ),
    ],
)
def test_impossible_combinations_are_refused_when_the_config_loads(sets, message) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert f"  combination: {message}" in str(e.value)


def test_side_info_may_have_a_preprocess_of_its_own() -> None:
    cfg = load_config(None, ["side_info.preprocess.input_size=8"])
    assert cfg.side_info_model.preprocess.input_size == 8
    assert cfg.old_model.preprocess.input_size != 8
