"""Concurrency: readers during promote/rollback see one whole version, never a mix; two
upgrades of one gallery at once: one runs, the other is refused by the lock (exit 3 on the
CLI); a killed or paused lease holder is taken over and cannot clobber its successor."""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipeline.config import IndexConfig, StorageConfig, UpgradeConfig
from pipeline.context import Context
from pipeline.gallery.index import build_index
from pipeline.gallery.lock import GalleryLock, LockHeld, holder_of
from pipeline.gallery.store import Gallery, embedding_schema, embeddings_to_arrow
from pipeline.io import uri as uri_io
from pipeline.services.search import search_gallery

DIM, K, QUERY = 8, 5, "img-0007"
FORK = mp.get_context("fork")  # children inherit the test's patches; nothing re-imported

# Generous on purpose: these wait on events, and only a very loaded machine takes long.
WAIT_S = 120.0


# -- readers during promote / rollback ----------------------------------------------------
@dataclass(frozen=True)
class Expected:
    """What a reader must see of one version: QUERY's top-K and every row."""

    neighbours: list[str]
    rows: dict[str, bytes]  # key → float32 embedding bytes


def _version(g: Gallery, version: str, keys: list[str], seed: int) -> Expected:
    """A complete version: two shards, manifest, flat cosine index; its expected answers."""
    emb = np.random.default_rng(seed).normal(size=(len(keys), DIM)).astype(np.float32)
    half = len(keys) // 2
    for sid, part in enumerate((slice(0, half), slice(half, None))):
        n = len(keys[part])
        table = pa.table(
            [
                pa.array(keys[part]),
                embeddings_to_arrow(emb[part]),
                pa.array([f"embed:{version}"] * n),
            ],
            schema=embedding_schema(DIM),
        )
        uri_io.write_table(table, g.shard_uri(version, sid), g.storage)
        g.commit_shard(version, {"shard_id": sid, "path": f"shard-{sid:05d}.parquet", "rows": n})
    g.finalize(version, {"model": version, "embedding_dim": DIM})
    idx = build_index([(np.array(keys, dtype=object), emb)], DIM, IndexConfig(kind="flat"))
    idx.save(g.index_uri(version), g.storage)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # brute force, not the index
    scores = unit @ unit[keys.index(QUERY)]
    order = [keys[i] for i in np.argsort(-scores) if keys[i] != QUERY]
    return Expected(order[:K], {k: emb[i].tobytes() for i, k in enumerate(keys)})


def _two_versions(g: Gallery) -> dict[str, Expected]:
    """v1 and v2 share QUERY but differ in keys and vectors, so their answers differ."""
    want = {
        "v1": _version(g, "v1", [f"img-{i:04d}" for i in range(0, 40)], seed=1),
        "v2": _version(g, "v2", [f"img-{i:04d}" for i in range(4, 44)], seed=2),
    }
    assert want["v1"].neighbours != want["v2"].neighbours
    assert set(want["v1"].rows) != set(want["v2"].rows)
    return want


def _search_reader(ctx: Context, want: dict[str, Expected], stop: threading.Event, out: dict):
    """The serving path: CURRENT → that version's index and QUERY's row → top-K."""
    while not stop.is_set():
        res = search_gallery(ctx, key=QUERY, k=K)
        v = res.version
        if res.keys != want[v].neighbours:
            out["mixed"].append(f"search said {v} but answered {res.keys}")
        out["seen"][v] += 1


def _rows_reader(g: Gallery, want: dict[str, Expected], stop: threading.Event, out: dict):
    """A listing of the serving version: every row of one version, none of the other."""
    while not stop.is_set():
        v = g.current()
        rows = {
            k: e.tobytes()
            for b in g.iter_embeddings(v)
            for k, e in zip(
                b.column("key").to_pylist(),
                b.column("embedding").flatten().to_numpy().reshape(-1, DIM),
                strict=True,
            )
        }
        if rows != want[v].rows:
            out["mixed"].append(f"rows of {v}: {len(rows)} rows, not exactly {v}'s")
        out["seen"][v] += 1


