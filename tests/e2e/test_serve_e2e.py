"""`carryover serve` on a copy of the small gallery: queries by key, image and vector over real
HTTP while `carryover promote` moves CURRENT; no request fails and answers switch version."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from pipeline.context import Context
from pipeline.gallery.index import GalleryIndex
from pipeline.services.search import image_bytes_of_key
from pipeline.services.steps import version_embeddings
from tests.e2e.conftest import SmallGallery, copy_of
from tests.fixtures.ray_local import own_ray_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
READY_S = 240  # a private Ray and Serve on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(g: SmallGallery, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args, *g.cli_sets()],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=own_ray_env(),
    )


@dataclass
class Service:
    gallery: SmallGallery
    ready: dict
    log: Path

    @property
    def url(self) -> str:
        return self.ready["url"]


def _first_line(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    assert line, f"serve printed nothing (rc={proc.poll()}): {log.read_text()[-3000:]}"
    return line


@pytest.fixture
def service(small_gallery: SmallGallery, tmp_path: Path) -> Iterator[Service]:
    g = copy_of(small_gallery, tmp_path / "g")
    log = tmp_path / "serve.log"
    port = _free_port()
    args = ["serve", "--json", "--port", str(port), "--set", "serve.poll_seconds=0.3"]
    with log.open("w") as errf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args, *g.cli_sets()],
            stdout=subprocess.PIPE,
            stderr=errf,
            text=True,
            cwd=REPO,
            env=own_ray_env(),  # its own Ray: the session's never gets a Serve
        )
        try:
            ready = json.loads(_first_line(proc, log, READY_S))
            yield Service(g, ready, log)
        finally:
            proc.terminate()
            try:
                assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)


@dataclass
class Stream:
    """Key queries issued back to back from a thread; every answer's status and version."""

    url: str
    key: str
    answers: list[tuple[int, str | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                try:
                    r = c.get("/search/key", params={"key": self.key, "k": 5})
                    self.answers.append((r.status_code, r.json().get("version")))
                except (httpx.HTTPError, ValueError) as e:
                    self.errors.append(repr(e))

    def wait_for(self, version: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.errors:
            if any(v == version for _, v in self.answers[-5:]):
                return
            self.stop.wait(0.05)
        raise AssertionError(f"no answer from {version}: {self.answers[-5:]} {self.errors}")


def test_serve_switches_version_without_failing_a_request(service: Service) -> None:
    g, url = service.gallery, service.url
    assert service.ready["version"] == "v2" and url.startswith("http://127.0.0.1:")
    cfg = g.cfg
    keys = GalleryIndex.load(f"{cfg.gallery_uri}/versions/v2/index", cfg.storage).keys
    stream = Stream(url, str(keys[0]))
    t = threading.Thread(target=stream.run, daemon=True)
    t.start()
    try:
        stream.wait_for("v2", 60)
        r = _cli(g, "promote", "v1")
        assert r.returncode == 0, r.stderr[-2000:]
        stream.wait_for("v1", 60)
        n = len(stream.answers)
        while len(stream.answers) < n + 5 and not stream.errors and t.is_alive():
            stream.stop.wait(0.05)
    finally:
        stream.stop.set()
        t.join(timeout=60)
    assert not stream.errors and all(s == 200 for s, _ in stream.answers), stream.answers[-5:]
    versions = [v for _, v in stream.answers]
    switch = versions.index("v1")
    assert set(versions[:switch]) == {"v2"} and set(versions[switch:]) == {"v1"}
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["version"] == "v1" and health["swaps"] == 1 and health["last_error"] is None
    _image_and_vector_queries(g, url, str(keys[1]))


def _image_and_vector_queries(g: SmallGallery, url: str, key: str) -> None:
    ctx = Context(g.cfg, quiet=True)
    data = image_bytes_of_key(ctx, key)
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/search/image", params={"k": 3}, content=data)
        assert r.status_code == 200, r.text
        body = r.json()
        # the image of a stored row finds that row (first, unless an identical digit ties)
        assert body["version"] == "v1" and key in [h["key"] for h in body["hits"]]
        assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert isinstance(body["hits"][0]["label"], int) and len(body["hits"]) == 3
        r = c.post("/search/image", params={"adapter": "procrustes"}, content=data)
        assert r.status_code == 200 and r.json()["adapter"] == "procrustes", r.text
        _, emb = version_embeddings(ctx.gallery, "v1", pa.array([key]))
        r = c.post("/search/vector", json={"vector": emb[0].tolist(), "k": 4})
        hits = r.json()["hits"]
        assert r.status_code == 200 and key in [h["key"] for h in hits] and len(hits) == 4
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)  # cosine of itself
        r = c.post("/search/vector", json={"vector": [1.0, 2.0]})
        assert r.status_code == 400 and "32-d" in r.json()["detail"]
        r = c.get("/search/key", params={"key": "no-such-key"})
        assert r.status_code == 404 and "no-such-key" in r.json()["detail"]
