"""`carryover status` while a real upgrade runs in a terminal (a pty): the running stage is
visible, the terminal shows training progress (epoch, loss) and no Ray or MLflow log lines,
and afterwards the journal says SUCCEEDED and CURRENT names the serving version."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.prepare import prepare
from tests.e2e.conftest import small_sets

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# What Ray's and MLflow's own log lines look like when they reach a terminal.
LIBRARY_LINE = re.compile(
    r"core_worker\.cc|\(raylet\)|\(pid=|INFO worker\.py|WARNING worker\.py|"
    r"(INFO|WARNING|ERROR) mlflow|mlflow\.(store|tracking|utils)|alembic|Ray Train|Tip:|"
    r"Started a local Ray"
)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _status(gallery: str) -> dict | None:
    res = _cli("status", gallery, "--json")
    return json.loads(res.stdout) if res.returncode == 0 else None


def _read_all(fd: int, sink: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return
        if not chunk:
            return
        sink.append(chunk)


def test_status_while_an_upgrade_runs_in_a_terminal(tmp_path: Path, ray_local) -> None:
    sets = small_sets(tmp_path, name="watch")
    cfg = load_config(None, list(sets))
    prepare("digits", cfg.images_uri, 2, cfg.storage, cfg.data, limit=300)
    # Through ingest, without side-info (it would only add a Ray Train run of ~25 s): the old
    # model's training, then v1 serves. Later training stages report through the same code.
    flags = [a for s in (*sets, "side_info.enabled=false") for a in ("--set", s)]
    args = ["upgrade", "--until", "ingest", *flags]
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "160"},
    )
    os.close(slave)
    out: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(master, out), daemon=True)
    reader.start()
    try:
        seen, deadline = None, time.monotonic() + 150
        while seen is None and proc.poll() is None and time.monotonic() < deadline:
            st = _status(cfg.gallery_uri)
            run = (st or {}).get("running") or {}
            if (run.get("progress") or {}).get("stage"):
                seen = st
            time.sleep(0.2)  # a short poll; each status call itself takes about a second
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
        os.close(master)
    text = b"".join(out).decode(errors="replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")
    assert rc == 0, plain[-3000:]
    assert seen is not None, "status never showed a running stage"
    run = seen["running"]
    assert run["kind"] == "upgrade" and run["trigger"] == "direct" and run["stale"] is None
    assert run["progress"]["stage"] in ("old-model", "ingest")
    assert seen["lock"]["pid"] == proc.pid
    # training progress drawn in the terminal: the bar's epoch and loss
    assert re.search(r"train-v1 .*epoch 2/2 .*loss \d+\.\d{4}", plain), plain[-3000:]
    noise = [ln for ln in plain.splitlines() if LIBRARY_LINE.search(ln)]
    assert noise == [], noise
    log_file = tmp_path / "logs" / "carryover.log"
    assert f"logs of Ray and MLflow: {log_file}" in plain.replace("\n", "")
    assert log_file.stat().st_size > 0
    t0 = time.perf_counter()
    after = _status(cfg.gallery_uri)
    took = time.perf_counter() - t0
    assert after is not None and after["serving"] == "v1" and after["running"] is None
    (last,) = after["upgrades"]
    assert (last["status"], last["trigger"], last["stale"]) == ("SUCCEEDED", "direct", None)
    assert last["id"] == run["id"]
    print(f"status --json on the finished gallery: {took:.2f}s")