def _pointer_reader(g: Gallery, want: dict[str, Expected], stop: threading.Event, out: dict):
    """CURRENT alone, as fast as it can be read: a torn read of it fails to parse."""
    while not stop.is_set():
        state = g.current_state()
        if state["version"] not in want or not isinstance(state["history"], list):
            out["mixed"].append(f"CURRENT read as {state}")
        out["seen"][state["version"]] += 1


def _guarded(fn, *args) -> tuple[dict[str, Any], threading.Thread]:
    """A reader thread and what it saw: reads per version, wrong answers, exceptions.
    The reader's last argument is the shared stop event."""
    out: dict[str, Any] = {"seen": Counter(), "mixed": [], "errors": []}

    def run() -> None:
        try:
            fn(*args, out)
        except Exception as e:  # a torn read: record it, the assertions name it
            out["errors"].append(f"{type(e).__name__}: {e}")
            args[-1].set()  # stop everyone: the answer is already known

    return out, threading.Thread(target=run, daemon=True)


def _promote_rollback_under_readers(
    tmp_path: Path, gallery_uri: str, storage: StorageConfig | None, seconds: float
) -> None:
    cfg = UpgradeConfig(
        workdir=str(tmp_path), gallery=gallery_uri, storage=storage or StorageConfig()
    )
    ctx = Context(cfg, quiet=True)
    g = ctx.gallery
    want = _two_versions(g)
    g.promote("v1")
    stop = threading.Event()
    readers = [_guarded(_search_reader, ctx, want, stop) for _ in range(3)]
    readers.append(_guarded(_rows_reader, g, want, stop))
    readers.append(_guarded(_pointer_reader, g, want, stop))
    for _, t in readers:
        t.start()
    flips, start = 0, time.monotonic()

    def enough() -> bool:  # every reader overlapped several writes (a slow S3 needs longer)
        return flips >= 40 and all(
            o["seen"]["v1"] >= 3 and o["seen"]["v2"] >= 3 for o, _ in readers
        )

    try:
        while not stop.is_set() and time.monotonic() - start < 10 * seconds:
            if time.monotonic() - start > seconds and enough():
                break
            assert g.promote("v2")["version"] == "v2"
            assert g.rollback()["version"] == "v1"
            flips += 2
    finally:
        stop.set()
        for _, t in readers:
            t.join(30)
    errors = [e for out, _ in readers for e in out["errors"]]
    mixed = [m for out, _ in readers for m in out["mixed"]]
    assert errors == [] and mixed == [], (errors + mixed)[:5]
    assert enough(), (flips, [o["seen"] for o, _ in readers])
    assert g.current() == "v1" and g.current_state()["history"] == []


def test_readers_during_promote_and_rollback_see_one_version(tmp_path: Path) -> None:
    _promote_rollback_under_readers(tmp_path, str(tmp_path / "gallery"), None, seconds=2.0)


@pytest.mark.slow
def test_readers_during_promote_and_rollback_on_s3(tmp_path: Path, s3_server) -> None:
    storage = StorageConfig(endpoint_url=s3_server.endpoint_url)
    uri = s3_server.uri("concurrency", "gallery")
    _promote_rollback_under_readers(tmp_path, uri, storage, seconds=4.0)


# -- two upgrades of one gallery at once ---------------------------------------------------
class _Stop(Exception):
    """Ends an upgrade inside its guarded section, once the test has seen it there."""


