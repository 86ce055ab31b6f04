"""An ONNX old model: `carryover ingest` embeds a digits gallery with onnxruntime in the Ray
workers (rows as the torch model's, its dim from the graph, its digest in every commit record),
`carryover search` finds a gallery image by itself, and a corrupt .onnx is one line, exit 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.decode import decode_images
from pipeline.data.prepare import prepare
from pipeline.gallery.store import Gallery
from pipeline.services.steps import version_embeddings
from tests.e2e.test_corrupt_shard_e2e import _ingest
from tests.unit.test_onnx import DIM, _net, export

pytestmark = pytest.mark.slow


def test_onnx_old_model_ingests_and_searches(tmp_path: Path, ray_local) -> None:
    model = export(tmp_path / "old.onnx")
    sets = [
        f"workdir={tmp_path}",
        f"old_model.uri={model}",
        "old_model.preprocess.input_size=8",
        "embed.batch_size=64",
    ]
    cfg = load_config(None, sets)
    files = prepare("digits", cfg.images_uri, 3, None, cfg.data, limit=300).files

    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model.read_bytes()[:200])
    p = _ingest([*sets, f"old_model.uri={cut}"])
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: {cut}: ONNX model 'v1': not a loadable ONNX model: ")
    assert "Traceback" not in p.stderr

    p = _ingest(sets)
    assert p.returncode == 0, p.stdout + p.stderr
    g = Gallery(cfg.gallery_uri)
    m = g.manifest("v1")
    assert g.current() == "v1" and (m["rows"], m["rejected"], m["embedding_dim"]) == (300, 0, DIM)
    digest = "sha256:" + hashlib.sha256(b"model.onnx\0" + model.read_bytes()).hexdigest()
    records = g.committed_shards("v1")
    assert sorted(records) == [0, 1, 2]
    assert {r["model_digest"] for r in records.values()} == {digest}

    # the rows the Ray workers stored are the torch model's (the ONNX graph exported from it)
    images = pq.read_table(files[1], columns=["key", "image"]).slice(0, 8)
    keys, emb = version_embeddings(g, "v1", images["key"].combine_chunks())
    pixels = decode_images(images["image"], cfg.old_model.preprocess, 10**6).pixels
    with torch.inference_mode():
        want = _net()(torch.from_numpy(pixels)).numpy()
    assert list(keys) == images["key"].to_pylist()
    assert float(np.abs(emb - want).max()) < 1e-5

    query = tmp_path / "query.png"
    query.write_bytes(images["image"][0].as_py())
    flags = [x for s in sets for x in ("--set", s)]
    res = CliRunner().invoke(app, ["search", "--image", str(query), "-k", "3", "--json", *flags])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)
    assert hits["version"] == "v1" and len(hits["keys"]) == 3
    assert keys[0] in hits["keys"] and hits["scores"][0] > 0.9999  # itself (or a duplicate)
