"""`carryover serve`: the search service (Ray Serve, HTTP/JSON) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from typing import Annotated

import typer

from pipeline.cli.common import (
    ConfigOpt,
    GalleryArg,
    JsonOpt,
    SetOpt,
    _errors,
    _gallery_cfg,
    app,
    console,
    err,
)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the service as Ctrl-C does: cleanly


def _watch(url: str, version: str, poll: float, as_json: bool) -> None:
    """Block until interrupted; say when the served version changes (stderr)."""
    # start-up: httpx (~0.1 s) only once the service runs
    import httpx

    while True:
        time.sleep(poll)
        try:
            now = httpx.get(f"{url}/health", timeout=5).json().get("version", version)
        except (httpx.HTTPError, ValueError):
            continue  # a slow answer under load: the next poll asks again
        if now != version:
            err.print(f"serving {now} (was {version})")
            version = now


@app.command()
@_errors
def serve(
    gallery: GalleryArg = None,
    host: Annotated[str | None, typer.Option(help="bind address (serve.host)")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (serve.port)")] = None,
    replicas: Annotated[int | None, typer.Option(min=1, help="replicas (serve.replicas)")] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve nearest-neighbour search over HTTP (by key, image upload, vector) until Ctrl-C.

    Each replica holds the serving version's model and faiss index; after a promote or
    rollback it loads the new version, then switches to it without dropping requests.
    """
    # start-up: Ray Serve, torch and faiss (seconds); --help and parsing need none
    from pipeline.serve.run import start_service, stop_service

    sets = list(set_ or [])
    for key, value in (("host", host), ("port", port), ("replicas", replicas)):
        if value is not None:
            sets.append(f"serve.{key}={value}")
    cfg, _ = _gallery_cfg(config, sets, gallery)
    try:
        svc = start_service(cfg)
        # after ray.init, which sets its own SIGTERM handler (sys.exit without our message)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        if as_json:
            print(json.dumps(svc.to_json()), flush=True)
        else:
            console.print(
                f"serving {svc.gallery} version [bold]{svc.version}[/] at [bold]{svc.url}[/] "
                f"({svc.replicas} replica(s), ready in {svc.started_in_seconds:.0f}s; "
                f"API docs {svc.url}/docs); Ctrl-C stops it",
                soft_wrap=True,
            )
        _watch(svc.url, svc.version, cfg.serve.poll_seconds, as_json)
    except KeyboardInterrupt:
        err.print("stopping the service")
    finally:
        stop_service()
