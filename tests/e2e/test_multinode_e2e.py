"""The upgrade on a Ray cluster of two nodes (two `ray start`s on this machine), every URI on
the S3 endpoint, tracking on an `mlflow server`: work lands on both nodes, local paths are
refused, and a rerun of the finished upgrade does nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.data.prepare import prepare
from pipeline.gallery.lock import holder_of
from pipeline.gallery.store import Gallery
from pipeline.io import uri
from tests.e2e.test_upgrade_e2e import TINY
from tests.fixtures.ray_head import _free_port, _session_pids

pytestmark = pytest.mark.slow
SHARDS, ROWS = 4, 400
START_TIMEOUT_S = 180  # `ray start` on a busy 2-core machine
UPGRADE_TIMEOUT_S = 600


@dataclass
class TwoNodes:
    address: str  # the head's GCS address, host:port
    node_ids: set[str]  # the alive nodes, as Ray names them
    sessions: list[int]  # the process sessions of the two `ray start`s (for teardown)


def _node_env() -> dict[str, str]:
    """A node's environment: no session Ray, no credentials (workers must get them shipped)."""
    drop = {"RAY_ADDRESS"} | {k for k in os.environ if k.startswith("AWS_")}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "RAY_AUTH_MODE": "disabled"}


def _ray_start(args: list[str], tmp: Path) -> int:
    """One `ray start` in a session of its own; returns that session's id."""
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        *args,
        "--num-cpus=2",
        f"--temp-dir={tmp}",
        # Ports of its own: another Ray on this machine may hold the defaults.
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        "--disable-usage-stats",
    ]
    log = tmp / "start.log"
    with log.open("w") as out:
        p = subprocess.Popen(
            cmd, env=_node_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    if p.wait(timeout=START_TIMEOUT_S) != 0:
        pytest.fail(f"ray start {args[0]} failed:\n{log.read_text()[-3000:]}")
    return p.pid


def _alive_nodes(address: str) -> set[str]:
    code = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], env=_node_env(), capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return set(json.loads(p.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    # Short temp dirs: Ray's socket paths must stay under 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="co-2n-", dir="/tmp"))
    sessions: list[int] = []
    try:
        from ray._private.services import get_node_ip_address

        port = _free_port()
        sessions.append(
            _ray_start(
                [
                    "--head",
                    f"--port={port}",
                    "--include-dashboard=false",
                    f"--ray-client-server-port={_free_port()}",
                ],
                root / "head",
            )
        )
        address = f"{get_node_ip_address()}:{port}"
        sessions.append(_ray_start([f"--address={address}"], root / "worker"))
        nodes = _alive_nodes(address)
        assert len(nodes) == 2, nodes
        yield TwoNodes(address, nodes, sessions)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for sid in sessions:
                for pid in _session_pids(sid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            time.sleep(2)
        shutil.rmtree(root, ignore_errors=True)


def _cli(args: list[str], sets: list[str], **env: str) -> subprocess.CompletedProcess:
    """`carryover ARGS --set ...` as its own driver: no session Ray, no token auth."""
    flags = [a for s in sets for a in ("--set", s)]
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args, *flags],
        capture_output=True,
        text=True,
        env={**base, "RAY_AUTH_MODE": "disabled", **env},
        timeout=UPGRADE_TIMEOUT_S,
    )


@dataclass
class Upgraded:
    sets: list[str]  # the upgrade's config, without ray.address
    gallery: Gallery
    workdir: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory, s3_server, mlflow_server, two_nodes) -> Upgraded:
    """One `carryover upgrade` driven against the two-node cluster, all on S3 + MLflow."""
    wd = tmp_path_factory.mktemp("multinode")
    sets = TINY + [
        f"workdir={wd}",
        f"gallery={s3_server.uri('multinode', 'gallery')}",
        f"images={s3_server.uri('multinode', 'images')}",
        f"storage.endpoint_url={s3_server.endpoint_url}",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=multinode",
        "gallery_name=multinode",
        "plan.parallel_shards=2",
    ]
    cfg = load_config(None, sets)
    prepare("digits", cfg.images_uri, SHARDS, cfg.storage, cfg.data, limit=ROWS)
    # Both pool actors up before the first shard is handed out: each node gets work.
    r = _cli(
        ["upgrade", "-q"],
        [*sets, f"ray.address={two_nodes.address}"],
        RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300",
    )
    return Upgraded(sets, Gallery(cfg.gallery_uri, cfg.storage), wd, r)


