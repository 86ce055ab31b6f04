"""Silently wrong embeddings are never served: wrong output shapes, degenerate rows and
collapsed models are refused before a version exists (issue 15, item 1)."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from rich.progress import Progress
from torch import nn

from pipeline.config import ArchitectureConfig, EmbedConfig, ModelConfig, PreprocessConfig
from pipeline.embed.probe import probe_model
from pipeline.embed.quality import NON_FINITE, OVERFLOW, ZERO_NORM, OutputStats, row_problems
from pipeline.embed.runner import PassRejected, _reusable, _ShardSink
from pipeline.embed.stages import EmbedStage, decode_stage
from pipeline.gallery.store import Gallery, embedding_schema, embeddings_to_arrow
from pipeline.io import uri as uri_io
from pipeline.models.store import ModelBlob, ModelLoadError, resolve_blob
from pipeline.upgrade.validate import ValidationReport, check_keys_and_values

PRE = PreprocessConfig(input_size=8, channels=1, mean=[0.5], std=[0.5])
DIM = 4
ROOT = Path(__file__).resolve().parents[2]


class Linear(nn.Module):
    """A healthy embedder: one distinct row per distinct image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class PooledOverBatch(Linear):
    """The bug from the issue: `mean(0, keepdim=True)` at the end, one row per batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)).mean(0, keepdim=True)


class OneExtraRow(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return torch.cat([y, y[:1]])


class Constant(Linear):
    """Right shape, same vector for every image (a collapsed model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 4)


class AllNan(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 4), float("nan"))


class Huge(Linear):
    """Finite values whose float32 norm overflows: normalised, they become zero vectors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)).sign() * 1e38 + 1e37


@functools.cache
def _scripted(cls: type[nn.Module]) -> bytes:
    """TorchScript bytes of a module class (TorchScript compiles each class only once)."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(cls().eval()), buf)
    return buf.getvalue()


def _torchscript(tmp_path: Path, cls: type[nn.Module], name: str) -> Path:
    path = tmp_path / f"{name}.pt"
    path.write_bytes(_scripted(cls))
    return path


def _blob(tmp_path: Path, cls: type[nn.Module], name: str) -> ModelBlob:
    path = _torchscript(tmp_path, cls, name)
    cfg = ModelConfig(
        name=name, uri=str(path), preprocess=PRE, architecture=ArchitectureConfig(embedding_dim=DIM)
    )
    return resolve_blob(cfg)


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _image_shard(path: Path, n: int, start: int = 0) -> str:
    keys = [f"k{i:04d}" for i in range(start, start + n)]
    table = pa.table(
        {
            "key": keys,
            "image": pa.array([_png(i) for i in range(start, start + n)], pa.binary()),
            "label": pa.array([i % 3 for i in range(start, start + n)], pa.int64()),
            "split": ["train"] * n,
        }
    )
    uri_io.write_table(table, str(path))
    return str(path)


# ------------------------------------------------------------------ every call is (n, d)


@pytest.mark.parametrize(
    ("module", "shape"), [(PooledOverBatch, "(1, 4)"), (OneExtraRow, "(3, 4)")]
)
def test_a_model_that_does_not_return_one_row_per_input_is_refused_by_name(
    tmp_path: Path, module: type[nn.Module], shape: str
) -> None:
    blob = _blob(tmp_path, module, "broken")
    with pytest.raises(ModelLoadError) as e:
        EmbedStage(blob)
    assert str(e.value).startswith(f"model 'broken' returned {shape} for a batch of 2 inputs")


def test_embed_stage_never_broadcasts_a_short_output(tmp_path: Path) -> None:
    """Even past the constructor's check (a model whose output depends on the batch size),
    a call returning fewer rows than inputs fails instead of being broadcast."""

    class ShortOnBigBatches(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x.flatten(1))
            return y[:4] if x.shape[0] > 4 else y

    stage = EmbedStage(_blob(tmp_path, ShortOnBigBatches, "short"))
    batch = {
        "key": np.array([f"k{i}" for i in range(6)], dtype=object),
        "image": np.array([_png(i) for i in range(6)], dtype=object),
        "path": np.array(["s.parquet"] * 6, dtype=object),
    }
    with pytest.raises(ModelLoadError, match=r"model 'short' returned \(4, 4\) for a batch of 6"):
        stage(decode_stage(batch, PRE, 10_000, {"s.parquet": 0}))


