"""What a Ray cluster of several nodes needs: every location a worker reads or writes shared."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray

from pipeline.config import ConfigError, UpgradeConfig
from pipeline.io import uri as uri_io
from pipeline.runtime import ensure_ray


@dataclass(frozen=True)
class ClusterCheck:
    """The Ray the work runs on: its address (None: a local Ray of our own) and alive nodes."""

    address: str | None
    nodes: int


def train_storage_uri(cfg: UpgradeConfig) -> str:
    """Where Ray Train keeps checkpoints: `ray.storage_path`, else beside an s3:// gallery
    (every node reaches it), else the workdir (one machine)."""
    if cfg.ray.storage_path:
        return cfg.ray.storage_path
    if uri_io.is_s3(cfg.gallery_uri):
        return uri_io.join(cfg.gallery_uri, "_ray_results")
    return str(Path(cfg.workdir) / "ray_results")


def train_storage(cfg: UpgradeConfig) -> uri_io.Location:
    """Ray Train's storage as a filesystem and path, credentials resolved here: the trainer
    ships the filesystem to workers that may not share the driver's environment."""
    return uri_io.resolve(train_storage_uri(cfg), cfg.storage)


def worker_locations(cfg: UpgradeConfig) -> dict[str, str]:
    """Config key → location that Ray workers read or write themselves (not via the driver)."""
    return {
        "gallery": cfg.gallery_uri,
        "images": cfg.images_uri,
        "ray.storage_path": train_storage_uri(cfg),
    }


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_cluster(cfg: UpgradeConfig) -> ClusterCheck:
    """Connect to the configured cluster; on more than one node, refuse local paths that
    workers on other nodes would read or write (each node would see a different disk)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address and not ray.is_initialized():
        return ClusterCheck(None, 1)  # a local Ray of our own: one node, started when needed
    ensure_ray(cfg.ray)
    nodes = alive_nodes()
    local = {k: v for k, v in worker_locations(cfg).items() if not uri_io.is_s3(v)}
    if nodes > 1 and local:
        listed = ", ".join(f"{k}={v}" for k, v in local.items())
        raise ConfigError(
            f"the Ray cluster at {address or 'this driver'} has {nodes} nodes, but these are "
            f"local paths its workers cannot all see: {listed}; use s3:// URIs"
        )
    return ClusterCheck(address, nodes)