def test_upgrade_on_two_nodes_runs_shards_on_both(upgraded, two_nodes) -> None:
    r, g = upgraded.result, upgraded.gallery
    assert r.returncode == 0, r.stderr[-3000:]
    assert g.current() == "v2" and g.versions() == ["v1", "v2"]
    m = g.manifest("v2")
    assert m["rows"] + m["rejected"] == ROWS and len(m["shards"]) == SHARDS
    markers = uri.list_dir(g.path("versions", "v2", "_attempts"), g.storage)
    nodes = {
        uri.read_json(g.path("versions", "v2", "_attempts", n), g.storage)["node_id"]
        for n in markers
    }
    assert nodes == two_nodes.node_ids  # shards executed on both nodes
    # Ray Train's checkpoints went to storage every node shares, none to the driver's disk
    runs = uri.list_dir(uri.join(g.uri, "_ray_results"), g.storage)
    assert {n.split("-")[1] for n in runs if n.startswith("train-")} >= {"v1", "v2"}
    assert not (upgraded.workdir / "ray_results").exists()


def _graph_objects(s3_server, prefix: str) -> dict[str, tuple[str, str]]:
    """Key → (ETag, LastModified) of every object under the prefix: a rewrite changes it."""
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    out = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: (o["ETag"], o["LastModified"].isoformat()) for o in out}


def _runs(mlflow_server: str) -> list[str]:
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("multinode")
    return sorted(r.info.run_id for r in client.search_runs([exp.experiment_id]))


def test_rerun_of_a_finished_upgrade_does_nothing(
    upgraded, s3_server, mlflow_server, tmp_path
) -> None:
    assert upgraded.result.returncode == 0, upgraded.result.stderr[-3000:]
    graph = "multinode/gallery/versions/v2/"
    records, runs = _graph_objects(s3_server, graph), _runs(mlflow_server)
    assert runs and any("/_graph/" in k for k in records)
    ray_tmp = tmp_path / "ray"  # where a Ray this driver started would put its session
    report = tmp_path / "report.json"
    # no ray.address and no RAY_ADDRESS: had it needed Ray, it would have started one here
    r = _cli(["upgrade", "--report", str(report)], upgraded.sets, RAY_TMPDIR=str(ray_tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "v2 is already serving: nothing to do" in " ".join(r.stdout.split())
    rep = json.loads(report.read_text())
    assert rep["nothing_to_do"] is True and rep["parent_run_id"] is None
    assert rep["serving"] == "v2" and rep["stages"] == {}
    assert _runs(mlflow_server) == runs  # no MLflow run opened
    assert _graph_objects(s3_server, graph) == records  # no record written or rewritten
    assert not ray_tmp.exists() or not list(ray_tmp.rglob("session_*"))
    assert holder_of(upgraded.gallery.uri, upgraded.gallery.storage) is None
    # a config that builds a different version is not short-circuited: it is refused
    r = _cli(["upgrade"], [*upgraded.sets, "plan.budget_fraction=0.5"], RAY_TMPDIR=str(ray_tmp))
    assert r.returncode == 2 and "was started with a different config" in r.stderr, r.stderr
    assert "plan.budget_fraction" in r.stderr and _runs(mlflow_server) == runs


def test_local_paths_are_refused_on_two_nodes(upgraded, two_nodes, tmp_path) -> None:
    address = f"ray.address={two_nodes.address}"
    sets = [*TINY, f"workdir={tmp_path}", "gallery_name=local"]
    cfg = load_config(None, sets)
    prepare("digits", cfg.images_uri, 2, cfg.storage, cfg.data, limit=100)  # on this disk only
    r = _cli(["upgrade", "-q"], [*sets, address])
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, err[-3000:]
    assert "2 nodes" in err and f"gallery={tmp_path / 'gallery'}" in err
    assert f"images={tmp_path / 'images'}" in err and "Traceback" not in err
    g = Gallery(str(tmp_path / "gallery"))
    assert g.current() is None and g.versions() == [] and holder_of(g.uri) is None
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("carryover")
    assert exp is None or client.search_runs([exp.experiment_id]) == []
    # everything on S3 but Ray Train's storage: refused the same way, naming that key
    rr = f"ray.storage_path={tmp_path / 'rr'}"
    r = _cli(["upgrade", "-q"], [*upgraded.sets, address, rr, "plan.target_version=v3"])
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and rr in err and "gallery=" not in err, err[-3000:]
    assert upgraded.gallery.versions() == ["v1", "v2"]
    # the ingest and backfill commands check the same
    for cmd in ("ingest", "backfill"):
        r = _cli([cmd], [*sets, address])
        err = " ".join(r.stderr.split())
        assert r.returncode == 2 and "2 nodes" in err, (cmd, err[-3000:])
