"""Shared fixtures: a real moto S3 endpoint, a real mlflow server, a local Ray."""

from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

pytest_plugins = [
    "tests.fixtures.mlflow_server",
    "tests.fixtures.s3",
    "tests.fixtures.s3_faults",
    "tests.fixtures.ray_local",
    "tests.fixtures.ray_head",
]

# -- how `pytest -n 2` shares the tests out ----------------------------------------------------
# Each file runs whole on one worker (its module fixtures are built once), except that the
# files reading the session's small gallery run together on one worker, so no worker waits
# while the other builds it. The longest groups go first (by measured time on 2 cores), so the
# two workers finish together; xdist's own order starts with the files holding the most tests
# (the quick unit files) and leaves the long end-to-end ones for last. (xdist's `loadgroup`
# marks do nothing under pytest 9: it rewrites a node id attribute pytest no longer reads.)
SMALL_GALLERY = "small-gallery"
SMALL_GALLERY_FILES = {
    "test_serve_e2e",
    "test_publish_e2e",
    "test_mlflow_models_e2e",
    "test_generations_e2e",
    "test_compat_losses_e2e",
}
LONGEST_FIRST = (
    "test_plan_e2e",
    SMALL_GALLERY,  # the shared build, then five files on it: about 11 min
    "test_ops_e2e",
    "test_multinode_e2e",
    "test_benchmark_real_smoke",
    "test_pretrained_e2e",
    "test_upgrade_e2e",
    "test_compat_e2e",
    "test_benchmark_smoke",
)


def _group(path: str) -> str:
    """The scheduling group of a test file (a path or node id)."""
    stem = Path(path.split("::", 1)[0]).stem
    return SMALL_GALLERY if stem in SMALL_GALLERY_FILES else stem


class _FileGroups(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        return _group(nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> LoadScopeScheduling:
    config.option.loadscopereorder = False  # keep the order below
    return _FileGroups(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    for item in items:
        if "small_gallery" in getattr(item, "fixturenames", ()) and (
            item.path.stem not in SMALL_GALLERY_FILES
        ):
            raise pytest.UsageError(
                f"{item.path.name} uses small_gallery: list it in SMALL_GALLERY_FILES"
            )
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))  # stable
