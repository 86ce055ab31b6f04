"""A small upgraded gallery shared by the e2e tests that only need one to exist.

Built once per test run (the first xdist worker to ask builds it under a file lock; the others
wait and share it): digits on local files, MLflow on a SQLite file, v1 (old model) upgraded to
v2 (new model) by the real flow (~1.5 min on 2 cores). Tests read it as it is; a test
that changes it (promote, rollback, publish, a new version) works on `copy_of(...)`.
"""

from __future__ import annotations

import fcntl
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
def small_gallery(
    tmp_path_factory: pytest.TempPathFactory, worker_id: str, ray_local
) -> Iterator[SmallGallery]:
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # one folder for all workers
    root = shared / "small-gallery"
    with open(shared / "small-gallery.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the builder holds it; the others wait here
        if not (root / "READY").exists():
            shutil.rmtree(root, ignore_errors=True)
            _build(SmallGallery(root, small_sets(root)))
            (root / "READY").touch()
    yield SmallGallery(root, small_sets(root))


def _build(g: SmallGallery) -> None:
    cfg = g.cfg
    prepare("digits", cfg.images_uri, 2, cfg.storage, cfg.data, limit=400)
    run_upgrade(cfg, quiet=True)
