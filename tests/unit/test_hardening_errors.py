"""Errors that reached users as tracebacks (issue 15, items 6 and 7a): a bad search query, a
local Ray that fails to start, and S3 storage lost under the gallery lock. Each ends as one
line and a meaningful exit code; a failing lock release never hides the error in flight."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline.cli import EXIT_LOCKED, app
from pipeline.config import IndexConfig, RayConfig, StorageConfig, UpgradeConfig
from pipeline.gallery.index import build_index
from pipeline.gallery.lock import LOCK_FILE, GalleryLock, holder_of
from pipeline.gallery.store import Gallery, embedding_schema, embeddings_to_arrow
from pipeline.io import uri as uri_io
from pipeline.io.uri import StorageError
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.store import embedder_meta, save_model_dir
from pipeline.runtime import RayStartError, ensure_ray
from tests.fixtures.ray_local import own_ray_env

EXE = [sys.executable, "-m", "pipeline.cli"]
CHILD_TIMEOUT_S = 300  # a spawned child imports torch and Ray, then starts one
CLI_TIMEOUT_S = 120  # a CLI subprocess imports torch and Ray: seconds, generous on 2 busy cores
RAY_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)


def _stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- item 6: search ---------------------------------------------------------------------------
def _served_gallery(tmp_path: Path) -> list[str]:
    """v1 made by the config's old model (saved under workdir/models), flat index, serving."""
    cfg = UpgradeConfig(workdir=str(tmp_path))
    model = cfg.old_model
    net = EmbeddingNet(model.architecture, in_channels=model.preprocess.channels).eval()
    save_model_dir(net, embedder_meta(model), tmp_path / "models" / model.name)
    dim, keys = model.architecture.embedding_dim, [f"img-{i:03d}" for i in range(12)]
    emb = np.random.default_rng(0).normal(size=(len(keys), dim)).astype(np.float32)
    g = Gallery(cfg.gallery_uri, cfg.storage)
    table = pa.table(
        [pa.array(keys), embeddings_to_arrow(emb), pa.array([f"embed:{model.name}"] * len(keys))],
        schema=embedding_schema(dim),
    )
    uri_io.write_table(table, g.shard_uri("v1", 0), g.storage)
    g.commit_shard("v1", {"shard_id": 0, "path": "shard-00000.parquet", "rows": len(keys)})
    g.finalize("v1", {"model": model.name, "embedding_dim": dim})
    build_index([(np.array(keys, dtype=object), emb)], dim, IndexConfig(kind="flat")).save(
        g.index_uri("v1"), g.storage
    )
    g.promote("v1")
    return keys


def test_search_by_a_file_that_is_not_an_image_exits_2_in_one_line(tmp_path: Path) -> None:
    _served_gallery(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image at all\n")
    res = CliRunner().invoke(app, ["search", "--image", str(notes), "--set", f"workdir={tmp_path}"])
    assert res.exit_code == 2, res.output
    lines = _stderr_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {notes}: ") and "image" in lines[0]


def test_search_by_a_key_not_in_the_gallery_exits_2_naming_key_version_gallery(
    tmp_path: Path,
) -> None:
    keys = _served_gallery(tmp_path)
    flags = ["--set", f"workdir={tmp_path}"]
    res = CliRunner().invoke(app, ["search", "--key", "nope", *flags])
    gallery = tmp_path / "gallery"
    assert res.exit_code == 2, res.output
    assert _stderr_lines(res.stderr) == [f"error: key 'nope' is not in version v1 of {gallery}"]
    ok = CliRunner().invoke(app, ["search", "--key", keys[0], "-k", "3", "--json", *flags])
    assert ok.exit_code == 0, ok.output  # a key that is there still answers
    assert keys[0] not in ok.stdout and ok.stdout.count("img-") == 3


# -- item 6: Ray start-up ---------------------------------------------------------------------
def _unstartable_ray_env(tmp_path: Path) -> dict[str, str]:
    """A real Ray setting that makes a local start fail at once, every time: its temp dir
    (RAY_TMPDIR) is a plain file, so ray.init cannot create its session directory."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    return {**own_ray_env(), "RAY_TMPDIR": str(blocker)}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _runtime_log() -> _Collect:
    handler = _Collect()
    logger = logging.getLogger("pipeline.runtime")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    return handler


def _child_start_failure(env: dict[str, str], q) -> None:
    """In a fresh process (no Ray up): ensure_ray against an unstartable local Ray."""
    import ray

    os.environ.clear()
    os.environ.update(env)
    log = _runtime_log()
    try:
        ensure_ray(RayConfig(num_cpus=1, start_retries=2, start_backoff_seconds=0.01))
        q.put(("started", "", log.messages, ray.is_initialized()))
    except RayStartError as e:
        q.put(("error", str(e), log.messages, ray.is_initialized()))


def _child_timeout_then_success(q) -> None:
    """In a fresh process: Ray's start-up timeout raised once at the ray.init boundary (its
    raylet wait, 30 s fixed in ray/_private/node.py, has no setting), then a real start."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    real_init, calls = ray.init, []

    def init_once_timed_out(**kwargs):
        calls.append(kwargs["address"])
        if len(calls) == 1:
            raise Exception(RAY_TIMEOUT)  # noqa: TRY002 - what Ray itself raises
        return real_init(**kwargs)

    ray.init = init_once_timed_out
    log = _runtime_log()
    try:
        ensure_ray(RayConfig(num_cpus=1, start_backoff_seconds=0.01))
        cpus = ray.cluster_resources()["CPU"]
    finally:
        ray.shutdown()
    q.put((calls, cpus, log.messages))