# ------------------------------------------------------------------ degenerate rows


def test_row_problems_name_non_finite_zero_and_overflowing_rows() -> None:
    emb = np.array(
        [[1, 0, 0, 0], [0, 0, 0, 0], [np.nan, 0, 0, 0], [1e38, 1e38, 0, 0], [3e-3, 0, 0, 0]],
        np.float32,
    )
    assert row_problems(emb).tolist() == ["", ZERO_NORM, NON_FINITE, OVERFLOW, ""]


def test_output_stats_count_collapsed_rows() -> None:
    stats = OutputStats()
    stats.add(np.ones((10, DIM), np.float32))
    stats.add(np.full((4, DIM), 2.0, np.float32))
    assert (stats.rows, stats.distinct) == (14, 2)
    (msg,) = stats.problems(0.5)
    assert msg.startswith("only 2 distinct embeddings in 14 rows")
    assert stats.problems(0.1) == []


# ------------------------------------------------------------------ the probe


@pytest.mark.parametrize(
    ("module", "why"),
    [
        (Constant, "1 distinct embeddings for 40 distinct images"),
        (AllNan, f"40 outputs unusable ({NON_FINITE})"),
        (Huge, f"40 outputs unusable ({OVERFLOW})"),
        (PooledOverBatch, None),  # refused when the stage is built: see above
    ],
)
def test_probe_refuses_a_degenerate_model_on_real_images(
    tmp_path: Path, module: type[nn.Module], why: str | None
) -> None:
    files = [_image_shard(tmp_path / "shard-00000.parquet", 40)]
    path = _torchscript(tmp_path, module, "bad")
    cfg = ModelConfig(
        name="bad",
        uri=str(path),
        preprocess=PRE,
        architecture=ArchitectureConfig(embedding_dim=DIM),
    )
    with pytest.raises(ModelLoadError) as e:
        probe_model(resolve_blob(cfg), files, None, EmbedConfig())
    assert str(e.value).startswith("model 'bad'")
    if why:
        assert why in str(e.value)


def test_probe_passes_a_healthy_model_and_reads_only_a_sample(tmp_path: Path) -> None:
    files = [
        _image_shard(tmp_path / "shard-00000.parquet", 30),
        _image_shard(tmp_path / "shard-00001.parquet", 30, start=30),
    ]
    res = probe_model(_blob(tmp_path, Linear, "ok"), files, None, EmbedConfig(probe_rows=50))
    assert (res.rows, res.rejected, res.distinct_inputs, res.distinct_outputs) == (50, 0, 50, 50)


# ------------------------------------------------------------------ the pass and resume


def _sink(g: Gallery, shard: int, rows: int, earlier: tuple[int, int]) -> _ShardSink:
    """A shard sink for one shard of `rows` rows, limit 0.5, judged after 64 rows; `earlier`
    is (rows in, rejected) of shards committed before this pass."""
    progress = Progress(disable=True)
    task = progress.add_task("embed", total=rows)
    meta = {shard: {"image_file": f"images/shard-{shard:05d}.parquet"}}
    return _ShardSink(
        g, "v1", DIM, {shard: rows}, meta, "embed:m", progress, task, 0, 0.5, earlier, 64
    )


def test_a_shard_over_the_rejected_limit_is_never_committed(tmp_path: Path) -> None:
    g = Gallery(str(tmp_path / "gallery"))
    sink = _sink(g, shard=0, rows=4, earlier=(0, 0))
    batch = {
        "key": np.array(["a", "b", "c", "d"], dtype=object),
        "embedding": np.ones((4, DIM), np.float32),
        "error": np.array(["", NON_FINITE, NON_FINITE, NON_FINITE], dtype=object),
        "shard": np.zeros(4, np.int64),
    }
    with pytest.raises(PassRejected) as e:
        sink.add(batch)
    assert str(e.value) == (
        "3 of 4 rows read so far were rejected, over embed.max_rejected_fraction=0.5 "
        f"(most: {NON_FINITE}); stopped before shard 0 (images/shard-00000.parquet) was kept"
    )
    assert g.committed_shards("v1") == {}
    assert not uri_io.exists(g.shard_uri("v1", 0))


