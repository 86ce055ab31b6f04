"""`carryover import` of a gallery embedded elsewhere, in both layouts (Parquet; clip-retrieval's
.npy + metadata), through the CLI: a fault part-way, its resume, a rerun that does nothing,
then `versions`, `search` and `lineage` on the adopted gallery and the model in MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import DataConfig, ModelConfig, PreprocessConfig
from pipeline.data.decode import decode_images
from pipeline.data.prepare import prepare
from pipeline.models.store import resolve_blob
from pipeline.tracking import Registry

pytestmark = pytest.mark.slow
DIM = 24
GALLERY = "adopted"


def _carryover(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300
    )
    if ok:
        assert r.returncode == 0, r.stderr + r.stdout
    return r


def _embed_digits(tmp: Path) -> tuple[str, list[str], np.ndarray, str]:
    """Image shards of 240 digits, a TorchScript model, and its embeddings of every image (as
    the user's own job would have made them): (model file, keys, vectors, images URI)."""
    images = str(tmp / "images")
    prepare("digits", images, 2, None, DataConfig(), limit=240)
    table = pa.concat_tables(pq.read_table(f) for f in sorted(Path(images).glob("*.parquet")))
    pixels = decode_images(table["image"], PreprocessConfig(), 1 << 20).pixels
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, DIM), torch.nn.Tanh())
    model = torch.jit.trace(net, torch.zeros(1, 1, 16, 16))
    torch.jit.save(model, str(tmp / "old.ts"))
    with torch.inference_mode():
        emb = model(torch.from_numpy(pixels).reshape(-1, 1, 16, 16)).numpy()
    return str(tmp / "old.ts"), table["key"].to_pylist(), emb, images


def _parquet_layout(root: Path, keys: list[str], emb: np.ndarray, bad_row: bool) -> None:
    """Two Parquet files, list<float> vectors; row 3 is NaN (rejected); with `bad_row`, row 5
    of the second file is one value short (a file-level fault found while streaming)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [list(map(float, v)) for v in emb]
    rows[3][0] = float("nan")
    half = len(keys) // 2
    if bad_row:
        rows[half + 5] = rows[half + 5][:-1]
    for i, (a, b) in enumerate([(0, half), (half, len(keys))]):
        t = pa.table({"key": keys[a:b], "embedding": pa.array(rows[a:b], pa.list_(pa.float32()))})
        pq.write_table(t, root / f"part-{i}.parquet")


def _clip_layout(root: Path, keys: list[str], emb: np.ndarray) -> None:
    """clip-retrieval's output: img_emb/img_emb_N.npy (float16) beside metadata_N.parquet."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    for n, part in enumerate(np.array_split(np.arange(len(keys)), 3)):
        np.save(root / "img_emb" / f"img_emb_{n}.npy", emb[part].astype(np.float16))
        paths = [f"/photos/{keys[i]}.png" for i in part]
        pq.write_table(
            pa.table({"image_path": paths, "key": [keys[i] for i in part]}),
            root / "metadata" / f"metadata_{n}.parquet",
        )


def _image_of(images: str, key: str) -> bytes:
    table = pa.concat_tables(pq.read_table(f) for f in sorted(Path(images).glob("*.parquet")))
    return table["image"][table["key"].to_pylist().index(key)].as_py()


def _cosine_neighbours(keys: list[str], emb: np.ndarray, query: str, k: int) -> list[str]:
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = keys.index(query)
    scores = x @ x[q]
    scores[q] = -np.inf  # search leaves the query's own row out
    return [keys[i] for i in np.argsort(-scores, kind="stable")[:k]]


