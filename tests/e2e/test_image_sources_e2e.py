"""img2dataset's output ingested in place by `carryover ingest`: NNNNN.parquet shards with jpg
bytes, captions, status/error_message and _stats.json beside them; failed downloads become
rejected rows with img2dataset's own reason, nothing is copied, records name absolute files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.gallery.store import Gallery

pytestmark = pytest.mark.slow
DIM = 24
ROWS = 20  # per shard
FAILED = {0: {3, 7}, 2: {11}}  # shard -> rows img2dataset could not download
BROKEN = (1, 5)  # a row img2dataset called a success whose bytes are not an image


def _jpg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _img2dataset_output(root: Path) -> None:
    """Three shards as img2dataset writes them with output_format=parquet."""
    from sklearn.datasets import load_digits  # start-up: scikit-learn takes ~1 s

    digits = np.round(load_digits().images[: 3 * ROWS] * (255.0 / 16.0)).astype(np.uint8)
    root.mkdir()
    for s in range(3):
        ids = range(s * ROWS, (s + 1) * ROWS)
        failed = {s * ROWS + r for r in FAILED.get(s, ())}
        jpg = [None if i in failed else _jpg(digits[i]) for i in ids]
        if s == BROKEN[0]:
            jpg[BROKEN[1]] = b"<html>not an image</html>"
        table = pa.table(
            {
                "key": [f"{s:05d}{i % ROWS:04d}" for i in ids],
                "jpg": pa.array(jpg, pa.binary()),
                "caption": [f"digit {i}" for i in ids],
                "url": [f"https://example.com/{i}.jpg" for i in ids],
                "width": [8] * ROWS,
                "height": [8] * ROWS,
                "status": ["failed_to_download" if i in failed else "success" for i in ids],
                "error_message": [
                    "HTTP Error 404: Not Found" if i in failed else None for i in ids
                ],
            }
        )
        pq.write_table(table, root / f"{s:05d}.parquet")
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": ROWS}))


def _model(path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, DIM), torch.nn.Tanh())
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 16, 16)), str(path))


def test_ingest_img2dataset_in_place(tmp_path: Path, ray_local) -> None:
    images = tmp_path / "i2d"
    _img2dataset_output(images)
    before = {p.name: p.stat().st_mtime_ns for p in images.iterdir()}
    _model(tmp_path / "old.ts")
    sets = [
        f"workdir={tmp_path / 'wd'}",
        f"images={images}",
        f"tracking.uri=sqlite:///{tmp_path / 'wd' / 'mlflow.db'}",
        "gallery_name=i2d",
        "data.source.layout=img2dataset",
        f"old_model.uri={tmp_path / 'old.ts'}",
        f"old_model.architecture.embedding_dim={DIM}",
        "embed.batch_size=16",
    ]
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", "--quiet"]
    r = subprocess.run(
        [*cmd, *[a for s in sets for a in ("--set", s)]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    g = Gallery(str(tmp_path / "wd" / "gallery"))
    m = g.manifest("v1")
    n_failed = sum(len(v) for v in FAILED.values())
    assert (m["rows"], m["rejected"]) == (3 * ROWS - n_failed - 1, n_failed + 1)
    shards = sorted(m["shards"], key=lambda s: s["shard_id"])
    assert [s["image_file"] for s in shards] == [str(images / f"{i:05d}.parquet") for i in range(3)]
    assert all(s["checksum"] and s["rows"] + s["rejected"] == ROWS for s in shards)
    reasons = {}
    for s in range(3):
        f = Path(g.rejects_uri("v1", s))
        if f.exists():
            t = pq.read_table(f).to_pydict()
            reasons.update(zip(t["key"], t["reason"], strict=True))
    failed_keys = {f"{s:05d}{r:04d}" for s, rows in FAILED.items() for r in rows}
    assert {k for k, why in reasons.items() if why == "HTTP Error 404: Not Found"} == failed_keys
    broken = f"{BROKEN[0]:05d}{BROKEN[1]:04d}"
    assert reasons[broken].startswith("cannot decode image")
    assert {p.name: p.stat().st_mtime_ns for p in images.iterdir()} == before  # read in place

    # a mapped column the files lack: one line naming the file and the key, exit 2
    sets[0] = f"workdir={tmp_path / 'wd2'}"
    bad = [*cmd, *[a for s in [*sets, "data.source.columns.image=png"] for a in ("--set", s)]]
    r = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr + r.stdout
    assert "00000.parquet: no column 'png' for image" in r.stderr
    assert "Traceback" not in r.stderr
