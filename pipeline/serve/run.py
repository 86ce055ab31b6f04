"""Start and stop the search service: its own Serve on the Ray it runs in, never another's."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx
import ray
from ray import serve

from pipeline.config import ConfigError, UpgradeConfig
from pipeline.gallery.store import Gallery, GalleryError
from pipeline.runtime import ensure_ray
from pipeline.serve.app import SearchService

SERVE_NAMESPACE = "serve"  # where Ray Serve keeps its controller and proxies


class ServeConflict(ConfigError):
    """The Ray this command joins already runs a Serve instance (of someone else)."""


class ServeStartError(GalleryError):
    """The service did not come up (a replica failed to load the gallery, or timed out)."""


@dataclass(frozen=True)
class Service:
    """A running search service: where it answers and what it serves."""

    url: str
    app: str
    gallery: str
    version: str
    replicas: int
    started_in_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "app": self.app,
            "gallery": self.gallery,
            "version": self.version,
            "replicas": self.replicas,
            "started_in_seconds": round(self.started_in_seconds, 2),
        }


def check_no_serve() -> None:
    """Refuse a Ray that already runs Serve: attaching would serve another app's gallery on
    its HTTP options, not ours."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    if any(a.get("namespace") == SERVE_NAMESPACE for a in actors):
        where = os.environ.get("RAY_ADDRESS") or "the Ray joined"
        raise ServeConflict(
            f"Ray Serve already runs in {where}; `carryover serve` starts its own: stop that "
            "one (`serve shutdown`) or run without ray.address/RAY_ADDRESS for a private Ray"
        )


def check_port_free(host: str, port: int) -> None:
    """A port in use would leave Serve's proxy failing in a loop: say so before starting."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"serve.port {port} on {host} is not free ({e.strerror}): pick another "
                "with --port or --set serve.port=..."
            ) from None


def start_service(cfg: UpgradeConfig) -> Service:
    """Start Ray (or join ray.address), Serve with our HTTP options, the app; wait until
    /health answers. The caller stops it with `stop_service`."""
    t0 = time.perf_counter()
    sc = cfg.serve
    g = Gallery(cfg.gallery_uri, cfg.storage)
    if g.current() is None:  # before any Ray: nothing to serve
        raise GalleryError(f"{g.uri}: no serving version (nothing promoted yet)")
    check_port_free(sc.host, sc.port)
    ensure_ray(cfg.ray)
    check_no_serve()
    serve.start(http_options={"host": sc.host, "port": sc.port}, proxy_location="HeadOnly")
    app = SearchService.options(
        num_replicas=sc.replicas, ray_actor_options={"num_cpus": sc.replica_num_cpus}
    ).bind(cfg)
    name = f"carryover-{cfg.gallery_name}"
    try:
        serve.run(app, name=name, route_prefix="/", blocking=False)
    except Exception as e:  # Ray reports a replica's failure as RuntimeError & co.
        text = str(e).strip().splitlines()
        raise ServeStartError(f"the service did not start: {text[0] if text else e!r}") from e
    host = "127.0.0.1" if sc.host in ("0.0.0.0", "::") else sc.host
    url = f"http://{host}:{sc.port}"
    health = wait_healthy(url, sc.ready_timeout_seconds)
    return Service(
        url, name, cfg.gallery_uri, health["version"], sc.replicas, time.perf_counter() - t0
    )


def wait_healthy(url: str, timeout: float) -> dict[str, Any]:
    """/health's answer, polled until it comes or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.2)
    raise ServeStartError(f"the service at {url} was not ready in {timeout:.0f}s ({last})")


def stop_service() -> None:
    """Shut our Serve down (apps, controller, proxies), then leave Ray."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
