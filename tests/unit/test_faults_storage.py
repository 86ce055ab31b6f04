"""Storage faults (docs/reliability.md, Faults): an S3 endpoint that fails a fraction of
requests is ridden out by retries with results identical to a clean run; a permanent error
fails naming the object, and leaves nothing half-written where readers would see it."""

from __future__ import annotations

import gc
import re
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import (
    ArchitectureConfig,
    DataConfig,
    EmbedConfig,
    ModelConfig,
    PreprocessConfig,
    StorageConfig,
)
from pipeline.data.prepare import prepare
from pipeline.embed.runner import embed_images_to_version
from pipeline.gallery.store import (
    Gallery,
    GalleryError,
    arrow_to_embeddings,
    embedding_schema,
    embeddings_to_arrow,
    shard_file,
)
from pipeline.io import uri as uri_io
from pipeline.io.uri import StorageError
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.store import embedder_meta, resolve_blob, save_model_dir

SHARDS, ROWS, DIM = 2, 40, 4
SCHEMA = embedding_schema(DIM)


def _batch(version: str, sid: int, lo: int, hi: int) -> pa.RecordBatch:
    rng = np.random.default_rng(sid * 1000 + lo)
    emb = rng.normal(size=(hi - lo, DIM)).astype(np.float32)
    keys = [f"{sid}-{i}" for i in range(lo, hi)]
    return pa.record_batch(
        [pa.array(keys), embeddings_to_arrow(emb), pa.array([f"embed:{version}"] * len(keys))],
        schema=SCHEMA,
    )