def test_a_rerun_redoes_shards_another_model_committed(tmp_path: Path) -> None:
    fixed = _blob(tmp_path, Linear, "m")
    records = {0: {"model_digest": "sha256:broken"}, 1: {"model_digest": fixed.digest}, 2: {}}
    assert sorted(_reusable(records, fixed)) == [1, 2]  # 2: written before digests existed


# ------------------------------------------------------------------ validation before promote


def _version(g: Gallery, name: str, keys: list[str], emb: np.ndarray) -> None:
    t = pa.Table.from_arrays(
        [pa.array(keys, pa.string()), embeddings_to_arrow(emb), pa.array(["x"] * len(keys))],
        schema=embedding_schema(emb.shape[1]),
    )
    uri_io.write_table(t, g.shard_uri(name, 0))
    g.commit_shard(name, {"shard_id": 0, "path": "shard-00000.parquet", "rows": len(keys)})
    g.finalize(name, {"embedding_dim": emb.shape[1]})


def test_validate_refuses_collapsed_and_zero_rows(tmp_path: Path) -> None:
    g = Gallery(str(tmp_path / "gallery"))
    keys = [f"k{i}" for i in range(8)]
    _version(g, "v1", keys, np.random.default_rng(0).normal(size=(8, DIM)).astype(np.float32))
    collapsed = np.ones((8, DIM), np.float32)
    collapsed[0] = 0.0
    _version(g, "v2", keys, collapsed)
    report = ValidationReport("v2", "v1")
    check_keys_and_values(g, "v1", "v2", DIM, report, 0.5)
    checks = {c["check"]: (c["ok"], c["detail"]) for c in report.checks}
    assert checks["finite"] == (False, "1 rows of zero norm")
    assert checks["distinct"][0] is False
    assert checks["distinct"][1].startswith("only 2 distinct embeddings in 8 rows")
    assert checks["keys"][0] and not report.ok


# ------------------------------------------------------------------ through the CLI


@pytest.mark.parametrize("module", [PooledOverBatch, Constant, AllNan])
def test_ingest_with_a_broken_model_exits_2_and_serves_nothing(
    tmp_path: Path, module: type[nn.Module]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for s in range(2):
        _image_shard(images / f"shard-{s:05d}.parquet", 20, start=20 * s)
    path = _torchscript(tmp_path, module, "broken")
    cfg = {
        "workdir": str(tmp_path / "work"),
        "images": str(images),
        "gallery_name": "g",
        "old_model": {
            "name": "v1",
            "uri": str(path),
            "preprocess": PRE.model_dump(),
            "architecture": {"embedding_dim": DIM},
        },
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # it must not need Ray
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest", "-q", "-c", str(tmp_path / "cfg.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'v1'"), res.stderr
    g = Gallery(str(tmp_path / "work" / "gallery"))
    assert g.current() is None and g.versions() == []
    assert g.committed_shards("v1") == {}


def test_a_few_bad_rows_in_a_small_shard_are_judged_with_the_whole_pass(tmp_path: Path) -> None:
    """3 of 5 rows of a small shard rejected is fine while the pass as a whole (earlier
    committed shards included) stays under the limit."""
    g = Gallery(str(tmp_path / "gallery"))
    sink = _sink(g, shard=2, rows=5, earlier=(200, 0))
    batch = {
        "key": np.array(["a", "b", "c", "d", "e"], dtype=object),
        "embedding": np.ones((5, DIM), np.float32) * np.arange(1, 6, dtype=np.float32)[:, None],
        "error": np.array(["", "empty image bytes", "empty image bytes", NON_FINITE, ""], object),
        "shard": np.full(5, 2, np.int64),
    }
    sink.add(batch)
    (rec,) = sink.records
    assert (rec["rows"], rec["rejected"], rec["rows_in"]) == (2, 3, 5)
