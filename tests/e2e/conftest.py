"""A small upgraded gallery shared by the e2e tests that only need one to exist.

Built once per test worker (session scope): digits on local files, MLflow on a SQLite file,
v1 (old model) upgraded to v2 (new model) by the real flow. Tests read it as it is; a test
that changes it (promote, rollback, publish, a new version) works on `copy_of(...)`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import UpgradeConfig, load_config
from pipeline.data.prepare import prepare
from pipeline.flows import run_upgrade
from tests.e2e.test_upgrade_e2e import TINY


@dataclass(frozen=True)
class SmallGallery:
    root: Path  # workdir: images/, gallery/, mlflow.db, models
    sets: tuple[str, ...]  # the --set overrides that name it (for a CLI or load_config)

    @property
    def cfg(self) -> UpgradeConfig:
        return load_config(None, list(self.sets))

    def cli_sets(self) -> list[str]:
        return [a for s in self.sets for a in ("--set", s)]


def small_sets(root: Path, name: str = "small") -> tuple[str, ...]:
    return (
        *TINY,
        f"workdir={root}",
        f"gallery={root / 'gallery'}",
        f"images={root / 'images'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"gallery_name={name}",
    )


def copy_of(g: SmallGallery, dest: Path) -> SmallGallery:
    """A private copy (files and the SQLite tracking store) that a test may change."""
    shutil.copytree(g.root, dest)
    # Manifests record the tracking URI (the gallery's identity): point them at the copy's
    # own store, or every command on the copy refuses its config's tracking.uri.
    for f in (dest / "gallery").rglob("*.json"):
        f.write_text(f.read_text().replace(str(g.root), str(dest)))
    return SmallGallery(dest, small_sets(dest, name=g.cfg.gallery_name))


@pytest.fixture(scope="session")
def small_gallery(tmp_path_factory: pytest.TempPathFactory, ray_local) -> Iterator[SmallGallery]:
    root = tmp_path_factory.mktemp("small-gallery")
    g = SmallGallery(root, small_sets(root))
    cfg = g.cfg
    prepare("digits", cfg.images_uri, 2, cfg.storage, cfg.data, limit=400)
    run_upgrade(cfg, quiet=True)
    yield g