def _write_version(g: Gallery, version: str, stream: bool = True) -> None:
    """What an upgrade does to storage for one version: write each shard (streamed, as the
    executors do, or whole), checksum it, commit it, then the manifest, then promote."""
    for sid in range(SHARDS):
        out = g.shard_uri(version, sid)
        halves = [_batch(version, sid, 0, ROWS // 2), _batch(version, sid, ROWS // 2, ROWS)]
        if stream:
            w = uri_io.ParquetStreamWriter(out, SCHEMA, g.storage)
            try:
                for b in halves:
                    w.write(b)
                w.close()
            except BaseException:
                w.abort()
                raise
        else:
            uri_io.write_table(pa.Table.from_batches(halves), out, g.storage)
        rec = {"shard_id": sid, "path": shard_file(sid), "rows": ROWS}
        g.commit_shard(version, rec | {"checksum": g.file_checksum(out)})
    g.finalize(version, {"model": version, "embedding_dim": DIM})
    g.promote(version)


def _read_back(g: Gallery, version: str) -> dict:
    """What a reader sees of a version: its manifest (less its timestamp), rows, embeddings."""
    m = g.manifest(version)
    batches = list(g.iter_embeddings(version, batch_size=20))  # several reads per file
    return {
        "versions": g.versions(),
        "current": g.current(),
        "manifest": {k: x for k, x in m.items() if k != "created_at"},
        "rows": [
            uri_io.parquet_num_rows(g.shard_uri(version, s["shard_id"]), g.storage)
            for s in m["shards"]
        ],
        "keys": [k for b in batches for k in b.column("key").to_pylist()],
        "emb": np.concatenate([arrow_to_embeddings(b.column("embedding")) for b in batches]),
    }


def _objects(s3_server, prefix: str) -> dict[str, bytes]:
    """The objects under a prefix, read straight from the endpoint (not through the proxy);
    pyarrow's empty directory markers (`dir/`, left by a directory delete) aside."""
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"][-1] != "/"]
    return {
        k[len(prefix) :]: s3.get_object(Bucket=s3_server.bucket, Key=k)["Body"].read() for k in keys
    }


@pytest.mark.parametrize(
    ("retries", "rate", "stream"),
    [
        # The S3 client gives up at its first error: carryover's own retries (with_retries
        # and the streamed reader's) carry every call. Shards written whole: a stream
        # cannot be replayed, only redone by the shard's executor.
        pytest.param(1, 0.08, False, id="carryover-retries"),
        # As deployed: pyarrow's S3 retry strategy first (about a second per fault), then
        # carryover's; shards streamed as the executors do.
        pytest.param(5, 0.2, True, id="as-deployed", marks=pytest.mark.slow),
    ],
)
def test_flaky_s3_is_retried_and_gives_the_clean_result(
    faulty_s3, s3_server, retries: int, rate: float, stream: bool
) -> None:
    run = uuid.uuid4().hex[:8]
    clean = Gallery(s3_server.uri(run, "clean"), StorageConfig(endpoint_url=s3_server.endpoint_url))
    flaky = Gallery(
        faulty_s3.uri(run, "flaky"),
        StorageConfig(endpoint_url=faulty_s3.endpoint_url, retries=retries),
    )
    for g in (clean, flaky):
        _write_version(g, "v1", stream)

    faulty_s3.configure(rate=rate, seed=7)
    _write_version(flaky, "v2", stream)
    got = _read_back(flaky, "v2")
    uri_io.delete(flaky.version_uri("v1"), flaky.storage)
    assert faulty_s3.injected >= 5, (faulty_s3.requests, faulty_s3.injected)
    faulty_s3.configure()

    _write_version(clean, "v2", stream)
    want = _read_back(clean, "v2")
    uri_io.delete(clean.version_uri("v1"), clean.storage)
    np.testing.assert_array_equal(got.pop("emb"), want.pop("emb"))
    assert got == want
    assert got["current"] == "v2" and got["versions"] == ["v1", "v2"]  # listed before the delete
    assert got["keys"] == [f"{s}-{i}" for s in range(SHARDS) for i in range(ROWS)]
    # the same objects, byte for byte; no temporary left behind, v1 gone
    flaky_objects = _objects(s3_server, f"{run}/flaky/")
    clean_objects = _objects(s3_server, f"{run}/clean/")
    assert sorted(flaky_objects) == sorted(clean_objects)
    assert not any("/.tmp-" in k or k.startswith("versions/v1/") for k in flaky_objects)
    for k in flaky_objects:
        if k not in ("CURRENT", "versions/v2/manifest.json"):  # these carry timestamps
            assert flaky_objects[k] == clean_objects[k], k


def test_denied_manifest_write_names_it_and_no_version_appears(faulty_s3, s3_server) -> None:
    run = uuid.uuid4().hex[:8]
    g = Gallery(faulty_s3.uri(run, "g"), StorageConfig(endpoint_url=faulty_s3.endpoint_url))
    _write_version(g, "v1")
    manifest = g.path("versions", "v2", "manifest.json")
    # the manifest's data reaches the endpoint (as a temporary), but never its final name
    faulty_s3.configure(fail_path=rf"/{run}/g/versions/v2/manifest\.json$", fail_methods=("PUT",))
    with pytest.raises(StorageError, match=rf"write {re.escape(manifest)}: failed after 5 att"):
        _write_version(g, "v2")
    assert faulty_s3.injected >= 5  # carryover tried again, then gave up
    faulty_s3.configure()
    # the shards and their records are there, but not the version: readers never see it
    assert len(g.committed_shards("v2")) == SHARDS
    assert g.versions() == ["v1"] and not g.has_version("v2") and g.current() == "v1"
    left = sorted(_objects(s3_server, f"{run}/g/versions/v2/"))
    assert left == [f"_shards/shard-{i:05d}.json" for i in range(SHARDS)] + [
        shard_file(i) for i in range(SHARDS)
    ]
    with pytest.raises(GalleryError, match="cannot promote 'v2': it has no manifest"):
        g.promote("v2")
    # once the permission is back, finishing the version is an ordinary rerun
    g.finalize("v2", {"model": "v2", "embedding_dim": DIM})
    assert g.versions() == ["v1", "v2"]


def test_failed_streamed_shard_names_it_and_leaves_no_object(faulty_s3, s3_server) -> None:
    run = uuid.uuid4().hex[:8]
    g = Gallery(faulty_s3.uri(run, "g"), StorageConfig(endpoint_url=faulty_s3.endpoint_url))
    # every upload of shard 1's data is refused (under whatever name it is written)
    faulty_s3.configure(
        fail_path=r"/versions/v1/(\.tmp-\w+-)?shard-00001\.parquet$", fail_methods=("PUT",)
    )
    shard = re.escape(g.shard_uri("v1", 1))
    with pytest.raises(StorageError, match=rf"write {shard}: .*ACCESS_DENIED"):
        _write_version(g, "v1")
    faulty_s3.configure()
    assert set(g.committed_shards("v1")) == {0}
    assert sorted(_objects(s3_server, f"{run}/g/")) == [
        "versions/v1/_shards/shard-00000.json",
        "versions/v1/shard-00000.parquet",
    ]
    assert g.versions() == [] and g.current() is None


def test_aborted_stream_publishes_nothing(s3_server) -> None:
    # A shard abandoned part-way (its executor failed) leaves no object under any name.
    run = uuid.uuid4().hex[:8]
    storage = StorageConfig(endpoint_url=s3_server.endpoint_url)
    w = uri_io.ParquetStreamWriter(s3_server.uri(run, "s.parquet"), SCHEMA, storage)
    w.write(_batch("v1", 0, 0, ROWS))
    w.abort()
    del w
    gc.collect()  # pyarrow's S3 stream completes its upload when it is freed
    assert _objects(s3_server, f"{run}/") == {}


def test_failed_local_shard_leaves_no_file_or_temporary(tmp_path: Path) -> None:
    g = Gallery(str(tmp_path / "g"))
    blocker = Path(uri_io.resolve(g.shard_uri("v1", 1)).path)
    (blocker / "in-the-way").mkdir(parents=True)  # the final rename cannot land on it
    with pytest.raises(StorageError, match=rf"write {re.escape(g.shard_uri('v1', 1))}: "):
        _write_version(g, "v1")
    assert set(g.committed_shards("v1")) == {0}
    left = sorted(p.name for p in blocker.parent.iterdir())
    assert left == ["_shards", "shard-00000.parquet", "shard-00001.parquet"]  # no .tmp-*
    assert blocker.is_dir() and g.versions() == []


def test_streamed_read_is_retried_on_s3(faulty_s3) -> None:
    # The S3 client gives up at once, so the fault reaches carryover while it streams a file.
    run = uuid.uuid4().hex[:8]
    g = Gallery(
        faulty_s3.uri(run, "g"), StorageConfig(endpoint_url=faulty_s3.endpoint_url, retries=1)
    )
    _write_version(g, "v1")
    clean = list(g.iter_embeddings("v1", batch_size=10))
    # the read of shard 0's row groups (after its footer) fails once
    faulty_s3.configure(
        fail_path=rf"/{run}/g/versions/v1/shard-00000\.parquet$",
        fail_methods=("GET",),
        fail_status=503,
        fail_skip=1,
        fail_times=1,
    )
    assert list(g.iter_embeddings("v1", batch_size=10)) == clean
    assert faulty_s3.injected == 1


def test_streamed_read_resumes_mid_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file big enough to be read in several requests can fail after some batches went out:
    # the retry must neither repeat nor drop rows. Here the Parquet reader itself raises.
    g = Gallery(str(tmp_path / "g"))
    _write_version(g, "v1")
    clean = list(g.iter_embeddings("v1", batch_size=10))
    real = pq.ParquetFile.iter_batches
    failed = []

    def flaky(self, *a, **kw):
        for i, b in enumerate(real(self, *a, **kw)):
            if i == 2 and not failed:
                failed.append(i)
                raise OSError("connection reset by peer (injected)")
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", flaky)
    assert list(g.iter_embeddings("v1", batch_size=10)) == clean
    assert failed == [2]


def test_retried_delete_that_had_already_landed_is_done(faulty_s3) -> None:
    run = uuid.uuid4().hex[:8]
    g = Gallery(
        faulty_s3.uri(run, "g"), StorageConfig(endpoint_url=faulty_s3.endpoint_url, retries=1)
    )
    _write_version(g, "v1")
    _write_version(g, "v2")
    # the directory's objects are gone, but the answer to the last delete is lost
    faulty_s3.configure(
        fail_path=rf"/{run}/g/versions/v1/$", fail_methods=("DELETE",), fail_status=503
    )
    uri_io.delete(g.version_uri("v1"), g.storage)
    assert faulty_s3.injected >= 1
    faulty_s3.configure()
    assert g.versions() == ["v2"] and uri_io.list_dir(g.version_uri("v1"), g.storage) == []


@pytest.mark.slow
def test_ray_embed_over_flaky_s3_matches_a_clean_run(
    faulty_s3, s3_server, ray_local, tmp_path: Path
) -> None:
    # Ray workers read the image shards through the same faulty endpoint (the filesystem
    # travels to them pickled); the driver streams and commits the gallery shards.
    pre = PreprocessConfig(input_size=8, channels=1, mean=[0.5], std=[0.5])
    mcfg = ModelConfig(
        name="m", architecture=ArchitectureConfig(widths=[4], embedding_dim=DIM), preprocess=pre
    )
    torch.manual_seed(0)
    net = EmbeddingNet(mcfg.architecture, in_channels=1).eval()
    save_model_dir(net, embedder_meta(mcfg), tmp_path / "m")
    blob = resolve_blob(ModelConfig(name="m", uri=str(tmp_path / "m")))

    run = uuid.uuid4().hex[:8]
    direct = StorageConfig(endpoint_url=s3_server.endpoint_url)
    prepare("digits", s3_server.uri(run, "images"), 3, direct, DataConfig(), limit=90)
    records = {}
    for name, endpoint, rate in (("clean", s3_server.endpoint_url, 0.0), ("flaky", None, 0.15)):
        storage = StorageConfig(endpoint_url=endpoint or faulty_s3.endpoint_url)
        images = s3_server.uri(run, "images")
        files = dict(enumerate(uri_io.parquet_files(images, storage)))
        g = Gallery(s3_server.uri(run, name), storage)
        faulty_s3.configure(rate=rate, seed=3)
        res = embed_images_to_version(
            files, g, "v1", blob, EmbedConfig(batch_size=16), {}, "embed:m", storage, quiet=True
        )
        if endpoint is None:
            assert faulty_s3.injected >= 5, (faulty_s3.requests, faulty_s3.injected)
        faulty_s3.configure()
        assert (res.rows_written, res.rows_rejected, res.shards_written) == (90, 0, 3)
        records[name] = {s: r["checksum"] for s, r in g.committed_shards("v1").items()}
    assert records["flaky"] == records["clean"]  # the same bytes in every shard