def _in_fresh_process(target, *args) -> tuple:
    """Run `target(*args, queue)` in a spawned process (no Ray of this test session in it)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    try:
        return q.get(timeout=CHILD_TIMEOUT_S)
    finally:
        p.join(CHILD_TIMEOUT_S)


def test_local_ray_start_failure_is_retried_then_one_line_names_ray_address(
    tmp_path: Path,
) -> None:
    kind, msg, retries, up = _in_fresh_process(_child_start_failure, _unstartable_ray_env(tmp_path))
    assert kind == "error" and not up
    assert "\n" not in msg
    assert msg.startswith("could not start a local Ray (3 attempts; last: ")
    assert "Not a directory" in msg and "ray.address" in msg and "ray start --head" in msg
    assert len(retries) == 2, retries
    assert retries[0].startswith("Ray start-up failed (attempt 1/3")


def test_ray_start_timeout_then_success_recovers_with_one_warning() -> None:
    calls, cpus, retries = _in_fresh_process(_child_timeout_then_success)
    assert calls == ["local", "local"] and cpus == 1.0
    assert retries == [
        f"Ray start-up failed (attempt 1/3: Exception: {RAY_TIMEOUT}); retrying in 0.0s"
    ]


def test_cli_with_an_unstartable_ray_exits_1_in_one_line(tmp_path: Path) -> None:
    """`carryover train` starts Ray first thing: it fails with one line (no traceback)."""
    p = subprocess.run(
        EXE
        + ["train", "--which", "old", "--set", f"workdir={tmp_path}"]
        + ["--set", "ray.start_retries=1", "--set", "ray.start_backoff_seconds=0.01"],
        capture_output=True,
        text=True,
        env=_unstartable_ray_env(tmp_path),
        timeout=CLI_TIMEOUT_S,
    )
    assert p.returncode == 1, p.stderr
    errors = [line for line in _stderr_lines(p.stderr) if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert errors[0].startswith("error: could not start a local Ray (2 attempts; last: ")
    # the retry's warning and Ray's own warnings only; nothing else
    assert sum("Ray start-up failed (attempt 1/2" in line for line in p.stderr.splitlines()) == 1


# -- item 7a: storage lost under the lock -----------------------------------------------------
def _storage(endpoint_url: str, retries: int = 1) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint_url, retries=retries)


def test_lock_on_a_missing_bucket_raises_storage_error_naming_the_lock(s3_server) -> None:
    uri = "s3://no-such-bucket-h7/gallery"
    with pytest.raises(StorageError) as e:
        GalleryLock(uri, _storage(s3_server.endpoint_url)).acquire()
    assert f"{uri}/{LOCK_FILE}" in str(e.value) and "NoSuchBucket" in str(e.value)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        holder_of(uri, _storage(s3_server.endpoint_url))


def test_cli_on_a_missing_bucket_exits_1_in_one_line(s3_server) -> None:
    uri = "s3://no-such-bucket-h7/gallery"
    flags = ["--set", f"gallery={uri}", "--set", f"storage.endpoint_url={s3_server.endpoint_url}"]
    res = CliRunner().invoke(app, ["ingest", *flags])  # the lock is its first storage call
    assert res.exit_code == 1, res.output
    lines = _stderr_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and f"{uri}/{LOCK_FILE}" in lines[0]
    assert "NoSuchBucket" in lines[0]


def test_bucket_lost_inside_the_lock_surfaces_the_inner_error(
    s3_server, caplog: pytest.LogCaptureFixture
) -> None:
    """The endpoint restarts empty during an upgrade: the upgrade's own error comes out, and
    the failed release is one warning line naming the lock object."""
    bucket = "lost-under-lock"
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/gallery"
    caplog.set_level(logging.WARNING, logger="pipeline.gallery.lock")
    inner = FileNotFoundError(f"no such file or directory: s3://{bucket}/images")
    lock = GalleryLock(uri, _storage(s3_server.endpoint_url))
    with pytest.raises(FileNotFoundError) as e, lock:
        s3.delete_object(Bucket=bucket, Key=f"gallery/{LOCK_FILE}")
        s3.delete_bucket(Bucket=bucket)  # the endpoint "restarted empty"
        raise inner
    assert e.value is inner
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.gallery.lock"]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert warned[0].startswith(f"could not release the lock {uri}/{LOCK_FILE} (its lease ")
    assert "NoSuchBucket" in warned[0]


def test_failing_delete_on_release_keeps_the_inner_error_and_raises_without_one(
    faulty_s3, caplog: pytest.LogCaptureFixture
) -> None:
    """The DELETE of the lock object fails (the fault proxy answers 500 to it): with an error
    in flight it is a warning; with none, release's StorageError names the object."""
    uri = faulty_s3.uri("gallery-release-fails")
    st = _storage(faulty_s3.endpoint_url)
    faulty_s3.configure(fail_path=rf"/{LOCK_FILE}$", fail_methods=("DELETE",), fail_status=500)
    caplog.set_level(logging.WARNING, logger="pipeline.gallery.lock")
    with pytest.raises(ValueError, match="the stage failed"), GalleryLock(uri, st):
        raise ValueError("the stage failed")
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.gallery.lock"]
    assert len(warned) == 1 and f"{uri}/{LOCK_FILE}" in warned[0], warned
    assert faulty_s3.injected >= 1 and all(p.startswith("DELETE ") for p in faulty_s3.failed_paths)
    stale = GalleryLock(uri, st, token=holder_of(uri, st).token)  # adopts the stale lease
    with pytest.raises(StorageError) as e, stale:
        pass
    assert f"delete {uri}/{LOCK_FILE}" in str(e.value) and "InternalError" in str(e.value)
    faulty_s3.configure()
    GalleryLock(uri, st, token=holder_of(uri, st).token).release()
    assert holder_of(uri, st) is None


@pytest.mark.parametrize("command", ["ingest", "backfill"])
def test_commands_that_write_a_version_are_refused_while_locked(
    tmp_path: Path, command: str
) -> None:
    """ingest/backfill take the gallery lock before any Ray work: refused with exit 3. Ray is
    made unstartable so that, without the lock, the command fails fast instead of running."""
    gallery = tmp_path / "gallery"
    flags = ["--set", f"workdir={tmp_path}", "--set", f"gallery={gallery}"]
    holder = GalleryLock(str(gallery), owner="test-holder", purpose="upgrade to v2")
    env = {k: v for k, v in _unstartable_ray_env(tmp_path).items() if "LOCK_TOKEN" not in k}
    with holder:
        p = subprocess.run(
            EXE + [command, *flags],
            capture_output=True,
            text=True,
            env=env,
            timeout=CLI_TIMEOUT_S,
        )
        assert holder_of(str(gallery)).token == holder.token  # still ours afterwards
    assert p.returncode == EXIT_LOCKED, p.stderr
    text = " ".join(p.stderr.split())
    assert text.startswith(f"locked: gallery {gallery} is locked by test-holder (upgrade to v2)")
    assert f"pid {os.getpid()}" in text
    assert not (gallery / "versions").exists()