class _NoTracking:
    """Stands in for MLflow (run_upgrade connects to it before taking the lock): the lock is
    under test here; a run started would mean the upgrade went past it."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an MLflow run was started")


@pytest.fixture
def no_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Context, "tracker", property(lambda self: _NoTracking()))


def _upgrade(cfg: UpgradeConfig, q, done) -> None:
    """One upgrade process: the real `run_upgrade`, whose lock decides who goes on."""
    from pipeline.flows import run_upgrade

    try:
        run_upgrade(cfg, quiet=True, console=Console(file=io.StringIO()))
    except LockHeld as e:
        q.put(("refused", os.getpid(), str(e)))
    except _Stop:
        pass
    except Exception as e:  # anything else fails the test with its message, not a timeout
        q.put(("failed", os.getpid(), repr(e)))


def test_two_upgrades_at_once_one_runs_the_other_is_refused(
    tmp_path: Path, no_tracking: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import upgrade_graph as upgrade

    cfg = UpgradeConfig(workdir=str(tmp_path), gallery=str(tmp_path / "gallery"))
    q, done = FORK.Queue(), FORK.Event()
    real_check = upgrade.check_identity

    def first_guarded_step(ctx, log, restart) -> None:  # what run_upgrade does under the lock
        real_check(ctx, log, restart)  # records the upgrade's identity: a real write
        q.put(("entered", os.getpid(), holder_of(cfg.gallery_uri).pid))
        done.wait(60)  # hold the lock until the other process has tried
        raise _Stop

    monkeypatch.setattr(upgrade, "check_identity", first_guarded_step)
    procs = [FORK.Process(target=_upgrade, args=(cfg, q, done)) for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted((q.get(timeout=WAIT_S) for _ in procs), key=lambda r: r[0])
    done.set()
    for p in procs:
        p.join(30)
    (kind_a, winner, holder_pid), (kind_b, loser, message) = got
    assert (kind_a, kind_b) == ("entered", "refused") and winner != loser, got
    assert holder_pid == winner and {winner, loser} == {p.pid for p in procs}
    assert f"upgrade to {cfg.target_version}) on {socket.gethostname()} pid {winner}" in message
    assert [p.exitcode for p in procs] == [0, 0]
    assert holder_of(cfg.gallery_uri) is None  # the winner released it on its way out


def _hold(uri: str, ready, done) -> None:
    with GalleryLock(uri, ttl_seconds=60, owner="nightly", purpose="upgrade to v9"):
        ready.set()
        done.wait(60)


@contextlib.contextmanager
def _held_elsewhere(uri: str) -> Iterator[Any]:
    """Another process holds the gallery's lease (as "nightly") for the duration."""
    ready, done = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold, args=(uri, ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        yield holder
    finally:
        done.set()
        holder.join(30)


def test_cli_upgrade_exits_3_naming_the_holder(tmp_path: Path, no_tracking: None) -> None:
    from pipeline.cli import EXIT_LOCKED, app

    uri = str(tmp_path / "gallery")
    flags = ["--set", f"workdir={tmp_path}", "--set", f"gallery={uri}"]
    with _held_elsewhere(uri) as holder:
        res = CliRunner().invoke(app, ["upgrade", *flags])
    text = " ".join(res.output.split())
    assert res.exit_code == EXIT_LOCKED == 3, text
    assert f"locked: gallery {uri} is locked by nightly (upgrade to v9)" in text
    assert f"pid {holder.pid}" in text and "carryover lock break" in text
    # refused before doing anything: no version begun (and no MLflow run: _NoTracking)
    assert sorted(p.name for p in Path(uri).iterdir()) == ["_lock.json.guard"]


def test_cli_promote_and_rollback_are_refused_while_locked(
    tmp_path: Path, no_tracking: None
) -> None:
    """A manual promote/rollback moves CURRENT too: it takes the same lease (exit 3 while an
    upgrade holds it), so it cannot interleave CURRENT's history with the upgrade's promote."""
    from pipeline.cli import EXIT_LOCKED, app

    uri = str(tmp_path / "gallery")
    flags = ["--set", f"workdir={tmp_path}", "--set", f"gallery={uri}"]
    with _held_elsewhere(uri):
        results = [
            CliRunner().invoke(app, ["promote", "v1", *flags]),
            CliRunner().invoke(app, ["rollback", "--yes", *flags]),
        ]
    for res in results:
        text = " ".join(res.output.split())
        assert res.exit_code == EXIT_LOCKED, text
        assert f"locked: gallery {uri} is locked by nightly" in text
    assert not (Path(uri) / "CURRENT").exists()


# -- a killed or paused holder --------------------------------------------------------------
def _hold_then_die(uri: str, host: str | None, ttl: float, ready) -> None:
    if host is not None:  # pretend to run on another machine
        socket.gethostname = lambda: host
    lock = GalleryLock(uri, ttl_seconds=ttl, owner="killed")
    lock.__enter__()  # holds the lease, heartbeat running; never released
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def _killed_holder(uri: str, host: str | None, ttl: float):
    ready = FORK.Event()
    p = FORK.Process(target=_hold_then_die, args=(uri, host, ttl, ready))
    p.start()
    p.join(30)
    assert ready.is_set() and p.exitcode == -signal.SIGKILL
    dead = holder_of(uri)
    assert dead.owner == "killed" and dead.pid == p.pid
    return dead


def test_lease_of_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    uri = str(tmp_path / "gallery")
    dead = _killed_holder(uri, None, ttl=600)
    assert not dead.expired  # no waiting: its pid is gone on this host
    new = GalleryLock(uri, ttl_seconds=60, owner="next")
    assert new.acquire().owner == "next" and holder_of(uri).token == new.token != dead.token


def test_lease_of_a_killed_holder_elsewhere_is_taken_over_after_expiry(tmp_path: Path) -> None:
    uri = str(tmp_path / "gallery")
    dead = _killed_holder(uri, "other-host", ttl=2.5)
    # its pid means nothing here: only its lease's expiry frees the gallery
    with pytest.raises(LockHeld, match=rf"killed \(upgrade\) on other-host pid {dead.pid}"):
        GalleryLock(uri, owner="early").acquire()
    time.sleep(max(0.0, dead.expires_at - time.time()) + 0.1)
    new = GalleryLock(uri, ttl_seconds=60, owner="next")
    assert new.acquire().owner == "next" and holder_of(uri).token == new.token


def _stale_holder(uri: str, q, taken) -> None:
    """A holder that stopped renewing (paused, partitioned), then wakes up and beats again."""
    lock = GalleryLock(uri, ttl_seconds=0.6, owner="stale")
    lock.acquire()
    q.put(lock.token)
    taken.wait(30)  # its lease expired meanwhile and someone took it over
    lock.start_heartbeat()  # renews every ttl/3: each renewal must find the lease gone
    deadline = time.time() + WAIT_S
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    q.put((lock.lost, holder_of(uri), lock.release()))  # the lease as its beats left it


def test_a_stale_holders_heartbeat_cannot_clobber_the_new_holder(tmp_path: Path) -> None:
    uri = str(tmp_path / "gallery")
    q, taken = FORK.Queue(), FORK.Event()
    p = FORK.Process(target=_stale_holder, args=(uri, q, taken))
    p.start()
    stale_token = q.get(timeout=WAIT_S)
    time.sleep(max(0.0, holder_of(uri).expires_at - time.time()) + 0.1)
    new = GalleryLock(uri, ttl_seconds=60, owner="next")
    assert new.acquire().owner == "next"  # the stale holder is alive: taken over by expiry
    taken.set()
    lost, after_beats, released = q.get(timeout=WAIT_S)
    p.join(30)
    assert after_beats.owner == "next" and after_beats.token == new.token != stale_token
    assert lost is not None and "our lock is gone (now: next" in lost and released is False
    assert holder_of(uri).token == new.token  # its release left the new lease alone
    new.renew()  # still ours
    assert new.release() and holder_of(uri) is None