def test_import_both_layouts_then_versions_search_lineage(tmp_path: Path) -> None:
    model, keys, emb, images = _embed_digits(tmp_path)
    wd = tmp_path / "wd"
    dim = f"old_model.architecture.embedding_dim={DIM}"
    sets = [f"workdir={wd}", f"gallery_name={GALLERY}", dim, "adopt.max_shard_rows=50"]
    flags = [a for s in sets for a in ("--set", s)]
    src = tmp_path / "parquet"
    _parquet_layout(src, keys, emb, bad_row=True)
    cmd = ["import", str(src), "--model-uri", model, "--images", images, "--json", *flags]

    # a fault in the second file: exit 2, one line naming file and row, no version
    r = _carryover(*cmd, ok=False)
    assert r.returncode == 2, r.stderr
    assert "part-1.parquet: row 5: embedding has 23 values, expected 24" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (wd / "gallery" / "versions" / "v1" / "manifest.json").exists()
    done = sorted(p.name for p in (wd / "gallery" / "versions" / "v1" / "_shards").iterdir())
    assert done == ["shard-00000.json", "shard-00001.json", "shard-00002.json"]  # part-0

    # fixed: the resume writes the second file's shards only
    _parquet_layout(src, keys, emb, bad_row=False)
    out = json.loads(_carryover(*cmd).stdout)
    assert (out["rows"], out["rejected"], out["shards"], out["shards_written"]) == (239, 1, 6, 3)
    assert out["model_uri"] == f"models:/{GALLERY}-embedder/1" and out["layout"] == "parquet"
    assert out["images"]["shard_files"] == 2 and out["images"]["shards"] == images
    again = json.loads(_carryover(*cmd).stdout)
    assert (again["skipped"], again["shards_written"], again["rows"]) == (True, 0, 239)
    rejects = pq.read_table(wd / "gallery" / "versions" / "v1" / "rejects" / "shard-00000.parquet")
    assert rejects.to_pylist() == [
        {"key": keys[3], "reason": "non-finite value (NaN/inf) in the embedding"}
    ]

    # the .npy layout, same model by its registry URI, image paths from a column
    clip = tmp_path / "clip" / "embeddings"
    _clip_layout(clip, keys, emb)
    npy = ["import", str(clip.parent), "--version", "v1-clip", "--json", *flags,
           "--model-uri", f"models:/{GALLERY}-embedder/1", "--set", "adopt.key_column=key",
           "--set", "adopt.image_column=image_path"]  # fmt: skip
    out2 = json.loads(_carryover(*npy).stdout)
    assert (out2["layout"], out2["files"], out2["rows"], out2["rejected"]) == ("npy", 3, 240, 0)
    assert out2["images"]["column"] == "image_path"
    paths = pq.read_table(
        wd / "gallery" / "versions" / "v1-clip" / "images" / "shard-00000.parquet"
    )
    assert paths.slice(0, 1).to_pylist() == [{"key": keys[0], "image": f"/photos/{keys[0]}.png"}]

    _check_served(wd, flags, keys, emb, model, _image_of(images, keys[10]))


def _check_served(
    wd: Path, flags: list[str], keys: list[str], emb: np.ndarray, model: str, image: bytes
) -> None:
    """versions, search and lineage work on the adopted gallery; the model is in MLflow."""
    table = _carryover("versions", *flags).stdout
    assert "v1-clip *" in table and "import" in table
    state = json.loads((wd / "gallery" / "CURRENT").read_text())
    assert (state["version"], state["history"], state["registry_version"]) == ("v1-clip", ["v1"], 1)

    query = keys[10]
    hits = json.loads(_carryover("search", "--key", query, "-k", "5", "--json", *flags).stdout)
    f16 = emb.astype(np.float16).astype(np.float32)  # what the .npy files hold
    assert hits["version"] == "v1-clip"
    assert hits["keys"] == _cosine_neighbours(keys, f16, query, 5)
    kept = [k for i, k in enumerate(keys) if i != 3]
    v1 = json.loads(
        _carryover("search", "--key", query, "-k", "5", "--version", "v1", "--json", *flags).stdout
    )
    assert v1["keys"] == _cosine_neighbours(kept, np.delete(emb, 3, axis=0), query, 5)

    # by image: the model is taken from the registry (the config names no file for it)
    png = wd / "query.png"
    png.write_bytes(image)
    by_image = ["search", "--image", str(png), "-k", "1", "--version", "v1", "--json", *flags]
    hit = json.loads(_carryover(*by_image).stdout)
    assert hit["keys"] == [query] and hit["scores"][0] == pytest.approx(1.0, abs=1e-5)

    lin = json.loads(_carryover("lineage", "--json", *flags).stdout)
    by_version = {v["version"]: v for v in lin["versions"]}
    for v in ("v1", "v1-clip"):
        assert by_version[v]["method"] == "import"
        emb_info = by_version[v]["embedder"]
        assert (emb_info["name"], emb_info["version"], emb_info["missing"]) == (
            f"{GALLERY}-embedder",
            1,
            False,
        )
        assert emb_info["aliases"] == ["serving"]
    assert by_version["v1"]["shards"][3]["source_file"].endswith("part-1.parquet")

    reg = Registry(lin["tracking_uri"])
    (info,) = reg.latest_versions(f"{GALLERY}-embedder")
    assert (info.tags["carryover.model"], info.tags["carryover.imported"]) == ("v1", "true")
    blob = resolve_blob(ModelConfig(name="v1", uri=model))
    back = resolve_blob(ModelConfig(name="v1", uri=info.uri), tracking_uri=lin["tracking_uri"])
    assert (back.kind, back.digest) == ("torchscript", blob.digest)
