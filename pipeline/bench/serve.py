"""Benchmark section "serve": `carryover serve` (Ray Serve, model and index held in memory)
against the one-process CLI search that loads everything again per query, one run."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from pipeline.bench.common import Figure, stopwatch
from pipeline.bench.transform import make_gallery
from pipeline.config import UpgradeConfig, load_config
from pipeline.context import Context
from pipeline.gallery.store import Gallery
from pipeline.serve.run import start_service, stop_service
from pipeline.services.steps import index_version

SECTION = "serve"
_K = 10
_TARGET_LATENCY_RATIO = 0.05  # the service answers in under 1/20 of a CLI search's time
_TARGET_QPS_RATIO = 20.0
_CLIENTS = 8  # concurrent HTTP clients for the throughput figure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_gallery(root: Path, rows: int, dim: int) -> tuple[UpgradeConfig, np.ndarray]:
    """A promoted gallery of `rows` random unit vectors with its faiss index, and its keys."""
    g = make_gallery(root, rows, dim, side_dim=4, shards=max(1, rows // 50_000))
    sets = [f"workdir={root}", f"gallery={g.uri}", f"images={root / 'images'}"]
    cfg = load_config(None, [*sets, f"serve.port={_free_port()}", "serve.poll_seconds=5"])
    records = list(g.committed_shards("v1").values())
    index_version(Context(cfg, quiet=True), "v1", records, dim)
    Gallery(g.uri).promote("v1")
    keys = [f"img-{r['shard_id']:03d}-{i:07d}" for r in records for i in range(r["rows"])]
    return cfg, np.array(keys)


def cli_search_seconds(cfg: UpgradeConfig, keys: np.ndarray, runs: int) -> list[float]:
    """Wall seconds of `carryover search --key` processes, each loading the index again."""
    out = []
    for key in keys[:runs]:
        cmd = [sys.executable, "-m", "pipeline.cli", "search", cfg.gallery_uri, "--key", key]
        cmd += ["-k", str(_K), "--json", "--set", f"workdir={cfg.workdir}"]
        with stopwatch() as took:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        out.append(took())
    return out


def service_latencies(url: str, keys: np.ndarray, queries: int) -> list[float]:
    """Seconds per key query, one after another over one keep-alive connection."""
    rng = np.random.default_rng(0)
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        c.get("/search/key", params={"key": keys[0], "k": _K}).raise_for_status()  # warm
        for key in rng.choice(keys, queries):
            t0 = time.perf_counter()
            c.get("/search/key", params={"key": key, "k": _K}).raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def service_qps(url: str, keys: np.ndarray, queries: int) -> float:
    """Key queries/s with `_CLIENTS` clients at once."""
    per = max(1, queries // _CLIENTS)

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=60) as c:
            for key in rng.choice(keys, per):
                c.get("/search/key", params={"key": key, "k": _K}).raise_for_status()

    with stopwatch() as took, ThreadPoolExecutor(_CLIENTS) as pool:
        list(pool.map(client, range(_CLIENTS)))
    return per * _CLIENTS / took()


def run_serve(
    root: Path, rows: int = 100_000, dim: int = 128, queries: int = 2000, cli_runs: int = 3
) -> list[Figure]:
    """Key queries against `carryover serve` (1 replica) and the CLI search on one gallery."""
    cfg, keys = served_gallery(root / "serve", rows, dim)
    cli = cli_search_seconds(cfg, keys, cli_runs)
    with stopwatch() as up:
        svc = start_service(cfg)
    try:
        lat = np.array(service_latencies(svc.url, keys, queries))
        qps = service_qps(svc.url, keys, queries)
    finally:
        stop_service()
    cli_s = float(np.median(cli))
    extra = {
        "rows": rows,
        "dim": dim,
        "k": _K,
        "queries": queries,
        "clients": _CLIENTS,
        "replicas": cfg.serve.replicas,
        "cli_runs": cli_runs,
        "cli_seconds": [round(x, 2) for x in cli],
        "start_seconds": round(up(), 1),
        "index_kind": "flat",
    }
    return _figures(lat, qps, cli_s, extra)


def _figures(lat: np.ndarray, qps: float, cli_s: float, extra: dict) -> list[Figure]:
    size = f"{extra['rows']:,} rows x {extra['dim']}-D, top-{extra['k']} by key"
    cli_note = f"`carryover search --key` process (median of {extra['cli_runs']})"
    p50, p99 = (float(np.percentile(lat, q)) * 1000 for q in (50, 99))
    return [
        Figure(
            SECTION,
            "p50 latency",
            p50,
            "ms",
            baseline=cli_note,
            baseline_value=cli_s * 1000,
            target=_TARGET_LATENCY_RATIO,
            higher_is_better=False,
            note=f"HTTP GET /search/key one after another ({len(lat):,} queries); {size}",
            extra=extra,
        ),
        Figure(
            SECTION,
            "p99 latency",
            p99,
            "ms",
            higher_is_better=False,
            note=f"as p50; the service started in {extra['start_seconds']}s; {size}",
            extra=extra,
        ),
        Figure(
            SECTION,
            "queries/s",
            qps,
            "queries/s",
            baseline=cli_note,
            baseline_value=1.0 / cli_s,
            target=_TARGET_QPS_RATIO,
            note=f"{extra['clients']} concurrent HTTP clients, {extra['replicas']} replica; {size}",
            extra=extra,
        ),
    ]
