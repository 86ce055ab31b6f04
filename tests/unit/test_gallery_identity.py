"""A gallery names itself: commands on GALLERY read its name and MLflow registry from its
manifests (a config that disagrees is refused), promote/rollback move CURRENT and the `serving`
alias together or not at all, and a command that needs a gallery creates nothing where there
is none. Tiny galleries written with the Gallery API, a real MLflow SQLite registry."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import Result
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.gallery.identity import GalleryIdentity
from pipeline.gallery.store import Gallery, embedding_schema, embeddings_to_arrow
from pipeline.io import uri as uri_io
from pipeline.tracking import Tracker

runner = CliRunner()
CLI_TIMEOUT_S = 120  # a cold interpreter importing torch and mlflow on a busy 2-core machine


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    # One SQLite registry per module (its schema costs ~2 s); each test its own model name.
    root = tmp_path_factory.mktemp("mlflow")
    return Tracker(f"sqlite:///{root / 'mlflow.db'}", "carryover", str(root / "mlartifacts"))


@dataclass
class Shop:
    """A gallery of two versions serving v2 (history: v1), each with its registry version."""

    root: Path
    gallery: Gallery
    name: str
    registered: dict[str, int]
    tracker: Tracker

    @property
    def model(self) -> str:
        return f"{self.name}-embedder"

    def serving(self) -> int | None:
        info = self.tracker.get_alias(self.model, "serving")
        return info.version if info else None

    def current_bytes(self) -> bytes:
        return (Path(self.gallery.uri) / "CURRENT").read_bytes()


def _shard(g: Gallery, version: str) -> None:
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    keys = pa.array([f"{version}-{i}" for i in range(3)])
    t = pa.table([keys, embeddings_to_arrow(emb), pa.array(["embed:x"] * 3)], embedding_schema(4))
    uri_io.write_table(t, g.shard_uri(version, 0))
    g.commit_shard(version, {"shard_id": 0, "path": "shard-00000.parquet", "rows": 3})


def _register(tracker: Tracker, model: str, version: str, d: Path) -> int:
    d.mkdir(parents=True)
    (d / "model.json").write_text(json.dumps({"format": "carryover-model/1", "name": version}))
    with tracker.run(f"train-{version}") as run:
        return tracker.register_model(model, d, run.run_id, {"carryover.model": version})


def _shop(tmp_path: Path, tracker: Tracker, name: str, legacy: bool = False) -> Shop:
    """Built as a finalize writes it; `legacy`: manifests from before the registry was recorded."""
    g = Gallery(str(tmp_path / "wd" / "galleries" / name))  # a workdir that is not .carryover
    shop = Shop(tmp_path, g, name, {}, tracker)
    for v in ("v1", "v2"):
        _shard(g, v)
        shop.registered[v] = _register(tracker, shop.model, v, tmp_path / "models" / v)
        meta = {"gallery": name, "model": v, "registry_version": shop.registered[v]}
        if not legacy:
            meta |= {"tracking_uri": tracker.tracking_uri, "registry_model": shop.model}
        g.finalize(v, meta)
    g.promote("v1")
    g.promote("v2")
    tracker.set_alias(shop.model, "serving", shop.registered["v2"])
    return shop


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def _out(res: Result) -> str:
    return " ".join(res.output.split())


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- item 2: the gallery's own name and registry ------------------------------------------
def test_rollback_without_config_moves_current_and_serving_together(
    tmp_path: Path, registry: Tracker
) -> None:
    shop = _shop(tmp_path, registry, "shop-rb")
    res = _cli(tmp_path, "rollback", shop.gallery.uri, "--yes")  # README's line: no -c
    assert res.returncode == 0, res.stderr
    assert "rolled back v2 → serving v1" in res.stdout
    assert shop.gallery.current() == "v1"
    assert shop.serving() == shop.registered["v1"]
    assert not (tmp_path / ".carryover").exists()  # the default workdir was never touched


def test_lineage_without_config_shows_the_embedder(
    tmp_path: Path, registry: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = _shop(tmp_path, registry, "shop-lin")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["lineage", shop.gallery.uri, "--json"])
    assert res.exit_code == 0, res.output
    lin = json.loads(res.stdout)
    got = {v["version"]: (v["embedder"]["name"], v["embedder"]["version"]) for v in lin["versions"]}
    assert got == {v: (shop.model, n) for v, n in shop.registered.items()}
    assert lin["tracking_uri"] == registry.tracking_uri
    assert not (tmp_path / ".carryover").exists()


def test_a_config_that_disagrees_is_refused_naming_both(
    tmp_path: Path, registry: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = _shop(tmp_path, registry, "shop-cfg")
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "other.yaml"
    cfg.write_text("gallery_name: other\n")
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    cases = [
        (["-c", str(cfg)], "gallery_name 'other'", "'shop-cfg'"),
        (["--set", f"tracking.uri={elsewhere}"], elsewhere, registry.tracking_uri),
    ]
    before = shop.current_bytes()
    for flags, ours, theirs in cases:
        for cmd in (["rollback", shop.gallery.uri, "--yes"], ["versions", shop.gallery.uri]):
            res = runner.invoke(app, [*cmd, *flags])
            assert res.exit_code == 2, (cmd, flags, res.output)
            assert ours in _out(res) and theirs in _out(res), _out(res)
            assert len(res.output.strip().splitlines()) == 1, res.output
    assert shop.current_bytes() == before
    assert shop.serving() == shop.registered["v2"]
    # The same values as the gallery's own are no disagreement.
    agree = ["--set", "gallery_name=shop-cfg", "--set", f"tracking.uri={registry.tracking_uri}"]
    res = runner.invoke(app, ["versions", shop.gallery.uri, *agree])
    assert res.exit_code == 0, res.output


def test_a_legacy_gallery_takes_its_name_from_the_manifest(
    tmp_path: Path, registry: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = _shop(tmp_path, registry, "shop-old", legacy=True)
    monkeypatch.chdir(tmp_path)
    # Without its tracking URI the config's default registry is a guess: said where it matters.
    res = runner.invoke(app, ["lineage", shop.gallery.uri])
    assert res.exit_code == 0, res.output
    assert f"{shop.model}/{shop.registered['v1']} (missing!)" in _out(res)
    assert "this gallery's manifests do not record theirs" in _out(res)
    res = runner.invoke(app, ["rollback", shop.gallery.uri, "--yes"])
    assert res.exit_code == 1, res.output
    assert "does not record its tracking URI" in _out(res) and "nothing moved" in _out(res)
    assert shop.gallery.current() == "v2"
    res = runner.invoke(
        app, ["rollback", shop.gallery.uri, "-y", "--set", f"tracking.uri={registry.tracking_uri}"]
    )
    assert res.exit_code == 0, res.output
    assert shop.gallery.current() == "v1"
    assert shop.serving() == shop.registered["v1"]


def test_finalize_records_the_registry_with_secrets_masked(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["gallery_name=shop", "tracking.uri=https://alice:hunter2hunter2@mlflow.example/x"]
    )
    fields = GalleryIdentity.of_config(cfg).manifest_fields()
    assert fields == {
        "gallery": "shop",
        "tracking_uri": "https://***:***@mlflow.example/x",
        "registry_model": "shop-embedder",
    }


# -- item 2: both move or neither -----------------------------------------------------------
def test_promote_checks_the_registry_before_moving_anything(
    tmp_path: Path, registry: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = _shop(tmp_path, registry, "shop-gone")
    monkeypatch.chdir(tmp_path)
    registry._client.delete_model_version(shop.model, str(shop.registered["v1"]))
    before = shop.current_bytes()
    flags = ["--set", f"gallery={shop.gallery.uri}"]
    for cmd in (["promote", "v1", *flags], ["rollback", shop.gallery.uri, "--yes"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 1, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
        want = f"{shop.model}/{shop.registered['v1']}, which is not in the registry"
        assert want in _out(res), _out(res)
        assert shop.current_bytes() == before
        assert shop.serving() == shop.registered["v2"]


def test_rollback_restores_current_when_the_alias_cannot_move(
    tmp_path: Path, registry: Tracker
) -> None:
    shop = _shop(tmp_path, registry, "shop-ro")
    before = shop.current_bytes()
    db = registry.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:  # a real write failure inside MLflow's own store
        for op in ("INSERT", "UPDATE"):
            con.execute(
                f"CREATE TRIGGER refuse_alias_{op.lower()} BEFORE {op} ON registered_model_aliases"
                " BEGIN SELECT RAISE(ABORT, 'alias writes refused'); END"
            )
    try:
        res = _cli(tmp_path, "rollback", shop.gallery.uri, "--yes")
    finally:
        with sqlite3.connect(db) as con:
            for op in ("insert", "update"):
                con.execute(f"DROP TRIGGER refuse_alias_{op}")
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert f"{shop.model}@serving" in lines[0] and "alias writes refused" in lines[0]
    assert "CURRENT stays at v2" in lines[0]
    assert shop.current_bytes() == before
    assert shop.serving() == shop.registered["v2"]


# -- item 5: commands that need a gallery create nothing ------------------------------------
NEEDS_A_GALLERY = {
    "promote": lambda p: ["promote", "v1", "--set", f"gallery={p}"],
    "rollback": lambda p: ["rollback", p],
    "versions": lambda p: ["versions", p],
    "lineage": lambda p: ["lineage", p],
    "lock show": lambda p: ["lock", "show", p],
    "search": lambda p: ["search", p, "--key", "k0"],
}


@pytest.mark.parametrize("command", sorted(NEEDS_A_GALLERY))
@pytest.mark.parametrize("where", ["empty dir", "missing"])
def test_no_gallery_is_an_error_that_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, where: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "not-a-gallery"
    if where == "empty dir":
        path.mkdir()
    before = _listing(tmp_path)
    res = runner.invoke(app, NEEDS_A_GALLERY[command](str(path)))
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [f"error: no gallery at {path}"]
    assert _listing(tmp_path) == before
