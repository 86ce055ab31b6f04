"""`carryover publish` to LanceDB (a local folder and the S3 endpoint): a search at the
`serving` tag returns faiss's top-10, and promote / rollback move the tag with CURRENT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lancedb
import numpy as np
import pytest

from pipeline.context import Context
from pipeline.gallery.index import GalleryIndex
from pipeline.gallery.store import Gallery, arrow_to_embeddings
from pipeline.publish.lancedb import lance_storage_options
from pipeline.publish.serving import publish_version, recorded_targets
from pipeline.services import steps
from tests.e2e.conftest import SmallGallery, copy_of

pytestmark = pytest.mark.slow


def _carryover(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300
    )


def _recall_vs_faiss(g: Gallery, location: str, opts: dict | None, published: dict) -> float:
    """recall@10 of LanceDB opened at `serving` (with the tuned search settings) against the
    version's own faiss index, over 100 of its rows as queries."""
    batch = next(g.iter_embeddings("v2", batch_size=100))
    queries = arrow_to_embeddings(batch.column("embedding"))
    _, truth = GalleryIndex.load(g.index_uri("v2"), g.storage).search(queries, 10)
    table = lancedb.connect(location, storage_options=opts).open_table("small")
    table.checkout("serving")
    hits = []
    for q, want in zip(queries, truth, strict=True):
        s = table.search(q).distance_type("cosine").limit(10).select(["key", "version"])
        if published["nprobes"]:
            s = s.nprobes(published["nprobes"]).refine_factor(published["refine_factor"])
        got = s.to_arrow()
        assert set(got["version"].to_pylist()) == {"v2"}
        hits.append(len(set(got["key"].to_pylist()) & set(want)) / 10)
    return float(np.mean(hits))


def test_publish_local_then_promote_and_rollback_move_the_tag(
    small_gallery: SmallGallery, tmp_path: Path
) -> None:
    sg = copy_of(small_gallery, tmp_path / "g")
    cfg, db = sg.cfg, tmp_path / "db"
    g = Gallery(cfg.gallery_uri, cfg.storage)
    r = _carryover("publish", "v2", "--to", f"lancedb://{db}", "--json", *sg.cli_sets())
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    p = out["published"]
    assert (p["rows"], p["index_type"], out["serving_moved"]) == (400, "IVF_FLAT", True)
    assert out["target"]["serving"] == "v2" and p["recall_at_10"] >= 0.95
    assert _recall_vs_faiss(g, str(db), None, p) >= 0.95
    # each row's lineage travels with it: v2's rows were embedded by v2 or mapped from v1
    table = lancedb.connect(str(db)).open_table("small")
    rows = table.to_arrow().select(["chain", "hops", "embedding"])
    assert {(r["chain"], r["hops"]) for r in rows.to_pylist()} == {("v2", 0), ("v1>v2", 1)}
    q = rows["embedding"][0].as_py()
    embedded = table.search(q).where("hops = 0").limit(5).select(["chain"]).to_arrow()
    assert embedded.num_rows == 5 and set(embedded["chain"].to_pylist()) == {"v2"}

    bad = _carryover("publish", "v2", "--to", "qdrant://host/x", *sg.cli_sets())
    assert bad.returncode == 2 and "--to 'qdrant://host/x'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    gone = _carryover("publish", "v9", "--to", f"lancedb://{db}", *sg.cli_sets())
    assert gone.returncode == 2 and "no complete version 'v9'" in gone.stderr

    # v1 was never published: rollback publishes it (auto_publish), then moves all three
    steps.rollback_step(Context(cfg, quiet=True))
    (target,) = recorded_targets(g, cfg)
    assert (g.current(), target.describe().serving) == ("v1", "v1")
    at_tag = lancedb.connect(str(db)).open_table("small")
    at_tag.checkout("serving")
    assert set(at_tag.to_arrow()["version"].to_pylist()) == {"v1"}
    steps.promote_step(Context(cfg, quiet=True), "v2")
    assert (g.current(), target.describe().serving) == ("v2", "v2")
    assert set(target.describe().versions) == {"v1", "v2"}


def test_publish_to_s3_serves_the_same_neighbours(
    small_gallery: SmallGallery, s3_server, tmp_path: Path
) -> None:
    cfg = copy_of(small_gallery, tmp_path / "g").cfg
    cfg.storage.endpoint_url = s3_server.endpoint_url
    g = Gallery(cfg.gallery_uri, cfg.storage)
    location = s3_server.uri("lancedb")
    r = publish_version(cfg, g, "v2", f"lancedb://{location}")
    assert (r.published.rows, r.info.serving, r.serving_moved) == (400, "v2", True)
    opts = lance_storage_options(cfg.storage)
    assert _recall_vs_faiss(g, location, opts, r.published.__dict__) >= 0.95
