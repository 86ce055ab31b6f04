"""Transform path: carryover's shard execution (`ShardExecutor`, method transform, on a Ray
Data actor pool) over a generated gallery with side-info, beside its two floors measured in
the same run: pyarrow reading and rewriting the same shards, and the compute roofline
(the transformation's FLOPs per row × the matmul GFLOP/s measured here)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from safetensors.torch import save

from pipeline.bench.common import Figure, best_of
from pipeline.bench.memory import PeakMemory, wait_settled
from pipeline.config import ArchitectureConfig, EmbedConfig, ModelConfig
from pipeline.embed.transform import TransformChain, chain_spec
from pipeline.gallery.store import Gallery, embedding_schema, embeddings_to_arrow, shard_file
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.compat import Transformation
from pipeline.models.store import WEIGHTS_FILE, ModelBlob, embedder_meta, save_model_dir
from pipeline.runtime import ensure_ray
from pipeline.upgrade.execute import ShardExecutor
from pipeline.upgrade.facts import shard_sources
from pipeline.upgrade.pool import run_shards
from pipeline.upgrade.work import ShardWork


def make_gallery(
    root: Path, rows: int, dim: int, side_dim: int, shards: int, seed: int = 0
) -> Gallery:
    """Gallery version v1 of `rows` random unit embeddings + side-info, written shard by shard
    (one shard in memory at a time) with commit records and a manifest, as ingest leaves it."""
    g = Gallery(str(root / "gallery"))
    rng = np.random.default_rng(seed)
    schema = embedding_schema(dim, side_dim)
    per = -(-rows // shards)
    for sid in range(shards):
        n = min(per, rows - sid * per)
        if n <= 0:
            break
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        side = rng.standard_normal((n, side_dim), dtype=np.float32)
        keys = [f"img-{sid:03d}-{i:07d}" for i in range(n)]
        t = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "embedding": embeddings_to_arrow(emb),
                "source": pa.array(["embed:v1"] * n, pa.string()),
                "side_info": embeddings_to_arrow(side),
            },
            schema=schema,
        )
        uri = g.shard_uri("v1", sid)
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, uri)
        g.commit_shard("v1", {"shard_id": sid, "path": shard_file(sid), "rows": n, "rejected": 0})
    g.finalize("v1", {"model": "v1", "embedding_dim": dim, "side_info_dim": side_dim})
    return g


def make_transformation(out: Path, dim: int, side_dim: int) -> Path:
    """An FCT-sized transformation with FastFill's uncertainty head (random weights: speed does
    not depend on them), saved like a trained one (model.json + safetensors)."""
    arch = {
        "old_dim": dim,
        "new_dim": dim,
        "side_dim": side_dim,
        "inner_dim": None,
        "uncertainty": True,
    }
    torch.manual_seed(0)
    model = Transformation(**arch).eval()
    meta = {"kind": "transformation", "name": "fct", "arch": arch, "config_hash": "bench"}
    return save_model_dir(model, meta, out)


def flops_per_row(model_dir: Path) -> int:
    """2·in·out per Linear layer of the transformation (BN and ReLU are noise beside them)."""
    chain = TransformChain(chain_spec([model_dir]))
    return sum(
        2 * m.in_features * m.out_features
        for model in chain.models
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )


def matmul_gflops(n: int = 4096, threads: int | None = None) -> float:
    """float32 GEMM GFLOP/s with `threads` torch threads (default: torch's current)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        secs = best_of(lambda: torch.mm(a, b), 3)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / secs / 1e9


def h_alone(model_dir: Path, dim: int, side_dim: int, batch: int = 8192) -> float:
    """rows/s of the executor's TransformChain on one batch, one torch thread, best of 3."""
    chain = TransformChain(chain_spec([model_dir]))
    rng = np.random.default_rng(0)
    old = rng.standard_normal((batch, dim), dtype=np.float32)
    side = rng.standard_normal((batch, side_dim), dtype=np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chain(old, side)  # warm-up
        return batch / best_of(lambda: chain(old, side), 3)
    finally:
        torch.set_num_threads(before)


def read_write_floor(g: Gallery, version: str, out: Path) -> float:
    """rows/s of pyarrow streaming every shard's columns in and writing them out again."""
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = 0, time.perf_counter()
    for rec in g.manifest(version)["shards"]:
        src = pq.ParquetFile(g.path("versions", version, rec["path"]))
        with pq.ParquetWriter(out / rec["path"], src.schema_arrow) as w:
            for b in src.iter_batches(batch_size=8192):
                w.write_batch(b)
                rows += b.num_rows
    secs = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return rows / secs


def carryover_transform(
    g: Gallery, model_dir: Path, target: str, parallel: int, actor_cpus: float, threads: int
) -> tuple[float, list[dict[str, Any]]]:
    """rows/s of transform-executing every shard of v1 into `target` with ShardExecutor."""
    spec = chain_spec([model_dir], ["fct"])
    work = [
        ShardWork(
            shard_id=s.shard_id,
            method="transform",
            reembed_rows=0,
            source_version=s.source_version,
            space=s.space,
            chain="side",
            source_uri=s.source_uri,
            image_file=s.image_file,
        )
        for s in shard_sources(g, "v1", {"side": spec})
    ]
    kwargs = {
        "gallery_uri": g.uri,
        "storage": None,
        "target": target,
        "target_model": "v2",
        "chains": {"side": spec},
        "new_blob": _tiny_embedder(spec.new_dim or 128),
        "embed_cfg": EmbedConfig(torch_threads=threads),
        "side_dim": spec.metas[0]["arch"]["side_dim"],
        "retries": 0,
    }
    t0 = time.perf_counter()
    recs = list(run_shards(ShardExecutor, kwargs, work, actor_cpus, parallel))
    secs = time.perf_counter() - t0
    return sum(r["rows"] for r in recs) / secs, recs


def _tiny_embedder(dim: int) -> Any:
    """The executor needs a new-model blob even when it only transforms (never called here)."""
    cfg = ModelConfig(name="v2", architecture=ArchitectureConfig(widths=[4], embedding_dim=dim))
    net = EmbeddingNet(cfg.architecture, in_channels=1)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    return ModelBlob(
        "carryover",
        "v2",
        cfg.preprocess,
        dim,
        {WEIGHTS_FILE: save(state)},
        embedder_meta(cfg),
    )


def _fresh_ray_run(g, mdir, parallel, actor_cpus, threads) -> tuple[float, list, PeakMemory]:

    ray.shutdown()
    ensure_ray()
    wait_settled(2.0)
    with PeakMemory() as mem:
        rps, recs = carryover_transform(g, mdir, "v2", parallel, actor_cpus, threads)
    ray.shutdown()
    wait_settled(2.0)
    return rps, recs, mem


@dataclass(frozen=True)
class _TransformRun:
    """What run_transform measured: sizes, floors, the executor's records and memory peaks."""

    rows: int
    dim: int
    side_dim: int
    shards: int
    parallel: int
    threads: int
    flops: int
    gflops: float
    gflops_1: float
    floor_io: float
    roof: float
    alone: float
    rps: float
    recs: list[dict[str, Any]]
    small_rows: int
    mem_small: PeakMemory
    mem_big: PeakMemory

    @property
    def bound(self) -> str:
        return "compute" if self.roof < self.floor_io else "read+write"


def run_transform(
    workdir: Path,
    rows: int = 1_000_000,
    dim: int = 128,
    side_dim: int = 32,
    shards: int = 10,
    parallel: int = 2,
    actor_cpus: float = 1.0,
    threads: int = 1,
) -> list[Figure]:
    """The transform path and its floors, all measured now on this machine."""
    root = Path(workdir) / "transform"
    shutil.rmtree(root, ignore_errors=True)
    g = make_gallery(root, rows, dim, side_dim, shards)
    mdir = make_transformation(root / "fct", dim, side_dim)
    floor_io = read_write_floor(g, "v1", root / "rw")
    gflops = matmul_gflops(threads=parallel * threads)
    flops = flops_per_row(mdir)
    roof = gflops * 1e9 / flops
    # h by itself, one process, one thread, the executor's batch: how close the layers' GEMMs
    # get to one thread's peak, apart from Ray, I/O and a second process sharing the chip.
    alone, gflops_1 = h_alone(mdir, dim, side_dim), matmul_gflops(threads=1)
    # Memory: the same transform at a tenth of the size, then the full one, each on a fresh
    # local Ray (the same set of processes); a streaming path keeps the two peaks close.
    small_rows = max(rows // 10, 1000)
    g_small = make_gallery(root / "small", small_rows, dim, side_dim, shards)
    mem_small = _fresh_ray_run(g_small, mdir, parallel, actor_cpus, threads)[2]
    rps, recs, mem_big = _fresh_ray_run(g, mdir, parallel, actor_cpus, threads)
    assert sum(r["rows"] for r in recs) == rows, "the transform lost rows"
    run = _TransformRun(
        rows=rows,
        dim=dim,
        side_dim=side_dim,
        shards=shards,
        parallel=parallel,
        threads=threads,
        flops=flops,
        gflops=gflops,
        gflops_1=gflops_1,
        floor_io=floor_io,
        roof=roof,
        alone=alone,
        rps=rps,
        recs=recs,
        small_rows=small_rows,
        mem_small=mem_small,
        mem_big=mem_big,
    )
    return _transform_figures(run)


def _profile(run: _TransformRun) -> tuple[dict[str, Any], str]:
    """The figure's extra fields and note: the profile behind it, from the executor's own
    per-shard timings (seconds inside h against read, merge, write, checksum, commit)."""
    r = run
    total_threads = r.parallel * r.threads
    in_h = sum(rec["timings"].get("transform", 0.0) for rec in r.recs)
    shard_s = sum(rec["seconds"] for rec in r.recs)
    h_rows = r.rows / in_h if in_h else 0.0  # one actor's rate while inside h
    per_thread_roof = r.roof / total_threads
    extra = {
        "rows": r.rows,
        "dim": r.dim,
        "side_dim": r.side_dim,
        "shards": r.shards,
        "flops_per_row": r.flops,
        "matmul_gflops": round(r.gflops, 1),
        "read_write_rows_per_second": round(r.floor_io),
        "roofline_rows_per_second": round(r.roof),
        "parallel_shards": r.parallel,
        "torch_threads_per_actor": r.threads,
        "h_alone_rows_per_second": round(r.alone),
        "matmul_gflops_1_thread": round(r.gflops_1, 1),
        "executor_seconds": round(shard_s, 2),
        "seconds_in_h": round(in_h, 2),
        "share_in_h": round(in_h / shard_s, 3) if shard_s else None,
        "h_rows_per_second_per_actor": round(h_rows),
        "roofline_per_thread": round(per_thread_roof),
    }
    note = (
        f"{r.rows:,}×{r.dim} + {r.side_dim}-d side-info in {r.shards} shards; h = FCT-sized "
        f"with FastFill head, {r.flops / 1e6:.1f} MFLOP/row; matmul {r.gflops:.0f} GFLOP/s on "
        f"{total_threads} threads; floor = {r.bound}. Profile: the actors spent "
        f"{in_h / max(shard_s, 1e-9):.0%} of their shard time inside h, at {h_rows:,.0f} rows/s "
        f"per actor ({h_rows / max(per_thread_roof, 1e-9):.2f}× one thread's share of the "
        "roofline); the rest is read, merge, write, checksum and commit. h alone (one process, "
        f"one thread, 8192-row batches) runs at {r.alone:,.0f} rows/s = "
        f"{r.alone * r.flops / (r.gflops_1 * 1e9):.2f}× the 1-thread matmul peak "
        f"({r.gflops_1:.0f} GFLOP/s): its GEMMs are efficient; two single-thread actors side by "
        f"side each get less than half of one {total_threads}-thread GEMM (shared cache, memory "
        "bandwidth and clock), and the roofline is a best-of-3 peak, not a sustained rate"
    )
    return extra, note


def _transform_figures(run: _TransformRun) -> list[Figure]:
    extra, note = _profile(run)
    mem_big = run.mem_big
    return [
        Figure(
            "transform",
            "transform rows/s",
            run.rps,
            "rows/s",
            f"floor ({run.bound})",
            min(run.floor_io, run.roof),
            0.7,
            note=note,
            tried="BatchNorm folded into the preceding Linear at load; batches of 8192 rows; "
            "one actor per core with one torch thread each (no oversubscription); shards "
            "streamed batch by batch (read → h → write), never a whole shard in memory",
            extra=extra,
        ),
        Figure(
            "transform",
            "read+write floor",
            run.floor_io,
            "rows/s",
            note="pyarrow: read every shard and write it back, 8192-row batches",
        ),
        Figure(
            "transform",
            "compute roofline",
            run.roof,
            "rows/s",
            note=f"{run.gflops:.0f} GFLOP/s ÷ {run.flops / 1e6:.1f} MFLOP/row",
        ),
        Figure(
            "memory",
            f"peak memory, transform upgrade of {run.rows:,} rows",
            mem_big.peak / 2**20,
            "MiB",
            f"{run.small_rows:,} rows",
            run.mem_small.peak / 2**20,
            1.2,
            higher_is_better=False,
            tried="every stage streams record batches shard by shard; the driver holds commit "
            "records only; actors are reused across shards",
            note="summed PSS of the driver and every process it started (local Ray: raylet, "
            f"workers, actors), sampled every 0.25 s; idle before: {mem_big.start / 2**20:.0f} MiB",
            extra={"idle_mib": mem_big.start / 2**20, "samples": mem_big.samples},
        ),
    ]


def summary(figs: list[Figure]) -> str:
    return json.dumps([f.to_dict() for f in figs], indent=2, default=str)
