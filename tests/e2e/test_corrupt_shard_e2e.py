"""A corrupt data page in one image shard (footer intact) stops `carryover ingest` with one line
naming the file and row group, exit 2, nothing promoted; once the file is fixed a rerun resumes.
On the session's real local Ray, with a TorchScript embedder that needs no training."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.prepare import prepare
from pipeline.embed.runner import embed_images_to_version
from pipeline.gallery.store import Gallery
from pipeline.models.store import resolve_blob
from tests.unit.test_shard_checks import flip_mid_page, tiny_model

pytestmark = pytest.mark.slow

INGEST_TIMEOUT_S = 120  # one CLI run on the shared 2-CPU Ray (about 5 s when idle)


def _ingest(sets: list[str]) -> subprocess.CompletedProcess:
    """`carryover ingest` in a child that joins the session's Ray through RAY_ADDRESS."""
    flags = [x for s in sets for x in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest", "--quiet", *flags],
        capture_output=True,
        text=True,
        timeout=INGEST_TIMEOUT_S,
    )


def test_corrupt_data_page_is_named_and_a_fixed_rerun_resumes(tmp_path: Path, ray_local) -> None:
    sets = [
        f"workdir={tmp_path}",
        f"old_model.uri={tiny_model(tmp_path / 'm.pt')}",
        "old_model.preprocess.input_size=8",
        "old_model.architecture.embedding_dim=4",
        "embed.batch_size=64",
    ]
    cfg = load_config(None, sets)
    files = prepare("digits", cfg.images_uri, 3, None, cfg.data, limit=300).files
    g = Gallery(cfg.gallery_uri)
    # A run that committed shard 0 and then died: its record must survive what follows.
    blob = resolve_blob(cfg.old_model)
    embed_images_to_version({0: files[0]}, g, "v1", blob, cfg.embed, {}, "embed:v1", quiet=True)
    kept = g.committed_shards("v1")[0]

    bad = files[1]
    shutil.copyfile(bad, tmp_path / "good-copy.parquet")
    flip_mid_page(bad)
    p = _ingest(sets)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: {bad}: row group 0 (rows 0-99) cannot be read: ")
    assert lines[-1].endswith("; fix or replace the file and rerun")
    assert "Traceback" not in p.stderr and "RayTaskError" not in p.stderr
    assert g.current() is None and g.versions() == []
    assert g.committed_shards("v1")[0] == kept

    shutil.copyfile(tmp_path / "good-copy.parquet", bad)  # the file fixed
    p = _ingest(sets)
    assert p.returncode == 0, p.stdout + p.stderr
    assert g.current() == "v1" and g.manifest("v1")["rows"] + g.manifest("v1")["rejected"] == 300
    records = g.committed_shards("v1")
    assert sorted(records) == [0, 1, 2] and records[0] == kept  # shard 0 was not redone
